"""A `Config` back in Clash spelling, with every default filled in.

What `mirage check` prints, so a user sees what the appliance will actually
do with their profile (ignored keys gone, defaults explicit, patterns
normalised). `effective_config` is plain data (dict/list/str/int/float/bool/
None): feeding it back to `parse_config` gives an equal `Config`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import yaml

from appliance.config.loader.protocols import render_protocol_proxy
from appliance.config.loader.redact import scrub_text
from appliance.config.model import (
    Config,
    IgnoredKind,
    LoadNote,
    MemberFilter,
    Nameserver,
    ProxyConfig,
    ProxyGroupConfig,
    ProxyProviderConfig,
    Rule,
    RuleProviderConfig,
)

REDACTED = "<redacted>"


def _ns(ns: Nameserver, redact: bool = False) -> str:
    # A DoH path can be an account's id (`https://dns.nextdns.io/ab12cd`).
    text = ns.text or ns.url
    return scrub_text(text) if redact else text


def _proxy(p: ProxyConfig, redact: bool) -> dict[str, Any]:
    if p.options is not None:
        return render_protocol_proxy(p, redact)
    out: dict[str, Any] = {"name": p.name, "type": p.type}
    if p.type == "direct" and p.ip_version != "dual":
        out["ip-version"] = p.ip_version
    if p.type in ("direct", "reject"):
        return out
    out["server"] = p.server
    out["port"] = p.port
    # Besides the registered protocols: socks5 and http.
    if p.username is not None:
        out["username"] = p.username
    if p.password is not None:
        out["password"] = REDACTED if redact else p.password
    out["tls"] = p.tls
    out["skip-cert-verify"] = p.skip_cert_verify
    if p.type == "http" and p.sni is not None:
        out["sni"] = p.sni
    if p.type == "socks5":
        out["udp"] = p.udp
    if p.ip_version != "dual":
        out["ip-version"] = p.ip_version
    return out


def _status(ranges: tuple[tuple[int, int], ...]) -> str:
    return "/".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges) or "*"


def _filters(f: MemberFilter) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.filter:
        out["filter"] = "`".join(f.filter)
    if f.exclude_filter is not None:
        out["exclude-filter"] = f.exclude_filter
    if f.exclude_type:
        out["exclude-type"] = "|".join(f.exclude_type)
    return out


def _group(g: ProxyGroupConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": g.name, "type": g.type, "proxies": list(g.proxies)}
    if g.use:
        out["use"] = list(g.use)
    h = g.health
    out.update({"url": h.url, "interval": int(h.interval), "timeout": round(h.timeout * 1000),
                "lazy": h.lazy, "expected-status": _status(h.expected_status),
                "max-failed-times": h.max_failed_times})
    if g.type == "url-test":
        out["tolerance"] = g.tolerance
    if g.type == "load-balance":
        out["strategy"] = g.strategy
    out.update(_filters(g.filter))
    out.update({"disable-udp": g.disable_udp, "hidden": g.hidden})
    if g.icon:
        out["icon"] = g.icon
    return out


def _provider(p: ProxyProviderConfig, redact: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"type": p.type}
    if p.url is not None:
        # Subscription URLs carry their token in the path or query.
        out["url"] = REDACTED if redact else p.url
    if p.path is not None:
        out["path"] = str(p.path)
    out["interval"] = int(p.interval)
    if p.proxy is not None:
        out["proxy"] = p.proxy
    if p.size_limit:
        out["size-limit"] = p.size_limit
    if p.header:
        header: dict[str, list[str]] = {}
        for k, v in p.header:
            header.setdefault(k, []).append(REDACTED if redact else v)
        out["header"] = header
    h = p.health
    out["health-check"] = {"enable": h.enable, "url": h.url, "interval": int(h.interval),
                           "timeout": round(h.timeout * 1000), "lazy": h.lazy,
                           "expected-status": _status(h.expected_status)}
    out.update(_filters(p.filter))
    o = p.override
    override: dict[str, Any] = {k: v for k, v in (
        ("skip-cert-verify", o.skip_cert_verify), ("udp", o.udp),
        ("dialer-proxy", o.dialer_proxy), ("ip-version", o.ip_version)) if v is not None}
    if o.additional_prefix:
        override["additional-prefix"] = o.additional_prefix
    if o.additional_suffix:
        override["additional-suffix"] = o.additional_suffix
    if o.proxy_name:
        override["proxy-name"] = [{"pattern": a, "target": b} for a, b in o.proxy_name]
    if override:
        out["override"] = override
    if p.type == "inline":
        out["payload"] = [REDACTED] * len(p.payload) if redact else list(p.payload)
    return out


def _rule(r: Rule, skipped: frozenset[str] = frozenset()) -> str:
    # A rule naming an outbound Mirage skipped sends its flows to COMPATIBLE
    # (DIRECT): printed so, which is what runs (and loads again).
    if r.type != "SUB-RULE" and r.target in skipped:
        return dataclasses.replace(r, target="COMPATIBLE").line()
    return r.line()


def _rule_provider(p: RuleProviderConfig, redact: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"type": p.type, "behavior": p.behavior, "format": p.format}
    if p.url is not None:
        out["url"] = REDACTED if redact else p.url  # subscription tokens live in URLs
    if p.path is not None:
        out["path"] = str(p.path)
    if p.interval:
        out["interval"] = int(p.interval)
    if p.proxy is not None:
        out["proxy"] = p.proxy
    if p.size_limit:
        out["size-limit"] = p.size_limit
    if p.type == "inline":
        out["payload"] = list(p.payload)
    if p.headers:
        out["header"] = {k: [REDACTED if redact else v] for k, v in p.headers}
    return out


def effective_config(cfg: Config, *, redact: bool = False) -> dict[str, Any]:
    """The configuration as Mirage will run it, in Clash key spelling.

    With `redact`, `secret` and proxy passwords are replaced by
    `<redacted>` (for printing; the result then no longer round-trips).
    """
    dns = cfg.dns
    app = cfg.appliance
    skipped = frozenset(s.name for s in cfg.skipped)
    policy: dict[str, list[str]] = {}
    for entry in dns.nameserver_policy:
        policy[entry.pattern] = [_ns(ns, redact) for ns in entry.nameservers]
    hosts: dict[str, Any] = {}
    for name, addrs in dns.hosts:
        texts = [str(a) for a in addrs]
        hosts[name] = texts[0] if len(texts) == 1 else texts
    return {
        "mode": cfg.mode,
        "mixed-port": cfg.mixed_port,
        "socks-port": cfg.socks_port,
        "port": cfg.http_port,
        "authentication": [
            f"{user}:{REDACTED if redact else password}" for user, password in cfg.authentication
        ],
        "allow-lan": cfg.allow_lan,
        "bind-address": cfg.bind_address,
        "tproxy-port": cfg.tproxy_port,
        "routing-mark": cfg.routing_mark,
        "ipv6": cfg.ipv6,
        "log-level": cfg.log_level,
        "external-controller": (
            str(cfg.external_controller) if cfg.external_controller is not None else None
        ),
        "secret": REDACTED if redact and cfg.secret else cfg.secret,
        **({"external-ui": str(cfg.controller.ui)} if cfg.controller.ui is not None else {}),
        **({"external-ui-name": cfg.controller.ui_name} if cfg.controller.ui_name else {}),
        **({"external-ui-url": cfg.controller.ui_url} if cfg.controller.ui_url else {}),
        "external-controller-cors": {
            "allow-origins": list(cfg.controller.cors.allow_origins),
            "allow-private-network": cfg.controller.cors.allow_private_network,
        },
        "profile": {"store-fake-ip": cfg.store_fake_ip, "store-selected": cfg.store_selected},
        "hosts": hosts,
        "dns": {
            "enable": dns.enable,
            "listen": str(dns.listen),
            "ipv6": dns.ipv6,
            "enhanced-mode": dns.enhanced_mode,
            "fake-ip-range": str(dns.fake_ip_range),
            "fake-ip-range6": None if dns.fake_ip_range6 is None else str(dns.fake_ip_range6),
            "fake-ip-filter": (
                [_rule(r) for r in dns.fake_ip_filter_rules]
                if dns.fake_ip_filter_mode == "rule" else list(dns.fake_ip_filter)
            ),
            "fake-ip-filter-mode": dns.fake_ip_filter_mode,
            "default-nameserver": [_ns(ns, redact) for ns in dns.default_nameserver],
            "nameserver": [_ns(ns, redact) for ns in dns.nameserver],
            "nameserver-policy": policy,
            "fallback": [_ns(ns) for ns in dns.fallback],
            "fallback-filter": {
                "geoip": dns.fallback_filter.geoip,
                "geoip-code": dns.fallback_filter.geoip_code,
                "ipcidr": [str(n) for n in dns.fallback_filter.ipcidr],
                "domain": list(dns.fallback_filter.domain),
                "geosite": list(dns.fallback_filter.geosite),
            },
            "proxy-server-nameserver": [_ns(ns) for ns in dns.proxy_server_nameserver],
            "direct-nameserver": [_ns(ns) for ns in dns.direct_nameserver],
            "direct-nameserver-follow-policy": dns.direct_follow_policy,
            "respect-rules": dns.respect_rules,
            "ca-file": None if dns.ca_file is None else str(dns.ca_file),
            "upstream-timeout": dns.upstream_timeout,
            "cache-size": dns.cache_size,
        },
        "proxies": [_proxy(p, redact) for p in cfg.proxies],
        "proxy-groups": [_group(g) for g in cfg.proxy_groups],
        "proxy-providers": {p.name: _provider(p, redact) for p in cfg.proxy_providers},
        "rules": [_rule(r, skipped) for r in cfg.rules],
        "sub-rules": {name: [_rule(r, skipped) for r in rules] for name, rules in cfg.sub_rules},
        "rule-providers": {p.name: _rule_provider(p, redact) for p in cfg.rule_providers},
        "geodata-mode": cfg.geodata.mode,
        "geodata-loader": cfg.geodata.loader,
        "geosite-matcher": cfg.geodata.matcher,
        "geo-auto-update": cfg.geodata.auto_update,
        "geo-update-interval": int(cfg.geodata.update_interval),
        "geox-url": dict(cfg.geodata.urls),
        "appliance": {
            "lan": list(app.lan),
            "redirect": app.redirect,
            "dns-hijack": app.dns_hijack,
            "bypass": [str(n) for n in app.bypass],
            "state-dir": str(app.state_dir),
            "store-flush-interval": app.store_flush_interval,
            "route-table": app.route_table,
            "capture-mark": app.capture_mark,
            "connect-timeout": app.connect_timeout,
            "idle-timeout": app.idle_timeout,
            "half-close-timeout": app.half_close_timeout,
            "udp-timeout": app.udp_timeout,
            "udp-max-sessions": app.udp_max_sessions,
            "offload-direct": app.offload_direct,
            "limits": {
                "flows-per-client": app.limits.flows_per_client,
                "flows-total": "auto" if app.limits.flows_total is None
                else app.limits.flows_total,
                "proxy-connections-per-client": app.limits.proxy_connections_per_client,
                "dns-upstream-per-client": app.limits.dns_upstream_per_client,
                "dns-tcp-per-client": app.limits.dns_tcp_per_client,
                "fake-ip-rate-per-client": app.limits.fake_ip_rate_per_client,
                "fake-ip-burst-per-client": app.limits.fake_ip_burst_per_client,
            },
            "block-encrypted-dns": app.block_encrypted_dns,
            "encrypted-dns-resolvers": [str(n) for n in app.encrypted_dns_resolvers],
            "controller-hosts": list(app.controller_hosts),
        },
    }


def format_effective(cfg: Config, *, redact: bool = True) -> str:
    """`effective_config` as YAML text (secrets redacted unless asked not to)."""
    return yaml.safe_dump(
        effective_config(cfg, redact=redact),
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


# One line per kind, in this order; a person reads the top lines first.
_KIND_TITLES: dict[IgnoredKind, str] = {
    "mode": "instead",
    "unknown": "ignored (unknown keys; mihomo ignores them too)",
    "legacy": "ignored (old Clash spellings mihomo no longer reads)",
    "skipped": "skipped (Mirage cannot use them)",
    "unimplemented": "ignored (not implemented by Mirage)",
    "gateway": "ignored (no meaning on a gateway)",
    "anchor": "ignored (hold only YAML anchors)",
}
# Entries shown per line; the rest are counted.
_MAX_ENTRIES = 12


def ignored_lines(cfg: Config) -> list[str]:
    """What the profile asks for that Mirage leaves out, one line per kind
    (see `IgnoredKind`): "ignored (no meaning on a gateway): tun, ...".
    Entries that differ only in a list index are one entry with a count
    (`proxies[*].flow (12)`), so a profile of 300 nodes gives short lines.
    No line shows a value (the loader's notes never hold a secret)."""
    notes = list(cfg.load_notes)
    if not notes and cfg.ignored_keys:  # a Config made in code: no kinds
        notes = [LoadNote(k, "unimplemented") for k in cfg.ignored_keys]
    lines = []
    for kind, title in _KIND_TITLES.items():
        entries = _grouped([n for n in notes if n.kind == kind])
        if not entries:
            continue
        shown = entries[:_MAX_ENTRIES]
        more = len(entries) - len(shown)
        lines.append(f"{title}: " + ", ".join(shown) + (f", and {more} more" if more else ""))
    return lines


def _grouped(notes: list[LoadNote]) -> list[str]:
    by_path: dict[str, list[str]] = {}
    first_path: dict[str, str] = {}
    for n in notes:
        # The line's title already says what the kind's own notes say.
        note = (n.note.removeprefix("unknown key").removeprefix("; ") if n.kind == "unknown"
                else "" if n.kind == "anchor" else n.note)
        general = re.sub(r"\[\d+\]", "[*]", n.path)
        by_path.setdefault(general, []).append(note)
        first_path.setdefault(general, n.path)
    out = []
    for general, texts in by_path.items():
        # One entry keeps its own path; several share the `[*]` one.
        path = general if len(texts) > 1 else first_path[general]
        distinct = list(dict.fromkeys(texts))
        if len(distinct) > 1:
            # Notes that differ only in a quoted name: `vmess proxy 'HK 01'`.
            distinct = list(dict.fromkeys(re.sub(r" ?'[^']*'", "", t) for t in texts))
        note = " / ".join(t for t in distinct[:4] if t)
        if len(distinct) > 4:
            note += " / ..."
        count = f"{len(texts)}" if len(texts) > 1 else ""
        inner = "; ".join(x for x in (note, count and f"{count} times") if x)
        out.append(f"{path} ({inner})" if inner else path)
    return out


def format_ignored(cfg: Config) -> str:
    """`ignored_lines` as text (one line per kind), or "" if nothing was
    ignored. `mirage check` prints it, as YAML comments, after the YAML."""
    return "\n".join(ignored_lines(cfg))
