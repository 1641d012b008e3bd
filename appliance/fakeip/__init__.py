"""Fake IPs: the pool (allocator, LRU, pins; no I/O), its stores and flusher.

`FakeIPPool` lives in memory and is used from the trio thread; a
`MappingStore` (`MemoryStore`, `SQLiteStore`) keeps it across restarts;
`flusher.serve` writes the pool's pending changes to the store in batches;
a `Ledger` (`FileLedger`) keeps what the pool has handed out, so a restart
never gives an address a client may still hold to another name.
"""

from appliance.fakeip.ledger import FileLedger, Ledger, LedgerState, MemoryLedger, ledger_path
from appliance.fakeip.pool import DEFAULT_MAX_MAPPINGS, FakeIPPool, PoolExhausted, normalise
from appliance.fakeip.store import (
    Change,
    MappingStore,
    MemoryStore,
    Row,
    SQLiteStore,
    store_path,
)

__all__ = [
    "DEFAULT_MAX_MAPPINGS",
    "Change",
    "FakeIPPool",
    "FileLedger",
    "Ledger",
    "LedgerState",
    "MappingStore",
    "MemoryLedger",
    "MemoryStore",
    "PoolExhausted",
    "Row",
    "SQLiteStore",
    "ledger_path",
    "normalise",
    "store_path",
]
