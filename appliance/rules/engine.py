"""Rule matching: which rule decides a flow (Clash/mihomo `rules:` semantics).

What this is for: the router asks `RuleSet.match_index(FlowContext)` once
per new flow. Rules are evaluated top-down in config order and the first
match wins, exactly as mihomo does; `MATCH` (alias `FINAL`) matches
everything. Every rule type of mihomo's list is here (appliance/config/
model.py `RuleType`); PROCESS-* never match (a LAN flow has no process on
the gateway). The loader (appliance/config/loader/rules.py) has parsed each
payload into what it is; this module compiles values and never reads rule
text, so building a RuleSet from a loaded config cannot fail. What it needs
besides the rules comes in a `RuleEnv`: the rule-providers' current content
(`ProviderRules`, appliance/rules/provider.py parses it), the geodata
lookups (`GeoLookup`, appliance/geodata/) and the `sub-rules` lists. A
provider or geodata file that is not loaded matches nothing.

Addresses: IP rules match a *real* address the flow has; a fake IP is never
passed (it says nothing about the destination). A flow known by name only
gets an address when a rule needs one (mihomo's `tunnel.match`): rules
before the first rule that would resolve (`first_resolve`: an IP rule
without `no-resolve`/`src`, a RULE-SET of addresses, a logic rule or
SUB-RULE holding one) match by name alone; when none of them matched, the
caller (appliance/routing.py) resolves the name and matches again from
`first_resolve` with the address (`tail`). This module never resolves.

Speed: first-match order is kept without scanning every rule. Each kind of
rule goes into an index answering "the lowest rule number of my kind that
matches this flow, below `best`"; the answer is the minimum over the
indexes. Domains (DOMAIN, DOMAIN-SUFFIX, GEOSITE lists, domain rule-sets:
one dict each for exact names, name-and-below and below-only, whatever rule
or set they came from) cost one dict get per label of the name; CIDRs (IP-
CIDR, ipcidr rule-sets, classical sets' IP-CIDR) one masked dict get per
distinct prefix length; GEOIP and IP-ASN one database lookup and one dict
get. Keywords, regexes, wildcards, ports and the per-flow rules (logic,
SUB-RULE, IN-*, DSCP, UID) are lists in rule order, scanned only up to the
best rule found so far. A classical rule-set is the OR of its lines, so
each line is compiled under the RULE-SET's own rule number.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from appliance.config.model import (
    Asn,
    DomainKeyword,
    DomainName,
    DomainPattern,
    DomainSuffix,
    GeoCode,
    IntRanges,
    IPAddress,
    IpSuffix,
    LogicRules,
    MatchAll,
    NameSet,
    NetworkKind,
    PortSet,
    Rule,
    RuleSetName,
    SubRuleCall,
)

_NONE = 1 << 62  # "no rule": larger than any rule index
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

# Rule types that look at more than where the flow goes (what the DIRECT
# offload must not cache past: `decided_by_domain`).
# IP rules on the destination count as destination rules: a flow known by
# name matches them through the name's own address.
_DESTINATION_TYPES = frozenset({
    "DOMAIN", "DOMAIN-SUFFIX", "DOMAIN-KEYWORD", "DOMAIN-WILDCARD", "DOMAIN-REGEX",
    "GEOSITE", "MATCH", "GEOIP", "IP-ASN", "IP-CIDR", "IP-CIDR6", "IP-SUFFIX",
})  # fmt: skip
_IP_TYPES = frozenset({"GEOIP", "IP-ASN", "IP-CIDR", "IP-CIDR6", "IP-SUFFIX"})


@dataclass(frozen=True, slots=True)
class FlowContext:
    """What the rules may look at for one flow.

    `domain`: the name the client asked for (lower case, no trailing dot), if
    known; `dst_ip`: the real destination address, if known (never a fake
    IP); `src_ip`: the LAN client's address. `in_type` the inbound kind in
    mihomo's words (`TPROXY` for captured flows, `SOCKS5`, `HTTP`...),
    `in_port` the local port it arrived on, `in_user` the proxy-port user,
    `in_name` the listener's name, `dscp` the DSCP bits when known.
    """

    domain: str | None
    dst_ip: IPAddress | None
    dst_port: int
    src_ip: IPAddress | None = None
    network: Literal["tcp", "udp"] = "tcp"
    src_port: int = 0
    in_type: str = ""
    in_port: int = 0
    in_user: str = ""
    in_name: str = ""
    dscp: int | None = None


def normalize_domain(name: str) -> str:
    return name.strip().rstrip(".").lower()


class GeoLookup(Protocol):
    """What GEOIP, IP-ASN and GEOSITE ask (appliance/geodata/Geodata)."""

    def country(self, ip: IPAddress) -> str | None:
        """Lower-case ISO country code (or a geoip.dat list) of `ip`."""
        ...

    def countries(self, ip: IPAddress) -> Iterable[str]:
        """Every code `ip` belongs to (geoip.dat lists overlap); the mmdb
        gives one."""
        ...

    def asn(self, ip: IPAddress) -> int | None: ...

    def want(self, code: str) -> None:
        """A GEOIP rule names list `code`: load it if lists load per name."""
        ...

    def geosite(self, code: str, attrs: tuple[str, ...]) -> Sequence[tuple[str, str]]:
        """The list's entries as (kind, value): kind `full` (exact name),
        `domain` (name and below), `keyword`, `regex`. Empty if unknown."""
        ...


@dataclass(frozen=True)
class ProviderRules:
    """One rule-provider's parsed content (appliance/rules/provider.py).

    `domain` behaviour: mihomo domain patterns (`example.com` exact,
    `+.example.com` name and below, `.example.com` below only, `*` one
    label); `ipcidr`: networks; `classical`: rules without target."""

    behavior: Literal["domain", "ipcidr", "classical"]
    domains: tuple[str, ...] = ()
    networks: tuple[IPNet, ...] = ()
    rules: tuple[Rule, ...] = ()

    def __len__(self) -> int:
        return len(self.domains) + len(self.networks) + len(self.rules)

    def needs_ip(self) -> bool:
        if self.behavior == "ipcidr":
            return bool(self.networks)
        if self.behavior == "classical":
            return any(_rule_needs_ip(r, {}, {}) for r in self.rules)
        return False


@dataclass(frozen=True)
class RuleEnv:
    """What rules refer to beyond their own lines."""

    providers: Mapping[str, ProviderRules] = field(default_factory=dict)
    geo: GeoLookup | None = None
    sub_rules: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)


EMPTY_ENV = RuleEnv()


def _rule_needs_ip(rule: Rule, providers: Mapping[str, ProviderRules],
                   sub_rules: Mapping[str, tuple[Rule, ...]]) -> bool:
    """mihomo's ShouldResolveIP: would this rule resolve a name to match?"""
    if rule.no_resolve:
        return False
    if rule.type in _IP_TYPES:
        return True
    payload = rule.payload
    if isinstance(payload, RuleSetName):
        content = providers.get(payload.name)
        return content is not None and content.needs_ip()
    if isinstance(payload, LogicRules):
        return any(_rule_needs_ip(r, providers, sub_rules) for r in payload.rules)
    if isinstance(payload, SubRuleCall):
        return _rule_needs_ip(payload.condition, providers, sub_rules) or any(
            _rule_needs_ip(r, providers, sub_rules) for r in sub_rules.get(rule.target, ()))
    return False


