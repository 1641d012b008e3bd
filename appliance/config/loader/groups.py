"""`proxy-groups:`: members resolved by name, cycles refused, here only.

Nothing downstream re-checks: an outbound builder can take every member name
as one that exists and every group graph as acyclic.
"""

from __future__ import annotations

from typing import Any, cast

from appliance.config.loader.errors import NO_VALUE, ConfigError, index_path
from appliance.config.loader.proxies import BUILTIN_TARGETS
from appliance.config.loader.scalars import as_list, as_nonempty_str
from appliance.config.loader.section import LoadContext, Section
from appliance.config.model import ProxyConfig, ProxyGroupConfig

GROUP_KEYS = ("name", "type", "proxies")
IGNORED_GROUP = (
    "use", "url", "interval", "timeout", "max-failed-times", "lazy",
    "disable-udp", "filter", "exclude-filter", "exclude-type",
    "expected-status", "include-all", "include-all-proxies",
    "include-all-providers", "hidden", "icon", "tolerance", "strategy",
    "interface-name", "routing-mark",
)  # fmt: skip


def parse_groups(
    value: Any,
    path: str,
    ctx: LoadContext,
    proxies: list[ProxyConfig],
    skipped: dict[str, str],
) -> list[ProxyGroupConfig]:
    """select and fallback as such; url-test and load-balance are run as
    fallback (first reachable member, in order) and reported; relay is skipped.
    Members that name skipped proxies are dropped; a group left empty is
    skipped in turn (and reported)."""
    if value is None:
        return []
    proxy_names = {p.name for p in proxies}
    entries: list[tuple[Section, str, str, list[tuple[str, str]]]] = []
    group_names: set[str] = set()
    for i, item in enumerate(as_list(value, path)):
        sec = Section(item, index_path(path, i), ctx)
        name = sec.require("name", as_nonempty_str)
        if name in group_names or name in proxy_names or name in skipped:
            raise ConfigError(
                sec.at("name"), name, "duplicate name (proxies and groups share names)"
            )
        if name in BUILTIN_TARGETS:
            raise ConfigError(sec.at("name"), name, "reserved name (a built-in target)")
        group_names.add(name)
        gtype = sec.require("type", as_nonempty_str)
        members_raw = sec.raw("proxies")
        members: list[tuple[str, str]] = []
        if members_raw is not None:
            for j, member in enumerate(as_list(members_raw, sec.at("proxies"))):
                member_path = index_path(sec.at("proxies"), j)
                members.append((as_nonempty_str(member, member_path), member_path))
        sec.finish(GROUP_KEYS, IGNORED_GROUP)
        if gtype in ("url-test", "load-balance"):
            ctx.ignore(sec.at("type"), f"{gtype} runs as fallback")
            gtype = "fallback"
        elif gtype == "relay":
            ctx.ignore(sec.path, f"relay group {name!r}")
            skipped[name] = "a relay group, which Mirage does not implement"
            continue
        elif gtype not in ("select", "fallback"):
            raise ConfigError(
                sec.at("type"), gtype,
                "unknown group type (select, fallback; url-test and load-balance run as fallback)",
            )  # fmt: skip
        if (
            not members
            and members_raw is None
            and (sec.data.get("use") is None and not sec.data.get("include-all"))
        ):
            raise ConfigError(sec.at("proxies"), NO_VALUE, "a group needs members")
        entries.append((sec, name, gtype, members))

    # Members may name groups defined later; resolve after all names are known.
    known = proxy_names | group_names | set(BUILTIN_TARGETS)
    for _sec, name, _gtype, members in entries:
        for member, member_path in members:
            if member == name:
                raise ConfigError(member_path, member, "a group cannot contain itself")
            if member not in known and member not in skipped:
                raise ConfigError(member_path, member, "no proxy or group has this name")

    # Skip groups left without a usable member until nothing changes (an
    # emptied group is skipped, which may empty the groups that contain it).
    changed = True
    while changed:
        changed = False
        for sec, name, _gtype, members in entries:
            if name not in skipped and all(m in skipped for m, _ in members):
                ctx.ignore(sec.path, f"group {name!r} has no usable member")
                skipped[name] = "a group with no member Mirage can use"
                changed = True
    groups: list[ProxyGroupConfig] = []
    for _sec, name, gtype, members in entries:
        if name in skipped:
            continue
        usable: list[str] = []
        for member, member_path in members:
            if member in skipped:
                ctx.ignore(member_path, f"{member!r} skipped")
            else:
                usable.append(member)
        groups.append(ProxyGroupConfig(name=name, type=cast(Any, gtype), proxies=tuple(usable)))
    _check_group_cycles(groups, entries)
    return groups


def _check_group_cycles(
    groups: list[ProxyGroupConfig], entries: list[tuple[Section, str, str, Any]]
) -> None:
    members = {g.name: g.proxies for g in groups}
    paths = {name: sec.at("proxies") for sec, name, _t, _m in entries}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for member in members.get(name, ()):
            if member not in members:
                continue
            if state.get(member) == 1:
                cycle = [*trail[trail.index(member) :], member] if member in trail else [member]
                raise ConfigError(paths[name], " -> ".join(cycle), "groups contain each other")
            if state.get(member) is None:
                visit(member, [*trail, member])
        state[name] = 2

    for g in groups:
        if state.get(g.name) is None:
            visit(g.name, [g.name])
