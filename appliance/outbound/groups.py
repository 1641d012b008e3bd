"""Proxy groups as mihomo runs them, and the built-in targets that are not
plain outbounds (PASS, REJECT-DROP, COMPATIBLE).

Every group is a `Group`: an outbound whose flows go through one of its
`members`, chosen as its mihomo type says:

- `SelectGroup` (Selector): the member picked with `select(name)` (the
  Clash API's PUT /proxies/{group}); the first until then. GLOBAL, mihomo's
  implicit group of every proxy and group, is one.
- `URLTestGroup` (URLTest): the alive member with the lowest probed delay,
  kept until another is `tolerance` ms faster.
- `FallbackGroup` (Fallback): the first member alive by the last probe
  (or the one picked with `select`, while it is alive); a connect that
  fails moves on to the next member at once.
- `LoadBalanceGroup` (LoadBalance): `consistent-hashing` (by the
  destination's registered domain, so one site stays on one member),
  `round-robin`, or `sticky-sessions` (by source address and destination).
- `RelayGroup` (Relay): a chain; each member reaches the next through the
  one before it (mihomo builds the same dialer-proxy chain).

The interface the control API reads (same names as mihomo's JSON):
`type`, `now` (the member name in use; "" where mihomo shows none),
`all` (member names), `hidden`, `icon`, `health.url`, `selectable` and
`select(name)` (KeyError: no such member; GroupError: the type does not
select), `delay(proxy, url, timeout)` (probe one member now; 0: failed),
`check()` (probe every member, as GET /group/{name}/delay), and the shared
`delays` (`DelayHistory`, per proxy name) for `history`.

Members can change at run time (`set_members`: a proxy provider's refresh
swaps them in one assignment); a group never left without a member is one
whose members are COMPATIBLE, as in mihomo. Groups own nothing but their
choice state; errors are their members' OutboundErrors.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import trio

from appliance.config.model import HealthCheckConfig, IPAddress, MemberFilter, ProxyGroupConfig
from appliance.outbound.base import Outbound, OutboundError, UdpPeer, no_udp
from appliance.outbound.health import DelayHistory, measure

log = logging.getLogger(__name__)

# The source address of the flow being connected, for sticky-sessions load
# balancing; set around `connect_tcp` / `open_udp` by the dispatcher
# (appliance/routing.py), unset (None) for probes and the API.
FLOW_SOURCE: ContextVar[IPAddress | None] = ContextVar("mirage_flow_source", default=None)
# The members the groups of the flow being connected went through, the
# innermost first (each group adds its member once the member connected):
# the flow's `chains` as they really were, which `current()` cannot say for
# load-balance (a member per destination) or a fallback that moved on
# mid-connect. A list set around `connect_tcp` / `open_udp` by the
# dispatcher; None (nothing kept) for probes and the API.
FLOW_PICKS: ContextVar[list[str] | None] = ContextVar("mirage_flow_picks", default=None)


def picked(member: Outbound) -> None:
    """Note that the flow being connected went through `member`."""
    picks = FLOW_PICKS.get()
    if picks is not None:
        picks.append(member.name)


# Probes of one round in flight at once (mihomo's health check batches 10).
PROBE_CONCURRENCY = 10


class GroupError(Exception):
    """An API request a group cannot do (select on a type that does not)."""


# -- built-ins ----------------------------------------------------------------


class CompatibleOutbound:
    """COMPATIBLE: what a group holds when no member is left, and what a rule
    naming a proxy or group Mirage skipped sends its flows to. mihomo's
    Compatible is a Direct under another name (adapter/outbound/direct.go
    NewCompatible; outboundgroup/groupbase.go GetProxies falls back to it),
    so flows go DIRECT through `direct`; without one (a group built on its
    own, as in unit tests) it refuses like REJECT."""

    type = "Compatible"

    def __init__(self, name: str = "COMPATIBLE", direct: Outbound | None = None) -> None:
        self.name = name
        self.direct = direct
        self.carries_udp = direct is not None and direct.carries_udp

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        if self.direct is None:
            await trio.lowlevel.checkpoint()
            raise OutboundError(f"{self.name}: no proxy available")
        return await self.direct.connect_tcp(host, port)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        if self.direct is None:
            return await no_udp(self.name)
        return await self.direct.open_udp(host, port)


class RejectDropOutbound:
    """REJECT-DROP: refuses like REJECT, but only after holding the client
    for `hold` seconds (mihomo drops instead of answering, which slows a
    client that retries at once). UDP datagrams are dropped."""

    type = "RejectDrop"
    carries_udp = True

    def __init__(self, name: str = "REJECT-DROP", hold: float = 5.0) -> None:
        self.name = name
        self.hold = hold

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        await trio.sleep(self.hold)
        raise OutboundError("rejected (dropped)")

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        await trio.lowlevel.checkpoint()
        return None


class PassOutbound:
    """PASS: as a rule's target (or a group's current member) it means "not
    this rule, go on matching". Routing never connects through it; asked
    directly it refuses."""

    type = "Pass"
    carries_udp = False

    def __init__(self, name: str = "PASS") -> None:
        self.name = name

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        raise OutboundError("PASS: not a way out")

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        return await no_udp(self.name)


# -- member lists -------------------------------------------------------------


def filter_members(members: Sequence[Outbound], rules: MemberFilter, *,
                   use_filter: bool = True) -> list[Outbound]:
    """mihomo's GetProxies filters: with `use_filter`, keep the members
    whose name one of `rules.filter` matches (in filter order, each name
    once); then drop the names `exclude_filter` matches and the types in
    `exclude_type`. Regexes search (unanchored), as regexp2's MatchString."""
    out = list(members)
    if use_filter and rules.filter:
        kept: dict[str, Outbound] = {}
        for pattern in rules.filter:
            rx = re.compile(pattern)
            for m in out:
                if m.name not in kept and rx.search(m.name):
                    kept[m.name] = m
        out = list(kept.values())
    if rules.exclude_type:
        excluded = {t.lower() for t in rules.exclude_type}
        out = [m for m in out if m.type.lower() not in excluded]
    if rules.exclude_filter:
        rx = re.compile(rules.exclude_filter)
        out = [m for m in out if not rx.search(m.name)]
    return out


