"""Routing: from a flow to an open way out, for TCP and UDP alike.

Every listener (the transparent TCP listener, the transparent UDP socket,
the proxy ports) hands its `Flow` to the one `Dispatcher`:

    Flow --flow_context--> rules (Router) --> outbound --> connect_tcp / open_udp

- `Router`: the compiled rules and the outbounds of one configuration.
  Immutable but for a cache it owns (see `pick_udp`); built at start and on
  every reload.
- `Dispatcher`: holds the live router. A reload swaps it in one assignment:
  a flow reads the router once, so flows already dialled keep their
  outbound and new ones see the new rules. It routes a flow, records the
  decision in the flow (outbound, rule, skipped rules) and opens the
  outbound. It also offers DIRECT flows to the kernel offload and sweeps the
  proxies' kept connections.

UDP routing, as mihomo does it: a rule whose outbound cannot carry UDP
(HTTP CONNECT, SOCKS5 without `udp: true`, not-yet-implemented types) is
skipped and matching goes on with the next rule (a profile written for Clash
keeps its meaning); when no later rule matches, the flow goes DIRECT, the
default. A profile that wants such UDP dropped instead says so with a rule
placed before it, such as `NETWORK,udp,REJECT`.

IP rules and names (mihomo's `tunnel.match`): a flow known by name (a fake
IP's, or a host named on a proxy port) first matches by name only; when no
rule before the first one that would resolve (`RuleSet.first_resolve`)
matched, the router resolves the name through the upstream resolver
(`resolve_ips`, never the system's; answers kept for their TTL, at most 5
minutes, 4096 names) and matches again from that rule with the address. A
failed lookup leaves the flow without an address: the IP rules do not
match it. A fake IP is never matched as if it were the destination.

How it fails: `connect_tcp` and `open_udp` raise OutboundError (the
outbound's, or its deadline); outbounds that cannot be built raise
BuildError (a ValueError) when the router is built.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import trio

from appliance.config.model import TUNNEL_MODES, Config, IPAddress, Rule, TunnelMode
from appliance.dns.upstream_api import UpstreamError
from appliance.flow import Flow
from appliance.metrics import connect_seconds
from appliance.outbound.base import Outbound, Resolve, UdpPeer, outbound_deadline
from appliance.outbound.build import BuildError, build_outbounds
from appliance.outbound.direct import DirectOutbound
from appliance.outbound.groups import FLOW_PICKS, FLOW_SOURCE, unwrap
from appliance.outbound.preconnect import MAX_IDLE as PRECONNECT_MAX_IDLE
from appliance.outbound.preconnect import Preconnect
from appliance.rules.engine import EMPTY_ENV, FlowContext, RuleEnv, RuleSet

log = logging.getLogger(__name__)


# How long a name's address resolved for IP rules is kept, at most.
RESOLVE_MAX_TTL = 300.0
RESOLVE_TIMEOUT = 5.0


def flow_context(flow: Flow) -> FlowContext:
    """What the rules see of `flow`; the only place a FlowContext is made
    from a flow. A flow known by name carries no destination address: its
    destination is a fake IP, which says nothing (rules/engine.py)."""
    domain = flow.domain
    entry = flow.entry
    if entry is None:
        return FlowContext(domain, None if domain is not None else flow.dst, flow.dst_port,
                           flow.src, flow.network, flow.src_port)
    return FlowContext(domain, None if domain is not None else flow.dst, flow.dst_port,
                       flow.src, flow.network, flow.src_port, in_type=entry.type,
                       in_port=entry.port, in_user=entry.user, in_name=entry.name)


class NameAddresses:
    """The address of a name for IP rules: asked from the upstream resolver
    (IPv4 first, then IPv6, as mihomo's ResolveIP), kept for the answer's TTL
    (at most RESOLVE_MAX_TTL), the `size` most recent names. A failure is
    kept for 5 s so that a dead resolver is not asked once per flow."""

    def __init__(self, resolve: Resolve | None, *, size: int = 4096) -> None:
        self._resolve = resolve
        self._size = size
        self._cache: OrderedDict[str, tuple[IPAddress | None, float]] = OrderedDict()

    async def lookup(self, name: str) -> IPAddress | None:
        now = trio.current_time()
        hit = self._cache.get(name)
        if hit is not None and hit[1] > now:
            self._cache.move_to_end(name)
            return hit[0]
        address, ttl = None, 5.0
        if self._resolve is not None:
            with trio.move_on_after(RESOLVE_TIMEOUT):
                for family in (4, 6):
                    try:
                        addresses, answer_ttl = await self._resolve(name, family)
                    except (UpstreamError, OSError) as err:
                        log.debug("rules: resolving %s for IP rules: %s", name, err)
                        continue
                    if addresses:
                        address, ttl = addresses[0], min(float(answer_ttl), RESOLVE_MAX_TTL)
                        break
        self._cache[name] = (address, now + max(ttl, 1.0))
        self._cache.move_to_end(name)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return address


def chain(outbound: Outbound) -> tuple[str, ...]:
    """The outbounds a flow sent to `outbound` would go through now, the
    last one first (mihomo's `chains`): a group's member in use
    (`current()`), then that one's, up to a proxy. The dispatcher replaces
    it with the members the groups really took once the flow connected
    (`FLOW_PICKS`). Bounded: a
    group cannot contain itself (the loader refuses cycles), and the walk
    stops after 32 hops regardless."""
    names = [outbound.name]
    here: Any = outbound
    for _ in range(32):
        current = getattr(here, "current", None)
        if not callable(current):
            break
        here = current()
        names.append(here.name)
    return tuple(reversed(names))


class Router:
    """Picks the outbound for a flow: the first matching rule's target, or
    DIRECT when no rule matches (no rules at all -> everything DIRECT).

    Owns the outbounds (and through them the proxies' kept connections:
    `close`), and the rule sets "the rules after rule i" that UDP routing
    builds when it has to skip a rule (built once per rule, kept as long as
    this router). Raises BuildError at construction if a rule names an
    outbound that does not exist (the loader refuses that first).
    """

    def __init__(self, rules: Sequence[Rule], outbounds: Mapping[str, Outbound],
                 env: RuleEnv = EMPTY_ENV, addresses: NameAddresses | None = None,
                 mode: TunnelMode = "rule") -> None:
        self.rules = RuleSet(rules, env)
        self.outbounds = dict(outbounds)
        self.default = outbounds["DIRECT"]
        # mihomo's tunnel mode (`set_mode`): the one mutable setting, so that
        # the API can switch it without building a router.
        self.mode: TunnelMode = "rule"
        self.set_mode(mode)
        self.addresses = addresses if addresses is not None else NameAddresses(None)
        targets: list[Outbound | None] = []
        for i, rule in enumerate(self.rules.rules):
            if rule.type == "SUB-RULE":
                targets.append(None)  # decided per flow by its sub-rules list
                continue
            target = outbounds.get(rule.target)
            if target is None:
                raise BuildError(f"rules[{i}]: target {rule.target!r} is not an outbound")
            targets.append(target)
        for name, sub in env.sub_rules.items():
            for i, rule in enumerate(sub):
                if rule.type != "SUB-RULE" and rule.target not in outbounds:
                    raise BuildError(f"sub-rules.{name}[{i}]: target {rule.target!r} is not "
                                     "an outbound")
        # The outbound of each rule, by rule index (None: a SUB-RULE).
        self.targets = tuple(targets)
        self._tails: dict[int, RuleSet] = {}

    @classmethod
    def from_config(cls, cfg: Config, resolve: Resolve | None,
                    env: RuleEnv | None = None, **shared: Any) -> Router:
        """The outbounds `cfg` configures (appliance/outbound/build.py, which
        takes what outlives a router in `shared`: delay history, remembered
        choices, providers' proxies) and its rules; `env` what the rules
        refer to (rule-providers' content, geodata; its sub-rules are taken
        from `cfg`)."""
        env = dataclasses.replace(env or EMPTY_ENV, sub_rules=dict(cfg.sub_rules))
        return cls(cfg.rules, build_outbounds(cfg, resolve, **shared), env,
                   NameAddresses(resolve), cfg.mode)

    def with_env(self, env: RuleEnv) -> Router:
        """The same rules and outbounds over new rule-provider content or
        geodata (`env`'s sub-rules are this router's). Compiles the rules:
        may take a second for very large rule-sets (call it in a thread)."""
        env = dataclasses.replace(env, sub_rules=self.rules.env.sub_rules)
        return Router(self.rules.rules, self.outbounds, env, self.addresses, self.mode)

    def set_mode(self, mode: TunnelMode) -> None:
        """mihomo's `mode` from now on (new flows): `rule`, `global` (every
        flow to GLOBAL, which then picks by its selection) or `direct`
        (every flow DIRECT). In the last two no rule is matched (a flow's
        rule is None) and no name is resolved for IP rules."""
        if mode not in TUNNEL_MODES:
            raise ValueError(f"mode {mode!r}: rule, global or direct")
        self.mode = mode
        self._mode_outbound = (None if mode == "rule"
                               else self.outbounds["GLOBAL" if mode == "global" else "DIRECT"])

    def _outbound(self, index: int, ctx: FlowContext) -> Outbound:
        target = self.targets[index]
        if target is None:
            name, _ = self.rules.target(index, ctx, self._passes_in_list)
            return self.outbounds[name]
        return target

    def _passes_in_list(self, name: str) -> bool:
        return unwrap(self.outbounds[name]).type == "PassRule"

    def _passes(self, index: int, ctx: FlowContext) -> bool:
        """PASS (a rule's target, or the member a group chose) means "not
        this rule": matching goes on after it, as in mihomo. PASS-RULE is
        the same in the main rules; in a sub-rules list it goes on in that
        list (RuleSet.target), where PASS goes back to the main rules."""
        return unwrap(self._outbound(index, ctx)).type in ("Pass", "PassRule")

    def pick(self, ctx: FlowContext) -> tuple[Outbound, int | None]:
        """The outbound for a TCP flow and the index of the rule that chose
        it (None: the default), matching with what `ctx` has (no lookup:
        see `route`)."""
        if self._mode_outbound is not None:
            return self._mode_outbound, None
        i = self.rules.match_index(ctx)
        while i is not None and self._passes(i, ctx):
            i = self._match_from(ctx, i + 1)
        return (self.default if i is None else self._outbound(i, ctx)), i

    async def resolved(self, ctx: FlowContext) -> tuple[FlowContext | None, int | None]:
        """(`ctx` with the name's address, or None when matching by name
        alone decides; the first match by name alone). See the module doc."""
        i = self.rules.match_index(ctx)
        start = self.rules.first_resolve
        if start is None or not ctx.domain or ctx.dst_ip is not None \
                or (i is not None and i < start):
            return None, i
        address = await self.addresses.lookup(ctx.domain)
        if address is None:
            return None, i
        return dataclasses.replace(ctx, dst_ip=address), i

    def _first(self, ctx: FlowContext, start: int, resolved: FlowContext | None) -> int | None:
        """The first rule from `start` matching the flow: by `ctx` before
        `first_resolve`, by `resolved` (when given) from there on."""
        i = self._match_from(ctx, start)
        switch = self.rules.first_resolve
        if resolved is None or switch is None or (i is not None and i < switch):
            return i
        return self._match_from(resolved, max(start, switch))

    def _match_from(self, ctx: FlowContext, start: int) -> int | None:
        if start == 0:
            return self.rules.match_index(ctx)
        rest = self._tail(start).match_index(ctx)
        return None if rest is None else start + rest

    async def route(self, ctx: FlowContext) -> tuple[Outbound, int | None, FlowContext]:
        """The outbound for a TCP flow, the index of the rule that chose it
        (None: the default) and the context it matched with (its address
        when a rule needed one)."""
        if self._mode_outbound is not None:
            return self._mode_outbound, None, ctx
        if self.rules.first_resolve is None:
            # No rule wants an address: `resolved`'s answer, without its
            # coroutine (every TCP flow comes here).
            resolved, i = None, self.rules.match_index(ctx)
        else:
            resolved, i = await self.resolved(ctx)
        if resolved is not None:
            i = self._first(ctx, 0, resolved)
        while i is not None and self._passes(i, ctx if resolved is None else resolved):
            i = self._first(ctx, i + 1, resolved)
        return (self.default if i is None else self._outbound(i, resolved or ctx)), i, \
            resolved or ctx

    def pick_udp(self, ctx: FlowContext, resolved: FlowContext | None = None
                 ) -> tuple[Outbound, int | None, int]:
        """The outbound for a UDP flow, the index of the rule that chose it
        (None: the default) and how many matching rules were skipped because
        their outbound cannot carry UDP (see the module doc). `resolved`:
        the flow with its name's address (`resolved`), for the IP rules.
        In global and direct mode the one outbound, whether or not it
        carries UDP (mihomo: a flow GLOBAL cannot carry fails)."""
        if self._mode_outbound is not None:
            return self._mode_outbound, None, 0
        index = self._first(ctx, 0, resolved)
        skipped = 0
        # Each pass moves past one matching rule: bounded by the rule count.
        while index is not None:
            switch = self.rules.first_resolve
            use = resolved if resolved is not None and switch is not None \
                and index >= switch else ctx
            target = self._outbound(index, use)
            if target.carries_udp and unwrap(target).type not in ("Pass", "PassRule"):
                return target, index, skipped
            skipped += 1
            index = self._first(ctx, index + 1, resolved)
        return self.default, None, skipped

    async def route_udp(self, ctx: FlowContext) -> tuple[Outbound, int | None, int]:
        """`pick_udp` after the lookup `route` makes."""
        if self._mode_outbound is not None:
            return self._mode_outbound, None, 0
        resolved, _ = await self.resolved(ctx)
        return self.pick_udp(ctx, resolved)

    def _tail(self, start: int) -> RuleSet:
        rules = self._tails.get(start)
        if rules is None:
            rules = self._tails[start] = RuleSet(self.rules.rules[start:], self.rules.env)
        return rules

    def preconnects(self) -> dict[str, Preconnect]:
        """The connection pools of the proxies that keep one, by name."""
        out: dict[str, Preconnect] = {}
        for name, o in self.outbounds.items():
            pool = getattr(o, "preconnect", None)
            if isinstance(pool, Preconnect):
                out[name] = pool
        return out

    def close(self) -> None:
        """Close what the outbounds hold between flows (kept proxy
        connections): when this router is replaced, and at exit."""
        for pool in self.preconnects().values():
            pool.close()


class Offload(Protocol):
    """The kernel fast path for DIRECT flows (appliance/capture/offload.py:
    `DirectOffload.offer` never blocks and never raises)."""

    def offer(self, fake: IPAddress, domain: str, real: IPAddress, ttl: float) -> None: ...


class Dispatcher:
    """Routes flows by the live router and opens their outbounds.

    `router` is swapped by `replace` (reload); `offload` is set once the
    offload service runs (appliance.offload-direct). `connect_timeout`
    bounds opening a UDP outbound (TCP flows are bounded by their listener).
    Owns the live router: `serve` sweeps its kept proxy connections and
    closes it when Mirage stops.
    """

    def __init__(self, router: Router, *, connect_timeout: float) -> None:
        self.router = router
        self.connect_timeout = connect_timeout
        self.offload: Offload | None = None

    def replace(self, router: Router) -> None:
        """Route new flows by `router` from now on; close the old one's kept
        connections (flows already dialled keep their streams)."""
        old, self.router = self.router, router
        old.close()

    def swap_rules(self, router: Router) -> None:
        """Route new flows by `router`, which shares this router's outbounds
        (`Router.with_env`: a rule-provider or geodata update): nothing is
        closed."""
        self.router = router

    async def connect_tcp(self, flow: Flow) -> trio.abc.Stream:
        """Route a TCP flow (sets `flow.outbound` and `flow.rule`) and
        connect its outbound. Raises OutboundError."""
        router = self.router
        outbound, index, _ = await router.route(flow_context(flow))
        flow.outbound = outbound.name
        flow.chains = chain(outbound)
        flow.by_mode = router.mode != "rule"
        if index is not None:
            flow.rule = router.rules.rules[index]
        token = FLOW_SOURCE.set(flow.src)
        picks: list[str] = []
        picks_token = FLOW_PICKS.set(picks)
        started = time.perf_counter()
        try:
            stream = await outbound.connect_tcp(flow.host, flow.dst_port)
        finally:
            FLOW_SOURCE.reset(token)
            FLOW_PICKS.reset(picks_token)
            connect_seconds(outbound.name).observe(time.perf_counter() - started)
        if picks:
            flow.chains = (*picks, outbound.name)
        # Not in global or direct mode: an offloaded name would stay DIRECT
        # in the kernel after the API switches back to the rules.
        if self.offload is not None and flow.inbound == "tproxy" and flow.domain is not None \
                and not flow.by_mode and router.rules.decided_by_domain(index):
            self._offer_offload(outbound, flow)
        return stream

    def _offer_offload(self, outbound: Outbound, flow: Flow) -> None:
        """A captured DIRECT flow to a fake IP, routed by its name alone:
        the kernel can take the next ones (appliance/capture/offload.py)."""
        if not isinstance(outbound, DirectOutbound):
            return
        assert self.offload is not None and flow.domain is not None and flow.dst is not None
        kept = outbound.dialer.sticky(flow.domain)
        if kept is None:
            return  # TTL 0: every flow resolves again, nothing to pin down
        real, until = kept
        self.offload.offer(flow.dst, flow.domain, real, until - trio.current_time())

    async def open_udp(self, flow: Flow) -> UdpPeer | None:
        """Route a UDP flow (sets `flow.outbound`, `flow.rule`,
        `flow.skipped`) and open its outbound; None: drop its datagrams
        (REJECT). Raises OutboundError, bounded by `connect_timeout`."""
        router = self.router
        outbound, index, flow.skipped = await router.route_udp(flow_context(flow))
        flow.outbound = outbound.name
        flow.chains = chain(outbound)
        flow.by_mode = router.mode != "rule"
        if index is not None:
            flow.rule = router.rules.rules[index]
        host = flow.host
        token = FLOW_SOURCE.set(flow.src)
        picks: list[str] = []
        picks_token = FLOW_PICKS.set(picks)
        try:
            with outbound_deadline(self.connect_timeout,
                                   f"{outbound.name} udp {host}:{flow.dst_port}"):
                peer = await outbound.open_udp(host, flow.dst_port)
        finally:
            FLOW_SOURCE.reset(token)
            FLOW_PICKS.reset(picks_token)
        if picks:
            flow.chains = (*picks, outbound.name)
        return peer

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Close proxy connections kept longer than they may wait
        (appliance/outbound/preconnect.py), whatever the traffic; and all of
        them when Mirage stops."""
        task_status.started()
        try:
            while True:
                await trio.sleep(PRECONNECT_MAX_IDLE / 2)
                for pool in self.router.preconnects().values():
                    pool.sweep()
        finally:
            self.router.close()
