"""The dispatcher: a Flow in, the rules' decision recorded in it, its
outbound opened; reloads, the DIRECT offload offer, the outbound registry.
Loopback sockets only."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio

from appliance.config import parse_rule
from appliance.config.model import Config, IPAddress, ProxyConfig, Rule
from appliance.flow import Entry, Flow, Inbound, tproxy_entry
from appliance.outbound.base import OutboundEnv, OutboundError, UdpPeer
from appliance.outbound.build import BUILDERS, build_outbounds
from appliance.routing import Dispatcher, Router, flow_context

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
FAKE = ipaddress.IPv4Address("198.18.0.7")


def tcp_flow(domain: str | None, port: int, *, inbound: Inbound = "tproxy",
             src_port: int = 40000) -> Flow:
    dst = FAKE if domain is not None else LOOPBACK
    return Flow("tcp", inbound, ipaddress.IPv4Address("192.168.56.10"), src_port, dst, port,
                domain)


async def resolve(name: str, family: int) -> tuple[list[IPAddress], int]:
    await trio.lowlevel.checkpoint()
    return ([LOOPBACK] if family == 4 else []), 60


def dispatcher(*rules: Rule, proxies: tuple[ProxyConfig, ...] = ()) -> Dispatcher:
    cfg = Config(rules=rules, proxies=proxies)
    return Dispatcher(Router.from_config(cfg, resolve), connect_timeout=2.0)


@pytest.fixture
async def web_port(nursery: trio.Nursery) -> AsyncIterator[int]:
    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello")

    listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    yield listeners[0].socket.getsockname()[1]


async def test_tcp_decision_is_recorded_in_the_flow(web_port: int) -> None:
    rule = parse_rule("DOMAIN-SUFFIX,web.test,DIRECT")
    d = dispatcher(parse_rule("DOMAIN,ads.test,REJECT"), rule)
    flow = tcp_flow("www.web.test", web_port)
    stream = await d.connect_tcp(flow)
    async with stream:
        assert await stream.receive_some(5) == b"hello"
    assert (flow.outbound, flow.rule) == ("DIRECT", rule)
    rejected = tcp_flow("ads.test", web_port)
    with pytest.raises(OutboundError, match="rejected"):
        await d.connect_tcp(rejected)
    assert rejected.outbound == "REJECT" and rejected.rule is not None


async def test_tcp_flows_see_their_source_port() -> None:
    # One FlowContext for every flow: SRC-PORT rules match TCP as they do UDP.
    d = dispatcher(parse_rule("SRC-PORT,5555,REJECT"))
    with pytest.raises(OutboundError, match="rejected"):
        await d.connect_tcp(tcp_flow("a.test", 80, src_port=5555))


async def test_in_rules_see_how_the_flow_came_in() -> None:
    """IN-TYPE / IN-PORT / IN-NAME / IN-USER match the listener's Entry, as
    mihomo's metadata (a flow with no Entry matches none of them)."""
    router = Router.from_config(Config(rules=(
        parse_rule("IN-USER,alice,REJECT"),
        parse_rule("AND,((IN-TYPE,TPROXY),(IN-PORT,7893),(IN-NAME,DEFAULT-TPROXY)),REJECT-DROP"),
        parse_rule("IN-TYPE,SOCKS,REJECT"),
        parse_rule("MATCH,DIRECT"))), resolve)
    socks = Entry("mixed", 7890, "DEFAULT-MIXED", "SOCKS5")

    def flow(entry: Entry | None) -> Flow:
        return Flow("tcp", entry.inbound if entry else "tproxy",
                    ipaddress.IPv4Address("192.168.56.10"), 40000, FAKE, 80, "x.test",
                    entry=entry)

    assert flow_context(flow(tproxy_entry(7893))).in_name == "DEFAULT-TPROXY"
    cases = [(tproxy_entry(7893), 1), (tproxy_entry(7000), 3),
             (Entry("mixed", 7890, "DEFAULT-MIXED", "HTTPS", "alice"), 0), (socks, 2),
             (None, 3)]
    for entry, index in cases:
        _, i, _ = await router.route(flow_context(flow(entry)))
        assert i == index, entry


async def test_a_reload_routes_new_flows_only(web_port: int) -> None:
    d = dispatcher(parse_rule("MATCH,DIRECT"))
    before = tcp_flow("www.web.test", web_port)
    stream = await d.connect_tcp(before)
    d.replace(Router.from_config(Config(rules=(parse_rule("MATCH,REJECT"),)), resolve))
    # The flow dialled before keeps its stream; new ones take the new rules.
    async with stream:
        assert await stream.receive_some(5) == b"hello"
    with pytest.raises(OutboundError, match="rejected"):
        await d.connect_tcp(tcp_flow("www.web.test", web_port))
    assert before.outbound == "DIRECT"


