#!/usr/bin/env python3
"""Capture benchmark: the nftables (TPROXY) and eBPF (tc sk_assign) backends side by side.

One run builds its own namespace lab (`appliance.lab.Lab`, prefix `cb<pid>`),
starts `mirage run` once per backend on the same configuration (only
`appliance.redirect` differs), measures the same three figures through each,
prints them with the eBPF/nftables ratio, and tears everything down (also on
Ctrl-C, SIGTERM and errors).

Figures per backend (all through the capture: client -> fake IP -> Mirage):
  Gbit/s   iperf3, one TCP stream, `--seconds`, to the fake IP of
           www.gamma.test (DIRECT to the iperf3 server upstream).
  conn/s   wrk `-H 'Connection: close'` for `--seconds` against the same
           fake IP (nginx): every request a new captured TCP connection.
  pkt/s    small UDP datagrams (32-byte payload) blasted by `--senders`
           processes for `--seconds` at a fake IP whose name the rules REJECT:
           the figure is what the gateway's kernel steered to Mirage's UDP
           socket (Udp InDatagrams + RcvbufErrors in the gateway namespace),
           i.e. the capture path's own rate, next to what the senders sent.
           On these 2-core machines the senders share the CPUs: the figure
           is bounded by them, say so when sent ~= steered.

Plus the tc program's own cost: with kernel.bpf_stats_enabled=1 (restored to
its previous value afterwards) `bpftool prog show` gives run_time_ns and
run_cnt for the program attached to lan0 during the eBPF runs: ns/packet.

Usage: bench/capture.py [--seconds 3] [--senders 2]
Exit status: 0 measured, 2 setup failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.lab.lab import Lab  # noqa: E402
from appliance.lab.mirage import MirageError, MirageRun, lab_config  # noqa: E402

IPERF_PORT = 5201
DIRECT_NAME = "www.gamma.test"
PPS_NAME = "pps.bench.test"  # rules: REJECT (datagrams end at Mirage's socket)
PPS_PORT = 9999
BACKENDS = ("nftables", "ebpf")
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")

# Runs in the client namespace: sendto() in a loop for N seconds, prints the count.
SENDER = r"""
import socket, sys, time
ip, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
payload = b"x" * 32
n = 0
end = time.monotonic() + secs
while True:
    for _ in range(256):
        try:
            s.sendto(payload, (ip, port))
            n += 1
        except BlockingIOError:
            pass
    if time.monotonic() >= end:
        break
