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

Names in UDP packets, learned per outbound (`udp_names`): sing-box takes
a packet addressed by name (ATYP 3) and resolves it at the far end, as
for TCP (tests/integration/test_trojan.py). mihomo's Trojan inbound does not: its packet reader
keeps only IP addresses (socks5.Addr.UDPAddr is nil for a name) and it
closes the tunnel at the first packet addressed by name, without a reply
(mihomo's own client never sends one: its tunnel resolves a UDP flow's
destination before the proxy sees it). So until a server has answered a
named packet, a flow keeps its first datagrams; when the server closes
the tunnel before any reply (within `REFUSAL_WINDOW` of the first
packet), the flow reopens once with the name resolved here (mihomo's
choice: IPv4 first) and sends them again. The server that answers that
way is then sent addresses from the start; one that answers a named
packet is sent names without keeping anything.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.common import TlsOptions, TransportOptions
from appliance.config.protocols.trojan import TrojanOptions
from appliance.outbound.base import (
    Dialer,
    OutboundEnv,
    OutboundError,
    ServerDial,
    UdpPeer,
    as_ip,
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
# Datagrams a flow keeps for a resend while its server's habit with names
# in UDP packets is not known (see the module doc).
KEPT_DATAGRAMS = 16
# A tunnel closed without a reply this soon after the first named packet
# is taken as the server refusing the name (mihomo closes at once).
REFUSAL_WINDOW = 3.0


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
                 dial: ServerDial, connect_timeout: float,
                 targets: Dialer | None = None) -> None:
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
        # Whether the server takes names in UDP packets: None (not known
        # yet), True, False (send addresses); see the module doc.
        self.udp_names: bool | None = None
        # Resolves UDP destinations for a server that takes no names.
        self.targets = targets

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> TrojanOutbound:
        assert isinstance(p.options, TrojanOptions)
        dialer = env.server_dialer()
        return cls(p.name, p.server, p.port, p.options.password,
                   tls=p.tls_options or TlsOptions(), transport=p.transport, udp=p.udp,
                   dial=env.server_dial(dialer), connect_timeout=env.connect_timeout,
                   targets=Dialer(env.resolve, env.routing_mark, ipv6=env.ipv6))

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
        named = as_ip(host) is None
        if named and self.udp_names is False:
            host = await self.udp_target(str(host))
            named = False
        try:
            address = encode_address(host, port)
        except Socks5Error as e:
            raise OutboundError(f"{self.name}: UDP: {e}") from None
        with outbound_deadline(self.connect_timeout, f"{self.name} UDP {host}:{port}"):
            tunnel = await self._tunnel(CMD_UDP_ASSOCIATE, host, port)
        learning = named and self.udp_names is None
        codec = TrojanPacketCodec(address, keep=KEPT_DATAGRAMS if learning else 0,
                                  on_reply=self._named_reply if named else None)
        peer = TrojanUdpPeer(tunnel, codec, self.name, f"{self.server}:{self.port}")
        if learning:
            peer.reopen = lambda: self._reopen_by_address(str(host), port)
        return peer

    async def udp_target(self, name: str) -> IPAddress:
        """The address a UDP packet to `name` carries for a server that
        takes no names (mihomo resolves it the same way: IPv4 first)."""
        if self.targets is None:
            raise OutboundError(f"{self.name}: UDP: cannot resolve {name}")
        return await self.targets.udp_address(name)

    def _named_reply(self) -> None:
        self.udp_names = True

    async def _reopen_by_address(self, name: str, port: int
                                 ) -> tuple[trio.abc.Stream, TrojanPacketCodec]:
        """A new tunnel for a flow whose named packet the server refused,
        to `name` resolved here; the server is taken to refuse names once
        a packet so addressed gets a reply."""
        ip = await self.udp_target(name)
        with outbound_deadline(self.connect_timeout, f"{self.name} UDP {ip}:{port}"):
            tunnel = await self._tunnel(CMD_UDP_ASSOCIATE, ip, port)
        return tunnel, TrojanPacketCodec(encode_address(ip, port), on_reply=self._address_reply)

    def _address_reply(self) -> None:
        if self.udp_names is None:
            self.udp_names = False
            log.info("%s: the server closes UDP tunnels addressed by name (mihomo's Trojan "
                     "inbound does): its UDP destinations are resolved here from now on",
                     self.name)


