"""One contract test against every MappingStore, plus SQLite specifics and the flusher."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
import trio
import trio.testing

from appliance.fakeip import (
    Change,
    FakeIPPool,
    MappingStore,
    MemoryStore,
    Row,
    SQLiteStore,
    flusher,
    store_path,
)

R4 = IPv4Network("198.18.0.0/16")
R6 = IPv6Network("fd00:18::/64")

# A factory returns the store as a new process would see it ("reopen").
Reopen = Callable[[], MappingStore]


@pytest.fixture(params=["memory", "sqlite"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Reopen]:
    opened: list[MappingStore] = []
    if request.param == "memory":
        memory = MemoryStore()

        def factory() -> MappingStore:
            return memory

    else:

        def factory() -> MappingStore:
            for store in opened:
                store.close()
            opened.clear()
            store = SQLiteStore(store_path(tmp_path))
            opened.append(store)
            return store

    yield factory
    for store in opened:
        store.close()


def state(pool: FakeIPPool) -> set[tuple[str, str]]:
    return {(name, str(ip)) for name, ip, _ in pool.mappings()}


def saved(store: MappingStore) -> set[tuple[int, str, str]]:
    rows = list(store.load())
    addrs = [(fam, addr) for fam, addr, _, _ in rows]
    names = [(fam, name) for fam, _, name, _ in rows]
    assert len(set(addrs)) == len(addrs), "an address saved twice"
    assert len(set(names)) == len(names), "a domain saved twice"
    return {
        (fam, name, str(IPv4Address(addr) if fam == 4 else IPv6Address(addr)))
        for fam, addr, name, _ in rows
    }


# -- contract -------------------------------------------------------------------


def test_empty_store_loads_nothing(reopen: Reopen) -> None:
    assert list(reopen().load()) == []
    assert len(FakeIPPool(R4, R6, store=reopen())) == 0


def test_round_trip_keeps_mappings_and_lru_order(reopen: Reopen) -> None:
    pool = FakeIPPool(R4, R6, store=reopen())
    for i in range(50):
        pool.allocate(f"n{i}.example")
        pool.allocate(f"n{i}.example", 6)
    pool.lookup("n3.example")
    pool.reverse("198.18.0.1")  # n0
    pool.pin("198.18.0.10")  # n9: pin is use
    pool.flush()
    order4 = pool.lru_order(4)
    before = state(pool)

    again = FakeIPPool(R4, R6, store=reopen())
    assert state(again) == before
    assert again.stats()["loaded"] == 100
    # Pins are per process: none after a restart; order is as of the flush.
    assert again.stats()["pinned"] == 0
    assert again.lru_order(4) == [*order4, "n9.example"]
    assert again.lru_order(4)[-3:] == ["n3.example", "n0.example", "n9.example"]
    # The reloaded pool continues where the old one stopped.
    assert again.allocate("new.example") == IPv4Address("198.18.0.51")


def test_range_change_drops_saved_mappings(reopen: Reopen) -> None:
    pool = FakeIPPool(IPv4Network("10.0.0.0/16"), R6, store=reopen())
    for i in range(300):
        pool.allocate(f"n{i}")
    pool.allocate("v6", 6)
    pool.flush()

    # Shrunk to /24: .1 .. .254 survive, the rest and the IPv6 range go.
    smaller = FakeIPPool(IPv4Network("10.0.0.0/24"), None, store=reopen())
    assert len(smaller) == 254
    assert smaller.lookup("n0") == IPv4Address("10.0.0.1")
    assert smaller.lookup("n254") is None
    assert smaller.stats()["load_dropped"] == 300 - 254 + 1
    smaller.flush()
    assert len(saved(reopen())) == 254

    # Moved elsewhere: nothing survives, and the rows are deleted.
    moved = FakeIPPool(IPv4Network("198.18.0.0/16"), None, store=reopen())
    assert len(moved) == 0
    moved.flush()
    assert saved(reopen()) == set()


def test_keep_predicate_drops_filtered_names(reopen: Reopen) -> None:
    pool = FakeIPPool(R4, R6, store=reopen())
    for name in ("a.lan", "b.example", "c.lan", "d.example"):
        pool.allocate(name)
    pool.allocate("e.lan", 6)
    pool.flush()

    kept = FakeIPPool(R4, R6, store=reopen(), keep=lambda d: not d.endswith(".lan"))
    assert {name for name, _, _ in kept.mappings()} == {"b.example", "d.example"}
    # Filtered addresses are free again, after the never-used ones.
    kept.flush()
    assert {name for _, name, _ in saved(reopen())} == {"b.example", "d.example"}
    names = [f"x{i}" for i in range(R4.num_addresses - 2 - 2)]
    ips = [kept.allocate(n) for n in names]
    assert IPv4Address("198.18.0.1") in ips  # a.lan's address, reused last
    assert kept.stats()["recycled"] == 0


def test_recycled_address_is_saved_for_its_new_domain_only(reopen: Reopen) -> None:
    net = IPv4Network("10.0.0.0/30")  # two addresses
    pool = FakeIPPool(net, store=reopen())
    a = pool.allocate("a")
    b = pool.allocate("b")
    pool.flush()
    # Between two flushes: recycle a's address to c, then a comes back on b's.
    assert pool.allocate("c") == a
    assert pool.allocate("a") == b
    pool.flush()
    assert saved(reopen()) == {(4, "c", str(a)), (4, "a", str(b))}
    again = FakeIPPool(net, store=reopen())
    assert state(again) == {("c", str(a)), ("a", str(b))}
    # And across flushes: each recycling replaces the row of the address.
    for i in range(20):
        again.allocate(f"r{i}")
        again.flush()
        assert again.store is not None
        rows = saved(again.store)
        assert len(rows) == 2
        assert {(4, name, ip) for name, ip in state(again)} == rows


def test_unflushed_changes_are_not_in_the_store(reopen: Reopen) -> None:
    pool = FakeIPPool(R4, store=reopen())
    pool.allocate("flushed")
    pool.flush()
    pool.allocate("pending")
    assert {name for _, name, _ in saved(reopen())} == {"flushed"}


class ListStore:
    """A store with neither normalised names nor unique constraints."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.batches: list[list[Change]] = []

    def load(self) -> Iterable[Row]:
        return list(self.rows)

    def write(self, batch: Iterable[Change]) -> None:
        self.batches.append(list(batch))

    def close(self) -> None:
        pass