print(n)
"""


class BenchError(RuntimeError):
    pass


@dataclass
class Row:
    backend: str
    gbps: float | None = None
    conns: float | None = None
    sent_pps: float | None = None
    steered_pps: float | None = None
    notes: list[str] = field(default_factory=list)


class Bench:
    """Owns the lab, the iperf3 server, the mirage runs and the bpf_stats
    sysctl's old value; `close()` restores or removes each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lab = Lab(f"cb{os.getpid()}")
        self.mirage: MirageRun | None = None
        self.rows: dict[str, Row] = {}
        self.prog_cost: tuple[int, int] | None = None  # (run_time_ns, run_cnt)
        self.bpf_stats_old: str | None = None

    def run(self, node: str, argv: list[str], timeout: float = 60) -> str:
        r = self.lab.exec(node, argv, timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"{node}: {' '.join(argv[:3])}... exited {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r.stdout

    def setup(self) -> None:
        t0 = time.monotonic()
        self.lab.up()
        for node in ("client", "gateway"):
            self.run(node, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000",
                            "net.ipv4.tcp_tw_reuse=1"])
        self.lab.popen("upstream", ["iperf3", "-s", "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.lab.exec("upstream", ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout:
            if time.monotonic() > deadline:
                raise BenchError("iperf3 server did not start")
            time.sleep(0.05)
        print(f"lab {self.lab.prefix} up in {time.monotonic() - t0:.1f}s", flush=True)

    def close(self) -> None:
        if self.bpf_stats_old is not None:
            BPF_STATS.write_text(self.bpf_stats_old)
            self.bpf_stats_old = None
        self.stop_mirage()
        self.lab.down()

    # ------------------------------------------------------------ mirage

    def start_mirage(self, backend: str) -> None:
        cfg = lab_config(self.lab, appliance={"redirect": backend},
                         rules=[f"DOMAIN,{PPS_NAME},REJECT", "MATCH,DIRECT"])
        self.mirage = MirageRun(self.lab, cfg, name=f"cbench-{backend}").start()

    def stop_mirage(self) -> None:
        if self.mirage is not None:
            try:
                self.mirage.stop()
            finally:
                self.mirage = None

    def fake_ip(self, name: str) -> str:
        gw = self.lab.addr("gateway", "lan0")
        out = self.run("client", ["dig", "+short", "+time=2", "+tries=2", f"@{gw}", name]).strip()
        if not re.fullmatch(r"198\.18\.\d+\.\d+", out):
            raise BenchError(f"{name}: expected a fake IP from Mirage, got {out!r}")
        return out

    # ------------------------------------------------------------ figures

    def iperf(self, ip: str) -> float:
        secs = self.args.seconds
        out = self.run("client", ["iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t", str(secs),
                                  "-J", "--connect-timeout", "3000"], timeout=secs + 20)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9

    def wrk(self, ip: str) -> float:
        secs = self.args.seconds
        r = self.lab.exec("client", ["wrk", "-t2", "-c32", f"-d{secs}s", "--timeout", "3s",
                                     "-H", "Connection: close", f"http://{ip}/"],
                          timeout=secs + 30)
        m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
        if r.returncode != 0 or m is None:
            raise BenchError(f"wrk to {ip}: {(r.stderr or r.stdout).strip()[-500:]}")
        return float(m.group(1))

    def udp_counters(self) -> int:
        text = self.run("gateway", ["cat", "/proc/net/snmp"])
        lines = [ln.split() for ln in text.splitlines() if ln.startswith("Udp:")]
        head, values = lines[0], lines[1]
        row = dict(zip(head[1:], (int(v) for v in values[1:]), strict=True))
        return row["InDatagrams"] + row["RcvbufErrors"]

    def pps(self, ip: str) -> tuple[float, float]:
        """(sent/s by the client senders, steered/s into Mirage's socket)."""
        secs = self.args.seconds
        before = self.udp_counters()
        t0 = time.monotonic()
        procs = [self.lab.popen("client", [sys.executable, "-c", SENDER, ip, str(PPS_PORT),
                                           str(secs)], stdout=subprocess.PIPE, text=True)
                 for _ in range(self.args.senders)]
        sent = 0
        for p in procs:
            out, _ = p.communicate(timeout=secs + 30)
            sent += int(out.strip() or 0)
        elapsed = time.monotonic() - t0
        time.sleep(0.2)  # let the last datagrams land
        steered = self.udp_counters() - before
        return sent / elapsed, steered / elapsed

    def prog_stats(self) -> tuple[int, int]:
        filters = json.loads(self.run("gateway", ["tc", "-j", "filter", "show", "dev", "lan0",
                                                  "ingress"]))
        ids = [f["options"]["prog"]["id"] for f in filters if "options" in f]
        if not ids:
            raise BenchError("no tc program on lan0 during the eBPF run")
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(ids[0])],
                                         check=True, capture_output=True, text=True).stdout)
        return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))

    def measure(self, backend: str) -> None:
        row = Row(backend)
        self.rows[backend] = row
        print(f"{backend}:", flush=True)
        self.start_mirage(backend)
        if backend == "ebpf":
            self.bpf_stats_old = BPF_STATS.read_text()
            BPF_STATS.write_text("1\n")
            cost0 = self.prog_stats()
        ip = self.fake_ip(DIRECT_NAME)
        pps_ip = self.fake_ip(PPS_NAME)
        print("  iperf3 ...", end="", flush=True)
        row.gbps = self.iperf(ip)
        print(f" {row.gbps:.2f} Gbit/s; wrk ...", end="", flush=True)
        row.conns = self.wrk(ip)
        print(f" {row.conns:,.0f} conn/s; udp ...", end="", flush=True)
        row.sent_pps, row.steered_pps = self.pps(pps_ip)
        print(f" {row.steered_pps:,.0f} pkt/s steered ({row.sent_pps:,.0f} sent)", flush=True)
        if row.steered_pps > 0.9 * row.sent_pps:
            row.notes.append("pkt/s bounded by the senders")
        if backend == "ebpf":
            cost1 = self.prog_stats()
            self.prog_cost = (cost1[0] - cost0[0], cost1[1] - cost0[1])
            assert self.bpf_stats_old is not None
            BPF_STATS.write_text(self.bpf_stats_old)
            self.bpf_stats_old = None
        self.stop_mirage()

    def report(self) -> None:
        nft, bpf = self.rows.get("nftables"), self.rows.get("ebpf")
        print()
        print(f"{'backend':<10} {'Gbit/s':>8} {'conn/s':>9} {'pkt/s steered':>14} "
              f"{'pkt/s sent':>11}  notes")
        for row in self.rows.values():
            print(f"{row.backend:<10} {_f(row.gbps, 8, 2)} {_f(row.conns, 9, 0)} "
                  f"{_f(row.steered_pps, 14, 0)} {_f(row.sent_pps, 11, 0)}  "
                  f"{'; '.join(row.notes)}")
        if nft and bpf:
            print(f"{'ebpf/nft':<10} {_ratio(bpf.gbps, nft.gbps):>8} "
                  f"{_ratio(bpf.conns, nft.conns):>9} "
                  f"{_ratio(bpf.steered_pps, nft.steered_pps):>14}")
        if self.prog_cost is not None:
            ns, cnt = self.prog_cost
            per = f"{ns / cnt:.0f} ns/packet" if cnt else "no packets"
            print(f"\ntc program (mirage_ingress on lan0, eBPF run): {cnt:,} runs, "
                  f"{ns / 1e6:.1f} ms total, {per}")


def _f(v: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width},.{digits}f}"


def _ratio(v: float | None, base: float | None) -> str:
    return "-" if v is None or not base else f"{v / base:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="duration of each figure")
    parser.add_argument("--senders", type=int, default=2, help="UDP sender processes")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/capture.py needs root (network namespaces, bpf stats)", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    t0 = time.monotonic()
    try:
        bench.setup()
        for backend in BACKENDS:
            bench.measure(backend)
    except KeyboardInterrupt:
        print("\ninterrupted; tearing the lab down", file=sys.stderr)
        bench.close()
        return 130
    except (BenchError, MirageError, subprocess.SubprocessError) as e:
        print(f"\nbench failed: {e}", file=sys.stderr)
        if bench.mirage is not None:
            print(bench.mirage.log_text()[-2000:], file=sys.stderr)
        bench.close()
        return 2
    except BaseException:
        bench.close()
        raise
    bench.close()
    bench.report()
    print(f"\ntotal {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
