"""The QUIC driver's pieces that need no sockets: `SharedTunnel` (one live
tunnel per proxy, a lock-free fast path, one connection attempt per wave
of flows), the TLS exporter's derivation (RFC 8446 7.5) against a
straight transcription of the RFC's formulas, and `CreditedConnection`'s
receive credit against an aioquic server wired to it in memory."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import socket
from typing import Any

import pytest
import trio
import trio.testing
from aioquic.buffer import Buffer
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.outbound import quic as quic_module
from appliance.outbound.base import OutboundError
from appliance.outbound.quic import (
    CreditedConnection,
    QuicTunnel,
    SharedTunnel,
    quic_configuration,
)


class FakeTunnel:
    def __init__(self) -> None:
        self.usable = True


def shared(connect: Any) -> SharedTunnel:
    return SharedTunnel(connect)


async def test_the_fast_path_returns_at_once() -> None:
    tunnel = FakeTunnel()

    async def connect() -> Any:
        await trio.lowlevel.checkpoint()
        return tunnel

    s = shared(connect)
    assert await s.get() is tunnel
    coro = s.get()
    with trio.testing.assert_no_checkpoints(), pytest.raises(StopIteration) as done:
        coro.send(None)
    assert done.value.value is tunnel


async def test_one_attempt_serves_every_waiting_flow_and_a_dead_tunnel_is_replaced(
        autojump_clock: trio.abc.Clock) -> None:
    made: list[FakeTunnel] = []

    async def connect() -> Any:
        await trio.sleep(1)
        made.append(FakeTunnel())
        return made[-1]

    s = shared(connect)
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lambda: _append(got, s.get()))
    assert len(made) == 1 and all(t is made[0] for t in got)
    made[0].usable = False
    assert await s.get() is made[1]


async def _append(out: list[Any], coro: Any) -> None:
    out.append(await coro)


async def test_a_failed_attempt_fails_its_waiters_at_once_then_is_retried(
        autojump_clock: trio.abc.Clock) -> None:
    attempts = 0

    async def connect() -> Any:
        nonlocal attempts
        attempts += 1
        await trio.sleep(5)
        raise OutboundError("hy: QUIC handshake timed out")

    s = shared(connect)
    errors: list[str] = []

    async def one() -> None:
        try:
            await s.get()
        except OutboundError as e:
            errors.append(e.reason)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    assert attempts == 1 and len(errors) == 4
    assert trio.current_time() - start == pytest.approx(5)
    await one()
    assert attempts == 2


def _expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) with SHA-256, from the RFC."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def test_the_exporter_follows_rfc8446() -> None:
    class Schedule:
        from cryptography.hazmat.primitives import hashes
        algorithm = hashes.SHA256()

    class Tls:
        key_schedule = Schedule()

    class Quic:
        tls = Tls()

    tunnel = QuicTunnel.__new__(QuicTunnel)
    tunnel.name = "t"
    tunnel.quic = Quic()  # type: ignore[assignment]
    secret = bytes(range(32))
    tunnel._exporter_secret = secret
    label, context = bytes(range(16)), b"password"
    derived = _expand_label(secret, label, hashlib.sha256(b"").digest(), 32)
    expected = _expand_label(derived, b"exporter", hashlib.sha256(context).digest(), 32)
    assert tunnel.export_keying_material(label, context, 32) == expected


# -- receive credit: a client and a server QuicConnection wired together in
# memory (no sockets), the server sending more than the flow reads.

CLIENT_ADDR = ("192.0.2.1", 40000)
SERVER_ADDR = ("192.0.2.2", 443)
WINDOW = 64 * 1024


def _server_config() -> QuicConfiguration:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quic.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("quic.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cfg = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    cfg.certificate = cert
    cfg.private_key = key
    return cfg


class Flow:
    consumed = 0


def test_receive_credit_follows_what_the_flow_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quic_module, "STREAM_WINDOW", WINDOW)
    client = CreditedConnection(configuration=quic_configuration(
        sni="quic.test", alpn=("h3",), skip_cert_verify=True, fingerprint=None))
    now = 1.0
    client.connect(SERVER_ADDR, now=now)
    first = client.datagrams_to_send(now)
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = QuicConnection(configuration=_server_config(),
                            original_destination_connection_id=header.destination_cid)
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now)

    def pump(rounds: int) -> None:
        nonlocal now
        for _ in range(rounds):
            now += 0.002
            for conn in (client, server):
                timer = conn.get_timer()
                if timer is not None and timer <= now:
                    conn.handle_timer(now)
            for data, _ in client.datagrams_to_send(now):
                server.receive_datagram(data, CLIENT_ADDR, now)
            for data, _ in server.datagrams_to_send(now):
                client.receive_datagram(data, SERVER_ADDR, now)
            while client.next_event() is not None:
                pass
            while server.next_event() is not None:
                pass

    pump(20)
    stream_id = client.get_next_available_stream_id()
    flow = Flow()
    client.flows[stream_id] = flow  # type: ignore[assignment]
    client.send_stream_data(stream_id, b"request")
    pump(5)
    server.send_stream_data(stream_id, bytes(8 * WINDOW))
    pump(300)
    # Nothing read: the server may send one window and no more.
    received = client._streams[stream_id].receiver.highest_offset
    assert WINDOW // 2 < received <= WINDOW
    flow.consumed = WINDOW
    pump(300)
    received = client._streams[stream_id].receiver.highest_offset
    assert WINDOW < received <= 2 * WINDOW


class CapturingSocket:
    """What QuicTunnel.transmit sends, kept for the in-memory server."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


