"""`dns:` and the top-level `hosts:`: listeners, fake-IP ranges and filter,
upstream nameservers (with the policy per domain) and local answers.

Nameserver forms Mirage does not speak (`tls://`, `quic://`, `system`, ...)
are reported ignored; a DoH server known by name needs an IP-literal
`default-nameserver` to bootstrap it (asking the system resolver would ask
the poisoned one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar, cast

from appliance.config.loader.errors import NO_VALUE, ConfigError, index_path
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
from appliance.config.model import DnsConfig, DomainPolicy, IPAddress, Nameserver

DNS_KEYS = (
    "enable", "listen", "ipv6", "enhanced-mode", "fake-ip-range",
    "fake-ip-range6", "fake-ip-filter", "fake-ip-filter-mode",
    "default-nameserver", "nameserver", "nameserver-policy", "hosts",
    "ca-file", "upstream-timeout", "cache-size", "kernel-answers",
)  # fmt: skip
IGNORED_DNS = (
    "prefer-h3", "ipv6-timeout", "use-hosts", "use-system-hosts",
    "respect-rules", "fallback", "fallback-filter", "cache-algorithm",
    "proxy-server-nameserver", "direct-nameserver",
    "direct-nameserver-follow-policy", "fake-ip-ttl",
)  # fmt: skip

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


_NS_IGNORED_SCHEMES = ("tls", "quic", "dhcp", "h3", "sdns", "rcode", "doq", "dot")


def _nameserver(
    value: Any, path: str, ctx: LoadContext, *, ip_only: bool = False
) -> Nameserver | None:
    """One nameserver entry, or None if it is a real Clash form Mirage does not
    implement (then reported ignored)."""
    text = as_nonempty_str(value, path).strip()
    lower = text.lower()
    if lower == "system" or "#" in text:
        ctx.ignore(path, text)
        return None
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "udp", text
    else:
        scheme = scheme.lower()
    if scheme in _NS_IGNORED_SCHEMES:
        ctx.ignore(path, text)
        return None
    if scheme not in ("https", "udp", "tcp"):
        raise ConfigError(path, value, f"unknown nameserver scheme {scheme!r}")
    if ip_only and scheme == "https":
        raise ConfigError(
            path, value, "must be an IP address (udp/tcp): it bootstraps the other names"
        )
    if scheme == "https":
        authority, slash, rest_path = rest.partition("/")
        ns_path = "/" + rest_path if slash else "/dns-query"
        if "?" in ns_path:
            raise ConfigError(path, value, "a query string in a DoH URL is not supported")
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
        else (443 if scheme == "https" else 53)
    )
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if scheme != "https":
            raise ConfigError(
                path,
                value,
                f"{host!r} is not an IP address ({scheme} nameservers are given by IP;"
                " use https:// for a server known by name)",
            ) from None
        host = as_domain(host, path, wildcards=False)
    return Nameserver(scheme=cast(Any, scheme), host=host, port=port, path=ns_path, text=text)


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


def _pattern_list(value: Any, path: str, ctx: LoadContext) -> list[str]:
    result: list[str] = []
    for i, item in enumerate(as_list(value, path)):
        item_path = index_path(path, i)
        text = as_str(item, item_path).strip()
        if text.lower().startswith(("geosite:", "rule-set:")):
            ctx.ignore(item_path, text)
            continue
        pattern = as_domain(text, item_path, wildcards=True)
        if pattern not in result:
            result.append(pattern)
    return result


def _parse_policy(
    value: Any, path: str, ctx: LoadContext, named: list[tuple[str, Nameserver]]
) -> list[DomainPolicy]:
    """`nameserver-policy: {pattern: ns | [ns, ...]}`; a key may hold several
    comma-separated patterns (mihomo). Appends (path, server) to `named`."""
    result: list[DomainPolicy] = []
    if value is None:
        return result
    section = Section(value, path, ctx)
    seen: set[str] = set()
    for key in list(section.data):
        entry_path = section.at(key)
        raw = section.raw(key)
        if raw is None:
            raise ConfigError(entry_path, raw, "needs at least one nameserver")
        entries = _nameserver_entries(raw, entry_path, ctx)
        servers = [ns for _, ns in entries]
        if key.strip().lower().startswith(("geosite:", "rule-set:")):
            # `geosite:cn,private`: the comma list is of geosite/rule-set names.
            ctx.ignore(entry_path, key.strip())
            continue
        usable = [as_domain(p.strip(), entry_path, wildcards=True) for p in key.split(",")]
        if not servers:
            ctx.ignore(entry_path, "no usable nameserver")
            continue
        named.extend(entries)
        for pattern in usable:
            if pattern in seen:
                raise ConfigError(entry_path, pattern, "pattern already has a policy")
            seen.add(pattern)
            result.append(DomainPolicy(pattern, tuple(servers)))
    return result


def parse_dns(sec: Section, top_hosts: dict[str, list[IPAddress]]) -> DnsConfig:
    """`dns:`, with the top-level `hosts` (`top_hosts`) merged under it."""
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
    fake_filter: list[str] = get("fake-ip-filter", lambda v, p: _pattern_list(v, p, ctx), [])
    filter_mode = get(
        "fake-ip-filter-mode", choice(("blacklist", "whitelist")), d.fake_ip_filter_mode
    )
    default_ns: list[Nameserver] = get(
        "default-nameserver", lambda v, p: _nameserver_list(v, p, ctx, ip_only=True), []
    )
    nameserver_raw = sec.raw("nameserver")
    named = ctx.attempt(lambda: (
        [] if nameserver_raw is None
        else _nameserver_entries(nameserver_raw, sec.at("nameserver"), ctx)
    ), [])  # fmt: skip
    nameservers = [ns for _, ns in named]
    policy = ctx.attempt(lambda: _parse_policy(
        sec.raw("nameserver-policy"), sec.at("nameserver-policy"), ctx, named), [])
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
    # A DoH server known by name needs an IP-literal resolver to find it;
    # asking the system resolver would ask the poisoned one.
    for where, ns in named:
        if not default_ns and not _is_ip(ns.host):
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
        default_nameserver=tuple(default_ns),
        nameserver=tuple(nameservers),
        nameserver_policy=tuple(policy),
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
