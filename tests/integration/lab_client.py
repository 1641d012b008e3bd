"""What a LAN client in the lab does, for the end-to-end tests.

Each helper runs a real client program (dig, curl, a short Python script) in
the lab's `client` namespace and returns what it saw, so the tests assert
on what the client received; and the far ends those clients talk to
(the HTTP(S) server `web_server`, the UDP echo `udp_echo`). Shared by
the end-to-end tests; every call is bounded (the programs' own timeouts,
and `timeout` seconds for the process).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance.lab.lab import Lab
from appliance.lab.servers import stop_all

# A fake IP from the lab's default fake-ip-range.
FAKE = re.compile(r"^198\.18\.\d+\.\d+$")
ECHO = Path(__file__).resolve().parents[2] / "bench" / "udp_echo.py"
# A far-end server process for a `with` block: ready inside, stopped after.
RunningServer = contextlib.AbstractContextManager[subprocess.Popen[bytes]]
# What `web_server` answers at "/big": this many bytes.
BIG = 8 << 20

# The far end of the TCP tests: HTTP on each port given, HTTPS (TLS 1.3,
# the certificate given) on each "tls:PORT"; "/big" is BIG bytes, anything
# else "MARKER PORT". Handshakes run in the handler threads: one stalled
# client (REALITY relaying a client it refused) must not hold the accept loop.
_WEB = """
import http.server, socketserver, ssl, sys, threading
marker, big, addr, cert, key, *ports = sys.argv[1:]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/big":
            body = b"x" * int(big)
        else:
            body = f"{marker} {self.server.server_address[1]}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(cert, key)
for port in ports:
    s = S((addr, int(port.removeprefix("tls:"))), H)
    if port.startswith("tls:"):
        s.socket = ctx.wrap_socket(s.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait(600)
"""

# One UDP flow from the client: each payload of argv[3] (JSON) sent to
# argv[1]:argv[2] (a name, resolved through the lab's DNS) from local port
# argv[4] (0: any), one reply each awaited (3 s; None if none came).
_UDP_EXCHANGE = """
import json, socket, sys
name, port, payloads = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
ip = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3)
c.bind(("0.0.0.0", int(sys.argv[4]))); c.connect((ip, port))
replies = []
for payload in payloads:
    c.send(payload.encode())
    try:
        replies.append(c.recv(4096).decode())
    except TimeoutError:
        replies.append(None)
print(json.dumps({"ip": ip, "replies": replies}))
"""


def loopback_net(first: int, count: int) -> str:
    """A /24 of loopback addresses ("127.X.Y", X from `first` up to
    `count` values) for this test process alone: engineers and CI may run
    the suite at the same time, and the servers bind fixed ports. Modules
    that run servers at once pass ranges that do not overlap."""
    pid = os.getpid()
    return f"127.{first + (pid // 256) % count}.{pid % 256}"


def client(lab: Lab, *argv: str, timeout: float = 20) -> str:
    """Run `argv` in the client namespace; its stdout."""
    result = lab.exec("client", list(argv), timeout=timeout)
    return result.stdout


def dig(lab: Lab, *args: str) -> str:
    """dig's output (one try, 3 s), stripped."""
    return client(lab, "dig", "+time=3", "+tries=1", *args).strip()


def hijacked_answer(lab: Lab, resolver: str, name: str) -> str:
    """Ask `resolver` (port 53, not Mirage) for `name` over UDP and TCP and
    return the answer, asserting that the capture hijacked both to Mirage:
    the same fake IP each way, from the address asked (dig names the server
    it heard)."""
    udp = dig(lab, f"@{resolver}", "+short", name)
    assert FAKE.match(udp), udp
    assert dig(lab, f"@{resolver}", "+tcp", "+short", name) == udp
    stats = dig(lab, f"@{resolver}", "+noall", "+stats", name)
    assert f"SERVER: {resolver}#53(" in stats, stats
    return udp


def curl(lab: Lab, url: str, *extra: str) -> tuple[int, str, float]:
    """(curl's exit code, body, seconds taken) for one request (8 s bound)."""
    t0 = time.monotonic()
    result = lab.exec("client", ["curl", "-s", "-m", "8", *extra, url], timeout=20)
    return result.returncode, result.stdout, time.monotonic() - t0


def https_get(lab: Lab, url: str, *, keep_body: bool = True) -> tuple[int, str, int, str]:
    """(curl's exit code, body ("" unless `keep_body`), bytes downloaded,
    curl's stderr) for one HTTPS GET that trusts the lab CA (20 s bound)."""
    r = lab.exec("client", ["curl", "-sS", "-m", "20", "--cacert", str(lab.ca_path),
                            "-o", "/dev/stdout" if keep_body else "/dev/null",
                            "-w", "\\n%{size_download}", url], timeout=30)
    body, _, size = r.stdout.rpartition("\n")
    return r.returncode, body, int(size or 0), r.stderr


