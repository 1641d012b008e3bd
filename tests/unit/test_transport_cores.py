"""The TLS layer, the stream transports and Trojan's wire format without a
network: sans-I/O cores fed bytes (gun framing, early data, HTTP heads,
Trojan packets) and the stream adapters run over trio memory streams
against scripted servers made of the same sans-I/O libraries (wsproto's
and h2's server sides, trio's SSLStream with a lab certificate)."""

from __future__ import annotations

import base64
import hashlib
import random
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import lockstep_stream_pair, memory_stream_pair, wait_all_tasks_blocked
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Ping, Pong, Request

from appliance.config import parse_config
from appliance.config.protocols.common import (
    GrpcOptions,
    HttpOptions,
    RealityOptions,
    TlsOptions,
    WsOptions,
)
from appliance.config.protocols.trojan import TrojanOptions
from appliance.config.render import effective_config
from appliance.lab.certs import make_ca_and_cert
from appliance.outbound import tls as tls_module
from appliance.outbound.base import OutboundError
from appliance.outbound.tls import TlsClient, TlsStream, unsupported_tls
from appliance.outbound.transport import gun
from appliance.outbound.transport.chunks import Chunks
from appliance.outbound.transport.h2 import SHARED_BACKLOG, GunPool, open_grpc
from appliance.outbound.transport.http_obfs import ResponseHeadSkipper, request_head
from appliance.outbound.transport.ws import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    ServerFrames,
    WsFrameError,
    WsStream,
    WsUpgradeError,
    check_upgrade_response,
    client_frame,
    early_data_plan,
    new_key,
    open_http_upgrade,
    parse_upgrade_response,
    upgrade_request,
)
from appliance.outbound.trojan import TrojanPacketCodec
from appliance.proto.socks5 import encode_address
from appliance.proto.trojan import (
    CMD_CONNECT,
    TrojanError,
    UdpDecoder,
    encode_request,
    encode_udp,
    password_key,
)

# --- Trojan -------------------------------------------------------------------


def test_trojan_request_is_key_crlf_cmd_address_crlf() -> None:
    key = password_key("pw")
    assert key == hashlib.sha224(b"pw").hexdigest().encode()
    head = encode_request(key, CMD_CONNECT, "www.alpha.test", 80)
    assert head == key + b"\r\n\x01\x03\x0ewww.alpha.test\x00\x50\r\n"
    with pytest.raises(TrojanError):
        encode_request(key, CMD_CONNECT, "x" * 300, 80)


def test_trojan_udp_packets_split_anywhere() -> None:
    address = encode_address("www.alpha.test", 53)
    wire = encode_udp(address, b"one") + encode_udp(address, b"") + encode_udp(address, b"3" * 9)
    for cut in range(len(wire) + 1):
        decoder = UdpDecoder()
        got = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
        assert [p for _, _, p in got] == [b"one", b"", b"3" * 9]
        assert all(h == "www.alpha.test" and port == 53 for h, port, _ in got)
    with pytest.raises(TrojanError, match="CRLF"):
        UdpDecoder().feed(address + b"\x00\x01XXz")
    codec = TrojanPacketCodec(address)
    assert codec.decode(codec.encode(b"abc")) == [b"abc"]


# --- gun ----------------------------------------------------------------------


@given(st.lists(st.binary(max_size=300), max_size=5), st.integers(min_value=1, max_value=50))
def test_gun_messages_round_trip_in_any_chunks(payloads: list[bytes], step: int) -> None:
    wire = b"".join(gun.encode(p) for p in payloads)
    decoder = gun.GunDecoder()
    got: list[bytes] = []
    for i in range(0, len(wire), step):
        got += decoder.feed(wire[i:i + step])
    assert got == payloads


