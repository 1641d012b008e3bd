"""`dns:` and the top-level `hosts:`: listeners, fake-IP ranges and filter,
upstream nameservers (with the policy per domain) and local answers.

Nameserver forms Mirage does not speak (`quic://`, `system`, `dhcp://`, ...)
are reported ignored; a DoH or DoT server known by name needs an IP-literal
`default-nameserver` to bootstrap it (asking the system resolver would ask
the poisoned one) unless its queries go through a proxy (`#Name`), which
gets the name. What a DNS entry names elsewhere in the profile (`#Name`
proxies, `rule-set:` providers) is checked by `check_dns_references` once
those sections are read.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, TypeVar, cast

from appliance.config.loader.errors import NO_VALUE, ConfigError, index_path
from appliance.config.loader.rules import parse_rule
from appliance.config.loader.scalars import (
    as_bool,
    as_domain,
    as_int,
    as_list,
    as_listen,
    as_nonempty_str,
    as_path,
    as_seconds,
    as_str,
    choice,
    fail_type,
    port_from_text,
    split_host_port,
)
from appliance.config.loader.section import LoadContext, Section
from appliance.config.model import (
    DnsConfig,
    DomainPolicy,
    FallbackFilter,
    IPAddress,
    IPNetwork,
    Nameserver,
    RuleProviderConfig,
    RuleSetName,
)
from appliance.config.model import Rule as Rule

DNS_KEYS = (
    "enable", "listen", "ipv6", "enhanced-mode", "fake-ip-range",
    "fake-ip-range6", "fake-ip-filter", "fake-ip-filter-mode",
    "default-nameserver", "nameserver", "nameserver-policy", "hosts",
    "ca-file", "upstream-timeout", "cache-size", "fallback", "fallback-filter",
    "proxy-server-nameserver", "direct-nameserver",
    "direct-nameserver-follow-policy", "respect-rules", "kernel-answers",
)  # fmt: skip
IGNORED_DNS = (
    "prefer-h3", "ipv6-timeout", "use-hosts", "use-system-hosts",
    "cache-algorithm", "fake-ip-ttl",
)  # fmt: skip
FALLBACK_FILTER_KEYS = ("geoip", "geoip-code", "ipcidr", "domain", "geosite")
# `fake-ip-filter-mode: rule`: what a rule's target may be.
FAKE_IP_TARGETS = ("fake-ip", "real-ip")
# The fragment options of a nameserver Mirage uses; others are reported.
_NS_PARAMS = {"https": ("method", "skip-cert-verify"), "tls": ("skip-cert-verify",)}
# `#Name`s that are no proxy: DIRECT (the gateway, marked) and RULES (what
# the rules pick for the server's address, mihomo's respect-rules per entry).
NS_BUILTIN_PROXIES = ("DIRECT", "RULES")

# mihomo's `default-nameserver` when a profile leaves it out (config.go's
# RawDNS defaults): plain UDP.
MIHOMO_DEFAULT_NAMESERVER = ("114.114.114.114", "223.5.5.5", "8.8.8.8", "1.0.0.1")

# mihomo's `nameserver` when a profile names none (config.go, the RawDNS
# defaults of ParseRawConfig); found by name through the above.
MIHOMO_NAMESERVERS = ("https://doh.pub/dns-query", "tls://223.5.5.5:853")

# mihomo's default fake-ip-range6 (used only when dns.ipv6 is on and the key
# is absent).
DEFAULT_FAKE_IP_RANGE6 = ipaddress.IPv6Network("fdfe:dcba:9876::/64")


def parse_hosts(value: Any, path: str, ctx: LoadContext) -> dict[str, list[IPAddress]]:
    """`name: ip | [ip, ...]`. mihomo also allows a domain as the value (an
    alias); Mirage does not, so such an entry is reported ignored."""
    result: dict[str, list[IPAddress]] = {}
    if value is None:
        return result
    section = Section(value, path, ctx)
    for key in list(section.data):
        entry_path = section.at(key)
        name = as_domain(key, entry_path, wildcards=True)
        raw = section.raw(key)
        items = raw if isinstance(raw, list) else [raw]
        addrs: list[IPAddress] = []
        for i, item in enumerate(items):
            item_path = index_path(entry_path, i) if isinstance(raw, list) else entry_path
            if isinstance(item, str):
                try:
                    addrs.append(ipaddress.ip_address(item.strip()))
                    continue
                except ValueError:
                    pass
                try:
                    alias = as_domain(item, item_path, wildcards=False)
                except ConfigError:
                    alias = ""
                # No top-level domain is all digits: `300.0.0.1` is a bad IP.
                if not alias or alias.rsplit(".", 1)[-1].isdigit():
                    raise ConfigError(item_path, item, "not an IP address")
                ctx.ignore(item_path, "domain alias")
                continue
            fail_type(item, item_path, "an IP address")
        if not addrs and not items:
            raise ConfigError(entry_path, raw, "needs at least one address")
        if addrs:
            _merge_addrs(result, name, addrs)
    return result


def _merge_addrs(into: dict[str, list[IPAddress]], name: str, addrs: list[IPAddress]) -> None:
    current = into.setdefault(name, [])
    for addr in addrs:
        if addr not in current:
            current.append(addr)


_NS_IGNORED_SCHEMES = ("quic", "dhcp", "h3", "sdns", "rcode", "doq", "system")
_DEFAULT_PORTS = {"https": 443, "tls": 853, "udp": 53, "tcp": 53}


def _fragment(
    fragment: str, scheme: str, path: str, ctx: LoadContext
) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """mihomo's `#...` after a nameserver: `&`-separated; a bare word names
    the proxy, `key=value` is an option. Options Mirage does not use are
    reported by key (never by value: an `ecs` subnet says where you are)."""
    proxy: str | None = None
    params: list[tuple[str, str]] = []
    for part in fragment.split("&"):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not key:
            continue
        if not eq:
            proxy = key
            continue
        if key.lower() in _NS_PARAMS.get(scheme, ()):
            params.append((key.lower(), value.strip()))
        else:
            ctx.ignore(path, f"nameserver option {key!r}")
    return proxy, tuple(params)


def _nameserver(
    value: Any, path: str, ctx: LoadContext, *, ip_only: bool = False
) -> Nameserver | None:
    """One nameserver entry, or None if it is a real Clash form Mirage does not
    implement (then reported ignored)."""
    text = as_nonempty_str(value, path).strip()
    body, _, fragment = text.partition("#")
    scheme, sep, rest = body.partition("://")
    if body.lower() == "system" or not body:
        ctx.ignore(path, text)
        return None
    if not sep:
        scheme, rest = "udp", body
    else:
        scheme = scheme.lower()
    if scheme in _NS_IGNORED_SCHEMES:
        ctx.ignore(path, f"{scheme}:// nameserver")
        return None
    if scheme == "http":
        raise ConfigError(path, value, "plain-HTTP DNS is not supported: use https://")
    if scheme not in _DEFAULT_PORTS:
        raise ConfigError(path, value, f"unknown nameserver scheme {scheme!r}")
    if ip_only and scheme in ("https", "tls"):
        host_part = rest.partition("/")[0]
        try:
            ipaddress.ip_address(split_host_port(host_part)[0])
        except ValueError:
            raise ConfigError(
                path, value, "must be given by IP address: it bootstraps the other names"
            ) from None
    proxy, params = _fragment(fragment, scheme, path, ctx)
    if scheme == "https":
        authority, slash, rest_path = rest.partition("/")
        ns_path = "/" + rest_path if slash else "/dns-query"
        if "?" in ns_path:
            # mihomo rebuilds the URL from scheme, host and path
            # (config.go parseNameServer): the query is dropped there too.
            # Said without its text (it may carry a token).
            ns_path = ns_path.partition("?")[0] or "/"
            ctx.ignore(path, "the query string of a DoH URL (mihomo drops it too)")
    else:
        authority = rest.rstrip("/")
        if "/" in authority:
            raise ConfigError(path, value, f"{scheme} nameserver takes no path")
        ns_path = "/dns-query"
    try:
        host, port_text = split_host_port(authority)
    except ValueError as exc:
        raise ConfigError(path, value, f"not host[:port] ({exc})") from None
    if not host:
        raise ConfigError(path, value, "missing host")
    if "@" in host:
        raise ConfigError(path, value, "credentials in a nameserver URL are not supported")
    port = (
        port_from_text(port_text, value, path)
        if port_text is not None
        else _DEFAULT_PORTS[scheme]
    )
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if scheme not in ("https", "tls"):
            raise ConfigError(
                path,
                value,
                f"{host!r} is not an IP address ({scheme} nameservers are given by IP;"
                " use https:// or tls:// for a server known by name)",
            ) from None
        host = as_domain(host, path, wildcards=False)
    return Nameserver(
        scheme=cast(Any, scheme), host=host, port=port, path=ns_path, text=text,
        proxy=proxy, params=params,
    )


def _nameserver_entries(
    value: Any, path: str, ctx: LoadContext, *, ip_only: bool = False
) -> list[tuple[str, Nameserver]]:
    """The usable nameservers of a list (or single string), with their paths."""
    if isinstance(value, str):  # mihomo accepts a single string here too
        single = _nameserver(value, path, ctx, ip_only=ip_only)
        return [] if single is None else [(path, single)]
    result: list[tuple[str, Nameserver]] = []
    for i, item in enumerate(as_list(value, path)):
        item_path = index_path(path, i)
        ns = _nameserver(item, item_path, ctx, ip_only=ip_only)
        if ns is not None:
            result.append((item_path, ns))
    return result


def _nameserver_list(
    value: Any, path: str, ctx: LoadContext, *, ip_only: bool = False
) -> list[Nameserver]:
    return [ns for _, ns in _nameserver_entries(value, path, ctx, ip_only=ip_only)]


_T = TypeVar("_T")
_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _fake_range(kind: type[_Net], example: str) -> Callable[[Any, str], _Net]:
    """A parser for a fake-IP range of `kind`: a network with an explicit
    prefix length that leaves room for fake IPs."""
    probe = kind(0)
    longest = probe.max_prefixlen - 2

    def parse(value: Any, path: str) -> _Net:
        text = as_str(value, path).strip()
        try:
            net = kind(text, strict=False)
        except ValueError as exc:
            raise ConfigError(path, value, f"not an IPv{probe.version} network ({exc})") from None
        if "/" not in text:
            raise ConfigError(path, value, f"needs a prefix length (e.g. {example})")
        if net.prefixlen > longest:
            raise ConfigError(
                path, value, f"prefix longer than /{longest} leaves no room for fake IPs"
            )
        return net

    return parse


_fake_ip_range = _fake_range(ipaddress.IPv4Network, "198.18.0.1/16")
_fake_ip_range6 = _fake_range(ipaddress.IPv6Network, "fdfe:dcba:9876::1/64")


def _set_entries(text: str) -> list[str] | None:
    """`geosite:cn,private` / `rule-set:a,b` -> one entry each
    (`geosite:cn`, ...), as mihomo splits them; None for anything else."""
    kind, sep, names = text.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in ("geosite", "rule-set"):
        return None
    return [f"{kind}:{n.strip().lower() if kind == 'geosite' else n.strip()}"
            for n in names.split(",") if n.strip()]


def _dns_pattern(text: str, path: str, ctx: LoadContext) -> str | None:
    """A domain pattern of a DNS list, normalised; None (reported skipped)
    for a string that is no name pattern: mihomo's trie stores such text
    (`time?.*.com`, `a b`) and no name matches it there either."""
    try:
        return as_domain(text, path, wildcards=True)
    except ConfigError as err:
        ctx.ignore(path, f"not a domain pattern ({err.reason}): matches nothing",
                   kind="skipped", error=err)
        return None


def _pattern_list(value: Any, path: str, ctx: LoadContext) -> list[str]:
    """fake-ip-filter / fallback-filter.domain: domain patterns and
    `geosite:` / `rule-set:` entries (one list each)."""
    result: list[str] = []
    for i, item in enumerate(as_list(value, path)):
        item_path = index_path(path, i)
        text = as_str(item, item_path).strip()
        sets = _set_entries(text)
        entries = sets if sets is not None else [_dns_pattern(text, item_path, ctx)]
        for entry in entries:
            if entry is not None and entry not in result:
                result.append(entry)
    return result


def _filter_rules(value: Any, path: str, ctx: LoadContext) -> list[Rule]:
    """`fake-ip-filter-mode: rule`: rule lines whose target is `fake-ip` or
    `real-ip` (mihomo's syntax). RULE-SET names are checked later
    (`check_dns_references`)."""
    rules: list[Rule] = []
    items = as_list(value, path)
    for i, item in enumerate(items):
        item_path = index_path(path, i)
        line = as_nonempty_str(item, item_path)
        fields = [f.strip() for f in line.split(",")]
        target = fields[-1].lower()
        if target not in FAKE_IP_TARGETS:
            raise ConfigError(item_path, line, "the target must be fake-ip or real-ip")
        rule = parse_rule(",".join([*fields[:-1], target]), item_path)
        if rule.type not in _FILTER_RULE_TYPES:
            raise ConfigError(
                item_path, line,
                f"{rule.type} cannot decide a DNS name (use DOMAIN*, GEOSITE, RULE-SET, MATCH)",
            )
        rules.append(rule)
        if rule.type == "MATCH" and i != len(items) - 1:
            ctx.ignore(f"{index_path(path, i + 1)}..", "rules after MATCH never run")
            break
    return rules


# What a fake-IP filter rule can look at: the name alone.
_FILTER_RULE_TYPES = frozenset({
    "DOMAIN", "DOMAIN-SUFFIX", "DOMAIN-KEYWORD", "DOMAIN-WILDCARD", "DOMAIN-REGEX",
    "GEOSITE", "RULE-SET", "MATCH",
})  # fmt: skip


def _fallback_filter(value: Any, path: str, ctx: LoadContext) -> FallbackFilter:
    d = FallbackFilter()
    if value is None:
        return d
    sec = Section(value, path, ctx)
    geoip = sec.get("geoip", as_bool, d.geoip)
    code = sec.get("geoip-code", lambda v, p: as_nonempty_str(v, p).strip().lower(),
                   d.geoip_code)
    cidrs: list[IPNetwork] = sec.get("ipcidr", _cidr_list, [])
    listed: list[str] = sec.get("domain", lambda v, p: _pattern_list(v, p, ctx), [])
    domains = [e for e in listed if not e.startswith(("geosite:", "rule-set:"))]
    geosite: list[str] = sec.get(
        "geosite",
        lambda v, p: [as_nonempty_str(x, index_path(p, i)).strip().lower()
                      for i, x in enumerate(as_list(v, p))],
        [],
    )
    sec.finish(FALLBACK_FILTER_KEYS, ())
    return FallbackFilter(geoip=geoip, geoip_code=code, ipcidr=tuple(cidrs),
                          domain=tuple(domains), geosite=tuple(geosite))


def _cidr_list(value: Any, path: str) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for i, item in enumerate(as_list(value, path)):
        at = index_path(path, i)
        try:
            out.append(ipaddress.ip_network(as_str(item, at).strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(at, item, f"not an IP network ({exc})") from None
    return out


def _parse_policy(
    value: Any, path: str, ctx: LoadContext, named: list[tuple[str, Nameserver]]
) -> list[DomainPolicy]:
    """`nameserver-policy: {key: ns | [ns, ...]}` in config order. A key is
    a domain pattern, a comma list of them, `geosite:a,b` or
    `rule-set:a,b` (mihomo splits each list into one entry per item).
    Appends (path, server) to `named`."""
    result: list[DomainPolicy] = []
    if value is None:
        return result
    section = Section(value, path, ctx)
    for key in list(section.data):
        entry_path = section.at(key)
        raw = section.raw(key)
        if raw is None:
            raise ConfigError(entry_path, raw, "needs at least one nameserver")
        entries = _nameserver_entries(raw, entry_path, ctx)
        servers = [ns for _, ns in entries]
        sets = _set_entries(key.strip())
        if sets is not None:
            patterns: list[str] = sets
        else:
            patterns = [p for p in (_dns_pattern(k.strip(), entry_path, ctx)
                                    for k in key.split(",")) if p is not None]
        if not servers:
            ctx.ignore(entry_path, "no usable nameserver")
            continue
        named.extend(entries)
        # A pattern listed twice is kept twice: mihomo's trie lets the later
        # one win (appliance/dns/policy.py does the same).
        result.extend(DomainPolicy(pattern, tuple(servers)) for pattern in patterns)
    return result


def _mihomo_nameservers(path: str) -> list[tuple[str, Nameserver]]:
    """MIHOMO_NAMESERVERS in the forms Mirage speaks (parsed quietly: the
    profile did not write them, so nothing of theirs is reported)."""
    quiet = LoadContext(None)
    found = (_nameserver(text, path, quiet) for text in MIHOMO_NAMESERVERS)
    return [(path, ns) for ns in found if ns is not None]


def parse_dns(
    sec: Section, top_hosts: dict[str, list[IPAddress]], *, present: bool = True
) -> DnsConfig:
    """`dns:`, with the top-level `hosts` (`top_hosts`) merged under it.

    `present`: the profile has a `dns:` section. Without one mihomo leaves
    its DNS off and resolves with the system resolver; a fake-IP gateway
    cannot (the LAN's names must come back as fake IPs, and the system
    resolver is the one a poisoning network answers), so Mirage runs its
    DNS service as `dns: {enable: true}` would in mihomo: fake IPs, and
    mihomo's default upstreams (MIHOMO_NAMESERVERS, found through
    MIHOMO_DEFAULT_NAMESERVER). The same defaults fill a `dns:` that lists no
    `nameserver` (as mihomo fills it). Both are said at load."""
    ctx = sec.ctx
    d = DnsConfig()
    errors_before = len(ctx.errors)

    def get(key: str, convert: Callable[[Any, str], _T], default: _T) -> _T:
        # Each key on its own: a bad one is reported and the next still read.
        return ctx.attempt(lambda: sec.get(key, convert, default), default)

    enable = get("enable", as_bool, d.enable)
    listen = get("listen", as_listen, d.listen)
    ipv6 = get("ipv6", as_bool, d.ipv6)
    mode = get("enhanced-mode", choice(("fake-ip", "redir-host", "normal")), d.enhanced_mode)
    if mode != "fake-ip":
        # The capture steers only the fake range: with real addresses in
        # the answers, LAN flows would bypass the rules unseen. Said, not
        # silently accepted.
        ctx.ignore(sec.at("enhanced-mode"), f"{mode} is not run: Mirage answers with fake IPs "
                   "(fake-ip), so that every flow reaches its rules by name", kind="mode")
        mode = "fake-ip"
    fake_range = get("fake-ip-range", _fake_ip_range, d.fake_ip_range)
    fake_range6 = get("fake-ip-range6", _fake_ip_range6, d.fake_ip_range6)
    if fake_range6 is None and ipv6:
        fake_range6 = DEFAULT_FAKE_IP_RANGE6
    filter_mode = get(
        "fake-ip-filter-mode", choice(("blacklist", "whitelist", "rule")), d.fake_ip_filter_mode
    )
    fake_filter: list[str] = []
    filter_rules: list[Rule] = []
    if filter_mode == "rule":
        filter_rules = get("fake-ip-filter", lambda v, p: _filter_rules(v, p, ctx), [])
    else:
        fake_filter = get("fake-ip-filter", lambda v, p: _pattern_list(v, p, ctx), [])
    default_ns: list[Nameserver] = get(
        "default-nameserver", lambda v, p: _nameserver_list(v, p, ctx, ip_only=True), []
    )
    nameserver_raw = sec.raw("nameserver")
    mihomo_defaults = enable and nameserver_raw is None
    named = ctx.attempt(lambda: (
        _mihomo_nameservers(sec.at("nameserver")) if mihomo_defaults
        else [] if nameserver_raw is None
        else _nameserver_entries(nameserver_raw, sec.at("nameserver"), ctx)
    ), [])  # fmt: skip
    if mihomo_defaults:
        using = ", ".join(ns.text for _, ns in named)
        if not default_ns and sec.raw("default-nameserver") is None:
            default_ns = [Nameserver("udp", ip, 53, text=ip) for ip in MIHOMO_DEFAULT_NAMESERVER]
            using += f" (their names through {', '.join(MIHOMO_DEFAULT_NAMESERVER)} over plain UDP)"
        if present:
            ctx.ignore(sec.at("nameserver"), f"not set: mihomo's defaults are asked: {using}",
                       kind="mode")
        else:
            ctx.ignore("dns", "no dns: section: mihomo would leave its DNS off and use the "
                       "system resolver; a fake-IP gateway answers the LAN's DNS itself, so "
                       f"Mirage serves DNS on {listen} with fake IPs from {fake_range} and "
                       f"asks mihomo's default nameservers: {using}", kind="mode")
    nameservers = [ns for _, ns in named]
    policy = ctx.attempt(lambda: _parse_policy(
        sec.raw("nameserver-policy"), sec.at("nameserver-policy"), ctx, named), [])
    extra: dict[str, list[Nameserver]] = {}

    def servers_of(key: str) -> list[tuple[str, Nameserver]]:
        raw = sec.raw(key)
        return [] if raw is None else _nameserver_entries(raw, sec.at(key), ctx)

    for key in ("fallback", "proxy-server-nameserver", "direct-nameserver"):
        found: list[tuple[str, Nameserver]] = ctx.attempt(partial(servers_of, key), [])
        named.extend(found)
        extra[key] = [ns for _, ns in found]
    fallback_filter = ctx.attempt(lambda: _fallback_filter(
        sec.raw("fallback-filter"), sec.at("fallback-filter"), ctx), FallbackFilter())
    direct_follow = get("direct-nameserver-follow-policy", as_bool, False)
    respect_rules = get("respect-rules", as_bool, False)
    hosts = {name: list(addrs) for name, addrs in top_hosts.items()}
    dns_hosts = ctx.attempt(lambda: parse_hosts(sec.raw("hosts"), sec.at("hosts"), ctx), {})
    for name, addrs in dns_hosts.items():
        _merge_addrs(hosts, name, addrs)
    ca_file = get("ca-file", lambda v, p: as_path(v, p, ctx.base), d.ca_file)
    upstream_timeout = get("upstream-timeout", as_seconds, d.upstream_timeout)
    cache_size = get("cache-size", lambda v, p: as_int(v, p, 0, 10_000_000), d.cache_size)
    kernel_answers = get("kernel-answers", as_bool, d.kernel_answers)
    sec.finish(DNS_KEYS, IGNORED_DNS)
    if len(ctx.errors) > errors_before:
        # What follows judges the values read above; with stand-ins for
        # the broken ones it would only report echoes of the same errors.
        return d

    if enable and not nameservers:
        why = (
            "required when dns.enable is true"
            if nameserver_raw is None
            else "no usable nameserver left (only forms Mirage does not implement)"
        )
        raise ConfigError(
            sec.at("nameserver"), NO_VALUE if nameserver_raw is None else nameserver_raw, why
        )
    if respect_rules and not extra["proxy-server-nameserver"]:
        # mihomo refuses this too: the proxies' own names would be resolved
        # through the proxies (rules) they are needed to reach.
        raise ConfigError(sec.at("respect-rules"), True,
                          "needs dns.proxy-server-nameserver (proxy servers' names must not "
                          "be resolved through the rules that lead to them)")
    # A DoH/DoT server known by name needs an IP-literal resolver to find it;
    # asking the system resolver would ask the poisoned one. Through a proxy
    # the proxy gets the name.
    by_name = [(where, ns) for where, ns in named
               if not _is_ip(ns.host) and ns.proxy in (None, "DIRECT", "RULES")]
    if by_name and not default_ns and sec.raw("default-nameserver") is None:
        # mihomo's own default-nameserver applies when the key is absent;
        # said at load, since a poisoning network can answer those.
        default_ns = [Nameserver("udp", ip, 53, text=ip) for ip in MIHOMO_DEFAULT_NAMESERVER]
        ctx.ignore(sec.at("default-nameserver"),
                   "not set: the names of DoH/DoT servers are looked up over plain UDP at "
                   f"mihomo's defaults ({', '.join(MIHOMO_DEFAULT_NAMESERVER)}), which a "
                   "poisoning network can answer; list resolvers you trust, or give those "
                   "servers by IP", kind="mode")
    for where, ns in by_name:
        if not default_ns:
            raise ConfigError(
                where,
                ns.text,
                "server is known by name: list an IP-address resolver in"
                " dns.default-nameserver to bootstrap it",
            )
    return DnsConfig(
        enable=enable,
        listen=listen,
        ipv6=ipv6,
        enhanced_mode=cast(Any, mode),
        fake_ip_range=fake_range,
        fake_ip_range6=fake_range6,
        fake_ip_filter=tuple(fake_filter),
        fake_ip_filter_mode=cast(Any, filter_mode),
        fake_ip_filter_rules=tuple(filter_rules),
        default_nameserver=tuple(default_ns),
        nameserver=tuple(nameservers),
        nameserver_policy=tuple(policy),
        fallback=tuple(extra["fallback"]),
        fallback_filter=fallback_filter,
        proxy_server_nameserver=tuple(extra["proxy-server-nameserver"]),
        direct_nameserver=tuple(extra["direct-nameserver"]),
        direct_follow_policy=direct_follow,
        respect_rules=respect_rules,
        hosts=tuple((name, tuple(addrs)) for name, addrs in hosts.items()),
        ca_file=ca_file,
        upstream_timeout=upstream_timeout,
        cache_size=cache_size,
        kernel_answers=kernel_answers,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_dns_references(
    dns: DnsConfig, path: str, targets: set[str], skipped: dict[str, str],
    rule_providers: list[RuleProviderConfig], broken_providers: Iterable[str] = (),
    ctx: LoadContext | None = None,
) -> DnsConfig:
    """What the `dns:` entries name in the rest of the profile, checked
    once it is read (mihomo checks the same at load): a nameserver's
    `#Name` is a proxy, a group, DIRECT or RULES; a `rule-set:` entry
    names a rule-provider of domains (or classical rules). A provider
    whose own entry was broken (`broken_providers`, already reported) is
    not reported again.

    A `#Name` that names no outbound at all is, to mihomo, an interface
    (tunnel/dns_dialer.go: no such proxy -> dialer.WithInterface(name);
    `127.0.0.1#lo`). Mirage does not bind DNS upstreams to an interface:
    such a server is asked as if the suffix were absent (the gateway's
    routing, marked), said at load (`ctx`). Returns `dns` with those
    suffixes dropped."""
    broken = set(broken_providers)
    interfaces: dict[str, str] = {}
    unbound_hosts: list[str] = []

    def checked(servers: tuple[Nameserver, ...], at: str) -> tuple[Nameserver, ...]:
        out = []
        for ns in servers:
            if _names_interface(ns, targets, skipped):
                interfaces.setdefault(ns.text, at)
                unbound_hosts.append(ns.host)
                ns = dataclasses.replace(ns, proxy=None)
            _check_proxy(ns, at, targets, skipped)
            out.append(ns)
        return tuple(out)

    lists = {
        "nameserver": "nameserver", "fallback": "fallback",
        "proxy-server-nameserver": "proxy_server_nameserver",
        "direct-nameserver": "direct_nameserver",
        "default-nameserver": "default_nameserver",
    }
    changes: dict[str, Any] = {
        attr: checked(getattr(dns, attr), f"{path}.{key}") for key, attr in lists.items()}
    changes["nameserver_policy"] = tuple(
        dataclasses.replace(entry, nameservers=checked(entry.nameservers,
                                                       f"{path}.nameserver-policy"))
        for entry in dns.nameserver_policy)
    if ctx is not None:
        for text, at in interfaces.items():
            name = text.partition("#")[2]
            ctx.ignore(at, f"{text}: #{name} names no proxy or group, so mihomo binds the "
                       f"sockets to this server to the interface {name}; Mirage does not bind "
                       "DNS upstreams to an interface and asks it through the routing table",
                       kind="mode")
    behaviors = {p.name: p.behavior for p in rule_providers}
    names = [e.pattern for e in dns.nameserver_policy] + list(dns.fake_ip_filter)
    names += [f"rule-set:{r.payload}" for r in dns.fake_ip_filter_rules
              if isinstance(r.payload, RuleSetName)]
    names = [n for n in names if n.startswith("rule-set:")]
    for set_name in names:
        name = set_name.removeprefix("rule-set:")
        behavior = behaviors.get(name)
        if name in broken:
            continue
        if behavior is None:
            raise ConfigError(path, set_name,
                              f"rule-set {name!r} names no rule-providers entry")
        if behavior == "ipcidr":
            raise ConfigError(path, set_name,
                              f"rule-set {name!r} holds addresses; a DNS name needs domains")
    if not interfaces:
        return dns
    if not dns.default_nameserver and any(not _is_ip(host) for host in unbound_hosts):
        # Through a proxy the name needed no bootstrap; without it, it does.
        changes["default_nameserver"] = tuple(
            Nameserver("udp", ip, 53, text=ip) for ip in MIHOMO_DEFAULT_NAMESERVER)
    return dataclasses.replace(dns, **changes)


def _names_interface(ns: Nameserver, targets: set[str], skipped: dict[str, str]) -> bool:
    return (ns.proxy is not None and ns.proxy not in targets
            and ns.proxy not in NS_BUILTIN_PROXIES and ns.proxy not in skipped)


def _check_proxy(ns: Nameserver, path: str, targets: set[str], skipped: dict[str, str]) -> None:
    if ns.proxy is None or ns.proxy in targets or ns.proxy in NS_BUILTIN_PROXIES:
        return
    why = skipped.get(ns.proxy)
    raise ConfigError(path, ns.text, f"#{ns.proxy}: " + (
        f"that proxy is {why}" if why else "names no proxy, group, DIRECT or RULES"))
