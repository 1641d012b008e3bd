"""`appliance.block-encrypted-dns`: LAN clients' encrypted DNS is refused at once.

In the session lab, under both capture backends, with the option on and
off. The lab has no public resolver (and the tests never send traffic to a
real public address): a stand-in "resolver" in the upstream namespace at
192.168.57.123 (an address nothing else listens on) listens on TCP 853
(DoT), TCP 443 (DoH) and UDP 853 (DoQ) and greets each client; the option's
`appliance.encrypted-dns-resolvers` adds that address to the well-known DoH
set. The client connects from the client namespace:

- on: TCP 853 and 443 are reset (the connect is refused within a fraction
  of a second, no timeout), UDP 853 gets an ICMP port unreachable; HTTPS to
  an address outside the set (the lab's web server) still connects; `dig
  use-application-dns.net` (Firefox's canary) gets NXDOMAIN;
- off: all three reach the stand-in, and the canary is an ordinary name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from lab_client import client, connect_outcome, dig

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRuns
from appliance.lab.servers import terminate

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BACKENDS = ["nftables", "ebpf"]
RESOLVER = "192.168.57.123"  # the stand-in: added to the DoH set by config
WEB = "192.168.57.10"  # nginx's HTTPS, not in the set

# The stand-in resolver: TCP 853 and 443 greet and hold; UDP 853 echoes.
STAND_IN = r"""
import socket, sys, threading
addr = sys.argv[1]
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(16)
    held = []
    while True:
        c, _ = s.accept(); c.sendall(b"HELLO\n"); held.append(c)
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port))
    while True:
        d, peer = s.recvfrom(2048); s.sendto(d, peer)
threads = [threading.Thread(target=tcp, args=(853,), daemon=True),
           threading.Thread(target=tcp, args=(443,), daemon=True),
           threading.Thread(target=udp, args=(853,), daemon=True)]
for t in threads: t.start()
print("ready", flush=True)
threads[0].join()
"""

# One UDP exchange from the client: 'answered', 'refused' (ICMP port
# unreachable on the connected socket) or 'timeout', and how long it took.
UDP_PROBE = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
t = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); s.send(b"quic?"); s.recv(100); r = "answered"
except ConnectionRefusedError: r = "refused"
except (TimeoutError, socket.timeout): r = "timeout"
print(json.dumps([r, time.monotonic() - t]))
"""


@pytest.fixture
def stand_in(lab: Lab) -> Iterator[str]:
    proc = lab.popen("upstream", [sys.executable, "-c", STAND_IN, RESOLVER],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield RESOLVER
    finally:
        terminate(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def udp_outcome(lab: Lab, ip: str, port: int) -> tuple[str, float]:
    result, elapsed = json.loads(client(lab, sys.executable, "-c", UDP_PROBE, ip, str(port)))
    return result, elapsed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [True, False], ids=["on", "off"])
def test_encrypted_dns_is_refused_only_when_blocked(lab: Lab, runs: MirageRuns, stand_in: str,
                                                     backend: str, block: bool) -> None:
    runs.start(appliance={"redirect": backend, "block-encrypted-dns": block,
                          "encrypted-dns-resolvers": [f"{stand_in}/32"]})
    seen = {port: connect_outcome(lab, stand_in, port) for port in (853, 443)}
    seen_udp = udp_outcome(lab, stand_in, 853)
    canary = dig(lab, "use-application-dns.net")
    # The kernel's view (nft -j): the chain's sets hold elements only when on.
    data = json.loads(lab.exec("gateway", ["nft", "-j", "list", "table", "inet", "mirage"]).stdout)
    sets = {o["set"]["name"]: o["set"] for o in data["nftables"] if "set" in o}
    filled = {s for s in ("encrypted_dns_ports", "doh_ports", "doh4", "doh6") if "elem" in sets[s]}
    assert filled == ({"encrypted_dns_ports", "doh_ports", "doh4", "doh6"} if block else set())
    if block:
        # Reset at once: the client falls back without waiting.
        assert all(r == "refused" and t < 1.0 for r, t in seen.values()), seen
        assert seen_udp[0] == "refused" and seen_udp[1] < 1.0, seen_udp
        assert "status: NXDOMAIN" in canary, canary
        # HTTPS to an address outside the set is untouched.
        assert connect_outcome(lab, WEB, 443)[0] == "data"
    else:
        assert all(r == "data" for r, _ in seen.values()), seen
        assert seen_udp[0] == "answered", seen_udp
        assert "status: NOERROR" in canary, canary

