"""What the pool has handed out, kept on disk ahead of the answers.

The ledger is how a fake IP never changes name behind a client's back across
a restart (docs/architecture.md, "Fake IPs across restarts"). It is not the
mapping store: it holds no names, only, per address family,

* `range`: the fake range it describes (a changed range voids it, as
  sing-box voids its saved state);
* `issued`: a high-water mark written *ahead* of the allocation cursor: no
  address at or above it has ever been handed out. The pool reserves a block
  of `RESERVE_BLOCK` addresses at a time, synchronously, before the first
  answer that uses the block (at most 1/64 of the range, so a small range
  is not over-reserved; PostgreSQL logs sequences 32 values ahead the
  same way: after a crash numbers are skipped, never repeated);
* `recent`: at a clean shutdown of a store-less pool, its addresses in
  least-recently-used order, so the next run reuses the oldest first;

and `clean`: true only when the run that wrote it ended with everything
written (the store's final flush succeeded, or there is no store).

It is small (a few hundred bytes; `recent` adds ~5 bytes per mapping once, at
shutdown) and written rarely: at start, once per `RESERVE_BLOCK` new
addresses, and at exit. Each write replaces the file atomically (write a
temporary file, fsync, rename, fsync the directory), so a crash leaves the
previous or the new version, never a mix. A missing or unreadable file means
"nothing known" (first run, or a file from elsewhere): logged, never fatal.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

LEDGER_FILE = "fakeip-ledger.json"
LEDGER_VERSION = 1
# Addresses reserved per ledger write: one small synchronous write (an fsync,
# a few ms) per this many new addresses.
RESERVE_BLOCK = 256


@dataclass
class FamilyLedger:
    """One family's entry: see the module docstring."""

    range: str
    issued: int  # offset from the network address; offsets >= issued never used
    recent: list[int] | None = None  # offsets, least recently used first


@dataclass
class LedgerState:
    clean: bool
    families: dict[int, FamilyLedger] = field(default_factory=dict)


class Ledger(Protocol):
    """Durable storage of a LedgerState. `write` must be durable when it
    returns (the pool answers with what it reserved right after)."""

    def load(self) -> LedgerState | None: ...

    def write(self, state: LedgerState) -> None: ...


def ledger_path(state_dir: Path) -> Path:
    return state_dir / LEDGER_FILE


class MemoryLedger:
    """A ledger in memory (tests: one object plays the disk across "restarts")."""

    def __init__(self) -> None:
        self.state: LedgerState | None = None
        self.writes = 0

    def load(self) -> LedgerState | None:
        return _decode(_encode(self.state)) if self.state is not None else None

    def write(self, state: LedgerState) -> None:
        self.state = _decode(_encode(state))
        self.writes += 1


class FileLedger:
    """The ledger as one JSON file, replaced atomically on every write.

    Owns no open file between calls. `write` raises OSError when the disk
    refuses (the pool then refuses to hand out unreserved addresses).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.writes = 0

    def load(self) -> LedgerState | None:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("fake-IP ledger %s unreadable (%s): starting without it", self.path, err)
            return None
        try:
            return _decode(json.loads(text))
        except (ValueError, TypeError, KeyError) as err:
            log.warning("fake-IP ledger %s is not a ledger (%s): starting without it",
                        self.path, err)
            return None

    def write(self, state: LedgerState) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        data = json.dumps(_encode(state), separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):  # not every filesystem syncs a directory
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.writes += 1


def _encode(state: LedgerState) -> dict[str, object]:
    families: dict[str, object] = {}
    for version, fam in state.families.items():
        entry: dict[str, object] = {"range": fam.range, "issued": fam.issued}
        if fam.recent is not None:
            entry["recent"] = base64.b64encode(array("i", fam.recent).tobytes()).decode()
        families[str(version)] = entry
    return {"version": LEDGER_VERSION, "clean": state.clean, "families": families}


def _decode(obj: object) -> LedgerState:
    if not isinstance(obj, dict) or obj.get("version") != LEDGER_VERSION:
        raise ValueError("unknown ledger version")
    families = {}
    for key, entry in dict(obj["families"]).items():
        recent = None
        if "recent" in entry:
            packed = array("i")
            packed.frombytes(base64.b64decode(entry["recent"], validate=True))
            recent = packed.tolist()
        issued = int(entry["issued"])
        if issued < 0 or int(key) not in (4, 6):
            raise ValueError("bad ledger entry")
        families[int(key)] = FamilyLedger(str(entry["range"]), issued, recent)
    return LedgerState(bool(obj["clean"]), families)