def test_load_repairs_duplicates_and_unnormalised_names() -> None:
    base = int(IPv4Address("198.18.0.0"))
    store = ListStore(
        [
            (4, base + 1, "Dup.Example.", 5),
            (4, base + 2, "dup.example", 9),  # more recent: wins
            (4, base + 3, "", 1),  # junk
            (7, 1, "odd-family", 1),
        ]
    )
    pool = FakeIPPool(R4, store=store)
    assert state(pool) == {("dup.example", "198.18.0.2")}
    batch = pool.take_pending()
    assert (4, base + 1, None, 0) in batch
    assert (4, base + 3, None, 0) in batch
    assert (7, 1, None, 0) in batch
    # Holes are reused after the cursor runs out, not before.
    assert pool.allocate("next") == IPv4Address("198.18.0.4")


# -- SQLite specifics -------------------------------------------------------------


def test_sqlite_is_wal_and_one_transaction_per_flush(tmp_path: Path) -> None:
    statements: list[str] = []
    path = store_path(tmp_path)
    store = SQLiteStore(path, trace=statements.append)
    pool = FakeIPPool(R4, R6, store=store)
    statements.clear()
    for flush in range(3):
        for i in range(1000):
            pool.allocate(f"n{flush}-{i}")
            pool.lookup(f"n{flush}-{i}")
            pool.reverse(f"198.18.0.{i % 200 + 1}")
        pool.flush()
    pool.flush()  # nothing pending: no transaction at all
    begins = [s for s in statements if s.startswith("BEGIN")]
    commits = [s for s in statements if s == "COMMIT"]
    assert len(begins) == len(commits) == 3
    assert store.writes == 3
    store.close()

    # An independent connection sees WAL mode and every row.
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM mapping").fetchone()[0] == 3000
        row = conn.execute(
            "SELECT address, domain FROM mapping WHERE domain = 'n0-0'"
        ).fetchone()
        assert row == (bytes([198, 18, 0, 1]), "n0-0")
    finally:
        conn.close()


