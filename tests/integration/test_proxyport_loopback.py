"""The proxy-port service on loopback (appliance/gateway/proxyport/service.py):
real SOCKS5/HTTP clients (the project's own sans-I/O client and raw
sockets) against `ProxyPorts`, with a `dial` that connects to real origin
servers on loopback and a real fake-IP pool. No namespaces or root needed;
integration tests because they run real sockets (the handshake's logic is
tested without them in tests/unit/test_proxyport_handshake.py).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import pytest
import trio

from appliance.config.model import ApplianceConfig, Config, IPAddress
from appliance.fakeip.pool import FakeIPPool
from appliance.flow import Flow
from appliance.gateway.proxyport import BindAddress, Limits, ProxyPort, ProxyPorts
from appliance.gateway.splice import FlowRegistry
from appliance.outbound.base import OutboundError
from appliance.proto import socks5 as s5
from appliance.routing import Dispatcher, Router


@dataclass
class Origins:
    """Real servers on loopback that `dial` connects to: HTTP (answers with
    what it received) on dst port 80, echo on any other port."""

    http_port: int = 0
    echo_port: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    targets: list[Flow] = field(default_factory=list)

    async def http(self, stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
        head, body = buf.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.lower() == b"content-length":
                length = int(v)
        while len(body) < length:
            data = await stream.receive_some(4096)
            if not data:
                break
            body += data
        self.heads.append(head)
        self.bodies.append(body)
        reply = b"ORIGIN " + head.split(b"\r\n")[0] + b" body=" + body
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(reply)
            + reply
        )
        await stream.aclose()

    async def echo(self, stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    async def dial(self, target: Flow) -> trio.abc.Stream:
        self.targets.append(target)
        target.outbound = "TEST"
        if target.host == "rejected.test":
            target.outbound = "REJECT"
            raise OutboundError("rejected")
        if target.host == "refused.test":
            raise OutboundError("connect to 127.0.0.1 port 1 failed: Connection refused")
        port = self.http_port if target.dst_port == 80 else self.echo_port
        return await trio.open_tcp_stream("127.0.0.1", port)


@dataclass
class Running:
    port: int
    origins: Origins
    pool: FakeIPPool
    registry: FlowRegistry
    service: ProxyPorts


async def start(
    nursery: trio.Nursery,
    *,
    auth: tuple[tuple[str, str], ...] = (),
    limits: Limits | None = None,
    spec: ProxyPort | None = None,
    open_udp: Any = None,
) -> Running:
    origins = Origins()
    for attr, handler in (("http_port", origins.http), ("echo_port", origins.echo)):
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        setattr(origins, attr, listeners[0].socket.getsockname()[1])
    cfg = Config(
        mixed_port=1,
        authentication=auth,
        appliance=ApplianceConfig(connect_timeout=2.0, idle_timeout=5.0),
    )
    pool = FakeIPPool(ipaddress.IPv4Network("198.18.0.0/16"))
    registry = FlowRegistry()
    service = ProxyPorts(
        cfg,
        pool,
        origins.dial,
        registry,
        open_udp=open_udp,
        limits=limits,
        ports=[spec or ProxyPort("mixed-port", 0, socks=True, http=True)],
        addresses=[BindAddress("127.0.0.1")],
    )
    bound = await nursery.start(service.serve)
    return Running(bound[0][2], origins, pool, registry, service)


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> AsyncIterator[Running]:
    yield await start(nursery)


async def socks(
    port: int,
    host: str | IPAddress,
    dport: int,
    *,
    user: str | None = None,
    password: str | None = None,
    command: int = s5.CMD_CONNECT,
    via: str = "127.0.0.1",
) -> trio.SocketStream:
    """Connect through the proxy (listening on `via`) with the project's
    SOCKS5 client."""
    stream = await trio.open_tcp_stream(via, port)
    client = s5.Socks5Client(host, dport, username=user, password=password, command=command)
    try:
        await stream.send_all(client.data_to_send())
        with trio.fail_after(5):
            while not client.established:
                client.receive_data(await stream.receive_some(client.bytes_wanted()))
                out = client.data_to_send()
                if out:
                    await stream.send_all(out)
    except BaseException:
        await stream.aclose()
        raise
    stream.reply = client.reply  # type: ignore[attr-defined]
    return stream


async def exchange(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Send raw bytes to the proxy; what it answers until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    try:
        await stream.send_all(data)
        with trio.fail_after(5):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                out += chunk
                if not until_close:
                    break
    finally:
        await stream.aclose()
    return out


async def read_all(stream: trio.abc.Stream) -> bytes:
    out = b""
    with trio.fail_after(5):
        async for chunk in stream:
            out += chunk
    return out


async def echo_roundtrip(stream: trio.abc.Stream, data: bytes = b"ping") -> bytes:
    await stream.send_all(data)
    got = b""
    with trio.fail_after(5):
        while len(got) < len(data):
            got += await stream.receive_some(4096)
    return got


async def settle(running: Running) -> None:
    """Wait until the proxy has closed its flows (the client saw EOF first)."""
    with trio.fail_after(5):
        while len(running.registry) or running.service.active:  # noqa: ASYNC110 (polls state)
            await trio.sleep(0.01)


# --------------------------------------------------------------------------- SOCKS5


async def test_socks5_connect_by_name(proxy: Running) -> None:
    stream = await socks(proxy.port, "WWW.Echo.Test.", 7)
    assert await echo_roundtrip(stream) == b"ping"
    (target,) = proxy.origins.targets
    assert (target.domain, target.dst_port, str(target.src)) == ("www.echo.test", 7, "127.0.0.1")
    assert (target.network, target.inbound, target.dst) == ("tcp", "mixed", None)
    (flow,) = proxy.registry.snapshot()
    assert flow["domain"] == "www.echo.test" and flow["outbound"] == "TEST"
    assert flow["up"] >= 4
    await stream.aclose()
    await settle(proxy)
    assert proxy.registry.opened == proxy.registry.closed == 1


async def test_socks5_fake_ip_maps_back_to_the_name_and_pins_it(proxy: Running) -> None:
    fake = proxy.pool.allocate("www.alpha.test")
    stream = await socks(proxy.port, fake, 7)
    assert await echo_roundtrip(stream) == b"ping"
    assert proxy.origins.targets[0].domain == "www.alpha.test"
    assert {"domain": "www.alpha.test", "ip": fake, "pins": 1} in [
        {"domain": d, "ip": ip, "pins": p} for d, ip, p in proxy.pool.mappings()
    ]
    await stream.aclose()
    await settle(proxy)
    assert [p for d, _ip, p in proxy.pool.mappings() if d == "www.alpha.test"] == [0]


async def test_socks5_unmapped_fake_ip_is_host_unreachable(proxy: Running) -> None:
    with pytest.raises(s5.Socks5Error) as exc:
        await socks(proxy.port, "198.18.254.254", 80)
    assert exc.value.reply == s5.REP_HOST_UNREACHABLE
    assert proxy.origins.targets == [] and proxy.registry.unmapped == 1


async def test_socks5_real_ip_is_dialled_as_an_ip(proxy: Running) -> None:
    stream = await socks(proxy.port, "127.0.0.1", 7)
    assert await echo_roundtrip(stream) == b"ping"
    assert (proxy.origins.targets[0].domain, str(proxy.origins.targets[0].dst)) == (
        None, "127.0.0.1")
    await stream.aclose()


@pytest.mark.parametrize(
    ("host", "reply"),
    [("refused.test", s5.REP_CONNECTION_REFUSED), ("rejected.test", s5.REP_NOT_ALLOWED)],
)
async def test_socks5_dial_failures_get_their_reply(proxy: Running, host: str, reply: int) -> None:
    with pytest.raises(s5.Socks5Error) as exc:
        await socks(proxy.port, host, 80)
    assert exc.value.reply == reply
    assert proxy.registry.dial_failures == 1
    # A failure is kept with its reason (/mirage/failures); a REJECT is not.
    failed = proxy.registry.failures.snapshot()
    if host == "rejected.test":
        assert failed == []
    else:
        [row] = failed
        assert row["domain"] == host and row["outbound"] == "TEST"
        assert row["kind"] == "refused" and row["reason"].endswith("Connection refused")
        assert row["in_type"] == "SOCKS5"


async def test_socks5_pipelined_tunnel_bytes_reach_the_server(proxy: Running) -> None:
    # Greeting, request and the first tunnel bytes in one segment.
    raw = s5.encode_greeting(b"\x00") + s5.encode_request(s5.CMD_CONNECT, "x.test", 7) + b"early"
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(raw)
    got = b""
    with trio.fail_after(5):
        while not got.endswith(b"early"):
            got += await stream.receive_some(4096)
    assert got[:2] == b"\x05\x00" and got[2:4] == b"\x05\x00"
    await stream.aclose()


async def test_socks5_auth(nursery: trio.Nursery) -> None:
    running = await start(nursery, auth=(("alice", "s3cret"),))
    stream = await socks(running.port, "x.test", 7, user="alice", password="s3cret")
    assert await echo_roundtrip(stream) == b"ping"
    await stream.aclose()
    with pytest.raises(s5.Socks5Error, match="refused the username"):
        await socks(running.port, "x.test", 7, user="alice", password="wrong")
    # A client that offers no username/password method is told: none acceptable.
    assert await exchange(running.port, b"\x05\x01\x00") == b"\x05\xff"
    assert len(running.origins.targets) == 1


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        # BIND: command not supported
        (b"\x05\x01\x00" + s5.encode_request(s5.CMD_BIND, "x.test", 1), b"\x05\x00\x05\x07"),
        # unknown command 9
        (b"\x05\x01\x00\x05\x09\x00\x01" + bytes(6), b"\x05\x00\x05\x07"),
        # unknown address type 7
        (b"\x05\x01\x00\x05\x01\x00\x07" + bytes(6), b"\x05\x00\x05\x08"),
        # a greeting that offers no methods
        (b"\x05\x00", b"\x05\xff"),
        # SOCKS4 CONNECT
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00", b"\x00\x5b" + bytes(6)),
    ],
)
async def test_malformed_socks_gets_its_error_reply(
    proxy: Running, raw: bytes, answer: bytes
) -> None:
    got = await exchange(proxy.port, raw)
    assert got[: len(answer)] == answer
    # And the port keeps serving.
    stream = await socks(proxy.port, "x.test", 7)
    assert await echo_roundtrip(stream) == b"ping"
    await stream.aclose()


# ----------------------------------------------------------------------------- HTTP


async def test_http_absolute_uri_is_forwarded_in_origin_form(proxy: Running) -> None:
    fake = proxy.pool.allocate("www.alpha.test")
    got = await exchange(
        proxy.port,
        f"POST http://{fake}/submit?x=1 HTTP/1.1\r\nHost: {fake}\r\n"
        "Proxy-Connection: keep-alive\r\nContent-Length: 5\r\n\r\n"
        "hello"
        # A pipelined second request never reaches this origin.
        "GET http://other.test/ HTTP/1.1\r\n\r\n".encode(),
    )
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert got.endswith(b"ORIGIN POST /submit?x=1 HTTP/1.1 body=hello")
    (head,) = proxy.origins.heads
    assert b"\r\nConnection: close" in head and b"Proxy-" not in head
    assert proxy.origins.bodies == [b"hello"]
    (target,) = proxy.origins.targets
    assert (target.domain, target.dst, target.dst_port) == ("www.alpha.test", fake, 80)
    await settle(proxy)


async def test_http_chunked_body_is_relayed_as_sent(proxy: Running) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(
        b"PUT http://up.test/f HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    await trio.sleep(0.05)
    await stream.send_all(b"0\r\n\r\n")
    # The test origin reads up to the head only: the chunks arrive as body.
    got = await read_all(stream)
    await stream.aclose()
    assert got.startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding: chunked" in proxy.origins.heads[0]


async def test_http_connect_tunnel(proxy: Running) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(b"CONNECT tunnel.test:7 HTTP/1.1\r\nHost: tunnel.test:7\r\n\r\nfirst")
    got = b""
    with trio.fail_after(5):
        while not got.endswith(b"first"):
            got += await stream.receive_some(4096)
    assert got == b"HTTP/1.1 200 Connection established\r\n\r\nfirst"
    assert await echo_roundtrip(stream) == b"ping"
    await stream.aclose()
    assert proxy.origins.targets[0].domain == "tunnel.test"


async def test_http_auth(nursery: trio.Nursery) -> None:
    running = await start(nursery, auth=(("alice", "s3cret"),))
    no = await exchange(running.port, b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    assert no.startswith(b"HTTP/1.1 407 ")
    assert b'Proxy-Authenticate: Basic realm="mirage"' in no
    bad = await exchange(
        running.port,
        b"GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6bm8=\r\n\r\n",
    )
    assert bad.startswith(b"HTTP/1.1 407 ")
    ok = await exchange(
        running.port,
        b"GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n",
    )
    assert ok.startswith(b"HTTP/1.1 200 OK")
    assert b"Proxy-Authorization" not in running.origins.heads[0]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),  # origin-form: not a proxy request
        (b"GET https://a.test/ HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a.test HTTP/1.1\r\n\r\n", 400),  # no port
        (b"GET http://a.test/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"POST http://a.test/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET http://rejected.test/ HTTP/1.1\r\n\r\n", 403),
        (b"GET http://refused.test/ HTTP/1.1\r\n\r\n", 502),
        (b"GET http://198.18.254.254/ HTTP/1.1\r\n\r\n", 502),  # unmapped fake IP
    ],
)
async def test_malformed_http_gets_its_status(proxy: Running, raw: bytes, status: int) -> None:
    got = await exchange(proxy.port, raw)
    assert got.startswith(b"HTTP/1.1 %d " % status), got[:80]
    ok = await exchange(proxy.port, b"GET http://a.test/ok HTTP/1.1\r\n\r\n")
    assert ok.endswith(b"ORIGIN GET /ok HTTP/1.1 body=")


async def test_port_variants(nursery: trio.Nursery) -> None:
    http_only = await start(nursery, spec=ProxyPort("port", 0, socks=False, http=True))
    got = await exchange(http_only.port, b"\x05\x01\x00")
    assert got.startswith(b"HTTP/1.1 400 ")
    socks_only = await start(nursery, spec=ProxyPort("socks-port", 0, socks=True, http=False))
    assert await exchange(socks_only.port, b"GET http://a.test/ HTTP/1.1\r\n\r\n") == b""
    stream = await socks(socks_only.port, "x.test", 7)
    assert await echo_roundtrip(stream) == b"ping"
    await stream.aclose()


# --------------------------------------------------------------------------- bounds


async def test_handshake_timeout_closes_a_silent_client(nursery: trio.Nursery) -> None:
    running = await start(nursery, limits=Limits(handshake_timeout=0.3))
    t0 = trio.current_time()
    assert await exchange(running.port, b"\x05") == b""
    assert 0.25 < trio.current_time() - t0 < 2
    assert running.service.active == 0


async def test_connection_limit_resets_the_extra_client(nursery: trio.Nursery) -> None:
    running = await start(nursery, limits=Limits(max_connections=1))
    held = await socks(running.port, "x.test", 7)
    with pytest.raises((trio.BrokenResourceError, OSError)):
        got = await exchange(running.port, b"\x05\x01\x00")
        if not got:
            raise trio.BrokenResourceError("closed without a reply")
    assert running.service.refused_over_limit == 1
    await held.aclose()
    await settle(running)
    stream = await socks(running.port, "x.test", 7)
    assert await echo_roundtrip(stream) == b"ping"
    await stream.aclose()


# ------------------------------------------------------------------------ UDP ASSOCIATE


async def udp_echo(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65535)
            await sock.sendto(b"echo:" + data, addr)


class Hosts:
    """A resolver for the test: every name is 127.0.0.1 (the Resolve shape)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, name: str, family: int) -> tuple[list[IPAddress], int]:
        await trio.lowlevel.checkpoint()
        self.asked.append(name)
        return ([ipaddress.IPv4Address("127.0.0.1")] if family == 4 else []), 60


