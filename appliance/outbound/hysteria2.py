"""Hysteria2 outbound: TCP as QUIC streams, UDP as QUIC datagrams.

One QUIC connection per proxy (`SharedTunnel`), authenticated once with an
HTTP/3 `POST /auth` (aioquic's H3 layer, used for that one request and the
server's control streams; the proxy streams after it are Hysteria2's own
framing, appliance/proto/hysteria2.py). Each TCP flow is a bidirectional
stream opened with the target as a *name*; the server's answer (status,
message) is read with the first bytes of the tunnel, so a flow to a server
that waits for the client to speak first is not held up. Each UDP flow is
a session id on the connection's DATAGRAM frames, fragmented when a packet
does not fit in one.

`obfs: salamander` obfuscates every UDP packet of the connection. `down`
is declared in the auth request (`Hysteria-CC-RX`, bytes/s): the server
then sends at that rate with Brutal instead of its own congestion control
(what paces a download from a sing-box server otherwise is its BBR against
the ACKs of one Python thread). `up` asks for Brutal on our sending side
and `ports` for port hopping; Mirage has neither (the QUIC stack's cubic,
the one `port`), and says so at INFO when it builds the outbound.

How it fails (OutboundError, within the connect timeout): the server
refused the password (the auth status), the handshake timed out (server
down, UDP blocked, wrong obfs password: the server drops what it cannot
deobfuscate), the certificate was refused. A refused TCP request fails the
flow's first read with the server's message.
"""

from __future__ import annotations

import itertools
import logging
import socket
from typing import Any

import trio
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.hysteria2 import Hysteria2Options
from appliance.outbound.base import Dialer, OutboundEnv, OutboundError, UdpPeer
from appliance.outbound.quic import (
    DATAGRAM_ROOM,
    QuicOutbound,
    QuicStream,
    QuicTls,
    QuicTunnel,
    open_request_stream,
)
from appliance.proto.hysteria2 import (
    AUTH_AUTHORITY,
    AUTH_OK_STATUS,
    AUTH_PATH,
    Defragmenter,
    Hysteria2Error,
    Salamander,
    auth_padding,
    encode_tcp_request,
    encode_udp,
    format_address,
    parse_tcp_response,
    parse_udp_message,
    rate_bps,
)

log = logging.getLogger(__name__)

# Bytes of a TCP response we read before calling the server broken.
_MAX_RESPONSE = 8192


