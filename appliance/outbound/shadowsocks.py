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
key, not for where it came from.

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

from appliance import streamio
from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.shadowsocks import ShadowsocksOptions
from appliance.outbound.base import (
    Dialer,
    OutboundEnv,
    OutboundError,
    ServerDial,
    UdpPeer,
    as_ip,
    interleave,
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
        self.dialer = Dialer(env.resolve, env.routing_mark, ipv6=env.ipv6)
        self._dial: ServerDial = env.server_dial(self.dialer)
        self.salt_filter = SaltFilter()
        self.plugin = make_plugin(options, server, port)
        # Whether a server byte has ever opened with our key (see the doc).
        self.verified = False
        # 2022 UDP here takes one PSK (no identity headers).
        self.carries_udp = udp and not (self.method.is_2022 and len(self.key) > 1)

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
                await streamio.send_all(stream, client.request())
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
        ip = as_ip(self.server)
        if ip is None:
            kept = self.dialer.sticky(self.server)
            ip = kept[0] if kept is not None else interleave(
                (await self.dialer.resolve(self.server))[0])[0]
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        remote = udp_socket(family, self.dialer.mark)
        inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            for s in (inner, outer):
                s.setblocking(False)
        except OSError as e:
            for s in (remote, inner, outer):
                s.close()
            raise OutboundError(f"{self.name}: udp {ip} port {self.port}: "
                                f"{e.strerror or e}") from None
        return ShadowsocksUdpPeer(outer, inner, remote, client, self.name, header,
                                  (str(ip), self.port))


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
                    data = await streamio.receive_some(self.transport, RECV_SIZE)
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
            data = await streamio.receive_some(self.transport, RECV_SIZE)
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
            await streamio.send_all(self.transport, self.client.seal(data))
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


class _ServerSocket(trio.abc.Stream):
    """The UDP socket to the server as the peer's `control`: the gateway
    runs `watch()` (the relay) for peers that have one, and closing it
    closes the socket. Not a byte stream: nothing reads or writes it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.ClosedResourceError("the server socket of a UDP flow is not a stream")

    async def wait_send_all_might_not_block(self) -> None:
        raise trio.ClosedResourceError("the server socket of a UDP flow is not a stream")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise trio.ClosedResourceError("the server socket of a UDP flow is not a stream")

    async def aclose(self) -> None:
        self.sock.close()
        await trio.lowlevel.checkpoint()


class ShadowsocksUdpPeer(UdpPeer):
    """A UDP flow through a Shadowsocks server. The gateway sends
    `header + payload` (header: the target as a SOCKS address) on `sock`,
    one end of a local datagram pair; `watch()` seals what arrives at the
    other end and sends it to the server, and opens the server's replies,
    returning their payloads. Replies that do not open are dropped (a
    wrong key, a replay; the first is logged). Owns the pair and the socket
    to the server (`control`)."""

    def __init__(self, sock: socket.socket, inner: socket.socket, remote: socket.socket,
                 client: UdpClient, outbound: str, header: bytes,
                 server: tuple[str, int]) -> None:
        super().__init__(sock, outbound, header=header, control=_ServerSocket(remote),
                         remote=f"{server[0]}:{server[1]}")
        self.socks = False  # replies are bare payloads
        self.inner = inner
        self.server = remote
        self.server_address = server
        self.client = client
        self.dropped = 0

    async def watch(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._up)
            await self._down()

    async def _up(self) -> None:
        inner, server, seal, to = self.inner, self.server, self.client.seal, self.server_address
        while True:
            await trio.lowlevel.wait_readable(inner)
            while True:
                try:
                    body = inner.recv(_MAX_UDP)
                except BlockingIOError:
                    break
                try:
                    server.sendto(seal(body), to)
                except OSError:
                    self.dropped += 1

    async def _down(self) -> None:
        inner, server, open_ = self.inner, self.server, self.client.open
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
                    body = open_(packet)
                    inner.send(body[address_length(body):])
                except (ShadowsocksError, OSError) as e:
                    self.dropped += 1
                    if self.dropped == 1:
                        log.warning("ss udp %s via %s: dropped a reply: %s", self.remote,
                                    self.outbound, e)

    async def aclose(self) -> None:
        self.inner.close()
        await super().aclose()
