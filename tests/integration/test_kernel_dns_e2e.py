"""Kernel DNS answers end to end: dig in the lab's client namespace, `mirage run`
on the gateway under each capture backend.

Repeated queries to the gateway and to a hijacked resolver are answered by
bpf/mirage_dns.c (the counters in `mirage status` move) with the answer the
DNS service gave; a name the pool recycled is answered with its new address;
with `dns.kernel-answers: false` nothing is answered in the kernel; after a
SIGKILL nothing is answered from the dead appliance's map, and `mirage
cleanup` removes the filter.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_client import FAKE, dig

from appliance.capture.ebpf.answer import ANSWER_PREF
from appliance.lab.lab import Lab
from appliance.lab.mirage import BackendRuns, MirageRun

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BACKENDS = ["nftables", "ebpf"]


def status(lab: Lab, run: MirageRun) -> dict[str, Any]:
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "status", "-c",
                               str(run.config_path), "--json"]).stdout
    data: dict[str, Any] = json.loads(out)
    return data


def kernel_counters(lab: Lab, run: MirageRun) -> dict[str, int]:
    counters: dict[str, int] = status(lab, run)["counters"].get("kernel_dns", {})
    return counters


def answer_filters(lab: Lab) -> list[dict[str, Any]]:
    out = lab.exec("gateway", ["tc", "-j", "filter", "show", "dev", "lan0", "ingress"]).stdout
    return [f for f in json.loads(out or "[]") if f.get("pref") == ANSWER_PREF]


def mapped(lab: Lab, run: MirageRun) -> dict[str, str]:
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "mappings", "-c",
                               str(run.config_path), "--json"]).stdout
    return {row["domain"]: row["ip"] for row in json.loads(out)}


@pytest.fixture
def runs(lab: Lab) -> Iterator[BackendRuns]:
    r = BackendRuns(lab, name="kdns-e2e")
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_queries_are_answered_in_the_kernel(lab: Lab, runs: BackendRuns,
                                                     backend: str) -> None:
    run = runs.start(backend)
    gw = lab.addr("gateway", "lan0")
    poisoned = str(lab.topology.poisoned_resolver.address)
    assert answer_filters(lab), "the answerer is attached"
    first = dig(lab, f"@{gw}", "+short", "www.alpha.test")
    assert FAKE.match(first), first
    before = kernel_counters(lab, run)
    for server in (gw, poisoned):
        for name in ("www.alpha.test", "WWW.Alpha.TEST"):
            assert dig(lab, f"@{server}", "+short", name) == first
    # The answer leaves from the address asked (dig checks the source).
    stats = dig(lab, f"@{poisoned}", "+noall", "+stats", "www.alpha.test")
    assert f"SERVER: {poisoned}#53(" in stats, stats
    # dig's default EDNS query with a cookie, and one without EDNS.
    assert dig(lab, f"@{poisoned}", "+short", "+noedns", "www.alpha.test") == first
    after = kernel_counters(lab, run)
    assert after["answered"] - before["answered"] >= 6, (before, after)
    assert after["entries"] >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_dnsperf_to_a_hijacked_resolver(lab: Lab, runs: BackendRuns, backend: str,
                                        tmp_path: Path) -> None:
    """A short dnsperf load (2 s, bounded rate) of 20 repeated names: every
    query answered, almost all of them by the kernel."""
    run = runs.start(backend)
    poisoned = str(lab.topology.poisoned_resolver.address)
    names = [f"p{i}.perf.test" for i in range(20)]
    for name in names:
        assert FAKE.match(dig(lab, f"@{poisoned}", "+short", name))
    data = tmp_path / "names.txt"
    data.write_text("".join(f"{n} A\n" for n in names))
    before = kernel_counters(lab, run)
    out = lab.exec("client", ["dnsperf", "-s", poisoned, "-d", str(data), "-l", "2",
                              "-Q", "3000", "-t", "2"], timeout=30).stdout
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    after = kernel_counters(lab, run)
    assert sent > 1000 and done >= sent * 0.99, out
    assert after["answered"] - before["answered"] >= done * 0.95, (before, after, out)
    answered_by = {r["address"]: r["answered"] for r in status(lab, run)["kernel_dns_clients"]}
    assert answered_by.get(lab.addr("client")), answered_by


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_recycled_name_is_not_answered_stale(lab: Lab, runs: BackendRuns,
                                               backend: str) -> None:
    # Six fake IPs: the seventh name recycles the least recently used.
    run = runs.start(backend, dns={"fake-ip-range": "198.18.0.0/29"})
    gw = lab.addr("gateway", "lan0")
    first = [dig(lab, f"@{gw}", "+short", f"n{i}.recycle.test") for i in range(6)]
    assert all(FAKE.match(ip) for ip in first), first
    # n0 is the least recently used in userspace, but the kernel answers it
    # now: the pool's LRU sees that and recycles n1 instead.
    assert dig(lab, f"@{gw}", "+short", "n0.recycle.test") == first[0]
    assert FAKE.match(dig(lab, f"@{gw}", "+short", "n6.recycle.test"))
    now = mapped(lab, run)
    assert now.get("n0.recycle.test") == first[0]
    assert "n1.recycle.test" not in now
    assert now["n6.recycle.test"] == first[1]  # n1's address serves another name
    # n1 is asked again: not the kernel's old answer, the pool's new one.
    again = dig(lab, f"@{gw}", "+short", "n1.recycle.test")
    assert again == mapped(lab, run)["n1.recycle.test"]
    for name, ip in mapped(lab, run).items():
        assert dig(lab, f"@{gw}", "+short", name) == ip, name


def test_kernel_answers_off(lab: Lab, runs: BackendRuns) -> None:
    run = runs.start("ebpf", dns={"kernel-answers": False})
    gw = lab.addr("gateway", "lan0")
    first = dig(lab, f"@{gw}", "+short", "www.beta.test")
    assert dig(lab, f"@{gw}", "+short", "www.beta.test") == first
    assert not answer_filters(lab)
    assert "kernel_dns" not in status(lab, run)["counters"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_stops_kernel_answers(lab: Lab, runs: BackendRuns, backend: str) -> None:
    run = runs.start(backend)
    poisoned = str(lab.topology.poisoned_resolver.address)
    fake = dig(lab, f"@{poisoned}", "+short", "www.gamma.test")
    assert dig(lab, f"@{poisoned}", "+short", "www.gamma.test") == fake
    run.kill()
    # The filter and its map outlive the process; no answer comes from them.
    assert answer_filters(lab)
    after = dig(lab, f"@{poisoned}", "+short", "www.gamma.test")
    assert not FAKE.match(after), after
    lab.exec("gateway", [sys.executable, "-m", "appliance", "cleanup", "-c",
                         str(run.config_path)], check=True, timeout=60)
    assert not answer_filters(lab)
