"""What the two TLS client streams share: `TlsStream` (stdlib ssl,
appliance/outbound/tls.py) and `RealityStream` (REALITY's own TLS 1.3,
appliance/outbound/reality.py).

`TlsLayer` owns the transport stream under it and keeps the state both
need around their different record engines: the send lock (a receive may
have to answer the server while a send runs: bytes for the transport go out
under one lock, in the order the engine produced them), the EOF and closed
flags, and the close (a best-effort close_notify, then the transport).
`handshake_or_close` runs a handshake and closes the stream on any failure,
turning the engine's own errors into OutboundError.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from appliance import streamio
from appliance.outbound.base import OutboundError

# One read of the transport: several records per wakeup.
TRANSPORT_READ = 1 << 18
# receive_some(None): what one call returns at most.
DEFAULT_RECEIVE = 1 << 16
# How long a close waits to send close_notify before closing the transport.
CLOSE_NOTIFY_SECONDS = 1


class TlsLayer(trio.abc.Stream):
    """A TLS client over `transport_stream` (which it owns). Subclasses
    provide the records (`receive_some`, `send_all`, `do_handshake`) and
    `_close_notify`."""

    def __init__(self, transport_stream: trio.abc.Stream) -> None:
        self.transport_stream = transport_stream
        self._send_lock = trio.Lock()
        self._eof = False
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")

    async def do_handshake(self) -> None:
        raise NotImplementedError

    def _close_notify(self) -> bytes:
        """The bytes of an alert close_notify (b"": none to send)."""
        raise NotImplementedError

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """close_notify if it can go out at once (best effort: not while a
        send holds the lock), then the transport closes."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if not self._send_lock.locked():
                goodbye = self._close_notify()
                if goodbye:
                    with trio.move_on_after(CLOSE_NOTIFY_SECONDS):
                        await streamio.send_all(self.transport_stream, goodbye)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport_stream.aclose()


async def handshake_or_close(
    layer: TlsLayer,
    describe: Callable[[BaseException], str | None],
) -> None:
    """`layer.do_handshake()`; on any failure the layer (and its transport)
    is closed. An exception `describe` names (its text: the reason) becomes
    OutboundError with that reason; any other propagates."""
    try:
        await layer.do_handshake()
    except BaseException as e:
        await trio.aclose_forcefully(layer)
        reason = describe(e) if isinstance(e, Exception) else None
        if reason is None:
            raise
        raise OutboundError(reason) from None
