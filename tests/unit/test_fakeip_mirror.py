"""The pool's kernel mirror contract, without a kernel: a recording mirror.

Every mapping is written after it exists and removed before its address is
handed to another name; the mirror never holds a pair the pool does not;
LRU victims the mirror reports hit are spared (bounded); resync rewrites.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable

from appliance.fakeip.pool import FakeIPPool, IPAddress


class RecordingMirror:
    def __init__(self, pool: FakeIPPool | None = None) -> None:
        self.pool = pool
        self.entries: dict[tuple[int, str], IPAddress] = {}
        self.hits: set[tuple[int, str]] = set()
        self.asked = 0

    def _live(self) -> dict[IPAddress, str]:
        assert self.pool is not None
        return {ip: name for name, ip, _ in self.pool.mappings()}

    def bound(self, family: int, name: str, ip: IPAddress) -> None:
        # The mapping exists when the mirror hears of it.
        if self.pool is not None:
            assert self._live().get(ip) == name
        assert ip not in self.entries.values(), "an address written twice"
        self.entries[(family, name)] = ip

    def unbound(self, family: int, name: str) -> None:
        ip = self.entries.pop((family, name))
        # Not handed to another name yet.
        if self.pool is not None:
            assert self._live().get(ip) in (name, None)
        self.hits.discard((family, name))

    def hit_since_check(self, family: int, name: str) -> bool:
        self.asked += 1
        if (family, name) in self.hits:
            self.hits.discard((family, name))
            return True
        return False

    def resync(self, mappings: Iterable[tuple[str, IPAddress, int]]) -> None:
        self.entries = {(family, name): ip for name, ip, family in mappings}


def test_mirror_follows_allocation_recycling_and_drop() -> None:
    pool = FakeIPPool(ipaddress.IPv4Network("198.18.0.0/28"),
                      ipaddress.IPv6Network("fd00::/124"))
    mirror = RecordingMirror(pool)
    pool.allocate("before.example")
    pool.set_mirror(mirror)
    assert mirror.entries == {(4, "before.example"): ipaddress.IPv4Address("198.18.0.1")}
    rng = random.Random(7)
    for _ in range(2000):
        name = f"n{rng.randrange(40)}.example"
        pool.allocate(name, rng.choice((4, 6)))
        truth = {(fam, n): ip for n, ip, _ in pool.mappings() for fam in (ip.version,)}
        assert mirror.entries == truth
    pool.drop(lambda n: n.startswith("n1"))
    assert mirror.entries == {(ip.version, n): ip for n, ip, _ in pool.mappings()}
    assert pool.stats()["recycled"] > 1000


def test_kernel_hits_spare_lru_victims() -> None:
    pool = FakeIPPool(ipaddress.IPv4Network("198.18.0.0/29"))  # 6 addresses
    mirror = RecordingMirror(pool)
    pool.set_mirror(mirror)
    for i in range(6):
        pool.allocate(f"h{i}")
    mirror.hits = {(4, "h0"), (4, "h1")}
    pool.allocate("new")
    live = {n for n, _ip, _p in pool.mappings()}
    assert {"h0", "h1", "new"} <= live and "h2" not in live
    assert pool.stats()["kernel_spared"] == 2
    # h0 and h1 went to the tail: the next recycles are h3, h4.
    pool.allocate("new2")
    pool.allocate("new3")
    live = {n for n, _ip, _p in pool.mappings()}
    assert "h3" not in live and "h4" not in live and "h0" in live


def test_spares_are_bounded() -> None:
    pool = FakeIPPool(ipaddress.IPv4Network("198.18.0.0/24"))
    mirror = RecordingMirror()
    pool.set_mirror(mirror)
    names = [f"x{i}" for i in range(254)]
    for n in names:
        pool.allocate(n)
    mirror.hits = {(4, n) for n in names}  # every one answered in the kernel
    pool.allocate("newcomer")
    assert pool.stats()["kernel_spared"] == 64
    assert pool.stats()["recycled"] == 1


def test_set_mirror_none_stops_writing() -> None:
    pool = FakeIPPool(ipaddress.IPv4Network("198.18.0.0/28"))
    mirror = RecordingMirror(pool)
    pool.set_mirror(mirror)
    pool.allocate("a")
    pool.set_mirror(None)
    pool.allocate("b")
    assert set(mirror.entries) == {(4, "a")}
