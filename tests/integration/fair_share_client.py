"""Two LAN clients in one process: one floods, the other is measured.

Run in the lab's client namespace by test_fair_shares.py (and by hand for
the before/after in docs/reliability.md):

    python fair_share_client.py MODE FLOODER NEIGHBOUR TARGET [COUNT]

MODE says what the flooder (source address FLOODER) does while it lasts:

- `tcp`: opens COUNT TCP connections to TARGET (a fake IP) port 80 and
  holds them;
- `dns-tcp`: opens COUNT TCP connections to TARGET (the gateway) port 53
  and holds them without asking anything;
- `upstream`: sends COUNT TXT queries for new names (they go to the
  upstream resolver) to TARGET (the gateway) as fast as it can, in rounds
  for 3 s;
- `fake-ip`: asks TARGET (the gateway) for COUNT new names (A, each a new
  fake IP).

Meanwhile NEIGHBOUR makes 20 requests of the same kind (an HTTP GET to the
fake IP; a TCP DNS query; a TXT query; an A query for a new name) one after
another. Prints one JSON object: what the flooder saw (`flood`: outcome ->
count) and the neighbour's `ok` count and per-request `latencies`
(seconds). Every socket has a timeout and every loop a count: the script
ends within about 40 s whatever the gateway does.
"""

from __future__ import annotations

import json
import random
import resource
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter

REQUESTS = 20
TIMEOUT = 3.0


# The mixed port of the test's config (test_fair_shares.py).
MIXED_PORT = 7890

