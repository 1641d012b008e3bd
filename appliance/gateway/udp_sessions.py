"""The UDP gateway's bookkeeping, without I/O: session table, counters, addresses.

What it is for: `appliance.gateway.udp` moves datagrams; everything it has to
*decide* per datagram or per session lives here so that it can be tested with
plain values (tests/unit/test_udp_sessions.py):

- `SessionTable`: sessions by (client address, original destination), in
  least-recently-active order, bounded (the oldest idle session is evicted to
  make room, and counted);
- `UdpStats`: the counters `stats()` reports (metrics and `mirage status`);
- `idle_timeout`: how long a session may stay silent.

(A datagram's original destination is decoded by
`appliance.sockopt.original_destination`.)

Nothing here imports trio or opens a socket. Not thread-safe (trio thread only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

# DNS over UDP is one query and one answer: a session to port 53 that stays
# quiet this long is over (mihomo and conntrack treat it the same way; the
# kernel's nf_conntrack_udp_timeout is 30 s for unreplied and 120 s for
# streams).
DNS_PORT = 53
DNS_IDLE_TIMEOUT = 10.0

# Largest UDP payload an IPv4 datagram can carry (65535 - 20 - 8).
MAX_UDP_PAYLOAD = 65507


def client_address(addr: tuple[str, int] | tuple[str, int, int, int]) -> tuple[str, int]:
    """(address, port) of a datagram's sender; an IPv4-mapped IPv6 address
    (a v4 client seen on a dual-stack socket) becomes plain IPv4 text, which
    is what a reply socket of family AF_INET sends to."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, addr[1]


def idle_timeout(dst_port: int, default: float) -> float:
    """Seconds a session to `dst_port` may stay silent before it ends."""
    if dst_port == DNS_PORT:
        return min(default, DNS_IDLE_TIMEOUT)
    return default


@dataclass
class UdpStats:
    """The UDP gateway's counters since start (plus the live `sessions`).

    `dropped_*` count datagrams from clients that were not forwarded:
    `unmapped` (fake IP with no mapping), `oversize` (does not fit the
    outbound's datagram), `fragment` (SOCKS5 FRAG != 0 from a proxy),
    `rejected` (a REJECT rule), `dial_failed` (sent while the session's
    outbound could not be opened), `queue` (too many datagrams waiting for a
    session's outbound to open), `malformed` (a proxy's reply without a valid
    SOCKS5 UDP header), `loop` (sent to the listener's own port, not
    captured), `send` (the kernel refused to send: full buffer,
    unreachable), `limit` (the first datagram of a session its client had
    no share of flows left for; appliance/limits.py). `dial_failures`
    counts sessions whose outbound could not be opened, `skipped_no_udp`
    rules passed over because their target cannot carry UDP (see
    appliance/routing.py).
    """

    sessions: int = 0
    sessions_opened: int = 0
    evicted: int = 0
    idle_expired: int = 0
    dial_failures: int = 0
    skipped_no_udp: int = 0
    dropped_unmapped: int = 0
    dropped_oversize: int = 0
    dropped_fragment: int = 0
    dropped_rejected: int = 0
    dropped_dial_failed: int = 0
    dropped_queue: int = 0
    dropped_malformed: int = 0
    dropped_loop: int = 0
    dropped_send: int = 0
    dropped_limit: int = 0
    packets_up: int = 0
    packets_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


K = TypeVar("K")
S = TypeVar("S")


class SessionTable(Generic[K, S]):
    """Live sessions by key, least recently active first, at most `capacity`.

    `touch(key)` marks activity (O(1)); `add` returns the session it evicted
    to stay within `capacity` (the least recently active one), which the
    caller must end. Owns only memory.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[K, S] = OrderedDict()

    def get(self, key: K) -> S | None:
        return self._items.get(key)

    def touch(self, key: K) -> None:
        self._items.move_to_end(key)

    def add(self, key: K, session: S) -> S | None:
        """Insert `session` as the most recently active; returns the evicted
        session if the table was full. Raises KeyError if `key` is present."""
        if key in self._items:
            raise KeyError(key)
        evicted = None
        if len(self._items) >= self.capacity:
            evicted = self._items.popitem(last=False)[1]
        self._items[key] = session
        return evicted

    def remove(self, key: K, session: S) -> bool:
        """Remove `key` if it still maps to `session` (an evicted session's
        cleanup must not remove its successor). Returns whether it did."""
        if self._items.get(key) is session:
            del self._items[key]
            return True
        return False

    def oldest(self) -> S | None:
        return next(iter(self._items.values()), None)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[S]:
        return iter(list(self._items.values()))
