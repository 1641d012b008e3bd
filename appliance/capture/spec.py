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
