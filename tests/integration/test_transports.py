"""The transports end to end against sing-box's trojan inbounds in the
lab's upstream node: ws with early data asked for in the path (`?ed=`,
Xray's spelling), h2 (v2ray's http transport, which no trojan profile
uses but vmess and vless do), grpc and plain TCP, each from the gateway
namespace through `TrojanOutbound` (tests/integration/transport_client.py),
small page and the 8 MiB download. One sing-box for the module. The
http disguise, which sing-box does not serve, against Debian's v2ray
(a trojan inbound with the TCP "http" header).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.lab import Lab
from appliance.lab.reference import SingBox
from appliance.lab.servers import wait_started

pytestmark = pytest.mark.netns

CLIENT = Path(__file__).resolve().parent / "transport_client.py"
SERVER_IP = "192.168.57.10"
PASSWORD = "lab-transport-pw"
PORTS = {"tcp": 18543, "ws": 18544, "h2": 18545, "grpc": 18546}

SPECS: list[dict[str, Any]] = [
    {"name": "tcp", "port": PORTS["tcp"]},
    {"name": "ws-ed-path", "port": PORTS["ws"], "network": "ws",
     "opts": {"path": "/w?ed=2048"}},
    {"name": "h2", "port": PORTS["h2"], "network": "h2",
     "opts": {"hosts": ["www.alpha.test"], "path": "/h2"}},
    {"name": "grpc", "port": PORTS["grpc"], "network": "grpc",
     "opts": {"service_name": "Tun2"}},
]


@pytest.fixture(scope="module")
def singbox(lab: Lab) -> Iterator[SingBox]:
    tls_dir = lab.state_dir / "tls"

    def inbound(tag: str, transport: dict[str, Any] | None, alpn: list[str] | None = None
                ) -> dict[str, Any]:
        tls: dict[str, Any] = {"enabled": True, "certificate_path": str(tls_dir / "server.pem"),
                               "key_path": str(tls_dir / "server.key")}
        if alpn:
            tls["alpn"] = alpn
        out: dict[str, Any] = {"type": "trojan", "tag": tag, "listen": SERVER_IP,
                               "listen_port": PORTS[tag],
                               "users": [{"name": "lab", "password": PASSWORD}], "tls": tls}
        if transport is not None:
            out["transport"] = transport
        return out

    inbounds = [
        inbound("tcp", None),
        inbound("ws", {"type": "ws", "path": "/w", "max_early_data": 2048,
                       "early_data_header_name": "Sec-WebSocket-Protocol"}),
        inbound("h2", {"type": "http", "path": "/h2", "host": ["www.alpha.test"]}, ["h2"]),
        inbound("grpc", {"type": "grpc", "service_name": "Tun2"}, ["h2"]),
    ]
    with SingBox(lab, inbounds, name="sing-box-transports") as sb:
        yield sb


def run_client(lab: Lab, path: str, specs_in: list[dict[str, Any]] = SPECS
               ) -> dict[str, dict[str, Any]]:
    specs = [json.dumps({**s, "server": SERVER_IP, "sni": "www.alpha.test",
                         "password": PASSWORD}) for s in specs_in]
    out = lab.exec("gateway", [sys.executable, str(CLIENT), str(lab.ca_path), path, *specs],
                   timeout=60)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    return {r["name"]: r for r in results}


def test_each_transport_reaches_the_server_by_name(lab: Lab, singbox: SingBox) -> None:
    results = run_client(lab, "/")
    for spec in SPECS:
        r = results[spec["name"]]
        assert "error" not in r, r
        assert r["status"] == "HTTP/1.1 200 OK" and r["marker"], r
    log = singbox.log_text()
    for tag in PORTS:
        assert f"inbound/trojan[{tag}]: [lab] inbound connection to www.alpha.test:80" in log


def test_each_transport_carries_the_big_download(lab: Lab, singbox: SingBox) -> None:
    web = lab.topology.web
    results = run_client(lab, web.big_path)
    for spec in SPECS:
        r = results[spec["name"]]
        assert "error" not in r, r
        assert r["status"] == "HTTP/1.1 200 OK", r
        # The body and its head.
        assert web.big_bytes < r["bytes"] < web.big_bytes + 1024, r


V2RAY_PORT = 18547


@pytest.fixture(scope="module")
def v2ray(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Debian's v2ray in the upstream node; yields its access log."""
    d = tmp_path_factory.mktemp("v2ray")
    tls_dir = lab.state_dir / "tls"
    access = d / "access.log"
    config = d / "config.json"
    config.write_text(json.dumps({
        "log": {"loglevel": "info", "access": str(access)},
        "inbounds": [{
            "listen": SERVER_IP, "port": V2RAY_PORT, "protocol": "trojan",
            "settings": {"clients": [{"password": PASSWORD}]},
            "streamSettings": {
                "network": "tcp", "security": "tls",
                "tlsSettings": {"certificates": [{
                    "certificateFile": str(tls_dir / "server.pem"),
                    "keyFile": str(tls_dir / "server.key")}]},
                "tcpSettings": {"header": {"type": "http", "request": {"path": ["/obfs"]}}},
            },
        }],
        "outbounds": [{"protocol": "freedom"}],
    }))
    log = d / "v2ray.log"
    with open(log, "wb") as out:
        proc = lab.popen("upstream", ["v2ray", "-config", str(config)], stdout=out,
                         stderr=subprocess.STDOUT)
    try:
        wait_started(proc, log, "started", "v2ray")
        yield access
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_http_disguise_against_v2ray(lab: Lab, v2ray: Path) -> None:
    spec = {"name": "http", "port": V2RAY_PORT, "network": "http",
            "opts": {"paths": ["/obfs"]}}
    r = run_client(lab, "/", [spec])["http"]
    assert "error" not in r, r
    assert r["status"] == "HTTP/1.1 200 OK" and r["marker"], r
    assert "www.alpha.test:80" in v2ray.read_text()
