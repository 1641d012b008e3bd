#!/usr/bin/env python3
"""What one malformed DNS query costs the handler: CPU and log bytes, old vs new.

Calls `DnsHandler.handle` in-process (no sockets: the cost measured is the
handler's alone) with N packets of each hostile kind, with logging on at INFO
into a byte counter, exactly as `mirage run` formats it. The same loop runs in
two child processes side by side: one importing this tree, one importing a
baseline revision extracted with `git archive` (default: the commit before the
hostile-input work). Prints microseconds of CPU per packet and log bytes per
packet for each kind.

Usage: bench/malformed_dns.py [-n 5000] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "03ab11b"  # main before malformed queries became FORMERR without a traceback

# Runs in the child; prints one JSON object {kind: [us_per_packet, log_bytes_per_packet]}.
CHILD = r"""
import io, json, logging, struct, sys, time
from ipaddress import IPv4Network

n = int(sys.argv[1])
sink = io.StringIO()
handler = logging.StreamHandler(sink)
handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
logging.basicConfig(level=logging.INFO, handlers=[handler])

from appliance.config.model import DnsConfig
from appliance.dns.handler import DnsHandler
from appliance.fakeip import FakeIPPool

dns = DnsHandler(DnsConfig(), FakeIPPool(IPv4Network("198.18.0.0/16")))

def query(name, qtype=1):
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1)

def labels(*parts):
    return b"".join(bytes([len(p)]) + p for p in parts) + b"\0"

KINDS = {
    "label>63": query(labels(b"a" * 64, b"example", b"com")),
    "name>255": query(labels(*[b"b" * 63] * 5)),
    "pointer loop": query(b"\x01a\xc0\x0c"),
    "cut short": query(labels(b"www", b"example", b"com"))[:-3],
    "good A": None,
}
out = {}
for kind, packet in KINDS.items():
    before_log = sink.tell()
    start = time.process_time()
    for i in range(n):
        data = packet if packet is not None else query(labels(b"h%d" % i, b"example"))
        dns.handle(data)
    cpu = time.process_time() - start
    out[kind] = [cpu / n * 1e6, (sink.tell() - before_log) / n]
# Whatever the new code only says once an interval, said now.
report = getattr(dns, "report_problems", None)
if report is not None:
    report(force=True)
out["summary log bytes"] = [0.0, float(sink.tell())]
print(json.dumps(out))
"""


def run(tree: Path, n: int) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(n)], cwd=tree, env=env, capture_output=True,
        text=True, check=True,
    )
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000, help="packets per kind")
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare against")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mbench-malformed-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "appliance"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        old = run(Path(tmp), args.n)
    new = run(ROOT, args.n)
    print(f"{args.n} packets per kind; CPU us/packet and log bytes/packet "
          f"({args.baseline} vs this tree)")
    print(f"{'kind':<18}{'old us':>10}{'new us':>10}{'old log B':>12}{'new log B':>12}")
    for kind in old:
        if kind == "summary log bytes":
            continue
        (ou, ol), (nu, nl) = old[kind], new[kind]
        print(f"{kind:<18}{ou:>10.1f}{nu:>10.1f}{ol:>12.1f}{nl:>12.1f}")
    print(f"total log bytes: old {old['summary log bytes'][1]:.0f}, "
          f"new {new['summary log bytes'][1]:.0f}")


if __name__ == "__main__":
    main()
