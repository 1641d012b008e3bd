"""The proxy-port service: listeners, one task per client connection,
limits, and the flow after the handshake (dial, then splice or forward).

Thin on purpose: what the client's bytes mean is decided by `Handshake`
(handshake.py), what a forwarded request looks like by
appliance/proto/http_proxy.py, where to listen by bind.py, what a
requested host becomes by target.py, and a UDP association is relayed by
udp_relay.py. This module turns their answers into socket operations.

Dependencies are injected: `dial` (a `Flow` -> an open stream: the
dispatcher's `connect_tcp`, rules -> outbound) and `open_udp` (a UDP `Flow`
-> a peer, or None for REJECT: the dispatcher's `open_udp`), so the service
knows nothing of routing.

What it owns: the listening sockets, each accepted connection, the
outbound stream `dial` returned, the UDP relay socket of an association,
and one pool pin per fake IP a live flow uses; all are released in
`finally`.

How it fails: per connection, never for the port. A malformed request
gets the protocol's error reply and the connection is closed; a dial
failure is answered the same way (SOCKS 0x02/0x04/0x05, HTTP
403/502/504). Bounded: a handshake must finish within
`Limits.handshake_timeout`, an HTTP head within `max_head` bytes, and at
most `max_connections` client connections are served at once (more are
reset at accept). Binding fails the service at start (OSError, or
ProxyPortError from bind.py) so the app can say which key is wrong; at a
reload (`reconfigure`) it is logged and the other listeners keep serving.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from appliance.config.model import Config
from appliance.flow import Entry, Flow, Inbound
from appliance.gateway.proxyport.bind import (
    LOOPBACK,
    BindAddress,
    ListenerChanges,
    ListenerKey,
    choose_bind_addresses,
    lan_addresses,
    listener_changes,
)
from appliance.gateway.proxyport.forward import relay_request
from appliance.gateway.proxyport.handshake import (
    Ask,
    Authenticator,
    Handshake,
    NeedMore,
    Refuse,
    Refused,
    UdpAssociate,
    classify_dial_error,
)
from appliance.gateway.proxyport.target import Pins, Targets
from appliance.gateway.proxyport.udp_relay import OpenUdp, UdpAssociation
from appliance.gateway.splice import FlowRegistry, SpliceResult, abort, close, splice
from appliance.gateway.tcp import Dial, FakeIPs, accept_loop, ip_port
from appliance.limits import ConcurrencyLimit, client_key
from appliance.proto.http_connect import DEFAULT_MAX_HEAD, HttpConnectError, format_authority
from appliance.proto.http_proxy import Forwarding, forwarding
from appliance.sockopt import IP_FREEBIND, IPV6_FREEBIND

log = logging.getLogger(__name__)

BACKLOG = 512
RECV = 64 * 1024


@dataclass(frozen=True)
class ProxyPort:
    """One configured proxy port: its config key and what it speaks."""

    key: str  # "mixed-port" | "socks-port" | "port"
    port: int
    socks: bool
    http: bool

    @property
    def inbound(self) -> Inbound:
        """What a flow taken here names as its inbound."""
        return _INBOUND[self.key]

    def entry(self, hs: Handshake, command: str) -> Entry:
        """How a flow asked for after `hs` came in (IN-* rules, /connections):
        the protocol the client spoke as mihomo's metadata type names it
        (HTTPS for a CONNECT tunnel, HTTP for a forwarded request)."""
        in_type = "SOCKS5" if hs.speaks_socks5 else "HTTP" if command == "forward" else "HTTPS"
        return Entry(self.inbound, self.port, _IN_NAME[self.key], in_type, hs.user)


# The inbound each Clash proxy-port key names in its flows.
_INBOUND: dict[str, Inbound] = {"mixed-port": "mixed", "socks-port": "socks", "port": "http"}
# mihomo's listener names for the same keys (IN-NAME).
_IN_NAME = {"mixed-port": "DEFAULT-MIXED", "socks-port": "DEFAULT-SOCKS", "port": "DEFAULT-HTTP"}
# What each Clash proxy-port key speaks: (SOCKS5, HTTP).
_SPEAKS = {"mixed-port": (True, True), "socks-port": (True, False), "port": (False, True)}


def proxy_ports(cfg: Config) -> list[ProxyPort]:
    """The proxy ports `cfg` asks for (`Config.proxy_ports`: Clash keys
    mixed-port, socks-port, port, in that order), with what each speaks."""
    return [ProxyPort(key, port, *_SPEAKS[key]) for key, port in cfg.proxy_ports]


@dataclass(frozen=True)
class Limits:
    """Bounds per connection and for the service."""

    handshake_timeout: float = 10.0
    max_head: int = DEFAULT_MAX_HEAD
    max_connections: int = 1024
    # UDP ASSOCIATE: open destinations (one peer each) per association.
    udp_max_targets: int = 1024


@dataclass(frozen=True)
class _Listening:
    """One live listener's accept loop: cancel `scope` to close it;
    `closed` is set once its socket is closed."""

    scope: trio.CancelScope
    closed: trio.Event


class ProxyPorts:
    """The proxy-port service: listeners for every configured proxy port,
    the per-connection handshakes, and their flows in `registry`."""

    def __init__(
        self,
        cfg: Config,
        pool: FakeIPs,
        dial: Dial,
        registry: FlowRegistry | None = None,
        *,
        open_udp: OpenUdp | None = None,
        limits: Limits | None = None,
        clients: ConcurrencyLimit | None = None,
        ports: Sequence[ProxyPort] | None = None,
        addresses: Sequence[BindAddress] | None = None,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.dial = dial
        self.registry = registry if registry is not None else FlowRegistry()
        self.open_udp = open_udp
        self.limits = limits if limits is not None else Limits()
        # Per-client share of connections (appliance.limits; None: only the
        # service's own max_connections bounds them).
        self.clients = clients
        self.ports = list(ports) if ports is not None else proxy_ports(cfg)
        self.addresses = list(addresses) if addresses is not None else None
        self.auth = Authenticator(cfg.authentication)
        self.targets = Targets(pool, self.registry)
        self.active = 0
        self.refused_over_limit = 0
        # (key, address, port) actually bound; filled by serve().
        self.bound: list[tuple[str, str, int]] = []
        # The live listeners by (key, address), so a reload can close one;
        # each key's port once bound (port 0: the kernel's choice).
        self._listening: dict[ListenerKey, _Listening] = {}
        self._port: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None

    # -- listening --------------------------------------------------------------

    async def bind_addresses(self, cfg: Config | None = None) -> list[BindAddress]:
        """Where to listen under `cfg`'s allow-lan and bind-address (the
        running configuration by default), on the LAN interfaces the
        service started with, read again (their addresses may have changed).
        Raises ProxyPortError for a bind-address that is not one of them."""
        if self.addresses is not None:
            return self.addresses
        cfg = cfg if cfg is not None else self.cfg
        lan: list[BindAddress] = []
        if self.cfg.appliance.lan:
            lan = await trio.to_thread.run_sync(lan_addresses, self.cfg.appliance.lan)
        return choose_bind_addresses(
            lan,
            allow_lan=cfg.allow_lan,
            bind_address=cfg.bind_address,
        )

    async def _bind(self, spec: ProxyPort, a: BindAddress, port: int) -> trio.SocketListener | None:
        """One listening socket for `spec` on `a`:`port`; None for ::1 on a
        host without IPv6 (loopback v4 suffices). Any other failure raises
        OSError naming the key and address."""
        family = socket.AF_INET6 if a.version == 6 else socket.AF_INET
        try:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            if a in LOOPBACK:
                return None  # no IPv6 at all on this host
            raise
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # An address still in IPv6 DAD ("tentative") at boot
                # can be bound all the same.
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            try:
                await sock.bind(a.sockaddr(port))
            except OSError as err:
                if a == LOOPBACK[1] and err.errno != errno.EADDRINUSE:
                    # No ::1 here (IPv6 disabled on lo): loopback v4 suffices.
                    sock.close()
                    return None
                raise OSError(err.errno, f"{spec.key} {a}:{port}: {err.strerror}") from None
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return trio.SocketListener(sock)

    async def _listen(
        self, spec: ProxyPort, addresses: Sequence[BindAddress]
    ) -> list[tuple[BindAddress, trio.SocketListener]]:
        """One listening socket per address, all on one port (port 0: the
        first socket's kernel-chosen port for all, kept in `_port` for
        listeners a reload opens). ::1 is skipped when the host has no
        IPv6; any other failure closes those already bound and raises
        OSError."""
        port = spec.port
        listeners: list[tuple[BindAddress, trio.SocketListener]] = []
        try:
            for a in addresses:
                listener = await self._bind(spec, a, port)
                if listener is None:
                    continue
                if port == 0:
                    port = listener.socket.getsockname()[1]
                listeners.append((a, listener))
        except BaseException:
            for _, listener in listeners:
                await listener.aclose()
            raise
        self._port[spec.key] = port
        return listeners

    def _accept_on(self, spec: ProxyPort, a: BindAddress, listener: trio.SocketListener,
                   nursery: trio.Nursery) -> None:
        """Start accepting on `listener` in the service's `nursery`, under
        a cancel scope of its own so a reload can close this one listener
        (the connections it accepted run in the nursery and go on)."""
        scope = trio.CancelScope()
        done = trio.Event()
        self._listening[(spec.key, a)] = _Listening(scope, done)
        port = listener.socket.getsockname()[1]
        self.bound.append((spec.key, a.host, port))

        async def accept() -> None:
            try:
                with scope:
                    await accept_loop(listener, partial(self.handle, spec), nursery, spec.key)
            finally:
                # Cancelled before accept_loop ran: it has not closed the socket.
                listener.socket.close()
                done.set()

        nursery.start_soon(accept)

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on every configured port until cancelled; `started()`
        with (key, address, port) of each listening socket once all are
        bound. Raises OSError or ProxyPortError before that."""
        addresses = await self.bind_addresses()
        try:
            async with trio.open_nursery() as nursery:
                for spec in self.ports:
                    listeners = await self._listen(spec, addresses)
                    log.info(
                        "%s: %s proxy on %s port %d",
                        spec.key,
                        "+".join(k for k, on in (("socks5", spec.socks), ("http", spec.http))
                                 if on),
                        ", ".join(str(a) for a, _ in listeners),
                        self._port[spec.key],
                    )
                    for a, listener in listeners:
                        self._accept_on(spec, a, listener, nursery)
                # From now on a reload may move listeners (`rebind`).
                self._nursery = nursery
                task_status.started(list(self.bound))
        finally:
            self._nursery = None

    # -- reload ---------------------------------------------------------------------

    async def reconfigure(self, cfg: Config) -> ListenerChanges:
        """Apply `cfg`'s `authentication`, `allow-lan` and `bind-address`
        now (SIGHUP): new connections get the new credentials, and the
        listeners move (`rebind`). The ports, the LAN interfaces and the
        rest of the running configuration stay. Raises ProxyPortError (a
        bind-address that is not a LAN address) or OSError (the LAN
        interfaces cannot be read) with the credentials applied and the
        listeners as they were."""
        self.auth = Authenticator(cfg.authentication)
        return await self.rebind(await self.bind_addresses(cfg))

    async def rebind(self, addresses: Sequence[BindAddress]) -> ListenerChanges:
        """Listen on `addresses` from now on, each port as it is: close
        the listeners on other addresses (waiting until each socket is
        closed) and open the missing ones. Connections already accepted
        are not touched. A socket that cannot be bound is logged at ERROR
        and left out (tried again at the next reload); the rest keep
        serving. Returns what was meant to change."""
        if self._nursery is None:
            log.warning("proxy ports: not serving (starting or stopping); listeners "
                        "left as they are")
            return ListenerChanges((), ())
        nursery = self._nursery
        changes = listener_changes(self._listening, [p.key for p in self.ports], addresses)
        for key, a in changes.close:
            listening = self._listening.pop((key, a))
            listening.scope.cancel()
            await listening.closed.wait()
            self.bound = [b for b in self.bound if b[:2] != (key, a.host)]
            log.info("%s: no longer listening on %s (reload)", key, a)
        specs = {p.key: p for p in self.ports}
        for key, a in changes.open:
            spec = specs[key]
            port = self._port.get(key, spec.port)
            try:
                listener = await self._bind(spec, a, port)
            except OSError as err:
                log.error("%s: cannot listen on %s port %d (reload): %s; the other "
                          "addresses keep serving", key, a, port, err.strerror or err)
                continue
            if listener is None:
                continue
            self._port.setdefault(key, listener.socket.getsockname()[1])
            self._accept_on(spec, a, listener, nursery)
            log.info("%s: now listening on %s port %d (reload)", key, a, self._port[key])
        return changes

    # -- one client connection ----------------------------------------------------

    async def handle(self, spec: ProxyPort, stream: trio.SocketStream, peer: Any) -> None:
        """One client connection, from accept to close (always closed when
        this returns or raises: `accept_loop` leaves that to us); `peer`:
        the client's sockaddr."""
        if self.active >= self.limits.max_connections:
            self.refused_over_limit += 1
            log.warning("proxy ports: %d connections already; resetting a new one", self.active)
            await abort(stream)
            return
        try:
            src = ip_port(peer)
            local = stream.socket.getsockname()
        except OSError:
            await stream.aclose()
            return
        share = client_key(src[0]) if self.clients is not None else None
        if self.clients is not None and share is not None and not self.clients.acquire(share):
            # One client at its share: reset at once, others go on.
            await abort(stream)
            return
        self.active += 1
        pins = Pins(self.pool)
        try:
            handshake = Handshake(
                socks=spec.socks, http=spec.http, auth=self.auth, max_head=self.limits.max_head
            )
            with trio.move_on_after(self.limits.handshake_timeout) as timer:
                ask = await self._handshake(spec, stream, src, handshake)
            if timer.cancelled_caught:
                log.info(
                    "%s %s:%d: no complete request within %gs; closing",
                    spec.key,
                    *src,
                    self.limits.handshake_timeout,
                )
                return
            if isinstance(ask, UdpAssociate):
                await self._udp_associate(stream, handshake, ask, src, local, pins,
                                          spec.entry(handshake, "connect"))
            elif ask is not None:
                await self._serve(stream, handshake, ask, src, pins,
                                  spec.entry(handshake, ask.command))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("%s: client connection ended: %r", spec.key, exc)
        finally:
            pins.release()
            self.active -= 1
            if self.clients is not None and share is not None:
                self.clients.release(share)
            await stream.aclose()

    async def _handshake(
        self, spec: ProxyPort, stream: trio.SocketStream, src: tuple[str, int], hs: Handshake
    ) -> Ask | UdpAssociate | None:
        """Run `hs` over `stream`: the request, or None once a refusal is sent."""
        while True:
            event = hs.receive_data(await stream.receive_some(RECV))
            if isinstance(event, Refuse):
                log.log(event.level, "%s %s:%d: %s", spec.key, *src, event.why)
                await _send_refusal(stream, event)
                return None
            out = hs.data_to_send()
            if out:
                await stream.send_all(out)
            if not isinstance(event, NeedMore):
                return event

    # -- after the handshake --------------------------------------------------------

    async def _serve(
        self,
        stream: trio.SocketStream,
        hs: Handshake,
        ask: Ask,
        src: tuple[str, int],
        pins: Pins,
        entry: Entry,
    ) -> None:
        where = f"{src[0]}:{src[1]} -> {format_authority(ask.host, ask.port)}"
        fwd: Forwarding | None = None
        try:
            target = self.targets.resolve(ask.host, ask.port, src, pins, entry)
            if ask.command == "forward":
                assert ask.request is not None
                try:
                    fwd = forwarding(ask.request)
                except HttpConnectError as err:
                    raise Refused("bad-target", str(err)) from None
            server = await self._dial(target, where)
        except Refused as refusal:
            log.warning("proxy %s: %s", where, refusal.why)
            await _send_refusal(stream, hs.refuse(refusal.refusal, refusal.why))
            return
        dst = str(target.dst) if target.dst is not None else ""
        flow = self.registry.open("tcp", src, (dst, target.dst_port), target.domain)
        flow.routed(target)
        log.debug("proxy %s: via %s", where, target.outbound or "?")
        idle_timeout = self.cfg.appliance.idle_timeout
        result: SpliceResult | None = None
        # The registry's close_flow (the API's DELETE /connections) cancels
        # this scope: the relay ends and both sockets close.
        with flow.cancel_scope:
            try:
                bound = ("0.0.0.0", 0)
                if hs.reply_names_address and isinstance(server, trio.SocketStream):
                    bound = ip_port(server.socket.getsockname())
                answer = hs.accept(*bound)
                if answer:
                    await stream.send_all(answer)
                framer = fwd.framer if fwd is not None and not fwd.upgrade else None
                head = fwd.head if fwd is not None else b""
                rest = ask.rest
                if framer is not None:
                    rest = rest[: framer.feed(rest)]
                if head or rest:
                    await server.send_all(head + rest)
                    flow.add_up(len(head) + len(rest))
                if framer is not None:
                    result = await relay_request(stream, server, framer, flow, idle_timeout)
                    if result.reason != "error":
                        # One request per connection: end ours once the response is through.
                        await _linger_close(stream)
                else:
                    result = await splice(stream, server, idle_timeout=idle_timeout,
                                          half_close_timeout=self.cfg.appliance.half_close_timeout,
                                          meter=flow)
            finally:
                self.registry.close(flow, result)
                # Shielded: a cancelled first close must not skip the second.
                with trio.CancelScope(shield=True):
                    if result is None or result.reason == "error":
                        await abort(stream)
                        await abort(server)
                    else:
                        await close(server)
        if result is None:  # closed through the API (or failed before relaying)
            return
        log.debug(
            "proxy %s: %s%s (up %d, down %d bytes)",
            where,
            result.reason,
            f": {result.detail}" if result.detail else "",
            result.up,
            result.down,
        )

    async def _dial(self, target: Flow, where: str) -> trio.abc.Stream:
        """`dial` bounded by connect-timeout; raises Refused (counted in
        the registry's dial_failures) for any failure."""
        timeout = self.cfg.appliance.connect_timeout
        try:
            with trio.fail_after(timeout):
                return await self.dial(target)
        except trio.TooSlowError:
            why = f"no connection within {timeout:g}s"
        except Exception as exc:  # dial is pluggable: any failure ends this flow only
            why = str(exc) or type(exc).__name__
            log.debug("proxy %s: dial failed", where, exc_info=True)
        self.registry.dial_failures += 1
        self.registry.failures.record(target, why, flow_id=self.registry.new_id())
        via = f" via {target.outbound}" if target.outbound else ""
        raise Refused(classify_dial_error(why), f"dial{via} failed: {why}")

    async def _udp_associate(
        self,
        stream: trio.SocketStream,
        hs: Handshake,
        ask: UdpAssociate,
        src: tuple[str, int],
        local: Any,
        pins: Pins,
        entry: Entry,
    ) -> None:
        if self.open_udp is None:
            log.info("proxy %s:%d: UDP ASSOCIATE refused: no UDP outbound given", *src)
            refusal = hs.refuse("unsupported", "UDP ASSOCIATE is not served")
            await stream.send_all(refusal.reply)
            return
        family = stream.socket.family
        # A plain non-blocking socket: the shared UDP session path
        # (gateway/udp.py) drains it after each wakeup, as the gateway's.
        relay_sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            relay_sock.setblocking(False)
            # On the address the client reached us at (a LAN or loopback
            # one, so binding does not block).
            if family == socket.AF_INET6:
                relay_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                relay_sock.bind((local[0], 0, 0, local[3]))
            else:
                relay_sock.bind((local[0], 0))
            bound = ip_port(relay_sock.getsockname())
            await stream.send_all(hs.accept(*bound))
            flow = self.registry.open("udp", src, bound, None)
            association = UdpAssociation(
                relay_sock,
                src,
                (ask.host, ask.port),
                open_udp=self.open_udp,
                targets=self.targets,
                pins=pins,
                flow=flow,
                entry=entry,
                idle_timeout=self.cfg.appliance.idle_timeout,
                max_targets=self.limits.udp_max_targets,
            )
            association.sessions.failures = self.registry.failures
            log.debug("proxy %s:%d: UDP ASSOCIATE relaying at %s:%d", *src, *bound)
            try:
                await association.run(stream)
            finally:
                self.registry.close(flow)
        finally:
            relay_sock.close()


