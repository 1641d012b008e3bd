"""What every outbound is, how it fails, and the marked dialers they share.

An outbound opens a TCP stream to `host:port` on behalf of one flow: directly
(DIRECT), through a proxy (SOCKS5, HTTP CONNECT), or not at all (REJECT);
where it carries UDP (`carries_udp`) it also opens a `UdpPeer` for one UDP
flow (DIRECT, SOCKS5 with `udp: true`, REJECT: None, groups through their
members). Each outbound says this itself: routing (appliance/routing.py)
never asks what type an outbound is.
The gateway splices the returned stream with the client's: when the result
is a `trio.SocketStream` whose socket talks straight to the far end (DIRECT,
and SOCKS5/plain-HTTP proxies after their handshake), both ends are plain
sockets and the splice can use `os.splice` on the file descriptors; TLS
streams and `ReplayStream`s need the copy loop.

Every socket an outbound opens carries SO_MARK = `routing-mark` so that the
gateway's own capture rules never catch its outbound traffic.

Names are resolved only through the `Resolve` function handed in (the
upstream resolver's `resolve_ips`: DoH, never the system resolver, which is
the poisoned one this appliance exists to avoid).
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import trio

from appliance.config.model import IPAddress
from appliance.dns.upstream_api import UpstreamError
from appliance.outbound.preconnect import Preconnect
from appliance.proto.socks5 import ip_literal
from appliance.sockopt import set_mark, start_marked_connect

# RFC 8305 "Connection Attempt Delay": start the next address after 250 ms
# unless the current attempt fails sooner.
HAPPY_EYEBALLS_DELAY = 0.25

# The least time a dialer keeps the address that worked for a name, whatever
# the upstream TTL (0 included). Without it, an upstream that answers TTL 0
# sends every DIRECT flow back to the resolver (a DoH round trip each: TTFB
# 1.28 ms against 0.53 ms with TTL 60 in the side-by-side lab). Only the
# dial cache is floored: the TTL that DNS clients are told is not touched,
# and an address that stops answering is forgotten at once (see `dial`).
DIAL_TTL_FLOOR = 60.0

# A proxy's `ip-version` (mihomo's C.DNSPrefer): which families its server's
# name resolves to and which is tried first. "ipv6-prefer" is also what
# DIRECT does for destinations (RFC 8305's default order).
IP_VERSIONS = ("dual", "ipv4", "ipv6", "ipv4-prefer", "ipv6-prefer")

# `resolve(name, family)` with family 4 or 6 -> (addresses, ttl seconds).
Resolve = Callable[[str, int], Awaitable[tuple[list[IPAddress], int]]]


# How a proxy reaches its own server: (host, port) -> a stream to it.
ServerDial = Callable[[str | IPAddress, int], Awaitable[trio.abc.Stream]]


class HandshakeClient(Protocol):
    """The sans-I/O proxy clients (Socks5Client, HttpConnectClient): bytes
    the proxy has sent so far (0: it has not answered)."""

    received: int


# A proxy handshake on a connection to the proxy: (stream, client) -> tunnel.
# It closes the stream if it fails.
Handshake = Callable[[trio.abc.Stream, Any], Awaitable[trio.abc.Stream]]


@dataclass(frozen=True)
class OutboundEnv:
    """What every outbound built from the config shares: the upstream
    resolver's `resolve_ips` (None: names cannot be resolved), the
    `routing-mark` its sockets carry, `appliance.connect-timeout` and
    whether IPv6 destinations are used (`ipv6`)."""

    resolve: Resolve | None
    routing_mark: int | None
    connect_timeout: float
    ipv6: bool = False
    # `dialer-proxy` (and relay groups): the outbound a proxy's own server
    # connections go through; None: straight to the server (`Dialer.dial`).
    via: Outbound | None = None
    # The `ip-version` of the proxy being built (build_proxy sets it).
    ip_version: str = "dual"

    def server_dialer(self) -> Dialer:
        """The Dialer a proxy built with this env reaches its server with:
        marked, through the resolver, with the proxy's `ip-version`."""
        return Dialer(self.resolve, self.routing_mark, ipv6=self.ipv6,
                      ip_version=self.ip_version)

    def server_dial(self, dialer: Dialer) -> ServerDial:
        """How a proxy built with this env reaches its server."""
        return self.via.connect_tcp if self.via is not None else dialer.dial


