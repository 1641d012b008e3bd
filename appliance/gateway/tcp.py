"""The transparent TCP listener: captured LAN connections -> domain -> outbound.

The capture (nft TPROXY or tc sk_assign) hands connections for fake IPs to a
socket with IP_TRANSPARENT listening on `tproxy-port`; the accepted socket's
*local* address is the destination the client asked for. For a fake IP the
pool gives the domain back (pinned for the flow's lifetime, so recycling can
never remap an address a live flow uses); `dial` (the dispatcher's
`connect_tcp`, appliance/routing.py) routes the `Flow` and connects its
outbound; `splice` relays until the flow ends.

What it owns: the listening socket(s), each accepted connection, the
outbound stream `dial` returned, and one pool pin per fake-IP flow; all are
released in `finally`. Failures are per flow and never stop the listener:
an unmapped fake IP (expired, or from before a restart without
store-fake-ip) and a failed dial both reset the client at once (RST, so the
client retries or fails fast instead of hanging), log why, and count it in
the `FlowRegistry`.

Fair shares: with a `flows` limit (appliance/limits.py; the same one the
UDP gateway's sessions count against), a client already holding its share
of flows, or any client once all flows are taken, has its new connection
reset at once (before any pin, dial or log line: a flood costs one accept
and one close per connection) and counted as that limit's refusal.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from appliance.config.model import Config, IPAddress
from appliance.flow import Flow, tproxy_entry
from appliance.gateway.splice import (
    FlowRecord,
    FlowRegistry,
    SpliceResult,
    abort,
    close,
    reset_on_close,
    splice,
)
from appliance.limits import ConcurrencyLimit, client_key
from appliance.sockopt import IP_TRANSPARENT, IPV6_TRANSPARENT, set_keepalive

log = logging.getLogger(__name__)

BACKLOG = 1024
# Connections accepted in a row before the accept loop lets the others run.
ACCEPT_BURST = 16
# What trio.serve_listeners treats as "out of capacity, retry": pause, retry.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY = 0.1


# Route a flow and connect its outbound (`Dispatcher.connect_tcp`): sets
# `flow.outbound`; raises on failure.
Dial = Callable[[Flow], Awaitable[trio.abc.Stream]]


class FakeIPs(Protocol):
    """The part of `appliance.fakeip.pool.FakeIPPool` the gateway uses (the
    transparent listeners here and in udp.py, and the proxy ports in proxyport/)."""

    def is_fake(self, ip: Any) -> bool: ...

    def pin(self, ip: Any) -> str | None: ...

    def unpin(self, ip: Any) -> None: ...


def ip_port(sockaddr: Any) -> tuple[str, int]:
    """(ip text, port) from a v4 or v6 sockaddr; IPv4-mapped v6 unmapped."""
    ip = parse_sockaddr_ip(sockaddr)
    return str(ip), int(sockaddr[1])


def parse_sockaddr_ip(sockaddr: Any) -> IPAddress:
    """The address of a v4 or v6 sockaddr; IPv4-mapped v6 unmapped."""
    text: str = sockaddr[0]
    if len(sockaddr) == 2:
        # AF_INET: the kernel's dotted quad; inet_aton (C) parses it several
        # times faster than ipaddress does from text.
        return ipaddress.IPv4Address(socket.inet_aton(text))
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def sockaddr_text(sockaddr: Any, ip: IPAddress) -> str:
    """The text of `ip`, parsed from `sockaddr` (`parse_sockaddr_ip`): an
    AF_INET sockaddr's own, which is already the kernel's dotted quad (what
    str() of the address would build again)."""
    return sockaddr[0] if len(sockaddr) == 2 else str(ip)


async def open_transparent_listeners(port: int, ipv6: bool) -> list[trio.SocketListener]:
    """Bind the transparent listener(s) on `port`: one dual-stack [::] socket
    with ipv6, else one 0.0.0.0 socket. Raises OSError (EADDRINUSE, EPERM
    without CAP_NET_ADMIN) for the caller to report."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            await sock.bind(("::", port))
        else:
            # Without it TPROXY finds no socket for a non-local destination.
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            await sock.bind(("0.0.0.0", port))
        # Accepted sockets inherit it (Linux copies the listener's
        # keepalive and arms its timer in each new connection): the splice
        # then sets it on the server end only, four system calls less per
        # flow.
        set_keepalive(sock)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


