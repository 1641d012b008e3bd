"""From the config to outbound objects.

`build_outbounds` makes one object per proxy and group plus the built-ins
DIRECT and REJECT; the router (appliance/routing.py) pairs them with the
compiled rules. Both are rebuilt on reload (SIGHUP); established flows keep
the streams they have.

A proxy is built by the builder its `type` names in `BUILDERS`: a new
protocol is one new module (a class with `from_config(proxy, env)`,
`connect_tcp`, `open_udp`, `carries_udp`) plus one line there.

A type without a builder becomes an `UnsupportedOutbound`, which fails
each connection with a clear OutboundError, so a profile that lists it
still loads and every other proxy works (fallback groups move past it).

The loader refuses group cycles (appliance/config/loader.py); building
does not check again. A name used twice or a group member that names
nothing is a BuildError (an object could not be built, or would be lost).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from graphlib import CycleError, TopologicalSorter
from typing import Any

import trio

from appliance.config.model import (
    Config,
    IPAddress,
    MemberFilter,
    ProxyConfig,
    ProxyGroupConfig,
)
from appliance.outbound.anytls import AnytlsOutbound
from appliance.outbound.base import Outbound, OutboundEnv, OutboundError, Resolve, UdpPeer
from appliance.outbound.direct import DirectOutbound
from appliance.outbound.groups import (
    CompatibleOutbound,
    FallbackGroup,
    Group,
    LoadBalanceGroup,
    PassOutbound,
    RejectDropOutbound,
    RelayGroup,
    SelectGroup,
    URLTestGroup,
    filter_members,
    groups_in,
)
from appliance.outbound.health import DelayHistory
from appliance.outbound.http import HttpOutbound
from appliance.outbound.hysteria2 import Hysteria2Outbound
from appliance.outbound.reject import RejectOutbound
from appliance.outbound.selections import Selections
from appliance.outbound.shadowsocks import ShadowsocksOutbound
from appliance.outbound.socks5 import Socks5Outbound
from appliance.outbound.ssh import SshOutbound
from appliance.outbound.trojan import TrojanOutbound
from appliance.outbound.tuic import TuicOutbound
from appliance.outbound.vless import VlessOutbound
from appliance.outbound.vmess import VmessOutbound
from appliance.outbound.wireguard import WireguardOutbound

# One proxy entry and what all outbounds share -> the outbound.
Builder = Callable[[ProxyConfig, OutboundEnv], Outbound]

# `proxies[].type` -> its builder. Types not listed load as UnsupportedOutbound.
BUILDERS: dict[str, Builder] = {
    "socks5": Socks5Outbound.from_config,
    "http": HttpOutbound.from_config,
    "direct": DirectOutbound.from_config,
    "reject": RejectOutbound.from_config,
    "ss": ShadowsocksOutbound.from_config,
    "vmess": VmessOutbound.from_config,
    "vless": VlessOutbound.from_config,
    "trojan": TrojanOutbound.from_config,
    "hysteria2": Hysteria2Outbound.from_config,
    "tuic": TuicOutbound.from_config,
    "ssh": SshOutbound.from_config,
    "anytls": AnytlsOutbound.from_config,
    "wireguard": WireguardOutbound.from_config,
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


def build_proxy(p: ProxyConfig, env: OutboundEnv) -> Outbound:
    """One proxy by its type's builder (its env carrying the proxy's
    `ip-version` for its server dialer); an UnsupportedOutbound otherwise."""
    builder = BUILDERS.get(p.type)
    env = replace(env, ip_version=p.ip_version)
    return builder(p, env) if builder is not None else UnsupportedOutbound(p.name, p.type)


class ProxyFactory:
    """Builds proxies from their config for the parts that build them after
    the first pass: relay hops (a proxy rebuilt to dial through the hop
    before it) and proxy providers' proxies. `configs` holds every proxy
    config by name, including providers' (their refresh adds to it)."""

    def __init__(self, env: OutboundEnv, configs: dict[str, ProxyConfig]) -> None:
        self.env = env
        self.configs = configs

    def build(self, p: ProxyConfig, via: Outbound | None = None) -> Outbound:
        return build_proxy(p, replace(self.env, via=via))

    def rechain(self, hop: Outbound, via: Outbound) -> Outbound | None:
        """`hop` rebuilt to reach its server through `via`; None when it
        cannot be: not a proxy, or QUIC (hysteria2, tuic run on Mirage's
        own UDP socket, so built with a `via` they would go straight to
        their server, around the chain; the loader skips them with
        `dialer-proxy` for the same reason)."""
        p = self.configs.get(hop.name)
        if p is None or p.type in ("direct", "reject", "hysteria2", "tuic"):
            return None
        return self.build(p, via)


