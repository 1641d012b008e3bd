"""The fake-IP store after kill -9: exactly the last completed flush, consistent.

Each test runs a real child process with a real pool, SQLiteStore and the
flusher service under trio, kills it with SIGKILL, and then reads the SQLite
file back both through an independent sqlite3 connection and by loading a new
pool from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path

import pytest

from appliance.fakeip import FakeIPPool, SQLiteStore, store_path

ROOT = Path(__file__).resolve().parents[2]
R4 = "10.77.0.0/28"  # 14 addresses: phase 2 recycles phase 1's
R6 = "fd77::/124"  # 15 addresses

_COMMON = r"""
import hashlib, json, sys, time
from ipaddress import IPv4Network, IPv6Network
import trio
from appliance.fakeip import FakeIPPool, SQLiteStore, flusher

path, r4, r6, interval = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()
"""

# Phase 1 spreads many queries over several flushes, waits until an
# independent connection sees exactly the pool's state, and reports it.
# Phase 2 changes the pool without giving the flusher a chance to run (the
# event loop is blocked) and waits to be killed.
PHASES = _COMMON + r"""
import sqlite3
commits = 0
def trace(sql):
    global commits
    if sql == "COMMIT":
        commits += 1

store = SQLiteStore(path, trace=trace)
pool = FakeIPPool(IPv4Network(r4), IPv6Network(r6), store=store)

def snapshot():
    state = {str(ip): name for name, ip, _ in pool.mappings()}
    return state, {4: pool.lru_order(4), 6: pool.lru_order(6)}

def on_disk():
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT family, address, domain FROM mapping ORDER BY family, last_used").fetchall()
    finally:
        conn.close()
    from ipaddress import ip_address
    state = {str(ip_address(int.from_bytes(a, "big")) if f == 4 else
                 ip_address(int.from_bytes(a, "big"))): d for f, a, d in rows}
    order = {4: [d for f, _, d in rows if f == 4], 6: [d for f, _, d in rows if f == 6]}
    return state, order

async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.serve, pool, interval)
        queries = 0
        for rnd in range(20):
            for i in range(250):
                fam = 4 if i % 3 else 6
                name = f"p1-{(rnd * 7 + i) % 40}.Example."
                ip = pool.allocate(name, fam)
                pool.pin(ip)
                pool.lookup(name, fam)
                pool.reverse(ip)
                pool.unpin(ip)
                queries += 4
            await trio.sleep(interval / 2)
        want = snapshot()
        deadline = time.monotonic() + 10
        while True:
            got = on_disk()
            if ({**got[0]}, got[1]) == (want[0], {k: v for k, v in want[1].items()}):
                break
            assert time.monotonic() < deadline, "phase 1 never reached the disk"
            await trio.sleep(interval)
        say(phase=1, state=want[0], order=want[1], commits=commits, queries=queries,
            stats=pool.stats())
        # Phase 2: recycle most of phase 1's addresses; no checkpoint at all.
        for i in range(30):
            pool.allocate(f"p2-{i}.example", 4 if i % 2 else 6)
        pool.lookup("p1-0.example")
        say(phase=2, state={str(ip): name for name, ip, _ in pool.mappings()},
            pending=pool.pending_count())
        time.sleep(60)  # blocks the event loop: the flusher cannot run

trio.run(main)
"""

# Continuous churn with recycling and pins; every write announces the digest
# of the state it is about to commit ("begin") and then that it committed
# ("done"). The parent kills it at a random moment.
CHURN = _COMMON + r"""
import random
from appliance.fakeip import MemoryStore

def digest(rows):
    data = sorted((fam, addr, name) for fam, addr, name, _ in rows)
    return hashlib.sha256(repr(data).encode()).hexdigest()

class Recording(SQLiteStore):
    def __init__(self, path):
        super().__init__(path)
        self.mirror = MemoryStore()
        self.mirror.write([(f, a, d, u) for f, a, d, u in self.load()])

    def write(self, batch):
        batch = list(batch)
        self.mirror.write(batch)
        h = digest(self.mirror.load())
        say(event="begin", digest=h)
        super().write(batch)
        say(event="done", digest=h)

store = Recording(path)
say(event="start", digest=digest(store.load()))
pool = FakeIPPool(IPv4Network(r4), IPv6Network(r6), store=store)
rng = random.Random(int(sys.argv[5]))

async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.serve, pool, interval)
        pinned = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for _ in range(50):
                fam = rng.choice((4, 6))
                ip = pool.allocate(f"c{rng.randrange(100)}.example", fam)
                if rng.random() < 0.2 and len(pinned) < 8:
                    pool.pin(ip)
                    pinned.append(ip)
                elif pinned and rng.random() < 0.3:
                    pool.unpin(pinned.pop(rng.randrange(len(pinned))))
            await trio.sleep(0.002)

