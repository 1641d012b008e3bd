"""From the config to outbound objects, and from a flow to its outbound.

`build_outbounds` makes one object per proxy and group plus the built-ins
DIRECT and REJECT; `Router` pairs them with the compiled rules. Both are
rebuilt on reload (SIGHUP); established flows keep the streams they have.

Shadowsocks and Trojan proxies are not implemented in this module yet: they
become `UnsupportedOutbound`s, which fail each connection with a clear
OutboundError, so a profile that lists them still loads and every other
proxy works (fallback groups move past them).
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from appliance.config.model import Config, IPAddress, ProxyConfig, Rule
from appliance.outbound.base import Outbound, OutboundError, Resolve
from appliance.outbound.direct import DirectOutbound
from appliance.outbound.groups import FallbackGroup, SelectGroup
from appliance.outbound.http import HttpOutbound
from appliance.outbound.preconnect import Preconnect
from appliance.outbound.reject import RejectOutbound
from appliance.outbound.socks5 import Socks5Outbound
from appliance.rules.engine import FlowContext, RuleSet


class BuildError(ValueError):
    """The config names outbounds that cannot be built (duplicate names,
    unknown group members, group cycles, rule targets that do not exist)."""


class UnsupportedOutbound:
    """A configured proxy of a type this build cannot speak yet."""

    def __init__(self, name: str, type_: str) -> None:
        self.name = name
        self.type = {"ss": "Shadowsocks", "trojan": "Trojan"}.get(type_, type_)
        self.reason = f"{name}: {type_} outbounds are not implemented yet"

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        raise OutboundError(self.reason)


def _build_proxy(p: ProxyConfig, cfg: Config, resolve: Resolve | None) -> Outbound:
    mark = cfg.routing_mark
    timeout = cfg.appliance.connect_timeout
    if p.type == "socks5":
        return Socks5Outbound(
            p.name,
            p.server,
            p.port,
            username=p.username,
            password=p.password,
            routing_mark=mark,
            connect_timeout=timeout,
            resolve=resolve,
            ipv6=cfg.ipv6,
            preconnect=p.preconnect,
        )
    if p.type == "http":
        return HttpOutbound(
            p.name,
            p.server,
            p.port,
            username=p.username,
            password=p.password,
            tls=p.tls,
            skip_cert_verify=p.skip_cert_verify,
            sni=p.sni,
            routing_mark=mark,
            connect_timeout=timeout,
            resolve=resolve,
            ipv6=cfg.ipv6,
            preconnect=p.preconnect,
        )
    if p.type == "direct":
        return DirectOutbound(resolve, mark, timeout, name=p.name, ipv6=cfg.ipv6)
    if p.type == "reject":
        return RejectOutbound(p.name)
    return UnsupportedOutbound(p.name, p.type)


def build_outbounds(cfg: Config, resolve: Resolve | None) -> dict[str, Outbound]:
    """Every outbound by name: DIRECT, REJECT, `proxies`, `proxy-groups`.

    `resolve` is the upstream resolver's `resolve_ips` (DIRECT, and proxies
    whose server is a name). Groups may name groups; they are built in
    dependency order. Raises BuildError for duplicates, unknown members and
    cycles (the loader normally refuses those first).
    """
    out: dict[str, Outbound] = {
        "DIRECT": DirectOutbound(
            resolve, cfg.routing_mark, cfg.appliance.connect_timeout, ipv6=cfg.ipv6
        ),
        "REJECT": RejectOutbound(),
    }
    for i, p in enumerate(cfg.proxies):
        if p.name in out:
            raise BuildError(f"proxies[{i}]: duplicate name {p.name!r}")
        out[p.name] = _build_proxy(p, cfg, resolve)
    pending = list(enumerate(cfg.proxy_groups))
    for g_index, g in pending:
        if g.name in out:
            raise BuildError(f"proxy-groups[{g_index}]: duplicate name {g.name!r}")
    group_names = {g.name for g in cfg.proxy_groups}
    # Each pass builds every group whose members exist; a pass that builds
    # nothing means a cycle or an unknown member. At most len(groups) passes.
    for _ in range(len(pending) + 1):
        if not pending:
            break
        waiting = []
        for g_index, g in pending:
            missing = [m for m in g.proxies if m not in out]
            if not missing:
                members = [out[m] for m in g.proxies]
                if not members:
                    raise BuildError(f"proxy-groups[{g_index}] {g.name!r}: no members")
                out[g.name] = (
                    SelectGroup(g.name, members)
                    if g.type == "select"
                    else FallbackGroup(g.name, members)
                )
            elif any(m not in group_names for m in missing):
                unknown = [m for m in missing if m not in group_names]
                raise BuildError(f"proxy-groups[{g_index}] {g.name!r}: unknown member(s) {unknown}")
            else:
                waiting.append((g_index, g))
        if len(waiting) == len(pending):
            names = ", ".join(repr(g.name) for _, g in waiting)
            raise BuildError(f"proxy-groups {names} contain each other (cycle)")
        pending = waiting
    return out


class Router:
    """Picks the outbound for a flow: the first matching rule's target, or
    DIRECT when no rule matches (no rules at all -> everything DIRECT).

    Immutable; build a new one on reload. Raises BuildError (or RuleError, a
    ValueError) at construction if a rule is invalid or names an outbound
    that does not exist.
    """

    def __init__(self, cfg: Config, outbounds: Mapping[str, Outbound]) -> None:
        self.rules = RuleSet(cfg.rules)
        self.outbounds = dict(outbounds)
        self.default = outbounds["DIRECT"]
        targets: list[Outbound] = []
        for i, rule in enumerate(self.rules.rules):
            target = outbounds.get(rule.target)
            if target is None:
                raise BuildError(f"rules[{i}]: target {rule.target!r} is not an outbound")
            targets.append(target)
        self._targets = tuple(targets)

    def preconnects(self) -> dict[str, Preconnect]:
        """The connection pools of the proxies that keep one, by name."""
        return {name: pool for name, o in self.outbounds.items()
                if (pool := getattr(o, "preconnect", None)) is not None}

    def close(self) -> None:
        """Close what the outbounds hold between flows (kept proxy
        connections): when this router is replaced, and at exit."""
        for pool in self.preconnects().values():
            pool.close()

    @property
    def targets(self) -> tuple[Outbound, ...]:
        """The outbound of each rule, by rule index (UDP routing walks past
        targets that cannot carry UDP)."""
        return self._targets

    def route(self, ctx: FlowContext) -> Outbound:
        return self._pick(ctx)[0]

    def decide(self, ctx: FlowContext) -> tuple[Outbound, bool]:
        """The outbound, and whether every flow to `ctx.domain` would get
        it (the rules decided by the name alone: see
        `RuleSet.decided_by_domain`)."""
        target, i = self._pick(ctx)
        return target, self.rules.decided_by_domain(i)

    def explain(self, ctx: FlowContext) -> tuple[Outbound, Rule | None]:
        """The outbound and the rule that chose it (None: the default), for
        logs and the API's connection list."""
        target, i = self._pick(ctx)
        return target, None if i is None else self.rules.rules[i]

    def _pick(self, ctx: FlowContext) -> tuple[Outbound, int | None]:
        """The outbound and the index of the rule that chose it (None: the
        default)."""
        i = self.rules.match_index(ctx)
        return (self.default if i is None else self._targets[i]), i