class InMemoryServer:
    """A QuicTunnel on a CapturingSocket and an aioquic server passing
    datagrams in memory; `pump` moves them (the tunnel's sends first)."""

    def __init__(self) -> None:
        self.sock = CapturingSocket()
        self.tunnel = QuicTunnel("hy2-test", quic_configuration(
            sni="quic.test", alpn=("h3",), skip_cert_verify=True, fingerprint=None),
            self.sock, SERVER_ADDR)  # type: ignore[arg-type]
        self.tunnel.quic.connect(SERVER_ADDR, now=trio.current_time())
        self.tunnel.transmit()
        header = pull_quic_header(Buffer(data=self.sock.sent[0]), host_cid_length=8)
        self.server = QuicConnection(configuration=_server_config(),
                                     original_destination_connection_id=header.destination_cid)
        self.received: dict[int, bytes] = {}

    def pump(self, rounds: int) -> None:
        tunnel, server = self.tunnel, self.server
        for _ in range(rounds):
            now = trio.current_time()
            tunnel.transmit()
            for data in self.sock.sent:
                server.receive_datagram(data, CLIENT_ADDR, now)
            self.sock.sent.clear()
            for data, _ in server.datagrams_to_send(now):
                tunnel.quic.receive_datagram(data, SERVER_ADDR, now)
            tunnel._handle_events()
            while (event := server.next_event()) is not None:
                if isinstance(event, quic_events.StreamDataReceived):
                    self.received[event.stream_id] = (
                        self.received.get(event.stream_id, b"") + event.data)


async def test_a_stream_the_server_stopped_reading_ends_cleanly() -> None:
    """sing-box's hysteria2 server answers, ends its half and sends
    STOP_SENDING for ours. The flow's later EOF (and, once both halves are
    done, aioquic's discarded stream) must not raise out of aioquic: that
    ended the whole gateway under bench/protocols.py's load."""
    wired = InMemoryServer()
    tunnel, server, pump = wired.tunnel, wired.server, wired.pump
    pump(10)
    assert tunnel.connected.is_set()
    stream = tunnel.open_stream()
    await stream.send_all(b"request")
    pump(3)
    server.stop_stream(stream.stream_id, 0)
    server.send_stream_data(stream.stream_id, b"answer", end_stream=True)
    pump(3)
    assert stream._stopped is not None
    # A writer that was waiting when it came has had its bytes sent: no error.
    await stream.wait_send_all_might_not_block()
    assert await stream.receive_some() == b"answer"
    assert await stream.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError, match="stopped reading"):
        await stream.send_all(b"more")
    pump(10)  # the reset of our half acknowledged: aioquic discards the stream
    await stream.send_eof()  # nothing to end, and no exception
    await stream.aclose()
    assert stream.stream_id not in tunnel.streams