async def accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream, Any], Awaitable[None]],
    nursery: trio.Nursery,
    name: str,
) -> None:
    """Accept on `listener` and run `handler(stream, peer)` in `nursery` for
    each connection (`peer`: the client's address as accept(2) gave it, so
    that handlers need no getpeername of their own), until cancelled (then
    the listener is closed). For the transparent listener here and the
    proxy ports (proxyport/service.py).

    `trio.serve_listeners` without its per-connection wrapper, whose
    `aclose_forcefully` of the (already closed) stream cost a cancel scope
    and a Cancelled exception per connection: `handler` must close every
    stream itself. Accepts on a duplicate of the listening descriptor with
    plain accept(2), waiting only when the queue is empty: trio's accept
    yields to the scheduler after every connection, a turn of every running
    flow per new one under load; here up to ACCEPT_BURST connections are
    taken per turn. Like trio, pauses on EMFILE/ENFILE/ENOMEM/ENOBUFS
    instead of failing (logged with `name`); other accept errors propagate."""
    async with listener:
        lsock = listener.socket
        # Same open file description (non-blocking, as trio made it).
        raw = socket.socket(fileno=os.dup(lsock.fileno()))
        try:
            burst = 0
            while True:
                try:
                    conn, peer = raw.accept()
                except BlockingIOError:
                    burst = 0
                    await trio.lowlevel.wait_readable(lsock)
                    continue
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("%s: accept failed: %s; retrying in %gs",
                              name, os.strerror(exc.errno or 0), _ACCEPT_RETRY)
                    await trio.sleep(_ACCEPT_RETRY)
                    continue
                nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(conn)),
                                   peer)
                burst += 1
                if burst >= ACCEPT_BURST:
                    burst = 0
                    await trio.lowlevel.checkpoint()
        finally:
            raw.close()


class TransparentTcp:
    """The TCP gateway service: listener + per-flow handling + flow registry."""

    def __init__(
        self,
        cfg: Config,
        pool: FakeIPs,
        dial: Dial,
        registry: FlowRegistry | None = None,
        flows: ConcurrencyLimit | None = None,
    ) -> None:
        if cfg.tproxy_port is None:
            raise ValueError("tproxy-port is not set")
        self.cfg = cfg
        self.pool = pool
        self.dial = dial
        # Per-client share of flows (None: unlimited, for tests and tools).
        self.flows = flows
        self.registry = registry if registry is not None else FlowRegistry()
        self.port = cfg.tproxy_port
        self.entry = tproxy_entry(self.port)
        self.listeners: list[trio.SocketListener] = []  # bound once serve() started

    def stats(self) -> dict[str, int]:
        return self.registry.stats()

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = self.listeners = await open_transparent_listeners(self.port, self.cfg.ipv6)
        log.info("tcp: transparent listener on port %d", self.port)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_loop, listener, self.handle, nursery, "tcp")
            task_status.started()

    async def handle(self, stream: trio.SocketStream, peer: Any) -> None:
        """One captured connection, from accept to close (always closed when
        this returns or raises); `peer`: the client's sockaddr."""
        try:
            await self._handle(stream, peer)
        finally:
            # Every path below closes the stream (abort, or aclose after the
            # splice); this covers the rest (a bug, cancellation at an odd
            # point) without awaiting.
            stream.socket.close()

    async def _handle(self, stream: trio.SocketStream, peer: Any) -> None:
        try:
            local = stream.socket.getsockname()
        except OSError:
            # The client reset before we looked: nothing to serve.
            await stream.aclose()
            return
        # Parsed once per flow: the pool, the registry and `dial` all get
        # these (the text forms for the registry and logs).
        src_addr, dst_addr = parse_sockaddr_ip(peer), parse_sockaddr_ip(local)
        src = (sockaddr_text(peer, src_addr), int(peer[1]))
        dst = (sockaddr_text(local, dst_addr), int(local[1]))
        limit, client = self.flows, client_key(src[0])
        if limit is not None and not limit.acquire(client):
            # Over its share: reset now, so the client learns at once (a
            # dropped SYN-ACK would leave it to time out, holding the fd).
            log.debug("tcp %s:%d -> %s:%d: over the client's share of flows; reset",
                      *src, *dst)
            await abort(stream)
            return
        domain: str | None = None
        pinned = False
        try:
            fake = self.pool.is_fake(dst_addr)
            if dst[1] == self.port and not fake and _is_local(dst[0]):
                # A connection *to* the listener itself (a LAN client naming the
                # gateway's address, or Mirage dialling itself): relaying it
                # would loop. The nftables backend refuses these in its input
                # chain; the eBPF backend drops LAN ones at tc; this catches
                # the rest (e.g. loopback) whatever the backend.
                self.registry.errors += 1
                log.warning("tcp %s:%d -> %s:%d: connection to the tproxy port itself; "
                            "refusing (would loop)", *src, *dst)
                await abort(stream)
                return
            if fake:
                domain = self.pool.pin(dst_addr)
                if domain is None:
                    self.registry.unmapped += 1
                    log.warning(
                        "tcp %s:%d -> %s:%d: fake IP not mapped (expired or issued before a "
                        "restart); resetting the connection",
                        *src,
                        *dst,
                    )
                    await abort(stream)
                    return
                pinned = True
            flow = Flow("tcp", "tproxy", src_addr, src[1], dst_addr, dst[1], domain,
                        entry=self.entry)
            await self._relay(stream, flow, src, dst)
        finally:
            if pinned:
                self.pool.unpin(dst_addr)
            if limit is not None:
                limit.release(client)

    async def _relay(self, client: trio.SocketStream, flow: Flow,
                     src: tuple[str, int], dst: tuple[str, int]) -> None:
        """`src`/`dst` are the flow's addresses as text (registry, logs)."""
        a = self.cfg.appliance
        record = self.registry.open("tcp", src, dst, flow.domain)
        where = f"{src[0]}:{src[1]} -> {flow.host}:{dst[1]}"
        result: SpliceResult | None = None
        # The registry's close_flow (the API's DELETE /connections) cancels
        # this scope: the relay ends and both sockets close. Until the dial
        # returns, its deadline is also the connect timeout: one cancel scope
        # per flow, not a second one for the dial (entering and leaving one
        # is a per-connection cost).
        scope = record.cancel_scope
        scope.deadline = deadline = trio.current_time() + a.connect_timeout
        dialling = True
        with scope:
            try:
                try:
                    server = await self.dial(flow)
                except Exception as exc:  # dial is pluggable: any failure ends this flow only
                    dialling = False
                    scope.deadline = math.inf
                    why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    # An OutboundError's text is the reason; other types say more named.
                    reason = getattr(exc, "reason", None) or why
                    log.debug("tcp %s: dial failed", where, exc_info=True)
                    self._dial_failed(flow, record, where, why, reason)
                    await abort(client)
                    return
                dialling = False
                scope.deadline = math.inf
                record.routed(flow)
                log.debug("tcp %s: via %s", where, flow.outbound or "?")
                try:
                    result = await splice(client, server, idle_timeout=a.idle_timeout,
                                          half_close_timeout=a.half_close_timeout, meter=record,
                                          client_keepalive=False)
                finally:
                    if result is not None and result.reason == "error":
                        # Mirror the reset: both ends learn the flow broke.
                        await abort(client)
                        await abort(server)
                    else:
                        await close(client)
                        await close(server)
                if result.down == 0 and (noted(server) or result.detail.startswith("down")):
                    # Nothing came back: the outbound noted why (its
                    # handshake failed late: a wrong password is often only
                    # seen as the server's reset or close), or reading the
                    # server failed. Not a clean one-way flow (syslog over
                    # TCP), nor the client's own reset (the "up" side).
                    if not noted(server):  # a noting outbound logged it already
                        log.warning("tcp %s: no answer via %s: %s", where,
                                    flow.outbound or "?", result.detail)
                    self.registry.failures.record(flow, unanswered(result, server),
                                                  flow_id=record.id)
                log.debug(
                    "tcp %s: %s%s (up %d, down %d bytes)",
                    where,
                    result.reason,
                    f": {result.detail}" if result.detail else "",
                    result.up,
                    result.down,
                )
            finally:
                if dialling and scope.cancel_called and trio.current_time() >= deadline:
                    # The connect timeout cancelled the dial: a failed dial
                    # like any other, the client is reset.
                    why = f"no connection within {a.connect_timeout:g}s"
                    self._dial_failed(flow, record, where, why, why)
                    reset_on_close(client)
                self.registry.close(record, result)
                if result is None:
                    # Dial failed or cancelled: the client may still be open.
                    await client.aclose()

    def _dial_failed(self, flow: Flow, record: FlowRecord, where: str, why: str,
                     reason: str) -> None:
        """Count and report a flow whose dial failed (`why` for the log,
        `reason` for the failed flows the API lists)."""
        self.registry.dial_failures += 1
        self.registry.failures.record(flow, reason, flow_id=record.id)
        log.warning(
            "tcp %s: dial%s failed: %s; resetting the client",
            where,
            f" via {flow.outbound}" if flow.outbound else "",
            why,
        )


