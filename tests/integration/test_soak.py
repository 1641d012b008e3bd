"""A short smoke of the soak (bench/soak.py; `make soak` runs the 10-minute one).

The soak builds its own lab, runs three LAN clients' mixed DNS/TCP/UDP
through `mirage run` while a /26 fake range recycles about once a second,
and judges: no flow broken by recycling (markers, long flows, UDP reply
sources), every kind of work done and the pool recycled, no descriptor left
over once the load stops. The RSS trend is printed but judged only on long
runs. Here: 12 seconds of load, and the test asserts on the verdict lines.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def test_soak_smoke() -> None:
    r = subprocess.run([sys.executable, str(SOAK), "--seconds", "12", "--sample", "2"],
                       capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "PASS  no flow broken by recycling: short 0, long 0, udp 0" in out, out[-4000:]
    assert "PASS  every kind of work ran, the pool recycled" in out, out[-4000:]
    assert "PASS  no descriptor leak" in out, out[-4000:]
    assert "soak passed" in out
