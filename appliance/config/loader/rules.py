"""`rules:` -> typed `Rule`s: each payload parsed once, here."""

from __future__ import annotations

import ipaddress
from typing import Any

from appliance.config.loader.errors import ConfigError, index_path
from appliance.config.loader.scalars import as_domain, as_list, as_nonempty_str, port_from_text
from appliance.config.loader.section import LoadContext
from appliance.config.model import Rule

# Exactly what appliance/rules/engine.py matches (FINAL is read as MATCH).
RULE_TYPES = (
    "DOMAIN", "DOMAIN-SUFFIX", "DOMAIN-KEYWORD", "IP-CIDR", "IP-CIDR6",
    "SRC-IP-CIDR", "DST-PORT", "SRC-PORT", "NETWORK", "MATCH",
)  # fmt: skip
IGNORED_RULE_TYPES = (
    "DOMAIN-REGEX", "DOMAIN-WILDCARD", "GEOSITE", "GEOIP", "SRC-GEOIP",
    "IP-ASN", "SRC-IP-ASN", "IP-SUFFIX", "SRC-IP-SUFFIX",
    "IN-PORT", "IN-USER", "IN-NAME", "IN-TYPE", "PROCESS-NAME",
    "PROCESS-PATH", "PROCESS-NAME-REGEX", "PROCESS-PATH-REGEX",
    "PROCESS-NAME-WILDCARD", "PROCESS-PATH-WILDCARD", "UID",
    "DSCP", "RULE-SET", "AND", "OR", "NOT", "SUB-RULE", "SCRIPT",
    "USER-AGENT", "URL-REGEX", "SRC-IP-CIDR6",
)  # fmt: skip
BUILTIN_TARGETS = ("DIRECT", "REJECT")


def _port_spec(text: str, value: Any, path: str) -> str:
    """`80`, `8000-9000`, or mihomo's `/`-separated list of those."""
    parts = text.split("/")
    out: list[str] = []
    for part in parts:
        lo_text, dash, hi_text = part.strip().partition("-")
        lo = port_from_text(lo_text.strip(), value, path)
        if dash:
            hi = port_from_text(hi_text.strip(), value, path)
            if hi < lo:
                raise ConfigError(path, value, f"port range {lo}-{hi} is backwards")
            out.append(f"{lo}-{hi}")
        else:
            out.append(str(lo))
    return "/".join(out)


def _rule_value(rtype: str, payload: str, value: Any, path: str) -> str:
    if rtype in ("DOMAIN", "DOMAIN-SUFFIX"):
        if rtype == "DOMAIN-SUFFIX" and payload.startswith("."):
            payload = payload[1:]  # Clash writes both `.example.com` and `example.com`
        return as_domain(payload, path, wildcards=False)
    if rtype == "DOMAIN-KEYWORD":
        if not payload or any(c.isspace() for c in payload):
            raise ConfigError(path, value, "keyword must be non-empty without spaces")
        return payload.lower()
    if rtype in ("IP-CIDR", "IP-CIDR6", "SRC-IP-CIDR"):
        try:
            net = ipaddress.ip_network(payload, strict=False)
        except ValueError as exc:
            raise ConfigError(path, value, f"not an IP network ({exc})") from None
        if rtype == "IP-CIDR6" and net.version != 6:
            raise ConfigError(path, value, "IP-CIDR6 needs an IPv6 network (use IP-CIDR)")
        return str(net)
    if rtype in ("DST-PORT", "SRC-PORT"):
        return _port_spec(payload, value, path)
    if rtype == "NETWORK":
        if payload.lower() not in ("tcp", "udp"):
            raise ConfigError(path, value, "NETWORK is tcp or udp")
        return payload.lower()
    raise AssertionError(rtype)


def parse_rules(
    value: Any, path: str, ctx: LoadContext, targets: set[str], skipped: dict[str, str]
) -> list[Rule]:
    rules: list[Rule] = []
    if value is None:
        return rules
    for i, item in enumerate(as_list(value, path)):
        item_path = index_path(path, i)
        line = as_nonempty_str(item, item_path)
        fields = [f.strip() for f in line.split(",")]
        rtype = fields[0].upper()
        if rtype == "FINAL":  # Clash Premium's name for MATCH
            rtype = "MATCH"
        if rtype in IGNORED_RULE_TYPES:
            ctx.ignore(item_path, rtype)
            continue
        if rtype not in RULE_TYPES:
            raise ConfigError(item_path, line, f"unknown rule type {fields[0]!r}")
        if rtype == "MATCH":
            if len(fields) != 2:
                raise ConfigError(item_path, line, "expected MATCH,TARGET")
            payload, target, params = "", fields[1], []
        else:
            if len(fields) < 3:
                raise ConfigError(item_path, line, f"expected {rtype},VALUE,TARGET[,no-resolve]")
            payload, target, params = fields[1], fields[2], fields[3:]
        for param in params:
            if param != "no-resolve":
                raise ConfigError(item_path, line, f"unknown rule option {param!r} (no-resolve)")
        if target not in targets:
            why = skipped.get(target)
            reason = (
                f"target {target!r} is {why}"
                if why
                else f"target {target!r} names no proxy, group, DIRECT or REJECT"
            )
            raise ConfigError(item_path, line, reason)
        normal = "" if rtype == "MATCH" else _rule_value(rtype, payload, line, item_path)
        rules.append(Rule(rtype, normal, target, no_resolve="no-resolve" in params))
        if rtype == "MATCH" and i != len(value) - 1:
            # Rules after MATCH never run; say so rather than silently ignore.
            rest = len(value) - i - 1
            ctx.ignore(f"{index_path(path, i + 1)}..", f"{rest} rule(s) after MATCH never run")
            break
    return rules