def unwrap(outbound: Outbound) -> Outbound:
    """The outbound a flow would leave through now: a group's current
    member, recursively (mihomo's Unwrap). Bounded: groups form no cycles."""
    seen = 0
    while isinstance(outbound, Group) and seen < 64:
        outbound = outbound.current()
        seen += 1
    return outbound


# -- groups ---------------------------------------------------------------


class Group:
    """What every group shares: members, the probe settings and the shared
    delay history, the failure count that wakes the health check, and the
    control API's interface (see the module doc). Subclasses pick the
    member (`current`) and may override `connect_tcp`."""

    type = ""
    selectable = False

    def __init__(self, name: str, members: Sequence[Outbound], *,
                 health: HealthCheckConfig | None = None,
                 delays: DelayHistory | None = None,
                 hidden: bool = False, icon: str = "", disable_udp: bool = False,
                 compatible: Outbound | None = None) -> None:
        self.name = name
        # What the group holds when it has no member (a provider not yet
        # downloaded, a filter that keeps nothing): the shared COMPATIBLE.
        self.compatible = compatible if compatible is not None else CompatibleOutbound()
        self.health = health if health is not None else HealthCheckConfig()
        self.delays = delays if delays is not None else DelayHistory()
        self.hidden = hidden
        self.icon = icon
        self.disable_udp = disable_udp
        # Told of every choice made with `select` (store-selected keeps it).
        self.on_select: Callable[[str, str], None] | None = None
        # Where the members came from (appliance/outbound/build.py): the
        # entry of `proxy-groups` and the members it names, so that a proxy
        # provider's refresh can compose the members again.
        self.config: ProxyGroupConfig | None = None
        self.static: tuple[Outbound, ...] = ()
        self.members: tuple[Outbound, ...] = ()
        self.set_members(members)
        self._used_at = -float("inf")
        self._failures = 0
        self._failed = trio.Event()

    # -- members

    def set_members(self, members: Sequence[Outbound]) -> None:
        """Replace the members in one assignment (provider refresh); an
        empty list leaves COMPATIBLE, as mihomo does."""
        self.members = tuple(members) or (self.compatible,)

    @property
    def all(self) -> list[str]:
        return [m.name for m in self.members]

    def member(self, name: str) -> Outbound:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    # -- what the API reads

    @property
    def now(self) -> str:
        return self.current().name

    def current(self) -> Outbound:
        """The member the next flow goes through."""
        raise NotImplementedError

    def select(self, name: str) -> None:
        raise GroupError(f"{self.name}: a {self.type} group does not select")

    def _chose(self, name: str) -> None:
        if self.on_select is not None:
            self.on_select(self.name, name)

    async def delay(self, proxy: str, url: str | None = None,
                    limit: float | None = None) -> int:
        """Probe member `proxy` now (KeyError if not a member) with `url`
        (default: the group's) within `limit` seconds (mihomo's `timeout`;
        default: the group's); the delay in ms, 0 if it failed. Recorded in `delays`."""
        member = self.member(proxy)
        return await measure(member, self.delays, url or self.health.url,
                             limit if limit is not None else self.health.timeout,
                             self.health.expected_status)

    async def check(self) -> dict[str, int]:
        """Probe every member at once; {name: delay ms, 0 = failed}."""
        results: dict[str, int] = {}
        health = self.health

        limiter = trio.CapacityLimiter(PROBE_CONCURRENCY)

        async def one(member: Outbound) -> None:
            async with limiter:
                results[member.name] = await measure(member, self.delays, health.url,
                                                     health.timeout, health.expected_status)

        async with trio.open_nursery() as nursery:
            for m in self.members:
                if not isinstance(m, CompatibleOutbound | PassOutbound):
                    nursery.start_soon(one, m)
        self._failures = 0
        return results

    def alive(self, member: Outbound) -> bool:
        return self.delays.alive(member.name, self.health.url)

    # -- health check hooks (appliance/outbound/health.py HealthChecks)

    def touched_since(self, when: float) -> bool:
        return self._used_at > when

    async def wait_failed(self) -> None:
        await self._failed.wait()
        self._failed = trio.Event()

    def _touch(self) -> None:
        self._used_at = trio.current_time()

    def _dial_failed(self, member: Outbound) -> None:
        """mihomo's onDialFailed: `max-failed-times` failures in a row wake
        the health check (built-ins do not count)."""
        if isinstance(member, CompatibleOutbound | PassOutbound):
            return
        self._failures += 1
        if self._failures >= self.health.max_failed_times:
            log.warning("group %s: %d failed connects, checking its members now",
                        self.name, self._failures)
            self._failures = 0
            self._failed.set()

    # -- the outbound

    @property
    def carries_udp(self) -> bool:
        return not self.disable_udp and self.current().carries_udp

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        self._touch()
        member = self.current()
        try:
            stream = await member.connect_tcp(host, port)
        except OutboundError:
            self._dial_failed(member)
            raise
        self._failures = 0
        picked(member)
        return stream

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        if self.disable_udp:
            return await no_udp(self.name)
        self._touch()
        member = self.current()
        peer = await member.open_udp(host, port)
        picked(member)
        return peer


