"""`proxy-groups:` as mihomo reads them (adapter/outboundgroup/parser.go):
members resolved by name, the include-all family and filters applied,
probe settings read, cycles refused, here only.

Nothing downstream re-checks: an outbound builder can take every member
name as one that exists and every group graph (with `dialer-proxy`) as
acyclic. Members that name skipped proxies are dropped; a group left with
no member and nothing to take from providers is skipped in turn (both
reported). A relay that loses a hop is skipped (the chain would be another).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import replace
from typing import Any, cast

from appliance.config.loader.errors import NO_VALUE, ConfigError, index_path
from appliance.config.loader.proxies import BUILTIN_TARGETS
from appliance.config.loader.scalars import as_bool, as_list, as_nonempty_str, as_str, choice
from appliance.config.loader.section import LoadContext, Section, fold_case
from appliance.config.model import (
    DEFAULT_TEST_URL,
    HealthCheckConfig,
    IgnoredKind,
    MemberFilter,
    ProxyConfig,
    ProxyGroupConfig,
)

GROUP_TYPES = ("select", "url-test", "fallback", "load-balance", "relay")
STRATEGIES = ("consistent-hashing", "round-robin", "sticky-sessions")
GROUP_KEYS = (
    "name", "type", "proxies", "use", "url", "interval", "timeout", "lazy",
    "max-failed-times", "expected-status", "tolerance", "strategy", "filter",
    "exclude-filter", "exclude-type", "include-all", "include-all-proxies",
    "include-all-providers", "hidden", "icon", "disable-udp",
)  # fmt: skip
IGNORED_GROUP = ("interface-name", "routing-mark")
_GATEWAY_GROUP: dict[str, IgnoredKind] = dict.fromkeys(IGNORED_GROUP, "gateway")
# Probed group types: mihomo checks them every 300 s unless told otherwise.
PROBED = ("url-test", "fallback", "load-balance")
DEFAULT_INTERVAL = 300.0


def weak_int(lo: int, hi: int, what: str) -> Any:
    """An integer, or a string of one (mihomo decodes groups with
    WeaklyTypedInput: `interval: "300"` is 300)."""

    def convert(value: Any, path: str) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, f"expected {what}")
        if not lo <= value <= hi:
            raise ConfigError(path, value, f"out of range ({lo}..{hi})")
        return value

    return convert


def weak_bool(value: Any, path: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return as_bool(value, path)


def expected_status(value: Any, path: str) -> tuple[tuple[int, int], ...]:
    """mihomo's `expected-status`: `*` (any), `200`, `200-299`, or a
    `/`-separated list of those -> ranges (empty: any)."""
    text = str(value).strip() if isinstance(value, int | str) else None
    if text is None:
        raise ConfigError(path, value, "expected a status such as 204, 200-299 or 200/302")
    if text in ("", "*"):
        return ()
    ranges: list[tuple[int, int]] = []
    for part in text.split("/"):
        lo, sep, hi = part.strip().partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise ConfigError(path, value, "expected a status such as 204, 200-299 or 200/302")
        a, b = int(lo), int(hi) if sep else int(lo)
        if not 100 <= a <= b <= 999:
            raise ConfigError(path, value, "status codes are 100..999, low-high")
        ranges.append((a, b))
    return tuple(ranges)


def probe_url(sec: Section, default: str) -> str:
    """A group's or health check's `url`. mihomo loads any string there
    (its probes then fail); a string that is no http(s) URL is said at
    load, and the default is probed instead."""
    try:
        return sec.get("url", test_url, default)
    except ConfigError as err:
        if err.reason.startswith("expected an http"):
            sec.ctx.ignore(sec.at("url"), f"not an http(s) URL: {default} is probed instead",
                           kind="mode", error=err)
            return default
        raise


def test_url(value: Any, path: str) -> str:
    text = as_nonempty_str(value, path).strip()
    if not re.match(r"^https?://[^/\s]+", text, re.IGNORECASE):
        raise ConfigError(path, value, "expected an http:// or https:// URL")
    return text


def regex_list(value: Any, path: str, ctx: LoadContext) -> tuple[str, ...]:
    """`filter`: regexes split at backticks (mihomo). mihomo's regexp2 is
    .NET syntax; a pattern Python cannot compile is reported and dropped."""
    out: list[str] = []
    for pattern in as_str(value, path).split("`"):
        fixed = _python_regex(pattern)
        if fixed is None:
            ctx.ignore(path, "a filter Mirage cannot compile")
            continue
        out.append(fixed)
    return tuple(out)


def _python_regex(pattern: str) -> str | None:
    fixed = re.sub(r"\(\?<([A-Za-z_]\w*)>", r"(?P<\1>", pattern)
    try:
        re.compile(fixed)
    except re.error:
        return None
    return fixed


def parse_groups(
    value: Any,
    path: str,
    ctx: LoadContext,
    proxies: list[ProxyConfig],
    skipped: dict[str, str],
    providers: Collection[str] | dict[str, str] = (),
) -> list[ProxyGroupConfig]:
    """Every group of a type mihomo has, with its members resolved and its
    probe read. `providers` are the proxy-provider names (`use:`), or a
    map of them to their health-check URL ("" when off): a group that uses
    providers and names no `url` probes the first provider's, as mihomo."""
    provider_urls = providers if isinstance(providers, dict) else dict.fromkeys(providers, "")
    if value is None:
        return []
    proxy_names = {p.name for p in proxies}
    # include-all-proxies: every proxy of the file, in file order (skipped
    # ones too: they are dropped below, like any skipped member).
    all_proxies = [p.name for p in proxies] + [n for n in skipped if n not in proxy_names]
    entries: list[tuple[Section, ProxyGroupConfig, list[tuple[str, str]]]] = []
    group_names: set[str] = set()
    for i, item in enumerate(as_list(value, path)):
        try:
            entries.append(_parse_group(item, index_path(path, i), ctx, proxy_names, skipped,
                                        group_names, all_proxies, providers, provider_urls))
        except ConfigError as err:
            ctx.fail(err)
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                ctx.broken.add(item["name"])
                group_names.add(item["name"])

    # Members may name groups defined later; resolve after all names are known.
    known = proxy_names | group_names | set(BUILTIN_TARGETS) | ctx.broken
    for _sec, group, members in entries:
        for member, member_path in members:
            if member == group.name:
                ctx.fail(ConfigError(member_path, member, "a group cannot contain itself"))
            elif member not in known and member not in skipped:
                ctx.fail(ConfigError(member_path, member, "no proxy or group has this name"))

    # Skip groups left without a usable member until nothing changes (an
    # emptied group is skipped, which may empty the groups that contain it).
    changed = True
    while changed:
        changed = False
        for sec, group, members in entries:
            if group.name in skipped:
                continue
            if group.type == "relay" and any(m in skipped for m, _ in members):
                lost = next(m for m, _ in members if m in skipped)
                ctx.ignore(sec.path, f"relay {group.name!r}: hop {lost!r} skipped", kind="skipped")
                skipped[group.name] = f"a relay through {lost!r}, which Mirage cannot use"
                changed = True
            elif members and not group.use and all(m in skipped for m, _ in members):
                ctx.ignore(sec.path, f"group {group.name!r} has no usable member", kind="skipped")
                skipped[group.name] = "a group with no member Mirage can use"
                changed = True
    groups: list[ProxyGroupConfig] = []
    for _sec, group, members in entries:
        if group.name in skipped:
            continue
        usable: list[str] = []
        for member, member_path in members:
            if member in skipped:
                ctx.ignore(member_path, f"{member!r} skipped", kind="skipped")
            elif member not in usable:
                usable.append(member)
        groups.append(_with_members(group, usable))
    paths = {g.name: sec.at("proxies") for sec, g, _ in entries}
    ctx.attempt(lambda: check_cycles(groups, proxies, paths, skipped | dict.fromkeys(
        ctx.broken, "broken")), None)
    return groups


