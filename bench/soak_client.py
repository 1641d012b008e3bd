#!/usr/bin/env python3
"""The LAN side of bench/soak.py: several clients' mixed traffic through Mirage.

Runs in the lab's client namespace. For each source address given (one LAN
client each; the soak adds them to the client's interface), four threads:

- `noise`: A queries for names never asked before (`<src>-<n>.noise.test`)
  at --noise-rate per second: each takes a new fake IP, so a small fake
  range is recycled all the time. Counted: answered with a fake IP, other
  answers, timeouts.
- `short`: new TCP flows, one after another: ask the gateway for
  www.gamma.test (DIRECT) or www.alpha.test (SOCKS5 through dante),
  alternately, connect to the fake IP right away, GET /, check the body's
  marker. A wrong marker is a *broken* flow (the fake IP reached another
  name); a refused or reset connection is an error.
- `long`: one keep-alive HTTP connection to gamma's fake IP, a GET every
  --long-interval seconds, for the whole run, while the range recycles
  around it. A wrong marker or a connection that dies mid-request is
  *broken*; when the server ends the connection after a complete response
  (nginx's keepalive_requests), the client asks DNS again and reconnects.
- `udp`: one UDP session to gamma's fake IP and --echo-port, a datagram
  every --udp-interval seconds; the lab's tagged echo server answers with
  the address it was reached at, which must be gamma's real address
  (*broken* otherwise). Lost replies are counted.

Every loop is bounded by --seconds. Prints one JSON line of counters per
--report seconds (`{"t": ..., "counts": {...}}`) and a final line
`{"final": {...}}`. Exits 0 whatever it counted: bench/soak.py judges.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter

GAMMA = ("www.gamma.test", b"MARKER-GAMMA", "192.168.57.12")
ALPHA = ("www.alpha.test", b"MARKER-ALPHA", "192.168.57.10")


class Counts:
    """Thread-safe counters shared by the workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


def a_query(name: str) -> tuple[int, bytes]:
    """(id, wire bytes) of a recursive A/IN query for `name`."""
    qid = random.getrandbits(16)
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return qid, struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def first_a(reply: bytes, qid: int) -> str | None:
    """The first A record's address in `reply` (None: no A, other id, or
    an error rcode). Assumes the answer's names are compressed pointers or
    labels, as every server writes them."""
    if len(reply) < 12:
        return None
    rid, flags, qd, an = struct.unpack("!HHHH", reply[:8])
    if rid != qid or flags & 0xF or an == 0:
        return None
    pos = 12
    for _ in range(qd):
        while reply[pos] != 0:
            pos += reply[pos] + 1
        pos += 5
    for _ in range(an):
        if reply[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while reply[pos] != 0:
                pos += reply[pos] + 1
            pos += 1
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", reply[pos:pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(reply[pos:pos + 4])
        pos += rdlen
    return None


def resolve(src: str, gateway: str, name: str, timeout: float = 2.0) -> str | None:
    qid, wire = a_query(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(timeout)
        s.sendto(wire, (gateway, 53))
        try:
            reply = s.recv(4096)
        except TimeoutError:
            return None
    return first_a(reply, qid)


def http_get(sock: socket.socket, host: str, keep_alive: bool) -> tuple[bytes, bool]:
    """(body, server closes) of one GET / on `sock` (Content-Length bodies)."""
    conn = "keep-alive" if keep_alive else "close"
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = closes = None
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
        elif key.strip().lower() == b"connection":
            closes = value.strip().lower() == b"close"
    if length is None:
        raise ConnectionError("response without Content-Length")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return body, bool(closes)


def noise(args: argparse.Namespace, src: str, counts: Counts, stop: float) -> None:
    tag = src.replace(".", "-")
    n = 0
    period = 1.0 / args.noise_rate
    next_at = time.monotonic()
    while time.monotonic() < stop:
        n += 1
        ip = resolve(src, args.gateway, f"{tag}-{n}.noise.test", timeout=1.0)
        if ip is None:
            counts.add("noise_failed")
        elif ip.startswith(args.fake_prefix):
            counts.add("noise_fake")
        else:
            counts.add("noise_other")
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))


