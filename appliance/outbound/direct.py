"""DIRECT: reach the destination ourselves, resolving names over DoH.

For the fake-IP filter's names and for rules that send traffic out
unproxied. TCP: a marked connection to the name's address (happy eyeballs,
the address that worked kept while its TTL lasts). UDP: one marked UDP
socket per flow, connected to the name's first address (AAAA first when
`ipv6` is on), so only that peer's replies are accepted.

Owns the sticky-address cache of its `Dialer` and the `AddressCache` of its
UDP flows; both go with the outbound when a reload replaces it.
"""

from __future__ import annotations

import socket

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.outbound.base import (
    Dialer,
    OutboundEnv,
    OutboundError,
    Resolve,
    UdpPeer,
    as_ip,
    outbound_deadline,
    pick_udp_address,
    udp_socket,
)


class AddressCache:
    """The address a name resolved to for UDP, kept for the resolver's TTL
    (at most `max_ttl`), so that a burst of sessions to one name (a game,
    QUIC connection migration, a DNS-heavy client) costs one lookup, and
    every session to a name reaches the same peer while the answer holds.
    Bounded to `size` names (oldest dropped). Memory only."""

    def __init__(self, dialer: Dialer, size: int = 4096, max_ttl: float = 300.0) -> None:
        self.dialer = dialer
        self.size = size
        self.max_ttl = max_ttl
        self._entries: dict[str, tuple[IPAddress, float]] = {}

    async def resolve(self, name: str) -> IPAddress:
        key = name.rstrip(".").lower()
        now = trio.current_time()
        hit = self._entries.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        addresses, ttl = await self.dialer.resolve(name)
        ip = pick_udp_address(addresses, self.dialer.ip_version)
        if ttl > 0:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (ip, now + min(ttl, self.max_ttl))
        return ip


class DirectOutbound:
    """Resolves through `resolve` (the upstream resolver's `resolve_ips`,
    never the system resolver), keeps the address that worked for a name
    while its TTL lasts, tries the addresses happy-eyeballs style, and marks
    the socket with `routing_mark`. Returns a plain `trio.SocketStream`.
    Raises OutboundError on resolve failure, refusal, or after
    `connect_timeout` seconds."""

    type = "Direct"
    carries_udp = True

    def __init__(
        self,
        resolve: Resolve | None,
        routing_mark: int | None,
        connect_timeout: float,
        *,
        name: str = "DIRECT",
        ipv6: bool = False,
        ip_version: str = "ipv6-prefer",
    ) -> None:
        self.name = name
        self.connect_timeout = connect_timeout
        self.dialer = Dialer(resolve, routing_mark, ipv6=ipv6, ip_version=ip_version)
        self.udp_addresses = AddressCache(self.dialer)

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> DirectOutbound:
        """A `type: direct` entry of `proxies` (a DIRECT under another name,
        with its own `ip-version` for destinations, `dual` by default as in
        mihomo)."""
        return cls(env.resolve, env.routing_mark, env.connect_timeout, name=p.name,
                   ipv6=env.ipv6, ip_version=p.ip_version)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.SocketStream:
        with outbound_deadline(self.connect_timeout, f"{self.name} {host}:{port}"):
            return await self.dialer.dial(host, port)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer:
        """A marked UDP socket connected to `host` (a name resolved through
        the resolver, kept in `udp_addresses`)."""
        if not 0 < port <= 0xFFFF:
            raise OutboundError(f"bad port {port}")
        ip = as_ip(host)
        if ip is None:
            assert isinstance(host, str)
            ip = await self.udp_addresses.resolve(host)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = udp_socket(family, self.dialer.mark)
        try:
            # connect() on UDP only sets the default peer: it cannot block.
            sock.connect((str(ip), port))
        except OSError as e:
            sock.close()
            raise OutboundError(f"{self.name} udp {ip} port {port}: {e.strerror or e}") from None
        return UdpPeer(sock, self.name, remote=f"{ip}:{port}")
