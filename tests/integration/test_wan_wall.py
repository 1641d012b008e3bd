"""Nothing of Mirage's answers the WAN; LAN DNS survives Mirage's death; IPv6 DNS is hijacked.

In the session lab, under both capture backends (`redirect: nftables` and
`ebpf`), with every port Mirage can open in use (DNS, mixed-port,
socks-port, port, tproxy-port, the control API on the wildcard):

- probed from the upstream namespace ("the internet"), at the gateway's WAN
  and LAN addresses, IPv4 and IPv6, TCP and DNS over UDP: nothing answers
  (the kernel drops it: Mirage's table's input chain), while the same
  probes from the client namespace are answered;
- after `kill -9`, the client's DNS is answered by the resolver it asked
  within 2 s, and flows to real addresses go on; `backend.remove_all` then
  leaves nothing of Mirage's (checked with nft, tc and ip);
- `dig` to an IPv6 resolver is answered by Mirage with `ipv6: false`.

What the client or the prober received is what is asserted; kernel state
is read with independent tools.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lab_client import FAKE, dig

from appliance.lab.lab import Lab
from appliance.lab.mirage import BackendRuns, MirageRun

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BACKENDS = ["nftables", "ebpf"]
PORTS = {"dns": 53, "mixed": 7890, "socks": 7891, "http": 7892, "tproxy": 7893, "api": 9090}
POISONED_ALPHA = "192.168.57.12"  # what the lab's poisoned resolver says for www.alpha.test

# Probes run inside a namespace, all at once (threads): each target is
# (kind, address, port) with kind "tcp" (connect, send a line, read) or
# "dns" (a DNS query over UDP); the outcome is "answered", "refused",
# "reset" or "silent" (nothing within the timeout).
PROBE = r"""
import json, socket, sys, threading
from dnslib import DNSRecord
targets, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
out = {}
def probe(kind, addr, port):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    key = f"{kind} {addr} {port}"
    try:
        if kind == "tcp":
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect((addr, port))
            out[key] = "answered"
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.sendto(DNSRecord.question("www.alpha.test").pack(), (addr, port))
            s.recvfrom(4096)
            out[key] = "answered"
    except ConnectionRefusedError:
        out[key] = "refused"
    except ConnectionResetError:
        out[key] = "reset"
    except (TimeoutError, socket.timeout):
        out[key] = "silent"
    except OSError as e:
        out[key] = f"error {e.errno}"
threads = [threading.Thread(target=probe, args=t) for t in targets]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""


def probe(lab: Lab, node: str, targets: list[tuple[str, str, int]],
          timeout: float = 1.5) -> dict[str, str]:
    r = lab.exec(node, [sys.executable, "-c", PROBE, json.dumps(targets), str(timeout)],
                 timeout=30)
    out: dict[str, str] = json.loads(r.stdout)
    return out


def gw_json(lab: Lab, *argv: str) -> Any:
    return json.loads(lab.exec("gateway", list(argv)).stdout or "null")


Runs = BackendRuns
# Every port Mirage can open, so the wall is probed on each.
ALL_PORTS = {"mixed-port": PORTS["mixed"], "socks-port": PORTS["socks"], "port": PORTS["http"],
             # Both families (mihomo's "[::]"), so the v6 probes meet a listener;
             # a LAN-wide controller needs a secret.
             "external-controller": f"[::]:{PORTS['api']}", "secret": "wall"}


@pytest.fixture
def runs(lab: Lab) -> Iterator[Runs]:
    r = Runs(lab, name="wan-wall", defaults=ALL_PORTS)
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_answers_the_wan_while_the_lan_is_served(lab: Lab, runs: Runs,
                                                         backend: str) -> None:
    runs.start(backend)
    gw = {f: [lab.addr("gateway", i, f) for i in ("wan0", "lan0")] for f in (4, 6)}
    wan_targets = [(kind, addr, port)
                   for addrs in gw.values() for addr in addrs
                   for kind, port in [("tcp", p) for p in PORTS.values()] + [("dns", 53)]]
    seen = probe(lab, "upstream", wan_targets)
    assert seen and set(seen.values()) == {"silent"}, seen
    # The same probes from the LAN: every service answers (tproxy-port with
    # the loop guard's refusal: it is never a proxy for a direct client).
    lan4, lan6 = lab.addr("gateway", "lan0", 4), lab.addr("gateway", "lan0", 6)
    lan_targets = [("tcp", lan4, p) for p in PORTS.values()]
    lan_targets += [("dns", lan4, 53), ("dns", lan6, 53), ("tcp", lan6, 53),
                    ("tcp", lan6, PORTS["api"])]
    seen = probe(lab, "client", lan_targets)
    expected = {f"{k} {a} {p}": "answered" for k, a, p in lan_targets}
    expected[f"tcp {lan4} {PORTS['tproxy']}"] = seen[f"tcp {lan4} {PORTS['tproxy']}"]
    assert seen == expected
    assert seen[f"tcp {lan4} {PORTS['tproxy']}"] in ("reset", "refused", "silent")