async def test_flows_that_write_in_one_pass_share_their_packets() -> None:
    """Requests that flows write in the same scheduler pass leave together
    (the first flow to resume sends for all): eight of them in one
    datagram. A writer cancelled once its bytes are queued still has them
    sent."""
    wired = InMemoryServer()
    wired.pump(10)
    assert wired.tunnel.connected.is_set()
    wired.sock.sent.clear()
    sent: dict[int, bytes] = {}

    async def request(i: int) -> None:
        # As every protocol opens one: the stream, then its request at once.
        stream = wired.tunnel.open_stream()
        sent[stream.stream_id] = b"request %d" % i
        await stream.send_all(sent[stream.stream_id])

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(request, i)
    assert len(sent) == 8 and len(wired.sock.sent) == 1
    late = wired.tunnel.open_stream()
    with trio.CancelScope() as scope:
        scope.cancel()
        await late.send_all(b"late")
    assert scope.cancelled_caught and len(wired.sock.sent) == 2
    wired.pump(3)
    assert wired.received == {**sent, late.stream_id: b"late"}


async def test_the_driver_acknowledges_once_the_socket_is_drained(
        mock_clock: trio.testing.MockClock) -> None:
    """A download's packets are acknowledged in the pass that drained the
    socket, not after aioquic's ack delay: a sender under BBR that waits on
    our ACKs then sees the network's round trip (measured: first downloads
    through hysteria2 7-108 MB/s before, 85-102 after). The clock stands
    still, so an ACK that waited for the delay would never leave."""
    client_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    client_end.setblocking(False)
    server_end.setblocking(False)
    tunnel = QuicTunnel("hy2-test", quic_configuration(
        sni="quic.test", alpn=("h3",), skip_cert_verify=True, fingerprint=None),
        client_end, SERVER_ADDR)
    tunnel.start()
    first = server_end.recv(65536)
    header = pull_quic_header(Buffer(data=first), host_cid_length=8)
    server = QuicConnection(configuration=_server_config(),
                            original_destination_connection_id=header.destination_cid)
    server.receive_datagram(first, CLIENT_ADDR, trio.current_time())

    async def exchange() -> int:
        """Server datagrams in, client datagrams out; how many came out.
        The clock moves 10 us (aioquic paces even its first packets), far
        from the 1 ms ack delay."""
        mock_clock.jump(1e-5)
        for data, _ in server.datagrams_to_send(trio.current_time()):
            server_end.send(data)
        await trio.testing.wait_all_tasks_blocked()
        came = 0
        while True:
            try:
                data = server_end.recv(65536)
            except BlockingIOError:
                return came
            came += 1
            server.receive_datagram(data, CLIENT_ADDR, trio.current_time())

    for _ in range(5):
        await exchange()
    assert tunnel.connected.is_set()
    stream = tunnel.open_stream()
    await stream.send_all(b"request")
    await exchange()
    while server.next_event() is not None:
        pass
    server.send_stream_data(stream.stream_id, b"answer" * 100)
    assert await exchange() == 1  # the ACK
    assert server._loss.bytes_in_flight == 0
    assert await stream.receive_some() == b"answer" * 100
    tunnel.close()
    await exchange()
    server_end.close()


# -- the short receive path (CreditedConnection.receive_datagram) against
# aioquic's own, on a connection wired to an aioquic server in memory.

