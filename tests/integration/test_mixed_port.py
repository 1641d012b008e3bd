"""The proxy ports end to end: `mirage run` in the lab's gateway with
mixed-port 7890 (SOCKS5 + HTTP), socks-port 7891, port 7892 and a username
and password; real clients (curl, Python sockets) in the client namespace;
real servers upstream (nginx, dante, tinyproxy, unbound). Every test asserts
on what the client received, and on the proxies' own logs or `ss` where the
question is what happened on the other side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config, running

pytestmark = pytest.mark.netns

USER, PASSWORD = "mixer", "pa55word"
AUTH = f"{USER}:{PASSWORD}"
MIXED, SOCKS, HTTP = 7890, 7891, 7892
# A second user whose flows the IN-* rules route by how they came in (the
# first user's flows never match them).
ROUTED_AUTH = "routed:s3cond"
ROUTED_RULES = [
    "AND,((IN-USER,routed),(IN-NAME,DEFAULT-SOCKS)),REJECT",
    f"AND,((IN-USER,routed),(IN-TYPE,HTTP),(IN-PORT,{HTTP})),tinyproxy",
    "AND,((IN-USER,routed),(IN-TYPE,HTTPS)),dante",
]


@pytest.fixture(scope="module")
def mirage(lab: Lab) -> Iterator[MirageRun]:
    cfg = lab_config(
        lab,
        **{"mixed-port": MIXED, "socks-port": SOCKS, "port": HTTP,
           "authentication": [AUTH, ROUTED_AUTH]},
    )
    cfg["rules"] = ROUTED_RULES + cfg["rules"]
    with running(MirageRun(lab, cfg, name="mixed")) as run:
        yield run


@pytest.fixture(scope="module")
def gw(lab: Lab) -> str:
    return lab.addr("gateway", "lan0")


def curl(lab: Lab, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return lab.exec("client", ["curl", "-s", "-S", "-m", "8", *extra, url], timeout=20)


def log_since(path: object, offset: int) -> str:
    with open(str(path), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def size(path: object) -> int:
    try:
        with open(str(path), "rb") as f:
            return f.seek(0, 2)
    except FileNotFoundError:
        return 0


# A tiny SOCKS5/HTTP client for the malformed-request tests (runs in a namespace).
PRELUDE = r"""
import json, socket, sys
def conn(host, port):
    return socket.create_connection((host, port), timeout=5)
def drain(s):
    out = b''
    try:
        while len(out) < 1 << 20:
            c = s.recv(65536)
            if not c:
                break
            out += c
    except (ConnectionResetError, TimeoutError, socket.timeout):
        pass
    return out
def socks_auth(s, user=b'mixer', pw=b'pa55word'):
    s.sendall(b'\x05\x01\x02')
    assert s.recv(2) == b'\x05\x02'
    s.sendall(bytes([1, len(user)]) + user + bytes([len(pw)]) + pw)
    return s.recv(2)
def socks_request(s, cmd, atyp_addr, port):
    s.sendall(bytes([5, cmd, 0]) + atyp_addr + port.to_bytes(2, 'big'))
    return s.recv(4)
def name(n):
    return bytes([3, len(n)]) + n