def remove_all(lab: Lab, run: MirageRun) -> list[str]:
    script = ("import json, sys\nfrom pathlib import Path\n"
              "from appliance.config import load_config\n"
              "from appliance.capture.backend import remove_all\n"
              "print(json.dumps(remove_all(load_config(Path(sys.argv[1])))))\n")
    r = lab.exec("gateway", [sys.executable, "-c", script, str(run.config_path)], timeout=30)
    out: list[str] = json.loads(r.stdout)
    return out


def assert_nothing_of_mirage(lab: Lab) -> None:
    tables = gw_json(lab, "nft", "-j", "list", "tables")["nftables"]
    assert not [t for t in tables if t.get("table", {}).get("name") == "mirage"], tables
    filters = gw_json(lab, "tc", "-j", "filter", "show", "dev", "lan0", "ingress") or []
    assert not [f for f in filters if "options" in f], filters
    for family in ("-4", "-6"):
        rules = gw_json(lab, "ip", family, "-j", "rule", "show")
        assert all(r.get("table") != "233" for r in rules), rules
        routes = lab.exec("gateway", ["ip", family, "route", "show", "table", "233"]).stdout
        assert routes.strip() == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_kill_9_lan_dns_falls_back_to_the_resolver_asked(lab: Lab, runs: Runs,
                                                                backend: str) -> None:
    poisoned = str(lab.topology.poisoned_resolver.address)
    run = runs.start(backend)
    try:
        assert FAKE.match(dig(lab, f"@{poisoned}", "+short", "www.alpha.test"))
        run.kill()
        t0 = time.monotonic()
        answer = ""
        while time.monotonic() - t0 < 2.0:
            answer = dig(lab, f"@{poisoned}", "+time=1", "+tries=1", "+short",
                         "www.alpha.test")
            if answer == POISONED_ALPHA:
                break
        elapsed = time.monotonic() - t0
        # The resolver the client asked answers (here: the lab's poisoned
        # one, which is the point of the lab), UDP and TCP, within 2 s.
        assert answer == POISONED_ALPHA and elapsed < 2.0, (answer, elapsed)
        assert dig(lab, f"@{poisoned}", "+tcp", "+time=1", "+tries=1", "+short",
                   "www.alpha.test") == POISONED_ALPHA
        # Flows to real addresses never stop.
        r = lab.exec("client", ["curl", "-s", "-m", "5", "http://192.168.57.10/"], timeout=20)
        assert r.returncode == 0 and "MARKER-ALPHA" in r.stdout
        # The kill left the capture behind; remove_all takes it all away.
        removed = remove_all(lab, run)
        assert any("nftables table inet mirage" in x for x in removed), removed
        if backend == "ebpf":
            assert "tc filter on lan0" in removed
        assert any("policy routing" in x for x in removed), removed
        assert_nothing_of_mirage(lab)
        assert remove_all(lab, run) == []  # nothing left to remove
    finally:
        remove_all(lab, run)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_resolvers_are_hijacked_with_ipv6_off(lab: Lab, runs: Runs, backend: str) -> None:
    runs.start(backend)  # ipv6: false, the default
    # Nobody serves DNS at fd57::153: only the hijack can answer, and it
    # answers a fake IPv4 address (no AAAA fake range with ipv6 off).
    assert FAKE.match(dig(lab, "@fd57::153", "+short", "www.alpha.test"))
    assert FAKE.match(dig(lab, "-6", "@fd57::153", "+tcp", "+short", "www.beta.test"))