def _parse_group(item: Any, path: str, ctx: LoadContext, proxy_names: set[str],
                 skipped: dict[str, str], group_names: set[str], all_proxies: list[str],
                 providers: Collection[str] | dict[str, str], provider_urls: dict[str, str],
                 ) -> tuple[Section, ProxyGroupConfig, list[tuple[str, str]]]:
    """One `proxy-groups[i]`, its members not yet resolved. Raises ConfigError."""
    sec = Section(item, path, ctx, fold_case, exact=("name",))
    name = sec.require("name", as_nonempty_str)
    if name in group_names or name in proxy_names or name in skipped:
        raise ConfigError(
            sec.at("name"), name, "duplicate name (proxies and groups share names)"
        )
    if name in BUILTIN_TARGETS and name != "GLOBAL":
        # A profile may define GLOBAL itself (mihomo then shows its order).
        raise ConfigError(sec.at("name"), name, "reserved name (a built-in target)")
    group_names.add(name)
    gtype = sec.require("type", as_nonempty_str)
    if gtype not in GROUP_TYPES:
        raise ConfigError(sec.at("type"), gtype,
                          "unknown group type (" + ", ".join(GROUP_TYPES) + ")")
    members: list[tuple[str, str]] = []
    members_raw = sec.raw("proxies")
    if members_raw is not None:
        for j, member in enumerate(as_list(members_raw, sec.at("proxies"))):
            member_path = index_path(sec.at("proxies"), j)
            members.append((as_nonempty_str(member, member_path), member_path))
    include_all = sec.get("include-all", weak_bool, False)
    include_proxies = sec.get("include-all-proxies", weak_bool, False) or include_all
    include_providers = sec.get("include-all-providers", weak_bool, False) or include_all
    no_regex: tuple[str, ...] = ()
    filters = sec.get("filter", lambda v, p: regex_list(v, p, ctx), no_regex)
    exclude = sec.get("exclude-filter", lambda v, p: regex_list(v, p, ctx), no_regex)
    exclude_type = sec.get("exclude-type", as_str, "")
    use: list[str] = []
    use_raw = sec.raw("use")
    if use_raw is not None:
        for j, pname in enumerate(as_list(use_raw, sec.at("use"))):
            at = index_path(sec.at("use"), j)
            pname = as_nonempty_str(pname, at)
            if pname not in providers and pname not in ctx.broken:
                raise ConfigError(at, pname, "no proxy-provider has this name")
            use.append(pname)
    if include_providers:
        use = list(providers)
    if include_proxies:
        listed = {m for m, _ in members}
        for pname in all_proxies:
            if pname in listed:
                continue
            if filters and not any(re.search(f, pname) for f in filters):
                continue
            members.append((pname, sec.at("include-all-proxies")))
    if not members and not use and not include_proxies:
        raise ConfigError(sec.at("proxies"), NO_VALUE,
                          "a group needs members (proxies, use or include-all)")
    # mihomo: interval 0 (or none) on a probed group means 300 s; a
    # select or relay group is probed only on demand.
    interval = float(sec.get("interval", weak_int(0, 86400 * 7, "seconds"), 0))
    if gtype in PROBED and interval == 0:
        interval = DEFAULT_INTERVAL
    default_url = next((provider_urls[u] for u in use if provider_urls.get(u)),
                       DEFAULT_TEST_URL)
    health = HealthCheckConfig(
        enable=True,
        url=probe_url(sec, default_url),
        interval=interval,
        timeout=sec.get("timeout", weak_int(0, 600_000, "milliseconds"), 5000) / 1000
        or 5.0,
        lazy=sec.get("lazy", weak_bool, True),
        expected_status=sec.get("expected-status", expected_status, ()),
        max_failed_times=sec.get("max-failed-times", weak_int(0, 1 << 16, "a count"), 5)
        or 5,
    )
    group = ProxyGroupConfig(
        name=name,
        type=cast(Any, gtype),
        proxies=(),
        use=tuple(use),
        health=health,
        tolerance=sec.get("tolerance", weak_int(0, 65535, "milliseconds"), 0),
        strategy=sec.get("strategy", choice(STRATEGIES), "consistent-hashing"),
        filter=MemberFilter(
            filter=filters,
            exclude_filter=exclude[0] if exclude else None,
            exclude_type=tuple(t for t in exclude_type.split("|") if t.strip()),
        ),
        disable_udp=sec.get("disable-udp", weak_bool, False),
        hidden=sec.get("hidden", weak_bool, False),
        icon=sec.get("icon", as_str, ""),
    )
    sec.finish(GROUP_KEYS, IGNORED_GROUP, kinds=_GATEWAY_GROUP)
    return sec, group, members


