"""UDP flows carried over a stream (VMess, VLESS: one proxy connection per
flow, datagrams framed on it), presented as the `UdpPeer` the gateway
sends on.

The gateway sends and receives datagrams on a plain socket; here that
socket is one end of an AF_UNIX datagram socketpair and `watch()` relays
between the other end and the stream through a `PacketCodec` (framing,
and encryption where the protocol has it). `watch()` returns when the
stream ends or fails (the gateway then ends the flow); `aclose` closes
both socket ends and the stream.
"""

from __future__ import annotations

import logging
import socket
from typing import Protocol

import trio

from appliance.outbound.base import UdpPeer

log = logging.getLogger(__name__)

# A stream read: several datagrams' frames at once.
_RECV = 1 << 16
# Datagrams read from the gateway before one write to the stream.
_BATCH = 32


class PacketCodec(Protocol):
    """One flow's datagram framing on the stream."""

    def encode(self, payload: bytes) -> bytes:
        """One datagram -> the bytes to send (raises ValueError if it cannot
        be sent)."""
        ...

    def decode(self, data: bytes) -> list[bytes]:
        """Stream bytes -> the datagrams they complete (raises ValueError on
        bytes that do not decode)."""
        ...


class StreamUdpPeer(UdpPeer):
    """A UDP flow over `stream` (already past its protocol's request).
    Owns the stream and the socketpair."""

    def __init__(self, stream: trio.abc.Stream, codec: PacketCodec, outbound: str,
                 remote: str) -> None:
        outer, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (outer, inner):
            s.setblocking(False)
            # Room for a burst of full-size datagrams each way.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        super().__init__(outer, outbound, control=stream, remote=remote)
        self.socks = False  # replies are bare payloads
        self._inner = inner
        self._stream = stream
        self._codec = codec

    async def watch(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._up, nursery.cancel_scope)
                await self._down()
                nursery.cancel_scope.cancel()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as e:
            log.debug("udp via %s: stream ended: %s", self.outbound, e)

    async def _up(self, scope: trio.CancelScope) -> None:
        inner, codec, stream = self._inner, self._codec, self._stream
        while True:
            await trio.lowlevel.wait_readable(inner)
            frames: list[bytes] = []
            for _ in range(_BATCH):
                try:
                    frames.append(codec.encode(inner.recv(65535)))
                except BlockingIOError:
                    break
            if frames:
                await stream.send_all(b"".join(frames))

    async def _down(self) -> None:
        inner, codec, stream = self._inner, self._codec, self._stream
        while True:
            data = await stream.receive_some(_RECV)
            if not data:
                return
            for datagram in codec.decode(bytes(data)):
                try:
                    inner.send(datagram)
                except BlockingIOError:
                    pass  # the gateway is behind: drop, as a full UDP socket would

    async def aclose(self) -> None:
        self._inner.close()
        await super().aclose()