def test_gun_frame_layout_and_errors() -> None:
    data = b"x" * 200
    assert gun.encode(data) == b"\x00\x00\x00\x00\xcb\x0a\xc8\x01" + data
    with pytest.raises(gun.GunError, match="compressed"):
        gun.GunDecoder().feed(b"\x01\x00\x00\x00\x00")
    with pytest.raises(gun.GunError, match="protobuf key"):
        gun.GunDecoder().feed(b"\x00\x00\x00\x00\x02\x12\x00")


# --- ws -----------------------------------------------------------------------


def test_early_data_plan() -> None:
    assert early_data_plan(WsOptions(path="/p?ed=2048")) == ("/p", 2048, "Sec-WebSocket-Protocol")
    assert early_data_plan(WsOptions(path="/p?a=1&ed=9")) == ("/p?a=1", 9, "Sec-WebSocket-Protocol")
    assert early_data_plan(WsOptions(path="/p", max_early_data=5)) == ("/p", 5, "")
    assert early_data_plan(WsOptions(path="/p?ed=x")) == ("/p?ed=x", 0, "")


class WsServer:
    """wsproto's server side on the far end of a memory stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.request: Request | None = None
        self.messages: list[bytes] = []
        self.pongs = 0

    async def handshake(self, accept_subprotocol: bool) -> None:
        while self.request is None:
            self.ws.receive_data(await self.stream.receive_some())
            for event in self.ws.events():
                if isinstance(event, Request):
                    self.request = event
        sub = self.request.subprotocols[0] if accept_subprotocol and \
            self.request.subprotocols else None
        await self.stream.send_all(self.ws.send(AcceptConnection(subprotocol=sub)))

    async def read_until(self, n: int) -> None:
        while len(b"".join(self.messages)) < n:
            self.ws.receive_data(await self.stream.receive_some())
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    self.messages.append(bytes(event.data))
                elif isinstance(event, Pong):
                    self.pongs += 1


async def test_ws_early_data_rides_in_the_subprotocol_header() -> None:
    client_end, server_end = memory_stream_pair()
    ws = WsStream(client_end, WsOptions(path="/tj", headers=(("Host", "cdn.test"),),
                                        max_early_data=4,
                                        early_data_header_name="Sec-WebSocket-Protocol"),
                  "ignored.test")
    server = WsServer(server_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handshake, True)
        await ws.send_all(b"headTAIL")
    assert server.request is not None
    assert server.request.host == "cdn.test" and server.request.target == "/tj"
    assert server.request.subprotocols == [base64.urlsafe_b64encode(b"head").decode()
                                           .rstrip("=")]
    await server.read_until(4)
    assert b"".join(server.messages) == b"TAIL"
    await server_end.send_all(server.ws.send(BytesMessage(data=b"down1")) +
                              server.ws.send(Ping(payload=b"p")) +
                              server.ws.send(BytesMessage(data=b"down2")))
    got = b""
    while len(got) < 10:
        got += await ws.receive_some(3)
    assert got == b"down1down2"
    await ws.send_all(b"x")
    await server.read_until(5)
    assert server.pongs == 1


async def test_ws_early_data_without_a_header_goes_in_the_path() -> None:
    client_end, server_end = memory_stream_pair()
    ws = WsStream(client_end, WsOptions(path="/ed/", max_early_data=8), "h.test")
    server = WsServer(server_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handshake, False)
        await ws.send_all(b"abc")
    assert server.request is not None
    assert server.request.target == "/ed/" + base64.urlsafe_b64encode(b"abc").decode().rstrip("=")
    assert server.request.host == "h.test"


async def test_ws_refused_upgrade_is_a_broken_stream() -> None:
    client_end, server_end = memory_stream_pair()
    ws = WsStream(client_end, WsOptions(path="/"), "h.test")

    async def refuse() -> None:
        await server_end.receive_some()
        await server_end.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse)
        with pytest.raises(trio.BrokenResourceError, match="404"):
            await ws.send_all(b"x")


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


def test_upgrade_request_is_what_a_ws_server_accepts() -> None:
    key = new_key()
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(upgrade_request("/p?q=1", "cdn.test", [(b"X-Y", b"z")], key, ["ed1"]))
    (request,) = list(server.events())
    assert isinstance(request, Request)
    assert (request.host, request.target, request.subprotocols) == ("cdn.test", "/p?q=1", ["ed1"])
    assert (b"x-y", b"z") in [(k.lower(), v) for k, v in request.extra_headers]
    answer = server.send(AcceptConnection(subprotocol="ed1"))
    check_upgrade_response(answer[:answer.find(b"\r\n\r\n")], key, ["ed1"])


@pytest.mark.parametrize(("head", "why"), [
    (b"HTTP/1.1 403 Forbidden", "refused with HTTP 403"),
    (b"SSH-2.0-x", "not HTTP"),
    (b"HTTP/1.1 101 OK\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {a}", "Upgrade: websocket"),
    (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {a}", "Connection"),
    (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
     b"Sec-WebSocket-Accept: AAAA", "Accept"),
    (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
     b"Sec-WebSocket-Accept: {a}\r\nSec-WebSocket-Extensions: permessage-deflate", "extension"),
    (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
     b"Sec-WebSocket-Accept: {a}\r\nSec-WebSocket-Protocol: chat", "subprotocol"),
    (b"HTTP/1.1 101 OK\r\nUpgrade websocket", "malformed"),
])
def test_upgrade_response_checks(head: bytes, why: str) -> None:
    key = new_key()
    with pytest.raises(WsUpgradeError, match=why):
        check_upgrade_response(head.replace(b"{a}", _accept(key)), key, [])


def test_upgrade_response_tokens_are_case_insensitive_lists() -> None:
    key = new_key()
    check_upgrade_response(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\n"
                           b"connection: keep-alive, Upgrade\r\nsec-websocket-accept: "
                           + _accept(key), key, [])


@given(st.binary(max_size=70_000), st.binary(min_size=4, max_size=4))
def test_client_frames_parse_as_wsproto_server_frames(payload: bytes, mask: bytes) -> None:
    from wsproto.frame_protocol import FrameProtocol, Opcode

    proto = FrameProtocol(client=False, extensions=[])
    proto.receive_bytes(client_frame(OP_BINARY, payload, mask) + client_frame(OP_PONG, b"pp"))
    frames = list(proto.received_frames())
    assert [f.opcode for f in frames] == [Opcode.BINARY, Opcode.PONG]
    assert bytes(frames[0].payload) == payload and frames[0].frame_finished
    assert bytes(frames[1].payload) == b"pp"


def _server_frames() -> tuple[bytes, bytes]:
    """Frames a wsproto server sends after the upgrade: messages (one
    fragmented, one text, one 70,000 bytes: a 64-bit length), a ping and a
    close; and the data they carry."""
    from wsproto.frame_protocol import FrameProtocol

    proto = FrameProtocol(client=False, extensions=[])
    big = bytes(range(256)) * 274
    wire = (proto.send_data(b"frag-", fin=False) + proto.send_data(b"ment", fin=True)
            + proto.ping(b"p1") + proto.send_data("text", fin=True)
            + proto.send_data(big, fin=True) + proto.send_data(b"", fin=True)
            + proto.close(1000, "bye"))
    return wire, b"frag-ment" + b"text" + big


def test_server_frames_at_every_split() -> None:
    wire, want = _server_frames()
    for cut in [*range(0, 40), len(wire) // 2, len(wire) - 3]:
        frames = ServerFrames()
        payloads, controls = frames.feed(wire[:cut])
        more, more_controls = frames.feed(wire[cut:])
        assert b"".join(payloads + more) == want
        assert [op for op, _ in controls + more_controls] == [OP_PING, OP_CLOSE]
        assert (controls + more_controls)[0] == (OP_PING, b"p1")


def test_server_frames_refuse_what_a_server_must_not_send() -> None:
    from wsproto.frame_protocol import FrameProtocol

    masked = FrameProtocol(client=True, extensions=[]).send_data(b"x", fin=True)
    for bad, why in ((masked, "masked"), (b"\xc2\x00", "RSV"), (b"\x83\x00", "reserved"),
                     (b"\x09\x00", "fragmented"), (b"\x89\x7e\x00\x80", "125")):
        with pytest.raises(WsFrameError, match=why):
            ServerFrames().feed(bad)


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_server_frames_fail_only_with_their_error(chunks: list[bytes]) -> None:
    frames = ServerFrames()
    try:
        for chunk in chunks:
            frames.feed(chunk)
    except WsFrameError:
        pass


async def test_http_upgrade_replays_bytes_after_the_101() -> None:
    assert parse_upgrade_response(b"HTTP/1.1 101 Switching") is None
    assert parse_upgrade_response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n") == 101
    client_end, server_end = memory_stream_pair()

    async def server() -> None:
        head = await server_end.receive_some()
        assert head.startswith(b"GET /up HTTP/1.1\r\nHost: h.test\r\n")
        await server_end.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket"
                                  b"\r\n\r\nearly bytes")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        stream = await open_http_upgrade(client_end, WsOptions(path="/up",
                                                               v2ray_http_upgrade=True),
                                         "h.test")
    assert await stream.receive_some() == b"early bytes"


# --- http disguise ------------------------------------------------------------


def test_http_request_head_and_response_skip() -> None:
    opts = HttpOptions(method="GET", paths=("/a",),
                       headers=(("Host", ("cdn.test",)), ("Accept", ("*/*",))))
    head = request_head(opts, "server.test", 5, random.Random(1))
    assert head == (b"GET /a HTTP/1.1\r\nHost: cdn.test\r\nAccept: */*\r\n"
                    b"Content-Length: 5\r\n\r\n")
    skipper = ResponseHeadSkipper()
    assert skipper.feed(b"HTTP/1.1 200 OK\r\nX: y\r") == b""
    assert skipper.feed(b"\n\r\npayload") == b"payload" and skipper.done
    with pytest.raises(trio.BrokenResourceError):
        ResponseHeadSkipper().feed(b"SSH-2.0-x\r\n")


# --- grpc over h2 -------------------------------------------------------------


class H2Server:
    """h2's server side, answering one gun call."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.conn.initiate_connection()
        self.headers: dict[bytes, bytes] = {}
        self.body = gun.GunDecoder()
        self.received: list[bytes] = []

    async def read(self, until: int) -> None:
        """Read (acknowledging nothing until `until` bytes are in: the
        client's window must not be opened early)."""
        while len(b"".join(self.received)) < until:
            data = await self.stream.receive_some()
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.headers = dict(event.headers)
                    self.conn.send_headers(event.stream_id, [(b":status", b"200"),
                                                             (b"content-type",
                                                              b"application/grpc")])
                elif isinstance(event, h2.events.DataReceived):
                    self.received += self.body.feed(event.data)
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
            await self.stream.send_all(self.conn.data_to_send())


