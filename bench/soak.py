#!/usr/bin/env python3
"""Soak: mixed DNS/TCP/UDP from several LAN clients while a small fake-IP
range recycles all the time; Mirage's memory, descriptors and flows over time.

A throwaway lab (`appliance.lab`, prefix `sk<pid>`: client, gateway,
upstream namespaces, no route out of the lab) with `mirage run` on the
gateway, configured with a tiny fake range (--fake-range, default a /26:
62 addresses) so that the clients' stream of new names recycles it every
second or so. --clients source addresses are added to the client's LAN
interface, each a LAN client running bench/soak_client.py's four workers
(new names, short TCP flows DIRECT and through SOCKS5, one long keep-alive
TCP flow, one long UDP session) for --seconds (default 600).

Every --sample seconds it records Mirage's RSS, open descriptors, threads
and the pool's recycle counter. Judged at the end:

- no flow broken by recycling: every response carried its name's marker,
  no long flow died mid-request, every UDP reply came from the name's real
  address (a recycled fake IP reaching another name would show here);
- the clients really ran: each kind of work succeeded, and the pool
  recycled;
- no descriptor leak: once the clients stop and sessions expire
  (`appliance.udp-timeout` is set to 5 s here), Mirage holds no more
  descriptors than before the load (a slack of 4);
- RSS after warm-up (the first max(10 s, 20%) of the run) grows under 5%
  by the end — judged only for runs of --judge-rss-after seconds or more
  (120 by default): a short run's RSS says little.

Prints the samples and a verdict; exit 0 pass, 1 fail, 2 could not run.
The tests run a 20-second smoke of it (tests/integration/test_soak.py).

Usage: bench/soak.py [--seconds 600] [--clients 3] [--noise-rate 20]
                     [--fake-range 198.18.0.0/26] [--sample 5]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _lab import ROOT, BenchError, LabBench, drive

from appliance.lab.mirage import MirageRun, lab_config

PY = sys.executable
CLIENT = ROOT / "bench" / "soak_client.py"
ECHO = ROOT / "bench" / "udp_echo.py"
ECHO_PORT = 9000
GAMMA_REAL = "192.168.57.12"
FD_SLACK = 4
RSS_GROWTH_LIMIT = 0.05
UDP_TIMEOUT = 5.0


def proc_sample(pid: int) -> dict[str, int]:
    """RSS (KiB), open descriptors and threads of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