class Hysteria2Tunnel(QuicTunnel):
    """A QUIC connection to a Hysteria2 server: the HTTP/3 auth, then the
    UDP sessions' datagrams (`sessions`)."""

    def __init__(self, *args: Any, password: str, receive_rate: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._password = password
        # `down` in bytes/s (0: unknown), sent as Hysteria-CC-RX.
        self._receive_rate = receive_rate
        self._h3: H3Connection | None = None
        self._auth_stream: int | None = None
        self._auth_status: int | None = None
        self._auth_done = trio.Event()
        self.udp_enabled = False

    async def handshake(self) -> None:
        h3 = self._h3 = H3Connection(self.quic)
        stream_id = self._auth_stream = self.quic.get_next_available_stream_id()
        h3.send_headers(stream_id, [
            (b":method", b"POST"), (b":scheme", b"https"),
            (b":authority", AUTH_AUTHORITY.encode()), (b":path", AUTH_PATH.encode()),
            (b"hysteria-auth", self._password.encode()),
            (b"hysteria-cc-rx", str(self._receive_rate).encode()),
            (b"hysteria-padding", auth_padding().encode()),
        ], end_stream=True)  # fmt: skip
        self.transmit()
        await self._auth_done.wait()
        if self.closed_reason is not None:
            raise OutboundError(f"{self.name}: auth: {self.closed_reason}")
        if self._auth_status != AUTH_OK_STATUS:
            self.close(0, "auth refused")
            raise OutboundError(f"{self.name}: auth refused by the server (HTTP status "
                                f"{self._auth_status}, wrong password?)")

    def on_other_stream(self, event: events.StreamDataReceived | events.StreamReset) -> None:
        # The auth request's stream and the server's HTTP/3 control and
        # QPACK streams: the H3 layer's.
        if self._h3 is None:
            return
        for h3_event in self._h3.handle_event(event):
            if (isinstance(h3_event, HeadersReceived)
                    and h3_event.stream_id == self._auth_stream
                    and self._auth_status is None):
                headers = dict(h3_event.headers)
                try:
                    self._auth_status = int(headers.get(b":status", b"0"))
                except ValueError:
                    self._auth_status = 0
                self.udp_enabled = headers.get(b"hysteria-udp", b"").lower() == b"true"
                self._auth_done.set()
            elif isinstance(h3_event, DataReceived):
                pass  # a masquerade page's body

    def on_datagram(self, data: bytes) -> None:
        try:
            msg = parse_udp_message(data)
        except Hysteria2Error:
            return
        self.deliver_fragment(msg.session_id, msg)

    def on_end(self, reason: str) -> None:
        self._auth_done.set()


class Hysteria2Stream(trio.abc.HalfCloseableStream):
    """A TCP flow's stream: reads the server's response before the first
    tunnel bytes (raising BrokenResourceError with the server's message
    when it refused), then passes everything through."""

    def __init__(self, stream: QuicStream, name: str) -> None:
        self.stream = stream
        self._name = name
        self._answered = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._answered:
            return await self.stream.receive_some(max_bytes)
        buf = bytearray()
        while True:
            data = await self.stream.receive_some()
            if not data:
                raise trio.BrokenResourceError(f"{self._name}: stream closed before the "
                                               "server's response")
            buf += data
            try:
                response = parse_tcp_response(buf)
            except Hysteria2Error as e:
                raise trio.BrokenResourceError(f"{self._name}: {e}") from None
            if response is not None:
                break
            if len(buf) > _MAX_RESPONSE:
                raise trio.BrokenResourceError(f"{self._name}: response too long")
        if not response.ok:
            raise trio.BrokenResourceError(
                f"{self._name}: server refused the connection: {response.message}")
        self._answered = True
        rest = bytes(buf[response.length:])
        if rest:
            if max_bytes is not None and len(rest) > max_bytes:
                self.stream.unread(rest[max_bytes:])
                rest = rest[:max_bytes]
            return rest
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class Hysteria2Outbound(QuicOutbound):
    """Flows through a Hysteria2 server (see the module doc); carries UDP
    when the server allows it."""

    type = "Hysteria2"

    def __init__(self, name: str, server: str, port: int, options: Hysteria2Options, *,
                 tls: QuicTls, dialer: Dialer, connect_timeout: float) -> None:
        super().__init__(name, server, port, tls=tls, dialer=dialer,
                         connect_timeout=connect_timeout, ca=options.ca,
                         ca_str=options.ca_str)
        self.options = options
        self.salamander = (Salamander(options.obfs_password)
                           if options.obfs == "salamander" else None)

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> Hysteria2Outbound:
        options = p.options
        assert isinstance(options, Hysteria2Options)
        if options.up is not None:
            log.info("%s: up (Brutal congestion control for what we send) is not "
                     "implemented: the QUIC stack's cubic is used", p.name)
        if options.down is not None and not rate_bps(options.down):
            log.info("%s: down is not a rate mihomo reads (N, or N Mbps, KBps, ...): "
                     "the server is told the receive rate is unknown", p.name)
        if options.ports is not None:
            log.info("%s: ports (port hopping) is not implemented: port %d is used",
                     p.name, p.port)
        return cls(
            p.name, p.server, p.port, options,
            tls=QuicTls.of(p),
            dialer=env.server_dialer(),
            connect_timeout=env.connect_timeout,
        )  # fmt: skip

    def make_tunnel(self, sock: socket.socket, address: tuple[Any, ...]) -> QuicTunnel:
        salamander = self.salamander
        return Hysteria2Tunnel(
            self.name, self.configuration, sock, address, password=self.options.password,
            receive_rate=rate_bps(self.options.down),
            obfuscate=salamander.obfuscate if salamander is not None else None,
            deobfuscate=salamander.deobfuscate if salamander is not None else None)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        try:
            request = encode_tcp_request(host, port)
        except Hysteria2Error as e:
            raise OutboundError(f"{self.name}: {e}") from None
        stream = await open_request_stream(await self.shared.get(), request, self.name)
        return Hysteria2Stream(stream, self.name)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        tunnel = await self.shared.get()
        assert isinstance(tunnel, Hysteria2Tunnel)
        if not tunnel.udp_enabled:
            raise OutboundError(f"{self.name}: the server does not allow UDP")
        try:
            address = format_address(host, port)
        except Hysteria2Error as e:
            raise OutboundError(f"{self.name}: {e}") from None
        session = tunnel.new_session(0xFFFF_FFFF)
        packet_ids = itertools.count()
        send_frame = tunnel.quic.send_datagram_frame

        def send(payload: bytes) -> None:
            try:
                frames = encode_udp(session, next(packet_ids) & 0xFFFF, address, payload,
                                    DATAGRAM_ROOM)
            except Hysteria2Error:
                return  # too large even in 255 fragments: dropped, as UDP may
            for frame in frames:
                send_frame(frame)

        return await self.open_session(tunnel, session, Defragmenter(), send=send)
