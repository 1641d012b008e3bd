"""A fake IP never changes name behind a client's back across a restart.

One contract runs against every store (none, memory, SQLite; mihomo's
pool_test.go habit): after a clean restart or a crash, an address handed out
before it is not given to another name while a safer address exists, and a
crashed run's unflushed tail is never reloaded under a stale name. Then the
ledger's own guarantees: write-ahead (the file is ahead of every answer), the
reuse budget, ranges, and the file format.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import trio
import trio.testing

from appliance.fakeip import (
    FakeIPPool,
    FileLedger,
    MappingStore,
    MemoryLedger,
    MemoryStore,
    PoolExhausted,
    SQLiteStore,
    flusher,
    ledger_path,
    store_path,
)
from appliance.fakeip.ledger import RESERVE_BLOCK, LedgerState

R16 = IPv4Network("198.18.0.0/16")
R29 = IPv4Network("198.18.0.0/29")  # 6 addresses


class Appliance:
    """One pool per "process"; the store and ledger play the disk between them."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        self.memory = MemoryStore()
        self.ledger = MemoryLedger()
        self.store: MappingStore | None = None
        self.now = 0.0

    def start(self, network: IPv4Network = R16, **kw: object) -> FakeIPPool:
        if self.store is not None and self.kind == "sqlite":
            self.store.close()
        if self.kind == "memory":
            self.store = self.memory
        elif self.kind == "sqlite":
            self.store = SQLiteStore(store_path(self.tmp))
        return FakeIPPool(network, store=self.store, ledger=self.ledger,
                          clock=lambda: self.now, **kw)  # type: ignore[arg-type]

    def stop(self, pool: FakeIPPool) -> None:
        """A clean exit: final flush, then the clean ledger (as flusher.serve)."""
        pool.flush()
        self.ledger.write(pool.ledger_state(clean=True))

    def close(self) -> None:
        if self.store is not None and self.kind == "sqlite":
            self.store.close()


@pytest.fixture(params=["none", "memory", "sqlite"])
def appliance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(request.param, tmp_path)
    yield app
    app.close()


def handed_out(pool: FakeIPPool) -> dict[str, str]:
    return {name: str(ip) for name, ip, _ in pool.mappings()}


# -- the contract, against every store -----------------------------------------------


def test_clean_restart_gives_new_names_never_issued_addresses(appliance: Appliance) -> None:
    pool = appliance.start()
    before = {f"n{i}.example": str(pool.allocate(f"n{i}.example")) for i in range(20)}
    appliance.stop(pool)
    pool = appliance.start()
    fresh = {str(pool.allocate(f"new{i}.example")) for i in range(20)}
    assert not fresh & set(before.values())
    if appliance.kind != "none":
        # With a store the old names keep their addresses.
        assert {n: str(pool.lookup(n)) for n in before} == before
    else:
        assert all(pool.reverse(ip) is None for ip in before.values())


def test_crash_right_after_a_new_mapping_never_reissues_its_address(
    appliance: Appliance,
) -> None:
    pool = appliance.start()
    for i in range(5):
        pool.allocate(f"old{i}.example")
    pool.flush()
    late = str(pool.allocate("late.example"))  # answered, never flushed: then kill -9
    pool = appliance.start()
    assert pool.reverse(late) is None  # no stale name comes back on it
    assert str(pool.allocate("next.example")) != late
    assert all(str(pool.allocate(f"more{i}.example")) != late for i in range(50))


def test_crash_after_a_recycle_never_reloads_the_old_name(appliance: Appliance) -> None:
    """A full range: the new name took the least recently used address, and
    the process died before the flush. The address must not come back under
    its old name (the client that just got it would reach the wrong site)."""
    pool = appliance.start(R29)
    for i in range(6):
        pool.allocate(f"n{i}.example")
    pool.flush()
    for i in range(1, 6):
        pool.lookup(f"n{i}.example")  # n0 is the least recently used
    recycled = str(pool.allocate("late.example"))
    assert recycled == "198.18.0.1"
    pool = appliance.start(R29)
    assert pool.reverse(recycled) is None
    # The next new name takes an address whose owner is older than the
    # crash (a loaded mapping nobody used since) before the doubtful one.
    if appliance.kind != "none":
        assert str(pool.allocate("next.example")) != recycled


def test_full_range_store_less_restart_reuses_oldest_first(tmp_path: Path) -> None:
    app = Appliance("none", tmp_path)
    pool = app.start(R29)
    ips = [str(pool.allocate(f"n{i}.example")) for i in range(6)]
    for i in (3, 1, 5, 0, 4, 2):  # LRU order after this: 3 1 5 0 4 2
        pool.lookup(f"n{i}.example")
    app.stop(pool)
    pool = app.start(R29)
    assert pool.stats()["quarantined"] == 6
    got = [str(pool.allocate(f"new{i}.example")) for i in range(6)]
    assert got == [ips[i] for i in (3, 1, 5, 0, 4, 2)]
    assert pool.stats()["quarantine_cut_short"] == 6


def test_quarantine_ends_after_its_time(tmp_path: Path) -> None:
    app = Appliance("memory", tmp_path)
    pool = app.start(R29, quarantine=60.0)
    for i in range(6):
        pool.allocate(f"n{i}.example")
    pool.flush()
    pool.allocate("late.example")  # recycles n0's address; crash
    pool = app.start(R29, quarantine=60.0)
    held = pool.stats()["quarantined"]
    assert held >= 1
    app.now += 61
    pool.allocate("after.example")
    stats = pool.stats()
    assert stats["quarantined"] == held - 1 and stats["quarantine_cut_short"] == 0


