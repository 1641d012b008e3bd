"""Proxy groups without a network: member lists (include-all, filters),
the choice each type makes from the delay history, load-balance keys,
cycles at load, store-selected, PASS, and the probe against a loopback
HTTP server."""

from __future__ import annotations

import ipaddress
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.config import ConfigError, parse_config
from appliance.config.model import IPAddress, MemberFilter
from appliance.flow import Flow
from appliance.outbound.base import OutboundError, UdpPeer
from appliance.outbound.groups import (
    FallbackGroup,
    LoadBalanceGroup,
    SelectGroup,
    URLTestGroup,
    filter_members,
    jump_hash,
    registered_domain,
    stable_hash,
)
from appliance.outbound.health import DelayHistory, ProbeError, url_delay
from appliance.outbound.selections import Selections
from appliance.routing import Router, flow_context


class Fake:
    """An outbound that records connects and fails when told to."""

    carries_udp = False

    def __init__(self, name: str, type_: str = "Socks5", *, up: bool = True) -> None:
        self.name, self.type, self.up = name, type_, up
        self.connects = 0

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        self.connects += 1
        if not self.up:
            raise OutboundError(f"{self.name} down")
        a, _b = trio.testing.memory_stream_pair()
        return a

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        raise OutboundError("no udp")


def profile(groups: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    proxies = [{"name": n, "type": "socks5", "server": "192.0.2.1", "port": 1080 + i}
               for i, n in enumerate(["HK 01", "HK 02", "JP 01", "US 01"])]
    proxies.append({"name": "old", "type": "ssr", "server": "x.example", "port": 1})
    return {"dns": {"enable": False}, "proxies": proxies, "proxy-groups": groups, **extra}


def test_include_all_filters_and_excludes_like_mihomo() -> None:
    cfg = parse_config(profile([
        {"name": "HK", "type": "url-test", "include-all-proxies": True, "filter": "^HK`JP"},
        {"name": "NotUS", "type": "select", "include-all": True, "exclude-filter": "US"},
        {"name": "Mixed", "type": "fallback", "proxies": ["US 01"], "include-all-proxies": True,
         "filter": "JP", "exclude-type": "Shadowsocks|http"},
    ]))
    groups = {g.name: g for g in cfg.proxy_groups}
    # filter picks from the include-all list (skipped 'old' dropped).
    assert groups["HK"].proxies == ("HK 01", "HK 02", "JP 01")
    assert groups["NotUS"].proxies == ("HK 01", "HK 02", "JP 01", "US 01")
    assert groups["NotUS"].filter.exclude_filter == "US"
    assert groups["Mixed"].proxies == ("US 01", "JP 01")
    assert groups["Mixed"].filter.exclude_type == ("Shadowsocks", "http")
    assert groups["HK"].health.interval == 300 and groups["HK"].health.timeout == 5


def test_filter_members_order_and_excludes() -> None:
    members = [Fake("HK 01"), Fake("JP 01"), Fake("HK 02", "Http"), Fake("US 01")]
    rules = MemberFilter(filter=("JP", "HK"), exclude_filter="02", exclude_type=("http",))
    assert [m.name for m in filter_members(members, rules)] == ["JP 01", "HK 01"]
    assert [m.name for m in filter_members(members, rules, use_filter=False)] == [
        "HK 01", "JP 01", "US 01"]


def test_probe_settings_and_expected_status() -> None:
    cfg = parse_config(profile([
        {"name": "A", "type": "url-test", "proxies": ["HK 01"], "url": "http://cp.example/x",
         "interval": "60", "timeout": 2500, "tolerance": 80, "lazy": False,
         "expected-status": "204/200-299", "max-failed-times": 3},
        {"name": "S", "type": "select", "proxies": ["A"]},
    ]))
    a, s = cfg.proxy_groups
    assert (a.health.url, a.health.interval, a.health.timeout, a.health.lazy) == (
        "http://cp.example/x", 60.0, 2.5, False)
    assert a.health.expected_status == ((204, 204), (200, 299))
    assert (a.tolerance, a.health.max_failed_times) == (80, 3)
    assert s.health.interval == 0  # select: probed on demand only
    with pytest.raises(ConfigError) as err:
        parse_config(profile([{"name": "A", "type": "url-test", "proxies": ["HK 01"],
                               "expected-status": "20x"}]))
    assert err.value.path == "proxy-groups[0].expected-status"


def test_cycles_are_load_errors_with_their_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(profile([{"name": "A", "type": "select", "proxies": ["B"]},
                              {"name": "B", "type": "fallback", "proxies": ["A", "HK 01"]}]))
    assert "A -> B -> A" in str(err.value) or "B -> A -> B" in str(err.value)
    data = profile([{"name": "G", "type": "select", "proxies": ["HK 01"]}])
    data["proxies"][0]["dialer-proxy"] = "G"
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert "dialer-proxy" in str(err.value)
    data["proxies"][0]["dialer-proxy"] = "nowhere"
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert err.value.path == "proxies[0].dialer-proxy"


async def test_url_test_picks_the_fastest_within_tolerance() -> None:
    delays = DelayHistory()
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    group = URLTestGroup("auto", [a, b, c], tolerance=50, delays=delays)
    url = group.health.url
    for name, ms in (("a", 300), ("b", 120), ("c", 0)):
        delays.record(name, url, ms)
    assert group.now == "b"
    delays.record("a", url, 100)  # faster, but within tolerance of b
    assert group.now == "b"
    delays.record("a", url, 40)
    assert group.now == "a"
    delays.record("a", url, 0)  # died: next fastest alive
    assert group.now == "b"
    await group.connect_tcp("x.example", 80)
    assert b.connects == 1


async def test_fallback_first_alive_and_moves_on_at_once() -> None:
    delays = DelayHistory()
    a, b, c = Fake("a", up=False), Fake("b"), Fake("c")
    group = FallbackGroup("fb", [a, b, c], delays=delays)
    assert group.now == "a"  # never probed: alive
    delays.record("a", group.health.url, 0)
    assert group.now == "b"
    delays.record("a", group.health.url, 10)
    await group.connect_tcp("x.example", 80)  # a fails the connect: b carries it
    assert (a.connects, b.connects) == (1, 1)
    assert group.now == "b"  # a is down for retry_after
    group.select("c")
    assert group.now == "c"


def test_load_balance_keys_are_stable_and_consistent() -> None:
    assert registered_domain("a.b.example.com") == "example.com"
    assert registered_domain("www.bbc.co.uk") == "bbc.co.uk"
    assert registered_domain("192.0.2.1") == "192.0.2.1"
    members = [Fake(f"p{i}") for i in range(5)]
    one = LoadBalanceGroup("lb", members)
    two = LoadBalanceGroup("lb", list(members))
    for host in ("www.example.com", "cdn.example.com", "video.example.com"):
        assert one.pick(host, None) is one.pick("example.com", None)
        assert two.pick(host, None) is one.pick(host, None)
    assert stable_hash("example.com") == stable_hash("example.com")
    # Jump hash: growing 5 -> 6 buckets moves about 1/6 of the keys, never more than half.
    moved = sum(jump_hash(k, 5) != jump_hash(k, 6) for k in range(2000))
    assert 200 < moved < 600
    # A dead member's keys go elsewhere; the others stay.
    delays = one.delays
    victim = one.pick("example.com", None)
    delays.record(victim.name, one.health.url, 0)
    assert one.pick("example.com", None) is not victim


async def test_round_robin_and_sticky_sessions() -> None:
    members = [Fake("a"), Fake("b"), Fake("c")]
    rr = LoadBalanceGroup("rr", members, strategy="round-robin")
    rr.current()  # routing's look at the group takes no turn
    assert [rr.pick("x.example", None).name for _ in range(4)] == ["a", "b", "c", "a"]
    sticky = LoadBalanceGroup("st", members, strategy="sticky-sessions")
    src = ipaddress.ip_address("192.168.1.10")
    first = sticky.pick("www.example.com", src)
    assert all(sticky.pick("img.example.com", src) is first for _ in range(5))


async def test_a_flows_chains_are_the_members_that_carried_it() -> None:
    """mihomo's `chains` name the members a flow really went through: a
    load-balance group's member for this destination (not one for any
    flow), a fallback's member that took over mid-connect."""
    from appliance.config import parse_rule
    from appliance.routing import Dispatcher, chain

    lb = LoadBalanceGroup("lb", [Fake("a"), Fake("b"), Fake("c")], strategy="round-robin")
    fb = FallbackGroup("fb", [Fake("x", up=False), Fake("y")])
    outbounds: dict[str, Any] = {"DIRECT": Fake("DIRECT", "Direct"), "lb": lb, "fb": fb,
                                 "Outer": SelectGroup("Outer", [lb])}
    d = Dispatcher(Router((parse_rule("DOMAIN-SUFFIX,lb.test,Outer"), parse_rule("MATCH,fb")),
                          outbounds), connect_timeout=2.0)

    def flow(domain: str) -> Flow:
        return Flow("tcp", "tproxy", ipaddress.ip_address("192.168.1.10"), 40000,
                    ipaddress.ip_address("198.18.0.9"), 80, domain)

    seen = []
    for _ in range(3):
        f = flow("www.lb.test")
        await d.connect_tcp(f)
        seen.append(f.chains)
    assert seen == [("a", "lb", "Outer"), ("b", "lb", "Outer"), ("c", "lb", "Outer")]
    assert chain(fb) == ("x", "fb")  # never probed: x counts as alive
    f = flow("other.test")
    await d.connect_tcp(f)
    assert f.chains == ("y", "fb")


async def test_select_remembered_in_the_state_dir(tmp_path: Path) -> None:
    from appliance.outbound.build import build_outbounds

    cfg = parse_config(profile([{"name": "S", "type": "select", "proxies": ["HK 01", "JP 01"]}]))
    first = Selections(tmp_path / "selected.json")
    out = build_outbounds(cfg, None, selections=first)
    out["S"].select("JP 01")  # type: ignore[attr-defined]
    out["GLOBAL"].select("S")  # type: ignore[attr-defined]
    again = build_outbounds(cfg, None, selections=Selections(tmp_path / "selected.json"))
    assert again["S"].now == "JP 01"  # type: ignore[attr-defined]
    assert again["GLOBAL"].now == "S"  # type: ignore[attr-defined]
    assert again["GLOBAL"].all[:3] == ["DIRECT", "REJECT", "HK 01"]  # type: ignore[attr-defined]


def test_pass_goes_on_matching() -> None:
    cfg = parse_config(profile(
        [{"name": "S", "type": "select", "proxies": ["PASS", "HK 01"]}],
        rules=["DOMAIN-SUFFIX,example.com,S", "DOMAIN-SUFFIX,example.com,PASS",
               "MATCH,JP 01"]))
    router = Router.from_config(cfg, None)
    flow = Flow("tcp", "tproxy", ipaddress.ip_address("192.168.1.2"), 5000,
                ipaddress.ip_address("198.18.0.9"), 443, "www.example.com")
    out, index = router.pick(flow_context(flow))
    assert (out.name, index) == ("JP 01", 2)
    router.outbounds["S"].select("HK 01")  # type: ignore[attr-defined]
    assert router.pick(flow_context(flow))[0].name == "S"


class Direct(Fake):
    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream(str(host), port)


async def test_probe_times_the_first_byte_and_checks_the_status() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(4096)
        status = b"204 No Content" if b"GET /ok " in data else b"500 Oops"
        await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        d = await url_delay(Direct("d"), f"http://127.0.0.1:{port}/ok", 2, ((204, 204),))
        assert d >= 1
        with pytest.raises(ProbeError, match="status 500"):
            await url_delay(Direct("d"), f"http://127.0.0.1:{port}/bad", 2, ((204, 204),))
        group = SelectGroup("s", [Direct("d")])
        assert await group.delay("d", f"http://127.0.0.1:{port}/bad") > 0  # any status
        assert [s.delay > 0 for s in group.delays.history("d")] == [True]
        nursery.cancel_scope.cancel()


def test_groups_use_providers_and_their_probe_url() -> None:
    cfg = parse_config(profile(
        [{"name": "Sub", "type": "url-test", "use": ["p1"], "exclude-filter": "US"},
         {"name": "All", "type": "select", "include-all-providers": True, "proxies": ["HK 01"]}],
        **{"proxy-providers": {
            "p1": {"type": "inline", "payload": [
                {"name": "a", "type": "socks5", "server": "192.0.2.9", "port": 1}],
                "health-check": {"enable": True, "url": "http://probe.example/204",
                                 "interval": 60}},
            "p2": {"type": "file", "path": "/nonexistent/p2.yaml"}}}))
    sub, every = cfg.proxy_groups
    assert sub.use == ("p1",) and sub.health.url == "http://probe.example/204"
    assert every.use == ("p1", "p2") and every.proxies == ("HK 01",)
    with pytest.raises(ConfigError) as err:
        parse_config(profile([{"name": "X", "type": "select", "use": ["nope"]}]))
    assert err.value.path == "proxy-groups[0].use[0]"


def test_provider_dialer_proxy_and_chains_are_built_in_order() -> None:
    from appliance.outbound.build import BuildError, build_outbounds
    from appliance.outbound.socks5 import Socks5Outbound

    bad = profile([], **{"proxy-providers": {"p": {"type": "inline", "payload": [],
                                                   "override": {"dialer-proxy": "nowhere"}}}})
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    assert err.value.path == "proxy-providers.p.override.dialer-proxy"
    data = profile([{"name": "G", "type": "select", "proxies": ["JP 01"]},
                    {"name": "Chain", "type": "relay", "proxies": ["HK 01", "G", "US 01"]}])
    data["proxies"][1]["dialer-proxy"] = "G"
    cfg = parse_config(data)
    out = build_outbounds(cfg, None)
    hk2 = out["HK 02"]
    assert isinstance(hk2, Socks5Outbound) and hk2.server_dial == out["G"].connect_tcp
    assert not hk2.carries_udp and hk2.preconnect is None
    chain = out["Chain"].chain()  # type: ignore[attr-defined]
    # US 01 through JP 01 (G's choice) through HK 01: each hop rebuilt with a via.
    assert chain.name == "US 01" and chain is not out["US 01"]
    assert chain.server_dial.__self__.name == "JP 01"
    assert chain.server_dial.__self__.server_dial.__self__ is out["HK 01"]
    # A provider whose proxies dial through a group that uses it: a loop.
    from appliance.config.model import ProxyConfig

    cfg2 = parse_config(profile(
        [{"name": "U", "type": "select", "use": ["p"]}],
        **{"proxy-providers": {"p": {"type": "inline", "payload": []}}}))
    looped = ProxyConfig("x", "socks5", "192.0.2.5", 1, dialer_proxy="U")
    with pytest.raises(BuildError, match="cycle"):
        build_outbounds(cfg2, None, provided={"p": (looped,)})


async def test_compatible_sends_direct_like_mihomo() -> None:
    # mihomo's COMPATIBLE is a Direct: an empty group, and a rule naming an
    # outbound Mirage skipped, send their flows DIRECT.
    from appliance.outbound.groups import CompatibleOutbound

    direct = Fake("DIRECT", "Direct")
    empty = SelectGroup("empty", [], compatible=CompatibleOutbound(direct=direct))
    assert empty.all == ["COMPATIBLE"]
    await empty.connect_tcp("a.test", 443)
    assert direct.connects == 1
    # On its own (no DIRECT given) it refuses, as before.
    with pytest.raises(OutboundError):
        await SelectGroup("alone", []).connect_tcp("a.test", 443)

    cfg = parse_config(profile([{"name": "dead", "type": "select", "proxies": ["old"]}],
                               rules=["DOMAIN,a.test,old", "DOMAIN,b.test,dead", "MATCH,DIRECT"]))
    router = Router.from_config(cfg, None)
    for name in ("old", "dead"):
        standin = router.outbounds[name]
        assert isinstance(standin, CompatibleOutbound) and standin.name == name
        assert standin.direct is router.outbounds["DIRECT"]
    flow = Flow("tcp", "tproxy", ipaddress.ip_address("192.168.1.2"), 5000,
                ipaddress.ip_address("198.18.0.9"), 443, "b.test")
    out, index = router.pick(flow_context(flow))
    assert (out.name, index) == ("dead", 1)


def test_relay_carries_udp_where_mihomo_does() -> None:
    """mihomo's Relay.SupportUDP, last hop first: a hop whose UDP rides its
    own stream (SupportUOT: trojan, vmess, vless) ends the search (the
    earlier hops carry that stream as TCP); a Shadowsocks hop sends its
    datagrams through the hop before it (SupportWithDialer), which must
    carry UDP in turn; a SOCKS5 hop cannot (mihomo: TCP only with a
    dialer) and ends it with no."""
    from appliance.outbound.build import build_outbounds

    data = profile([
        {"name": "ToTrojan", "type": "relay", "proxies": ["HK 01", "tj"]},
        {"name": "ToSs", "type": "relay", "proxies": ["HK 01", "ss"]},
        {"name": "ToTrojanNoUdp", "type": "relay", "proxies": ["HK 01", "tj"],
         "disable-udp": True},
        {"name": "OnlySs", "type": "relay", "proxies": ["DIRECT", "ss"]},
        {"name": "Empty", "type": "relay", "proxies": ["DIRECT"]},
        {"name": "ToSsOverTrojan", "type": "relay", "proxies": ["tj", "ss"]},
        {"name": "SsOverSs", "type": "relay", "proxies": ["ss", "ss-2"]},
        {"name": "ToSsOverUdpSocks", "type": "relay", "proxies": ["socks-udp", "ss"]},
        {"name": "ToHy2", "type": "relay", "proxies": ["HK 01", "hy2"]},
    ])
    data["proxies"] += [
        {"name": "tj", "type": "trojan", "server": "t.example", "port": 443,
         "password": "x", "udp": True},
        {"name": "ss", "type": "ss", "server": "s.example", "port": 8388,
         "cipher": "aes-128-gcm", "password": "x", "udp": True},
        {"name": "tj-via", "type": "trojan", "server": "t.example", "port": 443,
         "password": "x", "udp": True, "dialer-proxy": "HK 01"},
        {"name": "ss-via", "type": "ss", "server": "s.example", "port": 8388,
         "cipher": "aes-128-gcm", "password": "x", "udp": True, "dialer-proxy": "HK 01"},
        {"name": "ss-via-tj", "type": "ss", "server": "s.example", "port": 8388,
         "cipher": "aes-128-gcm", "password": "x", "udp": True, "dialer-proxy": "tj"},
        {"name": "ss-2", "type": "ss", "server": "s2.example", "port": 8388,
         "cipher": "aes-128-gcm", "password": "x", "udp": True},
        {"name": "socks-udp", "type": "socks5", "server": "192.0.2.9", "port": 1080,
         "udp": True},
        {"name": "hy2", "type": "hysteria2", "server": "h.example", "port": 443,
         "password": "x"},
    ]
    out = build_outbounds(parse_config(data), None)
    assert out["ToTrojan"].carries_udp
    assert not out["ToSs"].carries_udp
    assert not out["ToTrojanNoUdp"].carries_udp
    assert out["OnlySs"].carries_udp  # one hop: the proxy itself
    assert out["Empty"].carries_udp  # no hop: DIRECT
    # ss through a via: its datagrams as the via's UDP flow, while the via
    # carries UDP (HK 01 is a SOCKS5 proxy without `udp`).
    assert out["tj-via"].carries_udp and not out["ss-via"].carries_udp
    assert out["ToSsOverTrojan"].carries_udp and out["SsOverSs"].carries_udp
    assert out["ss-via-tj"].carries_udp
    # mihomo's rule: a SOCKS5 hop before an ss one ends it, udp or not.
    assert not out["ToSsOverUdpSocks"].carries_udp
    # QUIC hops cannot ride another proxy: the relay says so.
    with pytest.raises(OutboundError, match="cannot be chained"):
        out["ToHy2"].chain()  # type: ignore[attr-defined]
    assert not out["ToHy2"].carries_udp

    async def refused() -> None:
        with pytest.raises(OutboundError, match="does not carry UDP"):
            await out["ToSs"].open_udp("www.example.test", 53)

    trio.run(refused)
