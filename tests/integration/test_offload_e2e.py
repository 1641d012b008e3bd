"""End to end: the DIRECT offload (appliance.offload-direct) in the lab.

A real client (curl, dig) in the client namespace, `mirage run` in the
gateway namespace, nginx upstream. nginx echoes the peer address it saw
(`from=`): a flow relayed by Mirage arrives from the gateway's WAN address
192.168.57.1, one the kernel forwarded after the offload from the client's
own 192.168.56.10. Kernel state is read with nft; Mirage's with `mirage
status` / `mirage mappings`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lab_client import FAKE, curl, dig

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, MirageRuns

pytestmark = pytest.mark.netns

CLIENT = "from=192.168.56.10"
GATEWAY = "from=192.168.57.1"  # DIRECT through Mirage leaves from the WAN side
GAMMA = "192.168.57.12"  # www.gamma.test's real address (topology.yaml)


def offloaded(lab: Lab) -> dict[str, tuple[str, int]]:
    """The gateway's offload4 map: fake IP -> (real address, timeout s)."""
    out = lab.exec("gateway", ["nft", "-j", "list", "map", "inet", "mirage", "offload4"]).stdout
    maps = [o["map"] for o in json.loads(out)["nftables"] if "map" in o]
    return {e[0]["elem"]["val"]: (e[1], e[0]["elem"]["timeout"]) for e in maps[0].get("elem", [])}


def wait_offloaded(lab: Lab, fake: str, timeout: float = 5.0) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fake in (now := offloaded(lab)):
            return now[fake]
        time.sleep(0.05)
    raise AssertionError(f"{fake} not offloaded after {timeout} s: {offloaded(lab)}")


def status(lab: Lab, run: MirageRun) -> dict[str, Any]:
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "status", "-c",
                               str(run.config_path), "--json"]).stdout
    return dict(json.loads(out)["counters"])


def pins(lab: Lab, run: MirageRun) -> dict[str, int]:
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "mappings", "-c",
                               str(run.config_path), "--json"]).stdout
    return {row["domain"]: row["pins"] for row in json.loads(out)}


def get(lab: Lab, name: str) -> str:
    code, body, _ = curl(lab, f"http://{name}/")
    assert code == 0, (code, body)
    return body


def test_after_the_first_direct_flow_the_kernel_forwards(lab: Lab, runs: MirageRuns) -> None:
    run = runs.start(appliance={"offload-direct": True})
    fake = dig(lab, "+short", "www.gamma.test")
    assert FAKE.match(fake)
    first = get(lab, "www.gamma.test")
    assert "MARKER-GAMMA" in first and GATEWAY in first  # through Mirage
    real, timeout = wait_offloaded(lab, fake)
    # The address DIRECT reached, for no longer than the answer's TTL (300 s
    # in the lab's zone): the same peer Mirage itself keeps for that long.
    assert real == GAMMA and 0 < timeout <= 300
    flows_before = status(lab, run)["gateway"]["opened"]
    for _ in range(3):
        later = get(lab, "www.gamma.test")
        assert "MARKER-GAMMA" in later and CLIENT in later  # forwarded by the kernel
    counters = status(lab, run)
    assert counters["gateway"]["opened"] == flows_before  # none reached Mirage
    assert counters["offload"]["offloaded"] == 1
    # The fake IP stays pinned while the kernel translates it: the pool can
    # never hand it to another name meanwhile.
    assert pins(lab, run)["www.gamma.test"] >= 1
    # SOCKS5 and HTTP-proxied names are never offloaded; they keep working.
    assert "MARKER-ALPHA" in get(lab, "www.alpha.test")
    assert "MARKER-BETA" in get(lab, "www.beta.test")
    assert list(offloaded(lab)) == [fake]