BUILTINS = ("DIRECT", "REJECT", "REJECT-DROP", "PASS", "COMPATIBLE")


def build_outbounds(
    cfg: Config,
    resolve: Resolve | None,
    *,
    delays: DelayHistory | None = None,
    selections: Selections | None = None,
    provided: Mapping[str, Sequence[ProxyConfig]] | None = None,
    provided_out: dict[str, list[Outbound]] | None = None,
    proxy_resolve: Resolve | None = None,
    direct_resolve: Resolve | None = None,
) -> dict[str, Outbound]:
    """Every outbound by name: the built-ins (DIRECT, REJECT, REJECT-DROP,
    PASS, COMPATIBLE), `proxies`, `proxy-groups` and GLOBAL.

    `resolve` is the upstream resolver's `resolve_ips` (DIRECT, and proxies
    whose server is a name). Proxies and groups are built in dependency
    order (graphlib's): a group after its members, a proxy with
    `dialer-proxy` after that outbound, which becomes its env's `via`; a
    cycle, which the loader refuses, raises BuildError here. `delays` is
    the delay history the groups share (kept across reloads by the caller);
    `selections` the remembered choices (restored here, and told of new
    ones); `provided` the proxies of each proxy provider, by provider name
    (groups that `use:` one take them, filtered); their outbounds are put
    in `provided_out` when given (a provider's proxies are not rule
    targets, as in mihomo, so they are not in the returned map). A
    provider is built after the outbounds its proxies' `dialer-proxy` name.
    `proxy_resolve` resolves the proxies' own server names
    (`dns.proxy-server-nameserver`), `direct_resolve` DIRECT's destinations
    (`dns.direct-nameserver`); each defaults to `resolve`.
    """
    env = outbound_env(cfg, proxy_resolve or resolve)
    resolve = direct_resolve or resolve
    delays = delays if delays is not None else DelayHistory()
    provided = provided or {}
    direct = DirectOutbound(resolve, env.routing_mark, env.connect_timeout, ipv6=env.ipv6)
    out: dict[str, Outbound] = {
        "DIRECT": direct,
        "REJECT": RejectOutbound(),
        "REJECT-DROP": RejectDropOutbound(),
        "PASS": PassOutbound(),
        "COMPATIBLE": CompatibleOutbound(direct=direct),
    }
    # Proxies and groups the loader skipped stay rule targets (mihomo would
    # use them): each is COMPATIBLE under its own name, so the API shows
    # which rule sent a flow where. Groups never hold them.
    standins = {s.name: CompatibleOutbound(s.name, direct=direct) for s in cfg.skipped}
    proxies: dict[str, ProxyConfig] = {}
    for i, p in enumerate(cfg.proxies):
        if p.name in out or p.name in proxies:
            raise BuildError(f"proxies[{i}]: duplicate name {p.name!r}")
        proxies[p.name] = p
    groups: dict[str, ProxyGroupConfig] = {}
    for i, g in enumerate(cfg.proxy_groups):
        if g.name in out or g.name in proxies or g.name in groups:
            raise BuildError(f"proxy-groups[{i}]: duplicate name {g.name!r}")
        groups[g.name] = g
    for i, g in enumerate(cfg.proxy_groups):
        unknown = [m for m in g.proxies if m not in out and m not in groups and m not in proxies]
        if unknown:
            raise BuildError(f"proxy-groups[{i}] {g.name!r}: unknown member(s) {unknown}")
        missing = [u for u in g.use if u not in provided]
        if missing:
            raise BuildError(f"proxy-groups[{i}] {g.name!r}: unknown provider(s) {missing}")
    for name, p in proxies.items():
        if p.dialer_proxy is not None and p.dialer_proxy not in proxies \
                and p.dialer_proxy not in groups and p.dialer_proxy not in out:
            raise BuildError(f"proxy {name!r}: dialer-proxy {p.dialer_proxy!r} names nothing")
    graph: dict[str, list[str]] = {}
    for name, p in proxies.items():
        graph[name] = [p.dialer_proxy] if p.dialer_proxy in proxies or p.dialer_proxy in groups \
            else []
    for name, g in groups.items():
        graph[name] = [m for m in g.proxies if m in proxies or m in groups]
        graph[name] += [f"provider:{u}" for u in g.use]
    for pname, configs in provided.items():
        dialers = {c.dialer_proxy for c in configs if c.dialer_proxy is not None}
        unknown_dialers = [d for d in dialers if d not in proxies and d not in groups
                           and d not in out]
        if unknown_dialers:
            raise BuildError(f"proxy-provider {pname!r}: dialer-proxy {unknown_dialers} "
                             "names nothing")
        graph[f"provider:{pname}"] = [d for d in dialers if d in proxies or d in groups]
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise BuildError(f"dialer-proxy / group cycle: {' -> '.join(e.args[1])}") from None
    factory = ProxyFactory(env, dict(proxies))
    built: dict[str, list[Outbound]] = {}
    for name in order:
        if name.startswith("provider:"):
            pname = name.removeprefix("provider:")
            built[pname] = []
            for c in provided.get(pname, ()):
                factory.configs.setdefault(c.name, c)
                built[pname].append(factory.build(
                    c, out[c.dialer_proxy] if c.dialer_proxy is not None else None))
            continue
        pc = proxies.get(name)
        if pc is not None:
            via = out[pc.dialer_proxy] if pc.dialer_proxy is not None else None
            out[name] = factory.build(pc, via)
            continue
        g = groups[name]
        static = [out[m] for m in g.proxies]
        members = compose_members(static, [built[u] for u in g.use], g.filter)
        group = out[name] = make_group(g, members, delays=delays, factory=factory,
                                       direct=out["DIRECT"], compatible=out["COMPATIBLE"])
        group.static = tuple(static)
    for name, standin in standins.items():
        out.setdefault(name, standin)
    if "GLOBAL" not in out:
        everything = [out["DIRECT"], out["REJECT"], *(out[n] for n in proxies),
                      *(out[n] for n in groups)]
        out["GLOBAL"] = SelectGroup("GLOBAL", everything, delays=delays)
    if selections is not None:
        restore_selections(out, selections)
    if provided_out is not None:
        provided_out.update(built)
    return out


