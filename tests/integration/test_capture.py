"""The nftables capture applied to a real kernel, in throwaway namespaces.

Each test gets its own namespace(s) named gw-cap-*, removed in teardown. The
code under test runs in a child process inside the namespace (`ip netns
exec`); what it did is read back with independent tools (`nft -j`, `ip -j`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.capture.nftables import render_text
from appliance.config.model import ApplianceConfig, Config, DnsConfig, Listen

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

TABLE = "mirage"
MARK = 0x233
RT = 233

APPLY = """
import pickle, sys
from appliance.capture.nftables import NftablesCapture
cfg, table, verb = pickle.load(sys.stdin.buffer)
getattr(NftablesCapture(cfg, table), verb)()
"""


def run(*argv: str, ns: str | None = None, check: bool = True, **kw: Any) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def capture(ns: str, cfg: Config, verb: str, table: str = TABLE) -> None:
    data = pickle.dumps((cfg, table, verb))
    r = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", APPLY],
        input=data, capture_output=True, timeout=30, check=False,
    )
    assert r.returncode == 0, r.stderr.decode()


def make_cfg(**kw: Any) -> Config:
    app = ApplianceConfig(
        lan=("gwlan0",),
        bypass=(ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("fd00::/8")),
        capture_mark=MARK,
        route_table=RT,
    )
    base: dict[str, Any] = {
        "tproxy_port": 7893,
        "routing_mark": 0x100,
        "ipv6": True,
        "dns": DnsConfig(listen=Listen("0.0.0.0", 1053), ipv6=True,
                         fake_ip_range6=ipaddress.IPv6Network("fc00::/18")),
        "appliance": app,
    }
    base.update(kw)
    return Config(**base)


def new_ns() -> str:
    name = f"gw-cap-{uuid.uuid4().hex[:8]}"
    run("ip", "netns", "add", name)
    run("ip", "link", "set", "lo", "up", ns=name)
    return name


def _temp_ns() -> Iterator[str]:
    name = new_ns()
    try:
        yield name
    finally:
        run("ip", "netns", "delete", name, check=False)


# Two namespaces for the tests that compare what two captures load.
ns = pytest.fixture(_temp_ns, name="ns")
ns2 = pytest.fixture(_temp_ns, name="ns2")


def nft_table(ns: str, table: str = TABLE, family: str = "inet") -> list[dict[str, Any]] | None:
    """The table's objects from `nft -j`, handles stripped; None if absent."""
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", family, table],
                       capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        assert "No such file or directory" in r.stderr, r.stderr
        return None
    out = []
    for item in json.loads(r.stdout)["nftables"]:
        if "metainfo" in item:
            continue
        (kind, body), = item.items()
        out.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return out


def tables(ns: str) -> set[tuple[str, str]]:
    listing = json.loads(run("nft", "-j", "list", "tables", ns=ns))["nftables"]
    return {(t["table"]["family"], t["table"]["name"]) for t in listing if "table" in t}


def ip_rules(ns: str, v6: bool = False) -> list[dict[str, Any]]:
    out = json.loads(run("ip", "-6" if v6 else "-4", "-j", "rule", ns=ns))
    return [r for r in out if r.get("fwmark") is not None]


def routes(ns: str, v6: bool = False) -> list[dict[str, Any]]:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-6" if v6 else "-4", "-j", "route", "show",
         "table", str(RT)], capture_output=True, text=True, timeout=30, check=False)
    # An empty table is reported as an error by some iproute2 versions.
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else []