# --- indexes -------------------------------------------------------------------


class DomainIndex:
    """Lowest rule index whose domain atom matches a name.

    `exact` (DOMAIN, geosite `full`, `x` in a domain set), `suffix` (the name
    and below: DOMAIN-SUFFIX, geosite `domain`, `+.x`), `below` (strictly
    below: `.x`); keywords and patterns (regex, wildcard) as lists in rule
    order."""

    def __init__(self) -> None:
        self.exact: dict[str, int] = {}
        self.suffix: dict[str, int] = {}
        self.below: dict[str, int] = {}
        self.keywords: list[tuple[int, str]] = []
        # Patterns with a required literal of GRAM+ characters are found
        # through it (`grams`: its first GRAM characters -> candidates);
        # the others (`patterns`) are tried in rule order.
        self.patterns: list[tuple[int, re.Pattern[str]]] = []
        self.grams: dict[str, list[tuple[int, str, re.Pattern[str]]]] = {}
        self._sorted = True

    def add_exact(self, name: str, i: int) -> None:
        self.exact.setdefault(name, i)

    def add_suffix(self, name: str, i: int) -> None:
        self.suffix.setdefault(name, i)

    def add_keyword(self, kw: str, i: int) -> None:
        self.keywords.append((i, kw))
        self._sorted = False

    def add_pattern(self, pattern: re.Pattern[str], i: int) -> None:
        literal = required_literal(pattern)
        if literal is not None and len(literal) >= GRAM:
            self.grams.setdefault(literal[:GRAM], []).append((i, literal, pattern))
            return
        self.patterns.append((i, pattern))
        self._sorted = False

    def add_mihomo(self, pattern: str, i: int) -> None:
        """A domain-behaviour entry in mihomo's trie syntax."""
        p = pattern.strip().lower()
        if not p or p.endswith("."):
            return
        if p.startswith("+."):
            self.add_suffix(p[2:], i)
        elif p.startswith(".") and "*" not in p:
            self.below.setdefault(p[1:], i)
        elif "*" in p:
            # `*` is one whole label; `.x` below only
            labels = p.split(".")
            parts = ["[^.]+" if label == "*" else re.escape(label) for label in labels]
            if labels[0] == "":
                parts[0] = ".+"
            self.add_pattern(re.compile("^" + r"\.".join(parts) + "$"), i)
        else:
            self.add_exact(p, i)

    def finish(self) -> None:
        if not self._sorted:
            self.keywords.sort(key=lambda t: t[0])
            self.patterns.sort(key=lambda t: t[0])
            self._sorted = True

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffix or self.below or self.keywords or self.patterns
                    or self.grams)

    def best(self, name: str, best: int) -> int:
        i = self.exact.get(name, _NONE)
        if i < best:
            best = i
        suffix, below = self.suffix, self.below
        if suffix or below:
            # name, then each parent: a.b.c -> b.c -> c
            i = suffix.get(name, _NONE)
            if i < best:
                best = i
            pos = name.find(".") + 1
            while pos:
                parent = name[pos:]
                i = suffix.get(parent, _NONE)
                if i < best:
                    best = i
                i = below.get(parent, _NONE)
                if i < best:
                    best = i
                pos = name.find(".", pos) + 1
        for i, kw in self.keywords:
            if i >= best:
                break
            if kw in name:
                best = i
                break
        for i, pat in self.patterns:
            if i >= best:
                break
            if pat.search(name):
                best = i
                break
        grams = self.grams
        if grams:
            for start in range(len(name) - GRAM + 1):
                candidates = grams.get(name[start:start + GRAM])
                if candidates is None:
                    continue
                for i, literal, pat in candidates:
                    if i < best and literal in name and pat.search(name):
                        best = i
        return best


