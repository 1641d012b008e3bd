"""Shadowsocks outbound: AEAD and 2022 ciphers, TCP and UDP, by name.

TCP: a connection to the server (marked, or through `dialer-proxy`), the
optional plugin layer on it (obfs http/tls, v2ray-plugin websocket:
appliance/outbound/plugins/), then the request (salt, header with the
target as a SOCKS address, so a name stays a name and the server resolves
it) goes out at once: the server connects to the target only once it has
the address, and server-speaks-first protocols (SMTP, SSH) wait for that.
The stream returned seals what the flow sends and opens what the server
answers (`ShadowsocksStream`); it is not a plain socket, so the gateway
copies instead of splicing.

UDP (`udp: true`): one marked UDP socket to the server per flow and a local
socket pair the gateway talks to (`ShadowsocksUdpPeer`): its datagrams are
sealed on the way up and replies opened (and their source address
stripped) on the way down, in `watch()`. The socket is not connected: a
server bound to the wildcard on a host with several addresses answers
from whichever the kernel picks, not always the one we sent to, and
mihomo takes those replies too. A reply is trusted for opening with the
key, not for where it came from. With `dialer-proxy` (or as a relay hop)
the sealed datagrams travel as a UDP flow of that outbound to the server
instead (mihomo's ListenPacket through the proxy dialer), so they never
leave around the chain; then UDP is carried only while that outbound
carries UDP.

How it fails: connect failures and the deadline as every outbound
(`OutboundError`, `connect-timeout` over dial + plugin handshake). A wrong
cipher or password cannot show at connect time (the server says nothing
until the target answers); it shows at the first read: a server that closes
or resets before its first byte (sing-box), or whose first bytes do not
open with our key, ends the flow with "authentication failed or wrong
cipher/password", logged at WARNING once per flow and kept as the flow's
error. A server that goes silent instead (ss-server stops reading and
holds the connection) is caught by a first-answer deadline: until one flow
through this proxy has opened a byte of the server's (`verified`), a flow
whose server has not answered within `connect-timeout` ends with the same
reason. Once verified, the deadline is off: a long poll's first answer may
then take as long as it takes.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.shadowsocks import ShadowsocksOptions
from appliance.outbound.base import (
    Outbound,
    OutboundEnv,
    OutboundError,
    ServerDial,
    UdpPeer,
    no_udp,
    outbound_deadline,
    udp_socket,
)
from appliance.outbound.plugins import make_plugin
from appliance.proto.shadowsocks import (
    METHODS,
    SaltFilter,
    ShadowsocksError,
    TcpClient,
    UdpClient,
    address_length,
    encode_address,
    evp_bytes_to_key,
    parse_psks,
)
from appliance.proto.socks5 import Socks5Error, parse_udp

log = logging.getLogger(__name__)

# One read from the server: large, so a bulk download costs few wake-ups;
# below glibc's mmap threshold, like the splice copy loop's.
RECV_SIZE = 64 * 1024
AUTH_HINT = "authentication failed or wrong cipher/password"
_MAX_UDP = 65535


class ShadowsocksOutbound:
    """One `type: ss` proxy. Owns its `Dialer` (the server's address kept
    while its TTL lasts) and the `SaltFilter` of its 2022 responses; each
    connection's stream owns its socket."""

    type = "Shadowsocks"
    # Its UDP can go as a UDP flow of the outbound before it (mihomo's
    # SupportWithDialer), see RelayGroup in appliance/outbound/groups.py.
    udp_through_via = True

    def __init__(self, name: str, server: str, port: int, options: ShadowsocksOptions,
                 env: OutboundEnv, *, udp: bool = False) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.options = options
        self.method = METHODS[options.cipher]
        self.key: bytes | list[bytes] = (
            parse_psks(self.method, options.password) if self.method.is_2022
            else evp_bytes_to_key(options.password.encode(), self.method.key_size))
        self.connect_timeout = env.connect_timeout
        self.dialer = env.server_dialer()
        self._dial: ServerDial = env.server_dial(self.dialer)
        self.salt_filter = SaltFilter()
        self.plugin = make_plugin(options, server, port)
        # Whether a server byte has ever opened with our key (see the doc).
        self.verified = False
        # 2022 UDP here takes one PSK (no identity headers).
        self._udp = udp and not (self.method.is_2022 and len(self.key) > 1)
        # `dialer-proxy` / a relay's previous hop: UDP goes through its UDP.
        self.via: Outbound | None = env.via

    @property
    def carries_udp(self) -> bool:
        return self._udp and (self.via is None or self.via.carries_udp)

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> ShadowsocksOutbound:
        assert isinstance(p.options, ShadowsocksOptions)
        return cls(p.name, p.server, p.port, p.options, env, udp=p.udp)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        try:
            client = TcpClient(self.method, self.key, host, port, salt_filter=self.salt_filter)
        except ShadowsocksError as e:
            raise OutboundError(f"{self.name}: {e}") from None
        with outbound_deadline(self.connect_timeout, f"{self.name} {host}:{port}"):
            stream: trio.abc.Stream = await self._dial(self.server, self.port)
            try:
                if self.plugin is not None:
                    stream = await self.plugin.wrap(stream)
                await stream.send_all(client.request())
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        first_answer = None if self.verified else trio.current_time() + self.connect_timeout
        return ShadowsocksStream(stream, client, f"{self.name} {host}:{port}",
                                 first_answer=first_answer, on_verified=self._verified)

    def _verified(self) -> None:
        self.verified = True

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        """A UDP flow through the server (see the module doc). No deadline
        of its own; closes what it opened on any failure."""
        if not self.carries_udp:
            return await no_udp(self.name)
        try:
            header = encode_address(host, port)
            client = UdpClient(self.method, self.key)
        except ShadowsocksError as e:
            raise OutboundError(f"{self.name}: udp: {e}") from None
        ip = await self.dialer.udp_address(self.server)
        if self.via is not None:
            carrier, to = await self._via_udp(ip), None
        else:
            carrier, to = await self._direct_udp(ip), (str(ip), self.port)
        try:
            inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        except BaseException:
            await trio.aclose_forcefully(_Carrier(carrier))
            raise
        for s in (inner, outer):
            s.setblocking(False)
        return ShadowsocksUdpPeer(outer, inner, carrier, client, self.name, header,
                                  carrier.remote, to=to)

    async def _direct_udp(self, ip: IPAddress) -> UdpPeer:
        """A marked UDP socket for the server (not connected: see the
        module doc), as a bare peer."""
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        remote = udp_socket(family, self.dialer.mark)
        await trio.lowlevel.checkpoint()
        return UdpPeer(remote, self.name, remote=f"{ip}:{self.port}")

    async def _via_udp(self, ip: IPAddress) -> UdpPeer:
        """A UDP flow of the `via` outbound to the server (its address
        resolved here, as mihomo resolves it before ListenPacket)."""
        assert self.via is not None
        carrier = await self.via.open_udp(ip, self.port)
        if carrier is None:
            raise OutboundError(f"{self.name}: udp: {self.via.name} rejects UDP to "
                                f"{ip} port {self.port}")
        carrier.remote = f"{ip}:{self.port} via {carrier.outbound}"
        return carrier