def rules_of(objs: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [o["rule"]["expr"] for o in objs if "rule" in o and o["rule"]["chain"] == chain]


def assert_policy_routing(ns: str) -> None:
    for v6 in (False, True):
        rules = ip_rules(ns, v6)
        assert [(r["fwmark"], r["table"]) for r in rules] == [(hex(MARK), str(RT))], rules
        rts = routes(ns, v6)
        assert [(r["type"], r["dst"], r["dev"]) for r in rts] == [("local", "default", "lo")], rts


def assert_nothing_left(ns: str) -> None:
    assert nft_table(ns) is None
    for v6 in (False, True):
        assert ip_rules(ns, v6) == []
        assert routes(ns, v6) == []


def test_apply_installs_table_and_policy_routing(ns: str) -> None:
    capture(ns, make_cfg(), "apply")
    objs = nft_table(ns)
    assert objs is not None
    chains = {o["chain"]["name"]: o["chain"] for o in objs if "chain" in o}
    assert chains["prerouting"]["hook"] == "prerouting" and chains["prerouting"]["prio"] == -150
    assert chains["input"]["hook"] == "input"
    sets = {o["set"]["name"]: o["set"] for o in objs if "set" in o}
    assert sets["lan"]["elem"] == "gwlan0" or sets["lan"]["elem"] == ["gwlan0"]
    assert {"prefix": {"addr": "198.18.0.0", "len": 16}} in sets["fake4"]["elem"]
    assert {"prefix": {"addr": "192.168.0.0", "len": 16}} in sets["bypass4"]["elem"]
    assert {"prefix": {"addr": "fc00::", "len": 18}} in sets["fake6"]["elem"]
    pre = rules_of(objs, "prerouting")
    tproxies = [x["tproxy"] for e in pre for x in e if "tproxy" in x]
    assert {"family": "ip", "port": 7893} in tproxies
    assert {"family": "ip6", "port": 7893} in tproxies
    # DNS hijack: TPROXY to dns.listen's port (the wildcard: the address of
    # the interface the query came in on), both families; no NAT.
    assert {"family": "ip", "addr": "0.0.0.0", "port": 1053} in tproxies
    assert {"family": "ip6", "addr": "::", "port": 1053} in tproxies
    assert "dns" not in chains
    assert sets["hijack4"]["elem"] in (53, [53]) and sets["hijack6"]["elem"] in (53, [53])
    # The WAN wall: Mirage's ports, from the LAN and loopback only.
    assert set(sets["served_ports"]["elem"]) == {1053, 7893}
    wall = rules_of(objs, "input")[0]
    assert wall[-1] == {"drop": None}
    assert {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "@lan"}} in wall
    assert {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "lo"}} in wall
    assert_policy_routing(ns)


def test_rules_prints_what_run_applies(ns: str, ns2: str) -> None:
    # `mirage rules` output loaded with nft -f and what NftablesCapture.apply
    # leaves in the kernel are the same table, whatever the config leaves out.
    for cfg in (
        make_cfg(),
        make_cfg(ipv6=False, routing_mark=None, dns=DnsConfig(listen=Listen("10.0.0.1", 53))),
        make_cfg(appliance=ApplianceConfig(lan=(), dns_hijack=False)),
        make_cfg(appliance=ApplianceConfig(lan=("gwlan0",), offload_direct=True)),
        make_cfg(ipv6=False, appliance=ApplianceConfig(lan=("gwlan0",), offload_direct=True)),
    ):
        capture(ns, cfg, "apply")
        run("nft", "-f", "-", ns=ns2, input=render_text(cfg))
        a, b = nft_table(ns), nft_table(ns2)
        assert a is not None and a == b


def test_remove_leaves_nothing_and_twice_is_fine(ns: str) -> None:
    cfg = make_cfg()
    capture(ns, cfg, "apply")
    capture(ns, cfg, "remove")
    assert_nothing_left(ns)
    capture(ns, cfg, "remove")
    assert_nothing_left(ns)


