"""mihomo's DNS policy as decisions, without I/O: which servers a name is
asked of, whether the `fallback` servers' answer replaces `nameserver`'s,
and which names get fake IPs.

mihomo's `dns/resolver.go` (`ipExchange`, `matchPolicy`,
`shouldOnlyQueryFallback`, `shouldIPFallback`) and `config.parseDNS`:

- `nameserver-policy` is tried in config order; the first entry whose
  pattern, geosite list or rule-set holds the name decides, for every
  query type. Consecutive domain-pattern entries form one of mihomo's
  domain tries (`PolicyTrie`), where the most specific pattern wins, not
  the first (`+.a.com` then `b.a.com`: b.a.com takes the second), and a
  pattern given twice keeps its later servers. A name the policy decides
  never reaches `fallback`.
- Otherwise, for A and AAAA only (mihomo's `isIPRequest`), with `fallback`
  configured:
  - a name in `fallback-filter.domain` / `.geosite` is asked of `fallback`
    alone;
  - else `nameserver` is asked first; its answer stands when it is a
    success holding at least one address and none of those addresses is
    filtered (`fallback-filter.geoip`: an address that is not a LAN address
    and not in `geoip-code`'s country; `fallback-filter.ipcidr`: an address
    inside one of the networks). In every other case (an error, NXDOMAIN,
    no address, a filtered address) `fallback`'s answer is the answer,
    whatever it is.
- Other query types go to `nameserver` (or the policy's servers).

`Plan` is the decision for one question; appliance/dns/upstream.py
carries it out. What the sets refer to (geosite lists, rule-providers)
comes in a `RuleEnv`; a list or provider not loaded matches nothing, as a
GEOSITE rule does (appliance/rules/engine.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from appliance.config.model import (
    DnsConfig,
    GeoCode,
    IPAddress,
    Nameserver,
    Rule,
    RuleSetName,
)
from appliance.names import DomainTrie, normalize
from appliance.rules.engine import EMPTY_ENV, FlowContext, RuleEnv, RuleSet

# Query types mihomo's fallback applies to (dnslib's numbers).
_TYPE_A = 1
_TYPE_AAAA = 28

# Go's netip IsPrivate: RFC 1918 and RFC 4193 only (Python's is_private is
# wider: it would count 198.18.0.0/15 or documentation ranges as LAN).
_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
))  # fmt: skip
# mihomo's resolver.IsFakeBroadcastIP: 255.255.255.254 and 255.255.255.255.
_FAKE_BROADCAST = (ipaddress.ip_address("255.255.255.254"),
                   ipaddress.ip_address("255.255.255.255"))


def is_lan(ip: IPAddress) -> bool:
    """mihomo's GEOIP `isLan`: what the geoip fallback filter never flags."""
    return (
        any(ip in net for net in _PRIVATE if net.version == ip.version)
        or ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local
        or ip in _FAKE_BROADCAST
    )


def _set_rule(entry: str) -> Rule | None:
    """`geosite:CODE[@attr...]` / `rule-set:NAME` as the rule that matches
    the same names; None for a domain pattern."""
    kind, _, name = entry.partition(":")
    if kind == "geosite" and name:
        code, *attrs = name.split("@")
        return Rule("GEOSITE", GeoCode(code, tuple(a for a in attrs if a)), "set")
    if kind == "rule-set" and name:
        return Rule("RULE-SET", RuleSetName(name), "set")
    return None


def _by_name(name: str) -> FlowContext:
    return FlowContext(domain=name, dst_ip=None, dst_port=0)


T = TypeVar("T")


class _TrieNode(Generic[T]):
    __slots__ = ("children", "has", "value")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode[T]] = {}
        self.has = False
        self.value: T | None = None


