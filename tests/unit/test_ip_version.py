"""`ip-version` of a proxy's server: which families its name resolves to,
the order (and stagger) of TCP attempts, the one address UDP protocols
use, and the reasons it fails with. The selection is sans-I/O; the Dialer
is driven with a scripted resolver (no sockets)."""

from __future__ import annotations

import ipaddress
import logging

import pytest
import trio

from appliance.config import parse_config
from appliance.config.model import IPAddress
from appliance.dns.upstream_api import UpstreamError
from appliance.outbound.base import (
    HAPPY_EYEBALLS_DELAY,
    IP_VERSIONS,
    Dialer,
    OutboundEnv,
    OutboundError,
    check_family,
    connect_plan,
    pick_udp_address,
    resolve_families,
)

A1, A2 = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
B1, B2 = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")
D = HAPPY_EYEBALLS_DELAY


def test_resolve_families() -> None:
    assert resolve_families("dual", True) == (4, 6)
    assert resolve_families("ipv4-prefer", True) == (4, 6)
    assert resolve_families("ipv6-prefer", True) == (4, 6)
    assert resolve_families("ipv4", True) == (4,)
    assert resolve_families("ipv6", True) == (6,)
    # Top-level `ipv6: false` leaves A only, whatever the proxy prefers.
    for v in ("dual", "ipv4", "ipv4-prefer", "ipv6-prefer"):
        assert resolve_families(v, False) == (4,)
    with pytest.raises(OutboundError, match="IPv6 is off"):
        resolve_families("ipv6", False)


def test_connect_plan_orders() -> None:
    both = [B1, B2, A1, A2]
    # Preferred family first, the other one delay later, interleaved.
    assert connect_plan(both, "ipv4-prefer") == [(A1, D), (B1, D), (A2, D), (B2, D)]
    assert connect_plan(both, "ipv6-prefer") == [(B1, D), (A1, D), (B2, D), (A2, D)]
    # dual: both families' first address at once (mihomo races the stacks).
    assert connect_plan(both, "dual") == [(B1, 0.0), (A1, D), (B2, D), (A2, D)]
    # Single stack: the other family is never tried.
    assert connect_plan(both, "ipv4") == [(A1, D), (A2, D)]
    assert connect_plan(both, "ipv6") == [(B1, D), (B2, D)]
    # One family only resolved: no zero-delay race in dual.
    assert connect_plan([A1, A2], "dual") == [(A1, D), (A2, D)]
    assert connect_plan([A1], "ipv6-prefer") == [(A1, D)]
    assert connect_plan([], "dual") == []


def test_pick_udp_address() -> None:
    both = [B1, A1, A2]
    assert pick_udp_address(both, "dual") == A1  # mihomo: dual prefers IPv4
    assert pick_udp_address(both, "ipv4-prefer") == A1
    assert pick_udp_address(both, "ipv4") == A1
    assert pick_udp_address(both, "ipv6-prefer") == B1
    assert pick_udp_address(both, "ipv6") == B1
    # The other family when the preferred one has no address.
    assert pick_udp_address([B2], "ipv4-prefer") == B2
    assert pick_udp_address([A2], "ipv6-prefer") == A2
    with pytest.raises(OutboundError):
        pick_udp_address([], "dual")


def test_check_family() -> None:
    for v in IP_VERSIONS:
        if v != "ipv6":
            check_family(A1, v)
        if v != "ipv4":
            check_family(B1, v)
    with pytest.raises(OutboundError, match="db8::1 is an IPv6 address, but ip-version is ipv4"):
        check_family(B1, "ipv4")
    with pytest.raises(OutboundError, match="IPv4 address, but ip-version is ipv6"):
        check_family(A1, "ipv6")


class Records:
    """A scripted resolver: {family: addresses}; records what was asked."""

    def __init__(self, records: dict[int, list[IPAddress]]) -> None:
        self.records = records
        self.asked: list[int] = []

    async def __call__(self, name: str, family: int) -> tuple[list[IPAddress], int]:
        await trio.lowlevel.checkpoint()
        self.asked.append(family)
        if family not in self.records:
            raise UpstreamError(f"{name}: no answer for family {family}")
        return self.records[family], 60


