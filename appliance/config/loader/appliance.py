"""`appliance:`: the settings only an appliance has (Mirage's own block)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar, cast

from appliance.config.loader.errors import ConfigError, index_path
from appliance.config.loader.scalars import (
    MAX_MARK,
    as_bool,
    as_cidr,
    as_int,
    as_list,
    as_nonempty_str,
    as_path,
    as_seconds,
    choice,
)
from appliance.config.loader.section import Section
from appliance.config.model import ApplianceConfig, IPNetwork, LimitsConfig

APPLIANCE_KEYS = (
    "lan", "redirect", "dns-hijack", "bypass", "state-dir",
    "store-flush-interval", "route-table", "capture-mark", "connect-timeout",
    "idle-timeout", "half-close-timeout", "udp-timeout", "udp-max-sessions", "offload-direct",
    "block-encrypted-dns", "encrypted-dns-resolvers", "limits", "controller-hosts",
)  # fmt: skip

LIMITS_KEYS = (
    "flows-per-client", "flows-total", "proxy-connections-per-client",
    "dns-upstream-per-client", "dns-tcp-per-client", "fake-ip-rate-per-client",
    "fake-ip-burst-per-client",
)  # fmt: skip
_T = TypeVar("_T")
# Ceiling of every count limit: far above any machine's descriptors.
_MAX_LIMIT = 1 << 22


def _host_names(value: Any, path: str) -> tuple[str, ...]:
    """DNS names, lower case, without a trailing dot."""
    names = []
    for i, item in enumerate(as_list(value, path)):
        name = as_nonempty_str(item, f"{path}[{i}]").strip().rstrip(".").lower()
        if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", name) or len(name) > 253:
            raise ConfigError(f"{path}[{i}]", item, "not a DNS name")
        names.append(name)
    return tuple(names)


_IFNAME = re.compile(r"[^\s/:]{1,15}")


def _ifname(value: Any, path: str) -> str:
    text = as_nonempty_str(value, path)
    if not _IFNAME.fullmatch(text) or text in (".", ".."):
        raise ConfigError(
            path, value, "not a Linux interface name (1-15 characters, no space, '/' or ':')"
        )
    return text


def parse_appliance(sec: Section) -> ApplianceConfig:
    """`appliance:`; every key is Mirage's own, so none is ever ignored and
    an unknown one is an error (mihomo has no such block to be lenient like;
    a typo here would silently change what the gateway does)."""
    d = ApplianceConfig()
    ctx = sec.ctx

    def get(key: str, convert: Callable[[Any, str], _T], default: _T) -> _T:
        # Each key on its own: a bad one is reported and the next still read.
        return ctx.attempt(lambda: sec.get(key, convert, default), default)

    lan: list[str] = ctx.attempt(lambda: _lan(sec), [])
    redirect = get("redirect", choice(("nftables", "ebpf", "auto")), d.redirect)
    dns_hijack = get("dns-hijack", as_bool, d.dns_hijack)
    bypass = ctx.attempt(lambda: _networks(sec, "bypass"), ())
    state_dir = get("state-dir", lambda v, p: as_path(v, p, ctx.base), d.state_dir)
    flush = get("store-flush-interval", as_seconds, d.store_flush_interval)
    # 0 and 253-255 are the kernel's unspec/default/main/local tables.
    route_table = get("route-table", lambda v, p: _route_table(v, p), d.route_table)
    capture_mark = get("capture-mark", lambda v, p: as_int(v, p, 1, MAX_MARK), d.capture_mark)
    connect_timeout = get("connect-timeout", as_seconds, d.connect_timeout)
    idle_timeout = get("idle-timeout", as_seconds, d.idle_timeout)
    half_close_timeout = get("half-close-timeout", as_seconds, d.half_close_timeout)
    udp_timeout = get("udp-timeout", as_seconds, d.udp_timeout)
    udp_max_sessions = get(
        "udp-max-sessions", lambda v, p: as_int(v, p, 1, 1 << 20), d.udp_max_sessions
    )
    offload_direct = get("offload-direct", as_bool, d.offload_direct)
    if offload_direct and redirect == "ebpf":
        ctx.fail(ConfigError(
            sec.at("offload-direct"),
            offload_direct,
            "needs appliance.redirect nftables (or auto): the eBPF program hands fake-IP "
            "packets to Mirage before nftables could translate them",
        ))
    limits = ctx.attempt(lambda: parse_limits(sec.section("limits")), d.limits)
    block_encrypted_dns = get("block-encrypted-dns", as_bool, d.block_encrypted_dns)
    encrypted_dns_resolvers = ctx.attempt(lambda: _networks(sec, "encrypted-dns-resolvers"), ())
    controller_hosts = get("controller-hosts", _host_names, d.controller_hosts)
    sec.finish(APPLIANCE_KEYS, (), strict=True)
    return ApplianceConfig(
        lan=tuple(lan),
        redirect=cast(Any, redirect),
        dns_hijack=dns_hijack,
        bypass=bypass,
        state_dir=state_dir,
        store_flush_interval=flush,
        route_table=route_table,
        capture_mark=capture_mark,
        controller_hosts=controller_hosts,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        half_close_timeout=half_close_timeout,
        udp_timeout=udp_timeout,
        udp_max_sessions=udp_max_sessions,
        offload_direct=offload_direct,
        block_encrypted_dns=block_encrypted_dns,
        encrypted_dns_resolvers=encrypted_dns_resolvers,
        limits=limits,
    )


def _lan(sec: Section) -> list[str]:
    lan_raw = sec.raw("lan")
    lan: list[str] = []
    if lan_raw is not None:
        if isinstance(lan_raw, str):
            lan_raw = [lan_raw]
        for i, item in enumerate(as_list(lan_raw, sec.at("lan"))):
            name = _ifname(item, index_path(sec.at("lan"), i))
            if name in lan:
                raise ConfigError(index_path(sec.at("lan"), i), item, "listed twice")
            lan.append(name)
    return lan


def _count(value: Any, path: str) -> int:
    return as_int(value, path, 1, _MAX_LIMIT, "a whole number")


def _rate(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(path, value, "not a number (per second)")
    rate = float(value)
    if not 0 < rate <= _MAX_LIMIT:  # also refuses NaN
        raise ConfigError(path, value, f"must be more than 0 and at most {_MAX_LIMIT} per second")
    return rate


def parse_limits(sec: Section) -> LimitsConfig:
    """`appliance.limits`: per-client fair shares (LimitsConfig). Counts are
    whole numbers from 1; `flows-total` is one too, or `auto` (the default:
    sized from memory and the descriptor limit at start)."""
    d = LimitsConfig()
    flows_total = d.flows_total
    total_raw = sec.raw("flows-total")
    if total_raw is not None and total_raw != "auto":
        flows_total = as_int(total_raw, sec.at("flows-total"), 64, _MAX_LIMIT,
                             "a whole number or 'auto'")
    flows_per_client = sec.get("flows-per-client", _count, d.flows_per_client)
    if flows_total is not None and flows_per_client > flows_total:
        raise ConfigError(sec.at("flows-per-client"), flows_per_client,
                          f"more than flows-total ({flows_total}): one client could take all")
    limits = LimitsConfig(
        flows_per_client=flows_per_client,
        flows_total=flows_total,
        proxy_connections_per_client=sec.get(
            "proxy-connections-per-client", _count, d.proxy_connections_per_client),
        dns_upstream_per_client=sec.get(
            "dns-upstream-per-client", _count, d.dns_upstream_per_client),
        dns_tcp_per_client=sec.get("dns-tcp-per-client", _count, d.dns_tcp_per_client),
        fake_ip_rate_per_client=sec.get(
            "fake-ip-rate-per-client", _rate, d.fake_ip_rate_per_client),
        fake_ip_burst_per_client=sec.get(
            "fake-ip-burst-per-client", _count, d.fake_ip_burst_per_client),
    )
    sec.finish(LIMITS_KEYS, (), strict=True)
    return limits


def _networks(sec: Section, key: str) -> tuple[IPNetwork, ...]:
    """A list of v4/v6 networks (`bypass`, `encrypted-dns-resolvers`), in
    order, duplicates dropped."""
    nets: list[IPNetwork] = []
    raw = sec.raw(key)
    if raw is not None:
        for i, item in enumerate(as_list(raw, sec.at(key))):
            net = as_cidr(item, index_path(sec.at(key), i))
            if net not in nets:
                nets.append(net)
    return tuple(nets)


def _route_table(value: Any, path: str) -> int:
    table = as_int(value, path, 1, MAX_MARK, "a routing table number")
    if table in (253, 254, 255):
        raise ConfigError(path, value, "253-255 are the kernel's default/main/local tables")
    return table