def _with_members(group: ProxyGroupConfig, members: list[str]) -> ProxyGroupConfig:
    return replace(group, proxies=tuple(members))


def check_cycles(groups: list[ProxyGroupConfig], proxies: list[ProxyConfig],
                 paths: dict[str, str], skipped: dict[str, str]) -> None:
    """Groups that contain each other, and `dialer-proxy` chains that come
    back to where they started (through groups too), are errors; a
    dialer-proxy that names nothing is one as well."""
    edges: dict[str, tuple[str, ...]] = {g.name: g.proxies for g in groups}
    names = set(edges) | {p.name for p in proxies} | set(BUILTIN_TARGETS)
    names |= set(skipped)
    for i, p in enumerate(proxies):
        if p.dialer_proxy is None:
            continue
        at = f"proxies[{i}].dialer-proxy"
        if p.dialer_proxy not in names:
            raise ConfigError(at, p.dialer_proxy, "no proxy or group has this name")
        if p.dialer_proxy in skipped:
            raise ConfigError(at, p.dialer_proxy,
                              f"names a proxy Mirage skipped ({skipped[p.dialer_proxy]})")
        if p.dialer_proxy == p.name:
            raise ConfigError(at, p.dialer_proxy, "a proxy cannot dial through itself")
        edges[p.name] = (p.dialer_proxy,)
        paths.setdefault(p.name, at)
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for member in edges.get(name, ()):
            if member not in edges:
                continue
            if state.get(member) == 1:
                cycle = [*trail[trail.index(member):], member] if member in trail else [member]
                what = ("groups contain each other" if all(n in {g.name for g in groups}
                                                             for n in cycle)
                        else "dialer-proxy and groups form a loop")
                raise ConfigError(paths.get(name, name), " -> ".join(cycle), what)
            if state.get(member) is None:
                visit(member, [*trail, member])
        state[name] = 2

    for name in list(edges):
        if state.get(name) is None:
            visit(name, [name])
