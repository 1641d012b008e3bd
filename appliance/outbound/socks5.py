"""SOCKS5 outbound: CONNECT through a SOCKS5 proxy, by name (ATYP=3).

The target name goes to the proxy unresolved (RFC 3089 step 5): this is how a
fake-IP flow reaches the right host even when local DNS lies.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

import trio

from appliance.config.model import IPAddress
from appliance.outbound.base import (
    OutboundError,
    ProxyOutbound,
    ReplayStream,
    handshake_receive,
    handshake_send,
)
from appliance.proto.socks5 import Socks5Client, Socks5Error

# Greeting, auth and request need 3 round trips; a server that trickles its
# replies byte by byte needs at most ~280 reads. Bound the loop anyway.
_MAX_READS = 300


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
    """

    type = "Socks5"

    async def _connect(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        def new_client() -> Socks5Client:
            return Socks5Client(host, port, username=self.username, password=self.password)

        try:
            client = new_client()  # a bad target fails before any connection
        except Socks5Error as e:
            raise OutboundError(f"{self.name}: {e}") from None
        return await self._open_tunnel(client, new_client, self._handshake)

    async def _handshake(self, stream: trio.SocketStream, client: Socks5Client
                         ) -> trio.abc.Stream:
        """The handshake on `stream`; closes it on any failure."""
        try:
            await socks5_handshake(stream, client, self.name, self.request_sent)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if client.trailing_data:
            return ReplayStream(stream, client.trailing_data)
        return stream


async def socks5_handshake(stream: trio.abc.Stream, client: Socks5Client, name: str,
                           request_sent: Callable[[], None] | None = None) -> None:
    """Run `client` (greeting, optional auth, request) over `stream` until the
    proxy's reply is in: CONNECT here, UDP ASSOCIATE in udp.py.
    `request_sent()` is called once the request is out (with the greeting
    when pipelined, else after the server's answers to greeting and auth),
    before waiting for the reply.

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
            if sock is not None and wanted != lowat:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
                lowat = wanted
            client.receive_data(await handshake_receive(stream, wanted))
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
