"""SOCKS5 outbound: CONNECT and UDP ASSOCIATE through a SOCKS5 proxy, by name.

The target name goes to the proxy unresolved (ATYP=3, RFC 3089 step 5): this
is how a fake-IP flow reaches the right host even when local DNS lies.

Pipelining, learned per server: without credentials the request can go
out with the greeting (one round trip to the proxy instead of two), and
dante takes that; microsocks 1.0.3 answers the greeting and never the
request that came with it. So the first flows pipeline with a short stall
bound (`PIPELINE_STALL`): a server that answers the method selection and
then nothing within it is taken to drop pipelined requests, the flow
starts over in lock step on a new connection, and every later flow to
that server goes in lock step (as mihomo, sing-box and curl always do).
A pipelined reply that does come makes pipelining that server's known
habit, with no stall bound after. A slow far end can make a pipelining
server look like one that drops the request: the cost is the lock-step
round trip, never a failed flow. The fact lives as long as the outbound
(a reload learns it again).

UDP (only with `udp: true`): UDP ASSOCIATE (RFC 1928 section 7). The TCP
control connection is held for the flow's life and the flow ends when the
proxy closes it; each datagram carries the *name* (ATYP 3), so the proxy
resolves it at the far end, as for CONNECT. Our UDP socket is bound before
the request and its address is the one we announce; it is connected to the
relay address the proxy answers (its own address when the reply says
0.0.0.0), SO_MARK = routing-mark.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.outbound.base import (
    OutboundEnv,
    OutboundError,
    ProxyOutbound,
    ReplayStream,
    UdpPeer,
    as_ip,
    handshake_receive,
    handshake_send,
    no_udp,
    udp_socket,
)
from appliance.proto.socks5 import CMD_UDP_ASSOCIATE, Socks5Client, Socks5Error, encode_udp

# Greeting, auth and request need 3 round trips; a server that trickles its
# replies byte by byte needs at most ~280 reads. Bound the loop anyway.
_MAX_READS = 300

# How long a server whose pipelining habit is not known yet may take between
# its method selection and the first byte of its reply before the flow
# starts over in lock step (see the module doc). A far end that takes
# longer to connect only costs later flows the lock-step round trip.
PIPELINE_STALL = 0.25


class PipelineStalled(Exception):
    """The server answered the greeting of a pipelined handshake and not
    the request within the stall bound (it dropped the request)."""


class Socks5Outbound(ProxyOutbound):
    """Connects to the proxy (`server` may be a name: resolved through
    `resolve`; the socket carries `routing_mark`), runs the sans-I/O client
    (optional RFC 1929 username/password) and returns the stream positioned
    right after the proxy's reply.

    The client reads only the bytes the reply still needs, so nothing of the
    tunnel is consumed and the result is a plain `trio.SocketStream`
    (spliceable). Should a handshake ever end with extra bytes in hand, they
    are replayed first through a `ReplayStream` (not spliceable).

    Raises OutboundError on connect failure, an error reply (the text names
    the RFC 1928 reply), refused credentials, or after `connect_timeout`
    seconds for the whole exchange. Owns the socket until it returns it.
    With `udp`, also carries UDP flows (UDP ASSOCIATE, see the module doc).
    `pipelining` is what it learned about the server: None (not known yet:
    pipeline, with the stall bound), True (takes it) or False (lock step).
    """

    type = "Socks5"

    def __init__(self, name: str, server: str, port: int, *, udp: bool = False,
                 **common: Any) -> None:
        super().__init__(name, server, port, **common)
        self.carries_udp = udp
        self.pipelining: bool | None = None

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> Socks5Outbound:
        # UDP ASSOCIATE needs the relay reachable by UDP: not through a
        # dialer-proxy, which carries the control connection only.
        return cls(p.name, p.server, p.port, udp=p.udp and env.via is None, username=p.username,
                   password=p.password, routing_mark=env.routing_mark,
                   connect_timeout=env.connect_timeout, resolve=env.resolve, ipv6=env.ipv6,
                   ip_version=env.ip_version,
                   preconnect=p.preconnect,
                   server_dial=env.via.connect_tcp if env.via is not None else None)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        """UDP ASSOCIATE through the proxy (see the module doc). No deadline
        of its own; closes what it opened on any failure."""
        if not self.carries_udp:
            return await no_udp(self.name)
        stream = await self.dialer.dial(self.server, self.port)
        sock: socket.socket | None = None
        try:
            local_ip = stream.socket.getsockname()[0]
            proxy_ip = stream.socket.getpeername()[0]
            sock = udp_socket(stream.socket.family, self.dialer.mark)
            # Announce the address we will send from (RFC 1928: "the address
            # and port that the client expects to use to send UDP
            # datagrams"), so the proxy accepts exactly our datagrams.
            sock.bind((local_ip, 0))
            bound_port = sock.getsockname()[1]
            try:
                # Pipelined only to a server known to take it: an
                # association has no flow of its own to learn it on.
                client = Socks5Client(local_ip, bound_port, username=self.username,
                                      password=self.password, command=CMD_UDP_ASSOCIATE,
                                      pipeline=self.pipelining is True)
                header = encode_udp(host, port, b"")
            except Socks5Error as e:
                raise OutboundError(f"{self.name}: UDP ASSOCIATE: {e}") from None
            await socks5_handshake(stream, client, f"{self.name}: UDP ASSOCIATE")
            assert client.reply is not None
            # BND.ADDR 0.0.0.0 (or a name) means "the address you reached me at".
            relay = as_ip(client.reply.host)
            relay_host = proxy_ip if relay is None or relay.is_unspecified else str(relay)
            relay_port = client.reply.port
            if not 0 < relay_port <= 0xFFFF:
                raise OutboundError(
                    f"{self.name}: UDP ASSOCIATE answered relay port {relay_port}")
            sock.connect((relay_host, relay_port))
        except OSError as e:
            if sock is not None:
                sock.close()
            await trio.aclose_forcefully(stream)
            raise OutboundError(f"{self.name}: UDP ASSOCIATE: {e.strerror or e}") from None
        except BaseException:
            if sock is not None:
                sock.close()
            await trio.aclose_forcefully(stream)
            raise
        return UdpPeer(sock, self.name, header=header, control=stream,
                       remote=f"{relay_host}:{relay_port}")

    async def _connect(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        def new_client(pipeline: bool = self.pipelining is not False) -> Socks5Client:
            return Socks5Client(host, port, username=self.username, password=self.password,
                                pipeline=pipeline)

        try:
            client = new_client()  # a bad target fails before any connection
        except Socks5Error as e:
            raise OutboundError(f"{self.name}: {e}") from None
        try:
            return await self._open_tunnel(client, new_client, self._handshake)
        except PipelineStalled:
            self.pipelining = False
        return await self._handshake(await self.dialer.dial(self.server, self.port),
                                     new_client(False))

    async def _handshake(self, stream: trio.abc.Stream, client: Socks5Client
                         ) -> trio.abc.Stream:
        """The handshake on `stream`; closes it on any failure."""
        learning = client.pipelined and self.pipelining is None
        try:
            await socks5_handshake(stream, client, self.name, self.request_sent,
                                   stall=PIPELINE_STALL if learning else None)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if learning:
            self.pipelining = True
        if client.trailing_data:
            return ReplayStream(stream, client.trailing_data)
        return stream


async def socks5_handshake(stream: trio.abc.Stream, client: Socks5Client, name: str,
                           request_sent: Callable[[], None] | None = None,
                           stall: float | None = None) -> None:
    """Run `client` (greeting, optional auth, request) over `stream` until the
    proxy's reply is in: CONNECT or UDP ASSOCIATE.
    `request_sent()` is called once the request is out (with the greeting
    when pipelined, else after the server's answers to greeting and auth),
    before waiting for the reply.

    With `stall`, a pipelined handshake whose reply has not begun `stall`
    seconds after the method selection raises PipelineStalled.

    Raises OutboundError("{name}: ...") for an error reply, refused
    credentials or a handshake that does not finish within the read bound;
    no deadline of its own (the caller's scope bounds it) and never closes
    `stream` (its owner does, on any exception)."""
    # On a plain socket, SO_RCVLOWAT = the bytes wanted makes the kernel
    # wake us once for the method selection and the reply head together
    # (they arrive back to back when the request was pipelined) instead of
    # once per segment; a read still returns early at EOF. Reset to 1 before
    # the stream is handed on: the splice must wake for every byte.
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    lowat = 1
    try:
        await handshake_send(stream, client.data_to_send())
        for _ in range(_MAX_READS):
            if request_sent is not None and client.request_sent:
                request_sent()
                request_sent = None
            if client.established:
                return
            wanted = client.bytes_wanted()
            # While learning, wake for the method selection alone: a server
            # that drops the request sends nothing more to wake us for.
            if sock is not None and wanted != lowat and stall is None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
                lowat = wanted
            if stall is not None and client.awaiting_reply:
                data = None
                with trio.move_on_after(stall):
                    data = await handshake_receive(stream, wanted)
                if data is None:
                    raise PipelineStalled(f"{name}: no reply to a pipelined request")
                stall = None
            else:
                data = await handshake_receive(stream, wanted)
            client.receive_data(data)
            out = client.data_to_send()
            if out:
                await handshake_send(stream, out)
    except Socks5Error as e:
        raise OutboundError(f"{name}: {e}") from None
    finally:
        if sock is not None and lowat != 1:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    raise OutboundError(f"{name}: handshake did not finish")
