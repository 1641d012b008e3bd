"""One connection to a proxy's server that carries many flows at once: an
AnyTLS session (appliance/outbound/anytls.py), an SSH connection
(appliance/outbound/ssh.py).

What they share is the I/O around their sans-I/O cores: a driver task
reads the connection until it ends; one writer at a time sends, shielded
from the flows' cancellation; and ending (for any reason, once) fails
every flow on it, stops the driver and closes the connection. The protocol
(what a read means, which flows there are) is the subclass's.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

# One read of the server's connection.
READ_SIZE = 1 << 18
# A send to the server that has not gone through in this long ends the
# connection (sends are shielded from the flows' cancellation).
SEND_TIMEOUT = 30.0


class SharedConnection:
    """Owns `transport`. `drive` (the owner starts it as a system task)
    runs `_read` until the connection ends (`end`), then closes
    `transport`. `closed_reason` is why it ended (None while it lives)."""

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        self.closed_reason: str | None = None
        self._send_lock = trio.Lock()
        self._driver = trio.CancelScope()

    def _ended(self, reason: str) -> None:
        """Fail the flows on it (the subclass's), once, when it ends."""

    async def _read(self) -> None:
        """Read `transport` until the connection ends (the subclass's)."""
        raise NotImplementedError

    def end(self, reason: str) -> None:
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._ended(reason)
        self._driver.cancel()  # the driver stops reading and closes the transport

    async def drive(self) -> None:
        try:
            with self._driver:
                await self._read()
        finally:
            self.end("closed")
            await trio.aclose_forcefully(self.transport)

    async def _send(self, chunks: Iterable[bytes]) -> None:
        """Send `chunks` in order, each one write; the caller holds
        `_send_lock`. Shielded: a flow cancelled half-way would leave the
        server torn framing and end every flow. A send that fails or takes
        longer than SEND_TIMEOUT ends the connection and raises
        trio.BrokenResourceError(closed_reason)."""
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(SEND_TIMEOUT) as timer:
                for chunk in chunks:
                    await self.transport.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.end(f"send failed: {e}")
            raise trio.BrokenResourceError(self.closed_reason) from None
        if timer.cancelled_caught:
            self.end(f"the server took no data for {SEND_TIMEOUT:g}s")
            raise trio.BrokenResourceError(self.closed_reason)
