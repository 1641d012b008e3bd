"""A peer that vanishes mid-flow: the half-close timeout ends the flow.

A test server in the upstream namespace (on www.gamma.test's address, so the
flow goes DIRECT by name through `mirage run`) plays two parts. `silent`:
after the client's request and FIN it never answers and never closes, as a
blackholed proxy would; the client must see the flow end within
`appliance.half-close-timeout` (2 s here, plus the sweeper's tick), not
after the 300 s idle timeout. `trickle`: after the FIN it keeps sending one
line a second for 5 s and then closes; the client must get all of it (a
half-closed flow that still moves is untouched).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRuns

pytestmark = pytest.mark.netns

GAMMA = "192.168.57.12"
PORT = 7017

SERVER = textwrap.dedent("""
    import socket, sys, time, threading
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    held = []
    def serve(conn):
        data = b""
        while not data.endswith(b"\\n"):
            chunk = conn.recv(100)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"silent"):
            held.append(conn)  # never answer, never close
            return
        for i in range(5):
            conn.sendall(b"line %d\\n" % i)
            time.sleep(1)
        conn.close()
    deadline = time.monotonic() + 120
    srv.settimeout(1)
    while time.monotonic() < deadline:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
""")

CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    ip = socket.getaddrinfo("www.gamma.test", None, socket.AF_INET)[0][4][0]
    s = socket.create_connection((ip, int(sys.argv[1])), timeout=5)
    s.sendall(sys.argv[2].encode() + b"\\n")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(30)
    t0, got, how = time.monotonic(), b"", "eof"
    try:
        while chunk := s.recv(4096):
            got += chunk
    except TimeoutError:
        how = "timeout"
    except ConnectionResetError:
        how = "reset"
    print(json.dumps({"ip": ip, "seconds": time.monotonic() - t0, "got": got.decode(),
                      "how": how}))
""")


@pytest.fixture
def server(lab: Lab) -> Iterator[None]:
    proc = lab.popen("upstream", [sys.executable, "-c", SERVER, GAMMA, str(PORT)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield
    finally:
        proc.kill()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def client(lab: Lab, part: str) -> dict[str, object]:
    r = lab.exec("client", [sys.executable, "-c", CLIENT, str(PORT), part], timeout=60)
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    assert str(out["ip"]).startswith("198.18."), out  # a fake IP: through Mirage
    return out


def test_a_silent_peer_ends_the_half_closed_flow(lab: Lab, runs: MirageRuns,
                                                 server: None) -> None:
    runs.start(appliance={"half-close-timeout": 2})
    t0 = time.monotonic()
    out = client(lab, "silent")
    assert out["got"] == "" and out["how"] in ("eof", "reset"), out
    assert 1.5 <= float(out["seconds"]) <= 8.0, out  # 2 s + the sweeper, not 300 s
    assert time.monotonic() - t0 < 20


def test_a_half_closed_flow_that_still_moves_is_untouched(lab: Lab, runs: MirageRuns,
                                                          server: None) -> None:
    runs.start(appliance={"half-close-timeout": 2})
    out = client(lab, "trickle")
    assert out["got"] == "".join(f"line {i}\n" for i in range(5)), out
    assert out["how"] == "eof"
