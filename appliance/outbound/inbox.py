"""What a flow's stream on a shared connection has received and not yet
read: the bytes a connection's driver task hands it, its end, or why it
broke. Used by the streams of SSH channels and AnyTLS sessions.

Chunks are kept as the driver delivered them: a read returns a chunk
whole when it fits (no copy), joins the ones that fit together, and splits
only a chunk larger than the read. One `trio.Event` at a time, made only
when a task waits, wakes whoever waits for a change: the reader, a writer
waiting for window, a driver waiting for the reader to make room.
"""

from __future__ import annotations

import sys
from collections import deque

import trio


class Inbox:
    """Received bytes, EOF and failure of one stream (see the module doc).
    Owns nothing but its buffer."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self.error: str | None = None
        self._waiter: trio.Event | None = None

    def wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.set()

    def put(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)
        self.wake()

    def end(self) -> None:
        self.eof = True
        self.wake()

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.wake()

    async def changed(self) -> None:
        """Wait until bytes arrive or are read, the stream ends or fails, or
        `wake()`."""
        if self._waiter is None:
            self._waiter = trio.Event()
        await self._waiter.wait()

    async def take(self, max_bytes: int | None) -> bytes:
        """Up to `max_bytes` (None: what is there), waiting for some; b"" at
        EOF once the buffer is empty; trio.BrokenResourceError(reason) when
        the stream failed (bytes received before are still returned)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._chunks:
            if self.error is not None:
                raise trio.BrokenResourceError(self.error)
            if self.eof:
                return b""
            await self.changed()
        chunks = self._chunks
        room = sys.maxsize if max_bytes is None else max_bytes
        parts: list[bytes] = []
        while chunks and len(chunks[0]) <= room:
            part = chunks.popleft()
            parts.append(part)
            room -= len(part)
        if not parts:  # the first chunk is larger than the read
            first = chunks[0]
            out = first[:room]
            chunks[0] = first[room:]
        else:
            out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.size -= len(out)
        self.wake()  # a driver waiting for room (`changed`) may go on
        return out
