"""VMess outbound: TCP and UDP flows through a VMess server (AEAD header,
alterId 0), over plain TCP or the shared TLS and transport layers.

A flow is one connection to the server: dial (`env.server_dial`: marked
TCP, or the `dialer-proxy`), then TLS and the transport when configured,
then the VMess request for the flow's target (a name stays a name), sent
at once so that server-first protocols work. The returned `VmessStream`
seals what the gateway sends into chunks and opens what comes back; the
server's response header arrives with its first bytes.

UDP (`udp: true`): one connection per flow, relayed by a `StreamUdpPeer`:
command 2 (one datagram per chunk), or with `packet-encoding: xudp`
command 3 and XUDP frames in the body (appliance/proto/xudp.py).
`packetaddr` (which carries only IP addresses, never the flow's name)
falls back to command 2.

Failures: dial, TLS and transport errors and the connect timeout are
OutboundErrors from `connect_tcp`. The server answers a wrong uuid by
closing the connection, which the flow sees at its first read or write:
`VmessStream` logs `AUTH_FAILED` once and raises it as a
BrokenResourceError, which the gateway records as the flow's end.

What VLESS does alike lives here too and appliance/outbound/vless.py
builds on it: `ServerLayers` (dial, TLS, transport), `ServerStream` (the
flow's stream up to the protocol's framing) and `UuidProxy` (the proxy).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Self

import trio

from appliance import streamio
from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.common import TlsOptions, TransportOptions
from appliance.config.protocols.vmess import VmessOptions
from appliance.outbound.base import (
    OutboundEnv,
    OutboundError,
    ServerDial,
    UdpPeer,
    no_udp,
    outbound_deadline,
)
from appliance.outbound.stream_udp import PacketCodec, StreamUdpPeer
from appliance.outbound.tls import TlsClient
from appliance.outbound.transport import gun_pool, open_transport, transport_alpn
from appliance.proto.vmess import (
    COMMAND_MUX,
    COMMAND_TCP,
    COMMAND_UDP,
    VmessClient,
    VmessError,
    user_id,
)
from appliance.proto.xudp import XudpCodec

log = logging.getLogger(__name__)

# Bytes read from the server at a time: several 15000-byte chunks.
_RECV = 1 << 17


# What a server that closes (or resets) before its response header means:
# it did not take our uuid (VMess, VLESS). Logged at WARNING, as a dial
# failure is; the flow's record carries it too.
AUTH_FAILED = "{name}: server closed before answering: authentication failed (wrong uuid?)"


class AuthFailure:
    """One flow's AUTH_FAILED: logged at WARNING the first time it is
    called, returned as the BrokenResourceError to raise every time."""

    def __init__(self, name: str) -> None:
        self._text = AUTH_FAILED.format(name=name)
        self._logged = False

    def __call__(self) -> trio.BrokenResourceError:
        if not self._logged:
            self._logged = True
            log.warning("%s", self._text)
        return trio.BrokenResourceError(self._text)


class ServerLayers:
    """How a VMess/VLESS proxy reaches its server: dial (`env.server_dial`),
    then TLS (`TlsClient`, one SSLContext per proxy) and the transport
    (`open_transport`) when configured. Raises OutboundError; closes what
    it opened on failure."""

    def __init__(self, p: ProxyConfig, env: OutboundEnv) -> None:
        self.name = p.name
        self.server = p.server
        self.port = p.port
        self.transport: TransportOptions | None = p.transport
        tls = p.tls_options
        if tls is None and p.transport is not None and p.transport.network == "h2":
            tls = TlsOptions()  # mihomo runs h2 over TLS whatever `tls` says
        self.tls = (TlsClient(tls, p.server, alpn=transport_alpn(p.transport))
                    if tls is not None else None)
        # Host / :authority for the transport: the name TLS sends, else the
        # server (a `Host` in ws-opts headers wins inside the transport).
        self.host = self.tls.server_hostname if self.tls is not None else p.server
        self.gun = gun_pool(p.transport, self.host, tls=self.tls is not None)
        self.dialer = env.server_dialer()
        self.dial: ServerDial = env.server_dial(self.dialer)
        self.connect_timeout = env.connect_timeout

    async def _dial_tls(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await self.dial(self.server, self.port)
        if self.tls is not None:
            stream = await self.tls.wrap(stream, self.name)
        return stream

    async def open(self) -> trio.abc.Stream:
        if self.gun is not None:
            return await self.gun.open(self._dial_tls)
        return await open_transport(await self._dial_tls(), self.transport, self.host,
                                    tls=self.tls is not None)


class ServerStream(trio.abc.HalfCloseableStream):
    """What a VMess or VLESS flow's stream does alike: it owns
    `transport_stream` (the connection to the server) and, until the
    server's response header has come (`established`), reports the server
    closing or resetting as AUTH_FAILED. Subclasses say what is sent
    (`_seal`) and how `receive_some` reads what comes back."""

    def __init__(self, transport_stream: trio.abc.Stream, name: str) -> None:
        self.transport_stream = transport_stream
        self._name = name
        self._auth_failed = AuthFailure(name)

    @property
    def established(self) -> bool:
        raise NotImplementedError

    def _seal(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await streamio.send_all(self.transport_stream, self._seal(data))
        except trio.BrokenResourceError:
            if not self.established:
                raise self._auth_failed() from None
            raise

    async def _receive_server(self) -> bytes | bytearray:
        """The next bytes from the server (b"" at its end once established)."""
        try:
            data = await streamio.receive_some(self.transport_stream, _RECV)
        except trio.BrokenResourceError:
            if not self.established:
                raise self._auth_failed() from None
            raise
        if not data and not self.established:
            raise self._auth_failed()
        return data

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        t = self.transport_stream
        if isinstance(t, trio.abc.HalfCloseableStream):
            await t.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class VmessStream(ServerStream):
    """The flow's stream through the server: plaintext in and out, chunks
    on `transport_stream` (which it owns). Not spliceable (copy loop)."""

    def __init__(self, transport_stream: trio.abc.Stream, client: VmessClient, name: str) -> None:
        super().__init__(transport_stream, name)
        self._client = client
        self._ready: list[bytes] = []

    @property
    def established(self) -> bool:
        return self._client.established

    def _seal(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._client.seal(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while not self._ready:
            if self._client.eof:
                await trio.lowlevel.checkpoint()
                return b""
            data = await self._receive_server()
            if not data:
                return b""
            try:
                self._ready = self._client.receive_data(data)
            except VmessError as e:
                raise trio.BrokenResourceError(f"{self._name}: {e}") from None
        data = self._ready[0] if len(self._ready) == 1 else b"".join(self._ready)
        if max_bytes is not None and len(data) > max_bytes:
            self._ready = [data[max_bytes:]]
            return data[:max_bytes]
        self._ready = []
        return data


class _VmessPackets:
    """VMess UDP (command 2): one datagram per chunk."""

    def __init__(self, client: VmessClient) -> None:
        self._client = client

    def encode(self, payload: bytes) -> bytes:
        return self._client.seal_packet(payload) if payload else b""

    def decode(self, data: bytes) -> list[bytes]:
        return self._client.receive_data(data)


class _VmessXudp:
    """`packet-encoding: xudp`: XUDP frames in the body of a command-3
    (mux) VMess connection."""

    def __init__(self, client: VmessClient, host: str, port: int) -> None:
        self._client = client
        self._xudp = XudpCodec(host, port)

    def encode(self, payload: bytes) -> bytes:
        return self._client.seal(self._xudp.encode(payload))

    def decode(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        for plain in self._client.receive_data(data):
            out += self._xudp.decode(plain)
        return out


class UuidProxy:
    """What a `type: vmess` or `type: vless` proxy holds alike: how it
    reaches its server (`layers`) and whether it carries UDP; no connection
    between flows. Each flow is one connection that starts with the
    protocol's request (`_send_request`)."""

    # Its UDP rides its own stream to the server (mihomo's SupportUOT): a
    # relay can end in it (appliance/outbound/groups.py RelayGroup).
    udp_over_stream = True

    def __init__(self, p: ProxyConfig, env: OutboundEnv) -> None:
        self.name = p.name
        self.layers = ServerLayers(p, env)
        self.carries_udp = p.udp

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> Self:
        return cls(p, env)

    def _deadline(self, what: str) -> AbstractContextManager[None]:
        """The connect timeout around opening one flow (`what`: its target)."""
        return outbound_deadline(self.layers.connect_timeout, f"{self.name} {what}")

    async def _send_request(self, request: bytes) -> trio.abc.Stream:
        """A new connection through `layers` with `request` sent at once
        (so that server-first protocols work); closed if sending fails."""
        stream = await self.layers.open()
        try:
            await streamio.send_all(stream, request)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    def _udp_peer(self, stream: trio.abc.Stream, codec: PacketCodec) -> StreamUdpPeer:
        return StreamUdpPeer(stream, codec, self.name, f"{self.layers.server}:{self.layers.port}")


