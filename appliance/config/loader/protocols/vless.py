"""`type: vless` keys (mihomo's names) <-> VlessOptions."""

from __future__ import annotations

from typing import Any

from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy
from appliance.config.loader.protocols.vmess import TLS_OFF_KEYS, packet_encoding
from appliance.config.loader.scalars import as_nonempty_str, as_str
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.vless import VlessOptions

KEYS = ("uuid", "flow", "encryption", "packet-encoding", "packet-addr", "xudp")


def parse(sec: Section) -> VlessOptions:
    uuid = sec.require("uuid", as_nonempty_str)
    flow = sec.get("flow", as_str, "")
    if flow:
        # mihomo ignores `flow` over ws and keeps the first 16 characters.
        network = sec.data.get("network")
        if network != "ws":
            raise UnusableProxy(f"flow {flow!r} (xtls-rprx-vision is not implemented)")
    encryption = sec.get("encryption", as_str, "")
    if encryption not in ("", "none"):
        raise UnusableProxy(f"encryption {encryption!r} (only none)")
    return VlessOptions(uuid=uuid, packet_encoding=packet_encoding(sec, ""))


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, VlessOptions)
    out: dict[str, Any] = {"uuid": "<redacted>" if redact else options.uuid}
    if options.packet_encoding:
        out["packet-encoding"] = options.packet_encoding
    return out


SPEC: ProtocolSpec = ProtocolSpec(parse=parse, render=render, keys=KEYS, ignored=TLS_OFF_KEYS,
                    tls="optional", sni_key="servername",
                    networks=("tcp", "ws", "grpc", "h2", "http"))
