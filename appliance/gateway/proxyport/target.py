"""What a proxy-port request names, as the `Flow` every listener makes.

A client of a proxy port names its target as a host name, a real IP, or a
fake IP it resolved through Mirage (the `curl -x socks5://` case). The
fake IP is turned back into its name and pinned in the pool for the life
of the flow (or of the UDP association), so recycling can never remap an
address a live flow uses; `Pins` releases them together. Nothing here
imports trio or does I/O. The flow's inbound is the port's (`mixed`,
`socks`, `http`); the dispatcher (appliance/routing.py) routes it as it
routes the transparent listeners' flows.

How it fails: `Refused` ("bad-target" for an empty name, "unmapped" for a
fake IP with no mapping: expired, or issued before a restart; counted in
the registry's `unmapped`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from appliance.config.model import IPAddress
from appliance.flow import Entry, Flow, Network
from appliance.gateway.proxyport.handshake import Refused
from appliance.gateway.splice import FlowRegistry
from appliance.gateway.tcp import FakeIPs
from appliance.outbound.base import as_ip


@dataclass(eq=False)
class Pins:
    """Pool pins one client connection holds (released together in its
    `finally`). Owns the pins, not the pool."""

    pool: FakeIPs
    ips: list[str] = field(default_factory=list)

    def pin(self, ip: str) -> str | None:
        domain = self.pool.pin(ip)
        if domain is not None:
            self.ips.append(ip)
        return domain

    def release(self) -> None:
        while self.ips:
            self.pool.unpin(self.ips.pop())


class Targets:
    """Requested hosts -> `Flow`s, with the pool's fake IPs mapped back to
    names (pinned in the caller's `Pins`)."""

    def __init__(self, pool: FakeIPs, registry: FlowRegistry) -> None:
        self.pool = pool
        self.registry = registry

    def resolve(
        self,
        host: str | IPAddress,
        port: int,
        src: tuple[str, int],
        pins: Pins,
        entry: Entry,
        network: Network = "tcp",
    ) -> Flow:
        """The Flow for a requested host: a name as is (no `dst`), a fake
        IP as its name (pinned), a real IP as the destination. Raises
        Refused."""
        client = ipaddress.ip_address(src[0])
        ip = as_ip(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip is None:
            name = str(host).rstrip(".").lower()
            if not name:
                raise Refused("bad-target", f"bad host name {host!r}")
            return Flow(network, entry.inbound, client, src[1], None, port, name, entry=entry)
        if self.pool.is_fake(ip):
            domain = pins.pin(str(ip))
            if domain is None:
                self.registry.unmapped += 1
                raise Refused(
                    "unmapped",
                    f"fake IP {ip} is not mapped (expired, or issued before a restart)",
                )
            return Flow(network, entry.inbound, client, src[1], ip, port, domain, entry=entry)
        return Flow(network, entry.inbound, client, src[1], ip, port, None, entry=entry)