class SelectGroup(Group):
    """Every flow goes through the selected member: the first one until
    `select(name)` picks another."""

    type = "Selector"
    selectable = True

    def __init__(self, name: str, members: Sequence[Outbound], **common: Any) -> None:
        super().__init__(name, members, **common)
        self.selected: Outbound = self.members[0]

    def set_members(self, members: Sequence[Outbound]) -> None:
        super().set_members(members)
        chosen = getattr(self, "selected", None)
        # Keep the choice by name across a member swap; else the first.
        self.selected = next((m for m in self.members if chosen is not None
                              and m.name == chosen.name), self.members[0])

    def current(self) -> Outbound:
        return self.selected

    def select(self, name: str) -> None:
        """Raises KeyError if `name` is not a member."""
        self.selected = self.member(name)
        self._chose(name)


class URLTestGroup(Group):
    """The alive member with the lowest last delay for the group's URL
    (mihomo's fast()): the member in use changes only when it died or
    another is more than `tolerance` ms faster. A member picked with
    `select` is used while it is alive (mihomo's URLTest.Set)."""

    type = "URLTest"
    selectable = True

    def __init__(self, name: str, members: Sequence[Outbound], *, tolerance: int = 0,
                 **common: Any) -> None:
        super().__init__(name, members, **common)
        self.tolerance = tolerance
        self.selected: str | None = None
        self._fast: Outbound | None = None

    def select(self, name: str) -> None:
        self.member(name)
        self.selected = name
        self._chose(name)

    def current(self) -> Outbound:
        url = self.health.url
        if self.selected is not None:
            for m in self.members:
                if m.name == self.selected and self.alive(m):
                    return m
        members = self.members
        fast = members[0]
        best = self.delays.delay(fast.name, url) if self.alive(fast) else 0x10000
        for m in members[1:]:
            if not self.alive(m):
                continue
            d = self.delays.delay(m.name, url)
            if d < best:
                fast, best = m, d
        kept = self._fast
        if (kept is None or kept not in members or not self.alive(kept)
                or self.delays.delay(kept.name, url) > best + self.tolerance):
            self._fast = kept = fast
        return kept


