"""Shadowsocks end to end: a real client in the lab's client namespace,
`mirage run` in the gateway, real Shadowsocks servers upstream.

Servers (started once for the module in the upstream node, stopped by PID):
shadowsocks-libev's ss-server (AEAD, TCP and UDP; with simple-obfs's
obfs-server in http and tls mode; with the v2ray-plugin websocket server)
and sing-box (2022 ciphers TCP and UDP, a multi-user 2022 server, one AEAD
inbound). One `mirage run` serves the whole module: each test points the
three lab names (www.alpha.test, www.beta.test, www.gamma.test) at the
proxies it exercises and reloads (SIGHUP), so nothing restarts.

UDP: the tagged echo server (bench/udp_echo.py) on the upstream web
addresses, and a dnsmasq on www.beta.test's address, port 5353 (port 53 is
hijacked to Mirage), asked through the proxy with dig. The far end resolves
the names itself: sing-box's log must say `inbound connection to
www.alpha.test:80`, the name and not an address.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from lab_client import FAKE, curl, dig, udp_echo

from appliance.config.protocols.shadowsocks import ShadowsocksOptions
from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.reference import SingBox
from appliance.lab.servers import stop_all
from appliance.outbound.base import OutboundEnv, OutboundError
from appliance.outbound.shadowsocks import ShadowsocksOutbound

pytestmark = pytest.mark.netns

UP = "192.168.57.10"  # the upstream's first address (alpha; the servers listen on all)
ECHO_PORT = 9997
DNS_PORT = 5353
PASSWORD = "mirage-ss-lab"
PSK16 = "AAECAwQFBgcICQoLDA0ODw=="  # bytes 0..15
PSK32 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # bytes 0..31
USER16 = "ZGVmZ2hpamtsbW5vcHFycw=="  # a second 16-byte PSK: the multi-user server's user

# name -> (proxy entry without name/type/server, port, server)
PROXIES: dict[str, dict[str, Any]] = {
    "libev-aes": {"port": 18388, "cipher": "aes-256-gcm", "password": PASSWORD, "udp": True},
    "libev-xchacha": {"port": 18389, "cipher": "xchacha20-ietf-poly1305",
                      "password": PASSWORD, "udp": True},
    "obfs-http": {"port": 18390, "cipher": "chacha20-ietf-poly1305", "password": PASSWORD,
                  "plugin": "obfs", "plugin-opts": {"mode": "http", "host": "cdn.example"}},
    "obfs-tls": {"port": 18391, "cipher": "aes-128-gcm", "password": PASSWORD,
                 "plugin": "obfs", "plugin-opts": {"mode": "tls", "host": "cdn.example"}},
    "v2ray-ws": {"port": 18392, "cipher": "aes-128-gcm", "password": PASSWORD,
                 "plugin": "v2ray-plugin",
                 "plugin-opts": {"mode": "websocket", "host": "cdn.example", "path": "/ws"}},
    "v2ray-wss": {"port": 18393, "cipher": "aes-256-gcm", "password": PASSWORD,
                  "plugin": "v2ray-plugin",
                  "plugin-opts": {"mode": "websocket", "host": "cdn.example", "path": "/wss",
                                  "tls": True, "skip-cert-verify": True}},
    "sb-2022-aes": {"port": 18400, "cipher": "2022-blake3-aes-128-gcm", "password": PSK16,
                    "udp": True},
    "sb-2022-chacha": {"port": 18401, "cipher": "2022-blake3-chacha20-poly1305",
                       "password": PSK32, "udp": True},
    "sb-2022-users": {"port": 18402, "cipher": "2022-blake3-aes-128-gcm",
                      "password": f"{PSK16}:{USER16}"},
    "sb-aead": {"port": 18403, "cipher": "aes-128-gcm", "password": PASSWORD},
    "sb-wrong": {"port": 18403, "cipher": "aes-128-gcm", "password": "not-the-password"},
    "sb-2022-wrong": {"port": 18400, "cipher": "2022-blake3-aes-128-gcm", "password": USER16},
}


def sing_box_inbounds() -> list[dict[str, Any]]:
    def inbound(tag: str, port: int, method: str, password: str, **extra: Any) -> dict[str, Any]:
        return {"type": "shadowsocks", "tag": tag, "listen": "::", "listen_port": port,
                "method": method, "password": password, **extra}

    return [
        inbound("2022-aes", 18400, "2022-blake3-aes-128-gcm", PSK16),
        inbound("2022-chacha", 18401, "2022-blake3-chacha20-poly1305", PSK32),
        inbound("2022-users", 18402, "2022-blake3-aes-128-gcm", PSK16,
                users=[{"name": "lab-user", "password": USER16}]),
        inbound("aead", 18403, "aes-128-gcm", PASSWORD),
    ]


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[SingBox]:
    for tool in ("ss-server", "obfs-server", "ss-v2ray-plugin", "dnsmasq"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")
    procs: list[subprocess.Popen[bytes]] = []
    logs = lab.state_dir / "ss-servers"
    logs.mkdir(parents=True, exist_ok=True)

    def start(name: str, argv: list[str]) -> None:
        with open(logs / f"{name}.log", "wb") as out:
            procs.append(lab.popen("upstream", argv, stdout=out, stderr=subprocess.STDOUT))

    def ss_server(name: str, *plugin: str) -> None:
        p = PROXIES[name]
        start(name, ["ss-server", "-s", "0.0.0.0", "-p", str(p["port"]), "-k", PASSWORD,
                     "-m", p["cipher"], "-u", *plugin])

    sb = SingBox(lab, sing_box_inbounds(), name="sing-box-ss")
    try:
        ss_server("libev-aes")
        ss_server("libev-xchacha")
        ss_server("obfs-http", "--plugin", "obfs-server", "--plugin-opts", "obfs=http")
        ss_server("obfs-tls", "--plugin", "obfs-server", "--plugin-opts", "obfs=tls")
        ss_server("v2ray-ws", "--plugin", "ss-v2ray-plugin", "--plugin-opts",
                  "server;path=/ws;host=cdn.example")
        cert, key = logs / "cdn.pem", logs / "cdn.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=cdn.example", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        ss_server("v2ray-wss", "--plugin", "ss-v2ray-plugin", "--plugin-opts",
                  f"server;tls;host=cdn.example;path=/wss;cert={cert};key={key}")
        with udp_echo(lab, *(f"192.168.57.{h}:{ECHO_PORT}" for h in (10, 11, 12))):
            start("dnsmasq", ["dnsmasq", "-k", "-p", str(DNS_PORT),
                              "--listen-address=192.168.57.11", "--bind-interfaces",
                              "--no-resolv", "--no-hosts", "--server=192.168.57.53",
                              f"--pid-file={logs}/dnsmasq.pid"])
            sb.start()
            wait_listening(lab, [int(p["port"]) for p in PROXIES.values()] + [DNS_PORT])
            yield sb
    finally:
        sb.stop()
        stop_all(procs)


def wait_listening(lab: Lab, ports: list[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = lab.exec("upstream", ["ss", "-Hltn"]).stdout
        udp = lab.exec("upstream", ["ss", "-Hlun"]).stdout
        if all(f":{p} " in out or f":{p} " in udp for p in ports):
            return
        time.sleep(0.1)
    raise AssertionError(f"upstream servers not listening on all of {ports}")


@pytest.fixture(scope="module")
def mirage(lab: Lab, servers: SingBox) -> Iterator[MirageRun]:
    state = lab.state_dir / "ss-mirage-state"
    cfg = lab_config(lab, appliance={"state-dir": str(state), "udp-timeout": 5})
    cfg["proxies"] = [*cfg["proxies"], *(
        {"name": name, "type": "ss", "server": UP, **opts} for name, opts in PROXIES.items())]
    run = MirageRun(lab, cfg, name="ss-mirage")
    route(run, "libev-aes", "sb-2022-aes", "sb-2022-chacha", reload=False)
    run.start()
    try:
        yield run
    finally:
        run.stop()
        for f in state.glob("fakeip.sqlite3*"):
            f.unlink()


def route(run: MirageRun, alpha: str, beta: str, gamma: str, *, reload: bool = True) -> None:
    """alpha.test, beta.test and gamma.test through these proxies."""
    run.config["rules"] = [f"DOMAIN-SUFFIX,alpha.test,{alpha}", f"DOMAIN-SUFFIX,beta.test,{beta}",
                           f"DOMAIN-SUFFIX,gamma.test,{gamma}", "MATCH,DIRECT"]
    if not reload:
        return
    offset = run.log_path.stat().st_size
    run.write_config()
    run.reload()
    deadline = time.monotonic() + 10
    while "SIGHUP: reloaded" not in run.log_text(offset):
        assert time.monotonic() < deadline, run.log_text(offset)[-2000:]
        time.sleep(0.05)


def fetch_all(lab: Lab) -> dict[str, tuple[int, str, float]]:
    return {n: curl(lab, f"http://www.{n}.test/") for n in ("alpha", "beta", "gamma")}


def assert_markers(results: dict[str, tuple[int, str, float]]) -> None:
    for n, (rc, body, _) in results.items():
        assert rc == 0 and f"MARKER-{n.upper()}" in body, (n, rc, body[:200])


# One exchange from a connected UDP socket: (fake IP, reply).
EXCHANGE = """
import json, socket, sys
name, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
ip = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3)
c.connect((ip, port))
out = {"ip": ip, "reply": None}
for _ in range(2):
    c.send(payload)
    try:
        out["reply"] = c.recv(4096).decode(); break
    except TimeoutError:
        pass