def test_sqlite_corrupt_file_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = store_path(tmp_path)
    path.write_bytes(b"this is not an SQLite database" * 100)
    with SQLiteStore(path) as store:
        assert store.load() == []
        store.write([(4, int(IPv4Address("198.18.0.1")), "a", 1)])
    assert [p.name for p in tmp_path.glob("*.broken-*")]
    assert "unusable" in caplog.text
    with SQLiteStore(path) as store:
        assert [row[2] for row in store.load()] == ["a"]


def test_sqlite_failed_write_changes_nothing(tmp_path: Path) -> None:
    path = store_path(tmp_path)
    with SQLiteStore(path) as store:
        store.write([(4, 1, "a", 1)])
        # A row with a non-text domain fails inside the transaction.
        bad: list[Change] = [(4, 2, "b", 2), (4, 3, object(), 3)]  # type: ignore[list-item]
        with pytest.raises(sqlite3.Error):
            store.write(bad)
        assert [row[2] for row in store.load()] == ["a"]
        store.write([(4, 2, "b", 2)])  # and the connection is still usable
        assert sorted(row[2] for row in store.load()) == ["a", "b"]


# -- flusher ----------------------------------------------------------------------


def jump_when_idle(clock: trio.testing.MockClock) -> None:
    """Autojump virtual time, but only after 0.2 s of real idleness: a
    store write runs in a worker thread, and trio counts a task waiting for a
    thread as idle; a zero threshold would jump past the write."""
    clock.autojump_threshold = 0.2


class FlakyStore(MemoryStore):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def write(self, batch: Iterable[Change]) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        super().write(batch)


async def test_flusher_writes_batches_every_interval(mock_clock: trio.testing.MockClock) -> None:
    jump_when_idle(mock_clock)
    store = MemoryStore()
    pool = FakeIPPool(R4, store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.serve, pool, 1.0)
        for i in range(100):
            pool.allocate(f"n{i}")
        await trio.sleep(1.5)
        assert store.writes == 1
        assert len(store.load()) == 100
        await trio.sleep(5)  # nothing pending: no writes
        assert store.writes == 1
        pool.lookup("n5")
        await trio.sleep(1)
        assert store.writes == 2
        nursery.cancel_scope.cancel()


async def test_flusher_final_flush_on_shutdown(mock_clock: trio.testing.MockClock) -> None:
    jump_when_idle(mock_clock)
    store = MemoryStore()
    pool = FakeIPPool(R4, store=store)
    with trio.move_on_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(flusher.serve, pool, 3600.0)
            pool.allocate("late.example")
            nursery.cancel_scope.cancel()
    assert [row[2] for row in store.load()] == ["late.example"]
    assert pool.pending_count() == 0


async def test_flusher_retries_after_failed_writes(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    jump_when_idle(mock_clock)
    store = FlakyStore(failures=2)
    pool = FakeIPPool(R4, store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.serve, pool, 1.0)
        pool.allocate("a")
        await trio.sleep(1.5)
        pool.allocate("b")  # changed while the first batch is waiting
        await trio.sleep(1)
        assert store.load() == []
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert store.attempts == 3
    assert {row[2] for row in store.load()} == {"a", "b"}
    assert "write failed" in caplog.text


async def test_flusher_without_store_returns() -> None:
    pool = FakeIPPool(R4)
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.serve, pool, 1.0)
    with pytest.raises(ValueError):
        await flusher.serve(pool, 0)