async def test_udp_associate_direct(nursery: trio.Nursery) -> None:
    echo_port = await nursery.start(udp_echo)
    hosts = Hosts()
    # The shared UDP outbounds, as the app passes them: no rules, so DIRECT.
    cfg = Config()
    dispatcher = Dispatcher(Router.from_config(cfg, hosts),
                            connect_timeout=cfg.appliance.connect_timeout)
    running = await start(nursery, open_udp=dispatcher.open_udp)
    fake = running.pool.allocate("dns.test")

    control = await socks(running.port, "0.0.0.0", 0, command=s5.CMD_UDP_ASSOCIATE)
    relay = control.reply  # type: ignore[attr-defined]
    assert str(relay.host) == "127.0.0.1" and relay.port
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        await udp.bind(("127.0.0.1", 0))
        for host in ("127.0.0.1", "by-name.test", str(fake)):
            await udp.sendto(
                s5.encode_udp(host, echo_port, b"q-" + host.encode()), ("127.0.0.1", relay.port)
            )
            with trio.fail_after(5):
                data, _ = await udp.recvfrom(65535)
            got = s5.parse_udp(data)
            # The reply names the address the client sent to (its name or fake IP).
            assert (str(got.host), got.port) == (host, echo_port)
            assert got.payload == b"echo:q-" + host.encode()
        assert hosts.asked == ["by-name.test", "dns.test"]
        (flow,) = [f for f in running.registry.snapshot() if f["network"] == "udp"]
        assert flow["up"] > 0 and flow["down"] > 0
        # The fake IP is pinned while the association lives.
        assert [p for d, _i, p in running.pool.mappings() if d == "dns.test"] == [1]
    await control.aclose()
    await settle(running)
    assert [p for d, _i, p in running.pool.mappings() if d == "dns.test"] == [0]