class PolicyTrie(Generic[T]):
    """mihomo's `component/trie` DomainTrie, for nameserver-policy: the
    value of the most specific pattern matching a name. At each label
    (from the top-level domain down) the exact label is tried first, then
    `*` (one label), then `.x` (one or more labels below); the first
    complete match in that order wins. Inserting a pattern again replaces
    its value. Patterns are the loader's (appliance/names.py forms)."""

    def __init__(self) -> None:
        self._root: _TrieNode[T] = _TrieNode()

    def insert(self, pattern: str, value: T) -> None:
        parts = normalize(pattern).split(".")
        if parts[0] == "+":
            self._insert(parts[1:], value)
            parts[0] = ""
        self._insert(parts, value)

    def _insert(self, parts: list[str], value: T) -> None:
        node = self._root
        for part in reversed(parts):
            node = node.children.setdefault(part, _TrieNode())
        node.has, node.value = True, value

    def search(self, name: str) -> T | None:
        parts = normalize(name).split(".")
        if not parts[0] or "" in parts[1:]:
            return None
        # Memo of (node, labels left) that led nowhere: the walk backtracks
        # (exact, then `*`), which without it costs 2^labels on a trie of
        # `*` patterns.
        dead: set[tuple[int, int]] = set()
        found = self._search(self._root, parts, dead)
        return found.value if found is not None and found.has else None

    def _search(self, node: _TrieNode[T], parts: list[str],
                dead: set[tuple[int, int]]) -> _TrieNode[T] | None:
        if not parts:
            return node
        key = (id(node), len(parts))
        if key in dead:
            return None
        for label in (parts[-1], "*"):
            child = node.children.get(label)
            if child is not None:
                found = self._search(child, parts[:-1], dead)
                if found is not None and found.has:
                    return found
        below = node.children.get("")
        if below is None or not below.has:
            dead.add(key)
        return below


class DomainSet:
    """Domain patterns (appliance/names.py), `geosite:` lists and
    `rule-set:` providers as one set of names: fake-ip-filter,
    fallback-filter.domain/geosite, one nameserver-policy entry."""

    def __init__(self, entries: Iterable[str], env: RuleEnv = EMPTY_ENV) -> None:
        patterns: list[str] = []
        rules: list[Rule] = []
        for entry in entries:
            rule = _set_rule(entry)
            if rule is None:
                patterns.append(entry)
            else:
                rules.append(rule)
        self._patterns: DomainTrie[bool] = DomainTrie((p, True) for p in patterns)
        self._sets = RuleSet(rules, env) if rules else None

    def __bool__(self) -> bool:
        return bool(len(self._patterns)) or self._sets is not None

    def matches(self, name: str) -> bool:
        if self._patterns.matches(name):
            return True
        return self._sets is not None and self._sets.match_index(_by_name(name)) is not None


class FakeIpFilter:
    """Which names get a fake IP (`enhanced-mode: fake-ip` is the caller's
    to check): `fake-ip-filter` as a blacklist (listed names resolve for
    real), a whitelist (only listed names get fake IPs), or rules (mihomo's
    `fake-ip-filter-mode: rule`: the first rule matching the name says
    `fake-ip` or `real-ip`; none matching: fake-ip)."""

    def __init__(self, dns: DnsConfig, env: RuleEnv = EMPTY_ENV) -> None:
        self._mode = dns.fake_ip_filter_mode
        self._rules = RuleSet(dns.fake_ip_filter_rules, env) if self._mode == "rule" else None
        self._set = DomainSet(dns.fake_ip_filter, env)

    def wants_fake_ip(self, name: str) -> bool:
        if self._rules is not None:
            rule = self._rules.match(_by_name(name))
            return rule is None or rule.target == "fake-ip"
        return self._set.matches(name) == (self._mode == "whitelist")


@dataclass(frozen=True)
class Plan:
    """How one question is resolved: ask `first`; when `fallback` is set,
    the answer of `first` stands only if `Policy.keeps` says so, else
    `fallback` is asked and its answer is the answer."""

    first: tuple[Nameserver, ...]
    fallback: tuple[Nameserver, ...] = ()
    # What chose `first`, for logs and `mirage resolve`: "policy",
    # "nameserver", "fallback" (fallback-filter.domain/geosite).
    why: str = "nameserver"


