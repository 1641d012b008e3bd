"""Checks across sections, once the whole `Config` is built: what no single
section can see (marks, fake ranges against bypass, listeners' ports)."""

from __future__ import annotations

import ipaddress
import logging

from appliance.config.loader.errors import ConfigError, raise_collected
from appliance.config.model import Config, IPNetwork, Listen

log = logging.getLogger(__name__)


def check_cross(cfg: Config) -> None:
    """What needs two sections at once: marks, bypass against the fake
    ranges, and listeners' ports. Raises every problem found together."""
    errors: list[ConfigError] = []
    a = cfg.appliance
    if cfg.routing_mark is not None and cfg.routing_mark == a.capture_mark:
        errors.append(ConfigError(
            "routing-mark",
            cfg.routing_mark,
            "equals appliance.capture-mark: outbound traffic would be captured again",
        ))
    fake_nets: list[IPNetwork] = [cfg.dns.fake_ip_range]
    if cfg.dns.fake_ip_range6 is not None:
        fake_nets.append(cfg.dns.fake_ip_range6)
    for i, net in enumerate(a.bypass):
        for fake in fake_nets:
            if net.version == fake.version and net.overlaps(fake):
                errors.append(ConfigError(
                    f"appliance.bypass[{i}]",
                    str(net),
                    f"overlaps the fake-IP range {fake}: traffic to fake IPs must be captured",
                ))
    errors += _check_ports(cfg)
    raise_collected(errors)
    _warn_ip_versions(cfg)


def _warn_ip_versions(cfg: Config) -> None:
    """What a proxy's way to its server leaves it unable to do, said now
    rather than at the first flow (mihomo loads such profiles, so Mirage
    does too): an `ip-version` that leaves its server no address (every
    connection fails). (SOCKS5 UDP behind a dialer-proxy is said by
    loader/proxies.py `warn_udp_behind_dialer`.)"""
    for p in cfg.proxies:
        if p.ip_version == "ipv6" and not cfg.ipv6:
            log.warning("proxy %r: ip-version: ipv6 with the top-level ipv6: false: its "
                        "server is never resolved (every connection through it fails)", p.name)
            continue
        try:
            literal = ipaddress.ip_address(p.server)
        except ValueError:
            continue
        want = {"ipv4": 4, "ipv6": 6}.get(p.ip_version)
        if want is not None and literal.version != want:
            log.warning("proxy %r: server %s is an IPv%d address, but ip-version is %s "
                        "(every connection through it fails)", p.name, p.server,
                        literal.version, p.ip_version)


def _check_ports(cfg: Config) -> list[ConfigError]:
    """Two TCP listeners of ours on one port and overlapping addresses cannot
    both bind; say which keys collide instead of failing at start."""
    wildcard = Listen("0.0.0.0", 0)
    listeners = [(key, Listen(wildcard.host, port)) for key, port in cfg.proxy_ports]
    if cfg.tproxy_port is not None:
        listeners.append(("tproxy-port", Listen(wildcard.host, cfg.tproxy_port)))
    if cfg.external_controller is not None:
        listeners.append(("external-controller", cfg.external_controller))
    if cfg.dns.enable:
        listeners.append(("dns.listen", cfg.dns.listen))
    errors = []
    for i, (key_a, a) in enumerate(listeners):
        for key_b, b in listeners[i + 1 :]:
            if a.port == b.port and _hosts_overlap(a.host, b.host):
                errors.append(ConfigError(key_b, str(b),
                                          f"port {b.port} is already used by {key_a}"))
    return errors


def _hosts_overlap(a: str, b: str) -> bool:
    wild = {"0.0.0.0", "::"}
    return a == b or a in wild or b in wild
