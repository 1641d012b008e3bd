"""VLESS outbound: TCP and UDP flows through a VLESS server, over plain TCP
or the shared TLS and transport layers (VLESS has no encryption of its
own: without TLS the flow is in the clear, as with mihomo).

A flow is one connection to the server (dial, TLS, transport: the same
`ServerLayers` as VMess) with the VLESS request for the flow's target (a
name stays a name) sent at once. `VlessStream` strips the server's
response header from the first bytes it sends and passes the rest through.

UDP (`udp: true`): one connection per flow, relayed by a `StreamUdpPeer`:
XUDP (command 3, appliance/proto/xudp.py), mihomo's default for VLESS; with
`packet-encoding: packetaddr` plain VLESS UDP instead (command 2, each
datagram length-prefixed), as packetaddr itself carries only IP addresses.

A wrong uuid: the server closes without a response header, which the
flow's first read reports as BrokenResourceError("NAME: authentication
failed (wrong uuid?)").
"""

from __future__ import annotations

import logging
import ssl

import trio

from appliance import streamio
from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.vless import VlessOptions
from appliance.outbound.base import (
    OutboundEnv,
    OutboundError,
    ReplayStream,
    UdpPeer,
    no_udp,
)
from appliance.outbound.reality import RealityStream
from appliance.outbound.stream_udp import PacketCodec
from appliance.outbound.tls import TlsStream
from appliance.outbound.vmess import AuthFailure, ServerStream, UuidProxy
from appliance.proto.vless import (
    COMMAND_MUX,
    COMMAND_TCP,
    COMMAND_UDP,
    VISION_FLOW,
    PacketReader,
    ResponseReader,
    Vision,
    VlessError,
    encode_packet,
    request_header,
)
from appliance.proto.vmess import user_id
from appliance.proto.xudp import XudpCodec

log = logging.getLogger(__name__)

_RECV = 1 << 17


class VlessStream(ServerStream):
    """The flow's stream through the server; owns `transport_stream`."""

    def __init__(self, transport_stream: trio.abc.Stream, name: str) -> None:
        super().__init__(transport_stream, name)
        self._response = ResponseReader()

    @property
    def established(self) -> bool:
        return self._response.established

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        t = self.transport_stream
        if self._response.established:
            return await streamio.receive_some(t, max_bytes)
        while True:
            data = await self._receive_server()
            try:
                body = self._response.feed(data)
            except VlessError as e:
                raise trio.BrokenResourceError(f"{self._name}: {e}") from None
            if self._response.established:
                break
        if not body:
            return await streamio.receive_some(t, max_bytes)
        if max_bytes is not None and len(body) > max_bytes:
            # The first read held more than asked: the rest comes first next.
            self.transport_stream = ReplayStream(t, body[max_bytes:])
            return body[:max_bytes]
        return body


