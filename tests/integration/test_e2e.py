"""End to end: real clients in the lab's client namespace, `mirage run` in the
gateway namespace, real servers upstream (nginx, dante, tinyproxy, unbound
DoH, poisoned dnsmasq). Every test asserts on what the client received, and
checks kernel state with independent tools (nft, ip), never with Mirage's
own view of itself.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from lab_client import FAKE, client, connect_outcome, curl, dig, hijacked_answer

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, MirageRuns

pytestmark = pytest.mark.netns


@pytest.fixture
def mirage(runs: MirageRuns) -> MirageRun:
    return runs.start()


def raw_http(lab: Lab, ip: str, host: str, port: int = 80) -> str:
    script = (
        "import socket\n"
        f"s=socket.create_connection(({ip!r},{port}),timeout=5)\n"
        f"s.sendall(b'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n')\n"
        "d=b''\n"
        "while (c:=s.recv(4096)): d+=c\n"
        "print(d.decode(errors='replace'))\n"
    )
    return client(lab, sys.executable, "-c", script)


# --------------------------------------------------------------------------- DNS


def test_normal_name_gets_a_fake_ip_with_ttl_1_authoritative(lab: Lab, mirage: MirageRun) -> None:
    gw = lab.addr("gateway", "lan0")
    answer = dig(lab, f"@{gw}", "+noall", "+answer", "www.alpha.test")
    name, ttl, _cls, rtype, value = answer.split()
    assert (name, ttl, rtype) == ("www.alpha.test.", "1", "A")
    assert FAKE.match(value)
    flags = dig(lab, f"@{gw}", "+noall", "+comments", "www.alpha.test")
    assert re.search(r"flags: qr aa rd ra;", flags), flags
    # One name, one fake IP: asking again (any case) gives the same address.
    assert dig(lab, f"@{gw}", "+short", "WWW.Alpha.Test") == value


def test_aaaa_is_empty_noerror_when_ipv6_is_off(lab: Lab, mirage: MirageRun) -> None:
    gw = lab.addr("gateway", "lan0")
    out = dig(lab, f"@{gw}", "+noall", "+comments", "+answer", "AAAA", "www.alpha.test")
    assert "status: NOERROR" in out and "ANSWER: 0," in out


def test_filtered_name_gets_its_real_address_over_doh(lab: Lab, mirage: MirageRun) -> None:
    assert dig(lab, "+short", "time.ntp.test") == "192.168.57.123"
    # The poisoned resolver would have said .10 (see topology.yaml): the
    # answer came from the honest DoH server, and dnsmasq never saw a query
    # for it after hijack.
    assert "time.ntp.test" not in lab.log("dnsmasq").read_text()


def test_other_types_pass_through_to_the_upstream(lab: Lab, mirage: MirageRun) -> None:
    assert dig(lab, "+short", "MX", "alpha.test") == "10 mail.alpha.test."
    assert dig(lab, "+short", "TXT", "alpha.test") == '"mirage-lab alpha"'


def test_ptr_of_a_fake_ip_answers_the_domain(lab: Lab, mirage: MirageRun) -> None:
    fake = dig(lab, "+short", "www.gamma.test")
    assert FAKE.match(fake)
    assert dig(lab, "+short", "-x", fake) == "www.gamma.test."
    # An unmapped address inside the fake range: NXDOMAIN, answered locally.
    assert "status: NXDOMAIN" in dig(lab, "+noall", "+comments", "-x", "198.18.255.1")


def test_hijack_of_port_53_to_another_resolver_udp_and_tcp(lab: Lab, mirage: MirageRun) -> None:
    poisoned = str(lab.topology.poisoned_resolver.address)
    hijacked_answer(lab, poisoned, "www.beta.test")


def test_bypass_destination_is_not_captured(lab: Lab, runs: MirageRuns) -> None:
    poisoned = str(lab.topology.poisoned_resolver.address)
    runs.start(appliance={"bypass": [f"{poisoned}/32"]})
    # Queries to the bypassed resolver reach it: the poisoned answer comes back.
    assert dig(lab, f"@{poisoned}", "+short", "www.alpha.test") == "192.168.57.12"


def test_same_fake_ip_after_restart_and_after_a_crash(lab: Lab, runs: MirageRuns) -> None:
    first = runs.start()
    fake = dig(lab, "+short", "www.alpha.test")
    assert FAKE.match(fake)
    time.sleep(0.5)  # > store-flush-interval (0.2 s): the mapping is on disk
    first.stop()
    second = runs.start()
    assert dig(lab, "+short", "www.alpha.test") == fake
    # A client that cached the fake IP still reaches the right site.
    assert "MARKER-ALPHA" in raw_http(lab, fake, "www.alpha.test")
    other = dig(lab, "+short", "www.beta.test")
    time.sleep(0.5)
    second.kill()  # crash: no final flush, capture rules left behind
    runs.start()  # replaces the crashed run's leftovers
    assert dig(lab, "+short", "www.beta.test") == other
    assert "MARKER-BETA" in raw_http(lab, other, "www.beta.test")
    tables = lab.exec("gateway", ["nft", "-j", "list", "tables"]).stdout
    names = [t["table"]["name"] for t in json.loads(tables)["nftables"] if "table" in t]
    assert names.count("mirage") == 1


def test_upstream_down_answers_servfail_in_bounded_time(lab: Lab, runs: MirageRuns) -> None:
    # 192.168.57.54 is on the WAN subnet but nobody has it: packets vanish.
    runs.start(dns={"nameserver": ["https://192.168.57.54/dns-query"],
                    "upstream-timeout": 1.5})
    t0 = time.monotonic()
    out = dig(lab, "+noall", "+comments", "time.ntp.test")
    elapsed = time.monotonic() - t0
    assert "status: SERVFAIL" in out
    assert elapsed < 3.0, elapsed
    # Fake-IP answers need no upstream and keep working meanwhile.
    assert FAKE.match(dig(lab, "+short", "www.alpha.test"))


def test_garbage_packets_do_not_stop_the_dns_service(lab: Lab, mirage: MirageRun) -> None:
    gw = lab.addr("gateway", "lan0")
    script = (
        "import os,random,socket\n"
        "random.seed(7)\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for i in range(300):\n"
        "  n=random.choice([0,1,2,5,11,12,13,40,300,512,1500,4000])\n"
        f"  s.sendto(os.urandom(n),({gw!r},53))\n"
        "print('sent')\n"
    )
    assert client(lab, sys.executable, "-c", script).strip() == "sent"
    assert FAKE.match(dig(lab, f"@{gw}", "+short", "www.gamma.test"))


# ----------------------------------------------------------------------- gateway


def test_socks5_outbound_sends_the_domain_name(lab: Lab, mirage: MirageRun) -> None:
    log = lab.dante_log
    before = log.stat().st_size if log.exists() else 0
    code, body, _ = curl(lab, "http://www.alpha.test/")
    assert code == 0 and "MARKER-ALPHA" in body
    with open(log, "rb") as f:
        f.seek(before)
        new = f.read().decode(errors="replace")
    # dante (debug: 1) logs the request with ATYP 3: the name, not an address.
    assert "www.alpha.test" in new, new[-2000:]
    assert "198.18." not in new


def test_socks5_flows_use_kept_connections_closed_when_traffic_stops(
        lab: Lab, mirage: MirageRun) -> None:
    # preconnect (default 2): from the second flow on, the gateway keeps a
    # connection to dante open for the next one; every flow still gets its
    # own connection and sends the name. `ss` in the gateway namespace sees
    # the kept connection, and sees it closed once flows stop (5 s, swept
    # every 2.5 s).
    up = lab.topology.socks[0]
    log = lab.dante_log
    before = log.stat().st_size if log.exists() else 0
    for _ in range(4):
        code, body, _ = curl(lab, "http://www.alpha.test/")
        assert code == 0 and "MARKER-ALPHA" in body

    def to_dante() -> int:
        out = lab.exec("gateway", ["ss", "-Htn", "state", "established", "dst",
                                   f"{up.address}", "dport", "=", f":{up.port}"]).stdout
        return len(out.splitlines())

    kept = to_dante()
    assert 1 <= kept <= 2, kept
    with open(log, "rb") as f:
        f.seek(before)
        new = f.read().decode(errors="replace")
    # One request each (dante logs one connect to the name per request);
    # the connection still kept has sent none.
    assert new.count("socks_connecthost(): connect to www.alpha.test.80") == 4, new[-2000:]
    deadline = time.monotonic() + 10
    while to_dante() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert to_dante() == 0


def test_http_connect_outbound(lab: Lab, mirage: MirageRun) -> None:
    log = lab.log("tinyproxy")
    before = log.stat().st_size if log.exists() else 0
    code, body, _ = curl(lab, "http://www.beta.test/")
    assert code == 0 and "MARKER-BETA" in body
    with open(log, "rb") as f:
        f.seek(before)
        assert "www.beta.test" in f.read().decode(errors="replace")


def test_direct_outbound_resolves_over_doh(lab: Lab, mirage: MirageRun) -> None:
    code, body, _ = curl(lab, "http://www.gamma.test/")
    assert code == 0 and "MARKER-GAMMA" in body
    # DIRECT leaves from the gateway's WAN address (nginx echoes the peer).
    assert "from=192.168.57.1" in body


def test_https_through_the_gateway_keeps_the_name(lab: Lab, mirage: MirageRun) -> None:
    code, body, _ = curl(lab, "https://www.alpha.test/", "--cacert", str(lab.ca_path))
    assert code == 0 and "MARKER-ALPHA" in body


def test_unmapped_fake_ip_is_refused_quickly(lab: Lab, mirage: MirageRun) -> None:
    result, elapsed = connect_outcome(lab, "198.18.254.254", 80)
    assert result == "reset", result
    assert elapsed < 1.0


def test_dead_proxy_makes_new_flows_fail_fast(lab: Lab, runs: MirageRuns) -> None:
    up = lab.topology.socks[0]
    runs.start(
        proxies=[{"name": "deadsocks", "type": "socks5", "server": str(up.address),
                  "port": 1099}],
        rules=["DOMAIN-SUFFIX,alpha.test,deadsocks", "MATCH,DIRECT"],
    )
    fake = dig(lab, "+short", "www.alpha.test")
    result, elapsed = connect_outcome(lab, fake, 80)
    assert result == "reset", result
    assert elapsed < 2.0, elapsed


def test_tproxy_port_on_the_gateway_address_is_not_a_loop(lab: Lab, mirage: MirageRun) -> None:
    gw = lab.addr("gateway", "lan0")
    result, _ = connect_outcome(lab, gw, 7893)
    assert result in ("refused", "reset"), result
    # From the gateway itself over loopback: refused too, never relayed.
    script = (
        "import socket\n"
        "try:\n"
        "  s=socket.create_connection(('127.0.0.1',7893),timeout=3)\n"
        "  s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print('data' if s.recv(100) else 'closed')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except ConnectionResetError: print('reset')\n"
    )
    local = lab.exec("gateway", [sys.executable, "-c", script]).stdout.strip()
    assert local in ("refused", "reset"), local
    # And the gateway keeps serving afterwards.
    assert curl(lab, "http://www.gamma.test/")[0] == 0


def test_gateway_own_traffic_is_not_captured(lab: Lab, mirage: MirageRun) -> None:
    # The gateway host's own query to the poisoned resolver is not hijacked.
    poisoned = str(lab.topology.poisoned_resolver.address)
    out = lab.exec("gateway", ["dig", "+short", "+time=3", f"@{poisoned}", "www.alpha.test"])
    assert out.stdout.strip() == "192.168.57.12"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exit_leaves_no_table_rule_or_route(lab: Lab, runs: MirageRuns, sig: int) -> None:
    run = runs.start()
    rules = lab.exec("gateway", ["ip", "-j", "rule", "show"]).stdout
    assert any(r.get("table") == "233" for r in json.loads(rules))
    assert run.stop(sig) == 0
    tables = lab.exec("gateway", ["nft", "-j", "list", "tables"]).stdout
    assert all(t["table"]["name"] != "mirage"
               for t in json.loads(tables)["nftables"] if "table" in t)
    for family in ("-4", "-6"):
        rules = lab.exec("gateway", ["ip", family, "-j", "rule", "show"]).stdout
        assert all(r.get("table") != "233" for r in json.loads(rules)), rules
        routes = lab.exec("gateway", ["ip", family, "route", "show", "table", "233"])
        assert routes.stdout.strip() == ""


def test_control_api_shows_mappings_and_the_real_answer(lab: Lab, mirage: MirageRun) -> None:
    fake = dig(lab, "+short", "www.alpha.test")
    cfg = str(mirage.config_path)
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "mappings", "-c", cfg,
                               "--json"])
    rows = json.loads(out.stdout)
    assert {"domain": "www.alpha.test", "ip": fake, "pins": 0} in rows
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "resolve", "-c", cfg,
                               "www.alpha.test", "--json"])
    data = json.loads(out.stdout)
    assert data["mapping"] == {"ipv4": fake}
    assert [a["data"] for a in data["upstream"]["answers"]] == ["192.168.57.10"]
    status = json.loads(lab.exec("gateway", [sys.executable, "-m", "appliance", "status",
                                             "-c", cfg, "--json"]).stdout)
    assert status["counters"]["dns"]["queries"] >= 1


def test_sighup_reloads_rules_and_keeps_established_flows(lab: Lab, mirage: MirageRun) -> None:
    fake = dig(lab, "+short", "www.alpha.test")
    # A keep-alive HTTP connection through the gateway, held open across the
    # reload: one request before, one after, on the same TCP connection.
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(({fake!r},80),timeout=5)\n"
        "req=b'GET / HTTP/1.1\\r\\nHost: www.alpha.test\\r\\n\\r\\n'\n"
        "def get():\n"
        "  s.sendall(req); d=b''\n"
        "  while b'MARKER' not in d or not d.endswith(b'\\n'):\n"
        "    c=s.recv(4096)\n"
        "    if not c: break\n"
        "    d+=c\n"
        "  print(d.decode(errors='replace').split('\\r\\n\\r\\n',1)[-1].strip(), flush=True)\n"
        "get(); sys.stdin.readline(); get()\n"
    )
    held = lab.popen("client", [sys.executable, "-c", script], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)
    assert held.stdout is not None and held.stdin is not None
    first = held.stdout.readline()
    assert "MARKER-ALPHA" in first and "from=192.168.57.1 " not in first + " "

    mirage.config["rules"] = ["MATCH,DIRECT"]
    mirage.write_config()
    mirage.reload()
    deadline = time.monotonic() + 10
    while "SIGHUP: reloaded" not in mirage.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "SIGHUP: reloaded" in mirage.log_text()
    # New flows follow the new rules: alpha now goes DIRECT from the gateway.
    code, body, _ = curl(lab, "http://www.alpha.test/")
    assert code == 0 and "MARKER-ALPHA" in body and "from=192.168.57.1" in body
    # The flow opened before the reload still works, through its old outbound.
    held.stdin.write("\n")
    held.stdin.flush()
    second = held.stdout.readline()
    held.wait(timeout=10)
    held.stdin.close()
    held.stdout.close()
    assert "MARKER-ALPHA" in second and second.split("from=")[1] == first.split("from=")[1]

    # A broken file changes nothing: the appliance keeps serving.
    mirage.config_path.write_text("dns: [this is not a mapping\n")
    mirage.reload()
    deadline = time.monotonic() + 10
    while "keeping the running configuration" not in mirage.log_text() \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "keeping the running configuration" in mirage.log_text()
    assert curl(lab, "http://www.gamma.test/")[0] == 0


def test_full_fake_ip_range_recycles_lru_and_never_a_pinned_address(
        lab: Lab, runs: MirageRuns) -> None:
    """A /30 holds two mappings. A third name recycles the least recently
    used one; while live flows pin both addresses, a new name gets SERVFAIL
    (and no pinned address is handed out); when the flows end it works."""
    runs.start(dns={"fake-ip-range": "198.18.0.0/30"})
    alpha = dig(lab, "+short", "www.alpha.test")
    beta = dig(lab, "+short", "www.beta.test")
    assert {alpha, beta} == {"198.18.0.1", "198.18.0.2"}
    dig(lab, "+short", "www.beta.test")  # beta used last: alpha is the LRU
    gamma = dig(lab, "+short", "www.gamma.test")
    assert gamma == alpha  # alpha's address recycled for gamma
    assert dig(lab, "+short", "-x", gamma) == "www.gamma.test."

    # Two live keep-alive flows pin both addresses.
    script = (
        "import socket,sys\n"
        "socks=[]\n"
        "for ip,host in ((sys.argv[1],'www.beta.test'),(sys.argv[2],'www.gamma.test')):\n"
        "  s=socket.create_connection((ip,80),timeout=5)\n"
        "  s.sendall(f'GET / HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n'.encode())\n"
        "  d=b''\n"
        "  while b'MARKER' not in d: d+=s.recv(4096)\n"
        "  socks.append(s)\n"
        "print('held', flush=True); sys.stdin.readline()\n"
    )
    held = lab.popen("client", [sys.executable, "-c", script, beta, gamma],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert held.stdin is not None and held.stdout is not None
    try:
        assert held.stdout.readline().strip() == "held"
        out = dig(lab, "+noall", "+comments", "+answer", "www.alpha.test")
        assert "status: SERVFAIL" in out, out
        # The pinned mappings are untouched.
        assert dig(lab, "+short", "-x", beta) == "www.beta.test."
        assert dig(lab, "+short", "-x", gamma) == "www.gamma.test."
    finally:
        held.stdin.write("\n")
        held.stdin.close()
        held.wait(timeout=10)
        held.stdout.close()
    # Flows closed, pins released: the next name recycles again.
    deadline = time.monotonic() + 5
    answer = ""
    while time.monotonic() < deadline:
        answer = dig(lab, "+short", "www.alpha.test")
        if FAKE.match(answer):
            break
        time.sleep(0.2)
    assert answer in (beta, gamma)