class WiredPair:
    """A CreditedConnection and an aioquic server passing datagrams in
    memory; `slow` counts the client's datagrams aioquic's path handled."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.slow = 0
        original = QuicConnection.receive_datagram

        def counted(conn: QuicConnection, data: bytes, addr: Any, now: float) -> None:
            if conn is self.client:
                self.slow += 1
            original(conn, data, addr, now)

        monkeypatch.setattr(QuicConnection, "receive_datagram", counted)
        self.client = CreditedConnection(configuration=quic_configuration(
            sni="quic.test", alpn=("h3",), skip_cert_verify=True, fingerprint=None))
        self.now = 1.0
        self.client.connect(SERVER_ADDR, now=self.now)
        first = self.client.datagrams_to_send(self.now)
        header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
        config = _server_config()
        config.max_datagram_frame_size = 65536
        self.server = QuicConnection(configuration=config,
                                     original_destination_connection_id=header.destination_cid)
        for data, _ in first:
            self.server.receive_datagram(data, CLIENT_ADDR, self.now)
        self.received: dict[int, bytearray] = {}
        self.datagrams: list[bytes] = []
        self.tamper: Any = None

    def pump(self, rounds: int) -> None:
        for _ in range(rounds):
            self.now += 0.002
            for conn in (self.client, self.server):
                timer = conn.get_timer()
                if timer is not None and timer <= self.now:
                    conn.handle_timer(self.now)
            for data, _ in self.client.datagrams_to_send(self.now):
                self.server.receive_datagram(data, CLIENT_ADDR, self.now)
            for data, _ in self.server.datagrams_to_send(self.now):
                for d in (self.tamper(data) if self.tamper else [data]):
                    self.client.receive_datagram(d, SERVER_ADDR, self.now)
            while (event := self.client.next_event()) is not None:
                if isinstance(event, quic_events.StreamDataReceived):
                    self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                elif isinstance(event, quic_events.DatagramFrameReceived):
                    self.datagrams.append(event.data)
            while self.server.next_event() is not None:
                pass


def test_the_short_receive_path_carries_a_download(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = WiredPair(monkeypatch)
    pair.pump(20)
    assert pair.client._handshake_confirmed
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"request")
    pair.pump(5)
    body = bytes(range(256)) * 4096  # 1 MiB
    pair.server.send_stream_data(stream_id, body[:len(body) // 2])
    pair.server.send_datagram_frame(b"once")
    # Every datagram twice: RFC 9000 12.3, a duplicate is not delivered again.
    pair.tamper = lambda data: [data, data]
    pair.pump(100)
    assert pair.datagrams == [b"once"]
    # A key update (RFC 9001 6) goes through aioquic's path, later
    # packets take the short path under the new keys.
    pair.server.request_key_update()
    pair.tamper = None
    slow_before = pair.slow
    pair.server.send_stream_data(stream_id, body[len(body) // 2:], end_stream=True)
    pair.pump(100)
    assert bytes(pair.received[stream_id]) == body
    assert pair.client._cryptos[quic_module._ONE_RTT].recv.key_phase == 1
    assert 0 < pair.slow - slow_before < 10
    # The client's ACKs (written from what the short path recorded) let
    # the server retire everything it sent.
    sender = pair.server._streams[stream_id].sender
    assert sender.is_finished
    assert pair.client._state.name == "CONNECTED"


def test_the_short_receive_path_drops_what_does_not_decrypt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pair = WiredPair(monkeypatch)
    pair.pump(20)
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_stream_data(stream_id, b"request")
    pair.pump(5)
    pair.server.send_stream_data(stream_id, b"answer", end_stream=True)

    def damaged(data: bytes) -> list[bytes]:
        # A flipped payload byte first (the AEAD refuses it), then the
        # packet as sent.
        return [data[:-1] + bytes([data[-1] ^ 1]), data]

    pair.tamper = damaged
    pair.pump(10)
    assert bytes(pair.received[stream_id]) == b"answer"
    assert pair.client._state.name == "CONNECTED"