def noted(server: trio.abc.Stream) -> str:
    """What an outbound's stream noted about a flow it got no answer for
    (`why_unanswered`; "" when it has no such note)."""
    return str(getattr(server, "why_unanswered", ""))


def unanswered(result: SpliceResult, server: trio.abc.Stream) -> str:
    """Why a relayed flow got nothing back: what the outbound's stream
    noted (`why_unanswered`, e.g. Trojan's "closed the tunnel without
    answering": the cause, where the error that ended the splice may be its
    echo, such as the client's reset), else that error, else that the
    server closed."""
    return noted(server) or result.detail or "the server closed the connection without answering"


def _is_local(ip: str) -> bool:
    """Is `ip` an address of this host? (Binding to it succeeds without
    IP_TRANSPARENT.) Only asked on the rare tproxy-port path."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


async def serve(
    cfg: Config,
    pool: FakeIPs,
    dial: Dial,
    registry: FlowRegistry | None = None,
    *,
    flows: ConcurrencyLimit | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the transparent TCP gateway on `cfg.tproxy_port` until cancelled.

    Pass a `registry` to read live flows and counters (control API, metrics)
    while it runs; `started()` is called once the listener is bound.
    """
    await TransparentTcp(cfg, pool, dial, registry, flows).serve(task_status=task_status)
