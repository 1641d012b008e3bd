"""What the lab benchmarks (bench/capture.py, bench/gateway.py) share.

`LabBench` owns one namespace lab (`appliance.lab.Lab`) and the Mirage run
in it, and measures through it: checked commands, waiting for a listener,
asking Mirage for a fake IP, iperf3 (one TCP stream) and wrk (new
connections/s). `drive()` runs a benchmark's body with the teardown every
exit path needs (Ctrl-C, SIGTERM, errors). Not a module of the appliance:
imported by the bench scripts from their own directory.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.lab.lab import Lab  # noqa: E402
from appliance.lab.mirage import MirageError, MirageRun  # noqa: E402
from appliance.lab.topology import Topology  # noqa: E402

# wrk's concurrent connections (2 threads) for every conn/s figure.
WRK_CONNECTIONS = 32
IPERF_PORT = 5201

# Runs in the client namespace: sequential GETs on new connections, prints
# the connect-start -> first-byte times (seconds) as JSON.
TTFB_CLIENT = r"""
import json, socket, sys, time
ip, host = sys.argv[1], sys.argv[5]
port, n, warm = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
req = ("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host).encode()
out = []
for i in range(warm + n):
    t0 = time.perf_counter()
    s = socket.create_connection((ip, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(req)
    first = s.recv(65536)
    t1 = time.perf_counter()
    if not first:
        sys.exit("connection closed before any response byte")
    while s.recv(65536):
        pass
    s.close()
    if i >= warm:
        out.append(t1 - t0)
print(json.dumps(out))
"""


class BenchError(RuntimeError):
    """A step of the benchmark could not run (a tool failed, a server did not
    come up); the message says which."""


class LabBench:
    """A lab (prefix `prefix`) and the Mirage run in it; subclasses add their
    own processes and tear them down in `close()` (calling this one's)."""

    def __init__(self, args: argparse.Namespace, prefix: str,
                 etc_files: dict[str, dict[str, str]] | None = None,
                 topology: Topology | None = None) -> None:
        self.args = args
        self.lab = Lab(prefix, etc_files=etc_files, topology=topology)
        self.mirage: MirageRun | None = None

    def run(self, node: str, argv: list[str], timeout: float = 60) -> str:
        """`argv`'s stdout in `node`; BenchError if it exits non-zero."""
        r = self.lab.exec(node, argv, timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"{node}: {' '.join(argv[:3])}... exited {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r.stdout

    def wait_port(self, node: str, port: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.lab.exec(node, ["ss", "-Hltn", f"sport = :{port}"]).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise BenchError(f"nothing listens on {node} port {port} after {timeout:g}s")

    def lab_up(self) -> None:
        """The lab, with room for many short connections, and an iperf3
        server in the upstream namespace (not yet waited for)."""
        self.lab.up()
        # More ephemeral ports and TIME_WAIT reuse in our own namespaces, so
        # tens of thousands of short connections never run out of ports. Not
        # below 10240: both gateways listen under it (Mirage 7893, 9090;
        # mihomo 1053, 7894, 7896, 9097), and a closing connection of the
        # gateway before on such a port made the next one's listen fail
        # ("bind: address already in use": a whole mihomo round lost).
        for node in ("client", "gateway"):
            self.run(node, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=10240 65000",
                            "net.ipv4.tcp_tw_reuse=1"])
        self.lab.popen("upstream", ["iperf3", "-s", "-p", str(IPERF_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def fake_ip(self, name: str) -> str:
        """The fake IP Mirage answers for `name`, asked from the client."""
        gw = self.lab.addr("gateway", "lan0")
        out = self.run("client", ["dig", "+short", "+time=2", "+tries=2", f"@{gw}", name]).strip()
        if not re.fullmatch(r"198\.18\.\d+\.\d+", out):
            raise BenchError(f"{name}: expected a fake IP from Mirage, got {out!r}")
        return out

    def iperf(self, ip: str, secs: int) -> float:
        """Gbit/s of one iperf3 TCP stream from the client to `ip`."""
        out = self.run("client", ["iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t", str(secs),
                                  "-J", "--connect-timeout", "3000"], timeout=secs + 20)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9

    def wrk(self, ip: str, secs: int) -> tuple[float, str]:
        """(requests/s, wrk's socket-error and non-2xx lines) of wrk with
        `Connection: close` from the client: each request a new connection."""
        r = self.lab.exec("client", ["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{secs}s",
                                     "--timeout", "3s",
                                     "-H", "Connection: close", f"http://{ip}/"],
                          timeout=secs + 30)
        m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
        if r.returncode != 0 or m is None:
            raise BenchError(f"wrk to {ip}: {(r.stderr or r.stdout).strip()[-500:]}")
        errors = re.search(r"Socket errors:.*", r.stdout)
        non2xx = re.search(r"Non-2xx.*", r.stdout)
        note = "; ".join(x.group(0).strip() for x in (errors, non2xx) if x)
        return float(m.group(1)), note

    def close(self) -> None:
        """Stop Mirage (saying so if that fails) and take the lab down."""
        if self.mirage is not None:
            try:
                self.mirage.stop()
            except Exception as e:  # keep tearing down; say what was left
                print(f"mirage stop: {e}", file=sys.stderr)
            finally:
                self.mirage = None
        self.lab.down()


def drive(bench: LabBench, body: Callable[[], object],
          errors: tuple[type[BaseException], ...] = (BenchError, MirageError)) -> int | None:
    """Run `body` (SIGTERM counts as Ctrl-C) and close `bench` on every path.
    None when it completed; the exit status when it was interrupted (130) or
    failed with one of `errors` (2, with Mirage's last log lines); any other
    exception propagates after the teardown."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        body()
    except KeyboardInterrupt:
        print("\ninterrupted; tearing the lab down", file=sys.stderr)
        bench.close()
        return 130
    except errors as e:
        print(f"\nbench failed: {e}", file=sys.stderr)
        if bench.mirage is not None:
            print(bench.mirage.log_text()[-2000:], file=sys.stderr)
        bench.close()
        return 2
    except BaseException:
        bench.close()
        raise
    bench.close()
    return None


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def lab_cpu(namespaces: list[str]) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process living in one of
    `namespaces` (/run/netns names), summed by command name. Reads /proc
    only. A process's reaped children count as its own (a forking server's
    workers); a process that exits between two readings (wrk) drops out."""
    inodes = set()
    for ns in namespaces:
        try:
            inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
        except OSError:
            pass
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino not in inodes:
                continue
            head, rest = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        comm, fields = head.split("(", 1)[1], rest.split()
        out[comm] = out.get(comm, 0.0) + sum(int(x) for x in fields[11:15]) / tick
    return out


def fmt(v: float | None, width: int, digits: int) -> str:
    """`v` right-aligned in `width` with `digits` decimals, '-' for None."""
    return f"{'-':>{width}}" if v is None else f"{v:>{width},.{digits}f}"