async def test_grpc_call_carries_gun_messages_both_ways_past_the_window() -> None:
    client_end, server_end = memory_stream_pair()
    server = H2Server(server_end)
    stream = await open_grpc(client_end, GrpcOptions(service_name="Svc"), "g.test", tls=True)
    big = bytes(range(256)) * 1024  # 256 KiB: four times the default window
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.read, len(big))
        await stream.send_all(big)
    assert server.headers[b":path"] == b"/Svc/Tun"
    assert server.headers[b"content-type"] == b"application/grpc"
    assert b"".join(server.received) == big
    server.conn.send_data(1, gun.encode(b"reply-1") + gun.encode(b"reply-2"))
    server.conn.send_headers(1, [(b"grpc-status", b"14"), (b"grpc-message", b"unavailable")],
                             end_stream=True)
    await server_end.send_all(server.conn.data_to_send())
    got = b""
    with pytest.raises(trio.BrokenResourceError, match="status 14 \\(unavailable\\)"):
        while True:
            got += await stream.receive_some()
    assert got == b"reply-1reply-2"


class GunEchoServer:
    """h2's server side for any number of gun calls on each connection it
    is given: every message comes back prefixed with `echo:`; a call the
    client resets is counted."""

    def __init__(self) -> None:
        self.calls = 0
        self.resets = 0
        self.connections = 0
        self.conns: list[h2.connection.H2Connection] = []
        self.messages: list[bytes] = []

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        self.conns.append(conn)
        decoders: dict[int, gun.GunDecoder] = {}
        while data := await stream.receive_some():
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.calls += 1
                    decoders[event.stream_id] = gun.GunDecoder()
                    conn.send_headers(event.stream_id, [(b":status", b"200"),
                                                        (b"content-type", b"application/grpc")])
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
                    for message in decoders[event.stream_id].feed(event.data):
                        self.messages.append(message)
                        conn.send_data(event.stream_id, gun.encode(b"echo:" + message))
                elif isinstance(event, h2.events.StreamReset):
                    self.resets += 1
            await stream.send_all(conn.data_to_send())


