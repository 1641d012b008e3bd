"""Fake IPs: the pool (allocator, LRU, pins; no I/O), its stores and flusher.

`FakeIPPool` lives in memory and is used from the trio thread; a
`MappingStore` (`MemoryStore`, `SQLiteStore`) keeps it across restarts;
`flusher.serve` writes the pool's pending changes to the store in batches.
"""

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
    "MappingStore",
    "MemoryStore",
    "PoolExhausted",
    "Row",
    "SQLiteStore",
    "normalise",
    "store_path",
]
