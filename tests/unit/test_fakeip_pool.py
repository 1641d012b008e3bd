"""The fake-IP pool's rules: allocation, names, ranges, LRU recycling, pins."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from appliance.fakeip import (
    DEFAULT_MAX_MAPPINGS,
    FakeIPPool,
    MemoryStore,
    PoolExhausted,
    normalise,
)

NET16 = IPv4Network("198.18.0.0/16")


def pool(range4: str = "198.18.0.0/16", range6: str | None = None, **kw: object) -> FakeIPPool:
    return FakeIPPool(
        IPv4Network(range4), IPv6Network(range6) if range6 else None, **kw  # type: ignore[arg-type]
    )


# -- allocation and names ------------------------------------------------------


def test_allocate_is_stable_and_distinct() -> None:
    p = pool()
    a = p.allocate("a.example")
    b = p.allocate("b.example")
    assert a == IPv4Address("198.18.0.1")  # .1 is usable: no TUN gateway
    assert b == IPv4Address("198.18.0.2")
    assert p.allocate("a.example") == a
    assert len(p) == 2
    assert p.reverse(a) == "a.example"
    assert p.reverse(str(b)) == "b.example"


def test_names_are_case_insensitive_and_one_trailing_dot_is_stripped() -> None:
    p = pool()
    ip = p.allocate("WWW.Example.COM.")
    assert p.allocate("www.example.com") == ip
    assert p.lookup("www.EXAMPLE.com.") == ip
    assert p.reverse(ip) == "www.example.com"
    assert len(p) == 1
    # Only one dot is stripped: "x.." is the name "x.", not "x".
    assert normalise("x..") == "x."
    assert p.allocate("x..") != p.allocate("x")


@pytest.mark.parametrize("bad", ["", "."])
def test_empty_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        pool().allocate(bad)


def test_family_errors() -> None:
    p = pool()
    with pytest.raises(ValueError, match="range6"):
        p.allocate("a.example", 6)
    with pytest.raises(ValueError):
        p.allocate("a.example", 5)
    assert p.reverse("fd00::1") is None
    assert not p.is_fake("fd00::1")


def test_ipv6_family_is_separate() -> None:
    p = pool(range6="fd00:18::/64")
    v4 = p.allocate("a.example", 4)
    v6 = p.allocate("a.example", 6)
    assert v6 == IPv6Address("fd00:18::1")
    assert p.lookup("a.example", 6) == v6
    assert p.lookup("b.example", 6) is None
    assert p.reverse(v6) == p.reverse(v4) == "a.example"
    assert len(p) == 2
    assert p.stats()["size4"] == p.stats()["size6"] == 1


def test_huge_ipv6_range_is_never_materialised() -> None:
    p = pool(range6="fd00::/32")
    assert p.stats()["capacity6"] == DEFAULT_MAX_MAPPINGS
    for i in range(1000):
        p.allocate(f"n{i}.example", 6)
    # Slots exist only for allocated offsets (plus the sentinel).
    assert len(p._v6.names) == 1001  # type: ignore[union-attr]
    assert p.allocate("last.example", 6) == IPv6Address("fd00::3e9")


def test_max_mappings_caps_a_family_and_recycles_there() -> None:
    p = pool(range6="fd00::/64", max_mappings=3)
    ips = [p.allocate(n, 6) for n in ("a", "b", "c")]
    assert p.allocate("d", 6) == ips[0]
    assert p.reverse(ips[0]) == "d"
    assert p.stats()["recycled"] == 1


@pytest.mark.parametrize(
    ("net", "expected"),
    [
        ("10.0.0.0/30", ["10.0.0.1", "10.0.0.2"]),  # no network, no broadcast
        ("fd00::/126", ["fd00::1", "fd00::2", "fd00::3"]),  # no subnet-router anycast
    ],
)
def test_address_plan_of_small_ranges(net: str, expected: list[str]) -> None:
    network = ipaddress.ip_network(net)
    if network.version == 4:
        assert isinstance(network, IPv4Network)
        p = FakeIPPool(network)
        family = 4
    else:
        assert isinstance(network, IPv6Network)
        p = FakeIPPool(IPv4Network("198.18.0.0/16"), network)
        family = 6
    got = [str(p.allocate(f"n{i}", family)) for i in range(len(expected))]
    assert got == expected
    # Full: the next one recycles the least recently used, never a reserved address.
    assert str(p.allocate("extra", family)) == expected[0]


@pytest.mark.parametrize("net", ["10.0.0.0/31", "10.0.0.1/32"])
def test_range_without_usable_address_is_refused(net: str) -> None:
    with pytest.raises(ValueError, match="no usable address"):
        FakeIPPool(IPv4Network(net))


def test_lookup_does_not_allocate() -> None:
    p = pool()
    assert p.lookup("a.example") is None
    assert len(p) == 0


def test_reverse_and_is_fake() -> None:
    p = pool(range6="fd00::/120")
    ip = p.allocate("a.example")
    assert p.reverse("198.18.0.2") is None  # in range, unmapped
    assert p.reverse("198.18.0.0") is None  # network address
    assert p.reverse("198.18.255.255") is None  # broadcast
    assert p.reverse("10.0.0.1") is None  # not fake
    assert p.reverse(f"::ffff:{ip}") == "a.example"  # dual-stack socket view
    assert p.is_fake("198.18.255.255")
    assert p.is_fake(IPv4Address("198.18.7.7"))
    assert p.is_fake("::ffff:198.18.0.9")
    assert p.is_fake("fd00::ff")
    assert not p.is_fake("fd00::100")
    assert not p.is_fake("198.19.0.1")


# -- LRU recycling and pins ---------------------------------------------------------


def test_full_slash16_then_lru_recycling_with_pins() -> None:
    p = FakeIPPool(NET16)
    capacity = NET16.num_addresses - 2
    ips = [p.allocate(f"h{i}.example") for i in range(capacity)]
    # Every address except network and broadcast holds a live mapping at once.
    assert len(p) == capacity == 65534
    assert len({int(ip) for ip in ips}) == capacity
    assert {int(ip) for ip in ips} == set(range(int(NET16[1]), int(NET16[-1])))
    assert p.stats()["recycled"] == 0

    # h0 is least recently used; use h0 by lookup, h1 by reverse, h2 by pin.
    assert p.lookup("h0.example") == ips[0]
    assert p.reverse(ips[1]) == "h1.example"
    assert p.pin(ips[2]) == "h2.example"
    # h3 is pinned and released: it becomes most recently used.
    assert p.pin(ips[3]) == "h3.example"
    p.unpin(ips[3])

    # So h4, h5 are recycled first, in that order, onto their own addresses.
    assert p.allocate("new1.example") == ips[4]
    assert p.allocate("new2.example") == ips[5]
    assert p.lookup("h4.example") is None
    assert p.reverse(ips[4]) == "new1.example"
    assert p.stats()["recycled"] == 2
    assert len(p) == capacity

    # Pin every mapping: nothing can be recycled, and nothing is reused.
    for ip in ips:
        if ip != ips[2]:
            assert p.pin(ip) is not None
    before = dict((name, ip) for name, ip, _ in p.mappings())
    with pytest.raises(PoolExhausted):
        p.allocate("one-too-many.example")
    assert p.stats()["exhausted"] == 1
    assert dict((name, ip) for name, ip, _ in p.mappings()) == before
    # Names already mapped still resolve while exhausted.
    assert p.allocate("h0.example") == ips[0]
    # Releasing one makes exactly that address available.
    p.unpin(ips[100])
    assert p.allocate("one-too-many.example") == ips[100]
    assert p.reverse(ips[100]) == "one-too-many.example"


def test_pins_count() -> None:
    p = pool("10.0.0.0/30")
    a = p.allocate("a")
    p.allocate("b")
    assert p.pin(a) == "a"
    assert p.pin(a) == "a"
    p.unpin(a)
    # Still pinned once: "b" is recycled although "a" is older.
    assert p.allocate("c") != a
    assert p.stats()["pinned"] == 1
    p.unpin(a)
    assert p.stats()["pinned"] == 0
    p.allocate("c")  # touch c: a (just unpinned) is now the LRU
    assert p.allocate("d") == a


def test_pin_unmapped_pins_nothing_and_unbalanced_unpin_is_counted() -> None:
    p = pool()
    assert p.pin("198.18.0.1") is None
    assert p.pin("10.1.1.1") is None
    assert p.stats()["pinned"] == 0
    p.unpin("198.18.0.1")
    p.unpin("10.1.1.1")
    assert p.stats()["unbalanced_unpins"] == 2


def test_exhausted_when_everything_is_pinned_ipv6() -> None:
    p = pool(range6="fd00::/126")
    ips = [p.allocate(f"n{i}", 6) for i in range(3)]
    for ip in ips:
        p.pin(ip)
    with pytest.raises(PoolExhausted):
        p.allocate("x", 6)
    # IPv4 is a separate family and unaffected.
    assert p.allocate("x", 4) == IPv4Address("198.18.0.1")


def test_drop_removes_unpinned_matches_and_frees_addresses() -> None:
    p = pool("10.0.0.0/29")  # 6 addresses
    ips = {n: p.allocate(n) for n in ("a.lan", "b.lan", "c.com", "d.lan")}
    p.pin(ips["b.lan"])
    assert p.drop(lambda d: d.endswith(".lan")) == 2
    assert p.lookup("a.lan") is None
    assert p.lookup("d.lan") is None
    assert p.reverse(ips["b.lan"]) == "b.lan"  # pinned: kept
    assert p.stats()["dropped"] == 2
    # Never-used addresses first, then freed ones (oldest first), then LRU.
    assert str(p.allocate("e")) == "10.0.0.5"
    assert str(p.allocate("f")) == "10.0.0.6"
    assert p.allocate("g") == ips["a.lan"]
    assert p.allocate("h") == ips["d.lan"]
    assert p.stats()["recycled"] == 0
    assert p.allocate("i") == ips["c.com"]  # LRU unpinned
    assert p.stats()["recycled"] == 1


def test_mappings_and_stats() -> None:
    p = pool(range6="fd00::/64")
    a = p.allocate("a")
    b6 = p.allocate("b", 6)
    p.pin(a)
    p.pin(a)
    assert sorted(p.mappings(), key=str) == sorted([("a", a, 2), ("b", b6, 0)], key=str)
    stats = p.stats()
    assert stats["size4"] == 1
    assert stats["size6"] == 1
    assert stats["capacity4"] == 65534
    assert stats["pinned"] == 1
    assert stats["pins"] == 2
    assert stats["pending"] == 0  # no store: nothing recorded


def test_lru_order_reports_unpinned_oldest_first() -> None:
    p = pool()
    for n in "abcd":
        p.allocate(n)
    p.lookup("a")
    p.pin(p.lookup("c"))  # type: ignore[arg-type]
    assert p.lru_order() == ["b", "d", "a"]


# -- pending buffer ---------------------------------------------------------------


def test_pending_is_deduplicated_and_in_use_order() -> None:
    store = MemoryStore()
    p = pool(store=store)
    for _ in range(100):
        p.allocate("a")
        p.allocate("b")
    p.lookup("a")
    batch = p.take_pending()
    assert [(row[2], row[3]) for row in batch] == [("b", 1), ("a", 2)]
    assert p.take_pending() == []
    p.reverse("198.18.0.2")
    assert [(row[2], row[3]) for row in p.take_pending()] == [("b", 3)]


# -- invariants under random operations -----------------------------------------

NAMES = st.sampled_from(["a", "B", "c.", "d", "E.", "f", "g", "h", "i", "j"])
FAMILIES = st.sampled_from([4, 6])
R4 = IPv4Network("10.9.0.0/29")  # 6 usable
R6 = IPv6Network("fd09::/126")  # 3 usable
IPAddress = IPv4Address | IPv6Address
# Model state: family -> name -> ip, and family -> names least recently used first.
Snapshot = tuple[dict[int, dict[str, IPAddress]], dict[int, list[str]]]


class PoolMachine(RuleBasedStateMachine):
    """The pool against a plain model of mappings, recency order and pins.

    The model predicts exactly which mapping is recycled (least recently used
    unpinned), that pinned mappings never change, and what a reload from the
    store shows after a flush and after a crash (no flush).
    """

    @initialize()
    def setup(self) -> None:
        self.store = MemoryStore()
        self.pool = FakeIPPool(R4, R6, store=self.store)
        # family -> name -> ip; family -> names least recently used first.
        self.map: dict[int, dict[str, IPAddress]] = {4: {}, 6: {}}
        self.order: dict[int, list[str]] = {4: [], 6: []}
        self.pins: dict[int, dict[str, int]] = {4: {}, 6: {}}
        self.flushed = self._snapshot()

    def _snapshot(self) -> Snapshot:
        return self._snapshot_from((self.map, self.order))

    def _use(self, family: int, name: str) -> None:
        self.order[family].remove(name)
        self.order[family].append(name)

    def _capacity(self, family: int) -> int:
        return 6 if family == 4 else 3

    @rule(name=NAMES, family=FAMILIES)
    def allocate(self, name: str, family: int) -> None:
        key = normalise(name)
        mapping = self.map[family]
        if key in mapping:
            assert self.pool.allocate(name, family) == mapping[key]
            self._use(family, key)
            return
        if len(mapping) < self._capacity(family):
            recycled = self.pool.stats()["recycled"]
            ip = self.pool.allocate(name, family)
            assert ip not in mapping.values()
            assert self.pool.stats()["recycled"] == recycled
        else:
            victims = [n for n in self.order[family] if n not in self.pins[family]]
            if not victims:
                with pytest.raises(PoolExhausted):
                    self.pool.allocate(name, family)
                return
            victim = victims[0]
            ip = self.pool.allocate(name, family)
            assert ip == mapping[victim]
            del mapping[victim]
            self.order[family].remove(victim)
        mapping[key] = ip
        self.order[family].append(key)

    @rule(name=NAMES, family=FAMILIES)
    def lookup(self, name: str, family: int) -> None:
        key = normalise(name)
        assert self.pool.lookup(name, family) == self.map[family].get(key)
        if key in self.map[family]:
            self._use(family, key)

    @rule(family=FAMILIES, index=st.integers(0, 7))
    def reverse(self, family: int, index: int) -> None:
        net = R4 if family == 4 else R6
        ip = net[index % net.num_addresses]
        expected = next((n for n, i in self.map[family].items() if i == ip), None)
        assert self.pool.reverse(ip) == expected
        if expected is not None:
            self._use(family, expected)

    @rule(name=NAMES, family=FAMILIES)
    def pin(self, name: str, family: int) -> None:
        key = normalise(name)
        ip = self.map[family].get(key)
        if ip is None:
            return
        assert self.pool.pin(ip) == key
        self.pins[family][key] = self.pins[family].get(key, 0) + 1
        self._use(family, key)

    @rule(name=NAMES, family=FAMILIES)
    def unpin(self, name: str, family: int) -> None:
        key = normalise(name)
        count = self.pins[family].get(key, 0)
        if count == 0:
            return
        self.pool.unpin(self.map[family][key])
        if count == 1:
            del self.pins[family][key]
        else:
            self.pins[family][key] = count - 1
        self._use(family, key)

    @rule(letter=st.sampled_from("abcdefghij"))
    def drop(self, letter: str) -> None:
        expected = 0
        for family in (4, 6):
            for key in list(self.map[family]):
                if key.startswith(letter) and key not in self.pins[family]:
                    del self.map[family][key]
                    self.order[family].remove(key)
                    expected += 1
        assert self.pool.drop(lambda d: d.startswith(letter)) == expected

    @rule()
    def flush(self) -> None:
        self.pool.flush()
        self.flushed = self._snapshot()

    @rule(clean=st.booleans())
    def restart(self, clean: bool) -> None:
        """Reload from the store: after a clean shutdown (flush) or a crash."""
        if clean:
            self.flush()
        self.pool = FakeIPPool(R4, R6, store=self.store)
        self.map, self.order = self._snapshot_from(self.flushed)
        self.pins = {4: {}, 6: {}}

    @staticmethod
    def _snapshot_from(snap: Snapshot) -> Snapshot:
        return ({f: dict(m) for f, m in snap[0].items()}, {f: list(o) for f, o in snap[1].items()})

    @invariant()
    def matches_model(self) -> None:
        got: dict[int, dict[str, IPAddress]] = {4: {}, 6: {}}
        for name, ip, pins in self.pool.mappings():
            got[ip.version][name] = ip
            assert pins == self.pins[ip.version].get(name, 0)
        assert got == self.map
        for family in (4, 6):
            ips = list(got[family].values())
            assert len(set(ips)) == len(ips)  # bijection
            assert len(ips) <= self._capacity(family)
            for ip in ips:
                assert ip in (R4 if family == 4 else R6)
                assert ip != (R4 if family == 4 else R6).network_address
            assert ipaddress.IPv4Address("10.9.0.7") not in ips  # broadcast
            unpinned = [n for n in self.order[family] if n not in self.pins[family]]
            assert self.pool.lru_order(family) == unpinned


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_pool_state_machine = PoolMachine.TestCase


def test_mappings_is_a_snapshot() -> None:
    p = pool()
    for n in "abc":
        p.allocate(n)
    seen = []
    for name, _, _ in p.mappings():
        seen.append(name)
        p.allocate(name + "-more")  # the control API may await between items
    assert seen == ["a", "b", "c"]
    assert len(p) == 6