# Length of the literal prefix that indexes a pattern (see DomainIndex).
GRAM = 4


def required_literal(pattern: re.Pattern[str]) -> str | None:
    """The longest run of plain characters every match of `pattern` must
    contain (lower case), from the pattern's top-level sequence; None when
    there is none (a top-level alternation, classes only, ...). Used only
    as a filter: the pattern itself still decides."""
    try:
        parsed = re._parser.parse(pattern.pattern, pattern.flags)  # type: ignore[attr-defined]
    except Exception:  # the private parser changed: no filter, still correct
        return None
    best, run = "", []
    literal = re._constants.LITERAL  # type: ignore[attr-defined]
    for op, arg in parsed:
        if op is literal:
            run.append(chr(arg))
            continue
        if len(run) > len(best):
            best = "".join(run)
        run = []
    if len(run) > len(best):
        best = "".join(run)
    return best.lower() or None


class CidrIndex:
    """Lowest rule index whose network contains an address. One dict per
    (family, prefix length): a lookup costs one mask and one dict get per
    distinct length (at most 33 for IPv4, 129 for IPv6)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, int], dict[int, int]] = {}
        self._lengths: dict[int, list[tuple[int, dict[int, int]]]] = {4: [], 6: []}

    def add(self, net: IPNet, index: int) -> None:
        key = (net.version, net.prefixlen)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = {}
            bits = 32 if net.version == 4 else 128
            mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
            self._lengths[net.version].append((mask, table))
        table.setdefault(int(net.network_address), index)

    def __bool__(self) -> bool:
        return bool(self._tables)

    def best(self, ip: IPAddress, best: int) -> int:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # A v4 peer seen on a dual-stack socket: v4 rules apply to it.
            best = self.best(ip.ipv4_mapped, best)
        value = int(ip)
        for mask, table in self._lengths[ip.version]:
            i = table.get(value & mask, _NONE)
            if i < best:
                best = i
        return best


class SuffixBitsIndex:
    """IP-SUFFIX: lowest rule index whose last `bits` bits equal the
    address's (one dict per (family, bits))."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, int], dict[int, int]] = {}

    def add(self, s: IpSuffix, index: int) -> None:
        table = self._tables.setdefault((s.address.version, s.bits), {})
        table.setdefault(int(s.address) & ((1 << s.bits) - 1), index)

    def __bool__(self) -> bool:
        return bool(self._tables)

    def best(self, ip: IPAddress, best: int) -> int:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        for (version, bits), table in self._tables.items():
            if version == ip.version:
                i = table.get(value & ((1 << bits) - 1), _NONE)
                if i < best:
                    best = i
        return best


