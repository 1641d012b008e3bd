"""DIRECT offload bookkeeping (sans-I/O) and the pins it takes in a real pool."""

from __future__ import annotations

import ipaddress
import math

import pytest

from appliance.capture.offload import (
    GRACE,
    DirectOffload,
    Element,
    OffloadBook,
    element_commands,
    flush_commands,
)
from appliance.fakeip.pool import FakeIPPool

ip = ipaddress.ip_address
F1, F2, F6 = ip("198.18.0.1"), ip("198.18.0.2"), ip("fc00::1")
R1, R6 = ip("192.0.2.1"), ip("2001:db8::1")


def test_offer_pending_added_expired() -> None:
    book = OffloadBook()
    assert book.offer(F1, R1, 300.7)
    assert not book.offer(F1, R1, 300)  # already pending
    assert F1 in book and len(book) == 0  # pending, not yet in the kernel
    batch = book.pending()
    assert batch == [Element(F1, R1, 300)] and book.pending() == []
    book.added(batch, now=1000.0)
    assert len(book) == 1 and not book.offer(F1, R1, 300)  # offloaded already
    # The pin outlives the kernel's timeout by GRACE: nothing expires before.
    assert book.next_expiry() == 1000.0 + 300 + GRACE
    assert book.expired(1000.0 + 300) == []
    assert book.expired(1000.0 + 300 + GRACE) == [F1]
    assert F1 not in book and book.next_expiry() == math.inf
    assert book.offer(F1, R1, 60)  # after expiry the next flow offers again


@pytest.mark.parametrize(("fake", "real", "ttl"), [
    (F1, R6, 300),   # a v4 fake IP cannot be translated to a v6 address
    (F6, R1, 300),
    (F1, R1, 1.9),   # too little TTL left to be worth it
    (F1, R1, 0),
    (F1, R1, math.nan),
])
def test_offers_refused(fake: ipaddress.IPv4Address, real: ipaddress.IPv4Address,
                        ttl: float) -> None:
    book = OffloadBook()
    assert not book.offer(fake, real, ttl)
    assert book.pending() == []


def test_limit_is_per_family_and_counts_pending() -> None:
    book = OffloadBook(limit=1)
    assert book.offer(F1, R1, 10)
    assert not book.offer(F2, R1, 10)
    assert book.offer(F6, R6, 10)
    book.added(book.pending(), now=0.0)
    assert not book.offer(F2, R1, 10)
    assert book.expired(9) == []
    assert book.expired(10 + GRACE) == [F1, F6]
    assert book.offer(F2, R1, 10)


def test_timeout_is_capped_and_clear_forgets_everything() -> None:
    book = OffloadBook()
    book.offer(F1, R1, 10 ** 9)
    batch = book.pending()
    assert batch[0].timeout == 86400
    book.added(batch, now=0.0)
    book.offer(F2, R1, 30)
    assert sorted(map(str, book.clear())) == ["198.18.0.1", "198.18.0.2"]
    assert len(book) == 0 and book.pending() == [] and book.next_expiry() == math.inf


def test_nft_commands() -> None:
    cmds = element_commands("mirage", [Element(F1, R1, 300), Element(F6, R6, 30)])
    assert cmds == [
        {"add": {"element": {"family": "inet", "table": "mirage", "name": "offload4",
                             "elem": [[{"elem": {"val": "198.18.0.1", "timeout": 300}},
                                       "192.0.2.1"]]}}},
        {"add": {"element": {"family": "inet", "table": "mirage", "name": "offload6",
                             "elem": [[{"elem": {"val": "fc00::1", "timeout": 30}},
                                       "2001:db8::1"]]}}},
    ]
    assert [c["flush"]["map"]["name"] for c in flush_commands("t", map6=True)] == [
        "offload4", "offload6"]
    assert [c["flush"]["map"]["name"] for c in flush_commands("t", map6=False)] == ["offload4"]


def test_offer_pins_the_fake_ip_and_only_for_the_name_routed() -> None:
    pool = FakeIPPool(ipaddress.IPv4Network("198.18.0.0/30"))
    a = pool.allocate("a.test")
    b = pool.allocate("b.test")
    off = DirectOffload(pool)
    off.offer(a, "a.test", R1, 300)
    assert off.offered == 1 and a in off.book
    off.offer(a, "a.test", R1, 300)  # a second flow: no second pin
    # Pinned: with the /30 full (two usable), a new name cannot take a's
    # address; b, unpinned, is recycled instead.
    c = pool.allocate("c.test")
    assert c == b and pool.reverse(a) == "a.test"
    # b's address now maps to c.test: an offer made for b.test (a flow that
    # started before the recycling) must not offload c's traffic.
    off.offer(b, "b.test", R1, 300)
    assert b not in off.book and off.offered == 1
    assert pool.stats()["unbalanced_unpins"] == 0
    # Expiry releases the pin: a becomes recyclable again.
    off.book.added(off.book.pending(), now=0.0)
    for fake in off.book.expired(now=10_000.0):
        pool.unpin(fake)
    assert pool.allocate("d.test") in (a, b)
    assert pool.stats()["unbalanced_unpins"] == 0


def test_offer_of_an_unmapped_fake_ip_takes_and_releases_nothing() -> None:
    pool = FakeIPPool(ipaddress.IPv4Network("198.18.0.0/30"))
    off = DirectOffload(pool)
    off.offer(F1, "gone.test", R1, 300)  # expired or never mapped
    assert F1 not in off.book and off.offered == 0
    assert pool.stats()["unbalanced_unpins"] == 0
