#!/usr/bin/env python3
"""UDP benchmark: Mirage's transparent UDP gateway (DIRECT) against the kernel
forwarding the same traffic, in the same run, on the namespace lab.

A throwaway lab (`appliance.lab`, prefix udpb<pid>: client, gateway,
upstream namespaces, no route out of the lab) with `mirage run` in the
gateway. The same load goes two ways:

- through Mirage: the client asks for www.gamma.test (DNS hijacked: a fake
  IP), so every datagram is captured (TPROXY) and relayed by the gateway's
  UDP service, DIRECT to the upstream;
- kernel forwarding: the client sends to gamma's real address, which the
  gateway only routes (nothing captured).

Workloads (each bounded by --seconds):
- `echo pps`: bench/udp_load.py pps: N sessions keeping W datagrams of
  --size bytes in flight against an echo server; replies/s (each a datagram
  up and one down through the gateway) and Mbit/s of replies. The load
  generator and the echo server are Python too and share the 2 cores, so the
  kernel's number is their ceiling, not the kernel's.
- `one-way`: iperf3 -u -b 0 -l SIZE: datagrams/s the upstream received.
- `sessions/s`: bench/udp_load.py sessions: fresh client sockets, one
  datagram and its echo each, C at a time.

Prints a table with Mirage/kernel ratios and Mirage's CPU use; the issue's
target (50,000 datagrams/s of 512 bytes through DIRECT) is checked against
the one-way number. Everything is torn down at the end.

Usage: bench/udp.py [--seconds 5] [--size 512] [--sockets 16] [--window 64]
                    [--sessions 20000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from _lab import IPERF_PORT, ROOT, cpu_seconds

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config

PY = sys.executable
ECHO = ROOT / "bench" / "udp_echo.py"
LOAD = ROOT / "bench" / "udp_load.py"
ECHO_PORT = 9000
REAL = "192.168.57.12"  # www.gamma.test's real address (topology.yaml)
NAME = "www.gamma.test"
TARGET_PPS = 50_000


def load(lab: Lab, *argv: str, seconds: float) -> dict[str, Any]:
    out = lab.exec("client", [PY, str(LOAD), *argv], timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"udp_load {argv}: {out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def iperf(lab: Lab, target: str, seconds: float, size: int) -> dict[str, float]:
    server = lab.popen("upstream", ["iperf3", "-s", "-1", "-B", REAL, "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = lab.exec("client", ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-u", "-b", "0",
                                  "-l", str(size), "-t", str(seconds), "-J"],
                       timeout=seconds + 30)
        data = json.loads(out.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        s = data["end"]["sum"]
        got = s["packets"] - s["lost_packets"]
        return {"pps": got / s["seconds"], "sent_pps": s["packets"] / s["seconds"],
                "mbit": got * size * 8 / s["seconds"] / 1e6, "lost": s["lost_percent"]}
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=5)


def measured(pid: int, fn: Any) -> tuple[Any, float]:
    """fn()'s result and the CPU (in cores) process `pid` used meanwhile."""
    c0, t0 = sum(cpu_seconds(pid)), time.monotonic()
    result = fn()
    return result, (sum(cpu_seconds(pid)) - c0) / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--sockets", type=int, default=16)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sessions", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    seconds = min(args.seconds, 30.0)
    lab = Lab(f"udpb{os.getpid()}")
    lab.up()
    rows: list[tuple[str, str, float, float, str]] = []
    try:
        echo = lab.popen("upstream", [PY, str(ECHO), "--max-seconds", "600",
                                      f"{REAL}:{ECHO_PORT}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        # log-level info: MirageRun waits for the "running" line; nothing is
        # logged per datagram or per session at info.
        cfg = lab_config(lab, appliance={"state-dir": str(lab.state_dir / "bench-state")})
        with MirageRun(lab, cfg, name="udp-bench") as run:
            assert run.proc is not None
            mpid = run.proc.pid
            pps_args = ["pps", "--seconds", str(seconds), "--size", str(args.size),
                        "--sockets", str(args.sockets), "--window", str(args.window)]
            kernel = load(lab, pps_args[0], REAL, str(ECHO_PORT), *pps_args[1:], seconds=seconds)
            mirage, cpu = measured(mpid, lambda: load(lab, pps_args[0], NAME, str(ECHO_PORT),
                                                      *pps_args[1:], seconds=seconds))
            rows.append(("echo replies/s", f"{args.size} B, {args.sockets}x{args.window}",
                         mirage["pps"], kernel["pps"], f"mirage cpu {cpu:.2f} cores"))
            rows.append(("echo Mbit/s (replies)", "", mirage["mbit"], kernel["mbit"], ""))
            k1 = iperf(lab, REAL, seconds, args.size)
            m1, cpu1 = measured(mpid, lambda: iperf(lab, NAME, seconds, args.size))
            rows.append(("one-way datagrams/s", f"iperf3 -u -b 0 -l {args.size}", m1["pps"],
                         k1["pps"], f"mirage cpu {cpu1:.2f}; lost {m1['lost']:.0f}% of "
                         f"{m1['sent_pps']:.0f}/s sent (kernel {k1['lost']:.0f}%)"))
            rows.append(("one-way Mbit/s", "", m1["mbit"], k1["mbit"], ""))
            s_args = ["sessions", "--seconds", str(seconds), "--count", str(args.sessions),
                      "--concurrency", str(args.concurrency)]
            ks = load(lab, s_args[0], REAL, str(ECHO_PORT), *s_args[1:], seconds=seconds)
            ms, cpu2 = measured(mpid, lambda: load(lab, s_args[0], NAME, str(ECHO_PORT),
                                                   *s_args[1:], seconds=seconds))
            rows.append(("sessions/s", f"{args.concurrency} at a time", ms["per_second"],
                         ks["per_second"], f"mirage cpu {cpu2:.2f}; failed {ms['failed']} "
                         f"(kernel {ks['failed']})"))
        echo.terminate()
        echo.wait(timeout=5)
    finally:
        lab.down()
    print(f"{'workload':24} {'shape':28} {'mirage':>12} {'kernel':>12} {'ratio':>7}  notes")
    for what, shape, m, k, note in rows:
        ratio = f"{m / k:.2f}" if k else "-"
        print(f"{what:24} {shape:28} {m:12,.0f} {k:12,.0f} {ratio:>7}  {note}")
    one_way = rows[2][2]
    verdict = "meets" if one_way >= TARGET_PPS else "BELOW"
    print(f"\nissue target: {TARGET_PPS:,} datagrams/s of 512 B through DIRECT: {verdict} "
          f"({one_way:,.0f}/s one-way)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
