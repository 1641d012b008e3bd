"""End to end under both capture backends, and what only the eBPF one must show.

Real clients in the lab's client namespace, `mirage run` in the gateway
namespace with `appliance.redirect` set to `nftables` or `ebpf`, real servers
upstream. The parametrized checks assert on what the client received; the
eBPF-only ones read kernel state with independent tools (`nft -j`, `tc -j`,
`ip -j`) and the program's counters through `mirage status` (the control
API).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab_client import FAKE, connect_outcome, curl, dig, hijacked_answer, same_port_twice

from appliance.lab.lab import Lab
from appliance.lab.mirage import BackendRuns, MirageRun, lab_config

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BACKENDS = ["nftables", "ebpf"]
HONEST = "192.168.57.53"  # unbound also answers plain DNS: the bypass target


def gw_json(lab: Lab, *argv: str) -> Any:
    return json.loads(lab.exec("gateway", list(argv)).stdout or "null")


def tc_filters(lab: Lab, dev: str = "lan0") -> list[dict[str, Any]]:
    return gw_json(lab, "tc", "-j", "filter", "show", "dev", dev, "ingress") or []


def capture_filters(lab: Lab) -> list[dict[str, Any]]:
    """The capture program's filters (the kernel DNS answerer has its own)."""
    return [f for f in tc_filters(lab)
            if f.get("options", {}).get("bpf_name") == "mirage_tc:mirage_ingress"]


def qdisc_kinds(lab: Lab, dev: str = "lan0") -> list[str]:
    return [q["kind"] for q in gw_json(lab, "tc", "-j", "qdisc", "show", "dev", dev)]


def nft_rules(lab: Lab) -> list[dict[str, Any]]:
    data = gw_json(lab, "nft", "-j", "list", "ruleset")
    return [o["rule"] for o in data["nftables"] if "rule" in o]


def no_nft_capture(lab: Lab) -> bool:
    """Mirage's table is there for the WAN wall only: its capture interface
    set is empty, and no other table captures or translates."""
    data = gw_json(lab, "nft", "-j", "list", "ruleset")["nftables"]
    sets = {o["set"]["name"]: o["set"] for o in data
            if "set" in o and o["set"]["table"] == "mirage"}
    others = json.dumps([o for o in data if "rule" in o and o["rule"]["table"] != "mirage"])
    return "elem" not in sets["capture_lan"] and not any(
        w in others for w in ("tproxy", "redirect", "dnat"))


def sk_lookup_links(lab: Lab) -> int:
    """BPF links of type sk_lookup attached to the gateway's namespace."""
    ino = Path(f"/run/netns/{lab.ns('gateway')}").stat().st_ino
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True, timeout=30).stdout or "[]")
    return sum(1 for link in links
               if link.get("attach_type") == "sk_lookup" and link.get("netns_ino") == ino)


def status(lab: Lab, run: MirageRun) -> dict[str, Any]:
    out: dict[str, Any] = gw_json(lab, sys.executable, "-m", "appliance", "status", "-c",
                                  str(run.config_path), "--json")
    return out


Runs = BackendRuns


@pytest.fixture
def runs(lab: Lab) -> Iterator[Runs]:
    r = Runs(lab, name="ebpf-e2e")
    try:
        yield r
    finally:
        r.close()


