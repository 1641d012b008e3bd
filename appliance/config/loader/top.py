"""The top level of a profile: the listeners' keys, `profile:`, and the
order in which the sections are read (each section module owns its keys).

Known Clash/mihomo keys Mirage accepts and ignores come from mihomo's
config/config.go (RawConfig, RawDNS, RawProfile and the adapter option
structs).
"""

from __future__ import annotations

import ipaddress
from typing import Any, cast

from appliance.config.loader.appliance import parse_appliance
from appliance.config.loader.controller import CONTROLLER_KEYS, parse_controller
from appliance.config.loader.cross import check_cross
from appliance.config.loader.dns import check_dns_references, parse_dns, parse_hosts
from appliance.config.loader.errors import ConfigError, index_path, raise_collected
from appliance.config.loader.groups import parse_groups
from appliance.config.loader.proxies import (
    BUILTIN_TARGETS,
    parse_proxies,
    warn_udp_behind_dialer,
)
from appliance.config.loader.proxy_providers import (
    check_provider_dialers,
    parse_proxy_providers,
)
from appliance.config.loader.rules import (
    parse_geodata,
    parse_rule_providers,
    parse_rules,
    parse_sub_rules,
)
from appliance.config.loader.scalars import (
    as_bool,
    as_list,
    as_mark,
    as_port,
    as_str,
    choice,
)
from appliance.config.loader.section import LoadContext, Section
from appliance.config.model import (
    TUNNEL_MODES,
    Config,
    IgnoredKind,
    SkippedOutbound,
    TunnelMode,
)

TOP_LEVEL_KEYS = (
    "mixed-port", "socks-port", "port", "authentication", "allow-lan", "bind-address",
    "tproxy-port", "routing-mark", "ipv6", "log-level",
    *CONTROLLER_KEYS, "profile", "dns", "hosts", "proxies",
    "proxy-groups", "proxy-providers", "rules", "appliance", "rule-providers", "sub-rules",
    "geodata-mode", "geodata-loader", "geosite-matcher", "geo-auto-update",
    "geo-update-interval", "geox-url", "mode",
)  # fmt: skip
IGNORED_TOP_LEVEL = (
    "redir-port", "ss-config", "vmess-config",
    "inbound-tfo", "inbound-mptcp", "skip-auth-prefixes",
    "lan-allowed-ips", "lan-disallowed-ips",
    "unified-delay", "external-controller-pipe", "external-controller-unix",
    "external-controller-tls", "external-doh-server",
    "interface-name", "tunnels", "tcp-concurrent",
    "find-process-mode", "global-client-fingerprint", "global-ua",
    "etag-support", "keep-alive-idle", "keep-alive-interval",
    "disable-keep-alive",
    "listeners", "ntp", "tun", "tuic-server", "iptables", "experimental",
    "sniffer", "tls", "clash-for-android", "auto-redir",
    "mitm-port", "mitm", "script", "log-file",
)  # fmt: skip
# Of those, the keys that have no meaning on a gateway (reported apart).
GATEWAY_TOP_LEVEL = (
    "redir-port", "tun", "auto-redir", "iptables", "interface-name", "find-process-mode",
    "clash-for-android", "external-controller-pipe", "external-controller-unix",
    "inbound-tfo", "inbound-mptcp", "ss-config", "vmess-config",
)  # fmt: skip
# Clash's old spellings (Clash before 1.0 and early Premium). mihomo's
# RawConfig has no field for them, so it reads them as nothing at all: a
# profile that has only `Proxy:` has no proxies in mihomo either.
LEGACY_TOP_LEVEL = {
    "Proxy": "proxies", "Proxy Group": "proxy-groups", "Rule": "rules",
    "proxy-provider": "proxy-providers", "rule-provider": "rule-providers",
}  # fmt: skip
_GATEWAY_KINDS: dict[str, IgnoredKind] = dict.fromkeys(GATEWAY_TOP_LEVEL, "gateway")
PROFILE_KEYS = ("store-fake-ip", "store-selected")
IGNORED_PROFILE = ("tracing",)