async def test_a_large_frame_in_the_read_that_acknowledges_our_settings() -> None:
    """The server's SETTINGS ACK and a 32 KiB DATA frame (allowed by our
    SETTINGS_MAX_FRAME_SIZE) in one read."""
    client_end, server_end = memory_stream_pair()
    stream = await open_grpc(client_end, GrpcOptions(service_name="Svc"), "g.test", tls=True)
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    server.receive_data(await server_end.receive_some())
    server.send_headers(1, [(b":status", b"200")])
    payload = bytes(range(256)) * 128
    server.send_data(1, gun.encode(payload))
    assert server.max_outbound_frame_size == 1 << 16
    await server_end.send_all(server.data_to_send())
    got = b""
    while len(got) < len(payload):
        got += await stream.receive_some()
    assert got == payload


def _dialer(nursery: trio.Nursery,
            server: GunEchoServer) -> Callable[[], Awaitable[trio.abc.Stream]]:
    """A GunPool dial: a memory stream pair whose server end `server`
    serves in `nursery`."""

    async def dial() -> trio.abc.Stream:
        client_end, server_end = memory_stream_pair()
        nursery.start_soon(server.serve, server_end)
        return client_end

    return dial


async def test_gun_pool_carries_many_calls_on_one_connection() -> None:
    server = GunEchoServer()
    pool = GunPool(GrpcOptions(service_name="Svc"), "g.test", tls=True)
    async with trio.open_nursery() as nursery:

        dial = _dialer(nursery, server)

        first = await pool.open(dial)
        second = await pool.open(dial)
        # Both at once: each call gets its own answers, whoever reads.
        await first.send_all(b"one")
        await second.send_all(b"two")
        assert await second.receive_some() == b"echo:two"
        assert await first.receive_some() == b"echo:one"
        # The server may send DATA frames of 64 KiB (fewer frames to parse).
        assert server.conns[0].max_outbound_frame_size == 1 << 16
        await first.aclose()
        third = await pool.open(dial)
        await third.send_all(b"three")
        assert await third.receive_some() == b"echo:three"
        # The first call was reset (it went out before the third's request).
        assert (server.connections, server.calls, server.resets) == (1, 3, 1)
        await second.aclose()
        await third.aclose()
        # A broken connection is not reused: the next call dials anew.
        conn = first.h2
        await conn.aclose()
        fourth = await pool.open(dial)
        assert fourth.h2 is not conn
        await fourth.send_all(b"four")
        assert await fourth.receive_some() == b"echo:four"
        assert server.connections == 2
        await fourth.aclose()
        nursery.cancel_scope.cancel()