# ------------------------------------------------------- both backends, same story


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_ips_reach_the_right_site_through_each_outbound(lab: Lab, runs: Runs,
                                                             backend: str) -> None:
    runs.start(backend, appliance={"bypass": [f"{HONEST}/32"]})
    # SOCKS5 (dante), HTTP CONNECT (tinyproxy), DIRECT: by the name behind
    # the fake IP the client's resolver (hijacked) gave it.
    for name, marker in (("alpha", "MARKER-ALPHA"), ("beta", "MARKER-BETA"),
                         ("gamma", "MARKER-GAMMA")):
        code, body, _ = curl(lab, f"http://www.{name}.test/")
        assert code == 0 and marker in body, (backend, name, code, body[-300:])
    # DNS hijack: port 53 to the poisoned resolver answers a fake IP, over
    # UDP and TCP, from the address asked.
    hijacked_answer(lab, str(lab.topology.poisoned_resolver.address), "www.beta.test")
    # Bypass: the honest resolver is asked for real and answers the real IP.
    assert dig(lab, f"@{HONEST}", "+short", "www.alpha.test") == "192.168.57.10"
    # An unmapped fake IP: the gateway resets the connection.
    assert connect_outcome(lab, "198.18.254.254", 80, 3)[0] == "reset"
    # Loop guard: tproxy-port on the gateway's own address never reaches the
    # listener (nftables rejects, eBPF drops); the gateway keeps serving.
    assert connect_outcome(lab, lab.addr("gateway", "lan0"), 7893, 1)[0] != "data"
    # From the gateway itself (loopback, which no backend captures): the
    # listener resets a connection to its own port instead of relaying it.
    local = lab.exec("gateway", [sys.executable, "-c", (
        "import socket\n"
        "try:\n"
        "  s=socket.create_connection(('127.0.0.1',7893),timeout=3)\n"
        "  s.sendall(b'x'); print('data' if s.recv(100) else 'closed')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except ConnectionResetError: print('reset')\n")]).stdout.strip()
    assert local in ("refused", "reset"), local
    assert curl(lab, "http://www.gamma.test/")[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_flow_on_a_recent_flows_ports_is_not_stalled(lab: Lab, runs: Runs,
                                                          backend: str) -> None:
    # Mirage closes first toward the client, so the gateway keeps the first
    # flow's socket in TIME_WAIT; the second SYN, same addresses and ports,
    # must reach the listener, not that dead socket (which answers with an
    # ACK: the client resets and retries after its retransmission timeout).
    runs.start(backend)
    fake = dig(lab, "+short", "www.gamma.test")
    lines, resets = same_port_twice(lab, fake, "www.gamma.test")
    assert lines == ["HTTP/1.1 200 OK"] * 2
    assert resets == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_hijack_answers_from_port_53_when_dns_listens_elsewhere(lab: Lab, runs: Runs,
                                                                backend: str) -> None:
    # The DNS service on 1053: nftables redirects through conntrack; eBPF
    # assigns the socket and the service answers from the asked address and
    # port itself (no NAT anywhere).
    runs.start(backend, dns={"listen": "0.0.0.0:1053"})
    hijacked_answer(lab, str(lab.topology.poisoned_resolver.address), "www.alpha.test")
    code, body, _ = curl(lab, "http://www.alpha.test/")
    assert code == 0 and "MARKER-ALPHA" in body


ECHO = Path(__file__).resolve().parents[2] / "bench" / "udp_echo.py"
ECHO_PORT = 9998

# One exchange from a connected UDP socket: (fake IP, reply source, reply).
EXCHANGE = """
import json, socket, sys
name, port, family = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ip = socket.getaddrinfo(name, port, family, socket.SOCK_DGRAM)[0][4][0]
c = socket.socket(family, socket.SOCK_DGRAM); c.settimeout(3)
c.connect((ip, port)); c.send(b"ping")
try:
    data, src = c.recvfrom(4096); print(json.dumps([ip, data.decode(), list(src)[:2]]))
except TimeoutError:
    print(json.dumps([ip, None, None]))
"""


@pytest.fixture(scope="module")
def echo(lab: Lab) -> Iterator[None]:
    addrs = [f"{a}:{ECHO_PORT}" for a in ("192.168.57.10", "192.168.57.12")]
    addrs += [f"[{a}]:{ECHO_PORT}" for a in ("fd57::10", "fd57::12")]
    proc = lab.popen("upstream", [sys.executable, str(ECHO), "--tag", "--max-seconds", "300",
                                  *addrs], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def exchange(lab: Lab, name: str, family: int = 2) -> tuple[str, str | None, Any]:
    r = lab.exec("client", [sys.executable, "-c", EXCHANGE, name, str(ECHO_PORT),
                            str(family)], timeout=20)
    assert r.returncode == 0, r.stderr
    ip, data, src = json.loads(r.stdout)
    return ip, data, src


@pytest.mark.parametrize("backend", BACKENDS)
def test_udp_to_a_fake_ip_comes_back_from_it(lab: Lab, runs: Runs, echo: None,
                                             backend: str) -> None:
    runs.start(backend)
    for name in ("www.gamma.test", "www.alpha.test"):  # DIRECT, SOCKS5 UDP ASSOCIATE
        ip, data, src = exchange(lab, name)
        assert FAKE.match(ip)
        assert data is not None and data.startswith("ping"), (name, data)
        # A connected socket only accepts the fake IP and port as source.
        assert src == [ip, ECHO_PORT]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_fake_range_tcp_udp_and_hijack(lab: Lab, runs: Runs, echo: None,
                                            backend: str) -> None:
    runs.start(backend, ipv6=True,
               dns={"listen": "[::]:53", "ipv6": True, "fake-ip-range6": "fdfe:dcba:9876::/64"})
    poisoned = str(lab.topology.poisoned_resolver.address)
    fake6 = dig(lab, f"@{poisoned}", "+short", "AAAA", "www.gamma.test")
    assert fake6.startswith("fdfe:dcba:9876:"), fake6
    r = lab.exec("client", ["curl", "-s", "-6", "-m", "8", "-g", f"http://[{fake6}]/",
                            "-H", "Host: www.gamma.test"], timeout=20)
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stdout[-300:]
    ip, data, src = exchange(lab, "www.gamma.test", family=10)
    assert ip == fake6 and data is not None and src == [fake6, ECHO_PORT]
    # Hijack over IPv6: a query to an IPv6 resolver address is answered by
    # Mirage (nobody serves DNS on fd57::153: only a hijack can answer).
    out = dig(lab, "@fd57::153", "+short", "www.alpha.test")
    assert FAKE.match(out), out


# ---------------------------------------------------------------- eBPF only


def test_ebpf_holds_no_tproxy_rule_and_its_counters_move(lab: Lab, runs: Runs) -> None:
    run = runs.start("ebpf")
    # No capture in nftables: Mirage's table captures on no interface (its
    # input chain is the WAN wall); the program does the capture.
    assert no_nft_capture(lab)
    filters = [f for f in tc_filters(lab) if "options" in f]
    # The kernel DNS answerer first (dns.kernel-answers), then the capture.
    assert [f["options"]["bpf_name"] for f in filters] == [
        "mirage_dns:mirage_dns_answer", "mirage_tc:mirage_ingress"]
    assert all(f["options"]["direct-action"] is True for f in filters)
    before = status(lab, run)["counters"]["capture"]
    assert curl(lab, "http://www.alpha.test/")[0] == 0
    poisoned = str(lab.topology.poisoned_resolver.address)
    assert FAKE.match(dig(lab, f"@{poisoned}", "+short", "www.gamma.test"))
    after = status(lab, run)["counters"]["capture"]
    assert after["tcp_listener"] > before["tcp_listener"]
    assert after["tcp_established"] > before["tcp_established"]
    assert after["dns_udp"] > before["dns_udp"]
    assert after["drop_no_listener"] == before["drop_no_listener"]
    # Still no nftables capture after traffic: the program did it.
    assert no_nft_capture(lab)
    # Prometheus shows the program's counters (app.counters() -> "capture").
    metrics = lab.exec("gateway", ["curl", "-s", "http://127.0.0.1:9090/metrics"]).stdout
    assert re.search(r"^mirage_capture_tcp_listener\S* [1-9]", metrics, re.M), metrics[-800:]
    # Per-client counters: the LAN client, by address, in status and metrics.
    client_ip = lab.addr("client", "lan0")
    rows = {r["address"]: r for r in status(lab, run)["clients"]}
    assert rows[client_ip]["captured_packets"] > 0 and rows[client_ip]["bytes"] > 0
    assert re.search(
        rf'^mirage_capture_client_captured_packets_total{{client="{re.escape(client_ip)}"}} [1-9]',
        metrics, re.M), metrics[-800:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ebpf_exit_leaves_no_filter_qdisc_rule_or_route(lab: Lab, runs: Runs,
                                                         sig: int) -> None:
    assert "clsact" not in qdisc_kinds(lab)
    run = runs.start("ebpf")
    assert "clsact" in qdisc_kinds(lab)
    assert sk_lookup_links(lab) == 1  # linked to the gateway's namespace only
    assert run.stop(sig) == 0
    assert sk_lookup_links(lab) == 0
    assert tc_filters(lab) == []
    assert "clsact" not in qdisc_kinds(lab)  # Mirage created it: removed
    for family in ("-4", "-6"):
        rules = gw_json(lab, "ip", family, "-j", "rule", "show")
        assert all(r.get("table") != "233" for r in rules), rules
    assert lab.exec("gateway", ["ip", "route", "show", "table", "233"]).stdout.strip() == ""


def test_ebpf_keeps_a_clsact_it_did_not_create(lab: Lab, runs: Runs) -> None:
    lab.exec("gateway", ["tc", "qdisc", "add", "dev", "lan0", "clsact"])
    try:
        run = runs.start("ebpf")
        assert run.stop() == 0
        assert tc_filters(lab) == []
        assert "clsact" in qdisc_kinds(lab)
    finally:
        lab.exec("gateway", ["tc", "qdisc", "del", "dev", "lan0", "clsact"])


def test_ebpf_after_a_crash_replaces_the_leftover_filter(lab: Lab, runs: Runs) -> None:
    first = runs.start("ebpf")
    fake = dig(lab, "+short", "www.alpha.test")
    first.kill()
    # The crashed run's program stays attached (fake-range traffic is dropped,
    # never forwarded); a new run replaces it. Its sk_lookup link was a file
    # descriptor of the dead process: gone with it.
    assert len(capture_filters(lab)) == 1
    assert sk_lookup_links(lab) == 0
    second = runs.start("ebpf")
    assert len(capture_filters(lab)) == 1
    assert sk_lookup_links(lab) == 1
    # The kill came before any flush: the name's old address may be held
    # back (a client may still hold it), so only the range is certain.
    again = dig(lab, "+short", "www.alpha.test")
    assert FAKE.match(again) and FAKE.match(fake)
    assert curl(lab, "http://www.alpha.test/")[0] == 0
    assert second.stop() == 0
    assert tc_filters(lab) == []
    assert "clsact" not in qdisc_kinds(lab)


def test_nftables_run_removes_an_ebpf_leftover(lab: Lab, runs: Runs) -> None:
    runs.start("ebpf").kill()
    run = runs.start("nftables")
    # Only the kernel DNS answerer, which runs with either backend.
    assert capture_filters(lab) == []
    assert [f["options"]["bpf_name"] for f in tc_filters(lab) if "options" in f] == [
        "mirage_dns:mirage_dns_answer"]
    assert curl(lab, "http://www.beta.test/")[0] == 0
    assert run.stop() == 0


def test_auto_picks_ebpf(lab: Lab, runs: Runs) -> None:
    run = runs.start("auto")
    assert "capture: eBPF tc ingress on lan0" in run.log_text()
    assert no_nft_capture(lab)
    assert curl(lab, "http://www.gamma.test/")[0] == 0


def test_auto_falls_back_to_nftables_with_a_warning(lab: Lab, runs: Runs) -> None:
    # The program parses Ethernet: a non-Ethernet LAN interface (lo here)
    # makes eBPF refuse, and `auto` runs nftables instead.
    run = runs.start("auto", appliance={"lan": ["lo"]})
    log = run.log_text()
    assert "falls back to nftables" in log and "not an Ethernet interface" in log
    assert "tproxy" in json.dumps(nft_rules(lab))
    assert gw_json(lab, "tc", "-j", "filter", "show", "dev", "lo", "ingress") in ([], None)


def test_two_labs_at_once_do_not_interfere() -> None:
    labs = [Lab("ebpfa"), Lab("ebpfb")]
    made: list[Lab] = []
    running: list[MirageRun] = []
    try:
        for lab in labs:
            made.append(lab.up())
        for lab in labs:
            running.append(MirageRun(lab, lab_config(lab, appliance={"redirect": "ebpf"}))
                           .start())
        for lab in labs:
            code, body, _ = curl(lab, "http://www.alpha.test/")
            assert code == 0 and "MARKER-ALPHA" in body
        # Stopping one leaves the other capturing.
        assert running[0].stop() == 0
        assert tc_filters(labs[0]) == []
        assert len(capture_filters(labs[1])) == 1
        code, body, _ = curl(labs[1], "http://www.beta.test/")
        assert code == 0 and "MARKER-BETA" in body
        assert running[1].stop() == 0
        assert tc_filters(labs[1]) == []
    finally:
        for run in running:
            run.kill()
        for lab in made:
            lab.down()


def test_ebpf_load_failure_is_a_clear_error(lab: Lab) -> None:
    # A non-Ethernet LAN interface: refused with the fix, exit 1, nothing left.
    cfg = lab_config(lab, appliance={"redirect": "ebpf", "lan": ["lo"]})
    run = MirageRun(lab, cfg, name="ebpf-e2e-bad")
    with pytest.raises(Exception, match="redirect: nftables"):
        run.start(timeout=20)
    assert run.proc is not None and run.proc.returncode == 1
    assert gw_json(lab, "tc", "-j", "filter", "show", "dev", "lo", "ingress") in ([], None)
    time.sleep(0)


def test_mirage_rules_prints_the_ebpf_plan(tmp_path: Path) -> None:
    cfg = tmp_path / "ebpf.yaml"
    cfg.write_text("tproxy-port: 7893\nrouting-mark: 255\n"
                   "dns:\n  nameserver: [\"udp://192.0.2.53\"]\n"
                   "appliance:\n  lan: [lan0]\n  redirect: ebpf\n  bypass: [10.9.0.0/16]\n")
    r = subprocess.run([sys.executable, "-m", "appliance", "rules", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert "appliance.redirect: ebpf" in r.stdout
    assert "tc filter replace dev lan0 ingress" in r.stdout
    assert "#   10.9.0.0/16" in r.stdout
    assert "ip rule add fwmark 0x233 lookup 233" in r.stdout
    assert "tproxy" not in r.stdout.replace("tproxy-port", "")