def short(args: argparse.Namespace, src: str, counts: Counts, stop: float) -> None:
    i = 0
    while time.monotonic() < stop:
        name, marker, _real = (GAMMA, ALPHA)[i % 2]
        i += 1
        ip = resolve(src, args.gateway, name)
        if ip is None:
            counts.add("short_dns_failed")
            continue
        try:
            with socket.create_connection((ip, 80), timeout=5, source_address=(src, 0)) as s:
                s.settimeout(5)
                body, _ = http_get(s, name, keep_alive=False)
        except OSError:
            counts.add("short_error")
            continue
        counts.add("short_ok" if marker in body else "short_broken")
        time.sleep(args.short_interval)


def long_flow(args: argparse.Namespace, src: str, counts: Counts, stop: float) -> None:
    name, marker, _real = GAMMA
    sock: socket.socket | None = None
    try:
        while time.monotonic() < stop:
            if sock is None:
                ip = resolve(src, args.gateway, name)
                if ip is None:
                    counts.add("long_dns_failed")
                    time.sleep(0.5)
                    continue
                try:
                    sock = socket.create_connection((ip, 80), timeout=5, source_address=(src, 0))
                    sock.settimeout(5)
                    counts.add("long_connects")
                except OSError:
                    counts.add("long_connect_error")
                    time.sleep(0.5)
                    continue
            try:
                body, closes = http_get(sock, name, keep_alive=True)
            except OSError:
                counts.add("long_broken")
                sock.close()
                sock = None
                continue
            counts.add("long_ok" if marker in body else "long_broken")
            if closes:
                sock.close()
                sock = None
            time.sleep(args.long_interval)
    finally:
        if sock is not None:
            sock.close()


def udp_flow(args: argparse.Namespace, src: str, counts: Counts, stop: float) -> None:
    name, _marker, real = GAMMA
    ip = None
    while ip is None and time.monotonic() < stop:
        ip = resolve(src, args.gateway, name)
    if ip is None:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.connect((ip, args.echo_port))
        s.settimeout(1.0)
        seq = 0
        while time.monotonic() < stop:
            seq += 1
            payload = f"soak {src} {seq}".encode()
            s.send(payload)
            try:
                # Skip late replies to earlier datagrams.
                while True:
                    reply = s.recv(4096)
                    if reply.startswith(payload + b" "):
                        break
            except TimeoutError:
                counts.add("udp_lost")
                continue
            counts.add("udp_ok" if f"to={real}:".encode() in reply else "udp_broken")
            time.sleep(args.udp_interval)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--sources", nargs="+", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--noise-rate", type=float, default=20.0)
    ap.add_argument("--short-interval", type=float, default=0.05)
    ap.add_argument("--long-interval", type=float, default=0.5)
    ap.add_argument("--udp-interval", type=float, default=0.2)
    ap.add_argument("--echo-port", type=int, default=9000)
    ap.add_argument("--fake-prefix", default="198.18.")
    ap.add_argument("--report", type=float, default=5.0)
    args = ap.parse_args()
    counts = Counts()
    start = time.monotonic()
    stop = start + min(args.seconds, 3600.0)
    threads = [
        threading.Thread(target=fn, args=(args, src, counts, stop), daemon=True)
        for src in args.sources
        for fn in (noise, short, long_flow, udp_flow)
    ]
    for t in threads:
        t.start()
    while time.monotonic() < stop:
        time.sleep(min(args.report, max(0.0, stop - time.monotonic())))
        print(json.dumps({"t": round(time.monotonic() - start, 1), "counts": counts.snapshot()}),
              flush=True)
    for t in threads:
        t.join(timeout=15)
    print(json.dumps({"final": counts.snapshot(),
                      "stuck_threads": sum(t.is_alive() for t in threads)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
