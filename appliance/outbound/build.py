"""From the config to outbound objects.

`build_outbounds` makes one object per proxy and group plus the built-ins
DIRECT and REJECT; the router (appliance/routing.py) pairs them with the
compiled rules. Both are rebuilt on reload (SIGHUP); established flows keep
the streams they have.

A proxy is built by the builder its `type` names in `BUILDERS`: a new
protocol is one new module (a class with `from_config(proxy, env)`,
`connect_tcp`, `open_udp`, `carries_udp`) plus one line there.

Shadowsocks and Trojan proxies are not implemented yet: they become
`UnsupportedOutbound`s, which fail each connection with a clear
OutboundError, so a profile that lists them still loads and every other
proxy works (fallback groups move past them).

The loader refuses group cycles (appliance/config/loader.py); building
does not check again. A name used twice or a group member that names
nothing is a BuildError (an object could not be built, or would be lost).
"""

from __future__ import annotations

from collections.abc import Callable
from graphlib import TopologicalSorter

import trio

from appliance.config.model import Config, IPAddress, ProxyConfig
from appliance.outbound.base import Outbound, OutboundEnv, OutboundError, Resolve, UdpPeer
from appliance.outbound.direct import DirectOutbound
from appliance.outbound.groups import FallbackGroup, SelectGroup
from appliance.outbound.http import HttpOutbound
from appliance.outbound.hysteria2 import Hysteria2Outbound
from appliance.outbound.reject import RejectOutbound
from appliance.outbound.socks5 import Socks5Outbound
from appliance.outbound.tuic import TuicOutbound
from appliance.outbound.vless import VlessOutbound
from appliance.outbound.vmess import VmessOutbound

# One proxy entry and what all outbounds share -> the outbound.
Builder = Callable[[ProxyConfig, OutboundEnv], Outbound]

# `proxies[].type` -> its builder. Types not listed load as UnsupportedOutbound.
BUILDERS: dict[str, Builder] = {
    "socks5": Socks5Outbound.from_config,
    "http": HttpOutbound.from_config,
    "direct": DirectOutbound.from_config,
    "reject": RejectOutbound.from_config,
    "vmess": VmessOutbound.from_config,
    "vless": VlessOutbound.from_config,
    "hysteria2": Hysteria2Outbound.from_config,
    "tuic": TuicOutbound.from_config,
}


class BuildError(ValueError):
    """The config names outbounds that cannot be built (duplicate names,
    unknown group members, rule targets that do not exist)."""


class UnsupportedOutbound:
    """A configured proxy of a type this build cannot speak yet."""

    carries_udp = False

    def __init__(self, name: str, type_: str) -> None:
        self.name = name
        self.type = {"ss": "Shadowsocks", "trojan": "Trojan"}.get(type_, type_)
        self.reason = f"{name}: {type_} outbounds are not implemented yet"

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        raise OutboundError(self.reason)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        await trio.lowlevel.checkpoint()
        raise OutboundError(self.reason)


def outbound_env(cfg: Config, resolve: Resolve | None) -> OutboundEnv:
    return OutboundEnv(resolve, cfg.routing_mark, cfg.appliance.connect_timeout, cfg.ipv6)


def build_outbounds(cfg: Config, resolve: Resolve | None) -> dict[str, Outbound]:
    """Every outbound by name: DIRECT, REJECT, `proxies`, `proxy-groups`.

    `resolve` is the upstream resolver's `resolve_ips` (DIRECT, and proxies
    whose server is a name). Groups may name groups: they are built after
    their members (graphlib's order; a cycle, which the loader refuses,
    would raise its CycleError).
    """
    env = outbound_env(cfg, resolve)
    out: dict[str, Outbound] = {
        "DIRECT": DirectOutbound(resolve, env.routing_mark, env.connect_timeout, ipv6=env.ipv6),
        "REJECT": RejectOutbound(),
    }
    for i, p in enumerate(cfg.proxies):
        if p.name in out:
            raise BuildError(f"proxies[{i}]: duplicate name {p.name!r}")
        builder = BUILDERS.get(p.type)
        out[p.name] = builder(p, env) if builder is not None else UnsupportedOutbound(
            p.name, p.type)
    groups = {g.name: g for g in cfg.proxy_groups}
    for i, g in enumerate(cfg.proxy_groups):
        if g.name in out:
            raise BuildError(f"proxy-groups[{i}]: duplicate name {g.name!r}")
        unknown = [m for m in g.proxies if m not in out and m not in groups]
        if unknown:
            raise BuildError(f"proxy-groups[{i}] {g.name!r}: unknown member(s) {unknown}")
    order = TopologicalSorter({g.name: [m for m in g.proxies if m in groups]
                               for g in cfg.proxy_groups})
    for name in order.static_order():
        g = groups[name]
        members = [out[m] for m in g.proxies]
        out[name] = (SelectGroup(name, members) if g.type == "select"
                     else FallbackGroup(name, members))
    return out
