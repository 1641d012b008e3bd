"""A lab server that holds what it is sent until told to answer, so that a
gateway's `/connections` can be read while every flow is open
(test_differential.py).

    python hold_server.py --release FILE --tcp 18080,18443 --udp 15353
    python hold_server.py --udp-client name:15353,other:15353 --hold 20

TCP: reads the request head, then waits until FILE exists (or `--hold`
seconds pass, or the peer goes away) and answers `HTTP/1.1 200` with the
body `HELD <port>`. UDP: each datagram is answered `HELD <port> <data>` once
FILE exists (or `--hold` seconds pass). TCP listens on every address of
the namespace it runs in, UDP on each of `--udp-addresses` (a socket bound
to the wildcard would answer from the node's first address, not the one
asked); prints `ready` once bound. Runs until terminated.

`--udp-client` is the other end, for a LAN client: one socket per
`name:port` (the name resolved by the namespace's resolver), one datagram
each, then it waits (at most `--hold` seconds) for the answers and prints
them as JSON, `{"name:port": "answer" or null}`.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import threading
import time

POLL = 0.05


def released(path: str, deadline: float) -> bool:
    return os.path.exists(path) or time.monotonic() > deadline


def serve_tcp_client(conn: socket.socket, port: int, release: str, hold: float) -> None:
    with conn:
        conn.settimeout(POLL)
        deadline = time.monotonic() + hold
        head = b""
        while b"\r\n\r\n" not in head and not released(release, deadline):
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                return
            head += chunk
        while not released(release, deadline):
            try:
                if not conn.recv(4096):
                    return  # the client gave up
            except TimeoutError:
                continue
        body = f"HELD {port}".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)


def serve_tcp(sock: socket.socket, release: str, hold: float) -> None:
    port = sock.getsockname()[1]
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_tcp_client, args=(conn, port, release, hold),
                         daemon=True).start()


def answer_late(sock: socket.socket, data: bytes, peer: tuple[str, int], release: str,
                hold: float) -> None:
    deadline = time.monotonic() + hold
    while not released(release, deadline):
        time.sleep(POLL)
    sock.sendto(f"HELD {sock.getsockname()[1]} ".encode() + data, peer)


def serve_udp(sock: socket.socket, release: str, hold: float) -> None:
    while True:
        data, peer = sock.recvfrom(2048)
        threading.Thread(target=answer_late, args=(sock, data, peer, release, hold),
                         daemon=True).start()


def udp_client(targets: list[str], hold: float) -> None:
    socks: dict[socket.socket, str] = {}
    for target in targets:
        name, port = target.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.sendto(target.encode(), (socket.gethostbyname(name), int(port)))
        socks[s] = target
    answers: dict[str, str | None] = dict.fromkeys(targets)
    deadline = time.monotonic() + hold
    waiting = dict(socks)
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(waiting), [], [], POLL)
        for s in ready:
            answers[waiting.pop(s)] = s.recv(2048).decode(errors="replace")
    print(json.dumps(answers), flush=True)


def ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--release")
    ap.add_argument("--udp-client", type=lambda t: t.split(","))
    ap.add_argument("--tcp", type=ports, default=[])
    ap.add_argument("--udp", type=ports, default=[])
    ap.add_argument("--udp-addresses", type=lambda t: t.split(","), default=["0.0.0.0"])
    ap.add_argument("--hold", type=float, default=20.0)
    args = ap.parse_args()
    if args.udp_client:
        udp_client(args.udp_client, args.hold)
        return
    threads = []
    for port in args.tcp:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(128)
        threads.append(threading.Thread(target=serve_tcp, args=(s, args.release, args.hold),
                                        daemon=True))
    for port in args.udp:
        for address in args.udp_addresses:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind((address, port))
            threads.append(threading.Thread(target=serve_udp, args=(u, args.release, args.hold),
                                            daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
