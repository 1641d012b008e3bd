"""SIGHUP applies the proxy ports' `allow-lan` and `authentication` at once
(appliance/app.py `Appliance.reload`, proxyport/service.py `reconfigure`):
`mirage run` in the lab's gateway with mixed-port 7890, clients in the
client namespace. After the reload a new connection gets the new setting
(the LAN address refused, credentials asked for) within a few seconds,
loopback in the gateway keeps serving, and a connection opened before the
reload keeps working.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, MirageRuns

pytestmark = pytest.mark.netns

MIXED = 7890
USER, PASSWORD = "late", "c0mer"

# Held in the client namespace: a SOCKS5 (no auth) connection through the
# mixed port to www.gamma.test:80, one keep-alive request before the reload
# (a line on stdin) and one after, on the same connection.
HELD = r"""
import socket, sys
gw, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((gw, port), timeout=8)
s.sendall(b'\x05\x01\x00'); assert s.recv(2) == b'\x05\x00'
host = b'www.gamma.test'
s.sendall(bytes([5, 1, 0, 3, len(host)]) + host + (80).to_bytes(2, 'big'))
reply = b''
while len(reply) < 10:
    reply += s.recv(10 - len(reply))
assert reply[1] == 0, reply
def get():
    s.sendall(b'GET / HTTP/1.1\r\nHost: www.gamma.test\r\n\r\n'); d = b''
    while b'MARKER' not in d or not d.endswith(b'\n'):
        c = s.recv(4096)
        if not c:
            break
        d += c
    print(d.decode(errors='replace').split('\r\n\r\n', 1)[-1].strip(), flush=True)
get(); sys.stdin.readline(); get()
"""

# Is a new TCP connection from the client namespace refused?
REFUSED = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print('open')
except ConnectionRefusedError:
    print('refused')
except OSError as err:
    print(type(err).__name__)
"""


def curl(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(node, ["curl", "-s", "-S", "-m", "8", *args, "http://www.gamma.test/"],
                    timeout=20)


@contextmanager
def held_connection(lab: Lab, gw: str) -> Iterator[subprocess.Popen[str]]:
    """A connection through the mixed port that has served one request."""
    held = lab.popen("client", [sys.executable, "-c", HELD, gw, str(MIXED)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert held.stdout is not None and held.stdin is not None
    try:
        assert "MARKER-GAMMA" in held.stdout.readline()
        yield held
    finally:
        held.kill()
        held.wait(timeout=10)
        held.stdin.close()
        held.stdout.close()


def second_request(held: subprocess.Popen[str]) -> str:
    assert held.stdin is not None and held.stdout is not None
    held.stdin.write("\n")
    held.stdin.flush()
    return held.stdout.readline()


def reload_with(run: MirageRun, **changes: object) -> int:
    """Rewrite the config with `changes`, SIGHUP, wait for the reload; the
    log offset before it."""
    offset = run.log_path.stat().st_size
    run.config.update(changes)
    run.write_config()
    run.reload()
    deadline = time.monotonic() + 10
    while "SIGHUP: reloaded" not in run.log_text(offset) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "SIGHUP: reloaded" in run.log_text(offset), run.log_text(offset)[-2000:]
    return offset


def test_allow_lan_false_closes_the_lan_address_at_once(lab: Lab, runs: MirageRuns) -> None:
    run = runs.start(**{"mixed-port": MIXED, "allow-lan": True})
    gw = lab.addr("gateway", "lan0")
    r = curl(lab, "client", "-x", f"http://{gw}:{MIXED}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
    with held_connection(lab, gw) as held:
        offset = reload_with(run, **{"allow-lan": False})
        deadline = time.monotonic() + 5
        state = ""
        while time.monotonic() < deadline:
            state = lab.exec("client", [sys.executable, "-c", REFUSED, gw, str(MIXED)],
                             timeout=10).stdout.strip()
            if state == "refused":
                break
            time.sleep(0.2)
        assert state == "refused", run.log_text(offset)[-2000:]
        # Loopback in the gateway still serves ...
        r = curl(lab, "gateway", "-x", f"http://127.0.0.1:{MIXED}")
        assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
        # ... and the connection accepted before the reload goes on.
        assert "MARKER-GAMMA" in second_request(held)
    log = run.log_text(offset)
    assert "no longer listening on" in log and "restart needed" not in log, log[-2000:]

    # And back: the LAN address is served again.
    reload_with(run, **{"allow-lan": True})
    r = curl(lab, "client", "-x", f"http://{gw}:{MIXED}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr


def test_authentication_added_is_asked_of_new_connections(lab: Lab, runs: MirageRuns) -> None:
    run = runs.start(**{"mixed-port": MIXED})
    gw = lab.addr("gateway", "lan0")
    with held_connection(lab, gw) as held:
        offset = reload_with(run, authentication=[f"{USER}:{PASSWORD}"])
        r = curl(lab, "client", "-x", f"http://{gw}:{MIXED}", "-o", "/dev/null",
                 "-w", "%{http_code}")
        assert r.stdout == "407", (r.stdout, r.stderr)
        r = curl(lab, "client", "-x", f"socks5h://{gw}:{MIXED}")
        assert r.returncode != 0 and "MARKER" not in r.stdout
        r = curl(lab, "client", "-x", f"socks5h://{USER}:{PASSWORD}@{gw}:{MIXED}")
        assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
        assert "MARKER-GAMMA" in second_request(held)
    assert "restart needed" not in run.log_text(offset)


def test_a_port_change_is_named_at_warning(lab: Lab, runs: MirageRuns) -> None:
    run = runs.start(**{"mixed-port": MIXED})
    offset = reload_with(run, **{"mixed-port": MIXED + 100, "socks-port": 7891})
    deadline = time.monotonic() + 5
    while "socks-port changed" not in run.log_text(offset) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = run.log_text(offset)
    assert "WARNING" in log and "mixed-port changed: restart needed" in log, log[-2000:]
    assert "socks-port changed: restart needed" in log
    # Still serving the old port.
    r = curl(lab, "gateway", "-x", f"http://127.0.0.1:{MIXED}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
