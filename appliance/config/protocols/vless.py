"""`type: vless` options (mihomo's VlessOption minus the shared TLS and
transport keys). Carried out by appliance/outbound/vless.py over the core
in appliance/proto/vless.py."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.vmess import PacketEncoding


@dataclass(frozen=True)
class VlessOptions(ProtocolOptions):
    """`uuid`, `flow` ("" or "xtls-rprx-vision": XTLS Vision, only over TLS
    with `network: tcp`) and `packet-encoding` as configured ("" when not
    given). An `encryption` other than none is skipped at load."""

    uuid: str
    flow: str = ""
    packet_encoding: PacketEncoding = ""