def make_group(g: ProxyGroupConfig, members: Sequence[Outbound], *, delays: DelayHistory,
               factory: ProxyFactory, direct: Outbound,
               compatible: Outbound | None = None) -> Group:
    """The group object of one `proxy-groups` entry."""
    common: dict[str, Any] = {"health": g.health, "delays": delays, "hidden": g.hidden,
                              "icon": g.icon, "disable_udp": g.disable_udp,
                              "compatible": compatible}
    group: Group
    if g.type == "select":
        group = SelectGroup(g.name, members, **common)
    elif g.type == "url-test":
        group = URLTestGroup(g.name, members, tolerance=g.tolerance, **common)
    elif g.type == "fallback":
        group = FallbackGroup(g.name, members, **common)
    elif g.type == "load-balance":
        group = LoadBalanceGroup(g.name, members, strategy=g.strategy, **common)
    else:
        group = RelayGroup(g.name, members, rechain=factory.rechain, direct=direct, **common)
    group.config = g
    return group


def compose_members(static: Sequence[Outbound], provided: Sequence[Sequence[Outbound]],
                    rules: MemberFilter) -> list[Outbound]:
    """A group's members as mihomo's GetProxies makes them: the proxies it
    names (unfiltered but for the excludes), then each used provider's
    proxies that `filter` keeps, each name once; then `exclude-filter` and
    `exclude-type` over all of them."""
    members = list(static)
    seen = {m.name for m in members}
    for proxies in provided:
        for m in filter_members(proxies, MemberFilter(filter=rules.filter)):
            if m.name not in seen:
                seen.add(m.name)
                members.append(m)
    return filter_members(members, MemberFilter(exclude_filter=rules.exclude_filter,
                                                exclude_type=rules.exclude_type),
                          use_filter=False)


def restore_selections(outbounds: Mapping[str, Outbound], selections: Selections) -> None:
    """Re-apply remembered choices to the groups that can select (a choice
    that names no member is left alone), then report new choices to
    `selections`."""
    for group in groups_in(dict(outbounds)).values():
        if not group.selectable:
            continue
        chosen = selections.get(group.name)
        if chosen is not None and chosen in group.all:
            group.select(chosen)
        group.on_select = selections.remember
