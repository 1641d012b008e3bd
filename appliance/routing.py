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

How it fails: `connect_tcp` and `open_udp` raise OutboundError (the
outbound's, or its deadline); outbounds that cannot be built raise
BuildError (a ValueError) when the router is built.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import trio

from appliance.config.model import Config, IPAddress, Rule
from appliance.flow import Flow
from appliance.metrics import CONNECT_SECONDS
from appliance.outbound.base import Outbound, Resolve, UdpPeer, outbound_deadline
from appliance.outbound.build import BuildError, build_outbounds
from appliance.outbound.direct import DirectOutbound
from appliance.outbound.groups import FLOW_SOURCE, unwrap
from appliance.outbound.preconnect import MAX_IDLE as PRECONNECT_MAX_IDLE
from appliance.outbound.preconnect import Preconnect
from appliance.rules.engine import FlowContext, RuleSet

log = logging.getLogger(__name__)


def flow_context(flow: Flow) -> FlowContext:
    """What the rules see of `flow`; the only place a FlowContext is made
    from a flow. A flow known by name carries no destination address: its
    destination is a fake IP, which says nothing (rules/engine.py)."""
    domain = flow.domain
    return FlowContext(domain, None if domain is not None else flow.dst, flow.dst_port,
                       flow.src, flow.network, flow.src_port)


def chain(outbound: Outbound) -> tuple[str, ...]:
    """The outbounds a flow sent to `outbound` goes through now, the last
    one first (mihomo's `chains`): a group's member in use (`current()`),
    then that one's, up to a proxy. Bounded: a
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

    def __init__(self, rules: Sequence[Rule], outbounds: Mapping[str, Outbound]) -> None:
        self.rules = RuleSet(rules)
        self.outbounds = dict(outbounds)
        self.default = outbounds["DIRECT"]
        targets: list[Outbound] = []
        for i, rule in enumerate(self.rules.rules):
            target = outbounds.get(rule.target)
            if target is None:
                raise BuildError(f"rules[{i}]: target {rule.target!r} is not an outbound")
            targets.append(target)
        # The outbound of each rule, by rule index.
        self.targets = tuple(targets)
        self._tails: dict[int, RuleSet] = {}

    @classmethod
    def from_config(cls, cfg: Config, resolve: Resolve | None, **shared: Any) -> Router:
        """The outbounds `cfg` configures (appliance/outbound/build.py, which
        takes what outlives a router in `shared`: delay history, remembered
        choices, providers' proxies) and its rules."""
        return cls(cfg.rules, build_outbounds(cfg, resolve, **shared))

    def pick(self, ctx: FlowContext) -> tuple[Outbound, int | None]:
        """The outbound for a TCP flow and the index of the rule that chose
        it (None: the default)."""
        i = self.rules.match_index(ctx)
        # PASS (a rule's target, or the member a group chose) means "not
        # this rule": matching goes on after it, as in mihomo.
        while i is not None and unwrap(self.targets[i]).type == "Pass":
            rest = self._tail(i + 1).match_index(ctx)
            i = None if rest is None else i + 1 + rest
        return (self.default if i is None else self.targets[i]), i

    def pick_udp(self, ctx: FlowContext) -> tuple[Outbound, int | None, int]:
        """The outbound for a UDP flow, the index of the rule that chose it
        (None: the default) and how many matching rules were skipped because
        their outbound cannot carry UDP (see the module doc)."""
        index = self.rules.match_index(ctx)
        skipped = 0
        # Each pass moves past one matching rule: bounded by the rule count.
        while index is not None:
            target = self.targets[index]
            if target.carries_udp and unwrap(target).type != "Pass":
                return target, index, skipped
            skipped += 1
            rest = self._tail(index + 1).match_index(ctx)
            index = None if rest is None else index + 1 + rest
        return self.default, None, skipped

    def _tail(self, start: int) -> RuleSet:
        rules = self._tails.get(start)
        if rules is None:
            rules = self._tails[start] = RuleSet(self.rules.rules[start:])
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

    async def connect_tcp(self, flow: Flow) -> trio.abc.Stream:
        """Route a TCP flow (sets `flow.outbound` and `flow.rule`) and
        connect its outbound. Raises OutboundError."""
        router = self.router
        outbound, index = router.pick(flow_context(flow))
        flow.outbound = outbound.name
        flow.chains = chain(outbound)
        if index is not None:
            flow.rule = router.rules.rules[index]
        token = FLOW_SOURCE.set(flow.src)
        started = time.perf_counter()
        try:
            stream = await outbound.connect_tcp(flow.host, flow.dst_port)
        finally:
            FLOW_SOURCE.reset(token)
            CONNECT_SECONDS.labels(outbound.name).observe(time.perf_counter() - started)
        if self.offload is not None and flow.inbound == "tproxy" and flow.domain is not None \
                and router.rules.decided_by_domain(index):
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
        outbound, index, flow.skipped = router.pick_udp(flow_context(flow))
        flow.outbound = outbound.name
        flow.chains = chain(outbound)
        if index is not None:
            flow.rule = router.rules.rules[index]
        host = flow.host
        token = FLOW_SOURCE.set(flow.src)
        try:
            with outbound_deadline(self.connect_timeout,
                                   f"{outbound.name} udp {host}:{flow.dst_port}"):
                return await outbound.open_udp(host, flow.dst_port)
        finally:
            FLOW_SOURCE.reset(token)

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