class VmessOutbound(UuidProxy):
    """A `type: vmess` proxy (module doc)."""

    type = "Vmess"

    def __init__(self, p: ProxyConfig, env: OutboundEnv) -> None:
        assert isinstance(p.options, VmessOptions)
        super().__init__(p, env)
        self.options = p.options
        self.user = user_id(p.options.uuid)

    def _client(self, host: str | IPAddress, port: int, command: int) -> VmessClient:
        o = self.options
        try:
            return VmessClient(self.user, str(host), port, security=o.cipher, command=command,
                               global_padding=o.global_padding,
                               authenticated_length=o.authenticated_length)
        except VmessError as e:
            raise OutboundError(f"{self.name}: {e}") from None

    async def _open(self, host: str | IPAddress, port: int, command: int
                    ) -> tuple[trio.abc.Stream, VmessClient]:
        client = self._client(host, port, command)
        return await self._send_request(client.request), client

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        with self._deadline(f"{host}:{port}"):
            stream, client = await self._open(host, port, COMMAND_TCP)
        return VmessStream(stream, client, self.name)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        if not self.carries_udp:
            return await no_udp(self.name)
        xudp = self.options.packet_encoding == "xudp"
        with self._deadline(f"udp {host}:{port}"):
            stream, client = await self._open(host, port, COMMAND_MUX if xudp else COMMAND_UDP)
        codec: PacketCodec = (_VmessXudp(client, str(host), port) if xudp
                              else _VmessPackets(client))
        return self._udp_peer(stream, codec)