_LAN_CODES = ("lan", "private")


def is_lan(ip: IPAddress) -> bool:
    """mihomo's GEOIP,LAN: private, loopback, link-local, unspecified,
    multicast."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified \
        or ip.is_multicast


@dataclass
class _AddressSide:
    """The address indexes of one side of the flow (destination or client)."""

    cidr: CidrIndex = field(default_factory=CidrIndex)
    suffix: SuffixBitsIndex = field(default_factory=SuffixBitsIndex)
    geo: dict[str, int] = field(default_factory=dict)
    asn: dict[int, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.cidr or self.suffix or self.geo or self.asn)

    def best(self, ip: IPAddress, best: int, geo: GeoLookup | None) -> int:
        if self.cidr:
            best = self.cidr.best(ip, best)
        if self.suffix:
            best = self.suffix.best(ip, best)
        if self.geo:
            for code in _LAN_CODES:
                if code in self.geo and is_lan(ip):
                    best = min(best, self.geo[code])
            if geo is not None:
                for code in geo.countries(ip):
                    i = self.geo.get(code, _NONE)
                    if i < best:
                        best = i
        if self.asn and geo is not None:
            number = geo.asn(ip)
            if number is not None:
                best = min(best, self.asn.get(number, _NONE))
        return best


Predicate = Callable[[FlowContext], bool]


class RuleSet:
    """Compiled, immutable rules. Build once per config (re)load and per
    rule-provider update; `match_index` is safe to call from any task.
    Never fails: every payload was parsed and checked by the loader."""

    def __init__(self, rules: Sequence[Rule], env: RuleEnv = EMPTY_ENV) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.env = env
        self._domains = DomainIndex()
        self._dst = _AddressSide()
        self._src = _AddressSide()
        self._dst_ports: list[tuple[int, int, int]] = []  # (index, lo, hi)
        self._src_ports: list[tuple[int, int, int]] = []
        self._in_ports: list[tuple[int, int, int]] = []
        self._network: dict[str, int] = {}
        self._predicates: list[tuple[int, Predicate]] = []
        self._match = _NONE
        # The first rule that looks at more than the destination's name.
        self._first_per_flow = _NONE
        # The first rule that would resolve a name to match (see module doc).
        self.first_resolve: int | None = None
        self._sub_sets: dict[str, RuleSet] = {}
        # "The rules from i on", for PASS-RULE in a sub-rules list (target).
        self._tails: dict[int, RuleSet] = {}
        for i, rule in enumerate(self.rules):
            self._add(i, rule, rule.src)
            if not self._destination_only(rule):
                self._first_per_flow = min(self._first_per_flow, i)
            if self.first_resolve is None and _rule_needs_ip(rule, env.providers,
                                                             env.sub_rules):
                self.first_resolve = i
        self._domains.finish()
        self._predicates.sort(key=lambda t: t[0])
        for ports in (self._dst_ports, self._src_ports, self._in_ports):
            ports.sort(key=lambda t: t[0])

    def _destination_only(self, rule: Rule) -> bool:
        """Whether `rule` looks only at where the flow goes (its name, or
        the name's address), not at the client, ports, transport or inbound."""
        if rule.src:
            return False
        if not isinstance(rule.payload, RuleSetName):
            return rule.type in _DESTINATION_TYPES
        content = self.env.providers.get(rule.payload.name)
        if content is None or content.behavior != "classical":
            return True
        return all(not r.src and r.type in _DESTINATION_TYPES for r in content.rules)

    # --- compiling ----------------------------------------------------------

    def _add(self, i: int, rule: Rule, src: bool) -> None:
        payload = rule.payload
        side = self._src if src else self._dst
        t = rule.type
        if isinstance(payload, MatchAll):
            self._match = min(self._match, i)
        elif isinstance(payload, DomainName):
            self._domains.add_exact(payload.name, i)
        elif isinstance(payload, DomainSuffix):
            self._domains.add_suffix(payload.suffix, i)
        elif isinstance(payload, DomainKeyword):
            self._domains.add_keyword(payload.keyword, i)
        elif isinstance(payload, DomainPattern):
            if t == "DOMAIN-REGEX":
                self._domains.add_pattern(re.compile(payload.pattern, re.IGNORECASE), i)
            else:
                self._domains.add_pattern(_wildcard(payload.pattern), i)
        elif isinstance(payload, GeoCode):
            if t == "GEOSITE":
                self._add_geosite(payload, i)
            else:
                side.geo.setdefault(payload.code, i)
                if self.env.geo is not None:
                    self.env.geo.want(payload.code)
        elif isinstance(payload, Asn):
            side.asn.setdefault(payload.number, i)
        elif isinstance(payload, IpSuffix):
            side.suffix.add(payload, i)
        elif isinstance(payload, ipaddress.IPv4Network | ipaddress.IPv6Network):
            side.cidr.add(payload, i)
        elif isinstance(payload, PortSet):
            ports = {"SRC-PORT": self._src_ports, "IN-PORT": self._in_ports}.get(
                t, self._dst_ports)
            ports.extend((i, lo, hi) for lo, hi in payload.ranges)
        elif isinstance(payload, NetworkKind):
            self._network.setdefault(payload.name, i)
        elif isinstance(payload, RuleSetName):
            self._add_provider(payload.name, i, src)
        elif isinstance(payload, NameSet | IntRanges | LogicRules | SubRuleCall):
            self._predicates.append((i, self._predicate(rule)))
        # ProcessMatch: never matches a LAN flow; nothing to index.

    def _add_geosite(self, code: GeoCode, i: int) -> None:
        geo = self.env.geo
        if geo is None:
            return
        for kind, value in geo.geosite(code.code, code.attrs):
            if kind == "full":
                self._domains.add_exact(value, i)
            elif kind == "domain":
                self._domains.add_suffix(value, i)
            elif kind == "keyword":
                self._domains.add_keyword(value, i)
            else:
                try:
                    self._domains.add_pattern(re.compile(value, re.IGNORECASE), i)
                except re.error:
                    continue  # a Go-only construct: mihomo would fail the whole list

    def _add_provider(self, name: str, i: int, src: bool) -> None:
        content = self.env.providers.get(name)
        if content is None:
            return
        for pattern in content.domains:
            self._domains.add_mihomo(pattern, i)
        side = self._src if src else self._dst
        for net in content.networks:
            side.cidr.add(net, i)
        for rule in content.rules:
            self._add(i, rule, src or rule.src)

    def _predicate(self, rule: Rule) -> Predicate:
        payload = rule.payload
        t = rule.type
        if isinstance(payload, NameSet):
            names = frozenset(payload.names)
            if t == "IN-TYPE":
                return lambda c: c.in_type in names
            if t == "IN-USER":
                return lambda c: c.in_user in names
            return lambda c: c.in_name in names
        if isinstance(payload, IntRanges):
            ranges = payload.ranges
            if t == "DSCP":
                return lambda c: c.dscp is not None and any(lo <= c.dscp <= hi
                                                            for lo, hi in ranges)
            return lambda c: False  # UID: LAN flows have no local user
        if isinstance(payload, LogicRules):
            parts = [RuleSet([r], self.env) for r in payload.rules]
            if t == "AND":
                return lambda c: all(p.match_index(c) is not None for p in parts)
            if t == "OR":
                return lambda c: any(p.match_index(c) is not None for p in parts)
            only = parts[0]
            return lambda c: only.match_index(c) is None
        assert isinstance(payload, SubRuleCall)
        condition = RuleSet([payload.condition], self.env)
        name = rule.target
        return lambda c: condition.match_index(c) is not None and \
            self.sub_set(name).match_index(c) is not None

    def sub_set(self, name: str) -> RuleSet:
        """The compiled `sub-rules` list `name` (compiled on first use)."""
        sub = self._sub_sets.get(name)
        if sub is None:
            sub = self._sub_sets[name] = RuleSet(self.env.sub_rules.get(name, ()), self.env)
        return sub

    # --- matching -----------------------------------------------------------

    def match_index(self, ctx: FlowContext) -> int | None:
        """Index of the first rule matching `ctx`, or None."""
        best = self._match
        if ctx.domain and self._domains:
            best = self._domains.best(normalize_domain(ctx.domain), best)
        if ctx.dst_ip is not None and self._dst:
            best = self._dst.best(ctx.dst_ip, best, self.env.geo)
        if ctx.src_ip is not None and self._src:
            best = self._src.best(ctx.src_ip, best, self.env.geo)
        best = _scan_ports(self._dst_ports, ctx.dst_port, best)
        best = _scan_ports(self._src_ports, ctx.src_port, best)
        best = _scan_ports(self._in_ports, ctx.in_port, best)
        best = min(best, self._network.get(ctx.network, _NONE))
        for i, predicate in self._predicates:
            if i >= best:
                break
            if predicate(ctx):
                best = i
                break
        return None if best == _NONE else best

    def match_after(self, ctx: FlowContext, start: int) -> int | None:
        """Index of the first rule from `start` on matching `ctx`, or None."""
        if start == 0:
            return self.match_index(ctx)
        tail = self._tails.get(start)
        if tail is None:
            tail = self._tails[start] = RuleSet(self.rules[start:], self.env)
        found = tail.match_index(ctx)
        return None if found is None else start + found

    def target(self, index: int, ctx: FlowContext,
               passes_in_list: Callable[[str], bool] | None = None) -> tuple[str, Rule]:
        """The outbound name rule `index` sends `ctx` to, and the rule that
        named it (a SUB-RULE hands over to its list: the first matching
        rule there, recursively).

        `passes_in_list(name)`: whether that outbound now means PASS-RULE
        (mihomo: inside a sub-rules list, skip this rule and go on in the
        same list, where PASS leaves the list). A list with nothing left
        that matches gives "PASS": its SUB-RULE did not match after all,
        and the main rules go on."""
        rule = self.rules[index]
        while rule.type == "SUB-RULE":
            sub = self.sub_set(rule.target)
            j = sub.match_index(ctx)
            assert j is not None  # the SUB-RULE matched only if its list did
            rule = sub.rules[j]
            while passes_in_list is not None and rule.type != "SUB-RULE" \
                    and passes_in_list(rule.target):
                found = sub.match_after(ctx, j + 1)
                if found is None:
                    return "PASS", rule
                j, rule = found, sub.rules[found]
        return rule.target, rule

    def decided_by_domain(self, index: int | None) -> bool:
        """Would every flow to this domain get the same decision as the one
        that matched rule `index` (None: no rule, the default)? True when no
        rule up to and including it looks at anything but the name (ports,
        addresses, the client, the transport, the inbound): then the name
        alone decided. What the DIRECT offload relies on."""
        if index is None:
            return self._first_per_flow == _NONE
        return index < self._first_per_flow

    def match(self, ctx: FlowContext) -> Rule | None:
        """The first rule matching `ctx`, or None (the caller's default)."""
        i = self.match_index(ctx)
        return None if i is None else self.rules[i]


def _wildcard(pattern: str) -> re.Pattern[str]:
    """DOMAIN-WILDCARD: `*` any run of characters, `?` one, whole name."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.IGNORECASE | re.DOTALL)


def _scan_ports(ranges: list[tuple[int, int, int]], port: int, best: int) -> int:
    for i, lo, hi in ranges:
        if i >= best:
            break  # kept in rule order
        if lo <= port <= hi:
            return i
    return best
