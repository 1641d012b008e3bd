"""SIGTERM while `mirage run` is still starting: a clean stop, nothing left behind.

`mirage run` in the session lab's gateway namespace, under both capture
backends, gets SIGTERM at fixed moments of its start (0, 0.25 and 0.5 s
after the process starts: Python is still importing, or the services are
binding), and, the case that once failed, right when the last service is
up and the capture is being applied: under eBPF, bcc compiling the program
in a worker thread for about a second while the TCP service closes its
listener. Each run must exit 0 (or die of the signal itself, before Mirage
installed its handler), write no traceback, and leave nothing of Mirage's:
no nftables table, tc filter, ip rule or route (checked with nft, tc, ip).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, MirageRuns, lab_config

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BACKENDS = ["nftables", "ebpf"]
# The last service up before the capture is applied (app.py's order).
LAST_SERVICE_LINE = "control API on"


def gw_json(lab: Lab, *argv: str) -> Any:
    return json.loads(lab.exec("gateway", list(argv)).stdout or "null")


def nothing_of_mirage(lab: Lab) -> dict[str, Any]:
    """What of Mirage's is left in the gateway (empty: nothing)."""
    left: dict[str, Any] = {}
    tables = gw_json(lab, "nft", "-j", "list", "tables")["nftables"]
    if t := [t for t in tables if t.get("table", {}).get("name") == "mirage"]:
        left["nft"] = t
    filters = gw_json(lab, "tc", "-j", "filter", "show", "dev", "lan0", "ingress") or []
    if f := [f for f in filters if "options" in f]:
        left["tc"] = f
    for family in ("-4", "-6"):
        rules = [r for r in gw_json(lab, "ip", family, "-j", "rule", "show")
                 if r.get("table") == "233"]
        routes = lab.exec("gateway", ["ip", family, "route", "show", "table", "233"]).stdout
        if rules or routes.strip():
            left[f"ip{family}"] = (rules, routes)
    return left


@pytest.fixture
def runs(lab: Lab) -> Iterator[MirageRuns]:
    r = MirageRuns(lab, name="sigterm")
    try:
        yield r
    finally:
        r.close()


def start_and_terminate(lab: Lab, runs: MirageRuns, backend: str, *,
                        after: float | None = None, after_line: str | None = None
                        ) -> tuple[int, str, float]:
    """Start `mirage run`, send SIGTERM `after` seconds from the start or as
    soon as its log has `after_line`; (exit code, log, seconds to exit)."""
    run = MirageRun(lab, lab_config(lab, appliance={"redirect": backend}), name="sigterm")
    runs.running.append(run)
    run.write_config()
    offset = run.log_path.stat().st_size if run.log_path.exists() else 0
    with open(run.log_path, "ab") as log:
        run.proc = lab.popen(
            "gateway", [sys.executable, "-m", "appliance", "run", "-c", str(run.config_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t0 = time.monotonic()
    if after is not None:
        time.sleep(after)
    else:
        assert after_line is not None
        while after_line not in run.log_text(offset):
            assert run.proc.poll() is None, run.log_text(offset)
            assert time.monotonic() - t0 < 30, run.log_text(offset)
            time.sleep(0.01)
    run.proc.send_signal(signal.SIGTERM)
    t1 = time.monotonic()
    rc = run.proc.wait(30)
    return rc, run.log_text(offset), time.monotonic() - t1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_while_the_capture_is_applied(lab: Lab, runs: MirageRuns, backend: str) -> None:
    rc, log, took = start_and_terminate(lab, runs, backend, after_line=LAST_SERVICE_LINE)
    assert rc == 0, log
    assert "Traceback" not in log and "ERROR" not in log, log
    assert "SIGTERM: shutting down" in log
    assert nothing_of_mirage(lab) == {}
    # The compile is waited for, not abandoned: bounded by its few seconds.
    assert took < 15, took


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("after", [0.0, 0.25, 0.5])
def test_sigterm_early_in_the_start(lab: Lab, runs: MirageRuns, backend: str,
                                    after: float) -> None:
    rc, log, _took = start_and_terminate(lab, runs, backend, after=after)
    # Before Mirage's handler is installed the signal's default action ends
    # the process (nothing applied yet); after, Mirage stops cleanly.
    assert rc in (0, -signal.SIGTERM), (rc, log)
    assert "Traceback" not in log and "ERROR" not in log, log
    assert nothing_of_mirage(lab) == {}