class FallbackGroup(Group):
    """The first member alive by the last probe (or the `select`ed one
    while it is alive). A connect that fails goes on with the next members
    at once (alive ones first, in order): one flow does not wait for the
    next probe. A member that failed a connect counts as down for
    `retry_after` seconds. Raises OutboundError naming every member's
    failure. Owns only the failure memory (trio clock times)."""

    type = "Fallback"
    selectable = True

    def __init__(self, name: str, members: Sequence[Outbound], retry_after: float = 30.0,
                 **common: Any) -> None:
        super().__init__(name, members, **common)
        self.retry_after = retry_after
        self.selected: str | None = None
        self._down_until: dict[str, float] = {}

    def select(self, name: str) -> None:
        self.member(name)
        self.selected = name
        self._chose(name)

    def _up(self, m: Outbound) -> bool:
        down_until = self._down_until.get(m.name)
        return self.alive(m) and (down_until is None or down_until <= trio.current_time())

    def ordered(self) -> list[Outbound]:
        """The members in the order a connect tries them: the selected one
        if up, the members up (config order), then the rest."""
        up = [m for m in self.members if self._up(m)]
        if self.selected is not None:
            chosen = [m for m in up if m.name == self.selected]
            if chosen:
                up = chosen + [m for m in up if m is not chosen[0]]
            else:
                self.selected = None  # mihomo forgets a dead choice
        return up + [m for m in self.members if m not in up]

    def current(self) -> Outbound:
        return self.ordered()[0]

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        self._touch()
        errors: list[str] = []
        for member in self.ordered():
            try:
                stream = await member.connect_tcp(host, port)
            except OutboundError as e:
                self._down_until[member.name] = trio.current_time() + self.retry_after
                self._dial_failed(member)
                errors.append(f"{member.name}: {e.reason}")
                continue
            self._down_until.pop(member.name, None)
            picked(member)
            return stream
        raise OutboundError(f"{self.name}: every member failed ({'; '.join(errors)})")

    @property
    def carries_udp(self) -> bool:
        return not self.disable_udp and any(m.carries_udp for m in self.members)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        """The first member that carries UDP and opens (in `ordered()`;
        UDP failures do not mark a member down)."""
        if self.disable_udp:
            return await no_udp(self.name)
        self._touch()
        errors: list[str] = []
        for member in self.ordered():
            if not member.carries_udp:
                continue
            try:
                peer = await member.open_udp(host, port)
            except OutboundError as e:
                errors.append(f"{member.name}: {e.reason}")
                continue
            picked(member)
            return peer
        raise OutboundError(f"{self.name}: no member opened UDP ({'; '.join(errors)})")