class VisionStream(trio.abc.HalfCloseableStream):
    """A VLESS flow with `flow: xtls-rprx-vision` over `tls` (the outer TLS
    to the server, over a plain connection: Vision needs both). What the
    gateway sends goes through `Vision.encode` (padded blocks through TLS,
    then, once the inner TLS 1.3 handshake is done, straight onto the raw
    connection); what comes back is unpadded until the server switches to
    the raw connection too.

    At that switch the outer TLS may hold bytes already read: decrypted
    data not yet taken, and raw bytes not yet decrypted (which are not TLS
    at all but the inner records). So this stream reads the outer TLS one
    record at a time itself (one SSL_read on the `TlsStream`'s SSLObject;
    `TlsStream.receive_some` would decrypt on into the raw bytes) and at
    the switch takes what the SSLObject and its incoming buffer hold.
    After a switch no close_notify is sent: it would land in the inner
    stream. Owns `tls` and its transport. Over REALITY the `RealityStream`
    gives the same two things: one record, and what is buffered."""

    def __init__(self, tls: TlsStream | RealityStream, user: bytes, name: str) -> None:
        self._tls = tls
        self._raw = tls.transport_stream
        self._vision = Vision(user)
        self._response = ResponseReader()
        self._name = name
        self._auth_failed = AuthFailure(name)
        self._ready = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        via_tls, raw = self._vision.encode(bytes(data))
        try:
            if via_tls:
                await self._tls.send_all(via_tls)
            if raw:
                await self._raw.send_all(raw)
        except trio.BrokenResourceError:
            if not self._response.established:
                raise self._auth_failed() from None
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._raw.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while not self._ready:
            if self._vision.direct_read:
                return await self._raw.receive_some(max_bytes)
            try:
                data = await self._tls_record()
            except (trio.BrokenResourceError, OSError):
                if not self._response.established:
                    raise self._auth_failed() from None
                raise
            if not data:
                if not self._response.established:
                    raise self._auth_failed()
                return b""
            try:
                body = self._response.feed(data)
                plain = self._vision.decode(body) if body else b""
            except VlessError as e:
                raise trio.BrokenResourceError(f"{self._name}: {e}") from None
            if self._vision.direct_read:
                plain += self._drain_tls()
            self._ready = plain
        data, self._ready = self._ready, b""
        if max_bytes is not None and len(data) > max_bytes:
            data, self._ready = data[:max_bytes], data[max_bytes:]
        return data

    async def _tls_record(self) -> bytes:
        """The plaintext of the next outer TLS record (b"" at its end)."""
        t = self._tls
        if isinstance(t, RealityStream):
            return await t.receive_record()
        while True:
            try:
                record = t._ssl.read(_RECV)  # one SSL_read: at most one record
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS: {e.reason or e}") from e
            else:
                if t._on_session is not None:
                    t._hand_session()  # the tickets came before this record
                return record
            if t._outgoing.pending:
                await t._flush()
            await t._fill()

    def _drain_tls(self) -> bytes:
        """What the outer TLS holds at the switch to the raw connection."""
        if isinstance(self._tls, RealityStream):
            return self._tls.take_buffered()
        obj = self._tls._ssl
        taken = [obj.read(obj.pending()) for _ in range(64) if obj.pending()]
        return b"".join(taken) + self._tls._incoming.read()

    async def send_eof(self) -> None:
        if self._vision.direct_write and isinstance(self._raw, trio.abc.HalfCloseableStream):
            await self._raw.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._vision.direct_write or self._vision.direct_read:
            await self._raw.aclose()
        else:
            await self._tls.aclose()


class _VlessPackets:
    """Plain VLESS UDP: length-prefixed datagrams after the response header."""

    def __init__(self) -> None:
        self._response = ResponseReader()
        self._reader = PacketReader()

    def encode(self, payload: bytes) -> bytes:
        return encode_packet(payload)

    def decode(self, data: bytes) -> list[bytes]:
        body = self._response.feed(data)
        return self._reader.feed(body) if body else []


class _VlessXudp:
    """XUDP frames after the response header (command 3, no address)."""

    def __init__(self, host: str, port: int) -> None:
        self._response = ResponseReader()
        self._xudp = XudpCodec(host, port)

    def encode(self, payload: bytes) -> bytes:
        return self._xudp.encode(payload)

    def decode(self, data: bytes) -> list[bytes]:
        body = self._response.feed(data)
        return self._xudp.decode(body) if body else []


class VlessOutbound(UuidProxy):
    """A `type: vless` proxy (module doc)."""

    type = "Vless"

    def __init__(self, p: ProxyConfig, env: OutboundEnv) -> None:
        assert isinstance(p.options, VlessOptions)
        super().__init__(p, env)
        self.options = p.options
        self.user = user_id(p.options.uuid)

    async def _open(self, host: str | IPAddress, port: int, command: int,
                    flow: str = "") -> trio.abc.Stream:
        try:
            request = request_header(self.user, str(host), port, command=command, flow=flow)
        except VlessError as e:
            raise OutboundError(f"{self.name}: {e}") from None
        return await self._send_request(request)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        flow = self.options.flow
        with self._deadline(f"{host}:{port}"):
            stream = await self._open(host, port, COMMAND_TCP, flow)
        if flow == VISION_FLOW:
            # The loader allows vision only over TLS with network tcp.
            assert isinstance(stream, TlsStream | RealityStream)
            return VisionStream(stream, self.user, self.name)
        return VlessStream(stream, self.name)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        if not self.carries_udp:
            return await no_udp(self.name)
        # mihomo's default for VLESS is xudp; packetaddr carries only IP
        # addresses (never the flow's name): plain VLESS UDP instead.
        xudp = self.options.packet_encoding != "packetaddr"
        with self._deadline(f"udp {host}:{port}"):
            stream = await self._open(host, port, COMMAND_MUX if xudp else COMMAND_UDP)
        codec: PacketCodec = _VlessXudp(str(host), port) if xudp else _VlessPackets()
        return self._udp_peer(stream, codec)