def dns_query(name: str, qtype: int, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(
        "!HH", qtype, 1)


def rcode_and_answers(reply: bytes) -> tuple[int, int]:
    return reply[3] & 0xF, struct.unpack("!H", reply[6:8])[0]


def hold_tcp(source: str, target: str, port: int, count: int, out: Counter[str],
             held: list[socket.socket]) -> None:
    """Open `count` connections; count 'reset'/'closed' ones (the gateway
    refused them) and keep the ones still open in `held`."""
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        try:
            s.bind((source, 0))
            s.connect((target, port))
        except OSError as err:
            out[type(err).__name__] += 1
            s.close()
            continue
        held.append(s)
    time.sleep(1.0)  # refusals are immediate: a second is plenty
    still = []
    for s in held:
        poller = select.poll()  # select() cannot watch descriptors past 1023
        poller.register(s, select.POLLIN)
        if not poller.poll(0):
            still.append(s)
            continue
        try:
            data = s.recv(1)
        except OSError:  # ECONNRESET: refused with a reset
            out["reset"] += 1
            s.close()
            continue
        if data:
            still.append(s)
            continue
        out["closed"] += 1
        s.close()
    held[:] = still
    out["held"] = len(still)


def flood_udp_dns(source: str, target: str, names: list[str], qtype: int, rounds: int,
                  out: Counter[str]) -> None:
    """Send a query per name, `rounds` times; tally the rcodes that come back."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.setblocking(False)
    sent = 0
    try:
        for _ in range(rounds):
            for i, name in enumerate(names):
                try:
                    s.sendto(dns_query(name, qtype, i & 0xFFFF), (target, 53))
                    sent += 1
                except BlockingIOError:
                    time.sleep(0.001)
                drain(s, out)
            time.sleep(0.05)
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end:
            poller = select.poll()
            poller.register(s, select.POLLIN)
            poller.poll(100)
            drain(s, out)
    finally:
        s.close()
    out["sent"] = sent


def drain(s: socket.socket, out: Counter[str]) -> None:
    while True:
        try:
            reply = s.recv(4096)
        except BlockingIOError:
            return
        rcode, _answers = rcode_and_answers(reply)
        out[{0: "noerror", 2: "servfail", 5: "refused"}.get(rcode, f"rcode{rcode}")] += 1


def neighbour_udp(source: str, target: str, name: str, qtype: int) -> bool:
    """One lookup as a stub resolver makes it: a datagram the flood's
    queue overflow lost (the limits bound work, not the kernel's receive
    queue; docs/reliability.md) is sent again once after 1.5 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        qid = random.randrange(1 << 16)
        for _ in range(2):
            s.sendto(dns_query(name, qtype, qid), (target, 53))
            s.settimeout(TIMEOUT / 2)
            try:
                while True:
                    reply = s.recv(4096)
                    if struct.unpack("!H", reply[:2])[0] == qid:
                        rcode, answers = rcode_and_answers(reply)
                        return rcode == 0 and answers > 0
            except TimeoutError:
                continue
        return False


def neighbour_tcp_dns(source: str, target: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.bind((source, 0))
        s.connect((target, 53))
        q = dns_query("alpha.test", 16, 7)
        s.sendall(len(q).to_bytes(2, "big") + q)
        data = b""
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            chunk = s.recv(4096)
            if not chunk:
                return False
            data += chunk
        rcode, answers = rcode_and_answers(data[2:])
        return rcode == 0 and answers > 0


def neighbour_http(source: str, target: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.bind((source, 0))
        s.connect((target, 80))
        s.sendall(b"GET / HTTP/1.0\r\nHost: www.gamma.test\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.startswith(b"HTTP/1.1 200")


def neighbour_proxy(source: str, target: str) -> bool:
    """One HTTP request through the mixed port (absolute URI: forwarded)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.bind((source, 0))
        s.connect((target, MIXED_PORT))
        s.sendall(b"GET http://www.gamma.test/ HTTP/1.1\r\nHost: www.gamma.test\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.startswith(b"HTTP/1.1 200") and b"MARKER-GAMMA" in data


def main() -> None:
    # The flooder holds many sockets: make room up to the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536 if hard == resource.RLIM_INFINITY
                                                    else min(hard, 65536), hard))
    mode, flooder, neighbour, target = sys.argv[1:5]
    count = int(sys.argv[5]) if len(sys.argv) > 5 else 200
    tag = f"{random.randrange(1 << 30):x}"
    flood: Counter[str] = Counter()
    held: list[socket.socket] = []
    if mode == "tcp":
        hold_tcp(flooder, target, 80, count, flood, held)
        one = lambda i: neighbour_http(neighbour, target)  # noqa: E731
    elif mode == "proxy":
        hold_tcp(flooder, target, MIXED_PORT, count, flood, held)
        one = lambda i: neighbour_proxy(neighbour, target)  # noqa: E731
    elif mode == "dns-tcp":
        hold_tcp(flooder, target, 53, count, flood, held)
        one = lambda i: neighbour_tcp_dns(neighbour, target)  # noqa: E731
    elif mode == "upstream":
        names = [f"u{i}-{tag}.alpha.test" for i in range(count)]
        thread = threading.Thread(target=flood_udp_dns,
                                  args=(flooder, target, names, 16, 10, flood))
        thread.start()
        time.sleep(0.3)
        one = lambda i: neighbour_udp(neighbour, target, "alpha.test", 16)  # noqa: E731
    elif mode == "fake-ip":
        names = [f"f{i}-{tag}.example" for i in range(count)]
        flood_udp_dns(flooder, target, names, 1, 1, flood)
        one = lambda i: neighbour_udp(neighbour, target, f"n{i}-{tag}.example", 1)  # noqa: E731
    else:
        raise SystemExit(f"unknown mode {mode}")
    ok, latencies = 0, []
    for i in range(REQUESTS):
        t0 = time.monotonic()
        try:
            ok += one(i)
        except OSError:
            pass
        latencies.append(round(time.monotonic() - t0, 4))
    if mode == "upstream":
        thread.join(30)
    for s in held:
        s.close()
    print(json.dumps({"flood": dict(flood), "ok": ok, "latencies": latencies}))


if __name__ == "__main__":
    main()
