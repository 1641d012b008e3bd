"""`proxy-providers:` as mihomo reads them (adapter/provider/parser.go).

Only the provider's own keys are read here; the proxies it yields are
read at run time (appliance/providers/proxies.py) by the same proxy loader
as a profile's, so a provider's proxy of a type Mirage cannot speak is
skipped with the same reason.
"""

from __future__ import annotations

import re
from typing import Any, cast

from appliance.config.loader.errors import ConfigError, key_path
from appliance.config.loader.groups import (
    expected_status,
    probe_url,
    regex_list,
    weak_bool,
    weak_int,
)
from appliance.config.loader.scalars import as_list, as_nonempty_str, as_path, as_str, choice
from appliance.config.loader.section import LoadContext, Section, fold_case
from appliance.config.model import (
    DEFAULT_TEST_URL,
    HealthCheckConfig,
    MemberFilter,
    ProviderOverride,
    ProxyProviderConfig,
)

PROVIDER_KEYS = (
    "type", "url", "path", "interval", "proxy", "size-limit", "header",
    "health-check", "filter", "exclude-filter", "exclude-type", "override", "payload",
)  # fmt: skip
IGNORED_PROVIDER = ("dialer-proxy",)
HEALTH_KEYS = ("enable", "url", "interval", "timeout", "lazy", "expected-status")
OVERRIDE_KEYS = (
    "skip-cert-verify", "udp", "dialer-proxy", "ip-version", "additional-prefix",
    "additional-suffix", "proxy-name",
)  # fmt: skip
IGNORED_OVERRIDE = (
    "tfo", "mptcp", "up", "down", "interface-name", "routing-mark", "udp-over-tcp",
)  # fmt: skip


_HTTP_URL = re.compile(r"^https?://[^/\s]+", re.IGNORECASE)


def _provider_url(value: Any, path: str) -> str:
    """The subscription URL as written (a string; may be a placeholder,
    which `_provider` reports)."""
    return as_str(value, path).strip()


def parse_proxy_providers(value: Any, path: str, ctx: LoadContext) -> list[ProxyProviderConfig]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ConfigError(path, value, "expected a mapping of provider names")
    out: list[ProxyProviderConfig] = []
    for name, item in value.items():
        try:
            out.append(_provider(name, item, path, ctx))
        except ConfigError as err:
            # Its name stays known: a group's `use:` of it is not a second error.
            ctx.fail(err)
            ctx.broken.add(str(name))
    return out


def _provider(name: Any, item: Any, path: str, ctx: LoadContext) -> ProxyProviderConfig:
    """One `proxy-providers.NAME`. Raises ConfigError."""
    sec = Section(item, key_path(path, str(name)), ctx, fold_case)
    ptype = sec.require("type", choice(("http", "file", "inline")))
    url = sec.get("url", _provider_url, None)
    if ptype == "http" and url is None:
        raise ConfigError(sec.at("url"), "<none>", "an http provider needs a url")
    if url is not None and not _HTTP_URL.match(url):
        # A template's placeholder ('订阅链接1', ''): mihomo loads it and its
        # downloads fail; so do Mirage's (the source refuses the URL).
        ctx.ignore(sec.at("url"), "not an http(s) URL: never downloaded; the provider holds "
                   "its cached copy, if any, else nothing", kind="unimplemented")
    file_path = sec.get("path", lambda v, p: as_path(v, p, ctx.base), None)
    if ptype == "file" and file_path is None:
        raise ConfigError(sec.at("path"), "<none>", "a file provider needs a path")
    payload: tuple[object, ...] = ()
    if ptype == "inline":
        payload = tuple(sec.get("payload", as_list, []))
    header: list[tuple[str, str]] = []
    raw_header = sec.raw("header")
    if isinstance(raw_header, dict):
        for k, v in raw_header.items():
            for one in v if isinstance(v, list) else [v]:
                header.append((str(k), str(one)))
    no_regex: tuple[str, ...] = ()
    filters = sec.get("filter", lambda v, p: regex_list(v, p, ctx), no_regex)
    exclude = sec.get("exclude-filter", lambda v, p: regex_list(v, p, ctx), no_regex)
    exclude_type = sec.get("exclude-type", as_str, "")
    health = _health(sec.section("health-check"))
    override = _override(sec.section("override"))
    provider = ProxyProviderConfig(
        name=str(name),
        type=cast(Any, ptype),
        url=url,
        path=file_path,
        interval=float(sec.get("interval", weak_int(0, 86400 * 365, "seconds"), 0)),
        proxy=sec.get("proxy", as_nonempty_str, None),
        size_limit=sec.get("size-limit", weak_int(0, 1 << 40, "bytes"), 0),
        header=tuple(header),
        health=health,
        filter=MemberFilter(
            filter=filters,
            exclude_filter=exclude[0] if exclude else None,
            exclude_type=tuple(t for t in exclude_type.split("|") if t.strip()),
        ),
        override=override,
        payload=payload,
    )
    sec.finish(PROVIDER_KEYS, IGNORED_PROVIDER)
    return provider


def _health(sec: Section) -> HealthCheckConfig:
    health = HealthCheckConfig(
        enable=sec.get("enable", weak_bool, False),
        url=probe_url(sec, DEFAULT_TEST_URL),
        interval=float(sec.get("interval", weak_int(0, 86400 * 7, "seconds"), 0)),
        timeout=sec.get("timeout", weak_int(0, 600_000, "milliseconds"), 5000) / 1000 or 5.0,
        lazy=sec.get("lazy", weak_bool, True),
        expected_status=sec.get("expected-status", expected_status, ()),
    )
    sec.finish(HEALTH_KEYS, ())
    return health


def _override(sec: Section) -> ProviderOverride:
    names: list[tuple[str, str]] = []
    raw = sec.raw("proxy-name")
    if raw is not None:
        for i, item in enumerate(as_list(raw, sec.at("proxy-name"))):
            at = f"{sec.at('proxy-name')}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(at, item, "expected {pattern, target}")
            pattern = as_str(item.get("pattern"), f"{at}.pattern")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{at}.pattern", pattern, f"bad regex: {e}") from None
            names.append((pattern, as_str(item.get("target", ""), f"{at}.target")))
    override = ProviderOverride(
        skip_cert_verify=sec.get("skip-cert-verify", weak_bool, None),
        udp=sec.get("udp", weak_bool, None),
        dialer_proxy=sec.get("dialer-proxy", as_nonempty_str, None),
        ip_version=sec.get("ip-version", as_nonempty_str, None),
        additional_prefix=sec.get("additional-prefix", as_str, ""),
        additional_suffix=sec.get("additional-suffix", as_str, ""),
        proxy_name=tuple(names),
    )
    sec.finish(OVERRIDE_KEYS, IGNORED_OVERRIDE)
    return override


def check_provider_dialers(providers: list[ProxyProviderConfig], names: set[str]) -> None:
    """An `override.dialer-proxy` must name a proxy, group or built-in."""
    for p in providers:
        d = p.override.dialer_proxy
        if d is not None and d not in names:
            raise ConfigError(f"proxy-providers.{p.name}.override.dialer-proxy", d,
                              "no proxy or group has this name")
