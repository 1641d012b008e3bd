"""`rules:`, `sub-rules:`, `rule-providers:` and the geodata keys -> typed
values: each rule payload parsed once, here, into what it is (see the
payload classes in appliance/config/model.py), so the rule engine compiles
values and never reads text. A bad payload is a ConfigError at `rules[i]`
with the line.

Every rule type of mihomo's `rules/parser.go` is read, with mihomo's
splitting (AND/OR/NOT/SUB-RULE/DOMAIN-REGEX take every comma up to the
target; logic payloads are parenthesised rule lines, nested), its options
(`no-resolve`, `src`: `src` implies no-resolve) and its checks (a target
that names no outbound, a RULE-SET naming no provider, a SUB-RULE naming
no list, sub-rules that call each other in a circle: errors). An unknown
rule type is an error, as in mihomo. PROCESS-* rules load and never match
a LAN flow: said once, at INFO, with their count. Rules after MATCH never
run and are reported ignored. A rule may name a proxy or group the loader
skipped (an outbound Mirage cannot use): it loads, and its flows go to
COMPATIBLE (see `SkippedOutbound`).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast, get_args

from appliance.config.loader.errors import ConfigError, index_path, key_path
from appliance.config.loader.scalars import (
    as_bool,
    as_domain,
    as_int,
    as_list,
    as_nonempty_str,
    as_str,
    choice,
    port_from_text,
)
from appliance.config.loader.section import LoadContext, Section, fold_case
from appliance.config.model import (
    GEOX_DEFAULTS,
    PROCESS_RULE_TYPES,
    Asn,
    DomainKeyword,
    DomainName,
    DomainPattern,
    DomainSuffix,
    GeoCode,
    GeodataConfig,
    IntRanges,
    IpSuffix,
    LogicRules,
    MatchAll,
    NameSet,
    NetworkKind,
    PortSet,
    ProcessMatch,
    Rule,
    RulePayload,
    RuleProviderConfig,
    RuleSetName,
    RuleType,
    SubRuleCall,
)

log = logging.getLogger(__name__)

RULE_TYPES: tuple[RuleType, ...] = get_args(RuleType)
# Types mihomo has no longer or only in other builds: reported ignored.
IGNORED_RULE_TYPES = ("SCRIPT", "USER-AGENT", "URL-REGEX", "SRC-IP-CIDR6")
# Types whose payload is every field up to the target (mihomo config.go).
_JOINED = ("NOT", "OR", "AND", "SUB-RULE", "DOMAIN-REGEX", "PROCESS-NAME-REGEX",
           "PROCESS-PATH-REGEX")  # fmt: skip
# mihomo's inbound types (constant/metadata.go ParseType); SOCKS is both.
IN_TYPES = ("HTTP", "HTTPS", "SOCKS4", "SOCKS5", "SHADOWSOCKS", "VMESS", "VLESS",
            "REDIR", "TPROXY", "TROJAN", "TUNNEL", "TUN", "TUIC", "HYSTERIA2",
            "ANYTLS", "MIERU", "SUDOKU", "INNER")  # fmt: skip
# Types that take `no-resolve` / `src`.
_IP_TYPES = ("GEOIP", "IP-ASN", "IP-CIDR", "IP-CIDR6", "IP-SUFFIX", "RULE-SET")
# The client-address twins of those (`src` implied).
_SRC_TYPES = ("SRC-GEOIP", "SRC-IP-ASN", "SRC-IP-CIDR", "SRC-IP-SUFFIX")


class _Known:
    """What a rule may name: outbounds (`targets`, and `skipped` with why a
    proxy was left out), `sub-rules` lists and `rule-providers`. None in a
    field: anything goes (parse_rule without a profile)."""

    def __init__(self, targets: set[str] | None, skipped: Mapping[str, str],
                 sub_rules: set[str] | None, providers: set[str] | None) -> None:
        self.targets = targets
        self.skipped = skipped
        self.sub_rules = sub_rules
        self.providers = providers


def parse_rules(
    value: Any, path: str, ctx: LoadContext, targets: set[str], skipped: dict[str, str],
    *, sub_rules: set[str] | None = None, providers: set[str] | None = None,
) -> list[Rule]:
    """The `rules:` list. `targets` are the names a rule may send flows to;
    `skipped` says why a proxy or group a rule names was left out;
    `sub_rules` and `providers` the names SUB-RULE and RULE-SET may use."""
    known = _Known(targets, skipped, sub_rules or set(), providers or set())
    rules = _parse_list(value, path, ctx, known)
    _say_process_rules(rules)
    return rules


def _parse_list(value: Any, path: str, ctx: LoadContext, known: _Known) -> list[Rule]:
    rules: list[Rule] = []
    if value is None:
        return rules
    items = as_list(value, path)
    for i, item in enumerate(items):
        item_path = index_path(path, i)
        try:
            line = as_nonempty_str(item, item_path)
            rtype = _rule_type(line.split(",", 1)[0].strip())
            if rtype in IGNORED_RULE_TYPES:
                ctx.ignore(item_path, rtype, kind="skipped")
                continue
            rule = _parse_line(line, item_path, known)
        except ConfigError as err:
            ctx.fail(err)  # rules are independent: the next is read all the same
            continue
        rules.append(rule)
        if rule.type == "MATCH" and i != len(items) - 1:
            # Rules after MATCH never run; say so rather than silently ignore.
            rest = len(items) - i - 1
            ctx.ignore(f"{index_path(path, i + 1)}..", f"{rest} rule(s) after MATCH never run",
                       kind="skipped")
            break
    return rules


def _say_process_rules(rules: list[Rule]) -> None:
    count = sum(1 for r in rules if r.type in PROCESS_RULE_TYPES)
    if count:
        log.info("%d PROCESS-* rule(s) never match: they name a process on the machine that "
                 "opens the connection, and LAN devices' flows have none on the gateway", count)


def parse_sub_rules(
    value: Any, path: str, ctx: LoadContext, targets: set[str], skipped: dict[str, str],
    providers: set[str],
) -> tuple[tuple[str, tuple[Rule, ...]], ...]:
    """`sub-rules: {name: [rule, ...]}`. A SUB-RULE inside names another
    list; circles are an error (mihomo's verifySubRule)."""
    if value is None:
        return ()
    section = Section(value, path, ctx)
    names = set(section.data)
    known = _Known(targets, skipped, names, providers)
    out: dict[str, tuple[Rule, ...]] = {}
    for name in section.data:
        if not name:
            raise ConfigError(path, name, "sub-rule name is empty")
        try:
            out[name] = tuple(_parse_list(section.raw(name), section.at(name), ctx, known))
        except ConfigError as err:
            ctx.fail(err)
            ctx.broken_sub_rules.add(name)
    _check_circles(out, path)
    _say_process_rules([r for rules in out.values() for r in rules])
    return tuple(out.items())


def _check_circles(lists: Mapping[str, tuple[Rule, ...]], path: str) -> None:
    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            circle = " -> ".join([*trail[trail.index(name):], name])
            raise ConfigError(key_path(path, trail[0]), circle, "sub-rules call each other "
                              "in a circle")
        for rule in lists.get(name, ()):
            if rule.type == "SUB-RULE":
                visit(rule.target, [*trail, name])

    for name in lists:
        visit(name, [])


def parse_rule(line: str, path: str = "rule") -> Rule:
    """One rule line, validated as the loader validates `rules[i]`, except
    that the target, the RULE-SET provider and the SUB-RULE list are taken
    as they are (whether they exist depends on the rest of a profile). For
    code and tests that build a `Config` without a profile. Raises
    ConfigError at `path`, also for a type Mirage reports ignored."""
    rtype = _rule_type(line.split(",", 1)[0].strip())
    if rtype in IGNORED_RULE_TYPES:
        raise ConfigError(path, line, f"{rtype} rules are not implemented by Mirage")
    return _parse_line(line, path, _Known(None, {}, None, None))


def parse_payload_rule(line: str, path: str) -> Rule:
    """A classical rule-set entry: a rule line without target
    (`DOMAIN-SUFFIX,example.com`, `IP-CIDR,10.0.0.0/8,no-resolve`). Raises
    ConfigError (mihomo skips such an entry with a warning; the caller does)."""
    fields = [f.strip() for f in line.split(",")]
    rtype = _rule_type(fields[0])
    if rtype in ("MATCH", "SUB-RULE", "RULE-SET"):
        raise ConfigError(path, line, f"{rtype} has no meaning in a rule-set")
    if rtype in _JOINED:
        return _build(rtype, ",".join(fields[1:]), "", [], line, path, _Known(None, {}, None, None))
    if len(fields) < 2:
        raise ConfigError(path, line, f"expected {rtype},VALUE")
    return _build(rtype, fields[1], "", fields[2:], line, path, _Known(None, {}, None, None))


def _rule_type(text: str) -> str:
    rtype = text.upper()
    return "MATCH" if rtype == "FINAL" else rtype  # Clash Premium's name for MATCH


def _parse_line(line: str, path: str, known: _Known) -> Rule:
    fields = [f.strip() for f in line.split(",")]
    rtype = _rule_type(fields[0])
    if rtype in _JOINED:
        if len(fields) < 3:
            raise ConfigError(path, line, f"expected {rtype},PAYLOAD,TARGET")
        payload, target, params = ",".join(fields[1:-1]), fields[-1], []
    elif rtype == "MATCH":
        if len(fields) != 2:
            raise ConfigError(path, line, "expected MATCH,TARGET")
        payload, target, params = "", fields[1], list[str]()
    else:
        if len(fields) < 3:
            raise ConfigError(path, line, f"expected {rtype},VALUE,TARGET[,no-resolve]")
        payload, target, params = fields[1], fields[2], fields[3:]
    if rtype == "SUB-RULE":
        if known.sub_rules is not None and target not in known.sub_rules:
            raise ConfigError(path, line, f"sub-rule {target!r} not found in sub-rules")
    elif known.targets is not None:
        _check_target(target, line, path, known.targets, known.skipped)
    return _build(rtype, payload, target, params, line, path, known)


def _build(rtype: str, payload: str, target: str, params: list[str], line: str, path: str,
           known: _Known) -> Rule:
    if rtype not in RULE_TYPES:
        raise ConfigError(path, line, f"unknown rule type {rtype!r}")
    kind: RuleType = rtype  # narrowed to RuleType by the membership test
    for param in params:
        if param not in ("no-resolve", "src"):
            raise ConfigError(path, line, f"unknown rule option {param!r} (no-resolve, src)")
    # `src` means something only where an address is matched; SRC-* imply it.
    src = kind in _SRC_TYPES or (kind in _IP_TYPES and "src" in params)
    no_resolve = src or "no-resolve" in params
    typed = _payload(kind, payload, line, path, known)
    return Rule(kind, typed, target, no_resolve=no_resolve, src=src)


def _check_target(
    target: str, line: str, path: str, targets: set[str], skipped: Mapping[str, str]
) -> None:
    # A proxy or group Mirage skipped is still a target: mihomo would use
    # it, so the profile loads; its flows go to COMPATIBLE (DIRECT), which
    # `mirage check`'s routing summary says rule by rule.
    if target in targets or target in skipped:
        return
    raise ConfigError(path, line, f"target {target!r} names no proxy, group, DIRECT or REJECT")


def _payload(rtype: RuleType, payload: str, line: str, path: str, known: _Known
             ) -> RulePayload:
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
    if rtype == "DOMAIN-WILDCARD":
        if not payload or any(c.isspace() for c in payload):
            raise ConfigError(path, line, "wildcard must be non-empty without spaces")
        return DomainPattern(payload.lower())
    if rtype == "DOMAIN-REGEX":
        try:
            re.compile(payload, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(path, line, f"not a regular expression ({exc})") from None
        return DomainPattern(payload)
    if rtype == "GEOSITE":
        code, *attrs = payload.lower().split("@")
        if not code:
            raise ConfigError(path, line, "GEOSITE needs a list name (cn, google@cn)")
        return GeoCode(code, tuple(a for a in attrs if a))
    if rtype in ("GEOIP", "SRC-GEOIP"):
        if not payload:
            raise ConfigError(path, line, "GEOIP needs a country code (CN, LAN)")
        return GeoCode(payload.lower())
    if rtype in ("IP-ASN", "SRC-IP-ASN"):
        if not payload.isdigit() or int(payload) >= 1 << 32:
            raise ConfigError(path, line, "IP-ASN needs an AS number")
        return Asn(int(payload))
    if rtype in ("IP-CIDR", "IP-CIDR6", "SRC-IP-CIDR"):
        try:
            net = ipaddress.ip_network(payload, strict=False)
        except ValueError as exc:
            raise ConfigError(path, line, f"not an IP network ({exc})") from None
        if rtype == "IP-CIDR6" and net.version != 6:
            raise ConfigError(path, line, "IP-CIDR6 needs an IPv6 network (use IP-CIDR)")
        return net
    if rtype in ("IP-SUFFIX", "SRC-IP-SUFFIX"):
        address, _, bits_text = payload.partition("/")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError as exc:
            raise ConfigError(path, line, f"not an IP address ({exc})") from None
        width = ip.max_prefixlen
        if not bits_text.isdigit() or not 0 <= int(bits_text) <= width:
            raise ConfigError(path, line, f"expected ADDRESS/BITS with BITS 0..{width}")
        return IpSuffix(ip, int(bits_text))
    if rtype in ("DST-PORT", "SRC-PORT", "IN-PORT"):
        return _port_set(payload, line, path)
    if rtype == "NETWORK":
        kind = payload.lower()
        if kind == "tcp":
            return NetworkKind("tcp")
        if kind == "udp":
            return NetworkKind("udp")
        raise ConfigError(path, line, "NETWORK is tcp or udp")
    if rtype == "DSCP":
        return _int_ranges(payload, line, path, 0, 63)
    if rtype == "UID":
        return _int_ranges(payload, line, path, 0, (1 << 32) - 1)
    if rtype == "IN-TYPE":
        names: list[str] = []
        for part in payload.upper().split("/"):
            part = part.strip()
            if part == "SOCKS":
                names += ["SOCKS4", "SOCKS5"]
            elif part in IN_TYPES:
                names.append(part)
            else:
                raise ConfigError(path, line, f"unknown inbound type {part!r}")
        return NameSet(tuple(names))
    if rtype in ("IN-USER", "IN-NAME"):
        parts = tuple(p.strip() for p in payload.split("/") if p.strip())
        if not parts:
            raise ConfigError(path, line, f"{rtype} needs at least one name")
        return NameSet(parts)
    if rtype == "RULE-SET":
        if known.providers is not None and payload not in known.providers:
            raise ConfigError(path, line, f"rule set {payload!r} not found in rule-providers")
        return RuleSetName(payload)
    if rtype in ("AND", "OR", "NOT"):
        children = tuple(_logic_child(text, line, path, known)
                         for text in _groups(payload, line, path))
        if not children or (rtype == "NOT" and len(children) != 1):
            raise ConfigError(path, line, f"{rtype} must contain "
                              + ("one rule" if rtype == "NOT" else "at least one rule"))
        return LogicRules(children)
    if rtype == "SUB-RULE":
        children = tuple(_logic_child(text, line, path, known)
                         for text in _groups(f"({payload})", line, path))
        if len(children) != 1:
            raise ConfigError(path, line, "SUB-RULE must contain one rule")
        return SubRuleCall(children[0])
    if rtype in PROCESS_RULE_TYPES:
        return ProcessMatch(payload)
    raise AssertionError(rtype)


def _groups(payload: str, line: str, path: str) -> list[str]:
    """The parenthesised rule lines of a logic payload, outermost first
    (mihomo's logic.parsePayload: a group spanning the whole payload is
    the wrapper, groups inside a chosen one belong to it)."""
    stack: list[int] = []
    spans: list[tuple[int, int]] = []
    for i, c in enumerate(payload):
        if c == "(":
            stack.append(i)
            spans.append((i, -1))
        elif c == ")":
            if not stack:
                raise ConfigError(path, line, "logic rule: missing '('")
            start = stack.pop()
            spans[spans.index((start, -1))] = (start, i)
    if stack:
        raise ConfigError(path, line, "logic rule: missing ')'")
    if not spans:
        raise ConfigError(path, line, "logic rule: expected ((RULE),(RULE),...)")
    chosen: list[tuple[int, int]] = []
    for start, end in spans:
        if start == 0 and end == len(payload) - 1:
            continue
        if any(s < start and end < e for s, e in chosen):
            continue
        chosen.append((start, end))
    return [payload[s + 1:e] for s, e in chosen]


def _logic_child(text: str, line: str, path: str, known: _Known) -> Rule:
    tp, sep, rest = text.partition(",")
    rtype = _rule_type(tp.strip())
    if not sep:
        raise ConfigError(path, line, f"logic rule: [{text}] is not TYPE,VALUE")
    if rtype in ("MATCH", "SUB-RULE"):
        raise ConfigError(path, line, f"{rtype} cannot be inside a logic rule")
    if rtype in ("NOT", "OR", "AND"):
        return _build(rtype, rest.strip(), "", [], line, path, known)
    fields = [f.strip() for f in rest.split(",")]
    return _build(rtype, fields[0], "", fields[1:], line, path, known)


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


def _int_ranges(text: str, value: Any, path: str, lo_bound: int, hi_bound: int) -> IntRanges:
    ranges: list[tuple[int, int]] = []
    for part in text.split("/"):
        lo_text, dash, hi_text = part.strip().partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise ConfigError(path, value, f"{part!r} is not a number or range") from None
        if not lo_bound <= lo <= hi <= hi_bound:
            raise ConfigError(path, value, f"{part!r} is not within {lo_bound}..{hi_bound}")
        ranges.append((lo, hi))
    return IntRanges(tuple(ranges))


# --- rule-providers ------------------------------------------------------------

PROVIDER_KEYS = ("type", "behavior", "format", "url", "path", "interval", "proxy",
                 "size-limit", "payload", "header")  # fmt: skip


def parse_rule_providers(value: Any, path: str, ctx: LoadContext) -> list[RuleProviderConfig]:
    """`rule-providers: {name: {...}}` (mihomo's rules/provider/parse.go).
    A relative `path` is kept relative: it is under the state directory
    (mihomo's home), joined when the provider starts."""
    if value is None:
        return []
    section = Section(value, path, ctx)
    out: list[RuleProviderConfig] = []
    for name in section.data:
        try:
            out.append(_rule_provider(section, name))
        except ConfigError as err:
            ctx.fail(err)
            ctx.broken_providers.add(name)
    return out


def _rule_provider(section: Section, name: str) -> RuleProviderConfig:
    """One `rule-providers.NAME`. Raises ConfigError."""
    raw = section.raw(name)
    entry = Section({} if raw is None else raw, section.at(name), section.ctx, fold_case)
    kind = entry.require("type", choice(("http", "file", "inline")))
    behavior = entry.require("behavior", choice(("domain", "ipcidr", "classical")))
    fmt = entry.get("format", choice(("yaml", "text", "mrs")), "yaml")
    if fmt == "mrs" and behavior == "classical":
        raise ConfigError(entry.at("format"), fmt, "mrs holds only domain or ipcidr "
                          "rule-sets")
    url = entry.get("url", as_nonempty_str, None)
    file_path = entry.get("path", _provider_path, None)
    # mihomo decodes providers with weak typing: `interval: "86400"` is a number.
    interval = float(entry.get("interval", lambda v, p: as_int(_digits(v), p, 0, 1 << 31), 0))
    proxy = entry.get("proxy", as_nonempty_str, None)
    size_limit = entry.get("size-limit", lambda v, p: as_int(_digits(v), p, 0, 1 << 40), 0)
    payload: tuple[str, ...] = ()
    if kind == "http":
        if url is None:
            raise ConfigError(entry.at("url"), None, "an http rule-provider needs a url")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(entry.at("url"), "<hidden>", "must be an http(s) URL")
    elif kind == "file":
        if file_path is None:
            raise ConfigError(entry.at("path"), None, "a file rule-provider needs a path")
    else:
        raw = entry.raw("payload")
        payload = tuple(str(as_str(v, index_path(entry.at("payload"), i))).strip()
                        for i, v in enumerate(as_list(raw, entry.at("payload")))) \
            if raw is not None else ()
    headers = _headers(entry.raw("header"), entry.at("header"))
    entry.finish(PROVIDER_KEYS, ())
    return RuleProviderConfig(
        name=name, type=kind, behavior=behavior, format=cast(Any, fmt), url=url, path=file_path,
        interval=interval, proxy=proxy, size_limit=size_limit, payload=payload,
        headers=headers)


def _digits(value: Any) -> Any:
    """A string of digits as the number (mihomo's weak typing), else as is."""
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        return int(value.strip())
    return value


def _provider_path(value: Any, path: str) -> Path:
    text = as_nonempty_str(value, path)
    if "\0" in text:
        raise ConfigError(path, value, "contains a NUL byte")
    return Path(text)


def _headers(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    """mihomo's `header: {Name: [value, ...]}` (the first value of each)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(path, "<hidden>", "expected a mapping of header names to lists")
    out = []
    for name, values in value.items():
        items = values if isinstance(values, list) else [values]
        if items:
            out.append((str(name), str(items[0])))
    return tuple(out)


# --- geodata -------------------------------------------------------------------

GEODATA_TOP_KEYS = ("geodata-mode", "geodata-loader", "geosite-matcher", "geo-auto-update",
                    "geo-update-interval", "geox-url")  # fmt: skip


def parse_geodata(root: Section) -> GeodataConfig:
    """The top-level geodata keys of a profile (mihomo's names)."""
    mode = root.get("geodata-mode", as_bool, False)
    loader = root.get("geodata-loader", choice(("memconservative", "standard")),
                      "memconservative")
    matcher = root.get("geosite-matcher", choice(("succinct", "mph", "hybrid")), "succinct")
    auto = root.get("geo-auto-update", as_bool, False)
    interval = root.get("geo-update-interval", lambda v, p: as_int(v, p, 1, 24 * 365), 24)
    urls = dict(GEOX_DEFAULTS)
    geox = root.section("geox-url")
    for kind in GEOX_DEFAULTS:
        url = geox.get(kind, as_nonempty_str, None)
        if url is not None:
            urls[kind] = url
    geox.finish(tuple(GEOX_DEFAULTS), ())
    return GeodataConfig(mode=mode, loader=cast(Any, loader), matcher=cast(Any, matcher),
                         auto_update=auto,
                         update_interval=float(interval), urls=tuple(urls.items()))
