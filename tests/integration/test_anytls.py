"""AnyTLS end to end: curl and a UDP exchange in the lab's client namespace,
`mirage run` in the gateway, sing-box's anytls inbound (and a UDP echo
server) in the upstream node.

Each proxy variant has its own client source ports (SRC-PORT rules), so
one config serves every case. Mirage trusts the lab CA through
SSL_CERT_FILE. The proof that a name reached the server is sing-box's log
line `inbound connection to www.alpha.test:80` (UDP, logged at debug:
`inbound UoT connect connection to ...`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lab_client import echoed_through_fake_ip, udp_echo, udp_exchange

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.reference import SingBox

pytestmark = pytest.mark.netns

SERVER_IP = "192.168.57.10"
SERVER_NAME = "www.alpha.test"
PASSWORD = "lab-anytls-pw"
PORT = 18460
ECHO_PORT = 9996


class AnytlsLab:
    def __init__(self, lab: Lab, singbox: SingBox, mirage: MirageRun,
                 ports: dict[str, int]) -> None:
        self.lab = lab
        self.singbox = singbox
        self.mirage = mirage
        self.ports = ports

    def curl(self, proxy: str, url: str = f"http://{SERVER_NAME}/", offset: int = 0,
             *extra: str) -> subprocess.CompletedProcess[str]:
        first = self.ports[proxy] + offset
        return self.lab.exec("client", [
            "curl", "-sS", "--max-time", "8", "--local-port", f"{first}-{first + 4}", *extra,
            url], timeout=15)

    def wait_log(self, text: str, seconds: float = 5) -> str:
        return self.mirage.wait_log(text, seconds)


@pytest.fixture(scope="module")
def anytls(lab: Lab) -> Iterator[AnytlsLab]:
    tls_dir = lab.state_dir / "tls"
    inbound = {"type": "anytls", "tag": "anytls-in", "listen": SERVER_IP, "listen_port": PORT,
               "users": [{"name": "lab", "password": PASSWORD}],
               "tls": {"enabled": True, "certificate_path": str(tls_dir / "server.pem"),
                       "key_path": str(tls_dir / "server.key")}}
    proxies: dict[str, tuple[dict[str, Any], int]] = {
        "at": ({"udp": True}, 33000),
        "at-wrong-password": ({"password": "not-it"}, 33020),
    }
    cfg = lab_config(lab, appliance={"state-dir": str(lab.state_dir / "anytls-mirage-state")})
    cfg["proxies"] = [*cfg["proxies"], *(
        {"name": name, "type": "anytls", "server": SERVER_NAME, "port": PORT,
         "password": PASSWORD, "client-fingerprint": "chrome", **opts}
        for name, (opts, _) in proxies.items())]
    cfg["rules"] = [f"SRC-PORT,{first}-{first + 19},{name}"
                    for name, (_, first) in proxies.items()] + cfg["rules"]
    with udp_echo(lab, f"{SERVER_IP}:{ECHO_PORT}", max_seconds=300), \
            SingBox(lab, [inbound], name="sing-box-anytls", level="debug") as singbox:
        run = MirageRun(lab, cfg, name="anytls-mirage",
                        env={"SSL_CERT_FILE": str(lab.ca_path)})
        run.start()
        try:
            yield AnytlsLab(lab, singbox, run,
                            {name: first for name, (_, first) in proxies.items()})
        finally:
            run.stop()
        for f in (lab.state_dir / "anytls-mirage-state").glob("fakeip*"):
            f.unlink()


def test_http_through_anytls_reaches_the_server_by_name(anytls: AnytlsLab) -> None:
    target = f"inbound connection to {SERVER_NAME}:80"
    before = anytls.singbox.log_text().count(target)
    sessions = anytls.singbox.log_text().count("inbound connection from")
    for offset in (0, 5):
        # nginx closes after the answer: the server ends the stream (FIN) and
        # the session goes back to the pool at once. (AnyTLS has no
        # half-close: a flow the client ends lasts until the gateway's
        # half-close timeout.)
        out = anytls.curl("at", f"http://{SERVER_NAME}/", offset, "-H", "Connection: close")
        assert out.returncode == 0, out.stderr + anytls.mirage.log_text()[-2000:]
        assert "MARKER-ALPHA" in out.stdout
        time.sleep(0.2)
    assert anytls.singbox.log_text().count(target) == before + 2
    # One TLS connection (at most) for both: the second flow took the
    # session the first one gave back.
    assert anytls.singbox.log_text().count("inbound connection from") <= sessions + 1


def test_big_download_and_parallel_flows(anytls: AnytlsLab) -> None:
    web = anytls.lab.topology.web
    first = anytls.ports["at"] + 10
    script = " & ".join(
        f"curl -sS --max-time 20 -o /dev/null -w '%{{size_download}}\\n' "
        f"--local-port {first + 3 * i}-{first + 3 * i + 2} "
        f"http://{SERVER_NAME}{web.big_path}" for i in range(3))
    out = anytls.lab.exec("client", ["sh", "-c", script + " & wait"], timeout=40)
    assert out.stdout.split() == [str(web.big_bytes)] * 3, out.stderr


def test_a_destination_the_server_cannot_reach_fails_with_its_reason(anytls: AnytlsLab) -> None:
    out = anytls.curl("at", f"http://{SERVER_NAME}:81/", offset=15)
    assert out.returncode != 0
    anytls.wait_log(f"at {SERVER_NAME}:81: the server could not open it: ")


def test_wrong_password_fails_fast_with_the_reason(anytls: AnytlsLab) -> None:
    started = time.monotonic()
    out = anytls.curl("at-wrong-password")
    assert out.returncode != 0
    assert time.monotonic() - started < 5
    anytls.wait_log("at-wrong-password: the server closed the session without answering "
                    "(wrong password?)")


def test_udp_echo_over_anytls(anytls: AnytlsLab) -> None:
    payloads = [f"anytls-udp {i}" for i in range(3)]
    got = udp_exchange(anytls.lab, SERVER_NAME, ECHO_PORT, *payloads,
                       local_port=anytls.ports["at"] + 19)
    echoed_through_fake_ip(got, *payloads, context=lambda: anytls.mirage.log_text()[-2000:])
    assert f"to={SERVER_IP}:{ECHO_PORT}" in got["replies"][0]
    # sing-box (at debug) names the UDP-over-TCP destination it was given.
    assert f"inbound UoT connect connection to {SERVER_NAME}:{ECHO_PORT}" in \
        anytls.singbox.log_text()


def test_a_session_whose_server_went_silent_is_given_up(anytls: AnytlsLab) -> None:
    # A session back in the pool (nginx closed: the server ended the stream).
    out = anytls.curl("at", f"http://{SERVER_NAME}/", 0, "-H", "Connection: close")
    assert out.returncode == 0, out.stderr
    proc = anytls.singbox._proc
    assert proc is not None
    # Stopped, sing-box keeps the session open and answers nothing.
    subprocess.run(["kill", "-STOP", str(proc.pid)], check=True, timeout=10)
    try:
        assert anytls.curl("at", offset=5).returncode != 0
        anytls.wait_log("at: the server stopped answering (no SYNACK in 5s)", seconds=10)
    finally:
        subprocess.run(["kill", "-CONT", str(proc.pid)], check=True, timeout=10)
    out = anytls.curl("at", f"http://{SERVER_NAME}/", 10)
    assert out.returncode == 0, out.stderr + anytls.mirage.log_text()[-2000:]
    assert "MARKER-ALPHA" in out.stdout