def test_write_ahead_every_answer_is_below_the_ledger_mark(appliance: Appliance) -> None:
    pool = appliance.start()
    writes = appliance.ledger.writes
    for i in range(3 * RESERVE_BLOCK + 7):
        ip = pool.allocate(f"w{i}.example")
        state = appliance.ledger.state
        assert state is not None and not state.clean
        assert int(ip) - int(R16.network_address) < state.families[4].issued
    # One write per block, not per name.
    assert appliance.ledger.writes - writes <= 4


def test_a_changed_range_voids_the_ledger(appliance: Appliance) -> None:
    pool = appliance.start()
    for i in range(10):
        pool.allocate(f"n{i}.example")
    appliance.stop(pool)
    other = IPv4Network("198.19.0.0/16")
    pool = appliance.start(other)
    assert pool.stats()["quarantined"] == 0
    assert str(pool.allocate("x.example")) == "198.19.0.1"


# -- the reuse budget (stores only) ---------------------------------------------------


def test_recycling_waits_for_the_store_beyond_the_budget() -> None:
    store = MemoryStore()
    pool = FakeIPPool(R29, store=store, ledger=MemoryLedger(), reuse_budget=2)
    for i in range(6):
        pool.allocate(f"n{i}.example")
    pool.allocate("r1.example")
    pool.allocate("r2.example")
    with pytest.raises(PoolExhausted, match="waiting for the store"):
        pool.allocate("r3.example")
    assert pool.stats()["reuse_over_budget"] == 1
    pool.flush()
    pool.allocate("r3.example")


def test_unclean_start_quarantines_the_budget_of_the_lru_head() -> None:
    small = IPv4Network("198.18.0.0/28")  # 14 addresses: the mark reaches the end
    store, ledger = MemoryStore(), MemoryLedger()
    pool = FakeIPPool(small, store=store, ledger=ledger, reuse_budget=3)
    for i in range(14):
        pool.allocate(f"n{i}.example")
    pool.flush()  # then a crash: the ledger is not clean
    pool = FakeIPPool(small, store=store, ledger=ledger, reuse_budget=3)
    assert [pool.lookup(f"n{i}.example") for i in range(3)] == [None] * 3
    assert all(pool.lookup(f"n{i}.example") is not None for i in range(3, 14))


def test_unclean_start_of_a_range_not_used_up_keeps_every_flushed_mapping() -> None:
    """Nothing is recycled while never-issued addresses remain, so a crash
    costs only the unflushed tail, never a flushed mapping."""
    store, ledger = MemoryStore(), MemoryLedger()
    pool = FakeIPPool(R16, store=store, ledger=ledger, reuse_budget=3)
    before = {f"n{i}.example": pool.allocate(f"n{i}.example") for i in range(10)}
    pool.flush()  # then a crash
    pool = FakeIPPool(R16, store=store, ledger=ledger, reuse_budget=3)
    assert {n: pool.lookup(n) for n in before} == before


# -- the ledger file ------------------------------------------------------------------


def test_file_ledger_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    ledger = FileLedger(ledger_path(tmp_path))
    assert ledger.load() is None
    pool = FakeIPPool(R16, ledger=ledger)
    pool.allocate("a.example")
    ledger.write(pool.ledger_state(clean=True))
    state = ledger.load()
    assert state is not None and state.clean
    assert state.families[4].range == str(R16) and state.families[4].recent == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["fakeip-ledger.json"]


@pytest.mark.parametrize("junk", [b"", b"{", b'{"version": 9}', b'{"version": 1}', b"\xff"])
def test_unreadable_ledger_is_ignored_with_a_warning(
    tmp_path: Path, junk: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = ledger_path(tmp_path)
    path.write_bytes(junk)
    with caplog.at_level(logging.WARNING):
        pool = FakeIPPool(R16, ledger=FileLedger(path))
    assert "not a ledger" in caplog.text
    assert str(pool.allocate("a.example")) == "198.18.0.1"


def test_a_failing_ledger_write_stops_fresh_addresses_not_the_pool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky(MemoryLedger):
        fail = False

        def write(self, state: LedgerState) -> None:
            if self.fail:
                raise OSError("disk full")
            super().write(state)

    ledger = Flaky()
    pool = FakeIPPool(R16, ledger=ledger)
    for i in range(RESERVE_BLOCK):  # exactly the first block
        pool.allocate(f"n{i}.example")
    ledger.fail = True
    with caplog.at_level(logging.WARNING):
        # No fresh address without the mark on disk: the least recently
        # used mapping is recycled instead, as in a full range.
        assert str(pool.allocate("x0.example")) == "198.18.0.1"
        assert str(pool.allocate("x1.example")) == "198.18.0.2"
    assert pool.stats()["ledger_failures"] == 2
    assert caplog.text.count("ledger write failed") == 1
    ledger.fail = False
    assert str(pool.allocate("x2.example")) == "198.18.1.1"  # offset 257: fresh again


# -- the flusher writes the clean state -----------------------------------------------


@pytest.mark.parametrize("with_store", [False, True])
async def test_flusher_marks_the_ledger_clean_at_exit(tmp_path: Path, with_store: bool) -> None:
    ledger = FileLedger(ledger_path(tmp_path))
    store = SQLiteStore(store_path(tmp_path)) if with_store else None
    pool = FakeIPPool(R16, store=store, ledger=ledger)
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.serve, pool, 0.05)
        pool.allocate("a.example")
        await trio.sleep(0.1)
        state = ledger.load()
        assert state is not None and not state.clean
        nursery.cancel_scope.cancel()
    state = ledger.load()
    assert state is not None and state.clean
    assert (state.families[4].recent is None) == with_store
    if store is not None:
        store.close()

