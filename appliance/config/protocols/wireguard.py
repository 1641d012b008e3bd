"""`type: wireguard` (mihomo adapter/outbound/wireguard.go): the keys of
one WireGuard tunnel, in mihomo's names and shape.

Parsed by appliance/config/loader/protocols/wireguard.py; carried out by a
WireGuard interface Mirage creates in its namespace
(appliance/outbound/wgdevice.py) and the outbound whose sockets are bound
to it (appliance/outbound/wireguard.py). Keys stay base64 text here, as the
profile writes them (the loader has checked that each is 32 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface

from appliance.config.model import IPAddress, IPNetwork
from appliance.config.protocols import ProtocolOptions


@dataclass(frozen=True)
class WireguardPeer:
    """One entry of `peers:`: its endpoint, keys and `allowed-ips` (the
    destinations that go to this peer)."""

    server: str
    port: int
    public_key: str
    allowed_ips: tuple[IPNetwork, ...]
    pre_shared_key: str | None = None


@dataclass(frozen=True)
class WireguardOptions(ProtocolOptions):
    """The interface (`private-key`, its addresses `ip` / `ipv6`, `mtu`) and
    its peer: the top-level `public-key` / `pre-shared-key` at the proxy's
    `server:port`, allowed everything of the families the interface has
    (mihomo's single-peer form), or the `peers:` list instead (then the
    top-level peer keys are ignored, as mihomo does).

    `dns` (with `remote-dns-resolve`): the resolvers asked through the
    tunnel for the flows' names, as (address, port); without it names are
    resolved by Mirage's own resolver and the address is sent through."""

    private_key: str
    ip: IPv4Interface | None = None
    ipv6: IPv6Interface | None = None
    public_key: str | None = None
    pre_shared_key: str | None = None
    peers: tuple[WireguardPeer, ...] = ()
    mtu: int = 1408
    persistent_keepalive: int = 0
    remote_dns_resolve: bool = False
    dns: tuple[tuple[IPAddress, int], ...] = ()