class Soak(LabBench):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, f"sk{os.getpid()}")
        self.samples: list[dict[str, Any]] = []
        self.client_lines: list[dict[str, Any]] = []
        self.echo: subprocess.Popen[bytes] | None = None
        self.verdict: list[tuple[str, bool, str]] = []

    def api_status(self) -> dict[str, Any]:
        out = self.lab.exec("gateway", ["curl", "-s", "--max-time", "3",
                                        "http://127.0.0.1:9090/mirage/status"]).stdout
        try:
            status: dict[str, Any] = json.loads(out)
        except ValueError:
            return {}
        return status

    def sample(self, t0: float, pid: int, phase: str) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.monotonic() - t0, 1), "phase": phase,
                               **proc_sample(pid)}
        status = self.api_status()
        counters = status.get("counters", {})
        row["recycled"] = counters.get("fakeip", {}).get("recycled")
        row["tasks"] = status.get("tasks")
        self.samples.append(row)
        print(f"{row['t']:7.1f}s {phase:9} rss {row['rss_kib'] / 1024:7.1f} MiB  "
              f"fds {row['fds']:5}  threads {row['threads']:3}  "
              f"recycled {row['recycled']}", flush=True)
        return row

    def body(self) -> None:
        args = self.args
        fake = ipaddress.ip_network(args.fake_range, strict=False)
        self.lab.up()
        sources = [f"192.168.56.{20 + i}" for i in range(args.clients)]
        for src in sources:
            self.run("client", ["ip", "addr", "add", f"{src}/24", "dev", "lan0"])
        self.echo = self.lab.popen("upstream", [PY, str(ECHO), "--tag", "--max-seconds",
                                                str(args.seconds + 120),
                                                f"{GAMMA_REAL}:{ECHO_PORT}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.echo.stdout is not None
        if self.echo.stdout.readline().strip() != b"ready":
            raise BenchError("the UDP echo server did not start")
        cfg = lab_config(
            self.lab,
            dns={"fake-ip-range": str(fake)},
            appliance={"state-dir": str(self.lab.state_dir / "soak-state"),
                       "udp-timeout": UDP_TIMEOUT},
        )
        self.mirage = MirageRun(self.lab, cfg, name="soak").start()
        assert self.mirage.proc is not None
        pid = self.mirage.proc.pid
        t0 = time.monotonic()
        time.sleep(1.0)
        before = self.sample(t0, pid, "before")
        client = self.lab.popen(
            "client",
            [PY, str(CLIENT), "--gateway", self.lab.addr("gateway", "lan0"),
             "--sources", *sources, "--seconds", str(args.seconds),
             "--noise-rate", str(args.noise_rate), "--echo-port", str(ECHO_PORT),
             "--fake-prefix", _prefix(fake), "--report", str(args.sample)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader = threading.Thread(target=self._read_client, args=(client,), daemon=True)
        reader.start()
        warmup = max(10.0, 0.2 * args.seconds)
        load_start = time.monotonic()
        after_warmup: dict[str, Any] | None = None
        while client.poll() is None:
            if time.monotonic() - load_start > args.seconds + 60:
                client.kill()
                raise BenchError("the soak client did not finish in time")
            time.sleep(args.sample)
            phase = "warm-up" if time.monotonic() - load_start < warmup else "load"
            row = self.sample(t0, pid, phase)
            if phase == "load" and after_warmup is None:
                after_warmup = row
        reader.join(timeout=10)
        last_load = self.samples[-1]
        # Sessions expire (udp-timeout), kept proxy connections close (5 s).
        time.sleep(max(UDP_TIMEOUT, 5.0) + 3.0)
        after = self.sample(t0, pid, "after")
        self.judge(before, after_warmup, last_load, after, client)

    def _read_client(self, client: subprocess.Popen[bytes]) -> None:
        assert client.stdout is not None
        for line in client.stdout:
            try:
                self.client_lines.append(json.loads(line))
            except ValueError:
                print(f"soak client: {line.decode(errors='replace').rstrip()}", file=sys.stderr)

    def judge(self, before: dict[str, Any], warm: dict[str, Any] | None,
              last: dict[str, Any], after: dict[str, Any],
              client: subprocess.Popen[bytes]) -> None:
        args = self.args
        final = next((x for x in self.client_lines if "final" in x), None)
        if final is None:
            err = client.stderr.read().decode(errors="replace") if client.stderr else ""
            raise BenchError(f"the soak client printed no final counts: {err[-1000:]}")
        c: dict[str, int] = final["final"]
        print("\nclient counts:", json.dumps(c, sort_keys=True))
        broken = c.get("short_broken", 0) + c.get("long_broken", 0) + c.get("udp_broken", 0)
        self.verdict.append(("no flow broken by recycling", broken == 0,
                             f"short {c.get('short_broken', 0)}, long "
                             f"{c.get('long_broken', 0)}, udp {c.get('udp_broken', 0)}"))
        ran = {k: c.get(k, 0) for k in ("noise_fake", "short_ok", "long_ok", "udp_ok")}
        recycled = (after.get("recycled") or 0) - (before.get("recycled") or 0)
        self.verdict.append(("every kind of work ran, the pool recycled",
                             all(ran.values()) and recycled > 0 and not final["stuck_threads"],
                             f"{ran}, recycled {recycled}, stuck threads "
                             f"{final['stuck_threads']}"))
        self.verdict.append(("no descriptor leak", after["fds"] <= before["fds"] + FD_SLACK,
                             f"{before['fds']} before the load, {last['fds']} at its end, "
                             f"{after['fds']} after it (slack {FD_SLACK})"))
        if warm is None:
            self.verdict.append(("RSS after warm-up", True, "no sample after warm-up"))
        else:
            growth = last["rss_kib"] / warm["rss_kib"] - 1
            judged = args.seconds >= args.judge_rss_after
            self.verdict.append((
                f"RSS grows < {RSS_GROWTH_LIMIT:.0%} after warm-up",
                growth < RSS_GROWTH_LIMIT or not judged,
                f"{warm['rss_kib'] / 1024:.1f} -> {last['rss_kib'] / 1024:.1f} MiB "
                f"({growth:+.1%})" + ("" if judged else
                                      f"; not judged under {args.judge_rss_after:g} s")))
        errors = {k: v for k, v in c.items() if not k.endswith(("_ok", "_fake", "_connects"))}
        print("errors and misses (informational):", json.dumps(errors, sort_keys=True))

    def close(self) -> None:
        if self.echo is not None and self.echo.poll() is None:
            self.echo.terminate()
            self.echo.wait(timeout=5)
        super().close()


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """The dotted prefix every address of a v4 range starting at a /24 or
    longer boundary shares (the client's quick "is it fake" check)."""
    octets = str(net.network_address).split(".")
    keep = max(1, min(3, net.prefixlen // 8))
    return ".".join(octets[:keep]) + "."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--noise-rate", type=float, default=20.0,
                    help="new names per second per client")
    ap.add_argument("--fake-range", default="198.18.0.0/26")
    ap.add_argument("--sample", type=float, default=5.0)
    ap.add_argument("--judge-rss-after", type=float, default=120.0)
    args = ap.parse_args()
    if not 5 <= args.seconds <= 4 * 3600 or not 1 <= args.clients <= 20:
        ap.error("--seconds 5..14400, --clients 1..20")
    soak = Soak(args)
    status = drive(soak, soak.body)
    if status is not None:
        return status
    print()
    ok = True
    for what, passed, detail in soak.verdict:
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'}  {what}: {detail}")
    print(f"\nsoak {'passed' if ok else 'FAILED'} ({args.seconds:g} s, {args.clients} clients)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