# Two-label public suffixes common enough to matter for keying (co.uk,
# com.cn, ...); without a public suffix list, eTLD+1 is approximated as the
# last two labels, or three under these second-level labels of a
# two-letter country code.
_SECOND_LEVEL = frozenset(("co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go"))


def registered_domain(host: str) -> str:
    """An approximation of the eTLD+1 of `host` (mihomo keys load
    balancing by publicsuffix.EffectiveTLDPlusOne); an IP literal as is."""
    name = host.rstrip(".").lower()
    try:
        ipaddress.ip_address(name.strip("[]"))
        return name
    except ValueError:
        pass
    labels = name.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach's jump consistent hash (as mihomo's jumpHash):
    adding a member moves only 1/n of the keys."""
    b, j = -1, 0
    key &= 0xFFFFFFFFFFFFFFFF
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int(float(b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def stable_hash(text: str) -> int:
    """A 64-bit hash stable across processes (mihomo's maphash is not:
    Mirage keeps a site on the same member across restarts)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class LoadBalanceGroup(Group):
    """Spreads flows over the alive members by `strategy`:
    consistent-hashing keys by the destination's registered domain (an IP
    destination by itself) and tries up to 5 successive keys before the
    first alive member; round-robin takes the next alive member;
    sticky-sessions keys by source address + destination and remembers the
    choice for 10 minutes (1000 keys), as mihomo does."""

    type = "LoadBalance"
    STICKY_TTL = 600.0
    STICKY_SIZE = 1000
    MAX_RETRY = 5

    def __init__(self, name: str, members: Sequence[Outbound], *,
                 strategy: str = "consistent-hashing", **common: Any) -> None:
        super().__init__(name, members, **common)
        self.strategy = strategy
        self._next = 0
        self._sticky: OrderedDict[int, tuple[int, float]] = OrderedDict()

    @property
    def now(self) -> str:
        return ""  # mihomo shows no `now` for load-balance

    def current(self) -> Outbound:
        """The member a flow with no known destination would take; for
        routing's look at the group (PASS) and the API: changes no state."""
        key = stable_hash("")
        return next((m for m in (self.members[jump_hash(key + i, len(self.members))]
                                 for i in range(self.MAX_RETRY)) if self.alive(m)),
                    self.members[0])

    def pick(self, host: str | IPAddress, source: IPAddress | None) -> Outbound:
        members = self.members
        if self.strategy == "round-robin":
            n = len(members)
            for i in range(n):
                m = members[(self._next + i) % n]
                if self.alive(m):
                    self._next = (self._next + i + 1) % n
                    return m
            return members[0]
        key_text = registered_domain(str(host)) if host else ""
        if self.strategy == "sticky-sessions":
            return self._sticky_pick(stable_hash(f"{source or ''}{key_text}"))
        key = stable_hash(key_text)
        for i in range(self.MAX_RETRY):
            m = members[jump_hash(key + i, len(members))]
            if self.alive(m):
                return m
        return next((m for m in members if self.alive(m)), members[0])

    def _sticky_pick(self, key: int) -> Outbound:
        members, now = self.members, trio.current_time()
        kept = self._sticky.get(key)
        index = kept[0] if kept is not None and kept[1] > now and kept[0] < len(members) else None
        for i in range(self.MAX_RETRY):
            candidate = index if (index is not None and i == 0) else jump_hash(
                key + i, len(members))
            if self.alive(members[candidate]):
                self._sticky[key] = (candidate, now + self.STICKY_TTL)
                self._sticky.move_to_end(key)
                while len(self._sticky) > self.STICKY_SIZE:
                    self._sticky.popitem(last=False)
                return members[candidate]
        return members[0]

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        self._touch()
        member = self.pick(host, FLOW_SOURCE.get())
        try:
            stream = await member.connect_tcp(host, port)
        except OutboundError:
            self._dial_failed(member)
            raise
        picked(member)
        return stream

    @property
    def carries_udp(self) -> bool:
        return not self.disable_udp and any(m.carries_udp for m in self.members)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        if self.disable_udp:
            return await no_udp(self.name)
        self._touch()
        member = self.pick(host, FLOW_SOURCE.get())
        peer = await member.open_udp(host, port)
        picked(member)
        return peer


