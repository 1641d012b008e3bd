"""VLESS outbound: TCP and UDP flows through a VLESS server, over plain TCP
or the shared TLS and transport layers (VLESS has no encryption of its
own: without TLS the flow is in the clear, as with mihomo).

A flow is one connection to the server (dial, TLS, transport: the same
`ServerLayers` as VMess) with the VLESS request for the flow's target (a
name stays a name) sent at once. `VlessStream` strips the server's
response header from the first bytes it sends and passes the rest through.

UDP (`udp: true`): command 2, each datagram length-prefixed on the flow's
own connection, relayed by a `StreamUdpPeer`. `packet-encoding` (mihomo's
default for VLESS is xudp) is read and falls back to this plain UDP.

A wrong uuid: the server closes without a response header, which the
flow's first read reports as BrokenResourceError("NAME: authentication
failed (wrong uuid?)").
"""

from __future__ import annotations

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.vless import VlessOptions
from appliance.outbound.base import (
    OutboundEnv,
    OutboundError,
    ReplayStream,
    UdpPeer,
    no_udp,
    outbound_deadline,
)
from appliance.outbound.stream_udp import StreamUdpPeer
from appliance.outbound.vmess import ServerLayers, auth_failed
from appliance.proto.vless import (
    COMMAND_TCP,
    COMMAND_UDP,
    PacketReader,
    ResponseReader,
    VlessError,
    encode_packet,
    request_header,
)
from appliance.proto.vmess import user_id

_RECV = 1 << 17


class VlessStream(trio.abc.HalfCloseableStream):
    """The flow's stream through the server; owns `transport_stream`."""

    def __init__(self, transport_stream: trio.abc.Stream, name: str) -> None:
        self.transport_stream = transport_stream
        self._name = name
        self._response = ResponseReader()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.transport_stream.send_all(data)
        except trio.BrokenResourceError:
            if not self._response.established:
                raise auth_failed(self._name) from None
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        t = self.transport_stream
        if self._response.established:
            return await t.receive_some(max_bytes)
        while True:
            try:
                data = await t.receive_some(_RECV)
            except trio.BrokenResourceError:
                raise auth_failed(self._name) from None
            if not data:
                raise auth_failed(self._name)
            try:
                body = self._response.feed(data)
            except VlessError as e:
                raise trio.BrokenResourceError(f"{self._name}: {e}") from None
            if self._response.established:
                break
        if not body:
            return await t.receive_some(max_bytes)
        if max_bytes is not None and len(body) > max_bytes:
            # The first read held more than asked: the rest comes first next.
            self.transport_stream = ReplayStream(t, body[max_bytes:])
            return body[:max_bytes]
        return body

    async def send_eof(self) -> None:
        t = self.transport_stream
        if isinstance(t, trio.abc.HalfCloseableStream):
            await t.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


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


class VlessOutbound:
    """A `type: vless` proxy (module doc). Holds no connection between flows."""

    type = "Vless"

    def __init__(self, p: ProxyConfig, env: OutboundEnv) -> None:
        assert isinstance(p.options, VlessOptions)
        self.name = p.name
        self.options = p.options
        self.user = user_id(p.options.uuid)
        self.layers = ServerLayers(p, env)
        self.carries_udp = p.udp

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> VlessOutbound:
        return cls(p, env)

    async def _open(self, host: str | IPAddress, port: int, command: int) -> trio.abc.Stream:
        try:
            request = request_header(self.user, str(host), port, command=command)
        except VlessError as e:
            raise OutboundError(f"{self.name}: {e}") from None
        stream = await self.layers.open()
        try:
            await stream.send_all(request)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        with outbound_deadline(self.layers.connect_timeout, f"{self.name} {host}:{port}"):
            stream = await self._open(host, port, COMMAND_TCP)
        return VlessStream(stream, self.name)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        if not self.carries_udp:
            return await no_udp(self.name)
        with outbound_deadline(self.layers.connect_timeout, f"{self.name} udp {host}:{port}"):
            stream = await self._open(host, port, COMMAND_UDP)
        return StreamUdpPeer(stream, _VlessPackets(), self.name,
                             f"{self.layers.server}:{self.layers.port}")
