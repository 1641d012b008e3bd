"""Connections to a proxy server opened ahead of the flows that will use them.

A flow through a SOCKS5 or HTTP CONNECT proxy starts with a TCP handshake to
the proxy: one round trip to it (a WAN round trip on a real gateway) and,
for the proxy, an accept, before the request can even be sent. `Preconnect`
keeps up to `size` connections to the proxy already open (or opening), so a
new flow sends its request at once; each flow that takes one starts the
connect of its replacement after its own request is out, off its critical
path. The request still goes on the taken connection: nothing is
multiplexed, each connection serves one flow, as without the pool.

When it refills: only while flows come often enough to use what it keeps.
A take that finds a ready connection refills one; a take that finds none
(or only connections kept longer than `max_idle`) refills one only if the
previous take was less than `max_idle` seconds before, so a proxy used once
a minute never sees a connection that nobody takes. Connections kept longer
than `max_idle` are closed (`sweep`, and every take), before most servers'
"no request yet" timeouts (dante: 30 s) end them from their side; one that
the server closed anyway is noticed by its user, which retries on a new
connection (`ProxyOutbound`): a stale connection costs a retry, never a
flow.

Refills are plain non-blocking connect(2) calls: nothing waits for them. A
taken connection may still be handshaking; its first write then waits for
it like any other socket. Owns the sockets it holds until they are taken or
it is closed. Used from one trio thread.
"""

from __future__ import annotations

import errno
import socket
import time
from collections import deque
from collections.abc import Callable

import trio

from appliance.config.model import IPAddress
from appliance.sockopt import start_marked_connect

# `stats()` keys, in order: kept now, then counters since start.
STATS = ("ready", "hits_total", "misses_total", "expired_total", "stale_total")
# How long a connection may wait for its flow. Below the "no request yet"
# timeouts of common proxies (dante 30 s, squid 5 min, tinyproxy 600 s).
MAX_IDLE = 5.0


class Preconnect:
    """Up to `size` connections to one proxy, ready to be taken.

    `address()` says where the proxy is now (an IP, or None while a name is
    unresolved: then nothing is pre-opened). Sockets carry `mark` (SO_MARK).
    `clock` is for tests.
    """

    def __init__(
        self,
        address: Callable[[], IPAddress | None],
        port: int,
        size: int,
        *,
        mark: int | None = None,
        max_idle: float = MAX_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 1:
            raise ValueError(f"preconnect size {size}: at least 1 (0 is no pool at all)")
        self._address = address
        self.port = port
        self.size = size
        self.mark = mark
        self.max_idle = max_idle
        self._clock = clock
        self._ready: deque[tuple[socket.socket, float]] = deque()
        self._last_take = -float("inf")
        # Replacements owed by takes that asked for one (`refill` opens them).
        self._owed = 0
        self.closed = False
        # Counters (`stats`): takes served by a kept connection, takes that
        # found none, kept connections closed unused (too old, or closed by
        # the server before a take), and kept connections a flow found dead.
        self.hits = 0
        self.misses = 0
        self.expired = 0
        self.stale = 0

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> trio.SocketStream | None:
        """A kept connection (the oldest one younger than `max_idle`), or
        None. Decides whether `refill` will open a replacement."""
        now = self._clock()
        self._drop_old(now)
        sock = None
        while self._ready and sock is None:
            candidate, _ = self._ready.popleft()
            if _closed_by_peer(candidate):
                self.expired += 1
                candidate.close()
            else:
                sock = candidate
        frequent = now - self._last_take < self.max_idle
        self._last_take = now
        if (sock is not None or frequent) and self._owed < self.size:
            self._owed += 1
        if sock is None:
            self.misses += 1
            return None
        self.hits += 1
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    def refill(self) -> None:
        """After a take (once its request is sent): start one connect if the
        take asked for it and there is room. Never waits, never raises: a
        connect that fails at once is simply not kept."""
        if self._owed == 0:
            return
        self._owed -= 1
        if self.closed or len(self._ready) >= self.size:
            return
        ip = self._address()
        if ip is None:
            return
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            sock, err = start_marked_connect(str(ip), self.port, family, self.mark)
        except OSError:  # out of descriptors: the flows need them more
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return
        self._ready.append((sock, self._clock()))

    def sweep(self) -> None:
        """Close kept connections older than `max_idle` (run periodically)."""
        self._drop_old(self._clock())

    def close(self) -> None:
        """Close every kept connection; later refills do nothing."""
        self.closed = True
        while self._ready:
            self._ready.popleft()[0].close()

    def stats(self) -> dict[str, int]:
        """The counters by their metric names (`STATS`)."""
        return dict(zip(STATS, (len(self._ready), self.hits, self.misses, self.expired,
                                self.stale), strict=True))

    def _drop_old(self, now: float) -> None:
        while self._ready and now - self._ready[0][1] >= self.max_idle:
            self._ready.popleft()[0].close()
            self.expired += 1


def _closed_by_peer(sock: socket.socket) -> bool:
    """Has the server already ended this (unused) connection: EOF, reset,
    or a failed connect? A peek that would block means it is alive (or
    still connecting). Any byte before our request would be a protocol
    error too: such a connection is not used either."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True