"""


def py(lab: Lab, node: str, script: str, timeout: float = 20) -> str:
    result = lab.exec(node, [sys.executable, "-c", PRELUDE + script], timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# ------------------------------------------------------------------------- SOCKS5


def test_socks5_with_a_fake_ip_from_mirage_dns_goes_by_name_through_dante(
    lab: Lab, mirage: MirageRun, gw: str
) -> None:
    before = size(lab.dante_log)
    r = curl(lab, "http://www.alpha.test/", "-v", "-x", f"socks5://{AUTH}@{gw}:{MIXED}")
    assert r.returncode == 0 and "MARKER-ALPHA" in r.stdout, r.stderr[-1500:]
    # curl resolved locally (hijacked DNS -> Mirage) and handed over a fake IP ...
    assert "198.18." in r.stderr, r.stderr[-1500:]
    # ... which the mixed port mapped back: dante was asked for the name.
    new = log_since(lab.dante_log, before)
    assert "www.alpha.test" in new and "198.18." not in new, new[-2000:]


def test_socks5_hostname_over_the_lan_ipv6_address(lab: Lab, mirage: MirageRun) -> None:
    gw6 = lab.addr("gateway", "lan0", family=6)
    r = curl(
        lab,
        "http://www.gamma.test/",
        "--socks5-hostname",
        f"[{gw6}]:{MIXED}",
        "--proxy-user",
        AUTH,
    )
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
    assert "from=192.168.57.1" in r.stdout  # MATCH,DIRECT: from the gateway's WAN address


def test_socks_port_speaks_socks_only(lab: Lab, mirage: MirageRun, gw: str) -> None:
    r = curl(lab, "http://www.gamma.test/", "-x", f"socks5h://{AUTH}@{gw}:{SOCKS}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
    r = curl(lab, "http://www.gamma.test/", "-x", f"http://{AUTH}@{gw}:{SOCKS}")
    assert r.returncode != 0 and "MARKER" not in r.stdout


# --------------------------------------------------------------------------- HTTP


def test_http_proxy_plain_url_through_tinyproxy(lab: Lab, mirage: MirageRun, gw: str) -> None:
    before = size(lab.log("tinyproxy"))
    r = curl(lab, "http://www.beta.test/", "-x", f"http://{AUTH}@{gw}:{MIXED}")
    assert r.returncode == 0 and "MARKER-BETA" in r.stdout, r.stderr
    assert "www.beta.test" in log_since(lab.log("tinyproxy"), before)


def test_http_connect_https_keeps_the_name(lab: Lab, mirage: MirageRun, gw: str) -> None:
    before = size(lab.dante_log)
    r = curl(
        lab,
        "https://www.alpha.test/",
        "--cacert",
        str(lab.ca_path),
        "-x",
        f"http://{AUTH}@{gw}:{MIXED}",
    )
    assert r.returncode == 0 and "MARKER-ALPHA" in r.stdout, r.stderr
    assert "www.alpha.test" in log_since(lab.dante_log, before)


def test_http_proxytunnel_and_http_only_port(lab: Lab, mirage: MirageRun, gw: str) -> None:
    r = curl(lab, "http://www.gamma.test/", "-p", "-x", f"http://{AUTH}@{gw}:{HTTP}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
    r = curl(lab, "http://www.gamma.test/", "-x", f"socks5h://{AUTH}@{gw}:{HTTP}")
    assert r.returncode != 0 and "MARKER" not in r.stdout


# ------------------------------------------------------------------ IN-* rules


def test_in_rules_route_by_listener_protocol_port_and_user(
    lab: Lab, mirage: MirageRun, gw: str
) -> None:
    """IN-NAME, IN-TYPE, IN-PORT and IN-USER see how a flow came in, as
    mihomo's do: the same name goes four ways for the user `routed`."""
    url = "http://www.gamma.test/"
    # socks-port (DEFAULT-SOCKS): REJECT, the client gets no page.
    r = curl(lab, url, "-x", f"socks5h://{ROUTED_AUTH}@{gw}:{SOCKS}")
    assert r.returncode != 0 and "MARKER" not in r.stdout, r.stdout
    # A plain HTTP request on port (IN-TYPE HTTP, IN-PORT 7892): tinyproxy.
    before = size(lab.log("tinyproxy"))
    r = curl(lab, url, "-x", f"http://{ROUTED_AUTH}@{gw}:{HTTP}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
    assert "www.gamma.test" in log_since(lab.log("tinyproxy"), before)
    # A CONNECT tunnel on the mixed port (IN-TYPE HTTPS): dante.
    before = size(lab.dante_log)
    r = curl(lab, url, "-p", "-x", f"http://{ROUTED_AUTH}@{gw}:{MIXED}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr
    assert "www.gamma.test" in log_since(lab.dante_log, before)
    # SOCKS5 on the mixed port matches none of them: MATCH,DIRECT.
    r = curl(lab, url, "-x", f"socks5h://{ROUTED_AUTH}@{gw}:{MIXED}")
    assert r.returncode == 0 and "from=192.168.57.1" in r.stdout, r.stdout
    # And the first user's SOCKS flow on socks-port is not rejected.
    r = curl(lab, url, "-x", f"socks5h://{AUTH}@{gw}:{SOCKS}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout, r.stderr


# --------------------------------------------------------------------- credentials


def test_wrong_or_missing_credentials_are_refused(lab: Lab, mirage: MirageRun, gw: str) -> None:
    for proxy in (f"socks5h://{USER}:wrong@{gw}:{MIXED}", f"socks5h://{gw}:{MIXED}"):
        r = curl(lab, "http://www.gamma.test/", "-x", proxy)
        assert r.returncode != 0 and "MARKER" not in r.stdout, proxy
    for proxy in (f"http://{USER}:wrong@{gw}:{MIXED}", f"http://{gw}:{MIXED}"):
        r = curl(
            lab, "http://www.gamma.test/", "-x", proxy, "-o", "/dev/null", "-w", "%{http_code}"
        )
        assert r.stdout == "407", (proxy, r.stdout)
        r = curl(lab, "https://www.gamma.test/", "-x", proxy, "--cacert", str(lab.ca_path))
        assert r.returncode != 0 and "MARKER" not in r.stdout
    # The right ones still pass afterwards.
    r = curl(lab, "http://www.gamma.test/", "-x", f"socks5h://{AUTH}@{gw}:{MIXED}")
    assert r.returncode == 0 and "MARKER-GAMMA" in r.stdout


# ----------------------------------------------------------------------- malformed


def test_malformed_requests_get_their_error_reply(lab: Lab, mirage: MirageRun, gw: str) -> None:
    script = f"""
gw, port = {gw!r}, {MIXED}
out = {{}}
s = conn(gw, port); out['auth_ok'] = socks_auth(s).hex()
out['unknown_cmd'] = socks_request(s, 9, name(b'www.alpha.test'), 80).hex(); s.close()
s = conn(gw, port); socks_auth(s)
out['bind'] = socks_request(s, 2, name(b'www.alpha.test'), 80).hex(); s.close()
s = conn(gw, port); socks_auth(s)
out['bad_atyp'] = socks_request(s, 1, bytes([7, 1, 2, 3, 4]), 80).hex(); s.close()
s = conn(gw, port); socks_auth(s)
out['unmapped_fake'] = socks_request(s, 1, bytes([1, 198, 18, 254, 254]), 80).hex(); s.close()
s = conn(gw, port); out['wrong_pw'] = socks_auth(s, pw=b'nope').hex(); s.close()
s = conn(gw, port); s.sendall(b'\\x05\\x01\\x00'); out['no_auth_offered'] = drain(s).hex()
s = conn(gw, port); s.sendall(b'\\x04\\x01\\x00\\x50\\x7f\\x00\\x00\\x01\\x00')
out['socks4'] = drain(s).hex()
for key, raw in [
    ('garbage', b'HELLO THERE\\r\\n\\r\\n'),
    ('origin_form', b'GET / HTTP/1.1\\r\\nHost: www.alpha.test\\r\\n\\r\\n'),
    ('too_long', b'GET http://www.alpha.test/ HTTP/1.1\\r\\nX: ' + b'a' * 40000 + b'\\r\\n\\r\\n'),
    ('no_auth', b'GET http://www.alpha.test/ HTTP/1.1\\r\\n\\r\\n'),
    ('unmapped', b'GET http://198.18.254.254/ HTTP/1.1\\r\\n'
                 b'Proxy-Authorization: Basic bWl4ZXI6cGE1NXdvcmQ=\\r\\n\\r\\n'),
]:
    s = conn(gw, port); s.sendall(raw); out[key] = drain(s)[:12].decode()
print(json.dumps(out))
"""
    out = json.loads(py(lab, "client", script))
    assert out["auth_ok"] == "0100"
    assert out["unknown_cmd"] == "05070001"  # command not supported
    assert out["bind"] == "05070001"
    assert out["bad_atyp"] == "05080001"  # address type not supported
    assert out["unmapped_fake"] == "05040001"  # host unreachable
    assert out["wrong_pw"] == "0101"
    assert out["no_auth_offered"] == "05ff"
    assert out["socks4"] == "005b000000000000"
    assert out["garbage"] == out["origin_form"] == "HTTP/1.1 400"
    assert out["too_long"] == "HTTP/1.1 431"
    assert out["no_auth"] == "HTTP/1.1 407"
    assert out["unmapped"] == "HTTP/1.1 502"
    # The port keeps serving.
    r = curl(lab, "http://www.alpha.test/", "-x", f"socks5://{AUTH}@{gw}:{MIXED}")
    assert r.returncode == 0 and "MARKER-ALPHA" in r.stdout


# --------------------------------------------------------------- where it listens


def test_not_reachable_from_the_wan_side(lab: Lab, mirage: MirageRun) -> None:
    script = """
out = []
for host in ('192.168.57.1', 'fd57::1'):
    for port in (7890, 7891, 7892):
        try:
            socket.create_connection((host, port), timeout=3).close(); out.append('open')
        except ConnectionRefusedError:
            out.append('refused')
        except OSError as e:
            out.append(type(e).__name__)
print(json.dumps(out))
"""
    # Nothing answers: the WAN wall (Mirage's input chain) drops the SYN
    # before the kernel could refuse it for want of a listener there.
    assert json.loads(py(lab, "upstream", script)) == ["TimeoutError"] * 6
    # An independent look at the listeners: LAN and loopback addresses only.
    listening = lab.exec("gateway", ["ss", "-Htln", f"sport = :{MIXED}"]).stdout.split("\n")
    local = {line.split()[3].rsplit(":", 1)[0] for line in listening if line.strip()}
    assert {"127.0.0.1", "[::1]", "192.168.56.1", "[fd56::1]"} <= local, local
    assert not local & {"0.0.0.0", "*", "[::]", "192.168.57.1", "[fd57::1]"}, local


# ------------------------------------------------------------- flows in the API


def test_live_flow_is_listed_in_connections(lab: Lab, mirage: MirageRun, gw: str) -> None:
    script = f"""
s = conn({gw!r}, {MIXED}); socks_auth(s)
assert socks_request(s, 1, name(b'www.alpha.test'), 80)[:2] == b'\\x05\\x00'
s.recv(6)  # rest of the bound address (IPv4)
print('up', flush=True); sys.stdin.readline()
s.sendall(b'GET / HTTP/1.0\\r\\nHost: www.alpha.test\\r\\n\\r\\n')
print('MARKER-ALPHA' in drain(s).decode(errors='replace'), flush=True)
"""
    held = lab.popen(
        "client",
        [sys.executable, "-c", PRELUDE + script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert held.stdin is not None and held.stdout is not None
    try:
        assert held.stdout.readline().strip() == "up"
        api = lab.exec("gateway", ["curl", "-s", "-m", "5", "http://127.0.0.1:9090/connections"])
        conns = json.loads(api.stdout)["connections"]
        # mihomo's shape: metadata.host, chains (the rule's target last).
        mine = [c for c in conns if c["metadata"]["host"] == "www.alpha.test"]
        assert mine and mine[0]["chains"][-1] == "dante"
        assert mine[0]["metadata"]["sourceIP"] == "192.168.56.10"
        metadata = mine[0]["metadata"]
        assert metadata["type"] == "Socks5"
        assert (metadata["inboundName"], metadata["inboundPort"], metadata["inboundUser"]) \
            == ("DEFAULT-MIXED", str(MIXED), USER)
        held.stdin.write("\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "True"
    finally:
        held.stdin.close()
        held.wait(timeout=10)
        held.stdout.close()


# ------------------------------------------------------------------ UDP ASSOCIATE


def test_udp_associate_dns_by_ip_name_and_fake_ip(lab: Lab, mirage: MirageRun, gw: str) -> None:
    script = f"""
from dnslib import DNSRecord
s = conn({gw!r}, {MIXED}); socks_auth(s)
rep = socks_request(s, 3, bytes([1, 0, 0, 0, 0]), 0)
assert rep[:2] == b'\\x05\\x00', rep
rest = s.recv(6)
relay = (socket.inet_ntoa(rest[:4]), int.from_bytes(rest[4:], 'big'))
fake = socket.gethostbyname('doh.test')  # hijacked DNS: Mirage's fake IP
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
out = {{'relay': relay[0], 'fake': fake}}
for key, addr in [('ip', bytes([1]) + socket.inet_aton('192.168.57.53')),
                  ('name', name(b'doh.test')),
                  ('fake_ip', bytes([1]) + socket.inet_aton(fake))]:
    q = DNSRecord.question('www.alpha.test', 'A')
    u.sendto(b'\\x00\\x00\\x00' + addr + (53).to_bytes(2, 'big') + q.pack(), relay)
    data, _ = u.recvfrom(65535)
    header = 3 + len(addr) + 2
    assert data[3:header - 2] == addr, (key, data[:header])
    out[key] = [str(r.rdata) for r in DNSRecord.parse(data[header:]).rr]
s.close()
print(json.dumps(out))
"""
    out = json.loads(py(lab, "client", script))
    assert out["relay"] == gw
    assert out["fake"].startswith("198.18.")
    assert out["ip"] == out["name"] == out["fake_ip"] == ["192.168.57.10"]


# -------------------------------------------------------------------- stays up


def test_many_short_connections_leave_nothing_behind(lab: Lab, mirage: MirageRun, gw: str) -> None:
    script = f"""
ok = 0
for i in range(60):
    s = conn({gw!r}, {MIXED})
    s.sendall(b'GET http://www.gamma.test/ HTTP/1.1\\r\\n'
              b'Proxy-Authorization: Basic bWl4ZXI6cGE1NXdvcmQ=\\r\\n\\r\\n')
    ok += b'MARKER-GAMMA' in drain(s)
    s.close()
print(ok)
"""
    assert py(lab, "client", script, timeout=60).strip() == "60"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        api = lab.exec("gateway", ["curl", "-s", "-m", "5", "http://127.0.0.1:9090/connections"])
        if not json.loads(api.stdout)["connections"]:
            break
        time.sleep(0.2)
    assert json.loads(api.stdout)["connections"] == []
