#!/usr/bin/env python3
"""Protocol benchmark: Mirage's outbounds beside mihomo's, through the same
kind of transparent gateway to the same proxy server and the same web server.

One run builds its own namespace lab (`appliance.lab.Lab`, prefix `pb<pid>`,
nginx's download enlarged to `--mbytes`), starts sing-box in the upstream
namespace with one inbound per protocol row (appliance/lab/reference.py
`SingBox`), and then, in `--rounds` alternating rounds, runs `mirage run` and
mihomo (`MihomoGateway`) as the gateway, each on the same profile: every row's
proxy, one select group `bench` holding them and DIRECT, and `MATCH,bench`.
Per row the group is switched through the Clash API (the same PUT on both)
and the client namespace measures, to www.alpha.test's fake IP:

  MB/s      one stream: curl downloads nginx's `--mbytes` file (10^6 bytes/s).
  conn/s    wrk `-H 'Connection: close'` for `--seconds` (32 connections): each
            request a new flow through the gateway and a new proxy session.
  TTFB      `--requests` sequential GETs on new connections, connect() start
            -> first response byte; p50/p99 in ms.
  CPU       the gateway process's own user+system time (/proc/PID/stat)
            during the download (ms per MB) and during wrk (us per
            connection). The proxy server's and the kernel's work is not in it.

Each figure keeps its best round (other load on the shared machine only makes
a figure worse); the ratio table puts Mirage beside mihomo, with the issue's
floors: a TCP-transport row >= 0.5x mihomo's MB/s and conn/s, the QUIC rows
(hysteria2, tuic) >= 0.2x.

`--profile` also records `mirage run` with py-spy during an extra download and an
extra wrk run per row
(`.venv/bin/pip install py-spy`) and prints its top functions per row.

`--cpu N` pins both gateways, every thread, to CPU N (taskset): one core
each, the same for both, so that Mirage's one thread meets mihomo's
runtime on equal terms on a shared machine.

Usage: bench/protocols.py [--rows ss-aes,trojan-ws,...] [--rounds 2] [--mbytes 64]
                          [--seconds 3] [--requests 100] [--cpu N] [--profile]
Exit status: 0 every floor met, 1 a floor missed, 2 setup failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _lab import TTFB_CLIENT, BenchError, LabBench, cpu_seconds, drive, fmt

from appliance.lab.mirage import MirageError, MirageRun, lab_config
from appliance.lab.reference import (
    MIHOMO_CONTROLLER,
    MihomoGateway,
    ReferenceError,
    SingBox,
)
from appliance.lab.topology import load_topology

SERVER = "192.168.57.11"  # sing-box listens on www.beta.test's address
SNI = "www.beta.test"  # in the lab certificate
TARGET = "www.alpha.test"  # nginx on 192.168.57.10, asked by name through the proxy
PASSWORD = "bench-protocols-pw"
UUID = "3f1c2a6e-7b4d-4e9a-8c21-5d0e6f7a8b9c"
PSK16 = base64.b64encode(bytes(range(16))).decode()
GROUP = "bench"
MIRAGE_CONTROLLER = "127.0.0.1:9090"  # lab_config's external-controller


@dataclass(frozen=True)
class Proto:
    """One row: the sing-box inbound (without tag/listen/port/tls) and the
    Clash proxy (without name/server/port), both as their JSON/YAML keys;
    `tls` gives the inbound the lab certificate (with `alpn`)."""

    name: str
    inbound: dict[str, Any]
    proxy: dict[str, Any]
    tls: bool = False
    alpn: tuple[str, ...] = ()
    quic: bool = False  # judged against the QUIC floor (0.2x), not the TCP one


def _tls_proxy(key: str = "servername") -> dict[str, Any]:
    # Certificate checks on: both gateways would skip them alike, and a
    # handshake is a per-connection cost, not a per-byte one.
    return {key: SNI, "skip-cert-verify": True}


_VM = {"type": "vmess", "users": [{"name": "b", "uuid": UUID, "alterId": 0}]}
_VMP = {"type": "vmess", "uuid": UUID, "alterId": 0, "cipher": "aes-128-gcm"}
_VL = {"type": "vless", "users": [{"name": "b", "uuid": UUID}]}
_VLP = {"type": "vless", "uuid": UUID}
_TR = {"type": "trojan", "users": [{"name": "b", "password": PASSWORD}]}
_TRP = {"type": "trojan", "password": PASSWORD, **_tls_proxy("sni")}
_WS = {"transport": {"type": "ws", "path": "/ws"}}
_WSP = {"network": "ws", "ws-opts": {"path": "/ws"}}
_GRPC = {"transport": {"type": "grpc", "service_name": "BenchSvc"}}
_GRPCP = {"network": "grpc", "grpc-opts": {"grpc-service-name": "BenchSvc"}}

PROTOS: list[Proto] = [
    Proto("ss-aes", {"type": "shadowsocks", "method": "aes-128-gcm", "password": PASSWORD},
          {"type": "ss", "cipher": "aes-128-gcm", "password": PASSWORD}),
    Proto("ss-2022", {"type": "shadowsocks", "method": "2022-blake3-aes-128-gcm",
                      "password": PSK16},
          {"type": "ss", "cipher": "2022-blake3-aes-128-gcm", "password": PSK16}),
    Proto("trojan-tcp", _TR, _TRP, tls=True),
    Proto("trojan-ws", {**_TR, **_WS}, {**_TRP, **_WSP}, tls=True),
    Proto("trojan-grpc", {**_TR, **_GRPC}, {**_TRP, **_GRPCP}, tls=True, alpn=("h2",)),
    Proto("vmess-tcp", _VM, _VMP),
    Proto("vmess-ws", {**_VM, **_WS}, {**_VMP, **_WSP}),
    Proto("vmess-grpc", {**_VM, **_GRPC}, {**_VMP, "tls": True, **_tls_proxy(), **_GRPCP},
          tls=True, alpn=("h2",)),
    Proto("vless-tls", _VL, {**_VLP, "tls": True, **_tls_proxy()}, tls=True),
    Proto("vless-ws", {**_VL, **_WS}, {**_VLP, **_WSP}),
    Proto("vless-grpc", {**_VL, **_GRPC}, {**_VLP, "tls": True, **_tls_proxy(), **_GRPCP},
          tls=True, alpn=("h2",)),
    Proto("vless-vision", {"type": "vless",
                           "users": [{"name": "b", "uuid": UUID, "flow": "xtls-rprx-vision"}]},
          {**_VLP, "tls": True, **_tls_proxy(), "flow": "xtls-rprx-vision"}, tls=True),
    Proto("hysteria2", {"type": "hysteria2", "users": [{"name": "b", "password": PASSWORD}]},
          {"type": "hysteria2", "password": PASSWORD, **_tls_proxy("sni")},
          tls=True, alpn=("h3",), quic=True),
    Proto("tuic", {"type": "tuic", "congestion_control": "cubic",
                   "users": [{"name": "b", "uuid": UUID, "password": PASSWORD}]},
          {"type": "tuic", "uuid": UUID, "password": PASSWORD, "alpn": ["h3"],
           "congestion-controller": "cubic", **_tls_proxy("sni")},
          tls=True, alpn=("h3",), quic=True),
    # Reference rows: a plain relay (no crypto) and no proxy at all.
    Proto("socks5", {"type": "socks"}, {"type": "socks5"}),
]
REFERENCE_ROWS = ("socks5", "DIRECT")
ROWS = [p.name for p in PROTOS] + ["DIRECT"]
FIRST_PORT = 24001
GATEWAYS = ("mirage", "mihomo")
TCP_FLOOR, QUIC_FLOOR = 0.5, 0.2



@dataclass
class Figures:
    """One row through one gateway in one round (None: not measured)."""

    mbps: float | None = None
    conns: float | None = None
    conn_errors: str = ""
    ttfb: list[float] = field(default_factory=list)
    cpu_mb: float | None = None  # gateway CPU seconds per 10^6 bytes downloaded
    cpu_conn: float | None = None  # gateway CPU seconds per new connection
    error: str = ""

    def p(self, q: float) -> float | None:
        if not self.ttfb:
            return None
        values = sorted(self.ttfb)
        return values[min(len(values) - 1, int(len(values) * q))] * 1000


def best(rounds: list[Figures]) -> Figures:
    """Each figure from its best round, with that round's CPU."""
    ok = [f for f in rounds if not f.error] or rounds
    fast = max(ok, key=lambda f: f.mbps or 0.0)
    many = max(ok, key=lambda f: f.conns or 0.0)
    quick = min(ok, key=lambda f: f.p(0.5) or float("inf"))
    return Figures(mbps=fast.mbps, cpu_mb=fast.cpu_mb, conns=many.conns,
                   conn_errors=many.conn_errors, cpu_conn=many.cpu_conn, ttfb=quick.ttfb,
                   error="; ".join(sorted({f.error for f in rounds if f.error})))


class Bench(LabBench):
    """Owns the lab, sing-box, and whichever gateway (Mirage or mihomo) is
    running; `close()` stops them and removes the lab, by name and pid."""

    def __init__(self, args: argparse.Namespace) -> None:
        topo = load_topology()
        topo = dataclasses.replace(topo, web=dataclasses.replace(
            topo.web, big_bytes=args.mbytes << 20))
        super().__init__(args, f"pb{os.getpid()}", topology=topo)
        self.rows = [r for r in ROWS if r in args.rows.split(",")]
        self.protos = [p for p in PROTOS if p.name in self.rows]
        self.mihomo: MihomoGateway | None = None
        self.singbox: SingBox | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="pbench-"))
        self.figures: dict[tuple[str, str], list[Figures]] = {}
        self.profiles: dict[str, list[str]] = {}

    # ------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        t0 = time.monotonic()
        self.lab_up()
        tls_dir = self.lab.state_dir / "tls"
        inbounds = []
        for port, p in enumerate(self.protos, FIRST_PORT):
            inbound = {**p.inbound, "tag": p.name, "listen": SERVER, "listen_port": port}
            if p.tls:
                inbound["tls"] = {"enabled": True, "certificate_path": str(tls_dir / "server.pem"),
                                  "key_path": str(tls_dir / "server.key"),
                                  **({"alpn": list(p.alpn)} if p.alpn else {})}
            inbounds.append(inbound)
        if inbounds:
            self.singbox = SingBox(self.lab, inbounds, name="sing-box-bench", level="warn")
            self.singbox.start()
        print(f"lab {self.lab.prefix} up, sing-box with {len(inbounds)} inbounds, "
              f"in {time.monotonic() - t0:.1f}s", flush=True)

    def profile(self) -> dict[str, Any]:
        """The profile both gateways load (each adds its own DNS and
        capture settings)."""
        proxies = [{"name": p.name, "server": SERVER, "port": port, "udp": True, **p.proxy}
                   for port, p in enumerate(self.protos, FIRST_PORT)]
        return {
            "proxies": proxies,
            "proxy-groups": [{"name": GROUP, "type": "select",
                              "proxies": [*(p["name"] for p in proxies), "DIRECT"]}],
            "rules": [f"MATCH,{GROUP}"],
        }

    def start(self, gateway: str) -> int:
        """Start `gateway` (pinned to `--cpu` if given); returns its pid."""
        if gateway == "mirage":
            # log-level info (lab_config's): the readiness line is an info
            # line; Mirage logs flows at debug.
            cfg = lab_config(self.lab, **self.profile())
            self.mirage = MirageRun(self.lab, cfg, name="mirage-protocols").start()
            assert self.mirage.proc is not None
            pid = self.mirage.proc.pid
        else:
            # mihomo logs every flow at info: warning, as Mirage logs none.
            self.mihomo = MihomoGateway(self.lab, {**self.profile(),
                                                   "log-level": "warning"}).start()
            assert self.mihomo._proc is not None
            pid = self.mihomo._proc.pid
        if self.args.cpu is not None:
            # Every thread (-a): a Go runtime's threads made later inherit it.
            done = subprocess.run(["taskset", "-a", "-p", "-c", str(self.args.cpu), str(pid)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"taskset {gateway}: {done.stderr.strip()}")
        return pid

    def stop(self) -> None:
        if self.mirage is not None:
            self.mirage.stop()
            self.mirage = None
            # The next Mirage starts from an empty fake-IP store.
            for f in (self.lab.state_dir / "mirage-state").glob("fakeip*"):
                f.unlink()
        if self.mihomo is not None:
            self.mihomo.stop()
            self.mihomo = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.singbox is not None:
                self.singbox.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
            super().close()

    # ------------------------------------------------------------ measurements

    def select(self, gateway: str, row: str) -> None:
        """Point the `bench` group at `row` through the gateway's Clash API."""
        ctl = MIRAGE_CONTROLLER if gateway == "mirage" else "{}:{}".format(*MIHOMO_CONTROLLER)
        self.run("gateway", ["curl", "-sf", "-m", "3", "-X", "PUT", "-H",
                             "Content-Type: application/json", "-d", json.dumps({"name": row}),
                             f"http://{ctl}/proxies/{GROUP}"])

    def download(self, ip: str) -> tuple[float, float]:
        """(bytes, seconds) of one curl download of the big file."""
        timeout = max(30, self.args.mbytes)  # at >= ~1 MB/s
        url = f"http://{ip}{self.lab.topology.web.big_path}"
        size, secs = self.run("client", ["curl", "-s", "-o", "/dev/null", "--max-time",
                                         str(timeout), "-w", "%{size_download} %{time_total}",
                                         url], timeout=timeout + 10).split()
        if int(size) != self.args.mbytes << 20:
            raise BenchError(f"download through {ip}: {size} bytes, expected "
                             f"{self.args.mbytes << 20}")
        return float(size), float(secs)

    def measure(self, gateway: str, pid: int, row: str, ip: str) -> Figures:
        f = Figures()
        self.select(gateway, row)
        # One flow first: a first session's setup (QUIC handshake, DNS) is
        # not the row's steady state.
        self.run("client", ["curl", "-sf", "-o", "/dev/null", "-m", "10", f"http://{ip}/"])
        print(f"  {gateway:6} {row:12}", end="", flush=True)
        c0 = sum(cpu_seconds(pid))
        size, secs = self.download(ip)
        c1 = sum(cpu_seconds(pid))
        if self.args.profile and gateway == "mirage":
            # An extra download of its own: py-spy's sampling slows the
            # process it samples, so it never runs during a measured one.
            spy = self.start_profile(pid)
            self.download(ip)
            self.profiles[f"{row} download"] = self.stop_profile(spy)
        f.mbps = size / secs / 1e6
        f.cpu_mb = (c1 - c0) / (size / 1e6)
        print(f" {f.mbps:8.1f} MB/s", end="", flush=True)
        c0 = sum(cpu_seconds(pid))
        f.conns, f.conn_errors = self.wrk(ip, self.args.seconds)
        c1 = sum(cpu_seconds(pid))
        if f.conns:
            f.cpu_conn = (c1 - c0) / (f.conns * self.args.seconds)
        if self.args.profile and gateway == "mirage":
            spy = self.start_profile(pid)
            self.wrk(ip, self.args.seconds)
            self.profiles[f"{row} conn/s"] = self.stop_profile(spy)
        print(f" {f.conns:8,.0f} conn/s", end="", flush=True)
        out = self.run("client", [sys.executable, "-c", TTFB_CLIENT, ip, "80",
                                  str(self.args.requests), "5", TARGET], timeout=120)
        f.ttfb = [float(x) for x in json.loads(out)]
        print(f"  TTFB p50 {f.p(0.5):.2f} ms", flush=True)
        return f

    def gateway_round(self, gateway: str) -> None:
        pid = self.start(gateway)
        try:
            ip = self.fake_ip(TARGET)
            for row in self.rows:
                f = None
                for attempt in (1, 2):
                    try:
                        f = self.measure(gateway, pid, row, ip)
                        break
                    except BenchError as e:  # one broken row does not hide the others
                        print(f"  {gateway} {row} (attempt {attempt}): {str(e)[-300:]}",
                              flush=True)
                        self.say_if_exited(gateway)
                        # Once more: a failure that does not repeat is the
                        # busy machine's (it is printed above), a second one
                        # is the row's.
                        f = Figures(error=str(e)[-200:])
                assert f is not None
                self.figures.setdefault((gateway, row), []).append(f)
        finally:
            self.stop()

    def say_if_exited(self, gateway: str) -> None:
        """A gateway that died under load: its log tail, and BenchError (the
        rows after it would only fail to connect)."""
        run = self.mirage if gateway == "mirage" else self.mihomo
        proc = None if run is None else (run.proc if isinstance(run, MirageRun) else run._proc)
        if run is not None and proc is not None and proc.poll() is not None:
            raise BenchError(f"{gateway} exited ({proc.returncode}) during the row:\n"
                             f"{run.log_text()[-3000:]}")
        if run is not None:
            tail = run.log_text().splitlines()[-6:]
            print("  its log's last lines:\n" + "\n".join(f"    {line[:300]}" for line in tail))

    # ------------------------------------------------------------ py-spy

    def start_profile(self, pid: int) -> subprocess.Popen[bytes] | None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            print(" (py-spy not installed: no profile)", end="")
            return None
        out = self.tmp / f"spy-{pid}-{time.monotonic_ns()}.txt"
        return subprocess.Popen([exe, "record", "-p", str(pid), "-r", "200", "-f", "raw",
                                 "-o", str(out), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_profile(self, spy: subprocess.Popen[bytes] | None) -> list[str]:
        if spy is None:
            return []
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        try:
            spy.wait(15)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
        out = Path(str(spy.args[-2]))  # type: ignore[index]
        return top_functions(out.read_text()) if out.exists() else []

    # ------------------------------------------------------------ report

    def report(self) -> int:
        table = {(g, r): best(fs) for (g, r), fs in self.figures.items()}
        pinned = "" if self.args.cpu is None else f"both gateways on CPU {self.args.cpu}; "
        print("\nper row and gateway (best of "
              f"{self.args.rounds} round{'s' * (self.args.rounds > 1)}; {pinned}"
              f"{self.args.mbytes} MiB download, wrk {self.args.seconds}s, "
              f"{self.args.requests} TTFB requests):")
        print(f"{'row':13}{'gateway':8}{'MB/s':>9}{'conn/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'CPU ms/MB':>11}{'CPU us/conn':>13}")
        for row in self.rows:
            for g in GATEWAYS:
                f = table.get((g, row))
                if f is None:
                    continue
                print(f"{row:13}{g:8}{fmt(f.mbps, 9, 1)}{fmt(f.conns, 9, 0)}"
                      f"{fmt(f.p(0.5), 9, 2)}{fmt(f.p(0.99), 9, 2)}"
                      f"{fmt(None if f.cpu_mb is None else f.cpu_mb * 1e3, 11, 2)}"
                      f"{fmt(None if f.cpu_conn is None else f.cpu_conn * 1e6, 13, 0)}"
                      + (f"  [{f.conn_errors}]" if f.conn_errors else "")
                      + (f"  ERROR {f.error}" if f.error else ""))
        print("(CPU: the gateway process's own user+system time, not the proxy server's "
              "or the kernel's softirq work)")
        print("\nMirage / mihomo (MB/s and conn/s: higher is better; TTFB and CPU: "
              "lower is better):")
        print(f"{'row':13}{'MB/s':>7}{'conn/s':>8}{'p50':>7}{'p99':>7}{'CPU/MB':>8}"
              f"{'CPU/conn':>9}  floor")
        missed = 0
        for row in self.rows:
            m, h = table.get(("mirage", row)), table.get(("mihomo", row))
            if m is None or h is None:
                continue
            ratios = [_ratio(m.mbps, h.mbps), _ratio(m.conns, h.conns),
                      _ratio(m.p(0.5), h.p(0.5)), _ratio(m.p(0.99), h.p(0.99)),
                      _ratio(m.cpu_mb, h.cpu_mb), _ratio(m.cpu_conn, h.cpu_conn)]
            cells = "".join(fmt(r, w, 2) for r, w in zip(ratios, (7, 8, 7, 7, 8, 9),
                                                         strict=True))
            verdict = ""
            if row not in REFERENCE_ROWS:
                floor = QUIC_FLOOR if next(p for p in PROTOS if p.name == row).quic \
                    else TCP_FLOOR
                ok = all(r is not None and r >= floor for r in ratios[:2])
                missed += not ok
                verdict = f"  >= {floor}x: {'PASS' if ok else 'MISS'}"
            print(f"{row:13}{cells}{verdict}")
        for row, lines in self.profiles.items():
            print(f"\npy-spy, mirage during an extra {row} run (own samples, share):")
            for line in lines:
                print(f"  {line}")
        return 1 if missed else 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def top_functions(raw: str, n: int = 12) -> list[str]:
    """From py-spy's raw (collapsed-stack) output: the `n` leaf functions
    with the most samples ("own"), then the `n` functions of Mirage itself
    (appliance/) on the most stacks ("incl"), each with its share."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            if "appliance/" in frame:
                incl[frame] = incl.get(frame, 0) + int(count)
    if not total:
        return []

    def ranked(d: dict[str, int], kind: str) -> list[str]:
        top = sorted(d.items(), key=lambda kv: -kv[1])[:n]
        return [f"{kind} {c / total:6.1%}  {name}" for name, c in top]

    return ranked(own, "own ") + ranked(incl, "incl")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rows", default=",".join(ROWS),
                    help=f"comma-separated rows, from: {','.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per gateway")
    ap.add_argument("--mbytes", type=int, default=64, help="download size, MiB")
    ap.add_argument("--seconds", type=int, default=3, help="wrk duration per row")
    ap.add_argument("--requests", type=int, default=100, help="sequential TTFB requests")
    ap.add_argument("--cpu", type=int, default=None,
                    help="pin both gateways (every thread) to this CPU: one core each, "
                         "like for like")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy on mirage during an extra download and wrk run per row")
    args = ap.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; known: {','.join(ROWS)}")
    if os.geteuid() != 0:
        print("bench/protocols.py needs root (network namespaces)", file=sys.stderr)
        return 2
    bench = Bench(args)

    def body() -> None:
        bench.setup()
        for i in range(args.rounds):
            # Alternate which gateway goes first, so neither always runs on
            # the warmer (or the busier) half of the round.
            order: tuple[str, ...] = GATEWAYS if i % 2 == 0 else GATEWAYS[::-1]
            for g in order:
                print(f"round {i + 1}/{args.rounds}: {g}", flush=True)
                bench.gateway_round(g)

        status.append(bench.report())

    status: list[int] = []
    code = drive(bench, body, errors=(BenchError, ReferenceError, MirageError))
    return code if code is not None else status[0]


if __name__ == "__main__":
    sys.exit(main())
