#!/usr/bin/env python3
"""A UDP echo server for the lab (tests/integration/test_udp_gateway.py, bench/udp.py).

Usage: udp_echo.py [--tag] [--max-seconds N] ADDR:PORT [ADDR:PORT ...]

One socket per address, each bound to that address, so every reply leaves
from the address the datagram was sent to (a client's connected UDP socket
accepts nothing else). With --tag a reply is the datagram followed by
b" from=<sender ip>:<port> to=<our ip>:<port>", which shows a test who
reached the server (the gateway, or the SOCKS5 proxy's relay). Prints
"ready" once bound. Exits after --max-seconds (default one hour) so a
forgotten server cannot outlive a run by much.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ap.add_argument("listen", nargs="+")
    args = ap.parse_args()
    sel = selectors.DefaultSelector()
    socks: dict[int, socket.socket] = {}
    for item in args.listen:
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((host, int(port)))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks[s.fileno()] = s
    print("ready", flush=True)
    end = time.monotonic() + args.max_seconds
    tag = args.tag
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=1.0):
            s = socks[key.fd]
            me = s.getsockname()
            for _ in range(256):
                try:
                    data, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                if tag:
                    data += f" from={addr[0]}:{addr[1]} to={me[0]}:{me[1]}".encode()
                try:
                    s.sendto(data, addr)
                except OSError:
                    pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