async def _send_refusal(stream: trio.SocketStream, refusal: Refuse) -> None:
    if refusal.reply:
        await stream.send_all(refusal.reply)
    if refusal.linger:
        await _linger_close(stream)


async def _linger_close(stream: trio.SocketStream, seconds: float = 1.0) -> None:
    """After an error reply: stop sending, then read (and discard) what the
    client still sends for a moment, so closing does not reset the
    connection and destroy the reply before the client has read it."""
    try:
        await stream.send_eof()
        with trio.move_on_after(seconds):
            total = 0
            while total < 1 << 20:
                data = await stream.receive_some(RECV)
                if not data:
                    break
                total += len(data)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve(
    cfg: Config,
    pool: FakeIPs,
    dial: Dial,
    registry: FlowRegistry | None = None,
    *,
    open_udp: OpenUdp | None = None,
    clients: ConcurrencyLimit | None = None,
    task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy ports `cfg` configures (mixed-port, socks-port, port)
    until cancelled; `started()` once all are bound, with (key, address,
    port) for each listening socket.

    `dial` routes and connects a TCP `Flow` (the dispatcher's
    `connect_tcp`); `open_udp` routes and opens one UDP destination of a
    UDP ASSOCIATE (the dispatcher's `open_udp`; None: UDP ASSOCIATE is
    answered "command not supported"). Raises OSError or
    ProxyPortError if a port cannot be bound. `clients` is the per-client
    share of connections (appliance.limits `proxy-connections-per-client`).
    """
    service = ProxyPorts(cfg, pool, dial, registry, open_udp=open_udp, clients=clients)
    await service.serve(task_status=task_status)
