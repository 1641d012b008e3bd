"""Where fake-IP mappings survive a restart (`profile.store-fake-ip: true`).

The contract every store meets (tests/unit/test_fakeip_store.py runs one
contract test against each, like mihomo's pool_test.go):

* `load()` returns the saved rows `(family, address, domain, last_used)`:
  `family` is 4 or 6, `address` the fake IP as an int, `last_used` a counter
  whose order is the pool's least-recently-used order. At most one row per
  (family, address) and per (family, domain).
* `write(batch)` applies rows `(family, address, domain | None, last_used)` as
  ONE atomic transaction: a row with a domain maps the address to it, taking
  the address and the domain away from whatever rows held them before (so a
  recycled address can never load as belonging to two domains); a row with
  None frees the address. After a crash the store holds exactly the state of
  the last write that returned (SQLite: WAL + synchronous=FULL; a write cut
  short by the crash leaves no trace).
* `close()` releases the file. Stores are not thread-safe: one write at a time
  (the flusher guarantees it), which may run in any thread.

The pool never waits for a store while answering: it appends to its pending
buffer and the flusher hands whole batches to `write` in a worker thread, so
the disk sees one transaction per flush interval however many queries ran.
What a crash can lose: mappings made and uses recorded since the last
completed flush (at most one `store_flush_interval`); after a restart those
names simply get fresh fake IPs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# (family, address int, domain, last_used)
Row = tuple[int, int, str, int]
# (family, address int, domain or None to free the address, last_used)
Change = tuple[int, int, str | None, int]

SCHEMA_VERSION = 1
STORE_FILE = "fakeip.sqlite3"


class MappingStore(Protocol):
    """Persistence for FakeIPPool; see the module docstring for the contract."""

    def load(self) -> Iterable[Row]: ...

    def write(self, batch: Iterable[Change]) -> None: ...

    def close(self) -> None: ...


def store_path(state_dir: Path) -> Path:
    """The SQLite file under `appliance.state_dir`."""
    return state_dir / STORE_FILE


class MemoryStore:
    """A store that keeps rows in memory: no persistence across processes.

    The reference implementation of the contract (and what tests reload a
    pool from). `writes` counts write transactions.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[int, int], tuple[str, int]] = {}
        self._by_name: dict[tuple[int, str], int] = {}
        self.writes = 0

    def load(self) -> list[Row]:
        # Address order, like SQLite's primary key: recency must come from
        # last_used, never from the order rows happen to be kept in.
        return [
            (fam, addr, name, used) for (fam, addr), (name, used) in sorted(self._rows.items())
        ]

    def write(self, batch: Iterable[Change]) -> None:
        rows = dict(self._rows)
        by_name = dict(self._by_name)
        deletes: list[Change] = []
        upserts: list[Change] = []
        for change in batch:
            (deletes if change[2] is None else upserts).append(change)
        for family, addr, _, _ in deletes:
            old = rows.pop((family, addr), None)
            if old is not None:
                del by_name[(family, old[0])]
        for family, addr, name, used in upserts:
            assert name is not None
            old = rows.pop((family, addr), None)
            if old is not None:
                del by_name[(family, old[0])]
            other = by_name.pop((family, name), None)
            if other is not None:
                del rows[(family, other)]
            rows[(family, addr)] = (name, used)
            by_name[(family, name)] = addr
        # Swap at the end: a failing batch changes nothing.
        self._rows, self._by_name = rows, by_name
        self.writes += 1

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS mapping (
    family    INTEGER NOT NULL,
    address   BLOB    NOT NULL,   -- 4 or 16 bytes, network order
    domain    TEXT    NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (family, address),
    UNIQUE (family, domain)
) WITHOUT ROWID
"""


class SQLiteStore:
    """The fake-IP table in one SQLite file, WAL mode, stdlib sqlite3.

    Owns the connection (opened in the constructor, closed by `close`, usable
    from any one thread at a time). Each `write` is one
    BEGIN IMMEDIATE .. COMMIT; with `synchronous=FULL` (default) a completed
    write survives power loss too, with "NORMAL" it survives a process crash
    and may lose the last writes on power loss. A file that is not a readable
    Mirage store (corrupt, or another schema) is renamed aside with a warning
    and a fresh store is started: the table is a cache of allocations, never
    worth refusing to start over. `trace` receives every SQL statement run
    (tests count transactions with it); `writes` counts committed writes.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        trace: Callable[[str], None] | None = None,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(path)
        self._synchronous = synchronous
        self._trace = trace
        self.writes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            self._set_aside(exc)
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; write() issues its
        # own BEGIN/COMMIT so there is exactly one transaction per batch.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if self._trace is not None:
                conn.set_trace_callback(self._trace)
            conn.execute("PRAGMA busy_timeout = 5000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"journal_mode WAL refused ({mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"unknown store schema version {version}")
            conn.execute(_SCHEMA)
            if version == 0:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # Reading the table once proves the file is usable.
            conn.execute("SELECT count(*) FROM mapping").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_aside(self, exc: Exception) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.broken-{stamp}")
        log.warning(
            "fake-IP store %s unusable (%s): moved to %s, starting empty", self.path, exc, aside
        )
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{aside}{suffix}"))

    def load(self) -> list[Row]:
        cur = self._conn.execute("SELECT family, address, domain, last_used FROM mapping")
        return [
            (family, int.from_bytes(address, "big"), domain, last_used)
            for family, address, domain, last_used in cur
        ]

    def write(self, batch: Iterable[Change]) -> None:
        deletes: list[tuple[int, bytes]] = []
        upserts: list[tuple[int, bytes, str, int]] = []
        for family, addr, name, used in batch:
            packed = addr.to_bytes(4 if family == 4 else 16, "big")
            if name is None:
                deletes.append((family, packed))
            else:
                upserts.append((family, packed, name, used))
        if not deletes and not upserts:
            return
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Frees first; then REPLACE, which also deletes a stale row that
            # still holds the domain at another address (UNIQUE conflict), so
            # neither an address nor a domain can end up in two rows.
            conn.executemany("DELETE FROM mapping WHERE family = ? AND address = ?", deletes)
            conn.executemany(
                "INSERT OR REPLACE INTO mapping (family, address, domain, last_used)"
                " VALUES (?, ?, ?, ?)",
                upserts,
            )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self.writes += 1

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
