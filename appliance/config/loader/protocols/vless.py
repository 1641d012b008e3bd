"""`type: vless` keys (mihomo's names) <-> VlessOptions."""

from __future__ import annotations

from typing import Any

from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy
from appliance.config.loader.protocols.vmess import TLS_OFF_KEYS, packet_encoding
from appliance.config.loader.scalars import as_nonempty_str, as_str
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.vless import VlessOptions
from appliance.proto.vless import VISION_FLOW

KEYS = ("uuid", "flow", "encryption", "packet-encoding", "packet-addr", "xudp")


def parse(sec: Section) -> VlessOptions:
    uuid = sec.require("uuid", as_nonempty_str)
    flow = sec.get("flow", as_str, "")
    network = sec.data.get("network") or "tcp"
    if flow and network == "ws":
        flow = ""  # mihomo ignores `flow` over ws
    if flow:
        # mihomo keeps the first 16 characters ("xtls-rprx-vision-udp443").
        flow = flow[:16]
        if flow != VISION_FLOW:
            raise UnusableProxy(f"flow {flow!r} (only {VISION_FLOW})")
        if network != "tcp" or not sec.data.get("tls"):
            raise UnusableProxy(f"flow {flow!r} without tls over network tcp")
    encryption = sec.get("encryption", as_str, "")
    if encryption not in ("", "none"):
        raise UnusableProxy(f"encryption {encryption!r} (only none)")
    return VlessOptions(uuid=uuid, flow=flow, packet_encoding=packet_encoding(sec, ""))


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, VlessOptions)
    out: dict[str, Any] = {"uuid": "<redacted>" if redact else options.uuid}
    if options.flow:
        out["flow"] = options.flow
    if options.packet_encoding:
        out["packet-encoding"] = options.packet_encoding
    return out


SPEC: ProtocolSpec = ProtocolSpec(parse=parse, render=render, keys=KEYS, ignored=TLS_OFF_KEYS,
                    tls="optional", sni_key="servername",
                    networks=("tcp", "ws", "grpc", "h2", "http"))
