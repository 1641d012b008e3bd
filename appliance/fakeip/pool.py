"""The fake-IP pool: one domain <-> one fake IP per address family, no I/O.

What it is for: the DNS service answers a name with `allocate(name)`; the
transparent listener turns the destination of a captured flow back into a name
with `reverse(ip)` and holds it with `pin(ip)` / `unpin(ip)` for the life of
the flow. The pool owns only memory; persistence goes through a
`MappingStore` (store.py) that the pool reads once at construction and feeds
through a pending buffer that a flusher (flusher.py) writes in batches.

Address plan (decided here, documented for the config and the docs):

* IPv4: every address of `fake_ip_range` except the network address and the
  broadcast address. For 198.18.0.0/16 that is 198.18.0.1 .. 198.18.255.254,
  65,534 live mappings at once. mihomo also skips .1 because its TUN device
  takes it as a gateway; Mirage captures with nftables/eBPF and has no TUN
  device, so .1 is an ordinary fake IP.
* IPv6: every address of `fake_ip_range6` except the network address (the
  subnet-router anycast address, RFC 4291 2.6.1).
* At most `max_mappings` live mappings per family (default 262,144). A range
  bigger than that (an IPv6 /64) is used from its start by a cursor and never
  materialised, and recycling starts at the cap, so memory stays bounded.

Allocation order: never-used addresses first (cursor), then addresses freed by
`drop` or left as holes by a restart (oldest first), then the least recently
used unpinned mapping is recycled. Preferring fresh addresses keeps a freed or
recycled fake IP out of circulation as long as possible, which is what
protects clients that cache DNS longer than the 1 s TTL.

Use: `allocate`, `lookup`, `reverse` and `pin` (and `unpin`, which puts the
mapping back as most recently used) count as use. A pinned mapping is never
recycled or dropped; when every mapping of a full family is pinned,
`allocate` of a new name raises `PoolExhausted` and nothing is reused.

Memory (bench/pool_memory.py): a mapping is its name string, one dict entry
(name -> offset, with its int), one slot in a list (offset -> name) and two
4-byte slots in `array`s (LRU links): about 165 bytes at 100,000 mappings
(tracemalloc; 175 by RSS), 1.1 times a bare `dict[str, int]` of the same
names. The pending buffer adds about 50 bytes per mapping changed or used
since the last flush. The LRU order is an intrusive doubly
linked list over offsets with slot 0 as sentinel, so touch and evict are O(1)
without per-mapping node objects.

Persistence contract (see store.py): every change and every use marks the
address dirty in an insertion-ordered pending dict (deduplicated: a name used
a thousand times between flushes costs one row). `take_pending()` turns it
into a batch of `(family, address, domain | None, last_used)` rows, with
`last_used` a counter that increases in pending order, so the store's
`last_used` order is exactly the pool's LRU order as of the flush.

Across restarts (docs/architecture.md, "Fake IPs across restarts"): with a
`Ledger` (ledger.py) the pool never hands out an address that a client may
still hold for another name while it has a safer one:

* write-ahead: the allocation cursor only moves below a high-water mark
  already on disk (`RESERVE_BLOCK` addresses, at most 1/64 of the range,
  reserved per synchronous write), so after any restart the pool knows which
  addresses were ever issued, to within that block;
* quarantine: at start, the addresses that may sit in clients' caches under
  a name the pool no longer knows are held back: with a store, the holes
  (freed or filtered addresses), the unflushed tail of the cursor and, after
  an unclean exit of a run that had used up the range, the `reuse_budget`
  least recently used loaded mappings (the only ones a lost flush interval
  can have recycled); without a store,
  every address ever issued, least recently used first when the last run
  ended cleanly. They are handed out only after never-issued and free
  addresses (and, with a store, after loaded mappings unused since the
  restart), and freely only once `quarantine` seconds have passed; one taken
  earlier is counted (`quarantine_cut_short`) and logged;
* with a store, at most `reuse_budget` mappings are recycled per completed
  flush (beyond it `allocate` raises PoolExhausted until the flusher
  catches up), which is what bounds the third kind above.

Not thread-safe: call it from the trio thread only.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from appliance.fakeip.ledger import RESERVE_BLOCK, FamilyLedger, Ledger, LedgerState

if TYPE_CHECKING:
    from appliance.fakeip.store import Change, MappingStore, Row

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Per family. 262,144 mappings cost about 45 MB at the measured ~175 B each;
# a /16 (65,534) is far below it.
DEFAULT_MAX_MAPPINGS = 1 << 18
# Offsets live in array('i') slots.
_MAX_OFFSET = (1 << 31) - 1
# How long after a restart a quarantined address is held back (while any
# other is available). Clients are told TTL 1 but some cache far longer:
# browsers about a minute, the JVM 30 s, stub caches that serve stale
# answers (RFC 8767) longer still; ten minutes covers the common ones.
DEFAULT_QUARANTINE = 600.0
# Recycles of loaded/live mappings allowed between two completed store
# flushes (store only): what an unclean exit can have lost, and therefore
# what the next start quarantines from the head of the LRU order.
DEFAULT_REUSE_BUDGET = 1024
# At most one "quarantine cut short" line per this many seconds.
_CUT_SHORT_LOG_INTERVAL = 10.0


# LRU victims per allocation that may be spared because the kernel answered
# them since they were last looked at (see `KernelMirror`); beyond this the
# head is recycled anyway (a pool this hot has no unused mapping to offer).
_KERNEL_SPARES = 64


class KernelMirror(Protocol):
    """A copy of the mappings outside the pool that must never be stale: the
    kernel DNS answerer's name map (appliance/capture/ebpf/answer.py).

    The pool is its only writer: `bound` after a mapping exists, `unbound`
    before its address can be handed to another name; `hit_since_check`
    tells whether a mapping was used out there since the last time the pool
    asked (asked only for LRU victims, before recycling them).
    """

    def bound(self, family: int, name: str, ip: IPAddress) -> None: ...

    def unbound(self, family: int, name: str) -> None: ...

    def hit_since_check(self, family: int, name: str) -> bool: ...

    def resync(self, mappings: Iterable[tuple[str, IPAddress, int]]) -> None: ...


class PoolExhausted(Exception):
    """Every address of the family is held by a pinned mapping (a live flow).

    The DNS service answers SERVFAIL and logs; nothing is reused.
    """


def normalise(domain: str) -> str:
    """The pool's key for a name: lower case, one trailing dot removed.

    Raises ValueError for the empty name (and the root, ".").
    """
    name = domain.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError(f"not a domain name: {domain!r}")
    return name


class _Family:
    """The mappings of one address family inside one fake range.

    Offsets count from the network address, so offset 0 (the network address)
    is never allocated and serves as the LRU list's sentinel. Linked offsets
    are exactly the mapped, unpinned ones; `nxt[0]` is the least recently
    used, `prv[0]` the most recently used.
    """

    __slots__ = (
        "by_name",
        "capacity",
        "cursor",
        "free",
        "names",
        "net",
        "network",
        "nxt",
        "pending",
        "pins",
        "prv",
        "q_pos",
        "quarantine",
        "reserved",
        "stale",
        "version",
    )

    def __init__(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, limit: int):
        self.network = network
        self.version = network.version
        self.net = int(network.network_address)
        reserved = 2 if network.version == 4 else 1
        usable = network.num_addresses - reserved
        if usable < 1:
            raise ValueError(f"fake-IP range {network} has no usable address")
        self.capacity = min(usable, limit, _MAX_OFFSET)
        self.by_name: dict[str, int] = {}
        self.names: list[str | None] = [None]
        self.prv = array("i", [0])
        self.nxt = array("i", [0])
        self.pins: dict[int, int] = {}
        # Offsets that were mapped and are free again, oldest first.
        self.free: collections.deque[int] = collections.deque()
        # Next never-used offset; offsets >= cursor have no slot yet.
        self.cursor = 1
        # Dirty offsets in order of last change/use (values unused).
        self.pending: dict[int, None] = {}
        # The cursor may hand out offsets below this without a ledger write.
        self.reserved = _MAX_OFFSET
        # Held-back offsets, safest first; quarantine[q_pos:] are still held.
        self.quarantine = array("i")
        self.q_pos = 0
        # Loaded mappings not used since the restart (kept only while there
        # is a quarantine): safer to recycle than a quarantined address.
        self.stale: set[int] = set()

    # -- LRU list ---------------------------------------------------------

    def link_tail(self, off: int) -> None:
        prv, nxt = self.prv, self.nxt
        last = prv[0]
        prv[off] = last
        nxt[off] = 0
        nxt[last] = off
        prv[0] = off

    def unlink(self, off: int) -> None:
        prv, nxt = self.prv, self.nxt
        p, n = prv[off], nxt[off]
        nxt[p] = n
        prv[n] = p

    # -- slots ------------------------------------------------------------

    def grow_to(self, end: int) -> None:
        """Make slots for offsets < end (end <= capacity + 1)."""
        extra = end - len(self.names)
        if extra > 0:
            self.names.extend([None] * extra)
            zeros = array("i", bytes(4 * extra))
            self.prv.extend(zeros)
            self.nxt.extend(zeros)

    def offset_of(self, value: int) -> int | None:
        """Offset of an address int if it can hold a mapping, else None."""
        off = value - self.net
        if 1 <= off <= self.capacity:
            return off
        return None

    def mapped_offset(self, value: int) -> int | None:
        off = value - self.net
        if 1 <= off < len(self.names) and self.names[off] is not None:
            return off
        return None

    def address(self, off: int) -> IPAddress:
        if self.version == 4:
            return ipaddress.IPv4Address(self.net + off)
        return ipaddress.IPv6Address(self.net + off)


class FakeIPPool:
    """Allocator of fake IPs with LRU recycling and pins (see module doc).

    Owns: the in-memory mappings and a pending batch for `store`. With a store,
    the constructor loads saved mappings synchronously (construct it before
    serving, or in a thread), dropping rows outside the configured ranges and
    names for which `keep` returns False; the drops reach the store with the
    next flush. Without a store, nothing is recorded for persistence.
    """

    def __init__(
        self,
        range4: ipaddress.IPv4Network,
        range6: ipaddress.IPv6Network | None = None,
        store: MappingStore | None = None,
        keep: Callable[[str], bool] | None = None,
        *,
        max_mappings: int = DEFAULT_MAX_MAPPINGS,
        ledger: Ledger | None = None,
        quarantine: float = DEFAULT_QUARANTINE,
        reuse_budget: int = DEFAULT_REUSE_BUDGET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if range4.version != 4:
            raise ValueError(f"fake-ip-range must be IPv4: {range4}")
        if range6 is not None and range6.version != 6:
            raise ValueError(f"fake-ip-range6 must be IPv6: {range6}")
        if max_mappings < 1:
            raise ValueError("max_mappings must be at least 1")
        self._v4 = _Family(range4, max_mappings)
        self._v6 = _Family(range6, max_mappings) if range6 is not None else None
        self._families = (self._v4,) if self._v6 is None else (self._v4, self._v6)
        self._store = store
        self._record = store is not None
        # Saved rows whose address no family can hold any more: deleted with
        # the next flush. (family, address int)
        self._deletes: list[tuple[int, int]] = []
        self._clock = 1
        self._recycled = 0
        self._exhausted = 0
        self._dropped = 0
        self._unbalanced_unpins = 0
        self._loaded = 0
        self._load_dropped = 0
        self._ledger = ledger
        self._clock_fn = clock
        self._quarantine_until = clock() + quarantine
        self._reuse_budget = reuse_budget
        self._reuses = 0  # recycles of mapped addresses, ever
        self._reuses_taken = 0  # ... as of the last take_pending
        self._reuses_durable = 0  # ... as of the last completed store write
        self._cut_short = 0
        self._cut_short_logged_at = -_CUT_SHORT_LOG_INTERVAL
        self._over_budget = 0
        self._ledger_failures = 0
        self._mirror: KernelMirror | None = None
        self._kernel_spared = 0
        if store is not None:
            self._load(store.load(), keep)
        if ledger is not None:
            self._open_ledger(ledger)

    # -- public API ---------------------------------------------------------

    @property
    def store(self) -> MappingStore | None:
        return self._store

    def set_mirror(self, mirror: KernelMirror | None) -> None:
        """Keep `mirror` equal to the mappings from now on (every current
        mapping is written now); None stops. The caller removes the old
        mirror's contents itself."""
        self._mirror = mirror
        if mirror is not None:
            self.resync_mirror()

    def resync_mirror(self) -> None:
        """Rewrite the mirror from scratch (a reload changed which names it
        may hold)."""
        if self._mirror is not None:
            self._mirror.resync(
                (name, ip, fam.version) for fam in self._families
                for name, off in fam.by_name.items() for ip in (fam.address(off),))

    def allocate(self, domain: str, family: int = 4) -> IPAddress:
        """The fake IP of `domain` in `family`, allocating one if needed.

        Counts as use. Raises PoolExhausted when a new mapping is needed and
        every address of the family is pinned; ValueError for family 6
        without a range6, an unknown family or an empty name.
        """
        fam = self._family(family)
        name = normalise(domain)
        off = fam.by_name.get(name)
        if off is None:
            off = self._new_offset(fam)
            fam.by_name[name] = off
            fam.names[off] = name
            fam.link_tail(off)
            if self._mirror is not None:
                self._mirror.bound(fam.version, name, fam.address(off))
        elif off not in fam.pins:
            fam.unlink(off)
            fam.link_tail(off)
            if fam.stale:
                fam.stale.discard(off)
        if self._record:
            pending = fam.pending
            pending.pop(off, None)
            pending[off] = None
        return fam.address(off)

    def lookup(self, domain: str, family: int = 4) -> IPAddress | None:
        """The fake IP of `domain` if mapped (no allocation). Counts as use."""
        fam = self._family(family)
        off = fam.by_name.get(normalise(domain))
        if off is None:
            return None
        self._touch(fam, off)
        return fam.address(off)

    def reverse(self, ip: IPAddress | str) -> str | None:
        """The domain mapped to fake IP `ip`; None if not fake or unmapped.

        Counts as use. Accepts IPv4-mapped IPv6 (::ffff:198.18.0.5), which is
        what a dual-stack socket reports for an IPv4 peer.
        """
        found = self._find(ip)
        if found is None:
            return None
        fam, off = found
        self._touch(fam, off)
        return fam.names[off]

    def is_fake(self, ip: IPAddress | str) -> bool:
        """True if `ip` is inside a configured fake range, mapped or not."""
        addr = _address(ip)
        if addr.version == 4:
            return addr in self._v4.network
        return self._v6 is not None and addr in self._v6.network

    def pin(self, ip: IPAddress | str) -> str | None:
        """Hold the mapping of `ip` for a live flow; return its domain.

        Returns None (and pins nothing) if `ip` is not a mapped fake IP. Pins
        count: every `pin` that returned a name needs one `unpin`. Counts as
        use.
        """
        found = self._find(ip)
        if found is None:
            return None
        fam, off = found
        count = fam.pins.get(off, 0)
        if count == 0:
            fam.unlink(off)
            if fam.stale:
                fam.stale.discard(off)
        fam.pins[off] = count + 1
        self._mark(fam, off)
        return fam.names[off]

    def unpin(self, ip: IPAddress | str) -> None:
        """Release one pin; the last one makes the mapping most recently used.

        An unpin without a matching pin is counted (stats "unbalanced_unpins")
        and otherwise ignored: it runs in flow teardown paths that must not
        fail.
        """
        found = self._find(ip)
        count = 0 if found is None else found[0].pins.get(found[1], 0)
        if found is None or count == 0:
            self._unbalanced_unpins += 1
            return
        fam, off = found
        if count == 1:
            del fam.pins[off]
            fam.link_tail(off)
        else:
            fam.pins[off] = count - 1
        self._mark(fam, off)

    def drop(self, predicate: Callable[[str], bool]) -> int:
        """Remove every unpinned mapping whose domain matches; return how many.

        For a config reload that widened the fake-IP filter. Pinned matches
        stay (their flows keep working) and age out through LRU recycling.
        """
        removed = 0
        for fam in self._families:
            doomed = [
                (name, off)
                for name, off in fam.by_name.items()
                if off not in fam.pins and predicate(name)
            ]
            for name, off in doomed:
                self._unbind(fam, name, off)
                fam.free.append(off)
            removed += len(doomed)
        self._dropped += removed
        return removed

    def __len__(self) -> int:
        return sum(len(fam.by_name) for fam in self._families)

    def stats(self) -> dict[str, int]:
        """Counters for the control API and /metrics."""
        v6 = self._v6
        return {
            "size4": len(self._v4.by_name),
            "size6": len(v6.by_name) if v6 else 0,
            "capacity4": self._v4.capacity,
            "capacity6": v6.capacity if v6 else 0,
            "pinned": sum(len(fam.pins) for fam in self._families),
            "pins": sum(sum(fam.pins.values()) for fam in self._families),
            "recycled": self._recycled,
            "exhausted": self._exhausted,
            "dropped": self._dropped,
            "unbalanced_unpins": self._unbalanced_unpins,
            "loaded": self._loaded,
            "load_dropped": self._load_dropped,
            "pending": self.pending_count(),
            "quarantined": sum(len(f.quarantine) - f.q_pos for f in self._families),
            "quarantine_cut_short": self._cut_short,
            "reuse_over_budget": self._over_budget,
            "ledger_failures": self._ledger_failures,
            "kernel_spared": self._kernel_spared,
        }

    def mappings(self) -> Iterator[tuple[str, IPAddress, int]]:
        """Every mapping as (domain, fake IP, pin count); IPv4 first, each
        family in allocation order. Does not count as use.

        A snapshot taken at the call, so a caller may await between items
        while the pool keeps changing.
        """
        snapshot = [
            (name, fam.address(off), fam.pins.get(off, 0))
            for fam in self._families
            for name, off in fam.by_name.items()
        ]
        return iter(snapshot)

    def lru_order(self, family: int = 4) -> list[str]:
        """Unpinned domains of `family`, least recently used first (O(n))."""
        fam = self._family(family)
        out: list[str] = []
        off = fam.nxt[0]
        while off:
            name = fam.names[off]
            assert name is not None
            out.append(name)
            off = fam.nxt[off]
        return out

    # -- persistence --------------------------------------------------------

    def pending_count(self) -> int:
        return len(self._deletes) + sum(len(fam.pending) for fam in self._families)

    def take_pending(self) -> list[Change]:
        """Swap out the pending changes as one batch for `MappingStore.write`.

        Rows are `(family, address int, domain or None, last_used)`; None
        frees the address. Writing the batch atomically brings the store to
        the pool's state as of this call. Cheap: call it on the trio thread,
        write in a worker thread.
        """
        batch: list[Change] = [(family, value, None, 0) for family, value in self._deletes]
        self._deletes = []
        clock = self._clock
        for fam in self._families:
            if not fam.pending:
                continue
            names, version, net = fam.names, fam.version, fam.net
            for off in fam.pending:
                name = names[off]
                if name is None:
                    batch.append((version, net + off, None, 0))
                else:
                    batch.append((version, net + off, name, clock))
                    clock += 1
            fam.pending = {}
        self._clock = clock
        self._reuses_taken = self._reuses
        return batch

    def flushed(self) -> None:
        """The batch from the last `take_pending` is on disk: recycles up to
        that point can no longer be lost (see `reuse_budget`)."""
        self._reuses_durable = self._reuses_taken

    def requeue(self, batch: Iterable[Change]) -> None:
        """Put a batch whose write failed back, so the next flush retries it.

        The rows are re-marked dirty ahead of anything changed since, and
        re-read from current state at the next `take_pending`.
        """
        if not self._record:
            return
        front: dict[int, dict[int, None]] = {fam.version: {} for fam in self._families}
        for family, value, _name, _used in batch:
            fam = self._v4 if family == 4 else self._v6
            off = fam.offset_of(value) if fam is not None else None
            if fam is None or off is None or off >= len(fam.names):
                self._deletes.append((family, value))
            elif off not in fam.pending:
                front[fam.version][off] = None
        for fam in self._families:
            merged = front[fam.version]
            merged.update(fam.pending)
            fam.pending = merged

    def flush(self) -> int:
        """Write pending changes to the store synchronously; return the row count.

        For shutdown paths outside trio and for tests; the service uses
        flusher.serve, which writes off the event loop.
        """
        if self._store is None:
            return 0
        batch = self.take_pending()
        if batch:
            try:
                self._store.write(batch)
            except BaseException:
                self.requeue(batch)
                raise
        self.flushed()
        return len(batch)

    # -- the ledger -----------------------------------------------------------

    @property
    def ledger(self) -> Ledger | None:
        return self._ledger

    def ledger_state(self, clean: bool) -> LedgerState:
        """What the ledger should say now; `clean` for the last write of a run
        that ended with everything written. A clean store-less state also
        lists every mapped address, least recently used first (pinned last),
        so the next run reuses the oldest first."""
        families: dict[int, FamilyLedger] = {}
        for fam in self._families:
            recent = None
            if clean and self._store is None:
                recent = []
                off = fam.nxt[0]
                while off:
                    recent.append(off)
                    off = fam.nxt[off]
                recent.extend(fam.pins)
            issued = fam.cursor if clean else min(fam.reserved, fam.capacity + 1)
            families[fam.version] = FamilyLedger(str(fam.network), issued, recent)
        return LedgerState(clean, families)

    def _open_ledger(self, ledger: Ledger) -> None:
        """Quarantine what the last run may have left in clients' caches and
        reserve the first block (a synchronous write: before any answer)."""
        prev = ledger.load()
        unclean = prev is not None and not prev.clean
        for fam in self._families:
            entry = prev.families.get(fam.version) if prev is not None else None
            if entry is not None and entry.range != str(fam.network):
                entry = None  # another range: the old addresses are not ours
            issued = min(entry.issued, fam.capacity + 1) if entry is not None else 0
            # Addresses that held a name and hold none now (drops, filtered
            # or range-limited rows): never hand them out as if fresh.
            holes = [off for off in range(1, fam.cursor) if fam.names[off] is None]
            held: list[int] = []
            if self._store is None:
                recent = [o for o in (entry.recent or ()) if 1 <= o < issued] if entry else []
                seen = set(recent)
                held = [o for o in range(1, issued) if o not in seen] + recent
            else:
                # The last run handed out fresh addresses first, then free
                # ones (the holes), then recycled the LRU head: those it may
                # have reissued after its last flush. Safest first is the
                # reverse of that order.
                head: list[int] = []
                # Only a run whose cursor could reach the range's end has
                # recycled anything (fresh addresses come first).
                if entry is not None and unclean and entry.issued > fam.capacity:
                    off = fam.nxt[0]
                    while off and len(head) < self._reuse_budget:
                        head.append(off)
                        off = fam.nxt[off]
                    for off in head:
                        name = fam.names[off]
                        assert name is not None
                        self._unbind(fam, name, off)
                tail = list(range(fam.cursor, issued))
                held = head[::-1] + holes[::-1] + tail[::-1]
            held_set = set(held)
            fam.free = collections.deque(o for o in fam.free if o not in held_set)
            fam.grow_to(max(issued, fam.cursor))
            fam.cursor = len(fam.names)
            fam.quarantine = array("i", held)
            fam.q_pos = 0
            if held:
                fam.stale = set(fam.by_name.values())
                log.info(
                    "fake-IP pool: %d addresses of %s held back (possibly still in clients'"
                    " caches under an old name)", len(held), fam.network,
                )
            fam.reserved = fam.cursor
        for fam in self._families:
            fam.reserved = min(fam.cursor + _block(fam), fam.capacity + 1)
        # Before serving: a failure here is the caller's (it cannot start
        # with a promise it cannot keep).
        ledger.write(self.ledger_state(clean=False))

    def _reserve(self, fam: _Family) -> bool:
        """Move the family's high-water mark a block ahead, durably. False
        (logged once per failure streak) when the ledger cannot be written."""
        assert self._ledger is not None
        old = fam.reserved
        fam.reserved = min(fam.cursor + _block(fam), fam.capacity + 1)
        try:
            self._ledger.write(self.ledger_state(clean=False))
        except OSError as err:
            fam.reserved = old
            self._ledger_failures += 1
            if self._ledger_failures == 1:
                log.warning("fake-IP ledger write failed (%s): no new addresses until it"
                            " works again", err)
            return False
        if self._ledger_failures:
            log.info("fake-IP ledger writes work again")
            self._ledger_failures = 0
        return True

    # -- internals ----------------------------------------------------------

    def _family(self, family: int) -> _Family:
        if family == 4:
            return self._v4
        if family == 6:
            if self._v6 is None:
                raise ValueError("no fake-ip-range6 configured")
            return self._v6
        raise ValueError(f"unknown address family {family!r}")

    def _find(self, ip: IPAddress | str) -> tuple[_Family, int] | None:
        addr = _address(ip)
        fam = self._v4 if addr.version == 4 else self._v6
        if fam is None:
            return None
        off = fam.mapped_offset(int(addr))
        return None if off is None else (fam, off)

    def _touch(self, fam: _Family, off: int) -> None:
        if off not in fam.pins:
            fam.unlink(off)
            fam.link_tail(off)
            if fam.stale:
                fam.stale.discard(off)
        if self._record:
            fam.pending.pop(off, None)
            fam.pending[off] = None

    def _mark(self, fam: _Family, off: int) -> None:
        if self._record:
            fam.pending.pop(off, None)
            fam.pending[off] = None

    def _unbind(self, fam: _Family, name: str, off: int) -> None:
        """Forget an unpinned mapping (its offset is left for the caller).

        Every path that frees an address (recycle, drop, load clean-up)
        comes here, so the mirror's entry goes before the address can be
        given to another name."""
        if self._mirror is not None:
            self._mirror.unbound(fam.version, name)
        del fam.by_name[name]
        fam.names[off] = None
        fam.unlink(off)
        self._mark(fam, off)

    def _new_offset(self, fam: _Family) -> int:
        """The address for a new mapping, safest first: never issued, free,
        (a loaded mapping unused since the restart | quarantined, once its
        time is up), quarantined early, the least recently used mapping."""
        if fam.cursor <= fam.capacity and (fam.cursor < fam.reserved or self._reserve(fam)):
            off = fam.cursor
            fam.cursor += 1
            fam.names.append(None)
            fam.prv.append(0)
            fam.nxt.append(0)
            return off
        if fam.free:
            return fam.free.popleft()
        victim = fam.nxt[0]
        if self._mirror is not None:
            victim = self._spare_kernel_hits(fam, victim)
        if fam.q_pos < len(fam.quarantine):
            if self._clock_fn() >= self._quarantine_until:
                fam.stale.clear()
                return self._take_quarantined(fam)
            if not (victim and victim in fam.stale):
                self._cut_short += 1
                self._log_cut_short(fam)
                return self._take_quarantined(fam)
        if victim == 0:
            self._exhausted += 1
            raise PoolExhausted(
                f"all {fam.capacity} fake IPs of {fam.network} are pinned by live flows"
            )
        if self._store is not None and self._ledger is not None \
                and self._reuses - self._reuses_durable >= self._reuse_budget:
            self._over_budget += 1
            raise PoolExhausted(
                f"{self._reuse_budget} fake IPs of {fam.network} recycled since the store's"
                " last completed flush: waiting for the store"
            )
        name = fam.names[victim]
        assert name is not None
        self._unbind(fam, name, victim)
        self._recycled += 1
        self._reuses += 1
        return victim

    def _spare_kernel_hits(self, fam: _Family, victim: int) -> int:
        """The LRU head after moving up to _KERNEL_SPARES mappings that the
        kernel answered since they were last checked to the tail (as if
        used now): names answered only in the kernel are not unused."""
        mirror = self._mirror
        assert mirror is not None
        for _ in range(_KERNEL_SPARES):
            name = fam.names[victim] if victim else None
            if name is None or not mirror.hit_since_check(fam.version, name):
                break
            self._kernel_spared += 1
            fam.unlink(victim)
            fam.link_tail(victim)
            if fam.stale:
                fam.stale.discard(victim)
            self._mark(fam, victim)
            victim = fam.nxt[0]
        return victim

    def _take_quarantined(self, fam: _Family) -> int:
        off = fam.quarantine[fam.q_pos]
        fam.q_pos += 1
        if fam.q_pos == len(fam.quarantine):
            fam.quarantine = array("i")
            fam.q_pos = 0
            fam.stale.clear()
        return off

    def _log_cut_short(self, fam: _Family) -> None:
        now = self._clock_fn()
        if now - self._cut_short_logged_at >= _CUT_SHORT_LOG_INTERVAL:
            self._cut_short_logged_at = now
            log.warning(
                "fake-IP range %s has no never-issued address left: handing out addresses"
                " issued before the restart early, oldest first (%d so far)",
                fam.network, self._cut_short,
            )

    def _load(self, rows: Iterable[Row], keep: Callable[[str], bool] | None) -> None:
        """Rebuild state from saved rows (any order): LRU order by last_used."""
        ordered: Sequence[Row] = sorted(rows, key=lambda row: row[3])
        clock = 0
        for family, value, domain, last_used in ordered:
            clock = max(clock, last_used)
            fam = self._v4 if family == 4 else self._v6 if family == 6 else None
            off = fam.offset_of(value) if fam is not None else None
            if fam is None or off is None:
                # Range changed (or shrank under max_mappings): the address
                # cannot be ours any more.
                self._deletes.append((family, value))
                self._load_dropped += 1
                continue
            fam.grow_to(off + 1)
            try:
                name = normalise(domain)
            except ValueError:
                name = ""
            if not name or (keep is not None and not keep(name)):
                # The filter now covers it (or the row is junk): free the
                # address and delete the row at the next flush.
                self._mark(fam, off)
                self._load_dropped += 1
                continue
            old = fam.by_name.get(name)
            if old is not None:
                # Same name twice (a store without a unique constraint): the
                # later row is the more recently used one; it wins.
                self._unbind(fam, name, old)
            if fam.names[off] is not None:
                # Same address twice: keep the more recent row.
                other = fam.names[off]
                assert other is not None
                self._unbind(fam, other, off)
            fam.by_name[name] = off
            fam.names[off] = name
            fam.link_tail(off)
            if name != domain:
                self._mark(fam, off)
            self._loaded += 1
        self._clock = clock + 1
        for fam in self._families:
            fam.cursor = len(fam.names)
            # Holes below the cursor (drops, filtered rows) are free again.
            fam.free.extend(off for off in range(1, fam.cursor) if fam.names[off] is None)
        if self._loaded or self._load_dropped:
            log.info(
                "fake-IP store: loaded %d mappings, dropped %d (range changed or now filtered)",
                self._loaded,
                self._load_dropped,
            )


def _block(fam: _Family) -> int:
    """Addresses reserved per ledger write: `RESERVE_BLOCK`, but at most 1/64
    of the range, so a crash over-reserves a small part of a small range
    (a /28 writes the ledger before each new address, a /16 every 256)."""
    return max(1, min(RESERVE_BLOCK, fam.capacity // 64))


def _address(ip: IPAddress | str) -> IPAddress:
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if addr.version == 6:
        assert isinstance(addr, ipaddress.IPv6Address)
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr
