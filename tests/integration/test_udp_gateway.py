"""Transparent UDP end to end: a real client in the lab's client namespace,
`mirage run` in the gateway namespace, a UDP echo server (bench/udp_echo.py)
and dante upstream.

The client resolves names through its poisoned resolver (hijacked to Mirage:
a fake IP) and talks UDP to the fake IP from a *connected* socket, so a reply
from any other source than the fake IP and port would never reach it. The
echo server tags each reply with the address it saw the datagram come from
and the address it was sent to, which shows the path taken (the gateway's WAN
address for DIRECT, dante's for SOCKS5) and that the name was resolved
honestly (the poisoned resolver gives every name a wrong address). Counters
and pins are read through the control API (`mirage status`, `mirage
mappings`), i.e. through another process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config

pytestmark = pytest.mark.netns

ECHO = Path(__file__).resolve().parents[2] / "bench" / "udp_echo.py"
PORT = 9999
TIMEOUT = 3  # udp-timeout in this module's config: seconds


@pytest.fixture(scope="module")
def echo(lab: Lab) -> Iterator[subprocess.Popen[bytes]]:
    """The echo server on every web address of the upstream (v4 and v6)."""
    addrs = [f"{a}:{PORT}" for a in ("192.168.57.10", "192.168.57.11", "192.168.57.12")]
    addrs += [f"[{a}]:{PORT}" for a in ("fd57::10", "fd57::11", "fd57::12")]
    proc = lab.popen("upstream", [sys.executable, str(ECHO), "--tag", "--max-seconds", "600",
                                  *addrs], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def mirage(lab: Lab, echo: subprocess.Popen[bytes]) -> Iterator[MirageRun]:
    state = lab.state_dir / "udp-mirage-state"
    cfg = lab_config(lab, appliance={"state-dir": str(state), "udp-timeout": TIMEOUT})
    cfg["rules"] = ["DOMAIN,blocked.test,REJECT", *cfg["rules"]]
    run = MirageRun(lab, cfg, name="udp-mirage")
    run.start()
    try:
        yield run
    finally:
        run.stop()
        for f in state.glob("fakeip.sqlite3*"):
            f.unlink()


def client(lab: Lab, script: str, *args: str, timeout: float = 30,
           script_is_file: bool = False) -> Any:
    """Run a Python script (source, or a file's path) in the client
    namespace; it prints JSON."""
    argv = [script] if script_is_file else ["-c", script]
    result = lab.exec("client", [sys.executable, *argv, *args], timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def api(lab: Lab, run: MirageRun, command: str, *extra: str) -> Any:
    result = lab.exec("gateway", [sys.executable, "-m", "appliance", command, "-c",
                                  str(run.config_path), *extra])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def udp_counters(lab: Lab, run: MirageRun) -> dict[str, int]:
    counters: dict[str, int] = api(lab, run, "status", "--json")["counters"]["udp"]
    return counters


def wait_for(what: str, check: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {seconds:g} s: {what}")


# One exchange from a connected socket and one from an unconnected socket,
# each reporting (fake IP, reply source, reply).
EXCHANGE = """
import json, socket, sys
name, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
ip = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
out = {"ip": ip}
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3)
c.connect((ip, port)); c.send(payload + b" connected")
try:
    data, src = c.recvfrom(4096); out["connected"] = [data.decode(), list(src)]
except TimeoutError:
    out["connected"] = None
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
u.sendto(payload + b" unconnected", (ip, port))
try:
    data, src = u.recvfrom(4096); out["unconnected"] = [data.decode(), list(src)]
except TimeoutError:
    out["unconnected"] = None
print(json.dumps(out))
"""


def replies_from_the_fake_ip(out: dict[str, Any]) -> dict[str, str]:
    """The reply text of each EXCHANGE mode, after asserting that the name
    got a fake IP and that both replies came back from it (address and port
    the client sent to: the gateway answers as the far end)."""
    fake = out["ip"]
    assert fake.startswith("198.18.")
    replies = {}
    for mode in ("connected", "unconnected"):
        assert out[mode] is not None, f"{mode}: no reply"
        data, src = out[mode]
        assert src == [fake, PORT]
        replies[mode] = data
    return replies


def test_direct_echo_comes_back_from_the_fake_ip(lab: Lab, mirage: MirageRun) -> None:
    out = client(lab, EXCHANGE, "www.gamma.test", str(PORT), "ping-direct")
    for mode, data in replies_from_the_fake_ip(out).items():
        # From the gateway's WAN address (DIRECT), to gamma's real address
        # (resolved over DoH; the poisoned resolver says .11).
        assert data.startswith(f"ping-direct {mode} from=192.168.57.1:")
        assert data.endswith(f"to=192.168.57.12:{PORT}")
    # While the sessions live, the mapping is pinned (the API reads the pool).
    rows = api(lab, mirage, "mappings", "--json")
    assert any(r["domain"] == "www.gamma.test" and r["pins"] >= 1 for r in rows), rows
    c = udp_counters(lab, mirage)
    assert c["packets_up"] >= 2 and c["packets_down"] >= 2 and c["bytes_up"] > 0


def test_socks5_udp_associate_by_name(lab: Lab, mirage: MirageRun) -> None:
    before = lab.dante_log.read_text(errors="replace")
    out = client(lab, EXCHANGE, "www.alpha.test", str(PORT), "ping-socks")
    fake = out["ip"]
    for mode, data in replies_from_the_fake_ip(out).items():
        # The echo server saw dante's relay (alpha's host), not the gateway,
        # and dante resolved the name honestly (v4 .10 or v6 fd57::10).
        assert data.startswith(f"ping-socks {mode} from=")
        assert "from=192.168.57.1:" not in data
        assert data.endswith(f"to=192.168.57.10:{PORT}") or data.endswith(f"to=fd57::10:{PORT}")
    # dante was handed the name (ATYP 3) in the UDP header, never an address.
    log = lab.dante_log.read_text(errors="replace")[len(before):]
    assert f"www.alpha.test.{PORT}" in log
    assert fake not in log


def test_rule_to_a_proxy_without_udp_is_skipped(lab: Lab, mirage: MirageRun) -> None:
    # www.beta.test's rule names tinyproxy (HTTP CONNECT: no UDP); like
    # mihomo, matching goes on and MATCH,DIRECT carries it.
    before = udp_counters(lab, mirage)["skipped_no_udp"]
    out = client(lab, EXCHANGE, "www.beta.test", str(PORT), "ping-skip")
    assert out["connected"] is not None
    data, src = out["connected"]
    assert src == [out["ip"], PORT]
    assert data.startswith("ping-skip connected from=192.168.57.1:")
    assert udp_counters(lab, mirage)["skipped_no_udp"] >= before + 1


MANY = """
import json, select, socket, sys, time
name, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ip = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
ep = select.epoll(); socks = {}
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((ip, port))
    s.setblocking(False); socks[s.fileno()] = (i, s); ep.register(s.fileno(), select.EPOLLIN)
for i, s in socks.values():
    s.send(b"many %d" % i)
good = set(); bad = []
end = time.monotonic() + 8
while len(good) + len(bad) < n and time.monotonic() < end:
    for fd, _ in ep.poll(0.2):
        i, s = socks[fd]
        try:
            data, src = s.recvfrom(4096)
        except BlockingIOError:
            continue
        if src == (ip, port) and data.startswith(b"many %d from=" % i):
            good.add(i)
        else:
            bad.append(repr((i, data, src)))
print(json.dumps({"ip": ip, "good": len(good), "bad": bad[:5]}))
"""


def test_many_concurrent_sessions_then_idle_expiry(lab: Lab, mirage: MirageRun) -> None:
    before = udp_counters(lab, mirage)
    out = client(lab, MANY, "www.gamma.test", str(PORT), "200")
    assert out == {"ip": out["ip"], "good": 200, "bad": []}
    live = udp_counters(lab, mirage)
    assert live["sessions_opened"] - before["sessions_opened"] >= 200
    assert live["sessions"] >= 200  # idle for less than udp-timeout: all still open
    assert live["evicted"] == before["evicted"]
    # Idle for udp-timeout: every session ends, and its pin with it.
    wait_for("sessions expire", lambda: udp_counters(lab, mirage)["sessions"] == 0, TIMEOUT + 5)
    after = udp_counters(lab, mirage)
    assert after["idle_expired"] - before["idle_expired"] >= 200
    rows = api(lab, mirage, "mappings", "--json")
    assert all(r["pins"] == 0 for r in rows if r["domain"] == "www.gamma.test"), rows


SILENT = """
import json, socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5); s.connect((ip, port))
for _ in range(3):
    s.send(b"anyone?")
try:
    print(json.dumps({"reply": s.recv(4096).decode()}))
except (TimeoutError, ConnectionRefusedError) as e:
    print(json.dumps({"reply": None, "error": type(e).__name__}))
"""

# SILENT for a port the kernel refuses: the ICMP error may already end a send.
SILENT_REFUSED = """
import json, socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5); s.connect((ip, port))
try:
    for _ in range(3):
        s.send(b"anyone?")
    print(json.dumps({"reply": s.recv(4096).decode()}))
except (TimeoutError, ConnectionRefusedError) as e:
    print(json.dumps({"reply": None, "error": type(e).__name__}))
"""


def test_unmapped_fake_ip_is_dropped_and_counted(lab: Lab, mirage: MirageRun) -> None:
    before = udp_counters(lab, mirage)
    # Inside the fake range, never handed out (the pool allocates from .0.1).
    out = client(lab, SILENT, "198.18.200.200", str(PORT))
    assert out["reply"] is None
    after = udp_counters(lab, mirage)
    assert after["dropped_unmapped"] - before["dropped_unmapped"] == 3
    assert after["sessions_opened"] == before["sessions_opened"]
    # The service is still there.
    assert client(lab, EXCHANGE, "www.gamma.test", str(PORT), "still")["connected"] is not None


RESOLVE = """
import json, socket, sys
print(json.dumps(socket.getaddrinfo(sys.argv[1], 9, socket.AF_INET)[0][4][0]))
"""


def test_reject_and_failed_outbounds_drop_and_count(lab: Lab, mirage: MirageRun) -> None:
    before = udp_counters(lab, mirage)
    # REJECT: the session exists and drops every datagram.
    ip = client(lab, RESOLVE, "blocked.test")
    assert ip.startswith("198.18.")
    assert client(lab, SILENT, ip, str(PORT))["reply"] is None
    mid = udp_counters(lab, mirage)
    assert mid["dropped_rejected"] - before["dropped_rejected"] == 3
    # DIRECT to a name the honest resolver does not know: the open fails,
    # datagrams are dropped for a moment, and the service carries on.
    ip = client(lab, RESOLVE, "nothing.gamma.test")
    assert ip.startswith("198.18.")
    assert client(lab, SILENT, ip, str(PORT))["reply"] is None
    after = udp_counters(lab, mirage)
    assert after["dial_failures"] - mid["dial_failures"] >= 1
    assert after["dropped_dial_failed"] > mid["dropped_dial_failed"]
    # The failed session is in /mirage/failures with its reason; the
    # REJECT is not (the rules' decision, not a failure).
    failed = api(lab, mirage, "connections", "--failed", "--json")["failures"]
    udp = [f for f in failed if f["metadata"]["network"] == "udp"]
    assert any(f["metadata"]["host"] == "nothing.gamma.test" and f["chains"] == ["DIRECT"]
               and "nothing.gamma.test" in f["reason"] and f["kind"] == "unreachable"
               for f in udp), udp
    assert not any(f["metadata"]["host"] == "blocked.test" for f in failed), failed
    assert client(lab, EXCHANGE, "www.gamma.test", str(PORT), "ok")["connected"] is not None


def test_eviction_keeps_the_table_bounded(lab: Lab, mirage: MirageRun) -> None:
    # A second appliance with a small table, in place of the module's one
    # (they would share port 53 and the capture table).
    mirage.stop()
    state = lab.state_dir / "udp-mirage-evict"
    cfg = lab_config(lab, appliance={"state-dir": str(state), "udp-max-sessions": 50})
    run = MirageRun(lab, cfg, name="udp-mirage-evict")
    try:
        run.start()
        out = client(lab, MANY, "www.gamma.test", str(PORT), "120")
        # The echo answers at once, so most sessions are done before they
        # are evicted; a reply to an evicted session is simply not sent.
        assert out["bad"] == [] and out["good"] >= 50
        c = udp_counters(lab, run)
        assert c["sessions"] <= 50
        assert c["evicted"] >= 70
        # A clean stop with 50 live sessions (sockets, pins, tasks).
        assert run.stop() == 0
        assert "Traceback" not in run.log_text()
    finally:
        run.stop()
        for f in state.glob("fakeip.sqlite3*"):
            f.unlink()
        mirage.start()


EXCHANGE6 = """
import json, socket, sys
name, port = sys.argv[1], int(sys.argv[2])
out = {}
for fam, label in ((socket.AF_INET6, "v6"), (socket.AF_INET, "v4")):
    ip = socket.getaddrinfo(name, port, fam, socket.SOCK_DGRAM)[0][4][0]
    c = socket.socket(fam, socket.SOCK_DGRAM); c.settimeout(3); c.connect((ip, port))
    c.send(label.encode())
    try:
        data, src = c.recvfrom(4096); out[label] = [ip, data.decode(), list(src)[:2]]
    except TimeoutError:
        out[label] = [ip, None, None]
print(json.dumps(out))
"""


def test_ipv6_fake_ips_on_the_dual_stack_listener(lab: Lab, mirage: MirageRun) -> None:
    mirage.stop()
    state = lab.state_dir / "udp-mirage-v6"
    cfg = lab_config(lab, ipv6=True,
                     dns={"ipv6": True, "fake-ip-range6": "fdfe:dcba:9876::/64"},
                     appliance={"state-dir": str(state)})
    try:
        with MirageRun(lab, cfg, name="udp-mirage-v6"):
            out = client(lab, EXCHANGE6, "www.gamma.test", str(PORT))
            ip6, data6, src6 = out["v6"]
            assert ip6.startswith("fdfe:dcba:9876:")
            assert src6 == [ip6, PORT]
            # DIRECT prefers AAAA with ipv6 on: gamma's real v6 address.
            assert data6.startswith("v6 from=fd57::1:"), data6
            assert data6.endswith(f"to=fd57::12:{PORT}"), data6
            ip4, data4, src4 = out["v4"]
            assert ip4.startswith("198.18.") and src4 == [ip4, PORT]
            assert data4 is not None and data4.startswith("v4 from=")
    finally:
        for f in state.glob("fakeip.sqlite3*"):
            f.unlink()
        mirage.start()


BIG = """
import json, socket, sys
name, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ip = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3); c.connect((ip, port))
c.send(b"b" * size)
try:
    data, src = c.recvfrom(65535); out = [len(data), data[size:].decode(), list(src)]
