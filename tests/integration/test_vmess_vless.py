"""VMess and VLESS end to end: a client in the lab's client namespace,
`mirage run` in the gateway, sing-box's vmess and vless inbounds in the
upstream node (appliance/lab/reference.py), and behind them a small HTTP
server and a UDP echo on www.alpha.test's address.

Each case has its own port on the far end, and a DST-PORT rule sends that
port to the proxy under test, so one Mirage and one sing-box serve the
whole module. The client asks for www.alpha.test (a fake IP): sing-box's
log must show the *name* arriving (`inbound connection to
www.alpha.test:PORT`), and what the client receives is the far end's
marker (TCP) or the echo's tagged reply (UDP). A wrong uuid ends the flow
at once with the reason in Mirage's log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
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
from appliance.lab.mirage import MirageRun, lab_config, running
from appliance.lab.reference import SingBox

pytestmark = pytest.mark.netns

UUID = "6d6a9b1e-3c4f-4b8e-9a51-2f0c7e1d4b33"
WRONG = "00000000-1111-2222-3333-444444444444"
ALPHA = "192.168.57.10"
SERVER = "192.168.57.11"  # sing-box listens here (www.beta.test's address)
MARKER = "VMESS-VLESS-MARKER"

# sing-box inbounds: tag -> (type, port, extra inbound keys); "tls": True
# stands for the lab certificate (www.beta.test is in it).
INBOUNDS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "vmess-tcp": ("vmess", 20001, {}),
    "vless-tcp": ("vless", 20002, {}),
    "vmess-ws": ("vmess", 20003, {"transport": {"type": "ws", "path": "/vm"}}),
    "vmess-tls-ws": ("vmess", 20004, {"tls": True, "transport": {
        "type": "ws", "path": "/vmtls", "max_early_data": 2048,
        "early_data_header_name": "Sec-WebSocket-Protocol"}}),
    "vless-tls": ("vless", 20005, {"tls": True}),
    "vless-ws": ("vless", 20006, {"transport": {"type": "ws", "path": "/vl"}}),
    "vless-vision": ("vless", 20007, {"tls": True, "flow": "xtls-rprx-vision"}),
    "vmess-grpc": ("vmess", 20008, {"tls": True, "transport": {"type": "grpc",
                                                               "service_name": "VmSvc"}}),
    "vless-grpc": ("vless", 20009, {"tls": True, "transport": {"type": "grpc",
                                                               "service_name": "VlSvc"}}),
}

# Mirage proxies: name -> (inbound tag, extra proxy keys).
PROXIES: dict[str, tuple[str, dict[str, Any]]] = {
    "vm-auto": ("vmess-tcp", {"cipher": "auto"}),
    "vm-chacha": ("vmess-tcp", {"cipher": "chacha20-poly1305", "global-padding": True,
                                "authenticated-length": True}),
    "vm-none": ("vmess-tcp", {"cipher": "none"}),
    "vm-wrong": ("vmess-tcp", {"uuid": WRONG}),
    "vm-xudp": ("vmess-tcp", {"packet-encoding": "xudp"}),
    "vl-tcp": ("vless-tcp", {}),
    "vl-plain-udp": ("vless-tcp", {"packet-encoding": "packetaddr"}),
    "vl-wrong": ("vless-tcp", {"uuid": WRONG}),
    "vm-ws": ("vmess-ws", {"network": "ws", "ws-opts": {"path": "/vm"}}),
    "vm-tls-ws": ("vmess-tls-ws", {"tls": True, "servername": "www.beta.test", "network": "ws",
                                   "ws-opts": {"path": "/vmtls", "max-early-data": 2048,
                                               "early-data-header-name":
                                                   "Sec-WebSocket-Protocol"}}),
    # A name as `server` (resolved by Mirage, the SNI by default).
    "vl-tls": ("vless-tls", {"server": "www.beta.test", "tls": True}),
    "vl-ws": ("vless-ws", {"network": "ws", "ws-opts": {"path": "/vl"}}),
    "vm-grpc": ("vmess-grpc", {"tls": True, "servername": "www.beta.test", "network": "grpc",
                               "grpc-opts": {"grpc-service-name": "VmSvc"}}),
    "vl-grpc": ("vless-grpc", {"tls": True, "servername": "www.beta.test", "network": "grpc",
                               "grpc-opts": {"grpc-service-name": "VlSvc"}}),
    "vl-vision": ("vless-vision", {"server": "www.beta.test", "tls": True,
                                   "flow": "xtls-rprx-vision"}),
}

# Far-end TCP port -> proxy (each case its own port: a DST-PORT rule).
TCP_CASES = {21001: "vm-auto", 21002: "vm-chacha", 21003: "vm-none", 21004: "vl-tcp",
             21007: "vm-ws", 21008: "vm-tls-ws", 21009: "vl-tls", 21010: "vl-ws",
             21011: "vl-vision", 21013: "vm-grpc", 21014: "vl-grpc"}
# HTTPS (TLS 1.3) through Vision: the inner handshake is padded, then both
# ends go direct.
VISION_HTTPS = 21012
WRONG_CASES = {21005: "vm-wrong", 21006: "vl-wrong"}
# vl-tcp: XUDP (mihomo's default for VLESS); vl-plain-udp: command 2.
UDP_CASES = {22001: "vm-auto", 22002: "vl-tcp", 22003: "vm-xudp", 22004: "vl-plain-udp",
             22005: "vm-tls-ws", 22006: "vl-tls"}


def _inbound(lab: Lab, tag: str) -> dict[str, Any]:
    kind, port, extra = INBOUNDS[tag]
    extra = dict(extra)
    user: dict[str, Any] = {"name": "mirage", "uuid": UUID}
    if kind == "vmess":
        user["alterId"] = 0
    if "flow" in extra:
        user["flow"] = extra.pop("flow")
    inbound = {"type": kind, "tag": tag, "listen": SERVER, "listen_port": port,
               "users": [user], **extra}
    if extra.get("tls"):
        tls_dir = lab.state_dir / "tls"
        inbound["tls"] = {"enabled": True, "certificate_path": str(tls_dir / "server.pem"),
                          "key_path": str(tls_dir / "server.key")}
        if extra.get("transport", {}).get("type") == "grpc":
            inbound["tls"]["alpn"] = ["h2"]
    return inbound


def _proxy(name: str) -> dict[str, Any]:
    tag, extra = PROXIES[name]
    kind, port, _ = INBOUNDS[tag]
    return {"name": name, "type": kind, "server": SERVER, "port": port, "uuid": UUID,
            "udp": True, **({"alterId": 0} if kind == "vmess" else {}), **extra}


@pytest.fixture(scope="module")
def far_end(lab: Lab) -> Iterator[None]:
    """The HTTP server on every TCP case's port and the UDP echo on every
    UDP case's port, on www.alpha.test's address."""
    ports = [str(p) for p in (*TCP_CASES, *WRONG_CASES)] + [f"tls:{VISION_HTTPS}"]
    with web_server(lab, MARKER, ALPHA, *ports), \
            udp_echo(lab, *(f"{ALPHA}:{p}" for p in UDP_CASES)):
        yield


@pytest.fixture(scope="module")
def singbox(lab: Lab, far_end: None) -> Iterator[SingBox]:
    with SingBox(lab, [_inbound(lab, tag) for tag in INBOUNDS], name="sing-box-vmess") as sb:
        yield sb


@pytest.fixture(scope="module")
def mirage(lab: Lab, singbox: SingBox) -> Iterator[MirageRun]:
    state = lab.state_dir / "vmess-mirage-state"
    cfg = lab_config(lab, appliance={"state-dir": str(state)})
    cfg["proxies"] = [*cfg["proxies"], *(_proxy(name) for name in PROXIES)]
    cases = {**TCP_CASES, **WRONG_CASES, **UDP_CASES, VISION_HTTPS: "vl-vision"}
    cfg["rules"] = [*(f"DST-PORT,{port},{name}" for port, name in cases.items()),
                    *cfg["rules"]]
    # The lab CA as the system trust store: no proxy skips verification.
    with running(MirageRun(lab, cfg, name="vmess-mirage",
                           env={"SSL_CERT_FILE": str(lab.ca_path)})) as run:
        yield run


def _curl(lab: Lab, port: int) -> tuple[int, str, float]:
    return curl(lab, f"http://www.alpha.test:{port}/")


@pytest.mark.parametrize("port", list(TCP_CASES), ids=[TCP_CASES[p] for p in TCP_CASES])
def test_curl_through_the_proxy_reaches_the_name(lab: Lab, mirage: MirageRun, singbox: SingBox,
                                                 port: int) -> None:
    code, body, _ = _curl(lab, port)
    assert code == 0 and body == f"{MARKER} {port}", (code, body, mirage.log_text()[-2000:])
    singbox.wait_log(f"inbound connection to www.alpha.test:{port}")


@pytest.mark.parametrize("port", list(UDP_CASES), ids=[UDP_CASES[p] for p in UDP_CASES])
def test_udp_echo_through_the_proxy(lab: Lab, mirage: MirageRun, singbox: SingBox,
                                    port: int) -> None:
    payloads = ("first", "x" * 1400, "third")
    out = udp_exchange(lab, "www.alpha.test", port, *payloads)
    replies = echoed_through_fake_ip(out, *payloads, context=lambda: mirage.log_text()[-2000:])
    # The echo saw sing-box (on the upstream node), reached by name.
    assert f"to={ALPHA}:{port}" in replies[2]
    singbox.wait_log(f"inbound packet connection to www.alpha.test:{port}")


@pytest.mark.parametrize("port", list(WRONG_CASES), ids=[WRONG_CASES[p] for p in WRONG_CASES])
def test_wrong_uuid_fails_fast_with_the_reason(lab: Lab, mirage: MirageRun, port: int) -> None:
    offset = len(mirage.log_text())
    code, body, took = _curl(lab, port)
    assert code != 0 and MARKER not in body
    assert took < 3, took
    name = WRONG_CASES[port]
    mirage.wait_log(f"{name}: server closed before answering: authentication failed "
                    "(wrong uuid?)", offset=offset)


def test_vision_goes_direct_for_https_and_carries_a_big_download(
        lab: Lab, mirage: MirageRun, singbox: SingBox) -> None:
    url = f"https://www.alpha.test:{VISION_HTTPS}"
    code, body, _, err = https_get(lab, f"{url}/")
    assert code == 0 and body == f"{MARKER} {VISION_HTTPS}", (err, mirage.log_text()[-2000:])
    code, _, size, err = https_get(lab, f"{url}/big", keep_body=False)
    assert code == 0 and size == BIG, (err, mirage.log_text()[-2000:])
    singbox.wait_log(f"inbound connection to www.alpha.test:{VISION_HTTPS}")