def test_a_route_that_depends_on_the_port_is_never_offloaded(
        lab: Lab, runs: MirageRuns) -> None:
    socks = lab.topology.socks[0].name
    # gamma reaches MATCH,DIRECT only because its port is not 8080: another
    # port would go to dante, so the name alone does not decide.
    run = runs.start(appliance={"offload-direct": True},
                     rules=[f"DOMAIN-SUFFIX,alpha.test,{socks}", f"DST-PORT,8080,{socks}",
                            "MATCH,DIRECT"])
    for _ in range(3):
        assert GATEWAY in get(lab, "www.gamma.test")
    time.sleep(0.5)
    assert offloaded(lab) == {}
    assert status(lab, run)["offload"]["offered"] == 0


def test_reload_flushes_the_offloads(lab: Lab, runs: MirageRuns) -> None:
    run = runs.start(appliance={"offload-direct": True})
    fake = dig(lab, "+short", "www.gamma.test")
    get(lab, "www.gamma.test")
    wait_offloaded(lab, fake)
    assert CLIENT in get(lab, "www.gamma.test")
    # The new rules send gamma through dante: the kernel must stop
    # forwarding it directly at once.
    run.config["rules"] = [f"DOMAIN-SUFFIX,gamma.test,{lab.topology.socks[0].name}",
                           "MATCH,DIRECT"]
    run.write_config()
    seen = run.log_path.stat().st_size  # the log file is shared with earlier runs
    run.reload()
    deadline = time.monotonic() + 10
    while "SIGHUP: reloaded" not in run.log_text(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "SIGHUP: reloaded" in run.log_text(seen)
    assert offloaded(lab) == {}
    assert pins(lab, run)["www.gamma.test"] == 0
    body = get(lab, "www.gamma.test")
    # Through dante now (its connection comes from the upstream side itself).
    assert "MARKER-GAMMA" in body and CLIENT not in body and GATEWAY not in body
    assert offloaded(lab) == {}



ECHO = Path(__file__).resolve().parents[2] / "bench" / "udp_echo.py"
ECHO_PORT = 7707

# A UDP session to the fake IP held open across the offload, then a new one.
UDP_CLIENT = """
import socket, sys
fake, port = sys.argv[1], int(sys.argv[2])
def ask(s, what):
    s.send(what)
    print(s.recv(200).decode(), flush=True)
old = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
old.settimeout(5)
old.connect((fake, port))
ask(old, b"old-1")
sys.stdin.readline()
ask(old, b"old-2")
new = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
new.settimeout(5)
new.connect((fake, port))
ask(new, b"new-1")
"""


def test_a_udp_session_mirage_carries_stays_with_it(lab: Lab, runs: MirageRuns) -> None:
    # Offloading a fake IP takes only *new* flows to the kernel: a UDP session
    # Mirage already relays (conntrack: established, not translated) keeps
    # going through Mirage instead of being forwarded untranslated (and
    # dropped by fake_guard). The echo server tags each reply with the
    # sender it saw.
    runs.start(appliance={"offload-direct": True})
    fake = dig(lab, "+short", "www.gamma.test")
    echo = lab.popen("upstream", [sys.executable, str(ECHO), "--tag", "--max-seconds", "120",
                                  f"{GAMMA}:{ECHO_PORT}"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    held: subprocess.Popen[str] | None = None
    try:
        # The client's first datagram must not race the server's bind.
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        held = lab.popen("client", [sys.executable, "-c", UDP_CLIENT, fake, str(ECHO_PORT)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline().startswith("old-1 from=192.168.57.1:")
        assert GATEWAY in get(lab, "www.gamma.test")  # the TCP flow that offloads gamma
        wait_offloaded(lab, fake)
        held.stdin.write("\n")
        held.stdin.flush()
        assert held.stdout.readline().startswith("old-2 from=192.168.57.1:")  # still Mirage
        assert held.stdout.readline().startswith("new-1 from=192.168.56.10:")  # the kernel
        assert held.wait(timeout=10) == 0
    finally:
        for proc in (held, echo):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