def parse_root(data: Any, ctx: LoadContext) -> Config:
    """The whole profile: each section in turn (proxies, then the groups that
    name them, then the rules that name both), then the top level's leftover
    keys, then `check_cross` on the built `Config`.

    With `ctx.collect` every section is read even after an error in an
    earlier one (the one broken key or item is reported, the rest is
    read), and the errors are raised together at the end; `check_cross`
    runs only on a profile with no error (it would judge stand-in
    defaults)."""
    root = Section(data, "", ctx)
    d = Config()

    def get(key: str, convert: Any, default: Any) -> Any:
        return ctx.attempt(lambda: root.get(key, convert, default), default)

    mode = get("mode", parse_mode, "rule")
    mixed_port = get("mixed-port", _optional_port, None)
    socks_port = get("socks-port", _optional_port, None)
    http_port = get("port", _optional_port, None)
    authentication = ctx.attempt(
        lambda: _parse_authentication(root.raw("authentication"), root.at("authentication")), ())
    allow_lan = get("allow-lan", as_bool, True)
    bind_address = get("bind-address", _bind_address, "*")
    tproxy_port = get("tproxy-port", _optional_port, None)
    routing_mark = get("routing-mark", as_mark, None)
    ipv6 = get("ipv6", as_bool, False)
    log_level = get("log-level", choice(("silent", "error", "warning", "info", "debug")), "info")
    external_controller, secret, controller = ctx.attempt(
        lambda: parse_controller(root), (None, "", d.controller))

    def parse_profile() -> tuple[bool, bool]:
        profile = root.section("profile")
        store_fake_ip = profile.get("store-fake-ip", as_bool, False)
        store_selected = profile.get("store-selected", as_bool, True)
        profile.finish(PROFILE_KEYS, IGNORED_PROFILE)
        return store_fake_ip, store_selected

    store_fake_ip, store_selected = ctx.attempt(parse_profile, (False, True))
    top_hosts = ctx.attempt(lambda: parse_hosts(root.raw("hosts"), root.at("hosts"), ctx), {})
    dns = ctx.attempt(lambda: parse_dns(root.section("dns"), top_hosts), d.dns)

    proxies, skipped = ctx.attempt(
        lambda: parse_proxies(root.raw("proxies"), root.at("proxies"), ctx), ([], {}))
    # Before parse_groups adds the groups it skips to `skipped`.
    skipped_proxies = dict(skipped)
    warn_udp_behind_dialer(proxies)
    providers = ctx.attempt(lambda: parse_proxy_providers(
        root.raw("proxy-providers"), root.at("proxy-providers"), ctx), [])
    groups = ctx.attempt(lambda: parse_groups(
        root.raw("proxy-groups"), root.at("proxy-groups"), ctx, proxies, skipped,
        {p.name: p.health.url if p.health.enable else "" for p in providers}), [])
    targets = {p.name for p in proxies} | {g.name for g in groups} | set(BUILTIN_TARGETS)
    ctx.attempt(lambda: check_provider_dialers(providers, targets | ctx.broken), None)
    # A rule naming a proxy or group whose own entry was broken is not
    # wrong a second time.
    targets |= ctx.broken
    rule_providers = ctx.attempt(lambda: parse_rule_providers(
        root.raw("rule-providers"), root.at("rule-providers"), ctx), [])
    provider_names = {p.name for p in rule_providers} | ctx.broken_providers
    ctx.attempt(lambda: check_dns_references(dns, "dns", targets, skipped, rule_providers,
                                             ctx.broken_providers), None)
    sub_rules = ctx.attempt(lambda: parse_sub_rules(
        root.raw("sub-rules"), root.at("sub-rules"), ctx, targets, skipped, provider_names), ())
    rules = ctx.attempt(lambda: parse_rules(
        root.raw("rules"), root.at("rules"), ctx, targets, skipped,
        sub_rules={name for name, _ in sub_rules} | ctx.broken_sub_rules,
        providers=provider_names), [])
    geodata = ctx.attempt(lambda: parse_geodata(root), d.geodata)
    appliance = ctx.attempt(lambda: parse_appliance(root.section("appliance")), d.appliance)
    for key, current in LEGACY_TOP_LEVEL.items():
        if key in root.data:
            root.raw(key)
            ctx.ignore(key, f"Clash's old spelling of {current!r}", kind="legacy")
    root.finish(TOP_LEVEL_KEYS, IGNORED_TOP_LEVEL,
                kinds=_GATEWAY_KINDS)
    raise_collected(ctx.errors)

    cfg = Config(
        mode=mode,
        mixed_port=mixed_port,
        socks_port=socks_port,
        http_port=http_port,
        authentication=authentication,
        allow_lan=allow_lan,
        bind_address=bind_address,
        tproxy_port=tproxy_port,
        routing_mark=routing_mark,
        ipv6=ipv6,
        log_level=cast(Any, log_level),
        external_controller=external_controller,
        secret=secret,
        controller=controller,
        store_fake_ip=store_fake_ip,
        store_selected=store_selected,
        dns=dns,
        proxies=tuple(proxies),
        proxy_groups=tuple(groups),
        proxy_providers=tuple(providers),
        rules=tuple(rules),
        sub_rules=sub_rules,
        rule_providers=tuple(rule_providers),
        geodata=geodata,
        appliance=appliance,
        ignored_keys=tuple(ctx.ignored),
        skipped=tuple(SkippedOutbound(name, "proxy" if name in skipped_proxies else "group", why)
                      for name, why in skipped.items()),
        load_notes=tuple(ctx.notes),
        source=ctx.source,
    )
    check_cross(cfg)
    return cfg


def _parse_authentication(raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    """Clash `authentication: ["user:pass", ...]` (split at the first colon,
    as mihomo does) -> ((user, pass), ...). RFC 1929 bounds both to 1..255
    bytes; a user listed twice is an error."""
    if raw is None:
        return ()
    users: list[tuple[str, str]] = []
    for i, item in enumerate(as_list(raw, path)):
        at = index_path(path, i)
        user, sep, password = as_str(item, at).partition(":")
        if not sep or not user or not password:
            raise ConfigError(at, "<hidden>", 'expected "username:password"')
        if len(user.encode()) > 255 or len(password.encode()) > 255:
            raise ConfigError(at, "<hidden>", "username and password are at most 255 bytes each")
        if any(u == user for u, _ in users):
            raise ConfigError(at, user, "username listed twice")
        users.append((user, password))
    return tuple(users)


def parse_mode(value: Any, path: str) -> TunnelMode:
    """mihomo's `mode`, any letter case (tunnel/mode.go); anything else is
    "invalid mode" there too."""
    text = value.lower() if isinstance(value, str) else None
    for mode in TUNNEL_MODES:
        if text == mode:
            return mode
    raise ConfigError(path, value, "must be rule, global or direct (any case)")


def _bind_address(value: Any, path: str) -> str:
    """`*` (every LAN address) or one IP literal."""
    text = as_str(value, path).strip()
    if text == "*":
        return text
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise ConfigError(path, value, 'expected "*" or an IP address') from None


def _optional_port(value: Any, path: str) -> int | None:
    # Clash spells "this listener is off" as port 0.
    if type(value) is int and value == 0:
        return None
    return as_port(value, path)