# (proxy, the outbound its server connections go through) -> that proxy
# rebuilt to dial through it; None: the proxy cannot be chained.
Rechain = Callable[[Outbound, Outbound], Outbound | None]


class RelayGroup(Group):
    """A chain: the first member connects to the second's server, which
    connects to the third's, ..., and the last to the destination (mihomo
    turns relay into the same dialer-proxy chain). Groups among the members
    take their current member at connect time; DIRECT members are left out.
    Each hop is the member rebuilt with the previous hop as its `via`
    (`rechain`, from appliance/outbound/build.py), kept per chain.

    UDP where mihomo's Relay.SupportUDP says so (`udp_by_mihomo`), and
    while the last hop rebuilt on the chain carries it: a last hop whose
    UDP rides its own stream (`udp_over_stream`: Trojan, VMess, VLESS)
    sends it through the earlier hops' TCP; a Shadowsocks hop
    (`udp_through_via`) sends its datagrams as a UDP flow of the hop
    before it, which must then carry UDP by the same rule; SOCKS5 and
    HTTP hops end the search (mihomo: their UDP cannot be dialed through
    another proxy). Raises OutboundError (a hop's, or "cannot be
    chained")."""

    type = "Relay"

    def __init__(self, name: str, members: Sequence[Outbound], *, rechain: Rechain,
                 direct: Outbound, **common: Any) -> None:
        super().__init__(name, members, **common)
        self.rechain = rechain
        self.direct = direct
        self._chains: dict[tuple[int, ...], Outbound] = {}

    @property
    def now(self) -> str:
        return ""  # mihomo shows no `now` for relay

    def hops(self) -> list[Outbound]:
        return [h for h in (unwrap(m) for m in self.members) if h.type != "Direct"]

    def current(self) -> Outbound:
        hops = self.hops()
        return hops[-1] if hops else self.direct

    def chain(self) -> Outbound:
        """The last hop, built to reach its server through the others."""
        hops = self.hops()
        if not hops:
            return self.direct
        key = tuple(id(h) for h in hops)
        built = self._chains.get(key)
        if built is None:
            built = hops[0]
            for hop in hops[1:]:
                nxt = self.rechain(hop, built)
                if nxt is None:
                    raise OutboundError(f"{self.name}: {hop.name} ({hop.type}) cannot be chained")
                built = nxt
            if len(self._chains) > 64:
                self._chains.clear()
            self._chains[key] = built
        return built

    def udp_by_mihomo(self) -> bool:
        """mihomo's Relay.SupportUDP over the hops, last first."""
        for hop in reversed(self.hops()):
            if not hop.carries_udp:
                return False
            if getattr(hop, "udp_over_stream", False):
                return True
            if not getattr(hop, "udp_through_via", False):
                return False
        return True

    @property
    def carries_udp(self) -> bool:
        if self.disable_udp or not self.udp_by_mihomo():
            return False
        try:
            return self.chain().carries_udp
        except OutboundError:
            return False

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        self._touch()
        stream = await self.chain().connect_tcp(host, port)
        picked(self.current())
        return stream

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        """The last hop's UDP, its stream through the earlier hops."""
        last = self.chain()
        if self.disable_udp or not self.udp_by_mihomo() or not last.carries_udp:
            return await no_udp(self.name)
        self._touch()
        return await last.open_udp(host, port)


def groups_in(outbounds: dict[str, Outbound]) -> dict[str, Group]:
    """The groups among `outbounds` (a router's), by name, config order."""
    return {name: o for name, o in outbounds.items() if isinstance(o, Group)}
