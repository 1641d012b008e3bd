"""UDP ways out: which outbound a UDP session takes, and opening it.

What it is for: the transparent UDP gateway (appliance/gateway/udp.py) opens
one `UdpPeer` per session through `UdpDialer.open`. The TCP outbounds
(direct.py, socks5.py, groups.py) stay as they are; this module reads their
public attributes (dialer, server, credentials, group members) and adds UDP
beside them:

- DIRECT: the name is resolved through the outbound's `Dialer` (the upstream
  resolver: DoH, never the system resolver), one UDP socket per session,
  connected to the first address (so only that peer's replies are accepted),
  SO_MARK = routing-mark.
- SOCKS5 with `udp: true`: UDP ASSOCIATE (RFC 1928 section 7). The TCP
  control connection is held for the session's life and the session ends
  when the proxy closes it; each datagram carries the *name* (ATYP 3), so
  the proxy resolves it at the far end, as for CONNECT. Our UDP socket is
  bound before the request and its address is the one we announce; it is
  connected to the relay address the proxy answers (its own address when
  the reply says 0.0.0.0), SO_MARK = routing-mark.
- REJECT: no peer (`open` returns None): the gateway drops the datagrams.
- select groups use their selected member, fallback groups the first member
  that carries UDP and opens.

Outbounds that cannot carry UDP (HTTP CONNECT, SOCKS5 with `udp: false`,
not-yet-implemented types): like mihomo, the rule that chose one is skipped
and matching goes on with the next rule (a profile written for Clash keeps
its meaning); when no later rule matches the flow goes DIRECT, the default.
A profile that wants such UDP dropped instead says so with a rule placed
before it, such as `NETWORK,udp,REJECT`.

How it fails: `open` raises OutboundError (resolve failure, proxy refused or
unreachable, handshake timeout: the whole open is bounded by
`appliance.connect-timeout`). It owns what it returns until the caller
closes the peer.
"""

from __future__ import annotations

import ipaddress
import socket
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import trio

from appliance.config.model import Config, IPAddress
from appliance.outbound.base import (
    Outbound,
    OutboundError,
    as_ip,
    interleave,
    outbound_deadline,
)
from appliance.outbound.build import Router
from appliance.outbound.direct import DirectOutbound
from appliance.outbound.groups import FallbackGroup, SelectGroup
from appliance.outbound.reject import RejectOutbound
from appliance.outbound.socks5 import Socks5Outbound, socks5_handshake
from appliance.proto.socks5 import (
    CMD_UDP_ASSOCIATE,
    Socks5Client,
    Socks5Error,
    encode_udp,
)
from appliance.rules.engine import FlowContext, RuleSet
from appliance.sockopt import set_mark

# A proxy that writes on the control connection of a UDP association is
# misbehaving; read and ignore that much before giving up on it.
_MAX_CONTROL_BYTES = 1 << 16


class UdpTarget(Protocol):
    """What `UdpDialer.open` reads about a session (appliance.gateway.udp.Session)."""

    domain: str | None
    dst_ip: str
    dst_port: int
    src_ip: str
    src_port: int
    outbound: str
    skipped: int

    @property
    def host(self) -> str: ...


