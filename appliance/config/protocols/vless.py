"""`type: vless` options (mihomo's VlessOption minus the shared TLS and
transport keys). Carried out by appliance/outbound/vless.py over the core
in appliance/proto/vless.py."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.vmess import PacketEncoding


@dataclass(frozen=True)
class VlessOptions(ProtocolOptions):
    """`uuid` and `packet-encoding` as configured ("" when not given).
    `flow` (xtls-rprx-vision) and an `encryption` other than none are
    skipped at load."""

    uuid: str
    packet_encoding: PacketEncoding = ""
