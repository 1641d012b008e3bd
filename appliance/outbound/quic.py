"""aioquic driven from trio: one QUIC connection per proxy, shared by flows.

What this owns: `QuicTunnel` is one client QUIC connection (aioquic's
sans-I/O `QuicConnection`) on one marked, connected UDP socket, driven by a
task of its own; flows get `QuicStream`s on it (trio streams over QUIC
streams). `SharedTunnel` keeps a proxy's one live tunnel: a flow that finds
it usable takes it without a lock or a checkpoint (the fast path); the
first flow after it died connects a new one under a lock, the others wait
for that one. The protocols (Hysteria2, TUIC) subclass `QuicTunnel` for
their handshake, datagrams and server-opened streams.

The driver (`QuicTunnel._drive`): one wake-up per batch of received
datagrams (up to `RECV_BATCH` reads, each a whole GSO batch with UDP_GRO,
all fed to aioquic before its events are handled; while datagrams keep
coming, the next pass follows a plain checkpoint instead of a wait), then
one `datagrams_to_send` drained with a send per datagram. Flows that write
send it themselves, so their data leaves in the writer's own turn instead
of a second task's: a flow queues its stream data (or FIN, or reset) and
yields once before sending (`send_queued`), and whoever sends first sends
what every flow queued in that scheduler pass, several streams' frames in
one packet (wrk's 32 flows at a time through hysteria2: ~2 packets per
flow were sent before, each a Python packet build and a send); the
driver's timer (aioquic's
`get_timer`, idle and keepalive) is a cancel scope whose deadline every
transmit moves. `CreditedConnection` takes the packets of a download
through a shorter path than aioquic's own (see its receive_datagram).

Why it is not faster: every QUIC packet costs a Python round through
aioquic's frame parsing, stream and ACK bookkeeping and its AEAD calls
(per packet, not per byte), about 11 us of CPU for a 1.4 KB packet; see
docs/architecture.md "QUIC protocols".

How it fails: the tunnel ends when the server closes it (its error code
and reason are kept in `closed_reason` and logged once), when aioquic's
idle timeout or our own (no flow for `IDLE_TIMEOUT`) fires, or when the
socket fails. Every stream on it then raises `trio.BrokenResourceError`
with that reason; `SharedTunnel` connects a new one for the next flow.
Handshake failures (refused certificate, no answer) raise OutboundError
within the connect timeout. The socket carries SO_MARK = routing-mark.

The TLS exporter (RFC 8446 section 7.5) TUIC needs is not in aioquic's
TLS: the tunnel captures the exporter master secret at the moment aioquic
installs the 1-RTT read key (the transcript then ends with the server's
Finished, as the exporter requires) and derives from it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import logging
import math
import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio
from aioquic._crypto import CryptoError, HeaderProtection
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    NetworkAddress,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicReceiveContext,
)
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    PACKET_SPIN_BIT,
    QuicErrorCode,
    QuicFrameType,
    decode_packet_number,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import MAX_ACK_RANGES, QuicPacketSpace
from aioquic.quic.stream import QuicStream as AioquicStream
from aioquic.tls import Direction, Epoch, hkdf_expand_label

from appliance.config.model import IPAddress, ProxyConfig
from appliance.outbound.base import Dialer, OutboundError, UdpPeer, udp_socket

log = logging.getLogger(__name__)
# aioquic logs every connection's version and ALPN at INFO under "quic":
# one line per tunnel that says nothing an operator can act on.
logging.getLogger("quic").setLevel(logging.WARNING)

# QUIC packets we build: 1350 bytes (what Chrome and quiche use) fits
# every path with a 1400+ MTU and halves the per-packet cost against the
# 1200-byte minimum.
MAX_DATAGRAM_SIZE = 1350
# Room for a DATAGRAM frame's payload in one packet: the packet minus the
# short header (1 + connection id up to 20 + packet number up to 4), the
# AEAD tag (16) and the frame's own type and length (3), with margin.
DATAGRAM_ROOM = MAX_DATAGRAM_SIZE - 64
# The tunnel's UDP socket buffers (quic-go, mihomo's stack, asks for 7 MiB):
# the server sends a congestion window's worth in bursts faster than one
# Python thread drains them, and with the kernel's default (208 KiB) the
# rest of a burst is dropped, each drop a loss that halves the server's
# window. Forced past net.core.rmem_max/wmem_max where we have
# CAP_NET_ADMIN (the appliance runs as root), else up to those limits.
SOCKET_BUFFER = 7 << 20
# Received datagrams handled per wake-up before aioquic's events are.
RECV_BATCH = 64
RECV_SIZE = 65536
# A tunnel without flows for this long is closed (the next flow opens a new
# one); with flows, a PING after KEEPALIVE seconds of silence keeps NAT and
# the server's idle timer fresh.
IDLE_TIMEOUT = 30.0
KEEPALIVE = 10.0
# A server that has acknowledged nothing for DEAD_SILENCE seconds, through
# at least DEAD_PTO_COUNT probe timeouts in a row, is gone (a crashed or
# restarted server drops our packets, or answers with stateless resets
# keyed by a secret it no longer has): the tunnel closes so the next flow
# gets a new one, instead of every flow waiting out the idle timeout.
DEAD_SILENCE = 3.0
DEAD_PTO_COUNT = 4
# Flow control: a writer waits while this much of its stream is unacked.
SEND_HIGH_WATER = 1 << 20
# Receive windows: a stream is granted what its flow has read plus
# STREAM_WINDOW (CreditedConnection; at most that much waits in the
# gateway per stream), the connection starts at CONNECTION_WINDOW (aioquic
# doubles it as it fills).
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
# Largest chunk a receive_some hands back when not asked for less.
READ_CHUNK = 1 << 18
# Linux's UDP_GRO socket option and control message (linux/udp.h).
UDP_GRO = 104
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
# Linux's SO_RCVBUFFORCE / SO_SNDBUFFORCE (the socket module lacks them).
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
# The error code a tunnel closes with when it is done (no error).
NO_ERROR = 0


@dataclass(frozen=True)
class QuicTls:
    """A QUIC proxy's TLS as its outbound uses it: the proxy's `sni`
    (default: the server's name), `alpn` (default h3), verification and
    certificate pin."""

    sni: str
    alpn: tuple[str, ...]
    skip_cert_verify: bool
    fingerprint: str | None

    @classmethod
    def of(cls, p: ProxyConfig) -> QuicTls:
        tls = p.tls_options
        if tls is None:
            return cls(p.server, ("h3",), False, None)
        return cls(tls.sni or p.server, tls.alpn or ("h3",), tls.skip_cert_verify,
                   tls.fingerprint)


def quic_configuration(*, sni: str, alpn: tuple[str, ...], skip_cert_verify: bool,
                       fingerprint: str | None, congestion: str = "cubic",
                       ca_file: str | None = None, ca_data: str | None = None,
                       datagrams: bool = True) -> QuicConfiguration:
    """The client configuration of one proxy. A `fingerprint` pins the
    certificate instead of verifying its chain (checked after the
    handshake, as mihomo does). The chain is verified against the proxy's
    own `ca`/`ca-str` when given, else the certifi bundle, or, as Python's
    ssl does, the CA file SSL_CERT_FILE names."""
    cfg = QuicConfiguration(
        is_client=True, alpn_protocols=list(alpn), server_name=sni,
        max_datagram_size=MAX_DATAGRAM_SIZE, idle_timeout=IDLE_TIMEOUT + KEEPALIVE,
        max_stream_data=STREAM_WINDOW, max_data=CONNECTION_WINDOW,
        max_datagram_frame_size=65536 if datagrams else None,
        congestion_control_algorithm=congestion,
    )  # fmt: skip
    if skip_cert_verify or fingerprint is not None:
        cfg.verify_mode = ssl.CERT_NONE
    elif ca_file is not None or ca_data is not None:
        cfg.load_verify_locations(cafile=ca_file, cadata=ca_data.encode() if ca_data else None)
    else:
        cafile = os.environ.get("SSL_CERT_FILE")
        if cafile:
            cfg.load_verify_locations(cafile=cafile)
    return cfg


_ONE_RTT = Epoch.ONE_RTT
# What CreditedConnection.receive_datagram's short path uses of aioquic's
# internals (checked against aioquic 1.2-1.7); without them, aioquic's path.
_FAST_RECEIVE = all(hasattr(QuicConnection, name) for name in (
    "_payload_received", "_idle_timeout")) and hasattr(HeaderProtection, "_mask")


class CreditedConnection(QuicConnection):
    """aioquic's client connection with receive credit that follows what
    the flows read. aioquic doubles a stream's window whenever half of it
    has arrived, read or not: a slow LAN client behind a fast proxy would
    have the gateway buffer a whole download. Here a flow's stream (one of
    `flows`) is granted up to what its flow consumed plus STREAM_WINDOW,
    raised in steps of a quarter window; other streams (HTTP/3 control,
    TUIC's server streams) keep aioquic's rule."""

    def __init__(self, *, configuration: QuicConfiguration) -> None:
        super().__init__(configuration=configuration)
        self.flows: dict[int, QuicStream] = {}
        # The short receive path (receive_datagram) where this aioquic has
        # the internals it relies on.
        self._fast_receive = _FAST_RECEIVE
        self._one_rtt: tuple[CryptoPair, QuicPacketSpace] | None = None

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """aioquic's receive_datagram, with a shorter path for what a
        download is made of: a 1-RTT (short header) packet to our current
        connection ids, after the handshake is confirmed. That path does
        what aioquic's does for such a packet on a client (RFC 9000 12.3
        duplicates, 17.3 reserved bits, 9 server address; 13.2 ACK
        bookkeeping) without the checks that apply to other packet types
        and servers, and removes header protection (RFC 9001 5.4) from the
        header bytes only instead of copying the packet. Anything else (a
        key update, an unknown connection id, long headers, a logger) goes
        through aioquic's own code."""
        if (not self._fast_receive or data[0] & 0xC0 != 0x40
                or self._state is not QuicConnectionState.CONNECTED
                or not self._handshake_confirmed or self._quic_logger is not None):
            super().receive_datagram(data, addr, now)
            return
        path = self._network_paths[0]
        cid_end = 1 + self._configuration.connection_id_length
        cid = data[1:cid_end]
        if path.addr != addr or not any(c.cid == cid for c in self._host_cids):
            super().receive_datagram(data, addr, now)
            return
        one_rtt = self._one_rtt
        if one_rtt is None:
            # Both live as long as the connection once it is confirmed.
            one_rtt = self._one_rtt = (self._cryptos[_ONE_RTT], self._spaces[_ONE_RTT])
        crypto, space = one_rtt
        recv = crypto.recv
        hp, aead = recv.hp, recv.aead
        if hp is None or aead is None:
            super().receive_datagram(data, addr, now)
            return
        sample_at = cid_end + 4
        if len(data) < sample_at + 16:
            return  # too short to sample: dropped, as aioquic does
        mask = hp._mask(data[sample_at:sample_at + 16])
        first = data[0] ^ (mask[0] & 0x1F)
        if (first & 4) >> 2 != recv.key_phase:
            super().receive_datagram(data, addr, now)  # a key update
            return
        pn_length = (first & 3) + 1
        pn_end = cid_end + pn_length
        truncated = (int.from_bytes(data[cid_end:pn_end], "big")
                     ^ int.from_bytes(mask[1:1 + pn_length], "big"))
        packet_number = decode_packet_number(truncated, pn_length * 8,
                                             space.expected_packet_number)
        plain_header = (bytes((first,)) + data[1:cid_end]
                        + truncated.to_bytes(pn_length, "big"))
        try:
            payload = aead.decrypt(data[pn_end:], plain_header, packet_number)
        except CryptoError:
            return  # not ours or damaged: dropped
        if packet_number in space.received_packets:
            return  # a duplicate
        if first & 0x18:
            self.close(error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                       frame_type=QuicFrameType.PADDING,
                       reason_phrase="Reserved bits must be zero")
            return
        if packet_number > space.expected_packet_number:
            space.expected_packet_number = packet_number + 1
        if packet_number > self._spin_highest_pn:
            self._spin_bit = not (first & PACKET_SPIN_BIT)
            self._spin_highest_pn = packet_number
        context = QuicReceiveContext(epoch=_ONE_RTT, host_cid=cid, network_path=path,
                                     quic_logger_frames=None, time=now, version=None)
        try:
            is_ack_eliciting, _probing = self._payload_received(
                context, payload, crypto_frame_required=False)
        except QuicConnectionError as exc:
            self.close(error_code=exc.error_code, frame_type=exc.frame_type,
                       reason_phrase=exc.reason_phrase)
        if self._state in END_STATES or self._close_pending:
            return
        self._close_at = now + self._idle_timeout()
        self._ack_eliciting_sent_since_receipt = False
        if not space.discarded:
            if packet_number > space.largest_received_packet:
                space.largest_received_packet = packet_number
                space.largest_received_time = now
            space.ack_queue.add(packet_number)
            space.received_packets.add(packet_number)
            if len(space.ack_queue) > MAX_ACK_RANGES:
                space.ack_queue.shift()
            if is_ack_eliciting and space.ack_at is None:
                space.ack_at = now + self._ack_delay

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace,
                             stream: AioquicStream) -> None:
        stream_id = stream.stream_id
        flow = self.flows.get(stream_id) if stream_id is not None else None
        if flow is None or stream_id is None or not stream.max_stream_data_local:
            super()._write_stream_limits(builder, space, stream)
            return
        target = flow.consumed + STREAM_WINDOW
        if target >= stream.max_stream_data_local + STREAM_WINDOW // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            # The frame as aioquic writes it (connection.py _write_stream_limits).
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA, capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery, handler_args=(stream,))
            buf.push_uint_var(stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


class QuicStream(trio.abc.HalfCloseableStream):
    """One bidirectional (or, for `send_all` only, unidirectional) QUIC
    stream of a tunnel as a trio stream. Received data waits in a buffer
    until read; a writer waits while more than SEND_HIGH_WATER of its data
    is unacked. Fails with BrokenResourceError when the server resets the
    stream or the tunnel dies; `aclose` resets what is still open."""

    def __init__(self, tunnel: QuicTunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._error: str | None = None
        self._readable = trio.Event()
        self._writable = trio.Event()
        self._sent_eof = False
        # Why the server will not read more of this stream (STOP_SENDING),
        # None while it reads: aioquic has reset our half then, and a later
        # write or FIN on it would raise out of aioquic.
        self._stopped: str | None = None
        self._closed = False
        # Bytes the flow has read: the receive credit follows it.
        self.consumed = 0

    # -- the tunnel's side
    def _deliver(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
        if end:
            self._eof = True
        self._readable.set()

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._readable.set()
        self._writable.set()

    # -- the flow's side
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        while not self._buffered and not self._eof and self._error is None:
            self._readable = trio.Event()
            await self._readable.wait()
        if not self._buffered:
            await trio.lowlevel.checkpoint()
            if self._eof:
                return b""
            raise trio.BrokenResourceError(self._error)
        out = self._take(max_bytes or READ_CHUNK)
        self.consumed += len(out)
        self.tunnel.credit(self)
        await trio.lowlevel.checkpoint()
        return out

    def _take(self, limit: int) -> bytes:
        """Up to `limit` bytes from the front of what was received."""
        chunks = self._chunks
        if self._buffered <= limit:
            out = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            return out
        parts = []
        need = limit
        while need:
            chunk = chunks.popleft()
            if len(chunk) > need:
                chunks.appendleft(chunk[need:])
                chunk = chunk[:need]
            parts.append(chunk)
            need -= len(chunk)
        self._buffered -= limit
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        """Put back what a wrapper read past its protocol's header."""
        if data:
            self._chunks.appendleft(bytes(data))
            self._buffered += len(data)
            self.consumed -= len(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._error is not None:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError(self._error)
        if self._sent_eof:
            raise trio.ClosedResourceError("send_eof was called")
        if self._stopped is not None:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError(self._stopped)
        if not data:
            await self.wait_send_all_might_not_block()
            return
        self.tunnel.queue_stream(self.stream_id, bytes(data))
        await self.tunnel.send_queued()  # the schedule point
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._wait_acknowledged()
        self._raise_if_failed()

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait_acknowledged()
        await trio.lowlevel.checkpoint()
        self._raise_if_failed()

    async def _wait_acknowledged(self) -> None:
        """Wait while more than SEND_HIGH_WATER of the stream is unacked."""
        while (self._error is None and self._stopped is None
               and self.tunnel.unacked(self.stream_id) > SEND_HIGH_WATER):
            self._writable = trio.Event()
            self.tunnel.wants_writable(self)
            await self._writable.wait()

    def _raise_if_failed(self) -> None:
        # Not for `_stopped`: what was written went out before the server
        # stopped reading (its answer and STOP_SENDING often come in one
        # packet, while the writer waits here); the next write fails.
        if self._error is not None:
            raise trio.BrokenResourceError(self._error)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not (self._sent_eof or self._closed or self._error is not None):
            self._sent_eof = True
            # With `_stopped` our half was reset at the server's request:
            # nothing to end.
            if self._stopped is None:
                self.tunnel.queue_stream(self.stream_id, b"", end=True)
        await self.tunnel.send_queued()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.tunnel.close_stream(self, reset=not (self._sent_eof and self._eof))
        await self.tunnel.send_queued()


class Reassembly(Protocol):
    """A protocol's reassembly of one session's fragmented packets:
    `feed` returns the whole packet (with its `payload`) once complete."""

    def feed(self, fragment: Any) -> Any: ...


class QuicTunnel:
    """One client QUIC connection to a proxy server (see the module doc).

    Subclasses add the protocol: `handshake()` (after QUIC's: auth),
    `on_datagram` (DATAGRAM frames), `on_other_stream` (data on streams
    this side did not open as QuicStreams) and `keepalive` (what to send
    when idle with flows). `users` counts flows; with none for
    IDLE_TIMEOUT the tunnel closes itself.
    """

    def __init__(self, name: str, configuration: QuicConfiguration, sock: socket.socket,
                 address: tuple[Any, ...], *,
                 obfuscate: Callable[[bytes], bytes] | None = None,
                 deobfuscate: Callable[[bytes], bytes | None] | None = None) -> None:
        self.name = name
        self.quic = CreditedConnection(configuration=configuration)
        self.sock = sock
        self.address = address
        # Whether the socket reads GSO batches whole (`enable_gro`).
        self.gro = False
        self._obfuscate = obfuscate
        self._deobfuscate = deobfuscate
        self.streams: dict[int, QuicStream] = {}
        self.quic.flows = self.streams
        self.closed_reason: str | None = None
        self.connected = trio.Event()
        # Set once the tunnel takes no more flows (closing or closed).
        self.ended = trio.Event()
        self.terminated = trio.Event()
        self.users = 0
        self._idle_since = trio.current_time()
        self._last_activity = trio.current_time()
        # Since when probe timeouts have gone unacknowledged (None: none).
        self._unanswered_since: float | None = None
        self._timer_scope: trio.CancelScope | None = None
        self._blocked_writers: list[QuicStream] = []
        # Stream data, FINs or resets queued and not yet sent (`send_queued`).
        self._send_due = False
        self._exporter_secret: bytes | None = None
        self._ping_id = 0
        # Whether any stream of ours received data (the server served us).
        self.received = False
        # Seconds of silence with flows open before `keepalive()`.
        self.keepalive_interval = KEEPALIVE
        # The UDP flows carried as datagrams: the protocol's session (TUIC:
        # association) id -> the flow's peer and the reassembly of its
        # fragmented packets.
        self.sessions: dict[int, tuple[DatagramPeer, Reassembly]] = {}
        self._session_ids = itertools.count(1)

    # -- life

    def start(self) -> None:
        """Send the first flight and start the driver (a system task: the
        tunnel outlives the flow that opened it)."""
        self.quic.connect(self.address, now=trio.current_time())
        self._capture_exporter_secret()
        self.transmit()
        trio.lowlevel.spawn_system_task(self._drive, name=f"quic tunnel {self.name}")

    @property
    def usable(self) -> bool:
        """Open for new flows: handshake done and not closing."""
        return self.closed_reason is None and self.connected.is_set()

    def close(self, error_code: int = NO_ERROR, reason: str = "") -> None:
        if self.quic._state not in (*_CLOSING, QuicConnectionState.TERMINATED):
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()
        self._end(reason or "closed")

    def _end(self, reason: str) -> None:
        """Fail every stream with `reason` (once)."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self.ended.set()
        for stream in list(self.streams.values()):
            stream._fail(reason)
        self.streams.clear()
        self.sessions.clear()
        self.on_end(reason)
        self.connected.set()  # wake a handshake waiter: it checks closed_reason
        if self._timer_scope is not None:
            self._timer_scope.deadline = -math.inf

    async def _drive(self) -> None:
        quic = self.quic
        idle = True
        try:
            while True:
                if idle:
                    with trio.CancelScope(deadline=self._deadline()) as scope:
                        self._timer_scope = scope
                        await trio.lowlevel.wait_readable(self.sock)
                    self._timer_scope = None
                else:
                    # Datagrams came in the last pass, more are likely
                    # queued: let the flows take what was delivered, then
                    # read again without an epoll registration and a
                    # cancel scope per pass (a tenth of the CPU at speed).
                    await trio.lowlevel.checkpoint()
                now = trio.current_time()
                reads = self._receive(now)
                idle = reads == 0
                if 0 < reads < RECV_BATCH:
                    self._acknowledge_now(now)
                timer = quic.get_timer()
                if timer is not None and timer <= now:
                    quic.handle_timer(now)
                self._handle_events()
                self._housekeeping(now)
                self.transmit()
                state = quic._state
                if state == QuicConnectionState.TERMINATED or (
                        self.closed_reason is not None and state not in _CLOSING):
                    break
        except Exception as e:  # the driver must never take the process down
            log.exception("%s: QUIC driver failed", self.name)
            self._end(f"driver failed: {e!r}")
        finally:
            self._end("connection closed")
            self.sock.close()
            self.terminated.set()

    def _receive(self, now: float) -> int:
        """Feed aioquic up to RECV_BATCH waiting reads; how many. With UDP
        GRO (`gro_segment`) one read is up to 64 KiB of datagrams the
        server sent as one GSO batch, each `segment` bytes but the last:
        one system call for what was a dozen."""
        gro = self.gro
        recv = self.sock.recv
        recvmsg = self.sock.recvmsg
        receive_datagram = self.quic.receive_datagram
        deobfuscate = self._deobfuscate
        address = self.address
        n = 0
        for n in range(RECV_BATCH):  # noqa: B007 - n counts after the loop
            try:
                if gro:
                    data, ancillary, _flags, _addr = recvmsg(RECV_SIZE, GRO_CMSG_SPACE)
                    segment = gro_segment(ancillary) or len(data)
                else:
                    data = recv(RECV_SIZE)
                    segment = len(data)
            except BlockingIOError:
                break
            except OSError as e:
                # ICMP port unreachable on the connected socket: nothing
                # listens there (the server is down).
                self._end(f"server unreachable ({e.strerror or e})")
                break
            datagrams = ([data] if segment >= len(data) else
                         [data[i:i + segment] for i in range(0, len(data), segment)])
            for datagram in datagrams:
                if deobfuscate is not None:
                    plain = deobfuscate(datagram)
                    if plain is None:
                        continue
                    datagram = plain
                receive_datagram(datagram, address, now)
        else:
            n = RECV_BATCH
        if n:
            self._last_activity = now
        return n

    def _acknowledge_now(self, now: float) -> None:
        """The socket is drained: acknowledge what came now instead of
        after aioquic's ack delay. A sender waiting on our ACKs (a
        congestion window's worth in flight) then sees the round trip the
        network has, not the network's plus our delay."""
        space = self.quic._spaces[_ONE_RTT]
        if space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def _deadline(self) -> float:
        if self.closed_reason is not None and self.quic._state not in _CLOSING:
            return -math.inf
        timer = self.quic.get_timer()
        deadline = math.inf if timer is None else timer
        if self.closed_reason is None and self.connected.is_set():
            if self.users == 0:
                deadline = min(deadline, self._idle_since + IDLE_TIMEOUT)
            else:
                deadline = min(deadline, self._last_activity + self.keepalive_interval)
        return deadline

    def _housekeeping(self, now: float) -> None:
        if self.closed_reason is not None or not self.connected.is_set():
            return
        ptos = self.quic._loss._pto_count  # reset by every acknowledgement
        if not ptos:
            self._unanswered_since = None
        elif self._unanswered_since is None:
            self._unanswered_since = now
        elif ptos >= DEAD_PTO_COUNT and now - self._unanswered_since >= DEAD_SILENCE:
            log.warning("%s: the server stopped answering (%d probes unacknowledged over "
                        "%.1fs); closing the connection", self.name, ptos,
                        now - self._unanswered_since)
            self.close(NO_ERROR, "server stopped answering")
            return
        if self.users == 0 and now >= self._idle_since + IDLE_TIMEOUT:
            log.debug("%s: QUIC connection idle for %gs, closed", self.name, IDLE_TIMEOUT)
            self.close(NO_ERROR, "idle")
        elif self.users and now >= self._last_activity + self.keepalive_interval:
            self._last_activity = now
            self.keepalive()

    def transmit(self) -> None:
        """Send every datagram aioquic has ready (one call per packet: what
        sendmmsg would batch, Python's socket module does not offer), then
        move the driver's timer."""
        sock = self.sock
        obfuscate = self._obfuscate
        self._send_due = False
        try:
            for data, _addr in self.quic.datagrams_to_send(trio.current_time()):
                try:
                    sock.send(obfuscate(data) if obfuscate is not None else data)
                except BlockingIOError:
                    break  # the socket buffer is full: QUIC's loss recovery resends
                except OSError:
                    continue
        except Exception as e:
            log.exception("%s: QUIC send failed", self.name)
            self._end(f"send failed: {e!r}")
        if self._blocked_writers:
            writers, self._blocked_writers = self._blocked_writers, []
            for w in writers:
                if self.unacked(w.stream_id) <= SEND_HIGH_WATER:
                    w._writable.set()
                else:
                    self._blocked_writers.append(w)
        scope = self._timer_scope
        if scope is not None:
            scope.deadline = self._deadline()

    def _handle_events(self) -> None:
        quic = self.quic
        close = quic._close_event
        if close is not None and self.closed_reason is None:
            # The server closed the connection: aioquic reports it only
            # after the draining period (three PTOs); the flows learn now.
            self._report_close(close)
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self.received = True
                    stream._deliver(event.data, event.end_stream)
                    if event.end_stream and stream._sent_eof:
                        self._forget(stream)
                else:
                    self.on_other_stream(event)
            elif isinstance(event, events.DatagramFrameReceived):
                self.on_datagram(event.data)
            elif isinstance(event, events.StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._fail(f"stream reset by the server (error {event.error_code:#x})")
                    self._forget(stream)
                else:
                    self.on_other_stream(event)
            elif isinstance(event, events.StopSendingReceived):
                stream = self.streams.get(event.stream_id)
                log.debug("%s: stream %d: STOP_SENDING %#x (ours: %s)", self.name,
                          event.stream_id, event.error_code, stream is not None)
                if stream is not None and stream._stopped is None:
                    # The server is done reading (sing-box's hysteria2 does
                    # this once it has answered): our half is reset.
                    stream._stopped = (f"the server stopped reading the stream "
                                       f"(STOP_SENDING, error {event.error_code:#x})")
                    stream._writable.set()
                else:
                    self.on_other_event(event)
            elif isinstance(event, events.HandshakeCompleted):
                self.on_handshake(event)
                self.connected.set()
            elif isinstance(event, events.ConnectionTerminated):
                self._report_close(event)
            else:
                self.on_other_event(event)

    def _report_close(self, event: events.ConnectionTerminated) -> None:
        if self.closed_reason is not None:
            return
        why = describe_close(event) + self.close_hint()
        if self.connected.is_set():
            log.warning("%s: %s", self.name, why)
        self._end(why)

    # -- streams

    def open_stream(self, *, unidirectional: bool = False) -> QuicStream:
        """A new stream this side opens (no I/O until it is written)."""
        if self.closed_reason is not None:
            raise OutboundError(f"{self.name}: {self.closed_reason}")
        stream_id = self.quic.get_next_available_stream_id(is_unidirectional=unidirectional)
        stream = QuicStream(self, stream_id)
        self.streams[stream_id] = stream
        self.users += 1
        return stream

    def queue_stream(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """Queue `data` (and the FIN) on a stream; `send_queued` sends it.
        BrokenResourceError if aioquic has discarded the stream (both
        halves done: the server stopped our half and ended its own)."""
        if self.closed_reason is not None:
            return
        try:
            self.quic.send_stream_data(stream_id, data, end_stream=end)
        except ValueError as e:  # "Cannot send data on a finished stream"
            raise trio.BrokenResourceError(f"{self.name}: stream {stream_id}: {e}") from None
        self._send_due = True

    async def send_queued(self) -> None:
        """Send what is queued, after one yield, so that what other flows
        queue in the same scheduler pass leaves in the same packets (the
        first of them to resume sends for all). Shielded: queued bytes go
        out whether or not the flow is cancelled meanwhile."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        if self._send_due:
            self.transmit()

    def unacked(self, stream_id: int) -> int:
        """Bytes of the stream sent but not yet acknowledged (aioquic keeps
        them in the sender's buffer; it has no public counter)."""
        s = self.quic._streams.get(stream_id)
        if s is None:
            return 0
        return s.sender._buffer_stop - s.sender._buffer_start

    def credit(self, stream: QuicStream) -> None:
        """The flow read from `stream`: send more credit once it is worth
        a frame (a quarter window; CreditedConnection writes it)."""
        s = self.quic._streams.get(stream.stream_id)
        if (s is not None and s.max_stream_data_local
                and stream.consumed + STREAM_WINDOW >= s.max_stream_data_local
                + STREAM_WINDOW // 4):
            self.transmit()

    def wants_writable(self, stream: QuicStream) -> None:
        self._blocked_writers.append(stream)

    def close_stream(self, stream: QuicStream, *, reset: bool) -> None:
        if self.streams.get(stream.stream_id) is not stream:
            self._forget(stream)
            return
        if reset and self.closed_reason is None:
            with contextlib.suppress(Exception):
                # Stop what is still coming and abandon what was not sent.
                if not stream._eof and not _is_local_uni(stream.stream_id):
                    self.quic.stop_stream(stream.stream_id, 0)
                if not stream._sent_eof:
                    self.quic.reset_stream(stream.stream_id, 0)
            self._send_due = True  # sent by the caller's `send_queued`
        self._forget(stream)

    def _forget(self, stream: QuicStream) -> None:
        if self.streams.pop(stream.stream_id, None) is stream:
            self.release()

    def acquire(self) -> None:
        """One more flow (a UDP session) uses the tunnel."""
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.users = 0
            self._idle_since = trio.current_time()
            scope = self._timer_scope
            if scope is not None:
                scope.deadline = self._deadline()

    # -- UDP sessions

    def new_session(self, mask: int) -> int:
        """An unused, nonzero session id of the protocol's width (`mask`)."""
        while True:
            sid = next(self._session_ids) & mask
            if sid and sid not in self.sessions:
                return sid

    def deliver_fragment(self, session_id: int, fragment: Any) -> None:
        """A fragment (or whole packet) from the server for a session: its
        peer gets the packet once reassembled; unknown sessions are dropped."""
        entry = self.sessions.get(session_id)
        if entry is None:
            return
        peer, reassembly = entry
        whole = reassembly.feed(fragment)
        if whole is not None:
            peer.deliver(whole.payload)

    # -- TLS exporter

    def _capture_exporter_secret(self) -> None:
        tls = self.quic.tls
        install = tls.update_traffic_key_cb

        def hook(direction: Direction, epoch: Epoch, cipher_suite: Any, secret: bytes) -> None:
            if (direction == Direction.DECRYPT and epoch == Epoch.ONE_RTT
                    and self._exporter_secret is None and tls.key_schedule is not None):
                # The schedule holds the master secret and the transcript
                # through the server's Finished: "exp master" is defined so.
                self._exporter_secret = tls.key_schedule.derive_secret(b"exp master")
            install(direction, epoch, cipher_suite, secret)

        tls.update_traffic_key_cb = hook

    def export_keying_material(self, label: bytes, context: bytes, length: int) -> bytes:
        """RFC 8446 section 7.5 TLS-Exporter(label, context, length)."""
        ks = self.quic.tls.key_schedule
        if self._exporter_secret is None or ks is None:
            raise OutboundError(f"{self.name}: TLS exporter not available before the handshake")
        algorithm = ks.algorithm

        def digest(data: bytes) -> bytes:
            return hashlib.new(algorithm.name, data).digest()

        derived = hkdf_expand_label(algorithm, self._exporter_secret, label, digest(b""),
                                    algorithm.digest_size)
        return hkdf_expand_label(algorithm, derived, b"exporter", digest(context), length)

    def peer_certificate_sha256(self) -> str | None:
        cert = self.quic.tls._peer_certificate
        if cert is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding
        return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()

    # -- protocol hooks

    async def handshake(self) -> None:
        """The protocol's own handshake after QUIC's (auth)."""
        await trio.lowlevel.checkpoint()

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        """QUIC's handshake is done (before `connected` is set)."""

    def on_datagram(self, data: bytes) -> None:
        """A DATAGRAM frame from the server."""

    def on_other_stream(self, event: events.StreamDataReceived | events.StreamReset) -> None:
        """Data on, or a reset of, a stream that is not one of `streams`."""

    def on_other_event(self, event: events.QuicEvent) -> None:
        """Any other aioquic event."""

    def on_end(self, reason: str) -> None:
        """The tunnel is done (streams failed already)."""

    def close_hint(self) -> str:
        """Appended to the reason a server closed the connection."""
        return ""

    def keepalive(self) -> None:
        """Idle with flows: a PING (TUIC sends its Heartbeat instead)."""
        self._ping_id += 1
        self.quic.send_ping(self._ping_id)


_CLOSING = (QuicConnectionState.CLOSING, QuicConnectionState.DRAINING)


def _is_local_uni(stream_id: int) -> bool:
    # Client-initiated unidirectional: stream id % 4 == 2 (RFC 9000 2.1).
    return stream_id % 4 == 2


def describe_close(event: events.ConnectionTerminated) -> str:
    who = "connection closed"
    text = f"{who} with error code {event.error_code:#x}"
    if event.reason_phrase:
        text += f": {event.reason_phrase}"
    return text


async def server_address(dialer: Dialer, server: str, port: int
                         ) -> tuple[IPAddress, tuple[Any, ...]]:
    """The proxy server's address (resolved through the upstream resolver,
    the sticky one while its TTL lasts) and its socket address."""
    ip = await dialer.udp_address(server)
    if ip.version == 6:
        return ip, (str(ip), port, 0, 0)
    return ip, (str(ip), port)


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to hand over a GSO batch of datagrams (the way quic-go
    sends) as one read (UDP_GRO, Linux 5.0); False where it cannot."""
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_segment(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The size of each datagram in a coalesced read (0: one datagram)."""
    for level, kind, value in ancillary:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder)
    return 0


def enlarge_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> None:
    """Ask for `size` bytes of receive and send buffer on `sock`, forced
    past the system's maximum when privileged (see SOCKET_BUFFER)."""
    for forced, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF),
                          (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


async def open_tunnel(make: Callable[[socket.socket, tuple[Any, ...]], QuicTunnel],
                      dialer: Dialer, server: str, port: int, *, name: str,
                      within: float, fingerprint: str | None = None) -> QuicTunnel:
    """Resolve, open the marked socket, run QUIC's handshake and the
    protocol's (`handshake()`), all within `within` seconds. Raises OutboundError
    with the reason (timeout, refused certificate, closed by the server)."""
    tunnel: QuicTunnel | None = None
    try:
        with trio.fail_after(within):
            ip, address = await server_address(dialer, server, port)
            sock = udp_socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                              dialer.mark)
            try:
                enlarge_buffers(sock)
                gro = enable_gro(sock)
                sock.connect(address[:2] if ip.version == 4 else address)
                tunnel = make(sock, address)
                tunnel.gro = gro
            except BaseException:
                sock.close()
                raise
            tunnel.start()
            await tunnel.connected.wait()
            if tunnel.closed_reason is not None:
                raise OutboundError(f"{name}: QUIC handshake: {tunnel.closed_reason}")
            if fingerprint is not None:
                seen = tunnel.peer_certificate_sha256()
                if seen != fingerprint:
                    raise OutboundError(
                        f"{name}: server certificate SHA-256 {seen} is not the pinned "
                        f"fingerprint")
            await tunnel.handshake()
            if tunnel.closed_reason is not None:
                raise OutboundError(f"{name}: {tunnel.closed_reason}")
    except trio.TooSlowError:
        if tunnel is not None:
            tunnel.close(NO_ERROR, "handshake timeout")
        raise OutboundError(f"{name}: QUIC handshake timed out after {within:g}s "
                            "(server down or UDP blocked)") from None
    except OSError as e:
        if tunnel is not None:
            tunnel.close(NO_ERROR, "error")
        raise OutboundError(f"{name}: {e.strerror or e}") from None
    except BaseException:
        if tunnel is not None:
            tunnel.close(NO_ERROR, "error")
        raise
    return tunnel


async def open_request_stream(tunnel: QuicTunnel, request: bytes, name: str) -> QuicStream:
    """A new bidirectional stream on `tunnel` with the protocol's request
    for one TCP flow already sent; OutboundError if the tunnel broke."""
    stream = tunnel.open_stream()
    try:
        await stream.send_all(request)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        await stream.aclose()
        raise OutboundError(f"{name}: {e}") from None
    return stream


class SharedTunnel:
    """A proxy's one live tunnel. `get()` returns it when usable without
    taking the lock or yielding (the fast path); else one caller connects
    (`connect()`) while the others wait on the lock and then take its
    tunnel. When that attempt fails, the callers that waited for it get its
    error at once instead of each trying again in turn (a server that does
    not answer would otherwise cost every waiting flow one more handshake
    timeout); the next caller after them tries anew."""

    def __init__(self, connect: Callable[[], Awaitable[QuicTunnel]]) -> None:
        self._connect = connect
        self._tunnel: QuicTunnel | None = None
        self._lock = trio.Lock()
        self._attempts = 0
        self._failure: OutboundError | None = None

    @property
    def current(self) -> QuicTunnel | None:
        return self._tunnel

    async def get(self) -> QuicTunnel:
        t = self._tunnel
        if t is not None and t.usable:
            return t
        seen = self._attempts
        async with self._lock:
            t = self._tunnel
            if t is not None and t.usable:
                return t
            if self._attempts != seen and self._failure is not None:
                raise self._failure
            self._tunnel = None
            self._attempts += 1
            self._failure = None  # a cancelled attempt leaves none to share
            try:
                t = await self._connect()
            except OutboundError as e:
                self._failure = e
                raise
            self._tunnel = t
            return t


class TunnelLife(trio.abc.Stream):
    """The tunnel in the place of a UDP flow's control connection: the
    gateway runs the peer's `watch()` for a peer with one (and ends the
    flow when it returns); nothing is ever read from or written to it."""

    def __init__(self, tunnel: QuicTunnel) -> None:
        self.tunnel = tunnel

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self.tunnel.ended.wait()
        return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BrokenResourceError("a tunnel's life carries no data")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class DatagramPeer(UdpPeer):
    """A UDP flow carried over a tunnel, as the gateway's end of a
    socketpair: the gateway writes payloads to `sock` and reads replies
    from it as from any connected UDP socket. `watch()` (run by the
    gateway for the flow's life) reads the other end (`inner`) and hands
    each payload to `send` (queued on the QUIC connection), one `flush`
    (transmit) per batch; the protocol writes the server's answers to
    `inner` (`deliver`). `watch()` returns when the tunnel ends, which
    ends the flow; `on_close` tells the protocol the flow ended
    (dissociate, release the tunnel)."""

    def __init__(self, tunnel: QuicTunnel, outbound: str, remote: str, *,
                 send: Callable[[bytes], None], on_close: Callable[[], None]) -> None:
        outer, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        outer.setblocking(False)
        inner.setblocking(False)
        # Room for bursts both ways (DNS answers, a game's tick).
        for s in (outer, inner):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        super().__init__(outer, outbound, control=TunnelLife(tunnel), remote=remote)
        self.socks = False  # replies are bare payloads, not SOCKS5 datagrams
        self.tunnel = tunnel
        self.inner = inner
        self._send = send
        self._on_close: Callable[[], None] | None = on_close

    def deliver(self, payload: bytes) -> None:
        """A reply from the server to the gateway (dropped when full)."""
        with contextlib.suppress(OSError):
            self.inner.send(payload)

    async def watch(self) -> None:
        async with trio.open_nursery() as nursery:

            async def until_the_tunnel_ends() -> None:
                await self.tunnel.ended.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_the_tunnel_ends)
            await self._pump()
            nursery.cancel_scope.cancel()

    async def _pump(self) -> None:
        inner = self.inner
        send = self._send
        flush = self.tunnel.transmit
        try:
            while True:
                await trio.lowlevel.wait_readable(inner)
                for _ in range(RECV_BATCH):
                    try:
                        data = inner.recv(RECV_SIZE)
                    except BlockingIOError:
                        break
                    send(data)
                flush()
        except (OSError, ValueError, trio.ClosedResourceError):
            return  # closed under us: the flow is over

    async def aclose(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
        self.inner.close()
        await super().aclose()


class QuicOutbound:
    """What a proxy over QUIC shares, whatever its protocol: the server,
    the client configuration (`QuicTls`, the proxy's own CAs, congestion
    control) and its one `SharedTunnel`. A protocol says how its tunnel is
    made (`make_tunnel`) and how flows use it (`connect_tcp`, `open_udp`
    with `open_session`)."""

    type = "Quic"
    carries_udp = True

    def __init__(self, name: str, server: str, port: int, *, tls: QuicTls, dialer: Dialer,
                 connect_timeout: float, ca: Path | None = None, ca_str: str | None = None,
                 congestion: str = "cubic") -> None:
        self.name = name
        self.server = server
        self.port = port
        self.dialer = dialer
        self.connect_timeout = connect_timeout
        self.fingerprint = tls.fingerprint
        self.configuration = quic_configuration(
            sni=tls.sni, alpn=tls.alpn, skip_cert_verify=tls.skip_cert_verify,
            fingerprint=tls.fingerprint, ca_file=str(ca) if ca is not None else None,
            ca_data=ca_str, congestion=congestion)
        self.shared = SharedTunnel(self._connect)

    def make_tunnel(self, sock: socket.socket, address: tuple[Any, ...]) -> QuicTunnel:
        """The protocol's tunnel on a connected socket (not started)."""
        raise NotImplementedError

    async def _connect(self) -> QuicTunnel:
        return await open_tunnel(self.make_tunnel, self.dialer, self.server, self.port,
                                 name=self.name, within=self.connect_timeout,
                                 fingerprint=self.fingerprint)

    async def open_session(self, tunnel: QuicTunnel, session_id: int, reassembly: Reassembly,
                           *, send: Callable[[bytes], None],
                           on_close: Callable[[], None] | None = None) -> DatagramPeer:
        """A UDP flow as session `session_id` of `tunnel`: `send` queues
        one payload from the client (dropped once the tunnel is closed);
        the server's fragments reach it through `deliver_fragment`. When
        the flow ends the session is forgotten (`on_close`: what the
        protocol tells the server) and the tunnel released."""
        tunnel.acquire()

        def closed() -> None:
            if tunnel.sessions.pop(session_id, None) is not None and on_close is not None:
                on_close()
            tunnel.release()

        def send_open(payload: bytes) -> None:
            if tunnel.closed_reason is None:
                send(payload)

        peer = DatagramPeer(tunnel, self.name, f"{self.server}:{self.port} session {session_id}",
                            send=send_open, on_close=closed)
        tunnel.sessions[session_id] = (peer, reassembly)
        await trio.lowlevel.checkpoint()
        return peer
