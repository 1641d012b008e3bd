"""Per-client limits (appliance/limits.py): the sans-I/O counting that the
services ask before spending a shared resource for a LAN client."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.limits import ConcurrencyLimit, RateLimit, client_key, total_flows


def test_client_key_v4_is_the_address_v6_the_slash_64() -> None:
    assert client_key("192.168.56.10") == "192.168.56.10"
    assert client_key("fd56::10") == client_key("fd56::ffff:1:2:3") == "fd56::/64"
    assert client_key("fd56:0:0:1::10") == "fd56:0:0:1::/64"
    assert client_key(ipaddress.ip_address("::ffff:192.168.56.10")) == "192.168.56.10"


def test_one_client_at_its_share_does_not_stop_another() -> None:
    lim = ConcurrencyLimit(per_client=3, total=100)
    assert [lim.acquire("a") for _ in range(5)] == [True, True, True, False, False]
    assert lim.acquire("b")
    lim.release("a")
    assert lim.acquire("a")
    stats = lim.stats()
    assert stats["refused"] == 2 and stats["in_use"] == 4
    assert stats["top_refused"] == [{"client": "a", "refused": 2}]


def test_total_bounds_all_clients_together() -> None:
    lim = ConcurrencyLimit(per_client=10, total=4)
    assert [lim.acquire(c) for c in "abcde"] == [True, True, True, True, False]
    lim.release("b")
    assert lim.acquire("e")


def test_a_release_without_acquire_opens_no_room() -> None:
    lim = ConcurrencyLimit(per_client=1, total=1)
    lim.release("a")
    assert lim.acquire("a") and not lim.acquire("b")
    assert lim.stats()["unbalanced"] == 1


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=300))
def test_concurrency_invariants(ops: list[tuple[str, bool]]) -> None:
    lim = ConcurrencyLimit(per_client=4, total=9)
    held = {"a": 0, "b": 0, "c": 0}
    for client, take in ops:
        if take:
            if lim.acquire(client):
                held[client] += 1
        elif held[client]:
            lim.release(client)
            held[client] -= 1
        assert all(0 <= lim.held(c) == held[c] <= 4 for c in held)
        assert sum(held.values()) == lim.stats()["in_use"] <= 9


def test_rate_limit_burst_then_rate() -> None:
    lim = RateLimit(rate=10, burst=5)
    assert sum(lim.allow("a", 0.0) for _ in range(20)) == 5
    assert lim.allow("b", 0.0)  # another client is unaffected
    assert sum(lim.allow("a", 1.0) for _ in range(20)) == 5  # refilled to the burst, no more
    assert sum(lim.allow("a", 1.3) for _ in range(20)) == 3
    assert lim.stats()["refused"] == 15 + 15 + 17


def test_rate_limit_forgets_the_oldest_client_first() -> None:
    lim = RateLimit(rate=1, burst=1, max_clients=2)
    assert lim.allow("a", 0.0) and not lim.allow("a", 0.0)
    assert lim.allow("b", 0.0) and lim.allow("c", 0.0)  # "a" is forgotten
    assert lim.stats()["clients"] == 2
    assert lim.allow("a", 0.0)  # back with a full burst


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimit(0, 10)
    with pytest.raises(ValueError):
        RateLimit(0, 1)


def test_total_flows_sized_from_memory_and_descriptors() -> None:
    assert total_flows(24 << 30, 1 << 22) == (24 << 30) // 2 // 20_000
    assert total_flows(24 << 30, 20_000) == (20_000 - 256) // 2
    assert total_flows(1 << 20, 100) == 64


def test_client_key_of_socket_text_matches_the_parsed_address() -> None:
    for text in ("192.168.56.10", "::ffff:192.168.56.10", "fd56::10", "fe80::1%lan0",
                 "fd56:0:0:1::10"):
        expected = client_key(ipaddress.ip_address(text.split("%")[0]))
        assert client_key(text) == expected


def test_fair_shares_report_each_limit_flat_and_its_top_refused() -> None:
    from appliance.limits import FairShares

    shares = FairShares(
        flows=ConcurrencyLimit(1, 10), proxy=ConcurrencyLimit(1, 10),
        dns_upstream=ConcurrencyLimit(1, 10), dns_tcp=ConcurrencyLimit(1, 10),
        fake_ip=RateLimit(1, 1))
    assert shares.flows.acquire("a") and not shares.flows.acquire("a")
    assert shares.fake_ip.allow("b", 0.0) and not shares.fake_ip.allow("b", 0.0)
    stats = shares.stats()
    assert stats["flows_refused"] == 1 and stats["flows_in_use"] == 1
    assert stats["fake_ip_refused"] == 1 and stats["dns_tcp_refused"] == 0
    assert all(isinstance(v, int | float) for v in stats.values())
    assert shares.top_refused() == {
        "flows": [{"client": "a", "refused": 1}],
        "fake_ip": [{"client": "b", "refused": 1}],
    }
