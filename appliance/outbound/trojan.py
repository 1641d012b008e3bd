"""Trojan outbound: TCP and UDP through a Trojan server (appliance/proto/
trojan.py has the wire format).

Each flow is one connection: dial the server (`env.server_dial`: marked,
or through `dialer-proxy`), TLS (`TlsClient`), the transport (`network:
tcp | ws | grpc`), then the request head with the destination *name*
(RFC 3089 step 5: the server resolves it). The request goes out at once,
so TLS and transport failures (bad certificate, fingerprint mismatch,
refused ws upgrade) are OutboundErrors of `connect_tcp` with the reason.

A Trojan server never answers the request: a wrong password, or a
destination it cannot reach, shows only as a tunnel that ends before it
carried a byte back. `TrojanStream` notices that once and logs it with the
likely reasons (the flow itself then ends as any closed flow does).

UDP (`udp: true`): a UDP ASSOCIATE tunnel per UDP flow, each datagram
framed with its destination (`TrojanPacketCodec`), relayed by the shared
`StreamUdpPeer` (appliance/outbound/stream_udp.py).
"""

from __future__ import annotations

import logging

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.common import TlsOptions, TransportOptions
from appliance.config.protocols.trojan import TrojanOptions
from appliance.outbound.base import (
    OutboundEnv,
    OutboundError,
    ServerDial,
    UdpPeer,
    no_udp,
    outbound_deadline,
)
from appliance.outbound.stream_udp import StreamUdpPeer
from appliance.outbound.tls import TlsClient
from appliance.outbound.transport import gun_pool, open_transport, transport_alpn
from appliance.proto.socks5 import Socks5Error, encode_address
from appliance.proto.trojan import (
    CMD_CONNECT,
    CMD_UDP_ASSOCIATE,
    TrojanError,
    UdpDecoder,
    encode_request,
    encode_udp,
    password_key,
)

log = logging.getLogger(__name__)

# mihomo's trojan.DefaultALPN, offered when the profile names none.
DEFAULT_ALPN = ("h2", "http/1.1")
# Reads from the tunnel: one TLS record is 16 KiB; a large read takes
# several records per wakeup.
READ_SIZE = 1 << 16


class TrojanOutbound:
    """One `type: trojan` proxy (see the module doc). Owns its `TlsClient`
    (one SSLContext) and nothing per flow: each stream it returns owns its
    connection."""

    type = "Trojan"
    # Its UDP rides its own stream to the server (mihomo's SupportUOT): a
    # relay can end in it (appliance/outbound/groups.py RelayGroup).
    udp_over_stream = True

    def __init__(self, name: str, server: str, port: int, password: str, *,
                 tls: TlsOptions, transport: TransportOptions | None, udp: bool,
                 dial: ServerDial, connect_timeout: float) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.carries_udp = udp
        self.transport = transport
        self.connect_timeout = connect_timeout
        self._key = password_key(password)
        self._dial = dial
        alpn = transport_alpn(transport)
        if alpn is None and not tls.alpn:
            alpn = DEFAULT_ALPN
        self.tls = TlsClient(tls, server, alpn=alpn)
        # Host / :authority for the transport: the name TLS sends.
        self.host = self.tls.server_hostname
        self.gun = gun_pool(transport, self.host, tls=True)

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> TrojanOutbound:
        assert isinstance(p.options, TrojanOptions)
        dialer = env.server_dialer()
        return cls(p.name, p.server, p.port, p.options.password,
                   tls=p.tls_options or TlsOptions(), transport=p.transport, udp=p.udp,
                   dial=env.server_dial(dialer), connect_timeout=env.connect_timeout)

    async def _tunnel(self, command: int, host: str | IPAddress, port: int) -> trio.abc.Stream:
        """Dial, TLS, transport, request head sent; the stream after it.
        Closes what it opened on failure."""
        try:
            head = encode_request(self._key, command, host, port)
        except TrojanError as e:
            raise OutboundError(f"{self.name}: {e}") from None
        if self.gun is not None:
            tunnel: trio.abc.Stream = await self.gun.open(self._dial_tls)
        else:
            tunnel = await open_transport(await self._dial_tls(), self.transport, self.host,
                                          tls=True)
        try:
            await tunnel.send_all(head)
        except BaseException:
            await trio.aclose_forcefully(tunnel)
            raise
        return tunnel

    async def _dial_tls(self) -> trio.abc.Stream:
        return await self.tls.wrap(await self._dial(self.server, self.port), self.name)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        with outbound_deadline(self.connect_timeout, f"{self.name} {host}:{port}"):
            tunnel = await self._tunnel(CMD_CONNECT, host, port)
        return TrojanStream(tunnel, f"{self.name} {host}:{port}")

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        if not self.carries_udp:
            return await no_udp(self.name)
        try:
            address = encode_address(host, port)
        except Socks5Error as e:
            raise OutboundError(f"{self.name}: UDP: {e}") from None
        with outbound_deadline(self.connect_timeout, f"{self.name} UDP {host}:{port}"):
            tunnel = await self._tunnel(CMD_UDP_ASSOCIATE, host, port)
        return StreamUdpPeer(tunnel, TrojanPacketCodec(address), self.name,
                             f"{self.server}:{self.port}")


class TrojanStream(trio.abc.Stream):
    """The tunnel of one TCP flow. Logs, once, a tunnel that the server
    closed before sending anything back (wrong password, or the server
    could not reach the destination); otherwise passes reads and writes
    straight through. Owns the tunnel."""

    def __init__(self, tunnel: trio.abc.Stream, what: str) -> None:
        self.tunnel = tunnel
        self.what = what
        self._answered = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._answered:
            return await self.tunnel.receive_some(max_bytes or READ_SIZE)
        data = await self.tunnel.receive_some(max_bytes or READ_SIZE)
        if data:
            self._answered = True
        else:
            log.warning("%s: the server closed the tunnel without answering (wrong password, "
                        "or it could not reach the destination)", self.what)
            self._answered = True
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tunnel.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tunnel.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.tunnel.aclose()


class TrojanPacketCodec:
    """A UDP flow's datagrams as Trojan packets (`PacketCodec` of
    appliance/outbound/stream_udp.py): each one framed with the flow's
    destination; replies' source addresses are not needed (one flow, one
    destination)."""

    def __init__(self, address: bytes) -> None:
        self._address = address
        self._decoder = UdpDecoder()

    def encode(self, payload: bytes) -> bytes:
        return encode_udp(self._address, payload)

    def decode(self, data: bytes) -> list[bytes]:
        return [payload for _host, _port, payload in self._decoder.feed(data)]
