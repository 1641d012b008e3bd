"""Hysteria2 and TUIC v5 outbounds end to end: a LAN client's curl, dig and
UDP echo through `mirage run` and sing-box (the reference servers) in the
lab's upstream node.

One lab, one sing-box (hysteria2 plain and with salamander, tuic) with a
certificate from its own lab CA (Mirage trusts it through SSL_CERT_FILE:
the chain is verified, not skipped), one UDP echo server and one Mirage
whose rules pick the proxy by the client's source port (`SRC-PORT`), so
every case runs against the same processes. DNS hijacking is off: the
client asks Mirage's DNS for fake IPs itself and its dig to the honest
resolver is ordinary UDP that the gateway captures and proxies (Mirage's
DNS listens on another port, and the client asks the honest resolver by
the fake IP of its name, doh.test: only fake IPs are captured).
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lab_client
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from appliance.lab.certs import make_ca_and_cert
from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.reference import SingBox

pytestmark = pytest.mark.netns

ECHO_PORT = 9998
SERVER = "192.168.57.10"
SNI = "quic.test"
HY2_PORT, HY2_OBFS_PORT, TUIC_PORT, DEAD_PORT = 18443, 18444, 18445, 18449
HY2_PASSWORD = "hy2-lab-password"
OBFS_PASSWORD = "salamander-lab"
TUIC_UUID = "7b2f6a0e-4c1d-4e8a-9f3b-2d5c6e7f8a9b"
TUIC_PASSWORD = "tuic-lab-password"
GATEWAY_DNS = "192.168.56.1"
GATEWAY_DNS_PORT = 1053


@dataclass(frozen=True)
class Case:
    """A proxy and the client source ports routed to it."""

    proxy: str
    base: int  # curl base..base+39, dig base+40..base+59, echo base+60..base+99

    @property
    def rule(self) -> str:
        return f"SRC-PORT,{self.base}-{self.base + 99},{self.proxy}"


HY2 = Case("hy2", 41000)
HY2_OBFS = Case("hy2-obfs", 41100)
TUIC_NATIVE = Case("tuic-native", 41200)
TUIC_QUIC = Case("tuic-quic", 41300)
HY2_BAD = Case("hy2-badpass", 41400)
TUIC_BAD = Case("tuic-baduuid", 41500)
HY2_DEAD = Case("hy2-down", 41600)
TUIC_DEAD = Case("tuic-down", 41700)
HY2_PINNED = Case("hy2-pinned", 41800)
TUIC_BADPIN = Case("tuic-badpin", 41900)
TUIC_WRONG_CA = Case("tuic-wrongca", 42000)
WORKING = [HY2, HY2_OBFS, TUIC_NATIVE, TUIC_QUIC]


def _tls(cert: Path, key: Path) -> dict[str, object]:
    return {"enabled": True, "alpn": ["h3"], "certificate_path": str(cert),
            "key_path": str(key)}


@dataclass
class Quic:
    mirage: MirageRun
    singbox: SingBox


@pytest.fixture(scope="module")
def quic(lab: Lab) -> Iterator[Quic]:
    d = lab.state_dir / "quic"
    certs = make_ca_and_cert(d / "tls", [SERVER], [SNI])
    bundle = d / "trust.pem"
    bundle.write_text(lab.ca_path.read_text() + certs.ca_cert.read_text())
    tls = _tls(certs.cert, certs.key)
    pin = x509.load_pem_x509_certificate(certs.cert.read_bytes()).fingerprint(
        hashes.SHA256()).hex()
    inbounds = [
        {"type": "hysteria2", "tag": "hy2", "listen": SERVER, "listen_port": HY2_PORT,
         "users": [{"name": "mirage", "password": HY2_PASSWORD}], "tls": tls},
        {"type": "hysteria2", "tag": "hy2-obfs", "listen": SERVER,
         "listen_port": HY2_OBFS_PORT, "obfs": {"type": "salamander", "password": OBFS_PASSWORD},
         "users": [{"name": "mirage", "password": HY2_PASSWORD}], "tls": tls},
        {"type": "tuic", "tag": "tuic", "listen": SERVER, "listen_port": TUIC_PORT,
         "users": [{"name": "mirage", "uuid": TUIC_UUID, "password": TUIC_PASSWORD}],
         "congestion_control": "cubic", "tls": tls},
    ]
    common = {"server": SERVER, "sni": SNI}
    proxies = [
        {"name": HY2.proxy, "type": "hysteria2", "port": HY2_PORT, "password": HY2_PASSWORD,
         **common},
        {"name": HY2_OBFS.proxy, "type": "hysteria2", "port": HY2_OBFS_PORT,
         "password": HY2_PASSWORD, "obfs": "salamander", "obfs-password": OBFS_PASSWORD,
         **common},
        {"name": TUIC_NATIVE.proxy, "type": "tuic", "port": TUIC_PORT, "uuid": TUIC_UUID,
         "password": TUIC_PASSWORD, "udp-relay-mode": "native", **common},
        {"name": TUIC_QUIC.proxy, "type": "tuic", "port": TUIC_PORT, "uuid": TUIC_UUID,
         "password": TUIC_PASSWORD, "udp-relay-mode": "quic", **common},
        {"name": HY2_BAD.proxy, "type": "hysteria2", "port": HY2_PORT, "password": "wrong",
         **common},
        {"name": TUIC_BAD.proxy, "type": "tuic", "port": TUIC_PORT, "uuid": str(uuid.uuid4()),
         "password": TUIC_PASSWORD, **common},
        {"name": HY2_DEAD.proxy, "type": "hysteria2", "port": DEAD_PORT,
         "password": HY2_PASSWORD, **common},
        {"name": TUIC_DEAD.proxy, "type": "tuic", "port": DEAD_PORT, "uuid": TUIC_UUID,
         "password": TUIC_PASSWORD, **common},
        # Pinned: the chain is not verified, the certificate's hash is.
        {"name": HY2_PINNED.proxy, "type": "hysteria2", "port": HY2_PORT,
         "password": HY2_PASSWORD, "server": SERVER, "sni": "any.name", "fingerprint": pin},
        {"name": TUIC_BADPIN.proxy, "type": "tuic", "port": TUIC_PORT, "uuid": TUIC_UUID,
         "password": TUIC_PASSWORD, "fingerprint": "00" * 32, **common},
        # Its own `ca` (the lab's other CA) wins over SSL_CERT_FILE: refused.
        {"name": TUIC_WRONG_CA.proxy, "type": "tuic", "port": TUIC_PORT, "uuid": TUIC_UUID,
         "password": TUIC_PASSWORD, "ca": str(lab.ca_path), **common},
    ]
    state = lab.state_dir / "quic-mirage-state"
    # Mirage's DNS off port 53, so the client's dig to port 53 is a flow
    # like any other.
    cfg = lab_config(lab, appliance={"state-dir": str(state), "dns-hijack": False},
                     dns={"listen": f"0.0.0.0:{GATEWAY_DNS_PORT}"})
    cfg["proxies"] = proxies
    cfg["rules"] = [c.rule for c in (*WORKING, HY2_BAD, TUIC_BAD, HY2_DEAD, TUIC_DEAD,
                                     HY2_PINNED, TUIC_BADPIN, TUIC_WRONG_CA)] + ["MATCH,DIRECT"]
    with lab_client.udp_echo(lab, f"{SERVER}:{ECHO_PORT}"), \
            SingBox(lab, inbounds, name="sing-box-quic") as singbox:
        run = MirageRun(lab, cfg, name="quic-mirage", env={"SSL_CERT_FILE": str(bundle)})
        run.start()
        try:
            yield Quic(run, singbox)
        finally:
            # Live tunnels (their drivers are system tasks) do not hold
            # up or break the exit.
            code = run.stop()
            run.forget_fake_ips()
        assert code == 0, run.log_text()[-3000:]
        assert "Traceback" not in run.log_text(), run.log_text()[-3000:]


def fake_ip(lab: Lab, name: str) -> str:
    out = lab.exec("client", ["dig", "+time=3", "+tries=1", "+short", "-p", str(GATEWAY_DNS_PORT),
                            f"@{GATEWAY_DNS}", name])
    ip = out.stdout.strip()
    assert ip.startswith("198.18."), out.stdout + out.stderr
    return ip


def curl(lab: Lab, case: Case, name: str = "www.alpha.test") -> tuple[int, str, float]:
    ip = fake_ip(lab, name)
    return lab_client.curl(lab, f"http://{name}/", "--local-port",
                           f"{case.base}-{case.base + 39}", "--resolve", f"{name}:80:{ip}")


ECHO_SCRIPT = """
import json, socket, sys
ip, port, lo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for p in range(lo, lo + 40):
    try:
        s.bind(("0.0.0.0", p)); break
    except OSError:
        continue