async def test_udp_associate_destinations_are_udp_flows_of_the_port(nursery: trio.Nursery) -> None:
    """Each destination is a session on the transparent gateway's path: a
    `Flow` (udp, this port's inbound) routed once; REJECT drops until idle
    instead of asking again per datagram."""
    asked: list[Flow] = []

    async def reject(flow: Flow) -> None:
        await trio.lowlevel.checkpoint()
        asked.append(flow)
        flow.outbound = "REJECT"

    running = await start(nursery, open_udp=reject)
    control = await socks(running.port, "0.0.0.0", 0, command=s5.CMD_UDP_ASSOCIATE)
    relay = control.reply  # type: ignore[attr-defined]
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        await udp.bind(("127.0.0.1", 0))
        for _ in range(3):
            await udp.sendto(s5.encode_udp("x.test", 9, b"q"), ("127.0.0.1", relay.port))
        with trio.fail_after(5):
            while not asked:  # noqa: ASYNC110 (polls state)
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        (flow,) = asked
        assert (flow.network, flow.inbound, flow.domain, flow.dst_port) == (
            "udp", "mixed", "x.test", 9)
        (record,) = [f for f in running.registry.snapshot() if f["network"] == "udp"]
        assert record["outbound"] == "REJECT" and record["up"] == 0
    await control.aclose()
    await settle(running)


