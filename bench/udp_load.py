#!/usr/bin/env python3
"""UDP load generator for bench/udp.py (runs inside the lab's client namespace).

Usage:
  udp_load.py pps HOST PORT --seconds S --size B --sockets N --window W
  udp_load.py sessions HOST PORT --seconds S --count N --concurrency C

`pps`: N connected sockets (N sessions), each keeping W datagrams of B bytes
in flight against an echo server: every reply is answered with a new
datagram. A socket that got nothing back for 100 ms is topped up again (the
datagrams are taken as lost), so drops cost rate, not a stall. Reports
replies per second (each one is a datagram up and a datagram down).

`sessions`: up to N fresh sockets, C at a time: each sends one datagram and
waits for its echo (1 s), then closes. Reports completed sessions per second.

HOST is resolved with the system resolver (in the lab: hijacked to Mirage, so
a name gets a fake IP). Replies are read on connected sockets, so a reply
from any other address than the one asked would be lost, not counted.
Prints one JSON object. Bounded by --seconds (and --count).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time


def _burst(s: socket.socket, payload: bytes, window: int) -> int:
    """Send up to `window` datagrams on `s` (until it would block); how many went."""
    for n in range(window):
        try:
            s.send(payload)
        except OSError:
            return n
    return window


def pps(ip: str, port: int, seconds: float, size: int, sockets: int, window: int) -> dict:
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    got: dict[int, int] = {}
    seen: dict[int, int] = {}
    payload = b"x" * size
    for _ in range(sockets):
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.connect((ip, port))
        s.setblocking(False)
        socks[s.fileno()] = s
        got[s.fileno()] = 0
        seen[s.fileno()] = 0
        ep.register(s.fileno(), select.EPOLLIN)
    sent = received = 0
    t0 = time.monotonic()
    end = t0 + seconds
    next_tick = t0 + 0.1
    for s in socks.values():
        sent += _burst(s, payload, window)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_tick:
            next_tick = now + 0.1
            for fd, s in socks.items():
                if got[fd] == seen[fd]:
                    sent += _burst(s, payload, window)
                seen[fd] = got[fd]
        for fd, _ev in ep.poll(0.05):
            s = socks[fd]
            for _ in range(64):
                try:
                    s.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                received += 1
                got[fd] += 1
                try:
                    s.send(payload)
                    sent += 1
                except OSError:
                    pass
    elapsed = time.monotonic() - t0
    for s in socks.values():
        s.close()
    return {"mode": "pps", "ip": ip, "seconds": elapsed, "sent": sent, "received": received,
            "pps": received / elapsed, "mbit": received * size * 8 / elapsed / 1e6}


def sessions(ip: str, port: int, seconds: float, count: int, concurrency: int) -> dict:
    ep = select.epoll()
    live: dict[int, tuple[socket.socket, float]] = {}
    started = done = failed = 0
    t0 = time.monotonic()
    end = t0 + seconds
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET

    def start_one() -> None:
        nonlocal started
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.connect((ip, port))
        s.setblocking(False)
        s.send(b"session %d" % started)
        started += 1
        live[s.fileno()] = (s, time.monotonic())
        ep.register(s.fileno(), select.EPOLLIN)

    def finish(fd: int) -> None:
        s, _t = live.pop(fd)
        ep.unregister(fd)
        s.close()

    while time.monotonic() < end and (started < count or live):
        while started < count and len(live) < concurrency:
            start_one()
        for fd, _ev in ep.poll(0.05):
            s, _t = live[fd]
            try:
                s.recv(65535)
                done += 1
            except OSError:
                failed += 1
            finish(fd)
        now = time.monotonic()
        for fd in [fd for fd, (_s, t) in live.items() if now - t > 1.0]:
            failed += 1
            finish(fd)
    elapsed = time.monotonic() - t0
    for fd in list(live):
        finish(fd)
    return {"mode": "sessions", "ip": ip, "seconds": elapsed, "started": started, "done": done,
            "failed": failed, "per_second": done / elapsed}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("pps", "sessions"))
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--sockets", type=int, default=8)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    ip = str(socket.getaddrinfo(args.host, args.port, type=socket.SOCK_DGRAM)[0][4][0])
    seconds = min(args.seconds, 60.0)
    if args.mode == "pps":
        out = pps(ip, args.port, seconds, args.size, args.sockets, args.window)
    else:
        out = sessions(ip, args.port, seconds, args.count, args.concurrency)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
