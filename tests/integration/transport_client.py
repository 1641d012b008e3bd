"""Run inside a lab node by test_transports.py: one Trojan outbound per
JSON spec on the command line (server, sni, network and its options),
each asked for `http://www.alpha.test<path>` through the transport; prints
one JSON line per spec: status line, marker seen, bytes, seconds.

Usage: transport_client.py CA_FILE PATH SPEC_JSON [SPEC_JSON ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import trio

from appliance.config.model import ProxyConfig
from appliance.config.protocols.common import (
    GrpcOptions,
    H2Options,
    HttpOptions,
    TlsOptions,
    TransportOptions,
    WsOptions,
)
from appliance.config.protocols.trojan import TrojanOptions
from appliance.outbound.base import OutboundEnv, OutboundError
from appliance.outbound.trojan import TrojanOutbound


def transport(spec: dict[str, Any]) -> TransportOptions:
    network = spec.get("network", "tcp")
    opts = spec.get("opts", {})
    return TransportOptions(
        network=network,
        ws=WsOptions(**opts) if network == "ws" else None,
        grpc=GrpcOptions(**opts) if network == "grpc" else None,
        h2=H2Options(hosts=tuple(opts.get("hosts", ())), path=opts.get("path", "/"))
        if network == "h2" else None,
        http=HttpOptions(paths=tuple(opts.get("paths", ("/",)))) if network == "http" else None,
    )


async def fetch(ca: str, path: str, spec: dict[str, Any]) -> dict[str, Any]:
    p = ProxyConfig(name=spec["name"], type="trojan", server=spec["server"], port=spec["port"],
                    options=TrojanOptions(password=spec["password"]),
                    tls_options=TlsOptions(sni=spec.get("sni")), transport=transport(spec))
    outbound = TrojanOutbound.from_config(p, OutboundEnv(None, None, 5.0))
    started = time.perf_counter()
    try:
        stream = await outbound.connect_tcp("www.alpha.test", 80)
    except OutboundError as e:
        return {"name": spec["name"], "error": e.reason}
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: www.alpha.test\r\n"
                          "Connection: close\r\n\r\n".encode())
    chunks = []
    size = 0
    with trio.fail_after(30):
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                break
            size += len(data)
            if len(chunks) < 4:
                chunks.append(bytes(data))
    await stream.aclose()
    head = b"".join(chunks)
    return {"name": spec["name"], "status": head.split(b"\r\n", 1)[0].decode(),
            "marker": b"MARKER-ALPHA" in head, "bytes": size,
            "seconds": time.perf_counter() - started}


async def main() -> None:
    ca, path = sys.argv[1], sys.argv[2]
    # The trust store the TLS layer's contexts load (as the lab's Mirage does).
    os.environ["SSL_CERT_FILE"] = ca
    for raw in sys.argv[3:]:
        print(json.dumps(await fetch(ca, path, json.loads(raw))), flush=True)


if __name__ == "__main__":
    trio.run(main)