def test_crashed_run_leftovers_are_replaced(ns: str) -> None:
    cfg = make_cfg()
    capture(ns, cfg, "apply")
    fresh = nft_table(ns)
    # A crashed run left the table (with a rule someone added by hand), a
    # duplicate ip rule and the route.
    run("nft", "add", "rule", "inet", TABLE, "prerouting", "counter", ns=ns)
    run("ip", "rule", "add", "fwmark", hex(MARK), "lookup", str(RT), ns=ns)
    assert nft_table(ns) != fresh
    capture(ns, cfg, "apply")
    assert nft_table(ns) == fresh
    assert_policy_routing(ns)
    capture(ns, cfg, "remove")
    assert_nothing_left(ns)


def test_other_tables_are_never_touched(ns: str) -> None:
    foreign = """
    table inet gw-foreign {
        set s { type ipv4_addr; elements = { 10.9.9.9 } }
        chain pre { type filter hook prerouting priority -150; policy accept; counter; }
        chain out { type filter hook output priority 0; policy accept; ip daddr @s drop; }
    }
    table ip gw-foreign4 { chain c { type nat hook prerouting priority -100; }; }
    """
    run("nft", "-f", "-", ns=ns, input=foreign)
    before = (nft_table(ns, "gw-foreign"), nft_table(ns, "gw-foreign4", "ip"))
    cfg = make_cfg()
    capture(ns, cfg, "apply")
    capture(ns, cfg, "apply")
    assert tables(ns) == {("inet", "gw-foreign"), ("ip", "gw-foreign4"), ("inet", TABLE)}
    capture(ns, cfg, "remove")
    assert tables(ns) == {("inet", "gw-foreign"), ("ip", "gw-foreign4")}
    assert (nft_table(ns, "gw-foreign"), nft_table(ns, "gw-foreign4", "ip")) == before


def test_table_name_is_configurable(ns: str) -> None:
    cfg = make_cfg()
    capture(ns, cfg, "apply", table="gw-a")
    assert ("inet", "gw-a") in tables(ns) and ("inet", TABLE) not in tables(ns)
    capture(ns, cfg, "remove", table="gw-a")
    assert tables(ns) == set()


def test_refused_batch_changes_nothing(ns: str) -> None:
    # An interface name too long for ifname makes the kernel refuse the batch:
    # nothing (neither table nor routing) may be left behind.
    cfg = make_cfg(appliance=ApplianceConfig(lan=("x" * 40,), capture_mark=MARK, route_table=RT))
    r = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", APPLY],
        input=pickle.dumps((cfg, TABLE, "apply")), capture_output=True, timeout=30, check=False,
    )
    assert r.returncode != 0
    assert b"CaptureError" in r.stderr
    assert_nothing_left(ns)


OFFLOAD = """
import ipaddress, json, pickle, subprocess, sys, trio
from appliance.capture.nftables import NftablesCapture
from appliance.capture.offload import DirectOffload
from appliance.fakeip.pool import FakeIPPool
cfg = pickle.load(sys.stdin.buffer)
capture = NftablesCapture(cfg)
capture.apply()
def elements():
    out = subprocess.run(["nft", "-j", "list", "map", "inet", "mirage", "offload4"],
                         capture_output=True, text=True, check=True).stdout
    maps = [o["map"] for o in json.loads(out)["nftables"] if "map" in o]
    return {e[0]["elem"]["val"]: [e[1], e[0]["elem"]["timeout"]]
            for e in maps[0].get("elem", [])}
def pins(pool):
    return {d: n for d, _ip, n in pool.mappings()}
async def main():
    pool = FakeIPPool(cfg.dns.fake_ip_range)
    a, b, c = pool.allocate("a.test"), pool.allocate("b.test"), pool.allocate("c.test")
    off = DirectOffload(pool, lan=cfg.appliance.lan)
    seen = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(off.serve)
        off.offer(a, "a.test", ipaddress.ip_address("192.0.2.1"), 2.5)
        off.offer(b, "b.test", ipaddress.ip_address("192.0.2.2"), 60)
        # c's address is a host on the LAN side (gwlan0): never offloaded.
        off.offer(c, "c.test", ipaddress.ip_address("10.9.0.5"), 60)
        await trio.sleep(0.5)
        seen["added"], seen["pins_added"] = elements(), pins(pool)
        off.offer(c, "c.test", ipaddress.ip_address("10.9.0.5"), 60)  # not asked again
        await trio.sleep(0.2)
        seen["offered_after_refusal"] = off.offered
        await trio.sleep(3.5)  # a: 2 s in the kernel, +1 s grace for the pin
        seen["expired"], seen["pins_expired"] = elements(), pins(pool)
        await off.clear()
        seen["cleared"], seen["pins_cleared"] = elements(), pins(pool)
        seen["stats"] = off.stats()
        nursery.cancel_scope.cancel()
    capture.remove()
    print(json.dumps(seen))
trio.run(main)
"""


