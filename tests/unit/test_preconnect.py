"""Preconnect: when connections are kept, refilled, expired and skipped.

Real sockets on loopback (a listener of the test's own), a fake clock for
the ages. What the pool promises: it refills only while takes come within
`max_idle` of each other, never holds more than `size`, never hands out a
connection older than `max_idle` or one the server already closed, and
closes everything it holds on `close()`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import pytest
import trio

from appliance.outbound.preconnect import Preconnect
from appliance.sockopt import SO_MARK

LOOPBACK = ipaddress.ip_address("127.0.0.1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock
    sock.close()


def pool_for(listener: socket.socket, clock: Clock, size: int = 2, **kw: object) -> Preconnect:
    port = listener.getsockname()[1]
    return Preconnect(lambda: LOOPBACK, port, size, clock=clock, **kw)  # type: ignore[arg-type]


def keep_one(pool: Preconnect, clock: Clock) -> None:
    """Two takes 1 s apart (the second owes a replacement), then its refill:
    the pool opens one connection (when it can)."""
    pool.take()
    clock.now += 1
    pool.take()
    pool.refill()


def accept(listener: socket.socket) -> socket.socket:
    listener.settimeout(2)
    conn, _ = listener.accept()
    return conn


async def test_refills_only_while_takes_come_often(listener: socket.socket) -> None:
    clock = Clock()
    pool = pool_for(listener, clock)
    # The first take ever: nothing kept, and no sign that more will come.
    assert pool.take() is None
    pool.refill()
    assert len(pool) == 0
    # A second take within max_idle: flows are coming, keep one ready.
    clock.now += 1
    assert pool.take() is None
    pool.refill()
    assert len(pool) == 1
    server_side = accept(listener)
    # The next flow gets it, connected, and its replacement is opened.
    clock.now += 1
    stream = pool.take()
    assert isinstance(stream, trio.SocketStream)
    await stream.send_all(b"ping")
    assert server_side.recv(10) == b"ping"
    pool.refill()
    assert len(pool) == 1
    assert pool.stats() == {"ready": 1, "hits_total": 1, "misses_total": 2,
                            "expired_total": 0, "stale_total": 0}
    await stream.aclose()
    server_side.close()
    pool.close()


def test_slow_flows_open_nothing_in_vain(listener: socket.socket) -> None:
    # One flow per 10 s (max_idle 5 s): a kept connection would always be
    # too old when the next flow comes, so none is opened.
    clock = Clock()
    pool = pool_for(listener, clock)
    for _ in range(4):
        assert pool.take() is None
        pool.refill()
        assert len(pool) == 0
        clock.now += 10
    assert pool.misses == 4


def test_never_holds_more_than_size(listener: socket.socket) -> None:
    clock = Clock()
    pool = pool_for(listener, clock, size=3)
    for _ in range(10):
        pool.take()
        clock.now += 0.1
    # Ten takes owe at most `size` replacements; refills stop at `size`.
    for _ in range(10):
        pool.refill()
    assert len(pool) == 3
    pool.close()


def test_old_connections_are_closed_not_used(listener: socket.socket) -> None:
    clock = Clock()
    pool = pool_for(listener, clock)
    keep_one(pool, clock)
    server_side = accept(listener)
    server_side.settimeout(2)
    # Kept for max_idle: sweep closes it (the server sees the end) ...
    clock.now += pool.max_idle
    pool.sweep()
    assert len(pool) == 0 and pool.expired == 1
    assert server_side.recv(10) == b""
    server_side.close()
    # ... and a take never returns one that old either. (Two takes: the
    # first comes more than max_idle after the last one, so it owes none.)
    for _ in range(2):
        clock.now += 1
        pool.take()
        pool.refill()
    assert len(pool) == 1
    accept(listener).close()
    clock.now += pool.max_idle + 1
    assert pool.take() is None
    assert pool.expired == 2
    pool.close()


def test_a_connection_the_server_closed_is_skipped(listener: socket.socket) -> None:
    clock = Clock()
    pool = pool_for(listener, clock)
    keep_one(pool, clock)
    accept(listener).close()  # the server gives up on it (FIN)
    clock.now += 1
    assert pool.take() is None
    assert pool.expired == 1 and len(pool) == 0


def test_a_refused_connect_is_never_handed_out() -> None:
    # Nothing listens: the kept connect fails (RST), and the take sees it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = Clock()
    pool = Preconnect(lambda: LOOPBACK, port, 2, clock=clock)
    keep_one(pool, clock)
    clock.now += 0.1
    assert pool.take() is None
    assert pool.hits == 0 and pool.misses == 3
    pool.close()


def test_kept_sockets_carry_the_mark_and_close_ends_all(listener: socket.socket) -> None:
    clock = Clock()
    pool = pool_for(listener, clock, size=2, mark=0x6D70)
    keep_one(pool, clock)
    kept = pool._ready[0][0]
    assert kept.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x6D70
    pool.close()
    assert kept.fileno() == -1
    # Closed for good: later takes owe nothing and refills open nothing.
    pool.take()
    pool.refill()
    assert len(pool) == 0


def test_no_address_yet_opens_nothing(listener: socket.socket) -> None:
    clock = Clock()
    port = listener.getsockname()[1]
    pool = Preconnect(lambda: None, port, 2, clock=clock)
    keep_one(pool, clock)
    assert len(pool) == 0


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Preconnect(lambda: LOOPBACK, 1080, 0)
