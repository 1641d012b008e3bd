"""Memory and speed of the fake-IP pool at 100,000 mappings, against a plain dict.

    .venv/bin/python bench/pool_memory.py [--mappings N]

Each measurement runs in a fresh child process (so freed memory of one does
not flatter the next) twice: once under tracemalloc (bytes Python allocated
and still holds) and once without it (resident set growth from
/proc/self/statm, and timing). Bytes per mapping include the domain strings
the structure keeps. The baseline is `dict[str, int]` of the same names to
distinct ints: the least any name -> address table can hold in CPython.

Budget: under 300 bytes per mapping (exit status 1 if the pool is over).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from ipaddress import IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.fakeip import FakeIPPool, MemoryStore

BUDGET = 300
KINDS = ("dict", "pool", "pool+pending")


def names(n: int) -> list[str]:
    # Typical lengths of names clients ask for (15-35 characters), mixed case
    # as they arrive, so the pool's normalisation makes its own copies.
    return [f"Host{i}.cdn{i % 97}.Example{i % 13}.com." for i in range(n)]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(kind: str, domains: list[str]) -> object:
    n = len(domains)
    prefix = 14 if n > 65534 else 16
    if kind == "dict":
        table: dict[str, int] = {}
        for i, d in enumerate(domains):
            table[d.lower().rstrip(".")] = i + 1000
        return table
    store = MemoryStore() if kind == "pool+pending" else None
    pool = FakeIPPool(IPv4Network(f"198.16.0.0/{prefix}"), store=store)
    for d in domains:
        pool.allocate(d)
    return pool


def measure(kind: str, n: int, traced: bool) -> dict[str, float]:
    domains = names(n)
    gc.collect()
    if traced:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        obj = build(kind, domains)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del obj
        return {"traced": (after - before) / n}
    base = rss()
    t0 = time.perf_counter()
    obj = build(kind, domains)
    build_s = time.perf_counter() - t0
    out = {"rss": (rss() - base) / n, "insert_per_s": n / build_s}
    if isinstance(obj, FakeIPPool):
        out.update(ops(obj, domains))
    return out


def ops(pool: FakeIPPool, domains: list[str]) -> dict[str, float]:
    n = len(domains)
    ips = [pool.allocate(d) for d in domains[:10000]]
    t0 = time.perf_counter()
    for d in domains:
        pool.allocate(d)
    hit = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(10):
        for ip in ips:
            pool.reverse(ip)
    rev = len(ips) * 10 / (time.perf_counter() - t0)
    # A full /16 recycling its least recently used mapping on every allocation.
    full = FakeIPPool(IPv4Network("198.18.0.0/16"))
    for i in range(65534):
        full.allocate(f"fill{i}.example")
    t0 = time.perf_counter()
    for i in range(n):
        full.allocate(f"new{i}.example")
    recycle = n / (time.perf_counter() - t0)
    return {"hit_per_s": hit, "reverse_per_s": rev, "recycle_per_s": recycle}


def child(kind: str, n: int, traced: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--mappings", str(n), "--measure", kind]
    if traced:
        cmd.append("--traced")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mappings", type=int, default=100_000)
    parser.add_argument("--measure", choices=KINDS)
    parser.add_argument("--traced", action="store_true")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.mappings, args.traced)))
        return 0

    n = args.mappings
    results = {kind: {**child(kind, n, True), **child(kind, n, False)} for kind in KINDS}
    base = results["dict"]
    print(f"fake-IP pool at {n:,} mappings (bytes per mapping, names included)")
    print(f"{'structure':<16}{'tracemalloc':>12}{'RSS':>9}{'x dict':>8}{'inserts/s':>12}")
    for kind, r in results.items():
        print(
            f"{kind:<16}{r['traced']:>12.0f}{r['rss']:>9.0f}"
            f"{r['traced'] / base['traced']:>8.2f}{r['insert_per_s']:>12,.0f}"
        )
    pool = results["pool"]
    print(
        f"pool ops/s: allocate (hit) {pool['hit_per_s']:,.0f},"
        f" reverse {pool['reverse_per_s']:,.0f},"
        f" allocate on a full /16 (recycling LRU) {pool['recycle_per_s']:,.0f};"
        f" dict insert {base['insert_per_s']:,.0f}"
    )
    worst = max(pool["traced"], pool["rss"])
    verdict = "within" if worst < BUDGET else "OVER"
    print(f"budget {BUDGET} B/mapping: {verdict} (pool, worst of tracemalloc and RSS: {worst:.0f})")
    return 0 if worst < BUDGET else 1


if __name__ == "__main__":
    sys.exit(main())
