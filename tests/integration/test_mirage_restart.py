"""`mirage run` restarted (kill -9 right after new mappings, or a clean
SIGTERM, with and without `profile.store-fake-ip`): no address handed out
before the restart is given to a new name while the range has others.

Each test runs the real command in a throwaway network namespace with only
loopback (DNS service only, no capture), asks with dig, and reads the
answers dig received.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.netns


class Run:
    """One `mirage run` in the namespace, started and waited for."""

    def __init__(self, netns: str, config: Path) -> None:
        self.netns = netns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "appliance", "run", "-c",
             str(config)],
            stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stderr is not None
        self.log: list[str] = []
        for _ in range(200):
            line = self.proc.stderr.readline()
            self.log.append(line)
            if " running (pid " in line or not line:
                break
        assert self.proc.poll() is None, "".join(self.log)

    def ask(self, name: str) -> str:
        dig = subprocess.run(
            ["ip", "netns", "exec", self.netns, "dig", "+short", "+time=2", "+tries=1",
             "-p", "5353", "@127.0.0.1", name],
            capture_output=True, text=True, timeout=10,
        )
        return dig.stdout.strip()

    def stop(self, sig: int) -> None:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=15)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.mark.parametrize(
    ("store", "sig"),
    [(True, signal.SIGKILL), (False, signal.SIGKILL), (False, signal.SIGTERM),
     (True, signal.SIGTERM)],
    ids=["store-kill9", "nostore-kill9", "nostore-clean", "store-clean"],
)
def test_restart_never_gives_a_handed_out_address_to_a_new_name(
    netns: str, tmp_path: Path, store: bool, sig: int
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"profile: {{store-fake-ip: {'true' if store else 'false'}}}\n"
        "dns:\n  listen: 127.0.0.1:5353\n  nameserver: ['udp://127.0.0.1:1']\n"
        "  fake-ip-range: 198.18.0.0/28\n"
        # A flush far away: the mappings made below are never flushed before
        # the kill (the unflushed tail is what must not be reissued).
        f"appliance:\n  state-dir: {tmp_path}/state\n  store-flush-interval: 60\n"
    )
    first = Run(netns, cfg)
    try:
        before = {first.ask(f"old{i}.example") for i in range(8)}
        first.stop(sig)
    finally:
        first.close()
    assert len(before) == 8 and all(a.startswith("198.18.0.") for a in before), before

    second = Run(netns, cfg)
    try:
        # A /28 has 14 addresses: 6 were never handed out.
        after = [second.ask(f"new{i}.example") for i in range(6)]
        assert not set(after) & before, (before, after)
        assert len(set(after)) == 6
        if store and sig == signal.SIGTERM:
            # A clean exit flushed: the old names keep their addresses.
            assert {second.ask(f"old{i}.example") for i in range(8)} == before
        second.stop(signal.SIGTERM)
    finally:
        second.close()