class Policy:
    """nameserver-policy, fallback and fallback-filter of one `DnsConfig`
    (see the module docstring). `main` replaces `dns.nameserver` (the
    DIRECT resolver's `direct-nameserver`); `use_policy` False leaves the
    policy out (direct-nameserver without follow-policy); `use_fallback`
    False leaves fallback out (mihomo's proxy-server and direct resolvers
    have none)."""

    def __init__(
        self,
        dns: DnsConfig,
        env: RuleEnv = EMPTY_ENV,
        *,
        main: Sequence[Nameserver] | None = None,
        use_policy: bool = True,
        use_fallback: bool = True,
    ) -> None:
        self._main = tuple(dns.nameserver if main is None else main)
        # In order: a geosite/rule-set set with its servers, or a trie of
        # the consecutive domain patterns (mihomo's NewResolver).
        self._entries: list[DomainSet | PolicyTrie[tuple[Nameserver, ...]]] = []
        self._sets: dict[int, tuple[Nameserver, ...]] = {}
        self._all: set[Nameserver] = set()
        trie: PolicyTrie[tuple[Nameserver, ...]] | None = None
        for entry in dns.nameserver_policy if use_policy else ():
            self._all.update(entry.nameservers)
            if _set_rule(entry.pattern) is None:
                if trie is None:
                    trie = PolicyTrie()
                    self._entries.append(trie)
                trie.insert(entry.pattern, entry.nameservers)
                continue
            trie = None
            names = DomainSet([entry.pattern], env)
            self._sets[id(names)] = entry.nameservers
            self._entries.append(names)
        self._fallback = dns.fallback if use_fallback else ()
        ff = dns.fallback_filter
        self._fallback_names = DomainSet(
            [*ff.domain, *(f"geosite:{code}" for code in ff.geosite)], env)
        self._geoip = ff.geoip_code.lower() if ff.geoip else None
        self._cidrs = ff.ipcidr
        self._geo = env.geo
        if self._geoip is not None and self._geo is not None and self._fallback:
            self._geo.want(self._geoip)

    @property
    def main(self) -> tuple[Nameserver, ...]:
        return self._main

    def servers(self) -> set[Nameserver]:
        """Every nameserver a plan can name."""
        return set(self._main) | set(self._fallback) | self._all

    def policy_for(self, name: str) -> tuple[Nameserver, ...] | None:
        for entry in self._entries:
            if isinstance(entry, PolicyTrie):
                servers = entry.search(name)
                if servers is not None:
                    return servers
            elif entry.matches(name):
                return self._sets[id(entry)]
        return None

    def plan(self, name: str, qtype: int) -> Plan:
        chosen = self.policy_for(name) if name else None
        if chosen is not None:
            return Plan(chosen, why="policy")
        if not self._fallback or qtype not in (_TYPE_A, _TYPE_AAAA):
            return Plan(self._main)
        if name and self._fallback_names.matches(name):
            return Plan(self._fallback, why="fallback")
        return Plan(self._main, self._fallback)

    def filtered(self, ip: IPAddress) -> bool:
        """mihomo's shouldIPFallback: would this answer address send the
        query to `fallback`?"""
        if self._geoip is not None and not is_lan(ip):
            countries = self._geo.countries(ip) if self._geo is not None else ()
            if self._geoip not in countries:
                return True
        return any(ip in net for net in self._cidrs if net.version == ip.version)

    def keeps(self, addresses: Sequence[IPAddress] | None) -> bool:
        """Does `nameserver`'s answer stand? `addresses`: the A/AAAA
        addresses of a successful answer (None: the query failed)."""
        return bool(addresses) and not any(self.filtered(ip) for ip in addresses or ())


def geodata_rules(dns: DnsConfig) -> list[Rule]:
    """The geodata the DNS section uses, as the rules that would use it (so
    appliance/geodata/update.py fetches the same files for both): GEOSITE
    for `geosite:` entries and fallback-filter.geosite, GEOIP for
    fallback-filter.geoip when `fallback` is set."""
    entries = [p.pattern for p in dns.nameserver_policy] + list(dns.fake_ip_filter)
    rules = [r for r in (_set_rule(e) for e in entries) if r is not None and r.type == "GEOSITE"]
    rules += [r for r in dns.fake_ip_filter_rules if r.type == "GEOSITE"]
    if dns.fallback:
        ff = dns.fallback_filter
        rules += [r for r in (_set_rule(f"geosite:{c}") for c in ff.geosite) if r is not None]
        if ff.geoip:
            rules.append(Rule("GEOIP", GeoCode(ff.geoip_code.lower()), "set", no_resolve=True))
    return rules
