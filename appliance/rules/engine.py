"""Rule matching: which outbound a flow takes (Clash `rules:` semantics).

What this is for: the gateway asks `RuleSet.match(FlowContext)` once per new
flow. Rules are evaluated top-down in config order and the first match wins,
exactly as Clash/mihomo do; `MATCH` (alias `FINAL`) matches everything.

Supported types: DOMAIN, DOMAIN-SUFFIX, DOMAIN-KEYWORD, IP-CIDR, IP-CIDR6,
SRC-IP-CIDR, DST-PORT, SRC-PORT, NETWORK, MATCH (`RuleType`). The loader
(appliance/config/loader/rules.py) has parsed each payload into what it is
(a name, a suffix, a keyword, an IP network, a port set, a network kind);
this module compiles those values and never reads or re-checks text, so
building a RuleSet from a loaded config cannot fail.

No resolution here, ever: domain rules match the name the flow carries (from
the fake-IP table), and IP rules match only a *real* destination address the
flow already has. A flow that only has a domain never matches an IP-CIDR rule,
i.e. every IP rule behaves as if it had `no-resolve` (the flag is accepted and
has no further effect). Resolving here would ask DNS on the gateway for every
rule-miss -- the very lookup fake IPs exist to avoid. Callers must not pass a
fake IP as `dst_ip`: it says nothing about the destination.

Speed: first-match order is kept without scanning all rules. Each kind of
rule goes into an index that answers "the lowest rule number of my kind that
matches this flow"; the answer is the minimum over the indexes. Domains are
O(labels) dict lookups (exact names and suffixes), CIDRs one dict lookup per
distinct prefix length, keywords and ports a scan that stops at the current
best rule number. Matching 10k rules costs microseconds (tests/unit/test_rules.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from appliance.config.model import (
    DomainKeyword,
    DomainName,
    DomainSuffix,
    IPAddress,
    MatchAll,
    NetworkKind,
    PortSet,
    Rule,
    RuleType,
)

_NONE = 1 << 62  # "no rule": larger than any rule index

# Rule types whose match depends on the flow, not only on where it goes.
_PER_FLOW_TYPES: frozenset[RuleType] = frozenset({"DST-PORT", "SRC-PORT", "SRC-IP-CIDR", "NETWORK"})


@dataclass(frozen=True, slots=True)
class FlowContext:
    """What the rules may look at for one flow.

    `domain`: the name the client asked for (lower case, no trailing dot), if
    known; `dst_ip`: the real destination address, if known (never a fake
    IP); `src_ip`: the LAN client's address.
    """

    domain: str | None
    dst_ip: IPAddress | None
    dst_port: int
    src_ip: IPAddress | None = None
    network: Literal["tcp", "udp"] = "tcp"
    src_port: int = 0


def normalize_domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


class _CidrIndex:
    """Lowest rule index whose network contains an address. One dict per
    (family, prefix length): lookups cost one mask + one dict get per length."""

    def __init__(self) -> None:
        # (version, prefixlen) -> {network int -> min rule index}
        self._tables: dict[tuple[int, int], dict[int, int]] = {}
        self._lengths: dict[int, list[tuple[int, int, dict[int, int]]]] = {4: [], 6: []}

    def add(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, index: int) -> None:
        key = (net.version, net.prefixlen)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = {}
            bits = 32 if net.version == 4 else 128
            mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
            self._lengths[net.version].append((net.prefixlen, mask, table))
        table.setdefault(int(net.network_address), index)

    def best(self, ip: IPAddress, below: int) -> int:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # A v4 peer seen on a dual-stack socket: v4 rules apply to it.
            best = self.best(ip.ipv4_mapped, below)
            below = min(below, best)
        else:
            best = _NONE
        value = int(ip)
        for _, mask, table in self._lengths[ip.version]:
            i = table.get(value & mask, _NONE)
            if i < below:
                best = below = i
        return best


class RuleSet:
    """Compiled, immutable rules. Build once per config (re)load; `match`
    is safe to call from any task. Never fails: every payload was parsed
    and checked by the loader."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._exact: dict[str, int] = {}
        self._suffix: dict[str, int] = {}
        self._keywords: list[tuple[int, str]] = []
        self._dst = _CidrIndex()
        self._src = _CidrIndex()
        self._dst_ports: list[tuple[int, int, int]] = []  # (index, lo, hi)
        self._src_ports: list[tuple[int, int, int]] = []
        self._network: dict[str, int] = {}
        self._match = _NONE
        # The first rule that looks at more than the destination: its port,
        # the client, or the transport (see `decided_by_domain`).
        self._first_per_flow = _NONE
        for i, rule in enumerate(self.rules):
            self._add(i, rule)
            if rule.type in _PER_FLOW_TYPES:
                self._first_per_flow = min(self._first_per_flow, i)
        self._has_dst_cidr = bool(self._dst._tables)
        self._has_src_cidr = bool(self._src._tables)

    def _add(self, i: int, rule: Rule) -> None:
        payload = rule.payload
        if isinstance(payload, MatchAll):
            self._match = min(self._match, i)
        elif isinstance(payload, DomainName):
            self._exact.setdefault(payload.name, i)
        elif isinstance(payload, DomainSuffix):
            self._suffix.setdefault(payload.suffix, i)
        elif isinstance(payload, DomainKeyword):
            self._keywords.append((i, payload.keyword))
        elif isinstance(payload, PortSet):
            ports = self._src_ports if rule.type == "SRC-PORT" else self._dst_ports
            ports.extend((i, lo, hi) for lo, hi in payload.ranges)
        elif isinstance(payload, NetworkKind):
            self._network.setdefault(payload.name, i)
        else:  # an IP network: IP-CIDR, IP-CIDR6 or SRC-IP-CIDR
            (self._src if rule.type == "SRC-IP-CIDR" else self._dst).add(payload, i)

    def match_index(self, ctx: FlowContext) -> int | None:
        """Index of the first rule matching `ctx`, or None."""
        best = self._match
        if ctx.domain:
            best = self._match_domain(normalize_domain(ctx.domain), best)
        if ctx.dst_ip is not None and self._has_dst_cidr:
            best = min(best, self._dst.best(ctx.dst_ip, best))
        if ctx.src_ip is not None and self._has_src_cidr:
            best = min(best, self._src.best(ctx.src_ip, best))
        best = _scan_ports(self._dst_ports, ctx.dst_port, best)
        best = _scan_ports(self._src_ports, ctx.src_port, best)
        best = min(best, self._network.get(ctx.network, _NONE))
        return None if best == _NONE else best

    def decided_by_domain(self, index: int | None) -> bool:
        """Would every flow to this domain get the same decision as the one
        that matched rule `index` (None: no rule, the default)? True when no
        rule up to and including it looks at ports, the client's address or
        the transport: then the name alone decided (IP rules never match a
        flow that has only a name). What the DIRECT offload relies on."""
        if index is None:
            return self._first_per_flow == _NONE
        return index < self._first_per_flow

    def match(self, ctx: FlowContext) -> Rule | None:
        """The first rule matching `ctx`, or None (the caller's default)."""
        i = self.match_index(ctx)
        return None if i is None else self.rules[i]

    def _match_domain(self, name: str, best: int) -> int:
        best = min(best, self._exact.get(name, _NONE))
        if self._suffix:
            # name, then each parent: a.b.c -> b.c -> c
            suffix = self._suffix
            pos = 0
            while True:
                i = suffix.get(name[pos:] if pos else name, _NONE)
                if i < best:
                    best = i
                pos = name.find(".", pos) + 1
                if pos == 0:
                    break
        for i, kw in self._keywords:
            if i >= best:
                break  # appended in rule order
            if kw in name:
                best = i
                break
        return best


def _scan_ports(ranges: list[tuple[int, int, int]], port: int, best: int) -> int:
    for i, lo, hi in ranges:
        if i >= best:
            break  # appended in rule order
        if lo <= port <= hi:
            return i
    return best