trio.run(main)
"""


class Child:
    """A child Python process whose stdout is read line by line with deadlines."""

    def __init__(self, script: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""

    def lines(self, timeout: float) -> Iterator[dict[str, object]]:
        """Yield JSON lines until EOF or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                yield json.loads(line)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child silent for {timeout} s: {self.stderr()}")
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    return
                self._buf += chunk

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def raw_rows(path: Path) -> list[tuple[int, str, str, int]]:
    """Rows through an independent connection: (family, ip, domain, last_used)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT family, address, domain, last_used FROM mapping").fetchall()
    finally:
        conn.close()
    return [(f, str(ip_address(int.from_bytes(a, "big"))), d, u) for f, a, d, u in rows]


def assert_consistent(rows: list[tuple[int, str, str, int]]) -> None:
    addrs = [(f, ip) for f, ip, _, _ in rows]
    names = [(f, d) for f, _, d, _ in rows]
    assert len(set(addrs)) == len(addrs), "an address belongs to two domains"
    assert len(set(names)) == len(names), "a domain holds two addresses"


def test_kill9_keeps_exactly_the_last_flush(tmp_path: Path) -> None:
    path = store_path(tmp_path)
    child = Child(PHASES, str(path), R4, R6, "0.05")
    try:
        events = child.lines(timeout=60)
        phase1 = next(events)
        assert phase1["phase"] == 1, phase1
        phase2 = next(events)
        assert phase2["phase"] == 2, phase2
        child.kill9()
    finally:
        child.close()

    state1 = phase1["state"]
    order1 = phase1["order"]
    assert isinstance(state1, dict)
    assert isinstance(order1, dict)
    # Phase 2 really changed the pool (recycling phase 1 addresses) and had
    # not been written.
    state2 = phase2["state"]
    assert isinstance(state2, dict)
    assert phase2["pending"]
    recycled = [ip for ip in state1 if state2.get(ip) != state1[ip]]
    assert len(recycled) >= 10

    rows = raw_rows(path)
    assert_consistent(rows)
    assert {ip: d for _, ip, d, _ in rows} == state1
    assert not [d for _, _, d, _ in rows if d.startswith("p2-")]

    # Loading a pool gives the same mappings and the same LRU order.
    with SQLiteStore(path) as store:
        pool = FakeIPPool(IPv4Network(R4), IPv6Network(R6), store=store)
        assert {str(ip): name for name, ip, _ in pool.mappings()} == state1
        assert pool.lru_order(4) == order1["4"]
        assert pool.lru_order(6) == order1["6"]

    # Writes are per flush, not per query.
    commits, queries = phase1["commits"], phase1["queries"]
    assert isinstance(commits, int)
    assert isinstance(queries, int)
    assert queries == 20_000
    assert 2 <= commits <= 200, commits
    assert commits * 50 < queries


def digest(rows: list[tuple[int, str, str, int]]) -> str:
    data = sorted((f, int(ip_address(ip)), d) for f, ip, d, _ in rows)
    return hashlib.sha256(repr(data).encode()).hexdigest()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_during_churn_leaves_a_flushed_state(tmp_path: Path, seed: int) -> None:
    path = store_path(tmp_path)
    rng = random.Random(seed)
    child = Child(CHURN, str(path), "10.78.0.0/27", "fd78::/123", "0.01", str(seed))
    began: str | None = None
    done: str | None = None
    dones = 0
    try:
        target = rng.randrange(3, 15)
        for event in child.lines(timeout=60):
            if event["event"] == "start":
                done = str(event["digest"])
            elif event["event"] == "begin":
                began = str(event["digest"])
            elif event["event"] == "done":
                done = str(event["digest"])
                dones += 1
                if dones == target:
                    break
        time.sleep(rng.uniform(0, 0.05))
        child.kill9()
        # Whatever it printed before it died still counts.
        for event in child.lines(timeout=10):
            if event["event"] == "begin":
                began = str(event["digest"])
            elif event["event"] == "done":
                done = str(event["digest"])
    finally:
        child.close()

    rows = raw_rows(path)
    assert_consistent(rows)
    # The last write that returned, or the one after it if its commit made it
    # to the file before the kill and its "done" line did not.
    assert digest(rows) in {done, began}
    with SQLiteStore(path) as store:
        pool = FakeIPPool(IPv4Network("10.78.0.0/27"), IPv6Network("fd78::/123"), store=store)
        assert len(pool) == len(rows)
