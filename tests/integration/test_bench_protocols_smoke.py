"""A few-second smoke of bench/protocols.py (`make bench` runs every row
with a 64 MiB download): two rows (shadowsocks, and DIRECT for reference)
through Mirage and mihomo with tiny sizes; numbers come back for both
gateways and the ratio table is printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

BENCH = Path(__file__).resolve().parents[2] / "bench" / "protocols.py"


def test_protocols_bench_smoke() -> None:
    # Its own process: the bench installs a SIGTERM handler and builds its
    # own lab (prefix pb<pid>), which it removes on every exit path.
    done = subprocess.run([sys.executable, str(BENCH), "--rows", "ss-aes,DIRECT",
                           "--rounds", "1", "--mbytes", "2", "--seconds", "1",
                           "--requests", "10"], capture_output=True, text=True, timeout=120)
    out = done.stdout
    # A floor missed is exit 1 (a figure, not a failure of the bench).
    assert done.returncode in (0, 1), out + done.stderr
    for row in ("ss-aes", "DIRECT"):
        for gateway in ("mirage", "mihomo"):
            line = re.search(rf"^{row}\s+{gateway}\s+([\d,.]+)\s+([\d,.]+)\s+([\d.]+)", out,
                             re.MULTILINE)
            assert line is not None, out
            mbps, conns, p50 = (float(x.replace(",", "")) for x in line.groups())
            assert mbps > 0 and conns > 0 and p50 > 0, line.group(0)
    assert re.search(r"^ss-aes\s+[\d.]+\s+[\d.]+.*>= 0.5x: (PASS|MISS)", out, re.MULTILINE), out
