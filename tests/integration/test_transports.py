"""The transports end to end against sing-box's trojan inbounds in the
lab's upstream node: ws with early data asked for in the path (`?ed=`,
Xray's spelling), h2 (v2ray's http transport, which no trojan profile
uses but vmess and vless do), grpc and plain TCP, each from the gateway
namespace through `TrojanOutbound` (tests/integration/transport_client.py),
small page and the 8 MiB download. One sing-box for the module.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.lab import Lab
from appliance.lab.reference import SingBox

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


def run_client(lab: Lab, path: str) -> dict[str, dict[str, Any]]:
    specs = [json.dumps({**s, "server": SERVER_IP, "sni": "www.alpha.test",
                         "password": PASSWORD}) for s in SPECS]
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
