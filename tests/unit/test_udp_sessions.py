"""The UDP gateway's bookkeeping and routing, without the lab.

Pure parts (appliance/gateway/udp_sessions.py): original-destination decoding,
the bounded LRU session table, idle timeouts, counters. Routing
(appliance/outbound/udp.py): which outbound a UDP flow takes when rules point
at outbounds that cannot carry UDP. And SOCKS5 UDP ASSOCIATE against a
scripted proxy on loopback (real sockets, real datagrams).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
import trio

from appliance.config import parse_rule
from appliance.config.model import (
    ApplianceConfig,
    Config,
    ProxyConfig,
    ProxyGroupConfig,
)
from appliance.flow import Flow
from appliance.gateway.udp_sessions import (
    SessionTable,
    UdpStats,
    client_address,
    idle_timeout,
)
from appliance.outbound.base import OutboundError
from appliance.outbound.build import build_outbounds
from appliance.outbound.socks5 import Socks5Outbound
from appliance.proto import socks5 as s5
from appliance.routing import Dispatcher, Router, flow_context
from appliance.sockopt import (
    IP_ORIGDSTADDR,
    IP_PKTINFO,
    IPV6_ORIGDSTADDR,
    IPV6_PKTINFO,
    original_destination,
    reply_pktinfo,
)

# ------------------------------------------------------------ original destination


def sockaddr_in(ip: str, port: int) -> bytes:
    return struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(ip))


def sockaddr_in6(ip: str, port: int) -> bytes:
    return struct.pack("!HHI16sI", socket.AF_INET6, port, 0,
                       socket.inet_pton(socket.AF_INET6, ip), 0)


def test_original_destination_v4_and_v6() -> None:
    got = original_destination([(socket.IPPROTO_IP, IP_ORIGDSTADDR,
                                  sockaddr_in("198.18.0.7", 443))])
    assert got == (socket.AF_INET, "198.18.0.7", 443)
    got = original_destination([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR,
                                 sockaddr_in6("fdfe:dcba:9876::5", 53))])
    assert got == (socket.AF_INET6, "fdfe:dcba:9876::5", 53)


def test_original_destination_ignores_other_messages() -> None:
    data = sockaddr_in("198.18.0.7", 443)
    assert original_destination([(socket.IPPROTO_IP, IP_PKTINFO, data)]) is None
    assert original_destination([(socket.IPPROTO_IP, IP_ORIGDSTADDR, data[:7])]) is None
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, data)]) is None
    assert original_destination([]) is None
    # The one it wants may come after another (IP_PKTINFO on the DNS socket).
    got = original_destination([(socket.IPPROTO_IP, IP_PKTINFO, bytes(12)),
                                (socket.IPPROTO_IP, IP_ORIGDSTADDR, data)])
    assert got == (socket.AF_INET, "198.18.0.7", 443)


def test_reply_pktinfo_sends_from_the_datagrams_destination() -> None:
    # struct in_pktinfo {ifindex, spec_dst, addr}: the reply's spec_dst is
    # the datagram's header destination `addr`, ifindex left to routing.
    got_v4 = struct.pack("=i4s4s", 3, socket.inet_aton("10.0.0.1"),
                         socket.inet_aton("203.0.113.53"))
    assert reply_pktinfo([(socket.IPPROTO_IP, IP_PKTINFO, got_v4)]) == [
        (socket.IPPROTO_IP, IP_PKTINFO,
         struct.pack("=i4s4s", 0, socket.inet_aton("203.0.113.53"), bytes(4)))]
    in6 = socket.inet_pton(socket.AF_INET6, "2001:db8::53") + struct.pack("=I", 3)
    assert reply_pktinfo([(socket.IPPROTO_IPV6, IPV6_PKTINFO, in6)]) == [
        (socket.IPPROTO_IPV6, IPV6_PKTINFO, in6)]
    assert reply_pktinfo([(socket.IPPROTO_IP, IP_ORIGDSTADDR, got_v4)]) == []


def test_client_address_unmaps_v4_on_dual_stack() -> None:
    assert client_address(("::ffff:192.168.56.10", 5000, 0, 0)) == ("192.168.56.10", 5000)
    assert client_address(("fd56::10", 5000, 0, 0)) == ("fd56::10", 5000)
    assert client_address(("192.168.56.10", 5000)) == ("192.168.56.10", 5000)


def test_idle_timeout_is_short_for_dns() -> None:
    assert idle_timeout(443, 60.0) == 60.0
    assert idle_timeout(53, 60.0) == 10.0
    assert idle_timeout(53, 3.0) == 3.0


def test_stats_names() -> None:
    names = UdpStats().as_dict()
    for key in ("sessions", "evicted", "dropped_unmapped", "dropped_oversize", "packets_up",
                "packets_down", "bytes_up", "bytes_down"):
        assert names[key] == 0


# ------------------------------------------------------------ session table


def test_table_evicts_the_least_recently_active() -> None:
    t: SessionTable[str, str] = SessionTable(3)
    for k in "abc":
        assert t.add(k, k.upper()) is None
    t.touch("a")  # b is now the oldest
    assert t.oldest() == "B"
    assert t.add("d", "D") == "B"
    assert len(t) == 3 and t.get("b") is None
    assert list(t) == ["C", "A", "D"]


def test_table_remove_only_removes_the_same_session() -> None:
    t: SessionTable[str, object] = SessionTable(1)
    old, new = object(), object()
    t.add("k", old)
    assert t.add("x", new) is old  # evicted
    assert t.remove("k", old) is False  # its cleanup finds nothing to remove
    t.remove("x", new)
    t.add("k", new)
    assert t.remove("k", old) is False  # a successor under the same key stays
    assert t.get("k") is new
    assert t.remove("k", new) is True and len(t) == 0


def test_table_rejects_duplicates_and_zero_capacity() -> None:
    t: SessionTable[str, int] = SessionTable(2)
    t.add("a", 1)
    with pytest.raises(KeyError):
        t.add("a", 2)
    with pytest.raises(ValueError):
        SessionTable(0)


# ------------------------------------------------------------ routing


def make_cfg(rules: list[tuple[str, str, str]], groups: tuple[ProxyGroupConfig, ...] = ()
             ) -> Config:
    return Config(
        tproxy_port=7893,
        proxies=(
            ProxyConfig("socks-udp", "socks5", "192.0.2.1", 1080, udp=True),
            ProxyConfig("socks-tcp", "socks5", "192.0.2.1", 1081, udp=False),
            ProxyConfig("web", "http", "192.0.2.1", 8080, udp=True),  # http never carries UDP
        ),
        proxy_groups=groups,
        rules=tuple(parse_rule(f"{t},{v},{target}" if v else f"{t},{target}")
                    for t, v, target in rules),
    )


def udp_flow(domain: str | None, dst: str, port: int) -> Flow:
    return Flow("udp", "tproxy", ipaddress.ip_address("192.168.56.10"), 40000,
                ipaddress.ip_address(dst), port, domain)


def route(cfg: Config, domain: str, port: int = 443) -> tuple[str, int]:
    router = Router.from_config(cfg, None)
    out, _rule, skipped = router.pick_udp(flow_context(udp_flow(domain, "198.18.0.1", port)))
    return out.name, skipped


def test_udp_takes_the_first_rule_whose_target_carries_udp() -> None:
    cfg = make_cfg([
        ("DOMAIN-SUFFIX", "a.test", "socks-tcp"),
        ("DOMAIN-KEYWORD", "a", "web"),
        ("DOMAIN-SUFFIX", "a.test", "socks-udp"),
        ("MATCH", "", "REJECT"),
    ])
    assert route(cfg, "www.a.test") == ("socks-udp", 2)
    assert route(cfg, "www.b.test") == ("REJECT", 0)  # REJECT is an answer, not a skip


def test_udp_falls_to_direct_when_every_match_is_skipped() -> None:
    cfg = make_cfg([("DOMAIN-SUFFIX", "a.test", "web"), ("MATCH", "", "socks-tcp")])
    assert route(cfg, "www.a.test") == ("DIRECT", 2)
    # TCP routing is unchanged by this.
    router = Router.from_config(cfg, None)
    tcp = Flow("tcp", "tproxy", ipaddress.ip_address("192.168.56.10"), 40000,
               ipaddress.ip_address("198.18.0.1"), 443, "www.a.test")
    assert router.pick(flow_context(tcp))[0].name == "web"


def test_network_rule_sees_udp() -> None:
    cfg = make_cfg([("NETWORK", "udp", "REJECT"), ("MATCH", "", "socks-udp")])
    assert route(cfg, "www.a.test") == ("REJECT", 0)


def test_groups_carry_udp_through_their_members() -> None:
    groups = (
        ProxyGroupConfig("sel", "select", ("web", "socks-udp")),
        ProxyGroupConfig("fb", "fallback", ("socks-tcp", "socks-udp")),
    )
    cfg = make_cfg([("DOMAIN", "x.test", "sel"), ("DOMAIN", "y.test", "fb"),
                    ("MATCH", "", "DIRECT")], groups)
    outbounds = build_outbounds(cfg, None)
    assert not outbounds["sel"].carries_udp  # selected: web
    assert outbounds["fb"].carries_udp
    assert route(cfg, "x.test") == ("DIRECT", 1)
    assert route(cfg, "y.test") == ("fb", 0)


# ------------------------------------------------------------ SOCKS5 UDP ASSOCIATE


class ScriptedSocksUdp:
    """A minimal SOCKS5 server for one UDP ASSOCIATE on loopback: it checks
    the request, relays one datagram back with a reply header, then closes
    the control connection when told to."""

    def __init__(self) -> None:
        self.request: s5.Request | None = None
        self.seen: s5.UdpDatagram | None = None
        self.seen_from: tuple[str, int] | None = None
        self.close_control = trio.Event()
        self.relay = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def serve(self, stream: trio.SocketStream) -> None:
        server = s5.Socks5Server()
        await self.relay.bind(("127.0.0.1", 0))
        event = None
        while event is None:
            event = server.receive_data(await stream.receive_some(512))
            await stream.send_all(server.data_to_send())
        assert isinstance(event, s5.Request)
        self.request = event
        # BND.ADDR 0.0.0.0: "the address you reached me at".
        server.reply(s5.REP_SUCCEEDED, "0.0.0.0", self.relay.getsockname()[1])
        await stream.send_all(server.data_to_send())
        data, addr = await self.relay.recvfrom(65535)
        self.seen, self.seen_from = s5.parse_udp(data), addr
        await self.relay.sendto(s5.encode_udp("192.0.2.9", 9999, b"pong"), addr)
        await self.close_control.wait()
        await stream.aclose()


async def test_socks5_udp_associate_sends_the_name_and_ends_with_control() -> None:
    proxy = ScriptedSocksUdp()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, proxy.serve, listeners)
        out = Socks5Outbound("p", "127.0.0.1", port, udp=True)
        with trio.fail_after(5):
            peer = await out.open_udp("www.example.test", 5353)
            try:
                assert peer is not None and peer.socks and peer.outbound == "p"
                peer.sock.send(peer.header + b"ping")
                await trio.lowlevel.wait_readable(peer.sock)
                reply = s5.parse_udp(peer.sock.recv(65535))
                assert reply.payload == b"pong"
                # The request announced exactly the socket we send from.
                assert proxy.request is not None
                assert proxy.request.command == s5.CMD_UDP_ASSOCIATE
                assert (str(proxy.request.host), proxy.request.port) == proxy.seen_from
                # Datagrams name the host (ATYP 3), never an address.
                assert proxy.seen == s5.UdpDatagram("www.example.test", 5353, b"ping")
                proxy.close_control.set()
                await peer.watch()  # returns: the association is over
            finally:
                await peer.aclose()
        nursery.cancel_scope.cancel()
    proxy.relay.close()


async def test_socks5_udp_refused_is_an_outbound_error() -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        server = s5.Socks5Server()
        event = None
        while event is None:
            event = server.receive_data(await stream.receive_some(512))
            await stream.send_all(server.data_to_send())
        server.reply(s5.REP_COMMAND_NOT_SUPPORTED)
        await stream.send_all(server.data_to_send())
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, refuse, listeners)
        with pytest.raises(OutboundError, match="command not supported"):
            await Socks5Outbound("p", "127.0.0.1", port, udp=True).open_udp("x.test", 53)
        # Without `udp: true` it does not even try.
        with pytest.raises(OutboundError, match="does not carry UDP"):
            await Socks5Outbound("p", "127.0.0.1", port).open_udp("x.test", 53)
        nursery.cancel_scope.cancel()


async def test_dispatcher_opens_direct_to_an_ip_with_the_routing_mark() -> None:
    cfg = Config(tproxy_port=7893, routing_mark=255,
                 appliance=ApplianceConfig(connect_timeout=2.0))
    dispatcher = Dispatcher(Router.from_config(cfg, None), connect_timeout=2.0)
    echo = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with echo:
        await echo.bind(("127.0.0.1", 0))
        target = udp_flow(None, "127.0.0.1", echo.getsockname()[1])
        peer = await dispatcher.open_udp(target)
        assert peer is not None and target.outbound == "DIRECT" and not peer.socks
        assert target.rule is None and target.skipped == 0
        try:
            assert peer.sock.getsockopt(socket.SOL_SOCKET, 36) == 255  # SO_MARK
            peer.sock.send(b"hi")
            data, addr = await echo.recvfrom(100)
            assert data == b"hi" and addr == peer.sock.getsockname()
        finally:
            await peer.aclose()
    # A name with no resolver configured: an OutboundError, not a crash.
    with pytest.raises(OutboundError, match="no resolver"):
        await dispatcher.open_udp(udp_flow("www.example.test", "198.18.0.1", 53))
    assert target.dst is not None and target.dst.is_loopback


def test_socks_replies_with_fragments_or_bad_headers_are_dropped_and_counted() -> None:
    from appliance.fakeip.pool import FakeIPPool
    from appliance.gateway.udp import UdpGateway

    async def no_peer(session: object) -> None:
        return None

    cfg = Config(tproxy_port=7893)
    gw = UdpGateway(cfg, FakeIPPool(cfg.dns.fake_ip_range), no_peer)
    assert gw.sessions._unwrap(s5.encode_udp("192.0.2.9", 53, b"answer")) == b"answer"
    assert gw.sessions._unwrap(s5.encode_udp("192.0.2.9", 53, b"part", frag=1)) is None
    assert gw.sessions._unwrap(b"\x00\x00\x00\x09junk") is None
    assert gw.sessions._unwrap(b"\x00") is None
    st = gw.stats()
    assert (st["dropped_fragment"], st["dropped_malformed"], st["sessions"]) == (1, 2, 0)


# -- fair shares: a new session needs a share of the client's flows ------------------


def test_a_client_without_a_share_of_flows_gets_no_new_session_and_the_datagram_is_counted(
        ) -> None:
    import socket
    import struct
    from typing import Any

    from appliance.config.model import Config
    from appliance.gateway.udp import UdpGateway
    from appliance.limits import ConcurrencyLimit
    from appliance.sockopt import IP_ORIGDSTADDR

    class NoFakes:
        def is_fake(self, ip: Any) -> bool:
            return False

        def pin(self, ip: Any) -> str | None:
            return None

        def unpin(self, ip: Any) -> None:
            pass

    class Started:
        def __init__(self) -> None:
            self.tasks: list[Any] = []

        def start_soon(self, fn: Any, *args: Any) -> None:
            self.tasks.append(args)

    async def never(flow: Any) -> None:
        raise OSError("no outbound in this test")

    flows = ConcurrencyLimit(per_client=2, total=100)
    gw = UdpGateway(Config(tproxy_port=7893), NoFakes(), never, flows=flows)
    nursery = Started()

    def datagram(src: str, sport: int) -> None:
        dst = struct.pack("!HH4s8x", socket.AF_INET, 443, socket.inet_aton("192.0.2.7"))
        anc = [(socket.IPPROTO_IP, IP_ORIGDSTADDR, dst)]
        key = ((src, sport), dst)
        gw._new_session(key, (src, sport), anc, b"x", 0.0, nursery)  # type: ignore[arg-type]

    for port in (1000, 1001, 1002, 1003):
        datagram("192.168.56.10", port)
    datagram("192.168.56.21", 1000)
    assert len(nursery.tasks) == 3  # two sessions for .10, one for .21
    assert gw.counters.dropped_limit == 2
    assert flows.held("192.168.56.10") == 2 and flows.held("192.168.56.21") == 1
    assert [s.client_key for (s,) in nursery.tasks] == ["192.168.56.10"] * 2 + ["192.168.56.21"]
    assert flows.stats()["top_refused"] == [{"client": "192.168.56.10", "refused": 2}]
    # A session that ends (here: its outbound fails, then the hold passes)
    # gives its share back.
    import trio
    import trio.testing

    async def end_first() -> None:
        (session,) = nursery.tasks[0]
        gw.replies.acquire = lambda dst: None  # type: ignore[assignment,method-assign,return-value]
        gw.replies.release = lambda dst: None  # type: ignore[method-assign]
        await gw._run(session)

    trio.run(end_first, clock=trio.testing.MockClock(autojump_threshold=0))
    assert flows.held("192.168.56.10") == 1 and flows.stats()["unbalanced"] == 0