class OutboundError(Exception):
    """An outbound could not open the stream: refused, unreachable, timed out,
    proxy error reply, auth refused, or rejected by policy. `reason` is a
    short human text for logs and the API."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Outbound(Protocol):
    """One way out. `name` is the config name (DIRECT, REJECT, a proxy or a
    group); `type` is the Clash API type name (Direct, Reject, Socks5, Http,
    Selector, Fallback)."""

    name: str
    type: str

    @property
    def carries_udp(self) -> bool:
        """Can this outbound carry a UDP flow now? (REJECT can: dropping is
        its answer. A select group answers for its selected member.)"""
        ...

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        """A stream to host:port (a name is passed on unresolved where the
        outbound can, e.g. SOCKS5 ATYP=3). Bounded by the outbound's connect
        timeout; raises OutboundError, never OSError or a protocol error."""
        ...

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        """A peer for one UDP flow to host:port; None means drop its
        datagrams (REJECT). No deadline of its own (the dispatcher sets
        one); raises OutboundError (also when it does not carry UDP)."""
        ...


# A proxy that writes on the control connection of a UDP association is
# misbehaving; read and ignore that much before giving up on it.
_MAX_CONTROL_BYTES = 1 << 16


class UdpPeer:
    """One UDP flow's open way out.

    `sock` is a non-blocking, connected stdlib UDP socket: the gateway sends
    `header + payload` on it and reads replies from it (`socks` True: each
    reply starts with a SOCKS5 UDP header to strip). `watch()` returns when
    the peer is gone for good (the SOCKS5 control connection closed); for
    DIRECT it never returns. `outbound` names the outbound that opened it
    (a group's member, not the group). Owns `sock` and the control stream;
    `aclose` releases both and may be called more than once.
    """

    def __init__(
        self,
        sock: socket.socket,
        outbound: str,
        *,
        header: bytes = b"",
        control: trio.abc.Stream | None = None,
        remote: str = "",
    ) -> None:
        self.sock = sock
        self.outbound = outbound
        self.header = header
        self.socks = control is not None
        self.control = control
        # For logs: where datagrams go (peer address or proxy relay).
        self.remote = remote

    async def watch(self) -> None:
        if self.control is None:
            await trio.sleep_forever()
            return
        seen = 0
        try:
            while seen < _MAX_CONTROL_BYTES:
                data = await self.control.receive_some(4096)
                if not data:
                    return
                seen += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return

    async def aclose(self) -> None:
        self.sock.close()
        if self.control is not None:
            control, self.control = self.control, None
            await trio.aclose_forcefully(control)


def udp_socket(family: int, mark: int | None) -> socket.socket:
    """A non-blocking UDP socket carrying SO_MARK = `mark` (OSError if not)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        set_mark(sock, mark)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def no_udp(name: str) -> UdpPeer | None:
    """`open_udp` of an outbound that does not carry UDP: routing skips
    such outbounds, so this is reached only by asking one directly."""
    await trio.lowlevel.checkpoint()
    raise OutboundError(f"{name}: does not carry UDP")


def as_ip(host: str | IPAddress) -> IPAddress | None:
    """The address if `host` is an IP literal (brackets allowed), else None."""
    if isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return host
    return ip_literal(host)


def interleave(addresses: Sequence[IPAddress]) -> list[IPAddress]:
    """RFC 8305 section 4: alternate families, starting with the first's."""
    if not addresses:
        return []
    first = [a for a in addresses if a.version == addresses[0].version]
    other = [a for a in addresses if a.version != addresses[0].version]
    out: list[IPAddress] = []
    for i in range(max(len(first), len(other))):
        out.extend(x[i] for x in (first, other) if i < len(x))
    return out


def resolve_families(ip_version: str, ipv6: bool) -> tuple[int, ...]:
    """The address families (4, 6) a name is resolved to under `ip-version`
    when the gateway's IPv6 is `ipv6` (top-level `ipv6:`; off, mihomo's
    resolver refuses AAAA whatever the proxy says). Raises OutboundError
    when none is left (`ip-version: ipv6` with IPv6 off)."""
    if ip_version == "ipv4":
        return (4,)
    if ip_version == "ipv6":
        if not ipv6:
            raise OutboundError("ip-version: ipv6, but IPv6 is off (top-level ipv6: false)")
        return (6,)
    return (4, 6) if ipv6 else (4,)


def check_family(ip: IPAddress, ip_version: str) -> None:
    """An IP literal server must be of the family `ipv4`/`ipv6` allow
    (mihomo: "ip version error"); OutboundError if not."""
    want = {"ipv4": 4, "ipv6": 6}.get(ip_version)
    if want is not None and ip.version != want:
        raise OutboundError(f"{ip} is an IPv{ip.version} address, but ip-version is {ip_version}")


def connect_plan(addresses: Sequence[IPAddress], ip_version: str,
                 delay: float = HAPPY_EYEBALLS_DELAY) -> list[tuple[IPAddress, float]]:
    """The order TCP connection attempts go in, each address with how long
    to wait after starting it before the next starts (unless it fails
    sooner): RFC 8305 section 5, families interleaved (section 4).

    - `ipv4-prefer` / `ipv6-prefer`: the preferred family first, the other
      `delay` later (mihomo starts both and holds the other's connection
      back 300 ms; starting it late costs the server no spare connection).
    - `dual`: no preference, as mihomo: the first address of each family at
      once (a black-holed family costs nothing), then the rest staggered.
    - `ipv4` / `ipv6`: the resolver was asked for one family only.
    """
    v4 = [a for a in addresses if a.version == 4]
    v6 = [a for a in addresses if a.version == 6]
    if ip_version == "ipv4":
        v6 = []
    elif ip_version == "ipv6":
        v4 = []
    first, second = (v4, v6) if ip_version == "ipv4-prefer" else (v6, v4)
    order = interleave([*first, *second])
    plan = [(a, delay) for a in order]
    if ip_version == "dual" and first and second:
        plan[0] = (plan[0][0], 0.0)
    return plan


def pick_udp_address(addresses: Sequence[IPAddress], ip_version: str) -> IPAddress:
    """The one address a UDP protocol (hysteria2, tuic, shadowsocks UDP)
    sends to: mihomo's resolveUDPAddrWithPrefer, the first address of the
    preferred family, else the first of the other. `dual` prefers IPv4 as
    mihomo does (no race is possible without a handshake to race)."""
    if not addresses:
        raise OutboundError("no address to send to")
    want = 6 if ip_version in ("ipv6", "ipv6-prefer") else 4
    for a in addresses:
        if a.version == want:
            return a
    return addresses[0]


async def open_marked_tcp(
    addresses: Sequence[IPAddress],
    port: int,
    *,
    mark: int | None,
    delay: float = HAPPY_EYEBALLS_DELAY,
) -> trio.SocketStream:
    """Connect to the first of `addresses` that answers (happy eyeballs).

    Attempts start in order, each `delay` seconds after the previous one or
    as soon as it fails; the first to connect wins and the others are
    cancelled and closed. Every socket gets SO_MARK before connect(). No
    timeout of its own: callers wrap it in theirs. Raises OutboundError when
    every address failed.
    """
    return await open_planned_tcp([(a, delay) for a in addresses], port, mark=mark)


async def open_planned_tcp(plan: Sequence[tuple[IPAddress, float]], port: int, *,
                           mark: int | None) -> trio.SocketStream:
    """`open_marked_tcp` with a delay of its own after each attempt starts
    (`connect_plan`)."""
    if not plan:
        raise OutboundError("no address to connect to")
    if not 0 < port <= 0xFFFF:
        raise OutboundError(f"bad port {port}")
    if len(plan) == 1:
        # The common case (IP literal, sticky address, proxy server): no race,
        # so no nursery and no per-connection task.
        return trio.SocketStream(await _connect_one(plan[0][0], port, mark))
    winner: trio.socket.SocketType | None = None
    errors: list[str] = []

    async def attempt(addr: IPAddress, failed: trio.Event, cancel_scope: trio.CancelScope) -> None:
        nonlocal winner
        try:
            sock = await _connect_one(addr, port, mark)
        except OutboundError as e:
            errors.append(e.reason)
            failed.set()
            return
        if winner is None:
            winner = sock
            cancel_scope.cancel()
        else:
            sock.close()

    try:
        async with trio.open_nursery() as nursery:
            for addr, delay in plan:
                failed = trio.Event()
                nursery.start_soon(attempt, addr, failed, nursery.cancel_scope)
                if delay > 0:
                    with trio.move_on_after(delay):
                        await failed.wait()
    except BaseException:
        # Cancelled from outside (the caller's deadline) just as one won.
        if winner is not None:
            winner.close()
        raise
    if winner is None:
        raise OutboundError("; ".join(errors))
    return trio.SocketStream(winner)


async def _connect_one(addr: IPAddress, port: int, mark: int | None) -> trio.socket.SocketType:
    """A marked, connected TCP socket to addr:port (OutboundError if not).

    connect(2) on a plain non-blocking socket, waiting for writability only
    when it is in progress: what trio's connect does, minus its address
    resolution machinery (several enum conversions per call) on an address
    that is already numeric: a per-connection cost (bench/gateway.py)."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    await trio.lowlevel.checkpoint_if_cancelled()
    sock: socket.socket | None = None
    try:
        sock, err = start_marked_connect(str(addr), port, family, mark)
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException as e:
        if sock is not None:
            sock.close()
        if isinstance(e, OSError):
            raise OutboundError(
                f"connect to {addr} port {port} failed: {e.strerror or e}") from None
        raise
    return trio.socket.from_stdlib_socket(sock)


class Dialer:
    """Resolves a host through `resolve` and opens a marked TCP connection.

    `ip_version` (a proxy's `ip-version`, one of IP_VERSIONS) says which
    families a name resolves to and in what order the addresses are tried
    (`connect_plan`: happy eyeballs, RFC 8305); with `ipv6` off (top-level
    `ipv6: false`) only A records are asked for, whatever it says. DIRECT
    uses "ipv6-prefer" (RFC 8305's own order).

    Owns a small cache of the address that last worked for each name, kept
    while the resolver's TTL lasts, and at least `DIAL_TTL_FLOOR` seconds
    (also for an answer of TTL 0): the same name keeps reaching the same
    peer (protocols that pin a session to one server need that), and a
    repeat connection skips the resolver. Does not impose a timeout; raises
    OutboundError when the name does not resolve or nothing answers.
    """

    MAX_STICKY = 4096

    def __init__(self, resolve: Resolve | None, mark: int | None, *, ipv6: bool = False,
                 ip_version: str = "ipv6-prefer") -> None:
        if ip_version not in IP_VERSIONS:
            raise ValueError(f"ip-version {ip_version!r} is not one of {IP_VERSIONS}")
        self._resolve = resolve
        self.mark = mark
        self.ipv6 = ipv6
        self.ip_version = ip_version
        self._sticky: dict[str, tuple[IPAddress, float]] = {}

    async def resolve(self, name: str) -> tuple[list[IPAddress], float]:
        """The addresses of `name` in the families `ip_version` and `ipv6`
        allow (A, AAAA), AAAA first, and the lowest TTL."""
        if self._resolve is None:
            raise OutboundError(f"cannot resolve {name}: no resolver configured")
        try:
            families = resolve_families(self.ip_version, self.ipv6)
        except OutboundError as e:
            raise OutboundError(f"cannot resolve {name}: {e.reason}") from None
        results: dict[int, tuple[list[IPAddress], int]] = {}
        errors: list[str] = []

        async def one(family: int) -> None:
            assert self._resolve is not None
            try:
                results[family] = await self._resolve(name, family)
            except UpstreamError as e:
                errors.append(str(e))

        if len(families) == 1:
            await one(families[0])
        else:
            # A and AAAA in parallel: one slow family must not delay the other.
            async with trio.open_nursery() as nursery:
                for family in families:
                    nursery.start_soon(one, family)
        addresses: list[IPAddress] = []
        ttl: float = math.inf
        # AAAA first when asked for, as RFC 8305 prefers.
        for family in sorted(results, reverse=True):
            ips, t = results[family]
            if ips:
                addresses.extend(ips)
                ttl = min(ttl, t)
        if not addresses:
            kinds = " or ".join("AAAA" if f == 6 else "A" for f in families)
            why = "; ".join(errors) if errors else f"no {kinds} record"
            if self.ip_version in ("ipv4", "ipv6"):
                why += f" (ip-version: {self.ip_version})"
            raise OutboundError(f"cannot resolve {name}: {why}")
        return addresses, ttl

    def sticky(self, name: str) -> tuple[IPAddress, float] | None:
        """The address kept for `name` and until when (trio clock), if any."""
        kept = self._sticky.get(name.rstrip(".").lower())
        return kept if kept is not None and kept[1] > trio.current_time() else None

    async def dial(self, host: str | IPAddress, port: int) -> trio.SocketStream:
        ip = as_ip(host)
        if ip is not None:
            check_family(ip, self.ip_version)
            return await open_marked_tcp([ip], port, mark=self.mark)
        assert isinstance(host, str)
        name = host.rstrip(".").lower()
        now = trio.current_time()
        sticky = self._sticky.get(name)
        if sticky is not None and sticky[1] > now:
            try:
                return await open_marked_tcp([sticky[0]], port, mark=self.mark)
            except OutboundError:
                # The pinned peer stopped answering: forget it, resolve again.
                del self._sticky[name]
        addresses, ttl = await self.resolve(name)
        stream = await open_planned_tcp(connect_plan(addresses, self.ip_version), port,
                                        mark=self.mark)
        peer = ipaddress.ip_address(stream.socket.getpeername()[0])
        if len(self._sticky) >= self.MAX_STICKY:
            self._sticky.pop(next(iter(self._sticky)))
        self._sticky[name] = (peer, trio.current_time() + max(ttl, DIAL_TTL_FLOOR))
        return stream

    async def udp_address(self, host: str | IPAddress) -> IPAddress:
        """The one address a UDP protocol sends to for `host` (a proxy
        server): the literal (of an allowed family), the address kept from
        an earlier dial, else `pick_udp_address` of what the name resolves
        to under `ip_version`."""
        ip = as_ip(host)
        if ip is not None:
            check_family(ip, self.ip_version)
            return ip
        assert isinstance(host, str)
        kept = self.sticky(host)
        if kept is not None:
            return kept[0]
        addresses, _ttl = await self.resolve(host)
        return pick_udp_address(addresses, self.ip_version)


class ProxyOutbound:
    """What the proxy outbounds (SOCKS5, HTTP CONNECT) share: a proxy at
    `server:port` (a name is resolved through `resolve`), optional
    credentials, a `Dialer` whose sockets carry `routing_mark` (and that
    resolves the server under its `ip_version`), one
    deadline of `connect_timeout` seconds over connect + handshake, and
    with `preconnect` > 0 that many connections to the proxy kept open
    ahead of the flows (`Preconnect`; the Router closes it). With
    `server_dial` (`dialer-proxy`, a relay hop: `OutboundEnv.server_dial`
    of an env with `via`), connections to the proxy go through that
    instead, and none are kept ahead.
    Subclasses implement `_connect(host, port)`, opening the proxy
    connection through `_open_tunnel`."""

    type = ""
    carries_udp = False

    def __init__(
        self,
        name: str,
        server: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        routing_mark: int | None = None,
        connect_timeout: float = 5.0,
        resolve: Resolve | None = None,
        ipv6: bool = False,
        ip_version: str = "dual",
        preconnect: int = 0,
        server_dial: ServerDial | None = None,
    ) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.username = username
        self.password = password
        self.connect_timeout = connect_timeout
        self.dialer = Dialer(resolve, routing_mark, ipv6=ipv6, ip_version=ip_version)
        self.server_dial: ServerDial = server_dial or self.dialer.dial
        self.preconnect = (Preconnect(self._server_address, port, preconnect, mark=routing_mark)
                           if preconnect > 0 and server_dial is None else None)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        with outbound_deadline(self.connect_timeout, f"{self.name} {host}:{port}"):
            return await self._connect(host, port)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        return await no_udp(self.name)

    async def _connect(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        raise NotImplementedError

    async def _open_tunnel(self, client: HandshakeClient, new_client: Callable[[], Any],
                           handshake: Handshake) -> trio.abc.Stream:
        """`handshake(stream, client)` on a kept connection if the pool has
        one, else on a new connection to the proxy. A kept connection that
        fails before the proxy said a byte (`client.received` is 0: the
        server closed it while it waited) is stale, not an answer: the flow
        goes on over a new connection, with `new_client()`. `handshake`
        calls `request_sent()` once its request is out (the pool then opens
        a replacement, off this flow's critical path)."""
        pool = self.preconnect
        kept = pool.take() if pool is not None else None
        if kept is not None:
            assert pool is not None
            try:
                return await handshake(kept, client)
            except (OSError, OutboundError):
                if client.received:
                    raise
                pool.stale += 1
                client = new_client()
        return await handshake(await self.server_dial(self.server, self.port), client)

    def request_sent(self) -> None:
        if self.preconnect is not None:
            self.preconnect.refill()

    def _server_address(self) -> IPAddress | None:
        """The proxy's address for a kept connection: the literal, or the
        address the dialer last reached it at (None until it has)."""
        ip = as_ip(self.server)
        if ip is not None:
            return ip
        kept = self.dialer.sticky(self.server)
        return kept[0] if kept is not None else None


async def handshake_send(stream: trio.abc.Stream, data: bytes) -> None:
    """`stream.send_all(data)` for a proxy handshake. On a plain socket the
    bytes go straight to its fd and the task waits only if the socket is
    full: trio's send_all yields to the scheduler after every send, and
    under load each yield is a turn of every other runnable flow added to
    this flow's connect time (bench/gateway.py, the SOCKS5 row)."""
    if not isinstance(stream, trio.SocketStream):
        await stream.send_all(data)
        return
    await trio.lowlevel.checkpoint_if_cancelled()
    sock, view = stream.socket, memoryview(data)
    while view:
        try:
            view = view[os.write(sock.fileno(), view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def handshake_receive(stream: trio.abc.Stream, max_bytes: int) -> bytes:
    """`stream.receive_some(max_bytes)` for a proxy handshake: on a plain
    socket, a read of its fd that waits only when nothing is there (see
    `handshake_send`). b"" at EOF."""
    if not isinstance(stream, trio.SocketStream):
        return bytes(await stream.receive_some(max_bytes))
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = stream.socket
    while True:
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream that returns `prefix` before reading from `transport_stream`.

    For the rare case where a handshake read bytes that belong to the tunnel
    (e.g. a TLS proxy whose first record held the reply and the far end's
    first bytes). Not a SocketStream, so the gateway copies instead of
    splicing. Owns `transport_stream` (aclose closes it).
    """

    def __init__(self, transport_stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport_stream = transport_stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return out
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
            await self.transport_stream.send_eof()
        else:
            raise trio.ClosedResourceError("the underlying stream cannot half-close")

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


# Lower case: used as `with outbound_deadline(...)`, like the function it was.
class outbound_deadline:
    """One deadline for a whole connect (dial + handshake). A timeout becomes
    OutboundError, and so do OSError/BrokenResourceError that escape the
    body (a peer that reset the connection mid-handshake). Inside a caller's
    deadline that comes sooner (the gateway's connect timeout, an enclosing
    outbound_deadline) no scope is added: that deadline fires first, as it
    would have anyway, and the caller reports it.

    A class rather than a @contextmanager generator: it is entered on every
    connection, and the generator's machinery cost more than its work."""

    __slots__ = ("_scope", "_seconds", "_what")

    def __init__(self, seconds: float, what: str) -> None:
        self._seconds = seconds
        self._what = what
        self._scope: trio.CancelScope | None = None

    def __enter__(self) -> None:
        deadline = trio.current_time() + self._seconds
        if trio.current_effective_deadline() < deadline:
            # The caller's deadline (the gateway's connect timeout) comes
            # first anyway: a second scope would never fire, only cost CPU
            # on every connection.
            return
        self._scope = trio.CancelScope(deadline=deadline)
        self._scope.__enter__()

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        scope = self._scope
        if scope is not None:
            # What fail_after does: the scope takes the Cancelled its own
            # deadline caused (anything else goes on), and that is the
            # timeout.
            scope.__exit__(etype, exc, tb)
            if scope.cancelled_caught:
                raise OutboundError(
                    f"{self._what}: timed out after {self._seconds:g}s") from None
        if isinstance(exc, trio.TooSlowError):
            raise OutboundError(
                f"{self._what}: timed out after {self._seconds:g}s") from None
        if isinstance(exc, OSError | trio.BrokenResourceError):
            raise OutboundError(f"{self._what}: {exc}") from None
