"""Received payloads waiting for the reader, shared by the message-based
transports (ws messages, gun messages, HTTP/2 DATA frames)."""

from __future__ import annotations

from collections import deque

# receive_some(None): what one call returns at most.
DEFAULT_MAX = 1 << 16


class Chunks:
    """Payloads in arrival order; `take(n)` returns up to n bytes joined
    from as many as fit (one receive hands the splice everything that is
    there, instead of one 16 KiB message per scheduler turn)."""

    def __init__(self) -> None:
        self._queue: deque[bytes] = deque()
        self.size = 0

    def __bool__(self) -> bool:
        return self.size > 0

    def append(self, data: bytes) -> None:
        if data:
            self._queue.append(data)
            self.size += len(data)

    def extend(self, items: list[bytes]) -> None:
        for data in items:
            self.append(data)

    def take(self, max_bytes: int | None) -> bytes:
        limit = DEFAULT_MAX if max_bytes is None else max_bytes
        queue = self._queue
        first = queue[0]
        if len(first) >= limit or len(queue) == 1:
            if len(first) <= limit:
                queue.popleft()
                self.size -= len(first)
                return first
            queue[0] = first[limit:]
            self.size -= limit
            return first[:limit]
        parts: list[bytes] = []
        room = limit
        while queue and room:
            data = queue[0]
            if len(data) <= room:
                parts.append(queue.popleft())
                room -= len(data)
            else:
                parts.append(data[:room])
                queue[0] = data[room:]
                room = 0
        self.size -= limit - room
        return b"".join(parts)