print(json.dumps(out))
"""


def udp_exchange(lab: Lab, name: str, payload: str) -> dict[str, Any]:
    result = lab.exec("client", [sys.executable, "-c", EXCHANGE, name, str(ECHO_PORT), payload],
                      timeout=20)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    assert FAKE.match(out["ip"]), out
    return out


def test_aead_and_2022_carry_http_by_name(lab: Lab, mirage: MirageRun, servers: SingBox) -> None:
    before = len(servers.log_text())
    assert_markers(fetch_all(lab))  # libev aes-256-gcm, sing-box 2022 aes and chacha
    half_close(lab, "alpha", "beta")  # libev (not passed on), sing-box 2022 (passed on)
    log = servers.log_text()[before:]
    # The names reached sing-box, not addresses (resolved at the far end).
    assert "inbound connection to www.beta.test:80" in log
    assert "inbound connection to www.gamma.test:80" in log


def test_udp_echo_and_dig_through_shadowsocks(lab: Lab, mirage: MirageRun) -> None:
    # alpha: ss-server (AEAD UDP), beta: sing-box 2022 AES, gamma: 2022 chacha.
    for name, host in (("alpha", "10"), ("beta", "11"), ("gamma", "12")):
        out = udp_exchange(lab, f"www.{name}.test", f"ping-{name}")
        assert out["reply"] is not None, (name, out)
        # The echo saw the proxy (upstream side), not the gateway's WAN address.
        assert out["reply"].startswith(f"ping-{name} from=192.168.57.")
        assert "from=192.168.57.1:" not in out["reply"]
        assert out["reply"].endswith(f"to=192.168.57.{host}:{ECHO_PORT}")
    # A DNS exchange through the proxy: dnsmasq on beta's address, port 5353.
    fake = dig(lab, "+short", "www.beta.test")
    assert FAKE.match(fake)
    assert dig(lab, f"@{fake}", "-p", str(DNS_PORT), "+short", "www.alpha.test") == UP


# An HTTP/1.0 client that half-closes after its request (the flow must go
# on downstream, also over a websocket, which cannot pass the half-close on).
HALF_CLOSE = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
s.sendall(b"GET / HTTP/1.0\\r\\nHost: " + sys.argv[1].encode() + b"\\r\\n\\r\\n")
s.shutdown(socket.SHUT_WR)
data = b""
while (chunk := s.recv(65536)):
    data += chunk
print(data.decode(errors="replace"))
"""