def test_offload_elements_time_out_and_unpin(ns: str) -> None:
    # The DirectOffload service against a real table: elements land in the
    # map with the TTL as timeout, the kernel drops them when it runs out and
    # the pool pin goes with it; a clear (reload) empties the map.
    cfg = make_cfg(ipv6=False, appliance=ApplianceConfig(lan=("gwlan0",), offload_direct=True))
    # A LAN interface with a subnet, and a default route out of another one.
    # (veth pairs: this kernel has no dummy links.)
    for dev in ("gwlan0", "gwwan0"):
        run("ip", "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p", ns=ns)
    run("ip", "addr", "add", "10.9.0.1/24", "dev", "gwlan0", ns=ns)
    run("ip", "addr", "add", "192.0.2.100/24", "dev", "gwwan0", ns=ns)
    for dev in ("gwlan0", "gwlan0p", "gwwan0", "gwwan0p"):
        run("ip", "link", "set", dev, "up", ns=ns)
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", OFFLOAD],
                       input=pickle.dumps(cfg), capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr.decode()
    seen = json.loads(r.stdout)
    assert seen["added"] == {"198.18.0.1": ["192.0.2.1", 2], "198.18.0.2": ["192.0.2.2", 60]}
    assert seen["pins_added"] == {"a.test": 1, "b.test": 1, "c.test": 0}
    assert seen["offered_after_refusal"] == 3
    assert seen["expired"] == {"198.18.0.2": ["192.0.2.2", 60]}
    assert seen["pins_expired"] == {"a.test": 0, "b.test": 1, "c.test": 0}
    assert seen["cleared"] == {}
    assert seen["pins_cleared"] == {"a.test": 0, "b.test": 0, "c.test": 0}
    assert seen["stats"] == {"offloaded": 0, "offered": 3, "failures": 0}
    assert_nothing_left(ns)


OFFLOAD_NO_TABLE = """
import ipaddress, json, trio
from appliance.capture.offload import DirectOffload
from appliance.fakeip.pool import FakeIPPool
async def main():
    pool = FakeIPPool(ipaddress.IPv4Network("198.18.0.0/16"))
    a = pool.allocate("a.test")
    off = DirectOffload(pool)
    async with trio.open_nursery() as nursery:
        await nursery.start(off.serve)
        off.offer(a, "a.test", ipaddress.ip_address("192.0.2.1"), 60)
        await trio.sleep(0.5)
        print(json.dumps([off.stats(), {d: n for d, _ip, n in pool.mappings()},
                          pool.stats()["unbalanced_unpins"]]))
        nursery.cancel_scope.cancel()
trio.run(main)
"""


def test_offload_without_its_table_fails_per_batch_and_unpins(ns: str) -> None:
    # nftables refuses the elements (no table: Mirage's capture is gone or
    # was never applied): counted, logged, the pin released, nothing raised.
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", OFFLOAD_NO_TABLE],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    stats, pins, unbalanced = json.loads(r.stdout)
    assert stats == {"offloaded": 0, "offered": 1, "failures": 1}
    assert pins == {"a.test": 0} and unbalanced == 0
    assert "stay on the userspace path" in r.stderr