async def test_gun_pool_readers_park_and_hand_the_reading_on() -> None:
    """Many flows waiting on one connection: each gets its own answers,
    and a waiter cancelled mid-wait (whether parked or reading) leaves
    the others a reader."""
    server = GunEchoServer()
    pool = GunPool(GrpcOptions(service_name="Svc"), "g.test", tls=True)
    async with trio.open_nursery() as nursery:

        dial = _dialer(nursery, server)

        calls = [await pool.open(dial) for _ in range(12)]
        got: dict[int, bytes] = {}
        scopes: dict[int, trio.CancelScope] = {}

        async def wait_for(i: int) -> None:
            with trio.CancelScope() as scope:
                scopes[i] = scope
                got[i] = await calls[i].receive_some()

        with trio.fail_after(10):
            async with trio.open_nursery() as waiters:
                # The first waiter reads the connection; the others park.
                for i in range(12):
                    waiters.start_soon(wait_for, i)
                    await wait_all_tasks_blocked()
                scopes[0].cancel()  # the reader
                scopes[5].cancel()  # a parked one
                await wait_all_tasks_blocked()
                for i in reversed(range(12)):
                    await calls[i].send_all(b"m%d" % i)
        assert 0 not in got and 5 not in got
        assert got == {i: b"echo:m%d" % i for i in range(1, 12) if i != 5}
        for call in calls:
            await call.aclose()
        nursery.cancel_scope.cancel()