s.settimeout(3)
out = []
for payload in (b"small", b"x" * 3000):
    s.sendto(payload, (ip, port))
    try:
        data, src = s.recvfrom(8192)
        out.append([len(data), data[-80:].decode(errors="replace"), src[0]])
    except TimeoutError:
        out.append(None)
print(json.dumps(out))
"""


def test_curl_through_each_proxy_reaches_the_server_by_name(lab: Lab, quic: Quic) -> None:
    for case, (name, marker) in zip(WORKING, [("www.alpha.test", "MARKER-ALPHA"),
                                              ("www.beta.test", "MARKER-BETA"),
                                              ("www.gamma.test", "MARKER-GAMMA"),
                                              ("www.alpha.test", "MARKER-ALPHA")], strict=True):
        code, body, _ = curl(lab, case, name)
        assert code == 0 and marker in body, (case.proxy, code, body,
                                              quic.mirage.log_text()[-2000:])
    log = quic.singbox.log_text()
    for name in ("www.alpha.test", "www.beta.test", "www.gamma.test"):
        assert f"inbound connection to {name}:80" in log, log[-3000:]


def singbox_log(quic: Quic) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", quic.singbox.log_text())


def test_dig_and_udp_echo_through_each_proxy(lab: Lab, quic: Quic) -> None:
    ip = fake_ip(lab, "www.alpha.test")
    # Only fake IPs are captured: the client asks the honest resolver by
    # the fake IP of its name.
    resolver = fake_ip(lab, "doh.test")
    for case, inbound in zip(WORKING, ["hysteria2[hy2]", "hysteria2[hy2-obfs]", "tuic[tuic]",
                                       "tuic[tuic]"], strict=True):
        out = lab.exec("client", ["dig", "+time=3", "+tries=2", "+short", "-b",
                                  f"192.168.56.10#{case.base + 40}", f"@{resolver}",
                                  "www.beta.test"])
        assert out.stdout.strip() == "192.168.57.11", (case.proxy, out.stdout, out.stderr)
        r = lab.exec("client", [sys.executable, "-c", ECHO_SCRIPT, ip, str(ECHO_PORT),
                                str(case.base + 60)], timeout=20)
        assert r.returncode == 0, r.stderr
        small, big = json.loads(r.stdout)
        assert small is not None and small[1].startswith("small from="), (case.proxy, small)
        # The echo saw sing-box (the upstream node), not the LAN client.
        assert "from=192.168.57." in small[1], small
        # 3000 bytes do not fit in one QUIC datagram: fragmented and rejoined.
        assert big is not None and big[0] > 3000, (case.proxy, big)
        log = singbox_log(quic)
        for target in ("doh.test:53", f"www.alpha.test:{ECHO_PORT}"):
            assert f"inbound/{inbound}: [mirage] inbound packet connection to {target}" in log, (
                case.proxy, target, log[-3000:])


def test_wrong_credentials_fail_fast_with_the_reason(lab: Lab, quic: Quic) -> None:
    code, _, took = curl(lab, HY2_BAD)
    assert code != 0 and took < 5, (code, took)
    code, _, took = curl(lab, TUIC_BAD)
    assert code != 0 and took < 5, (code, took)
    log = quic.mirage.log_text()
    assert f"{HY2_BAD.proxy}: auth refused by the server" in log, log[-3000:]
    assert f"{TUIC_BAD.proxy}: connection closed with error code" in log, log[-3000:]
    assert "wrong uuid or password?" in log, log[-3000:]


def test_server_down_fails_fast(lab: Lab, quic: Quic) -> None:
    for case in (HY2_DEAD, TUIC_DEAD):
        code, _, took = curl(lab, case)
        assert code != 0 and took < 5, (case.proxy, code, took)
    log = quic.mirage.log_text()
    assert f"{HY2_DEAD.proxy}: QUIC handshake: server unreachable" in log, log[-3000:]


def test_a_pinned_fingerprint_replaces_the_chain_check(lab: Lab, quic: Quic) -> None:
    code, body, _ = curl(lab, HY2_PINNED)
    assert code == 0 and "MARKER-ALPHA" in body, (code, body)
    code, _, took = curl(lab, TUIC_BADPIN)
    assert code != 0 and took < 5, (code, took)
    log = quic.mirage.log_text()
    assert f"{TUIC_BADPIN.proxy}: server certificate SHA-256" in log, log[-3000:]


def test_a_proxys_own_ca_is_the_one_trusted(lab: Lab, quic: Quic) -> None:
    code, _, took = curl(lab, TUIC_WRONG_CA)
    assert code != 0 and took < 5, (code, took)
    log = quic.mirage.log_text()
    assert f"{TUIC_WRONG_CA.proxy}: QUIC handshake: connection closed with error code" in log, (
        log[-3000:])


def test_a_reload_builds_new_tunnels_and_flows_go_on(lab: Lab, quic: Quic) -> None:
    offset = len(quic.mirage.log_text())
    quic.mirage.reload()
    deadline = time.monotonic() + 10
    while "SIGHUP: reloaded" not in quic.mirage.log_text()[offset:]:
        assert time.monotonic() < deadline, quic.mirage.log_text()[-3000:]
        time.sleep(0.05)
    for case in (HY2, TUIC_NATIVE):
        code, body, _ = curl(lab, case)
        assert code == 0 and "MARKER-ALPHA" in body, (case.proxy, code, body)


def test_a_crashed_server_is_noticed_and_a_new_tunnel_made(lab: Lab, quic: Quic) -> None:
    for case in (HY2, TUIC_NATIVE):
        assert curl(lab, case)[0] == 0  # a live tunnel to each
    proc = quic.singbox._proc
    assert proc is not None
    proc.kill()  # a crash: no CONNECTION_CLOSE reaches Mirage, nor a reset later
    proc.wait()
    quic.singbox.start()
    for case in (HY2, TUIC_NATIVE):
        # The first flow rides the dead tunnel until it is noticed...
        code, _, took = curl(lab, case)
        assert took < 7, (case.proxy, code, took)
        # ... the next one gets a new tunnel.
        code, body, took = curl(lab, case)
        assert code == 0 and "MARKER-ALPHA" in body and took < 2, (case.proxy, code, took)
    assert "hy2: the server stopped answering" in quic.mirage.log_text()