def half_close(lab: Lab, *names: str) -> None:
    for name in names:
        out = lab.exec("client", [sys.executable, "-c", HALF_CLOSE, f"www.{name}.test"],
                       timeout=20)
        assert f"MARKER-{name.upper()}" in out.stdout, (name, out.stdout, out.stderr)


def test_plugins_and_more_ciphers(lab: Lab, mirage: MirageRun) -> None:
    route(mirage, "obfs-http", "obfs-tls", "v2ray-ws")
    assert_markers(fetch_all(lab))
    half_close(lab, "beta", "gamma")  # obfs-tls (libev), v2ray-plugin
    route(mirage, "libev-xchacha", "sb-2022-users", "v2ray-wss")
    assert_markers(fetch_all(lab))
    route(mirage, "sb-aead", "sb-2022-users", "v2ray-wss")
    assert_markers(fetch_all(lab))
    out = udp_exchange(lab, "www.alpha.test", "ping-xchacha")
    assert out["reply"] is not None and out["reply"].startswith("ping-xchacha from=")


def test_wrong_password_fails_fast_with_the_reason(lab: Lab, mirage: MirageRun) -> None:
    route(mirage, "sb-wrong", "sb-2022-wrong", "libev-aes")
    offset = mirage.log_path.stat().st_size
    results = fetch_all(lab)
    for n in ("alpha", "beta"):
        rc, body, seconds = results[n]
        assert rc != 0 and "MARKER" not in body
        assert seconds < 2.0, (n, seconds)  # connect-timeout is 5 s
    assert results["gamma"][0] == 0
    log = mirage.log_text(offset)
    for name in ("sb-wrong", "sb-2022-wrong"):
        assert f"ss {name} www." in log and "authentication failed or wrong cipher/password" in log
    # ... and the API keeps each failed flow with its reason (/mirage/failures).
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "connections", "--failed",
                               "--json", "-c", str(mirage.config_path)], timeout=20)
    assert out.returncode == 0, out.stderr
    failed = {r["chains"][-1]: r for r in json.loads(out.stdout)["failures"] if r["chains"]}
    for name in ("sb-wrong", "sb-2022-wrong"):
        assert failed[name]["kind"] == "auth", failed[name]
        assert "wrong cipher/password" in failed[name]["reason"]
    route(mirage, "libev-aes", "sb-2022-aes", "sb-2022-chacha")