async def test_gun_pool_sends_a_cancelled_flows_bytes_whole_and_writes_on() -> None:
    """A shared connection's bytes are its writer's: a flow cancelled right
    after queueing a message still has it sent whole (half a frame would
    break every flow on the connection); the writer stops with the last
    stream and the next flow starts it again."""
    server = GunEchoServer()
    pool = GunPool(GrpcOptions(service_name="Svc"), "g.test", tls=True)
    async with trio.open_nursery() as nursery:
        dial = _dialer(nursery, server)
        first = await pool.open(dial)
        second = await pool.open(dial)
        message = bytes(range(256)) * 64  # 16 KiB: inside the first window
        with trio.CancelScope() as scope:
            scope.cancel()
            await first.send_all(message)
        assert scope.cancelled_caught
        await first.aclose()
        await second.send_all(b"two")
        assert await second.receive_some() == b"echo:two"
        assert server.messages == [message, b"two"]
        conn = second.h2
        await second.aclose()
        await wait_all_tasks_blocked()
        assert not conn._writing and server.resets == 2
        third = await pool.open(dial)
        assert third.h2 is conn
        await third.send_all(b"three")
        assert await third.receive_some() == b"echo:three"
        await third.aclose()
        nursery.cancel_scope.cancel()


async def test_gun_pool_flows_wait_while_the_connection_backlog_is_full() -> None:
    """A server that stops reading: a flow's sends queue up to about
    SHARED_BACKLOG and then wait (nothing is buffered without bound); once
    the server reads again every byte arrives, in order."""
    chunk = 1 << 16
    total = 32 * chunk
    resume = trio.Event()
    received: list[bytes] = []

    async def serve(stream: trio.abc.Stream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
        conn.increment_flow_control_window(1 << 24)
        decoder = gun.GunDecoder()
        while True:
            if received and not resume.is_set():
                await resume.wait()
            data = await stream.receive_some()
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    conn.send_headers(event.stream_id, [(b":status", b"200")])
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
                    received.extend(decoder.feed(event.data))
            await stream.send_all(conn.data_to_send())

    pool = GunPool(GrpcOptions(service_name="Svc"), "g.test", tls=True)
    sent = 0
    payload = bytes(range(256)) * (total // 256)

    async def upload(call: trio.abc.Stream) -> None:
        nonlocal sent
        while sent < total:
            await call.send_all(payload[sent:sent + chunk])
            sent += chunk

    async with trio.open_nursery() as nursery:

        async def dial() -> trio.abc.Stream:
            client_end, server_end = lockstep_stream_pair()
            nursery.start_soon(serve, server_end)
            return client_end

        call = await pool.open(dial)
        with trio.fail_after(10):
            async with trio.open_nursery() as uploading:
                uploading.start_soon(upload, call)
                # The reply (its SETTINGS) must be read for the window to open.
                uploading.start_soon(call.receive_some)
                while not received:
                    await wait_all_tasks_blocked()
                await wait_all_tasks_blocked()
                # What went out of the flow but not to the server: the
                # backlog, one send past it, and the write under way.
                assert 0 < sent - len(b"".join(received)) <= SHARED_BACKLOG + 2 * chunk
                resume.set()
                while len(b"".join(received)) < total:
                    await wait_all_tasks_blocked()
                uploading.cancel_scope.cancel()
        assert sent == total and b"".join(received) == payload
        nursery.cancel_scope.cancel()


# --- TLS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    paths = make_ca_and_cert(tmp_path_factory.mktemp("tls"), ["192.0.2.1"], ["tls.test"])
    return paths.ca_cert, paths.cert, paths.key


def trusting(ca: Path) -> ssl.SSLContext:
    """A verifying client context that trusts `ca` (the shared ones trust
    the system store and must not be changed by a test)."""
    return ssl.create_default_context(cafile=str(ca))


async def _handshake(client: TlsClient, cert: Path, key: Path) -> trio.abc.Stream:
    client_end, server_end = memory_stream_pair()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = trio.SSLStream(server_end, ctx, server_side=True)

    async def serve() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError:
            pass

    result: trio.abc.Stream | OutboundError
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            result = await client.wrap(client_end, "tj")
        except OutboundError as e:
            result = e
        nursery.cancel_scope.cancel()
    if isinstance(result, OutboundError):
        raise result
    return result


async def test_tls_verifies_against_the_trusted_ca(certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    trusted = TlsClient(TlsOptions(), "tls.test")
    trusted.context = trusting(ca)
    assert isinstance(await _handshake(trusted, cert, key), TlsStream)
    by_ip = TlsClient(TlsOptions(), "192.0.2.1")
    by_ip.context = trusting(ca)
    await _handshake(by_ip, cert, key)
    with pytest.raises(OutboundError, match="tj: certificate verify failed: "):
        await _handshake(TlsClient(TlsOptions(), "tls.test"), cert, key)
    wrong_name = TlsClient(TlsOptions(sni="other.test"), "tls.test")
    wrong_name.context = trusting(ca)
    with pytest.raises(OutboundError, match="certificate verify failed: Hostname mismatch"):
        await _handshake(wrong_name, cert, key)
    await _handshake(TlsClient(TlsOptions(skip_cert_verify=True), "tls.test"), cert, key)


async def test_tls_fingerprint_pin_replaces_the_chain_check(
        certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    sha = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    # Not trusted, but pinned: accepted, as mihomo does.
    await _handshake(TlsClient(TlsOptions(fingerprint=sha), "tls.test"), cert, key)
    with pytest.raises(OutboundError, match="tj: fingerprint mismatch"):
        await _handshake(TlsClient(TlsOptions(fingerprint="00" * 32), "tls.test"), cert, key)


async def _exchange(client: TlsClient, server_ctx: ssl.SSLContext) -> TlsStream:
    """One connection: handshake, a request and the server's answer (after
    its session tickets); returns the client's stream, still open."""
    client_end, server_end = memory_stream_pair()
    server = trio.SSLStream(server_end, server_ctx, server_side=True)

    async def serve() -> None:
        await server.do_handshake()
        assert await server.receive_some() == b"ping"
        await server.send_all(b"pong")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        tls = await client.wrap(client_end, "tj")
        assert isinstance(tls, TlsStream)
        await tls.send_all(b"ping")
        assert await tls.receive_some() == b"pong"
    return tls


async def test_tls_resumes_with_the_servers_ticket(
        certs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = certs
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    sha = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    trusted = TlsClient(TlsOptions(), "tls.test")
    trusted.context = trusting(ca)
    for client in (trusted, TlsClient(TlsOptions(fingerprint=sha), "tls.test"),
                   TlsClient(TlsOptions(skip_cert_verify=True), "tls.test")):
        first = await _exchange(client, server_ctx)
        assert not first.session_reused
        # The ticket came before the answer: the next connections resume,
        # and a pinned one is still checked against the session's certificate.
        for _ in range(2):
            again = await _exchange(client, server_ctx)
            assert again.session_reused
            assert again.getpeercert() == first.getpeercert()
    # A resumed connection's newer ticket replaces the kept one only once
    # that is SESSION_REFRESH old (reading a session copies it).
    kept = trusted._session
    assert (await _exchange(trusted, server_ctx)).session_reused
    assert trusted._session is kept
    monkeypatch.setattr(tls_module, "SESSION_REFRESH", 0.0)
    assert (await _exchange(trusted, server_ctx)).session_reused
    assert trusted._session is not kept and trusted._session is not None
    monkeypatch.undo()
    # Another server (new ticket keys): a full handshake, then its ticket.
    other_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other_ctx.load_cert_chain(cert, key)
    assert not (await _exchange(trusted, other_ctx)).session_reused
    assert (await _exchange(trusted, other_ctx)).session_reused
    # A client whose context changed offers none of the old context's sessions.
    trusted.context = trusting(ca)
    assert not (await _exchange(trusted, other_ctx)).session_reused


def test_reality_is_carried_by_its_own_client() -> None:
    reality = TlsOptions(reality=RealityOptions(public_key="A" * 43))
    assert unsupported_tls(reality) is None and unsupported_tls(TlsOptions()) is None
    client = TlsClient(reality, "192.0.2.1")
    # An IP literal as server and no sni: no SNI sent (as Go's TLS).
    assert client.reality is not None and client.reality.server_name is None
    assert TlsClient(TlsOptions(), "x.test").reality is None


# --- trojan in the profile ----------------------------------------------------


def test_trojan_profile_keys(caplog: pytest.LogCaptureFixture) -> None:
    raw = {"dns": {"enable": False}, "rules": ["MATCH,DIRECT"], "proxies": [
        {"name": "t", "type": "trojan", "server": "t.example", "port": 443, "password": "p",
         "flow": "xtls-rprx-direct", "client-fingerprint": "chrome", "network": "ws",
         "ws-opts": {"path": "/x?ed=2048", "headers": {"Host": "h"}},
         "fingerprint": "AB:" * 31 + "AB", "udp": True},
        {"name": "g", "type": "trojan", "server": "192.0.2.1", "port": 443, "password": "p",
         "network": "grpc", "grpc-opts": {"grpc-service-name": "s"},
         "ss-opts": {"enabled": False}},
        {"name": "s", "type": "trojan", "server": "192.0.2.1", "port": 443, "password": "p",
         "ss-opts": {"enabled": True, "method": "aes-128-gcm", "password": "x"}},
    ]}  # fmt: skip
    with caplog.at_level("INFO", "appliance.config.loader.proxies"):
        cfg = parse_config(raw)
    assert "client-fingerprint (uTLS) on 1 proxy has no effect" in caplog.text
    t, g = cfg.proxies
    assert t.options == TrojanOptions(password="p") and t.udp
    assert t.tls_options is not None and t.tls_options.fingerprint == "ab" * 32
    assert t.transport is not None and t.transport.ws is not None
    assert g.transport is not None and g.transport.grpc is not None
    assert "proxies[0].flow (mihomo's trojan has no XTLS flow any more)" in cfg.ignored_keys
    assert "proxies[2] (trojan proxy 's': ss-opts (Shadowsocks inside Trojan))" in \
        cfg.ignored_keys
    assert parse_config(effective_config(cfg)).proxies == cfg.proxies
    assert effective_config(cfg, redact=True)["proxies"][0]["password"] == "<redacted>"


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=8),
       st.integers(min_value=1, max_value=64))
def test_chunks_take_joins_in_order_and_never_exceeds_max(parts: list[bytes], most: int) -> None:
    chunks = Chunks()
    chunks.extend(parts)
    got = b""
    while chunks:
        piece = chunks.take(most)
        assert 0 < len(piece) <= most
        got += piece
    assert got == b"".join(parts) and chunks.size == 0