async def test_dialer_resolves_only_the_allowed_families() -> None:
    records = Records({4: [A1], 6: [B1]})
    assert (await Dialer(records, None, ipv6=True, ip_version="ipv4").resolve("s.test"))[0] \
        == [A1]
    assert records.asked == [4]
    records.asked.clear()
    got, _ = await Dialer(records, None, ipv6=True, ip_version="dual").resolve("s.test")
    assert got == [B1, A1] and sorted(records.asked) == [4, 6]
    records.asked.clear()
    got, _ = await Dialer(records, None, ipv6=False, ip_version="ipv6-prefer").resolve("s.test")
    assert got == [A1] and records.asked == [4]


async def test_dialer_says_why_a_family_has_nothing() -> None:
    v6_only = Records({4: [], 6: [B1]})
    with pytest.raises(OutboundError) as e:
        await Dialer(v6_only, None, ipv6=True, ip_version="ipv4").dial("v6only.test", 443)
    assert e.value.reason == "cannot resolve v6only.test: no A record (ip-version: ipv4)"
    with pytest.raises(OutboundError) as e:
        await Dialer(v6_only, None, ipv6=False, ip_version="ipv6").dial("v6only.test", 443)
    assert e.value.reason == ("cannot resolve v6only.test: ip-version: ipv6, but IPv6 is off "
                              "(top-level ipv6: false)")
    assert v6_only.asked == [4]
    # A literal of the other family is refused before any socket.
    with pytest.raises(OutboundError, match="is an IPv6 address, but ip-version is ipv4"):
        await Dialer(v6_only, None, ipv6=True, ip_version="ipv4").dial("2001:db8::1", 443)
    with pytest.raises(OutboundError, match="is an IPv6 address, but ip-version is ipv4"):
        await Dialer(v6_only, None, ipv6=True, ip_version="ipv4").udp_address("2001:db8::1")


async def test_udp_address_follows_the_preference() -> None:
    both = Records({4: [A1], 6: [B1]})
    assert await Dialer(both, None, ipv6=True, ip_version="dual").udp_address("s.test") == A1
    assert await Dialer(both, None, ipv6=True,
                        ip_version="ipv6-prefer").udp_address("s.test") == B1
    assert await Dialer(both, None, ipv6=True, ip_version="ipv6").udp_address("s.test") == B1


def test_env_gives_the_proxy_its_ip_version() -> None:
    env = OutboundEnv(None, None, 5.0, True, ip_version="ipv4-prefer")
    dialer = env.server_dialer()
    assert dialer.ip_version == "ipv4-prefer" and dialer.ipv6
    with pytest.raises(ValueError):
        Dialer(None, None, ip_version="v4")


def _profile(**extra: object) -> dict[str, object]:
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]}, **extra}


def test_socks5_and_http_read_ip_version() -> None:
    cfg = parse_config(_profile(proxies=[
        {"name": "s", "type": "socks5", "server": "s.test", "port": 1080,
         "ip-version": "ipv6-prefer"},
        {"name": "h", "type": "http", "server": "h.test", "port": 3128},
    ]))
    s, h = cfg.proxies
    assert s.ip_version == "ipv6-prefer" and h.ip_version == "dual"
    assert "ip-version" not in " ".join(cfg.ignored_keys)
    # A value mihomo does not know it loads (and fails when used): here
    # that proxy is skipped, with the key path and the reason.
    bad = parse_config(_profile(proxies=[{"name": "s", "type": "socks5", "server": "s.test",
                                          "port": 1080, "ip-version": "v6"}]))
    assert bad.proxies == ()
    assert any("proxies[0].ip-version: 'v6': must be one of dual, ipv4" in k
               for k in bad.ignored_keys), bad.ignored_keys