def udp_exchange(lab: Lab, name: str, port: int, *payloads: str,
                 local_port: int = 0) -> dict[str, Any]:
    """{"ip": what `name` resolved to, "replies": one per payload (None: no
    reply in 3 s)} for one UDP flow from the client (from `local_port`, 0:
    any) to name:port."""
    r = lab.exec("client", [sys.executable, "-c", _UDP_EXCHANGE, name, str(port),
                            json.dumps(payloads), str(local_port)], timeout=30)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def echoed_through_fake_ip(got: dict[str, Any], *payloads: str,
                           context: Callable[[], str] = str) -> list[str]:
    """Assert that a `udp_exchange` went to a fake IP and that the tagged
    echo answered each payload (`context()` joins a failure's message);
    the replies."""
    assert got["ip"].startswith("198.18."), got
    replies: list[str | None] = got["replies"]
    for payload, reply in zip(payloads, replies, strict=True):
        assert reply is not None and reply.startswith(f"{payload} from="), (replies, context())
    return [r for r in replies if r is not None]


def connect_outcome(lab: Lab, ip: str, port: int, timeout: float = 5) -> tuple[str, float]:
    """How a TCP connection from the client ends: 'refused', 'reset',
    'closed' (EOF, no data), 'data', 'timeout' — and how long it took."""
    script = (
        "import socket,time,json\n"
        "t=time.monotonic()\n"
        "try:\n"
        f"  s=socket.create_connection(({ip!r},{port}),timeout={timeout})\n"
        "  s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
        "  d=s.recv(100)\n"
        "  r='data' if d else 'closed'\n"
        "except ConnectionRefusedError: r='refused'\n"
        "except ConnectionResetError: r='reset'\n"
        "except (TimeoutError, socket.timeout): r='timeout'\n"
        "print(json.dumps([r, time.monotonic()-t]))\n"
    )
    result, elapsed = json.loads(client(lab, sys.executable, "-c", script))
    return result, elapsed


def same_port_twice(lab: Lab, ip: str, host: str, port: int = 80,
                    sport: int = 40123) -> tuple[list[str], int]:
    """Two HTTP/1.0 GETs to ip:port, one after the other, from the same
    source port: the second reuses the 4-tuple of a flow the gateway has
    just closed (its socket in TIME_WAIT there). Returns the first line of
    each response (or the error), and how many TCP resets the client sent
    meanwhile (its netns's Tcp OutRsts: a stale socket answering the second
    SYN makes the client reset and retry)."""
    script = (
        "import socket,json\n"
        "def rsts():\n"
        "  rows=[l.split() for l in open('/proc/self/net/snmp') if l.startswith('Tcp:')]\n"
        "  return int(rows[1][rows[0].index('OutRsts')])\n"
        "out=[]\n"
        "r0=rsts()\n"
        "for _ in range(2):\n"
        "  s=socket.socket()\n"
        "  s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"  s.bind(('0.0.0.0',{sport}))\n"
        "  s.settimeout(5)\n"
        "  try:\n"
        f"    s.connect(({ip!r},{port}))\n"
        f"    s.sendall(b'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n')\n"
        "    d=b''\n"
        "    while (c:=s.recv(4096)): d+=c\n"
        "    r=d.split(b'\\r\\n',1)[0].decode()\n"
        "  except OSError as e: r=type(e).__name__\n"
        "  s.close()\n"
        "  out.append(r)\n"
        "print(json.dumps([out, rsts()-r0]))\n"
    )
    lines, resets = json.loads(client(lab, sys.executable, "-c", script))
    return list(lines), int(resets)


@contextlib.contextmanager
def _until_ready(lab: Lab, node: str, argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` run in `node`, yielded once it printed its "ready" line,
    stopped on exit."""
    proc = lab.popen(node, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield proc
    finally:
        stop_all([proc])


def web_server(lab: Lab, marker: str, addr: str, *ports: str, big: int = BIG,
               node: str = "upstream") -> RunningServer:
    """The HTTP(S) far end (`_WEB`) on `addr` in `node`, the lab's server
    certificate on its "tls:PORT" ports; listening before it is yielded,
    stopped on exit."""
    tls_dir = lab.state_dir / "tls"
    return _until_ready(lab, node, [sys.executable, "-c", _WEB, marker, str(big), addr,
                                    str(tls_dir / "server.pem"), str(tls_dir / "server.key"),
                                    *ports])


def udp_echo(lab: Lab, *listen: str, max_seconds: int = 600,
             node: str = "upstream") -> RunningServer:
    """The far end of the UDP tests: bench/udp_echo.py --tag bound on each
    `listen` (ADDR:PORT) in `node`, bound before it is yielded (a client's
    first datagram must not race the bind), stopped on exit."""
    return _until_ready(lab, node, [sys.executable, str(ECHO), "--tag", "--max-seconds",
                                    str(max_seconds), *listen])
