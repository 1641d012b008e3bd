"""What the configuration asks of the capture, whichever backend applies it.

`CaptureSpec.from_config(cfg)` is the one place that turns a `Config` into
capture terms: the LAN interfaces, the fake ranges in effect (IPv6 only
through `Config.fake_range6`), the bypass lists (the fixed ones plus
`appliance.bypass`), the marks, the tproxy port and where hijacked DNS
goes. The nftables backend renders it into nft/mirage.nft, the eBPF one into
compile flags and map contents, the DIRECT offload reads the same table
names; none of them re-reads the config for these.

Pure: no kernel, no I/O. Fails only with `CaptureError`, for configs that no
capture backend can express (no tproxy-port, routing-mark equal to the
capture mark, hijacked DNS sent to a loopback address), with a message that
names the key and the fix.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from appliance.config.model import Config, Listen

# Never captured, whatever the config says (brief: loopback, link-local,
# multicast, broadcast). The gateway's own addresses are matched by asking
# the FIB (nft `fib daddr type local`, eBPF `bpf_fib_lookup`) instead, so
# they need no list.
ALWAYS_BYPASS4 = tuple(
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
)
ALWAYS_BYPASS6 = tuple(
    ipaddress.IPv6Network(n) for n in ("::/128", "::1/128", "fe80::/10", "ff00::/8")
)

DNS_PORT = 53

# Encrypted DNS that `appliance.block-encrypted-dns` refuses from LAN
# clients: DNS over TLS (RFC 7858) and over QUIC (RFC 9250) share port 853,
# refused to any destination; DNS over HTTPS (RFC 8484) is HTTPS, so only
# port 443 to the resolvers below (and `appliance.encrypted-dns-resolvers`)
# is refused, TCP and UDP (HTTP/3).
ENCRYPTED_DNS_PORT = 853
DOH_PORT = 443
# Public resolvers whose addresses serve DoH, from their operators' pages.
# Browsers upgrade a system resolver from this list to its DoH endpoint by
# address (Chrome's "secure DNS" auto-upgrade), and Android's Private DNS
# probes 853 on them; a DoH endpoint known by name (Firefox's default) is
# resolved through Mirage and is answered by the canary instead (dns/handler.py).
WELL_KNOWN_DOH: tuple[str, ...] = (
    # Google Public DNS (dns.google)
    "8.8.8.8", "8.8.4.4", "2001:4860:4860::8888", "2001:4860:4860::8844",
    # Cloudflare 1.1.1.1, 1.1.1.2 (malware), 1.1.1.3 (family)
    "1.1.1.1", "1.0.0.1", "1.1.1.2", "1.0.0.2", "1.1.1.3", "1.0.0.3",
    "2606:4700:4700::1111", "2606:4700:4700::1001", "2606:4700:4700::1112",
    "2606:4700:4700::1002", "2606:4700:4700::1113", "2606:4700:4700::1003",
    # Quad9 (dns.quad9.net and its unfiltered / ECS variants)
    "9.9.9.9", "149.112.112.112", "9.9.9.10", "149.112.112.10", "9.9.9.11", "149.112.112.11",
    "2620:fe::fe", "2620:fe::9", "2620:fe::10", "2620:fe::fe:10", "2620:fe::11",
    "2620:fe::fe:11",
    # OpenDNS (doh.opendns.com, FamilyShield)
    "208.67.222.222", "208.67.220.220", "208.67.222.123", "208.67.220.123",
    "2620:119:35::35", "2620:119:53::53",
    # AdGuard DNS (default, unfiltered, family)
    "94.140.14.14", "94.140.15.15", "94.140.14.140", "94.140.14.141", "94.140.14.15",
    "94.140.15.16", "2a10:50c0::ad1:ff", "2a10:50c0::ad2:ff", "2a10:50c0::1:ff",
    "2a10:50c0::2:ff", "2a10:50c0::bad1:ff", "2a10:50c0::bad2:ff",
    # CleanBrowsing (security, adult, family)
    "185.228.168.9", "185.228.169.9", "185.228.168.10", "185.228.169.11",
    "185.228.168.168", "185.228.169.168", "2a0d:2a00:1::2", "2a0d:2a00:2::2",
    "2a0d:2a00:1::1", "2a0d:2a00:2::1", "2a0d:2a00:1::", "2a0d:2a00:2::",
)  # fmt: skip


class CaptureError(RuntimeError):
    """The config cannot be captured, or the kernel refused what a backend applied."""


@dataclass(frozen=True)
class DnsHijack:
    """Where LAN DNS (port 53, any destination) is steered: the DNS
    service's socket at `port`, found at `addr4` for IPv4 queries and
    `addr6` for IPv6 ones (the unspecified address: the wildcard socket;
    None: queries of that family are left alone)."""

    listen: str  # dns.listen as configured, for messages
    port: int
    addr4: ipaddress.IPv4Address | None
    addr6: ipaddress.IPv6Address | None


@dataclass(frozen=True)
class CaptureSpec:
    """The capture a config asks for, in the terms both backends use."""

    lan: tuple[str, ...]
    tproxy_port: int
    capture_mark: int
    routing_mark: int | None
    ipv6: bool  # the gateway carries IPv6 (`ipv6`): IPv6 fake ranges and bypass apply
    fake4: ipaddress.IPv4Network
    fake6: ipaddress.IPv6Network | None  # Config.fake_range6
    bypass4: tuple[ipaddress.IPv4Network, ...]  # fixed + appliance.bypass, as configured
    bypass6: tuple[ipaddress.IPv6Network, ...]
    dns: DnsHijack | None  # None: no DNS hijack
    # Every port Mirage listens on (DNS, the proxy ports, tproxy-port, the
    # control API): open to appliance.lan interfaces and loopback only.
    served_ports: tuple[int, ...] = ()
    # appliance.block-encrypted-dns: the ports refused to any destination
    # ({853}) and to the DoH resolvers ({443}), and those resolvers (the
    # well-known ones plus appliance.encrypted-dns-resolvers); all empty
    # while the option is off.
    encrypted_dns_ports: tuple[int, ...] = ()
    doh_ports: tuple[int, ...] = ()
    doh4: tuple[ipaddress.IPv4Network, ...] = ()
    doh6: tuple[ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config, backend: str = "nftables") -> CaptureSpec:
        """The spec of `cfg`; CaptureError (naming `backend`) if no capture
        can express it."""
        if cfg.tproxy_port is None:
            raise CaptureError(f"tproxy-port is not set: the {backend} capture needs it")
        a = cfg.appliance
        if cfg.routing_mark is not None and cfg.routing_mark == a.capture_mark:
            raise CaptureError(
                f"routing-mark {cfg.routing_mark:#x} equals the capture mark: "
                "Mirage's own traffic would be captured"
            )
        b4 = [*ALWAYS_BYPASS4]
        b6 = [*ALWAYS_BYPASS6]
        for n in a.bypass:
            if isinstance(n, ipaddress.IPv4Network):
                b4.append(n)
            else:
                b6.append(n)
        doh4: list[ipaddress.IPv4Network] = []
        doh6: list[ipaddress.IPv6Network] = []
        if a.block_encrypted_dns:
            for n in (*map(ipaddress.ip_network, WELL_KNOWN_DOH), *a.encrypted_dns_resolvers):
                if isinstance(n, ipaddress.IPv4Network):
                    doh4.append(n)
                else:
                    doh6.append(n)
        return cls(
            lan=tuple(a.lan),
            tproxy_port=cfg.tproxy_port,
            capture_mark=a.capture_mark,
            routing_mark=cfg.routing_mark,
            ipv6=cfg.ipv6,
            fake4=cfg.dns.fake_ip_range,
            fake6=cfg.fake_range6,
            bypass4=tuple(b4),
            bypass6=tuple(b6),
            dns=dns_hijack(cfg),
            served_ports=served_ports(cfg),
            encrypted_dns_ports=(ENCRYPTED_DNS_PORT,) if a.block_encrypted_dns else (),
            doh_ports=(DOH_PORT,) if a.block_encrypted_dns else (),
            # Collapsed: an nft interval set refuses overlapping elements.
            doh4=tuple(ipaddress.collapse_addresses(doh4)),
            doh6=tuple(ipaddress.collapse_addresses(doh6)),
        )

    @property
    def bypass4_collapsed(self) -> list[ipaddress.IPv4Network]:
        """The IPv4 bypass without overlaps (an nft interval set refuses
        overlapping elements, and a user's list may overlap itself or the
        fixed ones: 10.0.0.0/8 and 10.1.0.0/16)."""
        return list(ipaddress.collapse_addresses(self.bypass4))

    @property
    def bypass6_collapsed(self) -> list[ipaddress.IPv6Network]:
        return list(ipaddress.collapse_addresses(self.bypass6))


def served_ports(cfg: Config) -> tuple[int, ...]:
    """The ports Mirage's own services listen on, sorted, without
    duplicates: dns.listen (while DNS is on), mixed-port, socks-port, port,
    tproxy-port and external-controller."""
    ports = {cfg.mixed_port, cfg.socks_port, cfg.http_port, cfg.tproxy_port}
    if cfg.dns.enable:
        ports.add(cfg.dns.listen.port)
    if cfg.external_controller is not None:
        ports.add(cfg.external_controller.port)
    return tuple(sorted(p for p in ports if p))


def _kernel_has_ipv6() -> bool:
    return os.path.exists("/proc/net/if_inet6")


def dns_bind(cfg: Config) -> Listen:
    """The address the DNS service binds: `dns.listen`, except that with DNS
    hijack an IPv4 wildcard becomes the dual-stack "::" (where the kernel
    has IPv6), so that queries to IPv6 resolvers have a socket to be handed
    to whatever `ipv6:` says about AAAA answers; IPv4 queries reach the same
    socket through the IPv4 wildcard."""
    listen = cfg.dns.listen
    if (cfg.appliance.dns_hijack and cfg.dns.enable and listen.host == "0.0.0.0"
            and _kernel_has_ipv6()):
        return Listen("::", listen.port)
    return listen


def dns_hijack(cfg: Config) -> DnsHijack | None:
    """Where hijacked DNS goes, or None without hijack.

    An unspecified IPv4 address is the IPv4 wildcard socket; "::" is
    dual-stack (the DNS service clears IPV6_V6ONLY), so IPv4 queries find it
    through the IPv4 wildcard too. A specific address serves its own family
    only.
    """
    if not (cfg.appliance.dns_hijack and cfg.dns.enable):
        return None
    listen = dns_bind(cfg)
    addr = ipaddress.ip_address(listen.host)
    if addr.is_loopback:
        # A loopback destination arriving on a LAN interface is a martian
        # (unless route_localnet, which Mirage does not set behind your back).
        raise CaptureError(
            f"dns.listen {listen}: a loopback address cannot receive hijacked LAN queries; "
            "listen on 0.0.0.0 (or a LAN address) or turn appliance.dns-hijack off"
        )
    v4: ipaddress.IPv4Address | None = None
    v6: ipaddress.IPv6Address | None = None
    if isinstance(addr, ipaddress.IPv4Address):
        v4 = addr
    elif addr.is_unspecified:
        v4, v6 = ipaddress.IPv4Address(0), addr
    else:
        v6 = addr
    return DnsHijack(str(listen), listen.port, v4, v6)