def test_an_unreachable_ip_version_is_said_at_load(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        parse_config(_profile(proxies=[
            {"name": "six", "type": "socks5", "server": "s.test", "port": 1080,
             "ip-version": "ipv6"},
            {"name": "lit", "type": "socks5", "server": "2001:db8::1", "port": 1080,
             "ip-version": "ipv4"},
            {"name": "ok", "type": "socks5", "server": "192.0.2.1", "port": 1080,
             "ip-version": "ipv4"},
        ]))
    text = caplog.text
    assert "'six': ip-version: ipv6 with the top-level ipv6: false" in text
    assert "'lit': server 2001:db8::1 is an IPv6 address, but ip-version is ipv4" in text
    assert "'ok'" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_config(_profile(ipv6=True, proxies=[
            {"name": "six", "type": "socks5", "server": "s.test", "port": 1080,
             "ip-version": "ipv6"}]))
    assert "six" not in caplog.text


async def test_direct_honours_the_top_level_ipv6() -> None:
    """DIRECT is not a proxy: destinations keep RFC 8305's order (AAAA
    first) with `ipv6: true`, and only A records are asked for with
    `ipv6: false`, for TCP and for UDP."""
    from appliance.outbound.direct import DirectOutbound

    records = Records({4: [A1], 6: [B1]})
    off = DirectOutbound(records, None, 5.0, ipv6=False)
    assert (await off.dialer.resolve("d.test"))[0] == [A1]
    assert await off.udp_addresses.resolve("d.test") == A1
    assert set(records.asked) == {4}
    on = DirectOutbound(records, None, 5.0, ipv6=True)
    addresses, _ = await on.dialer.resolve("d6.test")
    assert connect_plan(addresses, on.dialer.ip_version) == [(B1, D), (A1, D)]
    assert await on.udp_addresses.resolve("d6.test") == B1


def test_udp_a_chain_cannot_carry_is_said_at_load(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        parse_config(_profile(proxies=[
            {"name": "hop", "type": "socks5", "server": "192.0.2.1", "port": 1080},
            {"name": "ss-via", "type": "ss", "server": "192.0.2.2", "port": 8388,
             "cipher": "aes-128-gcm", "password": "x", "udp": True, "dialer-proxy": "hop"},
            {"name": "tj-via", "type": "trojan", "server": "192.0.2.3", "port": 443,
             "password": "x", "udp": True, "dialer-proxy": "hop"},
            {"name": "socks-via", "type": "socks5", "server": "192.0.2.4", "port": 1080,
             "udp": True, "dialer-proxy": "hop"},
        ]))
    assert "SOCKS5 proxy behind a dialer-proxy ('socks-via')" in caplog.text
    assert "tj-via" not in caplog.text and "ss-via" not in caplog.text


async def test_a_named_direct_takes_ip_version() -> None:
    """`type: direct` with `ip-version` (mihomo's DirectOption): its
    destinations resolve and order by it; the built-in DIRECT keeps AAAA
    first."""
    from appliance.outbound.build import build_outbounds
    from appliance.outbound.direct import DirectOutbound

    cfg = parse_config(_profile(ipv6=True, proxies=[
        {"name": "d4", "type": "direct", "ip-version": "ipv4"},
        {"name": "d", "type": "direct"}]))
    assert [p.ip_version for p in cfg.proxies] == ["ipv4", "dual"]
    records = Records({4: [A1], 6: [B1]})
    out = build_outbounds(cfg, records)
    d4, d, builtin = out["d4"], out["d"], out["DIRECT"]
    assert isinstance(d4, DirectOutbound) and isinstance(d, DirectOutbound)
    assert isinstance(builtin, DirectOutbound)
    assert (await d4.dialer.resolve("x.test"))[0] == [A1]
    assert await d4.udp_addresses.resolve("x.test") == A1
    assert d.dialer.ip_version == "dual" and builtin.dialer.ip_version == "ipv6-prefer"