except TimeoutError:
    out = None
print(json.dumps(out))
"""


def test_big_datagrams_fragment_on_the_wire_and_oversize_is_counted(
        lab: Lab, mirage: MirageRun) -> None:
    # 30,000 bytes cross both veth links as IP fragments; the gateway gets
    # the datagram reassembled and DIRECT sends it whole.
    out = client(lab, BIG, "www.gamma.test", str(PORT), "30000")
    assert out is not None
    size, tag, src = out
    assert size > 30000 and tag.startswith(" from=192.168.57.1:") and src[1] == PORT
    # The largest IPv4 datagram cannot also carry a SOCKS5 UDP header.
    before = udp_counters(lab, mirage)["dropped_oversize"]
    assert client(lab, BIG, "www.alpha.test", str(PORT), "65507") is None
    assert udp_counters(lab, mirage)["dropped_oversize"] == before + 1


def test_ebpf_capture_steers_udp_to_the_gateway_too(lab: Lab, mirage: MirageRun) -> None:
    # redirect: ebpf (tc sk_assign instead of nft TPROXY): the same socket
    # gets the same datagrams, with their original destination.
    mirage.stop()
    state = lab.state_dir / "udp-mirage-ebpf"
    cfg = lab_config(lab, appliance={"state-dir": str(state), "redirect": "ebpf"})
    try:
        with MirageRun(lab, cfg, name="udp-mirage-ebpf") as run:
            out = client(lab, EXCHANGE, "www.gamma.test", str(PORT), "ping-ebpf")
            for mode in ("connected", "unconnected"):
                assert out[mode] is not None, f"{mode}: no reply"
                data, src = out[mode]
                assert src == [out["ip"], PORT]
                assert data.endswith(f"to=192.168.57.12:{PORT}")
            out = client(lab, EXCHANGE, "www.alpha.test", str(PORT), "ping-ebpf-socks")
            assert out["connected"] is not None and out["connected"][1] == [out["ip"], PORT]
            assert udp_counters(lab, run)["sessions"] >= 4
            # Mirage's table is applied in this mode too (the WAN wall and
            # the loop guard of its input chain): a datagram from the gateway
            # itself straight to the listener's port is refused by the
            # kernel and never reaches the socket; nothing is relayed.
            before = udp_counters(lab, run)
            local = lab.exec("gateway", [sys.executable, "-c", SILENT_REFUSED, "127.0.0.1", "7893"])
            assert json.loads(local.stdout)["reply"] is None
            after = udp_counters(lab, run)
            assert after["dropped_loop"] == before["dropped_loop"]
            assert after["sessions_opened"] == before["sessions_opened"]
    finally:
        for f in state.glob("fakeip.sqlite3*"):
            f.unlink()
        mirage.start()


H3 = Path(__file__).resolve().parent / "h3_lab.py"


def test_http3_over_quic_through_a_fake_ip(lab: Lab, mirage: MirageRun) -> None:
    # A real QUIC handshake (TLS 1.3, certificate checked against the name)
    # and an HTTP/3 GET, from aioquic's unconnected dual-stack socket: every
    # reply must come from the fake IP for the connection to survive.
    try:
        import aioquic  # noqa: F401
    except ImportError:
        pytest.fail("aioquic is a test dependency: pip install aioquic (pyproject [test] extra)")
    tls = lab.state_dir / "tls"
    server = lab.popen("upstream", [sys.executable, str(H3), "server", "192.168.57.12", "443",
                                    str(tls / "server.pem"), str(tls / "server.key"),
                                    "H3-GAMMA", "--max-seconds", "120"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == b"ready"
        fake = client(lab, RESOLVE, "www.gamma.test")
        assert fake.startswith("198.18.")
        out = client(lab, str(H3), "get", fake, "443", "www.gamma.test", str(lab.ca_path),
                     script_is_file=True)
        assert out == {"status": "200", "body": "H3-GAMMA authority=www.gamma.test\n",
                       "peer": [f"::ffff:{fake}", 443]}
    finally:
        server.terminate()
        server.wait(timeout=5)
        if server.stdout is not None:
            server.stdout.close()