# ----------------------------------------------------------------------- reload


async def refused(host: str, port: int) -> bool:
    """Is a TCP connection to host:port refused (nothing listening)?"""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_rebind_moves_listeners_and_keeps_established_connections(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start(nursery)
    service, port = running.service, running.port
    held = await socks(port, "www.echo.test", 7)
    assert await echo_roundtrip(held) == b"ping"

    # A new address: listened on at once, on the same port.
    changes = await service.rebind([BindAddress("127.0.0.1"), BindAddress("127.0.0.2")])
    assert changes.open == (("mixed-port", BindAddress("127.0.0.2")),) and not changes.close
    stream = await socks(port, "www.echo.test", 7, via="127.0.0.2")
    assert await echo_roundtrip(stream, b"two") == b"two"
    await stream.aclose()

    # An address dropped: refused once rebind returns; the connection it
    # accepted before goes on.
    await service.rebind([BindAddress("127.0.0.2")])
    assert await refused("127.0.0.1", port)
    assert await echo_roundtrip(held, b"still") == b"still"
    assert [b[1] for b in service.bound] == ["127.0.0.2"]

    # An address that cannot be bound (taken): logged at ERROR, the rest serves.
    taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.3", port))
        taken.listen(1)
        await service.rebind([BindAddress("127.0.0.2"), BindAddress("127.0.0.3")])
    assert any(r.levelname == "ERROR" and "127.0.0.3" in r.getMessage() for r in caplog.records)
    stream = await socks(port, "www.echo.test", 7, via="127.0.0.2")
    assert await echo_roundtrip(stream) == b"ping"
    await stream.aclose()
    await held.aclose()
    await settle(running)


async def test_reconfigure_asks_new_connections_for_the_new_credentials(
    nursery: trio.Nursery,
) -> None:
    running = await start(nursery)
    held = await socks(running.port, "www.echo.test", 7)
    await running.service.reconfigure(
        replace(running.service.cfg, authentication=(("new", "secret"),)))
    with pytest.raises(s5.Socks5Error):
        await socks(running.port, "www.echo.test", 7)
    answer = await exchange(running.port, b"GET http://www.echo.test/ HTTP/1.1\r\n"
                            b"Host: www.echo.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 407"), answer[:80]
    stream = await socks(running.port, "www.echo.test", 7, user="new", password="secret")
    assert await echo_roundtrip(stream) == b"ping"
    await stream.aclose()
    # Established before the reload: not asked again.
    assert await echo_roundtrip(held) == b"ping"
    await held.aclose()
    await settle(running)


async def test_rebind_before_the_service_listens_changes_nothing() -> None:
    cfg = Config(mixed_port=1)
    service = ProxyPorts(cfg, FakeIPPool(ipaddress.IPv4Network("198.18.0.0/16")), Origins().dial,
                         addresses=[BindAddress("127.0.0.1")])
    assert not await service.rebind([BindAddress("127.0.0.2")])
    assert service.bound == []
