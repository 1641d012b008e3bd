"""End to end in three namespaces: client -> gateway -> server.

The gateway namespace runs, in one process, what `mirage run` composes for
this path: a real FakeIPPool with mappings made beforehand, the transparent
TCP listener with a dial function that connects by name through a test
table (with SO_MARK = routing-mark, as outbounds do), a plain DNS responder
on dns.listen, and the nftables capture started last. The client connects to
fake IPs and checks what comes back; the server logs what it saw.

    gw-tc-c-*  c0 10.231.1.2  fd31:1::2 ----+
                                            | (LAN: g0)
    gw-tc-g-*  g0 10.231.1.1  fd31:1::1 ----+   g1 10.231.2.1 fd31:2::1 --+
                                                                         |
    gw-tc-s-*  s0 10.231.2.2  fd31:2::2, local 198.18.0.0/16 (AnyIP) ----+

The server answers on every 198.18.0.0/16 address so that traffic the
gateway must NOT capture (bypass range, the gateway's own marked sockets)
visibly reaches it instead, with the sender's address.

This file is also the helper program for the namespaces:
`python test_transparent_tcp.py gateway|server|client ARGS`.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import ipaddress
import json
import os
import pickle
import selectors
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

ROUTING_MARK = 0x100
CAPTURE_MARK = 0x233
ROUTE_TABLE = 233
TPROXY_PORT = 7893
DNS_PORT = 1053
ECHO_PORT = 8080
TABLE = "mirage"

CLIENT4, GW_LAN4, GW_WAN4, SERVER4 = "10.231.1.2", "10.231.1.1", "10.231.2.1", "10.231.2.2"
BYPASSED = "198.18.255.1"  # inside the fake range, but in appliance.bypass
UNMAPPED = "198.18.200.200"  # in the fake range, never allocated
# What a client sees of an RST, depending on which call meets it first (after
# a reset the socket is no longer connected: ENOTCONN on shutdown).
RESET = {"ECONNRESET", "EPIPE", "ENOTCONN"}

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


# --- the programs that run inside the namespaces ------------------------------


def make_config() -> Any:
    from appliance.config.model import ApplianceConfig, Config, DnsConfig, Listen

    return Config(
        tproxy_port=TPROXY_PORT,
        routing_mark=ROUTING_MARK,
        ipv6=True,
        dns=DnsConfig(
            listen=Listen("0.0.0.0", DNS_PORT),
            ipv6=True,
            fake_ip_range=ipaddress.IPv4Network("198.18.0.0/16"),
            fake_ip_range6=ipaddress.IPv6Network("fdfe:dcba:9876::/64"),
        ),
        appliance=ApplianceConfig(
            lan=("g0",),
            bypass=(ipaddress.ip_network("198.18.255.0/24"),),
            capture_mark=CAPTURE_MARK,
            route_table=ROUTE_TABLE,
            connect_timeout=1.0,
            idle_timeout=30.0,
        ),
    )


def gateway_main(names: dict[str, str], domains: list[tuple[str, int]]) -> None:
    """Pool + transparent listener + DNS responder + capture; commands on stdin."""
    import trio

    from appliance.capture import nftables
    from appliance.fakeip.pool import FakeIPPool
    from appliance.flow import Flow
    from appliance.gateway import tcp
    from appliance.gateway.splice import FlowRegistry

    cfg = make_config()
    pool = FakeIPPool(cfg.dns.fake_ip_range, cfg.dns.fake_ip_range6)
    fake = {f"{d}/{fam}": str(pool.allocate(d, fam)) for d, fam in domains}
    assert pool.reverse(UNMAPPED) is None
    registry = FlowRegistry()

    async def dial(t: Flow) -> trio.abc.Stream:
        t.outbound = "test-direct"
        if t.domain == "blackhole.test":
            await trio.sleep_forever()  # the connect timeout must fire
        if t.domain is not None:
            if t.domain not in names:
                raise OSError(f"{t.domain}: not in the test's name table")
            host = names[t.domain]
        else:
            host = str(t.dst)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ROUTING_MARK)
        try:
            await sock.connect((host, t.dst_port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def dns_udp(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # Transparent, like Mirage's DNS service: the capture TPROXYs a query
        # unrewritten, and the answer leaves from the address and port the
        # client asked (IP_ORIGDSTADDR, then a socket bound there).
        from appliance.sockopt import (
            IP_ORIGDSTADDR,
            IP_TRANSPARENT,
            IPV6_ORIGDSTADDR,
            IPV6_TRANSPARENT,
            open_transparent_sender,
            original_destination,
        )

        sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_ORIGDSTADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, 1)
        await sock.bind(("::", DNS_PORT))
        task_status.started()
        with sock:
            while True:
                data, anc, _flags, addr = await sock.recvmsg(2048, 256)
                dst = original_destination(anc)
                if dst is None:
                    await sock.sendto(b"hijacked:" + data, addr)
                    continue
                host = addr[0].removeprefix("::ffff:") if dst[0] == socket.AF_INET else addr[0]
                with open_transparent_sender(dst) as out:
                    out.sendto(b"hijacked:" + data, (host, addr[1]))

    async def dns_tcp(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from appliance.sockopt import IP_TRANSPARENT, IPV6_TRANSPARENT

        async def answer(stream: trio.SocketStream) -> None:
            async with stream:
                with trio.move_on_after(5):
                    data = await stream.receive_some(2048)
                    await stream.send_all(b"hijacked-tcp:" + data)

        listeners = await trio.open_tcp_listeners(DNS_PORT)
        for listener in listeners:
            listener.socket.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
            if listener.socket.family == socket.AF_INET6:
                listener.socket.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        await trio.serve_listeners(answer, listeners, task_status=task_status)

    async def commands(scope: trio.CancelScope) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        async with stdin:
            while True:
                chunk = await stdin.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = line.decode().strip()
                    if cmd == "stats":
                        out = {"gateway": registry.stats(), "pool": pool.stats(),
                               "flows": registry.snapshot()}
                        print(json.dumps(out), flush=True)
                    elif cmd == "quit":
                        scope.cancel()
                        return
        scope.cancel()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(tcp.serve, cfg, pool, dial, registry)
            await nursery.start(dns_udp)
            await nursery.start(dns_tcp)
            # Capture last, as the app does: listeners are ready first.
            await nursery.start(nftables.serve, cfg)
            print(json.dumps({"ready": True, "fake": fake}), flush=True)
            nursery.start_soon(commands, nursery.cancel_scope)

    trio.run(main)


def server_main(port: int) -> None:
    """Echo server: read to EOF, log what it saw (one JSON line), echo it back."""
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            s: socket.socket = self.request
            s.settimeout(10)
            buf = bytearray()
            while chunk := s.recv(1 << 20):
                buf += chunk
            local = s.getsockname()
            print(json.dumps({"peer": self.client_address[0], "local": local[0],
                              "n": len(buf), "sha": hashlib.sha256(buf).hexdigest(),
                              "head": buf[:40].decode(errors="replace")}), flush=True)
            s.sendall(buf)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    class UdpEcho(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            print(json.dumps({"udp": data.decode(errors="replace"),
                              "peer": self.client_address[0]}), flush=True)
            sock.sendto(b"udp-echo:" + data, self.client_address)

    class UdpServer(socketserver.ThreadingUDPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server(("0.0.0.0", port), Echo) as srv, UdpServer(("0.0.0.0", port), UdpEcho) as udp:
        threading.Thread(target=udp.serve_forever, daemon=True).start()
        print(json.dumps({"ready": True}), flush=True)
        srv.serve_forever()


def client_main(op: dict[str, Any]) -> None:
    """One client action; prints one JSON line with what happened."""
    start = time.monotonic()
    out: dict[str, Any] = {}
    try:
        if op["kind"] == "echo":
            payload = (op["text"].encode() * (op["size"] // len(op["text"]) + 1))[: op["size"]]
            fam = socket.AF_INET6 if ":" in op["host"] else socket.AF_INET
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                if op.get("mark"):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, op["mark"])
                s.settimeout(5)
                s.connect((op["host"], op["port"]))
                time.sleep(op.get("hold", 0))
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                buf = bytearray()
                while chunk := s.recv(1 << 20):
                    buf += chunk
            out = {"n": len(buf), "same": bytes(buf) == payload}
        elif op["kind"] == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                dest = (op["host"], op.get("port", 53))
                if op.get("connected", True):
                    # Replies from any other address/port are dropped.
                    s.connect(dest)
                s.sendto(op["text"].encode(), dest)
                out = {"reply": s.recv(2048).decode()}
        elif op["kind"] == "tcpdns":
            with socket.create_connection((op["host"], 53), timeout=3) as s:
                s.sendall(op["text"].encode())
                out = {"reply": s.recv(2048).decode()}
    except OSError as exc:
        out = {"type": type(exc).__name__,
               "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
    out["elapsed"] = time.monotonic() - start
    print(json.dumps(out), flush=True)


# --- the test side --------------------------------------------------------------


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def helper(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-u", os.path.abspath(__file__), *args]


class Proc:
    """A helper process in a namespace with line-based (JSON) stdout."""

    def __init__(self, ns: str, *args: str) -> None:
        self.p = subprocess.Popen(helper(ns, *args), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.p.stdout is not None
        self.fd = self.p.stdout.fileno()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)
        self.buf = b""

    def line(self, timeout: float = 10) -> dict[str, Any]:
        # Raw reads into our own buffer: a buffered reader would hide lines
        # it already read from the selector.
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                raise AssertionError(f"no output within {timeout:g}s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                err = self.p.stderr.read().decode() if self.p.stderr else ""
                raise AssertionError(f"helper exited rc={self.p.wait(5)}:\n{err}")
            self.buf += chunk
        text, self.buf = self.buf.split(b"\n", 1)
        return json.loads(text)

    def lines_until(self, pred: Any, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self.line(max(0.01, deadline - time.monotonic()))
            if pred(item):
                return item
        raise AssertionError("no matching line")

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd.encode() + b"\n")
        self.p.stdin.flush()

    def stop(self) -> int:
        """Ask the helper to quit (the gateway removes its capture), then
        terminate it if it does not; close the pipes. Returns the exit code."""
        try:
            if self.p.poll() is None:
                try:
                    self.send("quit")
                    return self.p.wait(10)
                except (BrokenPipeError, subprocess.TimeoutExpired):
                    self.p.terminate()
            return self.p.wait(10)
        finally:
            self.sel.close()
            for f in (self.p.stdin, self.p.stdout, self.p.stderr):
                if f is not None:
                    f.close()


@dataclass
class Topology:
    client: str
    gateway: str
    server: str
    gw: Proc
    srv: Proc
    fake: dict[str, str]

    def run_client(self, op: dict[str, Any], ns: str | None = None) -> dict[str, Any]:
        r = sh(*helper(ns or self.client, "client", json.dumps(op)))
        return json.loads(r.stdout)

    def stats(self) -> dict[str, Any]:
        self.gw.send("stats")
        return self.gw.line()


def build_namespaces(c: str, g: str, s: str) -> None:
    for ns in (c, g, s):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", c, "link", "add", "c0", "type", "veth", "peer", "name", "g0", "netns", g)
    sh("ip", "-n", g, "link", "add", "g1", "type", "veth", "peer", "name", "s0", "netns", s)
    for ns, dev, v4, v6 in ((c, "c0", CLIENT4, "fd31:1::2"), (g, "g0", GW_LAN4, "fd31:1::1"),
                            (g, "g1", GW_WAN4, "fd31:2::1"), (s, "s0", SERVER4, "fd31:2::2")):
        sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
        sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("ip", "-n", c, "route", "add", "default", "via", GW_LAN4)
    sh("ip", "-n", c, "-6", "route", "add", "default", "via", "fd31:1::1")
    sh("ip", "-n", s, "route", "add", "default", "via", GW_WAN4)
    sh("ip", "-n", s, "route", "add", "local", "198.18.0.0/16", "dev", "lo")
    sh("ip", "-n", g, "route", "add", "198.18.0.0/16", "via", SERVER4)
    sh("ip", "netns", "exec", g, "sysctl", "-qw", "net.ipv4.ip_forward=1")


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    tag = uuid.uuid4().hex[:6]
    c, g, s = (f"gw-tc-{role}-{tag}" for role in "cgs")
    procs: list[Proc] = []
    try:
        build_namespaces(c, g, s)
        srv = Proc(s, "server", str(ECHO_PORT))
        procs.append(srv)
        assert srv.line()["ready"]
        spec = {"names": {"web.test": SERVER4},
                "domains": [("web.test", 4), ("web.test", 6), ("nowhere.test", 4),
                            ("blackhole.test", 4)]}
        gw = Proc(g, "gateway", base64.b64encode(pickle.dumps(spec)).decode())
        procs.append(gw)
        ready = gw.line(20)
        assert ready["ready"]
        yield Topology(c, g, s, gw, srv, ready["fake"])
    finally:
        try:
            for p in procs:
                try:
                    p.stop()
                except (OSError, subprocess.SubprocessError):
                    p.p.kill()
                    p.p.wait(5)
        finally:
            for ns in (c, g, s):
                sh("ip", "netns", "delete", ns, check=False)


def server_saw(topo: Topology, n: int) -> dict[str, Any]:
    return topo.srv.lines_until(lambda item: item.get("n") == n)


def test_fake_ip_flow_is_proxied_by_name(topo: Topology) -> None:
    before = topo.stats()["gateway"]
    size = 3 * 1024 * 1024 + 7
    fake = topo.fake["web.test/4"]
    assert ipaddress.ip_address(fake) in ipaddress.ip_network("198.18.0.0/16")
    r = topo.run_client({"kind": "echo", "host": fake, "port": ECHO_PORT, "size": size,
                         "text": "GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"})
    assert r == {"n": size, "same": True, "elapsed": r["elapsed"]}, r
    seen = server_saw(topo, size)
    # The gateway connected (from its WAN address) to the address the name
    # maps to: proxied, not forwarded to the fake IP.
    assert seen["peer"] == GW_WAN4 and seen["local"] == SERVER4
    assert seen["head"].startswith("GET / HTTP/1.1\r\nHost: web.test")
    after = topo.stats()
    g = after["gateway"]
    assert g["opened"] == before["opened"] + 1 and g["active"] == 0
    assert g["bytes_up"] - before["bytes_up"] == size
    assert g["bytes_down"] - before["bytes_down"] == size
    assert g["zero_copy"] == before["zero_copy"] + 1  # both ends plain sockets
    assert after["pool"]["pins"] == 0


def test_fake_ipv6_flow_is_proxied_by_name(topo: Topology) -> None:
    fake6 = topo.fake["web.test/6"]
    assert ipaddress.ip_address(fake6) in ipaddress.ip_network("fdfe:dcba:9876::/64")
    r = topo.run_client({"kind": "echo", "host": fake6, "port": ECHO_PORT, "size": 1000,
                         "text": "v6 hello "})
    assert r["n"] == 1000 and r["same"], r
    assert server_saw(topo, 1000)["peer"] == GW_WAN4


def test_live_flow_is_listed_and_pins_its_mapping(topo: Topology) -> None:
    op = {"kind": "echo", "host": topo.fake["web.test/4"], "port": ECHO_PORT, "size": 11,
          "text": "held flow", "hold": 1.5}
    p = subprocess.Popen(helper(topo.client, "client", json.dumps(op)),
                         stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while True:
            st = topo.stats()
            if st["gateway"]["active"] == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert st["gateway"]["active"] == 1
        (flow,) = st["flows"]
        assert flow["domain"] == "web.test" and flow["outbound"] == "test-direct"
        assert flow["src_ip"] == CLIENT4 and flow["dst_ip"] == topo.fake["web.test/4"]
        assert flow["dst_port"] == ECHO_PORT
        assert st["pool"]["pins"] == 1
        out, _ = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert json.loads(out)["same"]
    assert topo.stats()["pool"]["pins"] == 0


def test_unmapped_fake_ip_is_reset_at_once(topo: Topology) -> None:
    before = topo.stats()["gateway"]["unmapped"]
    r = topo.run_client({"kind": "echo", "host": UNMAPPED, "port": ECHO_PORT, "size": 10,
                         "text": "x"})
    assert r.get("errno") in RESET, r
    assert r["elapsed"] < 1.0
    assert topo.stats()["gateway"]["unmapped"] == before + 1


@pytest.mark.parametrize(("domain", "limit"), [("nowhere.test", 1.0), ("blackhole.test", 2.5)])
def test_dial_failure_resets_the_client(topo: Topology, domain: str, limit: float) -> None:
    before = topo.stats()["gateway"]["dial_failures"]
    r = topo.run_client({"kind": "echo", "host": topo.fake[f"{domain}/4"], "port": ECHO_PORT,
                         "size": 10, "text": "x"})
    assert r.get("errno") in RESET, r
    assert r["elapsed"] < limit  # connect_timeout is 1 s for the blackhole
    st = topo.stats()
    assert st["gateway"]["dial_failures"] == before + 1
    assert st["pool"]["pins"] == 0


def test_bypass_destination_is_not_captured(topo: Topology) -> None:
    # 198.18.255.1 is in the fake range but bypassed: forwarded as is, so the
    # server sees the client itself (a captured flow would be reset: unmapped).
    r = topo.run_client({"kind": "echo", "host": BYPASSED, "port": ECHO_PORT, "size": 4321,
                         "text": "bypass "})
    assert r["n"] == 4321 and r["same"], r
    seen = server_saw(topo, 4321)
    assert (seen["peer"], seen["local"]) == (CLIENT4, BYPASSED)


def test_gateways_own_marked_traffic_is_not_captured(topo: Topology) -> None:
    # From the gateway itself, with routing-mark, to a mapped fake IP: it
    # leaves by the routing table (to the server, which answers on the whole
    # range) instead of looping into the transparent listener.
    before = topo.stats()["gateway"]["opened"]
    fake = topo.fake["web.test/4"]
    r = topo.run_client({"kind": "echo", "host": fake, "port": ECHO_PORT, "size": 2222,
                         "text": "own ", "mark": ROUTING_MARK}, ns=topo.gateway)
    assert r["n"] == 2222 and r["same"], r
    seen = server_saw(topo, 2222)
    assert (seen["peer"], seen["local"]) == (GW_WAN4, fake)
    assert topo.stats()["gateway"]["opened"] == before


def test_direct_connection_to_tproxy_port_is_refused(topo: Topology) -> None:
    before = topo.stats()["gateway"]["opened"]
    r = topo.run_client({"kind": "echo", "host": GW_LAN4, "port": TPROXY_PORT, "size": 10,
                         "text": "loop?"})
    assert r.get("errno") == "ECONNREFUSED", r
    assert r["elapsed"] < 1.0
    assert topo.stats()["gateway"]["opened"] == before


def test_port_forward_on_the_gateway_keeps_working(topo: Topology) -> None:
    # Someone else's table on the gateway forwards LAN port 2222 to the
    # server (conntrack DNAT). Mirage's capture leaves such flows alone.
    table = "gw-pf"
    rules = (f"table ip {table} {{ chain pre {{ type nat hook prerouting priority dstnat; "
             f"iifname g0 tcp dport 2222 dnat to {SERVER4}:{ECHO_PORT}; }}; }}")
    subprocess.run(["ip", "netns", "exec", topo.gateway, "nft", "-f", "-"], input=rules,
                   text=True, check=True, timeout=30)
    try:
        before = topo.stats()["gateway"]["opened"]
        r = topo.run_client({"kind": "echo", "host": GW_LAN4, "port": 2222, "size": 3333,
                             "text": "forwarded "})
        assert r.get("n") == 3333 and r["same"], r
        seen = server_saw(topo, 3333)
        assert (seen["peer"], seen["local"]) == (CLIENT4, SERVER4)
        assert topo.stats()["gateway"]["opened"] == before
    finally:
        sh("ip", "netns", "exec", topo.gateway, "nft", "delete", "table", "ip", table,
           check=False)


def test_dns_hijack_answers_from_the_address_asked(topo: Topology) -> None:
    # Nothing listens on port 53 at the server: only the gateway can answer,
    # and the connected sockets accept it only from SERVER4:53.
    r = topo.run_client({"kind": "udp", "host": SERVER4, "text": "q1"})
    assert r.get("reply") == "hijacked:q1", r
    r = topo.run_client({"kind": "tcpdns", "host": SERVER4, "text": "q2"})
    assert r.get("reply") == "hijacked-tcp:q2", r
    # A bypassed resolver is not hijacked: the query reaches the server,
    # where no DNS runs.
    r = topo.run_client({"kind": "udp", "host": BYPASSED, "text": "q3"})
    assert "reply" not in r, r


def test_fake_ip_without_a_listener_is_never_forwarded(topo: Topology) -> None:
    # No UDP gateway runs here: TPROXY finds no socket for UDP to a fake IP.
    # The datagram must die at the gateway, not reach the server (which
    # answers on the whole fake range); a bypassed address still does.
    # (Unconnected sockets: the server answers from its own address.)
    r = topo.run_client({"kind": "udp", "host": topo.fake["web.test/4"], "port": ECHO_PORT,
                         "text": "lost", "connected": False})
    assert "reply" not in r, r
    r = topo.run_client({"kind": "udp", "host": BYPASSED, "port": ECHO_PORT, "text": "kept",
                         "connected": False})
    assert r.get("reply") == "udp-echo:kept", r
    # The server's log: the bypassed datagram, and nothing before it.
    assert topo.srv.lines_until(lambda item: "udp" in item) == {"udp": "kept", "peer": CLIENT4}


def test_zz_stopping_removes_the_capture(topo: Topology) -> None:
    assert topo.gw.stop() == 0
    r = sh("ip", "netns", "exec", topo.gateway, "nft", "list", "table", "inet", TABLE,
           check=False)
    assert r.returncode != 0 and "No such file or directory" in r.stderr
    for fam in ("-4", "-6"):
        rules = json.loads(sh("ip", "-n", topo.gateway, fam, "-j", "rule").stdout)
        assert not [x for x in rules if x.get("fwmark")], rules
        routes = sh("ip", "-n", topo.gateway, fam, "-j", "route", "show", "table",
                    str(ROUTE_TABLE), check=False).stdout.strip()
        assert routes in ("", "[]"), routes


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "gateway":
        spec = pickle.loads(base64.b64decode(sys.argv[2]))
        gateway_main(spec["names"], spec["domains"])
    elif role == "server":
        server_main(int(sys.argv[2]))
    elif role == "client":
        client_main(json.loads(sys.argv[2]))
    else:
        raise SystemExit(f"unknown role {role}")
