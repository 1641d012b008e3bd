"""UDP sessions through the control API, as a dashboard drives them: a
real client in the lab's client namespace talks UDP to a fake IP (an echo
server upstream, bench/udp_echo.py, reached DIRECT); its session is listed
in GET /connections and ended by DELETE /connections/{id} (and by DELETE
/connections), after which the client's next datagram opens a new session
with a new id. The idle timeout is long (60 s) and the `idle_expired`
counter must not move, so only the API can have ended a session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config

pytestmark = pytest.mark.netns

ECHO = Path(__file__).resolve().parents[2] / "bench" / "udp_echo.py"
PORT = 9995
API = "http://127.0.0.1:9090"  # lab_config's external-controller, in the gateway


@pytest.fixture(scope="module")
def mirage(lab: Lab) -> Iterator[MirageRun]:
    echo = lab.popen("upstream", [sys.executable, str(ECHO), "--tag", "--max-seconds", "300",
                                  f"192.168.57.12:{PORT}"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = lab.state_dir / "udp-api-mirage-state"
    run = MirageRun(lab, lab_config(lab, appliance={"state-dir": str(state), "udp-timeout": 60}),
                    name="udp-api-mirage")
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        run.start()
        yield run
    finally:
        run.stop()
        echo.terminate()
        echo.wait(timeout=5)
        if echo.stdout is not None:
            echo.stdout.close()
        for f in state.glob("fakeip*"):
            f.unlink()


def api(lab: Lab, method: str = "GET", path: str = "/connections") -> Any:
    """The control API as a dashboard calls it (curl in the gateway)."""
    result = lab.exec("gateway", ["curl", "-s", "-m", "5", "-X", method, f"{API}{path}"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if method == "GET" else result.stdout


def sessions_from(lab: Lab, port: int) -> list[dict[str, Any]]:
    return [c for c in api(lab)["connections"]
            if c["metadata"]["network"] == "udp" and c["metadata"]["sourcePort"] == str(port)]


def idle_expired(lab: Lab) -> int:
    return int(api(lab, path="/mirage/status")["counters"]["udp"]["idle_expired"])


def wait_for(what: str, check: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds:g} s: {what}")


# Exchanges from one connected socket (same client address and port): one
# now, one more for each line on stdin.
EXCHANGES = """
import json, socket, sys
name, port = sys.argv[1], int(sys.argv[2])
ip = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3)
c.connect((ip, port))
def once(payload):
    c.send(payload)
    try:
        return c.recv(4096).decode()
    except TimeoutError:
        return None
print(json.dumps({"ip": ip, "port": c.getsockname()[1], "reply": once(b"first")}), flush=True)
for n, _ in enumerate(sys.stdin):
    print(json.dumps({"reply": once(b"again %d" % n)}), flush=True)
"""


def test_a_udp_session_is_closed_by_id_through_the_api(lab: Lab, mirage: MirageRun) -> None:
    proc = lab.popen("client", [sys.executable, "-c", EXCHANGES, "www.gamma.test", str(PORT)],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None

    def again() -> str | None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        reply: str | None = json.loads(proc.stdout.readline())["reply"]
        return reply

    try:
        first = json.loads(proc.stdout.readline())
        assert first["ip"].startswith("198.18.")
        assert first["reply"] is not None and first["reply"].startswith("first from=")
        expired = idle_expired(lab)
        (session,) = sessions_from(lab, first["port"])
        assert session["metadata"]["host"] == "www.gamma.test"
        # TCP flows and UDP sessions share one id sequence: no id twice.
        ids = [c["id"] for c in api(lab)["connections"]]
        assert len(ids) == len(set(ids)), ids
        assert api(lab, "DELETE", f"/connections/{session['id']}") == ""
        wait_for("the session leaves /connections",
                 lambda: not sessions_from(lab, first["port"]), 5)
        # The client's next datagram opens a new session (a new id), which
        # carries it and its reply.
        reply = again()
        assert reply is not None and reply.startswith("again 0 from=")
        (renewed,) = sessions_from(lab, first["port"])
        assert renewed["id"] != session["id"]
        # DELETE /connections (all) ends it too; the next datagram is
        # carried by a third session.
        assert api(lab, "DELETE") == ""
        wait_for("DELETE /connections ends the UDP session",
                 lambda: not sessions_from(lab, first["port"]), 5)
        reply = again()
        assert reply is not None and reply.startswith("again 1 from=")
        (third,) = sessions_from(lab, first["port"])
        assert third["id"] not in (session["id"], renewed["id"])
        # None of them idled out: the API ended them.
        assert idle_expired(lab) == expired
    finally:
        proc.kill()
        proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            stream.close()