class TrojanUdpPeer(StreamUdpPeer):
    """A Trojan UDP flow (StreamUdpPeer) that, while `reopen` is set (its
    server's habit with named packets is not known yet), reopens once by
    address when the server closes the tunnel before any reply, and sends
    the datagrams kept so far again (see the module doc)."""

    reopen: Callable[[], Awaitable[tuple[trio.abc.Stream, TrojanPacketCodec]]] | None = None

    async def watch(self) -> None:
        await super().watch()
        codec = self._codec
        reopen, self.reopen = self.reopen, None
        if reopen is None or not isinstance(codec, TrojanPacketCodec) or codec.replied \
                or not codec.kept or codec.first_sent is None \
                or trio.current_time() - codec.first_sent > REFUSAL_WINDOW:
            # Not a refusal of the name: a tunnel that lived on without a
            # reply and then ended (an idle timeout) is not reopened.
            return
        try:
            stream, fresh = await reopen()
        except OutboundError as e:
            log.warning("%s: UDP: the server closed the tunnel without a reply; by address: %s",
                        self.outbound, e.reason)
            return
        old, self._stream, self._codec, self.control = self._stream, stream, fresh, stream
        await trio.aclose_forcefully(old)
        try:
            await stream.send_all(b"".join(fresh.encode(p) for p in codec.kept))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await super().watch()


class TrojanStream(trio.abc.Stream):
    """The tunnel of one TCP flow. Logs, once, a tunnel that the server
    closed before sending anything back (wrong password, or the server
    could not reach the destination); otherwise passes reads and writes
    straight through. Owns the tunnel."""

    def __init__(self, tunnel: trio.abc.Stream, what: str) -> None:
        self.tunnel = tunnel
        self.what = what
        self._answered = False
        # Read by the listener when the flow got nothing back (/mirage/failures).
        self.why_unanswered = ""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._answered:
            return await self.tunnel.receive_some(max_bytes or READ_SIZE)
        try:
            data = await self.tunnel.receive_some(max_bytes or READ_SIZE)
        except trio.BrokenResourceError:
            # A server that closes while our request is still unread in its
            # socket resets instead (RST, not FIN): the same news.
            self._unanswered()
            raise
        if not data:
            self._unanswered()
        self._answered = True
        return data

    def _unanswered(self) -> None:
        self._answered = True
        self.why_unanswered = (f"{self.what}: the server closed the tunnel without "
                               "answering (wrong password, or it could not reach the "
                               "destination)")
        log.warning("%s", self.why_unanswered)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.tunnel.send_all(data)
        except trio.BrokenResourceError:
            # The server reset the tunnel before any answer, and the send
            # saw it before the receive did (the request and the TLS
            # Finished go out together, so this race is common).
            if not self._answered:
                self._unanswered()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.tunnel.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.tunnel.aclose()


class TrojanPacketCodec:
    """A UDP flow's datagrams as Trojan packets (`PacketCodec` of
    appliance/outbound/stream_udp.py): each one framed with the flow's
    destination; replies' source addresses are not needed (one flow, one
    destination). Keeps the first `keep` payloads it frames until a reply
    comes (`kept`), and calls `on_reply` at the first reply."""

    def __init__(self, address: bytes, *, keep: int = 0,
                 on_reply: Callable[[], None] | None = None) -> None:
        self._address = address
        self._decoder = UdpDecoder()
        self._keep = keep
        self.kept: list[bytes] = []
        # When the first kept payload was framed (trio clock).
        self.first_sent: float | None = None
        self.replied = False
        self._on_reply = on_reply

    def encode(self, payload: bytes) -> bytes:
        if len(self.kept) < self._keep and not self.replied:
            if not self.kept:
                self.first_sent = trio.current_time()
            self.kept.append(bytes(payload))
        return encode_udp(self._address, payload)

    def decode(self, data: bytes) -> list[bytes]:
        payloads = [payload for _host, _port, payload in self._decoder.feed(data)]
        if payloads and not self.replied:
            self.replied = True
            self.kept.clear()
            if self._on_reply is not None:
                self._on_reply()
        return payloads