@pytest.fixture
def silent_server() -> Iterator[int]:
    """An ss-server on loopback here (no lab): with a wrong password it
    stops reading and holds the connection, saying nothing."""
    port = 18499
    proc = subprocess.Popen(["ss-server", "-s", "127.0.0.1", "-p", str(port), "-k", PASSWORD,
                             "-m", "aes-128-gcm"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=5)


async def test_silent_server_hits_the_first_answer_deadline(silent_server: int) -> None:
    # Until the proxy has been seen to work, the first answer has a deadline
    # (connect-timeout, 1 s here).
    env = OutboundEnv(None, None, 1.0)
    out = ShadowsocksOutbound("silent", "127.0.0.1", silent_server,
                              ShadowsocksOptions("aes-128-gcm", "wrong"), env)
    stream = None
    for _ in range(100):  # until ss-server listens
        try:
            stream = await out.connect_tcp("www.example.test", 80)
            break
        except OutboundError:
            await trio.sleep(0.05)
    assert stream is not None
    await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
    t0 = trio.current_time()
    with pytest.raises(trio.BrokenResourceError, match="wrong cipher/password"):
        await stream.receive_some()
    assert 0.5 < trio.current_time() - t0 < 2.0
    assert not out.verified
    await stream.aclose()


async def test_server_down_and_connect_timeout_fail_fast() -> None:
    env = OutboundEnv(None, None, 0.5)
    opts = ShadowsocksOptions("aes-128-gcm", PASSWORD)
    down = ShadowsocksOutbound("down", "127.0.0.1", 18498, opts, env)  # nothing listens
    t0 = trio.current_time()
    with pytest.raises(OutboundError, match="refused"):
        await down.connect_tcp("www.example.test", 80)
    assert trio.current_time() - t0 < 0.3
    # A listener whose backlog is full: SYNs go unanswered, the connect
    # deadline (connect-timeout, 0.5 s) ends it.
    listener = socket.socket()
    held: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            held.append(s)
        await trio.sleep(0.1)
        stuck = ShadowsocksOutbound("stuck", "127.0.0.1", port, opts, env)
        t0 = trio.current_time()
        with pytest.raises(OutboundError, match="timed out"):
            await stuck.connect_tcp("www.example.test", 80)
        assert 0.4 < trio.current_time() - t0 < 1.0
    finally:
        for s in held:
            s.close()
        listener.close()
