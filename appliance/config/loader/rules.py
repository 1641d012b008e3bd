"""`rules:` -> typed `Rule`s: each payload parsed once, here, into what it is
(a `DomainName`, `DomainSuffix`, `DomainKeyword`, IP network, `PortSet`,
`NetworkKind` or `MatchAll`), so the rule engine compiles values and never
reads text. A bad payload is a ConfigError at `rules[i]` with the line.

Rule types mihomo has and Mirage does not (GEOIP, RULE-SET, PROCESS-NAME,
...) are reported ignored; rules after MATCH never run and are reported too.
"""

from __future__ import annotations

import ipaddress
from typing import Any, get_args

from appliance.config.loader.errors import ConfigError, index_path
from appliance.config.loader.scalars import as_domain, as_list, as_nonempty_str, port_from_text
from appliance.config.loader.section import LoadContext
from appliance.config.model import (
    DomainKeyword,
    DomainName,
    DomainSuffix,
    MatchAll,
    NetworkKind,
    PortSet,
    Rule,
    RulePayload,
    RuleType,
)

# Exactly what appliance/rules/engine.py matches (FINAL is read as MATCH).
RULE_TYPES: tuple[RuleType, ...] = get_args(RuleType)
IGNORED_RULE_TYPES = (
    "DOMAIN-REGEX", "DOMAIN-WILDCARD", "GEOSITE", "GEOIP", "SRC-GEOIP",
    "IP-ASN", "SRC-IP-ASN", "IP-SUFFIX", "SRC-IP-SUFFIX",
    "IN-PORT", "IN-USER", "IN-NAME", "IN-TYPE", "PROCESS-NAME",
    "PROCESS-PATH", "PROCESS-NAME-REGEX", "PROCESS-PATH-REGEX",
    "PROCESS-NAME-WILDCARD", "PROCESS-PATH-WILDCARD", "UID",
    "DSCP", "RULE-SET", "AND", "OR", "NOT", "SUB-RULE", "SCRIPT",
    "USER-AGENT", "URL-REGEX", "SRC-IP-CIDR6",
)  # fmt: skip


def parse_rules(
    value: Any, path: str, ctx: LoadContext, targets: set[str], skipped: dict[str, str]
) -> list[Rule]:
    """The `rules:` list. `targets` are the names a rule may send flows to;
    `skipped` says why a proxy or group a rule names was left out."""
    rules: list[Rule] = []
    if value is None:
        return rules
    for i, item in enumerate(as_list(value, path)):
        item_path = index_path(path, i)
        line = as_nonempty_str(item, item_path)
        fields = [f.strip() for f in line.split(",")]
        rtype = _rule_type(fields[0])
        if rtype in IGNORED_RULE_TYPES:
            ctx.ignore(item_path, rtype)
            continue
        rule = _parse_line(rtype, fields, line, item_path, (targets, skipped))
        rules.append(rule)
        if rule.type == "MATCH" and i != len(value) - 1:
            # Rules after MATCH never run; say so rather than silently ignore.
            rest = len(value) - i - 1
            ctx.ignore(f"{index_path(path, i + 1)}..", f"{rest} rule(s) after MATCH never run")
            break
    return rules


def parse_rule(line: str, path: str = "rule") -> Rule:
    """One rule line, validated as the loader validates `rules[i]`, except
    that the target is taken as it is (whether it names an outbound depends
    on the rest of a profile). For code and tests that build a `Config`
    without a profile. Raises ConfigError at `path`, also for a type Mirage
    does not implement (the loader would report it ignored)."""
    fields = [f.strip() for f in line.split(",")]
    rtype = _rule_type(fields[0])
    if rtype in IGNORED_RULE_TYPES:
        raise ConfigError(path, line, f"{rtype} rules are not implemented by Mirage")
    return _parse_line(rtype, fields, line, path, None)


def _rule_type(text: str) -> str:
    rtype = text.upper()
    return "MATCH" if rtype == "FINAL" else rtype  # Clash Premium's name for MATCH


def _parse_line(
    rtype: str,
    fields: list[str],
    line: str,
    path: str,
    known: tuple[set[str], dict[str, str]] | None,
) -> Rule:
    """`known`: (targets, skipped) as for `parse_rules`; None takes any target."""
    if rtype not in RULE_TYPES:
        raise ConfigError(path, line, f"unknown rule type {fields[0]!r}")
    kind = rtype  # narrowed to RuleType by the membership test
    if kind == "MATCH":
        if len(fields) != 2:
            raise ConfigError(path, line, "expected MATCH,TARGET")
        payload, target, params = "", fields[1], []
    else:
        if len(fields) < 3:
            raise ConfigError(path, line, f"expected {kind},VALUE,TARGET[,no-resolve]")
        payload, target, params = fields[1], fields[2], fields[3:]
    for param in params:
        if param != "no-resolve":
            raise ConfigError(path, line, f"unknown rule option {param!r} (no-resolve)")
    if known is not None:
        _check_target(target, line, path, *known)
    typed = _payload(kind, payload, line, path)
    return Rule(kind, typed, target, no_resolve="no-resolve" in params)


def _check_target(
    target: str, line: str, path: str, targets: set[str], skipped: dict[str, str]
) -> None:
    if target in targets:
        return
    why = skipped.get(target)
    reason = (
        f"target {target!r} is {why}"
        if why
        else f"target {target!r} names no proxy, group, DIRECT or REJECT"
    )
    raise ConfigError(path, line, reason)


def _payload(rtype: RuleType, payload: str, line: str, path: str) -> RulePayload:
    if rtype == "MATCH":
        return MatchAll()
    if rtype == "DOMAIN":
        return DomainName(as_domain(payload, path, wildcards=False))
    if rtype == "DOMAIN-SUFFIX":
        # Clash writes both `.example.com` and `example.com`: the name itself
        # and everything below it, either way.
        return DomainSuffix(as_domain(payload.removeprefix("."), path, wildcards=False))
    if rtype == "DOMAIN-KEYWORD":
        if not payload or any(c.isspace() for c in payload):
            raise ConfigError(path, line, "keyword must be non-empty without spaces")
        return DomainKeyword(payload.lower())
    if rtype in ("IP-CIDR", "IP-CIDR6", "SRC-IP-CIDR"):
        try:
            net = ipaddress.ip_network(payload, strict=False)
        except ValueError as exc:
            raise ConfigError(path, line, f"not an IP network ({exc})") from None
        if rtype == "IP-CIDR6" and net.version != 6:
            raise ConfigError(path, line, "IP-CIDR6 needs an IPv6 network (use IP-CIDR)")
        return net
    if rtype in ("DST-PORT", "SRC-PORT"):
        return _port_set(payload, line, path)
    if rtype == "NETWORK":
        kind = payload.lower()
        if kind == "tcp":
            return NetworkKind("tcp")
        if kind == "udp":
            return NetworkKind("udp")
        raise ConfigError(path, line, "NETWORK is tcp or udp")
    raise AssertionError(rtype)


def _port_set(text: str, value: Any, path: str) -> PortSet:
    """`80`, `8000-9000`, or mihomo's `/`-separated list of those."""
    ranges: list[tuple[int, int]] = []
    for part in text.split("/"):
        lo_text, dash, hi_text = part.strip().partition("-")
        lo = port_from_text(lo_text.strip(), value, path)
        hi = lo
        if dash:
            hi = port_from_text(hi_text.strip(), value, path)
            if hi < lo:
                raise ConfigError(path, value, f"port range {lo}-{hi} is backwards")
        ranges.append((lo, hi))
    return PortSet(tuple(ranges))