class UdpPeer:
    """One session's open way out.

    `sock` is a non-blocking, connected stdlib UDP socket: the gateway sends
    `header + payload` on it and reads replies from it (`socks` True: each
    reply starts with a SOCKS5 UDP header to strip). `watch()` returns when
    the peer is gone for good (the SOCKS5 control connection closed); for
    DIRECT it never returns. Owns `sock` and the control stream; `aclose`
    releases both and may be called more than once.
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


def _udp_socket(family: int, mark: int | None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        set_mark(sock, mark)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _family(ip: IPAddress) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class AddressCache:
    """The address a name resolved to, kept for the resolver's TTL (at most
    `max_ttl`), so that a burst of sessions to one name (a game, QUIC
    connection migration, a DNS-heavy client) costs one lookup, and every
    session to a name reaches the same peer while the answer holds. Bounded
    to `size` names (oldest dropped). Memory only."""

    def __init__(self, size: int = 4096, max_ttl: float = 300.0) -> None:
        self.size = size
        self.max_ttl = max_ttl
        self._entries: dict[tuple[int, str], tuple[IPAddress, float]] = {}

    async def resolve(self, outbound: DirectOutbound, name: str) -> IPAddress:
        key = (id(outbound.dialer), name.rstrip(".").lower())
        now = trio.current_time()
        hit = self._entries.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        addresses, ttl = await outbound.dialer.resolve(name)
        ip = interleave(addresses)[0]
        if ttl > 0:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (ip, now + min(ttl, self.max_ttl))
        return ip


async def open_direct(outbound: DirectOutbound, host: str, port: int,
                      cache: AddressCache | None = None) -> UdpPeer:
    """A marked UDP socket connected to `host` (resolved through the
    outbound's resolver; the first address, AAAA first when ipv6 is on)."""
    if not 0 < port <= 0xFFFF:
        raise OutboundError(f"bad port {port}")
    ip = as_ip(host)
    if ip is None:
        if cache is not None:
            ip = await cache.resolve(outbound, host)
        else:
            addresses, _ttl = await outbound.dialer.resolve(host)
            ip = interleave(addresses)[0]
    sock = _udp_socket(_family(ip), outbound.dialer.mark)
    try:
        # connect() on UDP only sets the default peer: it cannot block.
        sock.connect((str(ip), port))
    except OSError as e:
        sock.close()
        raise OutboundError(f"{outbound.name} udp {ip} port {port}: {e.strerror or e}") from None
    return UdpPeer(sock, outbound.name, remote=f"{ip}:{port}")


async def open_socks5(outbound: Socks5Outbound, host: str, port: int) -> UdpPeer:
    """UDP ASSOCIATE through `outbound`'s proxy (see the module doc)."""
    stream = await outbound.dialer.dial(outbound.server, outbound.port)
    sock: socket.socket | None = None
    try:
        assert isinstance(stream, trio.SocketStream)
        local_ip = stream.socket.getsockname()[0]
        proxy_ip = stream.socket.getpeername()[0]
        sock = _udp_socket(stream.socket.family, outbound.dialer.mark)
        # Announce the address we will send from (RFC 1928: "the address and
        # port that the client expects to use to send UDP datagrams"), so
        # the proxy accepts exactly our datagrams.
        sock.bind((local_ip, 0))
        bound_port = sock.getsockname()[1]
        try:
            client = Socks5Client(local_ip, bound_port, username=outbound.username,
                                  password=outbound.password, command=CMD_UDP_ASSOCIATE)
            header = encode_udp(host, port, b"")
        except Socks5Error as e:
            raise OutboundError(f"{outbound.name}: UDP ASSOCIATE: {e}") from None
        await socks5_handshake(stream, client, f"{outbound.name}: UDP ASSOCIATE")
        assert client.reply is not None
        # BND.ADDR 0.0.0.0 (or a name) means "the address you reached me at".
        relay = as_ip(client.reply.host)
        relay_host = proxy_ip if relay is None or relay.is_unspecified else str(relay)
        relay_port = client.reply.port
        if not 0 < relay_port <= 0xFFFF:
            raise OutboundError(f"{outbound.name}: UDP ASSOCIATE answered relay port {relay_port}")
        sock.connect((relay_host, relay_port))
    except OSError as e:
        if sock is not None:
            sock.close()
        await trio.aclose_forcefully(stream)
        raise OutboundError(f"{outbound.name}: UDP ASSOCIATE: {e.strerror or e}") from None
    except BaseException:
        if sock is not None:
            sock.close()
        await trio.aclose_forcefully(stream)
        raise
    return UdpPeer(sock, outbound.name, header=header, control=stream,
                   remote=f"{relay_host}:{relay_port}")


def carries_udp(outbound: Any, udp_proxies: frozenset[str]) -> bool:
    """Can `outbound` carry a UDP session? REJECT counts as yes: it is the
    rule's answer (drop), not a reason to look further."""
    if isinstance(outbound, DirectOutbound | RejectOutbound):
        return True
    if isinstance(outbound, Socks5Outbound):
        return outbound.name in udp_proxies
    if isinstance(outbound, SelectGroup):
        return carries_udp(outbound.selected, udp_proxies)
    if isinstance(outbound, FallbackGroup):
        return any(carries_udp(m, udp_proxies) for m in outbound.members)
    return False


async def open_udp(outbound: Any, host: str, port: int, udp_proxies: frozenset[str],
                   cache: AddressCache | None = None) -> UdpPeer | None:
    """Open `outbound` for UDP to host:port; None for REJECT. Raises
    OutboundError if it cannot carry UDP or fails to open. No deadline of
    its own (UdpDialer.open sets one)."""
    if isinstance(outbound, RejectOutbound):
        return None
    if isinstance(outbound, DirectOutbound):
        return await open_direct(outbound, host, port, cache)
    if isinstance(outbound, Socks5Outbound) and outbound.name in udp_proxies:
        return await open_socks5(outbound, host, port)
    if isinstance(outbound, SelectGroup):
        return await open_udp(outbound.selected, host, port, udp_proxies, cache)
    if isinstance(outbound, FallbackGroup):
        errors = []
        for member in outbound.ordered():
            if not carries_udp(member, udp_proxies):
                continue
            try:
                return await open_udp(member, host, port, udp_proxies, cache)
            except OutboundError as e:
                errors.append(f"{member.name}: {e.reason}")
        raise OutboundError(f"{outbound.name}: no member opened UDP ({'; '.join(errors)})")
    raise OutboundError(f"{outbound.name}: does not carry UDP")


# Rule sets for "the rules after rule i", built only when a UDP flow has to
# skip a rule, once per router (a router is rebuilt on every reload).
_tails: weakref.WeakKeyDictionary[Router, dict[int, RuleSet]] = weakref.WeakKeyDictionary()


def _tail(router: Router, start: int) -> RuleSet:
    per_router = _tails.setdefault(router, {})
    rules = per_router.get(start)
    if rules is None:
        rules = per_router[start] = RuleSet(router.rules.rules[start:])
    return rules


def route_udp(router: Router, ctx: FlowContext,
              udp_proxies: frozenset[str]) -> tuple[Outbound, int]:
    """The outbound for a UDP flow and how many matching rules were skipped
    because their target cannot carry UDP (see the module doc)."""
    index = router.rules.match_index(ctx)
    skipped = 0
    targets = router.targets
    # Each pass moves past one matching rule: bounded by the rule count.
    while index is not None:
        target = targets[index]
        if carries_udp(target, udp_proxies):
            return target, skipped
        skipped += 1
        rest = _tail(router, index + 1).match_index(ctx)
        index = None if rest is None else index + 1 + rest
    return router.default, skipped


class UdpDialer:
    """Routes a UDP session by the current rules and opens its outbound.

    `current()` returns the live (router, config) pair, read once per
    session, so a reload (SIGHUP) applies to new sessions and never to
    open ones. Owns only its `AddressCache` (DIRECT's resolved names).
    """

    def __init__(self, current: Callable[[], tuple[Router, Config]]) -> None:
        self.current = current
        self.addresses = AddressCache()

    async def open(self, target: UdpTarget) -> UdpPeer | None:
        """The session's peer, None if the rules say REJECT. Sets
        `target.outbound` and `target.skipped` (rules passed over because
        their target cannot carry UDP). Raises OutboundError (bounded by connect-timeout)."""
        router, cfg = self.current()
        udp_proxies = frozenset(p.name for p in cfg.proxies if p.udp)
        ctx = FlowContext(
            domain=target.domain,
            dst_ip=None if target.domain is not None else ipaddress.ip_address(target.dst_ip),
            dst_port=target.dst_port,
            src_ip=ipaddress.ip_address(target.src_ip),
            network="udp",
            src_port=target.src_port,
        )
        outbound, target.skipped = route_udp(router, ctx, udp_proxies)
        target.outbound = outbound.name
        timeout = cfg.appliance.connect_timeout
        with outbound_deadline(timeout, f"{outbound.name} udp {target.host}:{target.dst_port}"):
            return await open_udp(outbound, target.host, target.dst_port, udp_proxies,
                                  self.addresses)
