"""`mirage run` under a supervisor: systemd's notify protocol, the watchdog,
the capabilities kept once set up, and `mirage cleanup` after kill -9.

No systemd runs here (the unit itself is checked by test_ansible.py with
`systemd-analyze verify`); the test plays systemd's side of sd_notify(3):
a datagram socket named by NOTIFY_SOCKET, WATCHDOG_USEC in the environment.
What the kernel holds is read with nft and ip, what the process holds from
/proc, never through Mirage itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config

pytestmark = pytest.mark.netns

WATCHDOG_USEC = 1_000_000  # Mirage pings every 0.5 s


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        yield sock


def messages(sock: socket.socket, seconds: float) -> list[bytes]:
    """Everything sent to `sock` within `seconds`."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(256))
        except TimeoutError:
            break
    return got


def test_ready_watchdog_and_stopping(lab: Lab, manager: socket.socket, tmp_path: Path) -> None:
    cfg = lab_config(lab, appliance={"state-dir": str(lab.state_dir / "sd-state")})
    run = MirageRun(lab, cfg, name="sd", env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                              "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    run.start()
    assert run.proc is not None
    try:
        # READY only once the capture is in place: it is there already.
        first = messages(manager, 2.0)
        assert first and first[0] == b"READY=1", first
        assert lab.exec("gateway", ["nft", "list", "table", "inet", "mirage"]).returncode == 0
        assert first[1:].count(b"WATCHDOG=1") >= 2, first
        # Hung: no pings, so systemd's WatchdogSec would abort it.
        os.kill(run.proc.pid, signal.SIGSTOP)
        try:
            messages(manager, 0.3)  # a ping already on its way
            assert messages(manager, 1.5) == []
        finally:
            os.kill(run.proc.pid, signal.SIGCONT)
        assert b"WATCHDOG=1" in messages(manager, 2.0)
        # The capabilities of a running appliance (nftables backend): only
        # NET_BIND_SERVICE, NET_ADMIN and NET_RAW, nothing it could abuse.
        status = Path(f"/proc/{run.proc.pid}/status").read_text()
        caps = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        want = (1 << 10) | (1 << 12) | (1 << 13)
        assert int(caps["CapEff"], 16) == want
        assert int(caps["CapPrm"], 16) == want
        assert int(caps["CapBnd"], 16) == want
        assert "capabilities dropped now that setup is done" in run.log_text()
    finally:
        assert run.stop() == 0
    assert b"STOPPING=1" in messages(manager, 1.0)
    # Its exit, with capabilities dropped, still removed the table.
    assert lab.exec("gateway", ["nft", "list", "table", "inet", "mirage"]).returncode != 0


def test_cleanup_after_kill_9(lab: Lab) -> None:
    cfg = lab_config(lab, appliance={"state-dir": str(lab.state_dir / "sd-state")})
    run = MirageRun(lab, cfg, name="sd-kill").start()
    run.kill()
    gw = ["ip", "netns", "exec", lab.ns("gateway")]
    assert subprocess.run([*gw, "nft", "list", "table", "inet", "mirage"],
                          capture_output=True).returncode == 0
    mark = f"{0x233:#x}"
    assert mark in subprocess.run([*gw, "ip", "rule"], capture_output=True, text=True).stdout
    cleanup = [*gw, sys.executable, "-m", "appliance", "cleanup", "-c", str(run.config_path)]
    r = subprocess.run(cleanup, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "cleanup: removed nftables table" in r.stderr
    assert subprocess.run([*gw, "nft", "list", "table", "inet", "mirage"],
                          capture_output=True).returncode != 0
    assert mark not in subprocess.run([*gw, "ip", "rule"], capture_output=True,
                                      text=True).stdout
    r = subprocess.run(cleanup, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "nothing of Mirage's was left" in r.stderr