class ServerFailed(trio.BrokenResourceError):
    """The flow ended because of what the server did (or did not): the
    reason is the text, already logged."""


class ShadowsocksStream(trio.abc.HalfCloseableStream):
    """The flow's side of one Shadowsocks connection: `send_all` seals,
    `receive_some` opens. Owns `transport` (aclose closes it). Raises
    trio.BrokenResourceError naming the cause when the server's bytes do
    not open or it went away before its first byte (see the module doc)."""

    def __init__(self, transport: trio.abc.Stream, client: TcpClient, what: str, *,
                 first_answer: float | None = None,
                 on_verified: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.client = client
        self.what = what
        self._pending = b""
        # Until when (trio clock) the server may take to say its first byte.
        self._first_answer = first_answer
        self._on_verified = on_verified

    @property
    def socket(self) -> Any:
        """The server socket, for the gateway's keepalive and reset (it is
        the innermost SocketStream's, if any)."""
        inner: Any = self.transport
        while not isinstance(inner, trio.SocketStream):
            inner = getattr(inner, "transport_stream", getattr(inner, "transport", None))
            if inner is None:
                return None
        return inner.socket

    def _failed(self, why: str) -> ServerFailed:
        log.warning("ss %s: %s", self.what, why)
        return ServerFailed(f"{self.what}: {why}")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._pending:
            return self._take(self._pending, max_bytes)
        client = self.client
        while True:
            try:
                if self._first_answer is not None:
                    data = await self._first_receive(self._first_answer)
                else:
                    data = await self.transport.receive_some(RECV_SIZE)
            except ServerFailed:
                raise
            except (OSError, trio.BrokenResourceError) as e:
                if client.received == 0:
                    raise self._failed(f"the server reset the connection before answering "
                                       f"({e}): {AUTH_HINT}") from None
                raise
            if not data:
                if client.received == 0:
                    raise self._failed(
                        f"the server closed the connection before answering: {AUTH_HINT}")
                return b""
            try:
                plain = client.receive_data(data)
            except ShadowsocksError as e:
                raise self._failed(str(e)) from None
            if plain:
                if self._on_verified is not None:
                    self._on_verified()
                    self._on_verified = None
                return self._take(plain, max_bytes)

    async def _first_receive(self, deadline: float) -> bytes | bytearray:
        with trio.move_on_at(deadline):
            data = await self.transport.receive_some(RECV_SIZE)
            self._first_answer = None
            return data
        raise self._failed("the server has not answered by the first-answer deadline "
                           f"(connect-timeout): {AUTH_HINT}")

    def _take(self, plain: bytes, max_bytes: int | None) -> bytes:
        if max_bytes is None or len(plain) <= max_bytes:
            self._pending = b""
            return plain
        self._pending = plain[max_bytes:]
        return plain[:max_bytes]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self.transport.send_all(self.client.seal(data))
        except (OSError, trio.BrokenResourceError) as e:
            if self.client.received == 0:
                raise self._failed(f"the server reset the connection before answering "
                                   f"({e}): {AUTH_HINT}") from None
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        # The framing has no end-of-stream frame: a server learns it from
        # TCP's FIN. 2022 servers (sing-box, shadowsocks-rust) pass it on
        # as a half-close; shadowsocks-libev (AEAD) tears the whole relay
        # down on it, answer and all, so an AEAD flow does not send it: its
        # download goes on until the server ends it (or the gateway's
        # half-close timeout does). Nor does a layer that cannot half-close
        # (a websocket).
        if self.client.method.is_2022 and isinstance(self.transport,
                                                     trio.abc.HalfCloseableStream):
            await self.transport.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.transport.aclose()


class _Carrier(trio.abc.Stream):
    """The way to the server (a UDP socket to it, or a UDP flow of the
    `via` outbound) as the peer's `control`: the gateway runs `watch()`
    (the relay) for peers that have one, and closing it closes the
    carrier. Not a byte stream: nothing reads or writes it."""

    def __init__(self, carrier: UdpPeer) -> None:
        self.carrier = carrier

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.ClosedResourceError("the server socket of a UDP flow is not a stream")

    async def wait_send_all_might_not_block(self) -> None:
        raise trio.ClosedResourceError("the server socket of a UDP flow is not a stream")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise trio.ClosedResourceError("the server socket of a UDP flow is not a stream")

    async def aclose(self) -> None:
        await self.carrier.aclose()


class ShadowsocksUdpPeer(UdpPeer):
    """A UDP flow through a Shadowsocks server. The gateway sends
    `header + payload` (header: the target as a SOCKS address) on `sock`,
    one end of a local datagram pair; `watch()` seals what arrives at the
    other end and sends it to the server, and opens the server's replies,
    returning their payloads. Replies that do not open are dropped (a
    wrong key, a replay; the first is logged). The sealed datagrams go
    through `carrier`: a bare peer on an unconnected socket, sent `to` the
    server, or a UDP flow of the `via` outbound (`to` None: its header
    before each, its SOCKS5 header stripped from replies, its own `watch`
    run alongside; the flow ends when it does). Owns the pair and the
    carrier (`control`)."""

    def __init__(self, sock: socket.socket, inner: socket.socket, carrier: UdpPeer,
                 client: UdpClient, outbound: str, header: bytes, where: str, *,
                 to: tuple[str, int] | None = None) -> None:
        super().__init__(sock, outbound, header=header, control=_Carrier(carrier),
                         remote=where)
        self.socks = False  # replies are bare payloads
        self.inner = inner
        self.carrier = carrier
        self.to = to
        self.client = client
        self.dropped = 0

    async def watch(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._up)
            if self.carrier.control is not None:
                nursery.start_soon(self._carrier_watch, nursery.cancel_scope)
            await self._down()
            nursery.cancel_scope.cancel()

    async def _carrier_watch(self, scope: trio.CancelScope) -> None:
        await self.carrier.watch()
        scope.cancel()

    async def _up(self) -> None:
        inner, seal, to = self.inner, self.client.seal, self.to
        server, prefix = self.carrier.sock, self.carrier.header
        while True:
            await trio.lowlevel.wait_readable(inner)
            while True:
                try:
                    body = inner.recv(_MAX_UDP)
                except BlockingIOError:
                    break
                try:
                    if to is not None:
                        server.sendto(seal(body), to)
                    else:
                        server.send(prefix + seal(body) if prefix else seal(body))
                except OSError:
                    self.dropped += 1

    async def _down(self) -> None:
        inner, open_ = self.inner, self.client.open
        server, socks = self.carrier.sock, self.carrier.socks
        while True:
            await trio.lowlevel.wait_readable(server)
            while True:
                try:
                    packet = server.recv(_MAX_UDP)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # the server may come back
                try:
                    if socks:
                        # A SOCKS5 via's relay: its UDP header first.
                        relayed = parse_udp(packet)
                        if relayed.frag:
                            raise ShadowsocksError("a fragment from the via's relay")
                        packet = relayed.payload
                    body = open_(packet)
                    inner.send(body[address_length(body):])
                except (ShadowsocksError, Socks5Error, OSError) as e:
                    self.dropped += 1
                    if self.dropped == 1:
                        log.warning("ss udp %s via %s: dropped a reply: %s", self.remote,
                                    self.outbound, e)

    async def aclose(self) -> None:
        self.inner.close()
        await super().aclose()