class Offers:
    def __init__(self) -> None:
        self.made: list[tuple[IPAddress, str, IPAddress]] = []

    def offer(self, fake: IPAddress, domain: str, real: IPAddress, ttl: float) -> None:
        assert 0 < ttl <= 60
        self.made.append((fake, domain, real))


async def test_direct_by_name_is_offered_to_the_offload(web_port: int) -> None:
    d = dispatcher(parse_rule("DST-PORT,1,REJECT"), parse_rule("DOMAIN,www.web.test,DIRECT"),
                   parse_rule("MATCH,DIRECT"))
    offers = d.offload = Offers()
    for flow in (
        tcp_flow("www.web.test", web_port),  # a DST-PORT rule came first: per flow
        tcp_flow("www.web.test", web_port, inbound="mixed"),
    ):
        async with await d.connect_tcp(flow):
            pass
    assert offers.made == []
    d = dispatcher(parse_rule("DOMAIN,www.web.test,DIRECT"), parse_rule("DST-PORT,1,REJECT"))
    offers = d.offload = Offers()
    async with await d.connect_tcp(tcp_flow("www.web.test", web_port)):
        pass
    # Only a captured flow (tproxy) by name: a proxy-port client is not captured.
    async with await d.connect_tcp(tcp_flow("www.web.test", web_port, inbound="socks")):
        pass
    assert offers.made == [(FAKE, "www.web.test", LOOPBACK)]


class Echo:
    """A protocol this build does not have, added the way a new one is:
    a class with `from_config` and one line in BUILDERS."""

    type = "Echo"
    carries_udp = False

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> Echo:
        return cls(p.name)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        raise OutboundError(f"echo {host}:{port}")

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        raise OutboundError("no udp")


async def test_a_new_outbound_type_is_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BUILDERS, "ss", Echo.from_config)
    proxies = (ProxyConfig("e", "ss", "192.0.2.1", 8388),)
    assert isinstance(build_outbounds(Config(proxies=proxies), None)["e"], Echo)
    d = dispatcher(parse_rule("MATCH,e"), proxies=proxies)
    with pytest.raises(OutboundError, match=r"echo a\.test:80"):
        await d.connect_tcp(tcp_flow("a.test", 80))
    # It carries no UDP: a UDP flow skips its rule and goes DIRECT.
    udp = Flow("udp", "tproxy", LOOPBACK, 40000, LOOPBACK, 53, None)
    peer = await d.open_udp(udp)
    assert peer is not None and (udp.outbound, udp.skipped) == ("DIRECT", 1)
    await peer.aclose()


async def test_modes_global_and_direct_and_switching_live(web_port: int) -> None:
    # mihomo's tunnel modes: global sends every flow to GLOBAL's selection,
    # direct every flow DIRECT; no rule is matched in either.
    from appliance.config import parse_config
    from appliance.routing import flow_context

    cfg = parse_config({
        "mode": "Global", "dns": {"nameserver": ["192.0.2.53"]},
        "proxy-groups": [{"name": "GLOBAL", "type": "select", "proxies": ["REJECT", "DIRECT"]}],
        "rules": ["MATCH,DIRECT"],
    })  # fmt: skip
    assert cfg.mode == "global"
    d = Dispatcher(Router.from_config(cfg, resolve), connect_timeout=2.0)
    flow = tcp_flow("www.web.test", web_port)
    with pytest.raises(OutboundError, match="rejected"):
        await d.connect_tcp(flow)
    assert (flow.outbound, flow.rule) == ("GLOBAL", None)
    d.router.set_mode("rule")
    async with await d.connect_tcp(tcp_flow("www.web.test", web_port)) as stream:
        assert await stream.receive_some(5) == b"hello"
    d.replace(Router.from_config(Config(rules=(parse_rule("MATCH,REJECT"),), mode="direct"),
                                 resolve))
    flow = tcp_flow("www.web.test", web_port)
    async with await d.connect_tcp(flow) as stream:
        assert await stream.receive_some(5) == b"hello"
    assert (flow.outbound, flow.rule) == ("DIRECT", None)
    udp = Flow("udp", "tproxy", ipaddress.IPv4Address("192.168.56.10"), 40000, FAKE, 53,
               "a.test")
    assert d.router.pick_udp(flow_context(udp))[0].name == "DIRECT"
    # A rule-provider or geodata update keeps the mode.
    assert d.router.with_env(d.router.rules.env).mode == "direct"
    with pytest.raises(ValueError, match="rule, global or direct"):
        d.router.set_mode("script")  # type: ignore[arg-type]
