"""`type: vmess` options (mihomo's VmessOption minus the shared TLS and
transport keys). Carried out by appliance/outbound/vmess.py over the core
in appliance/proto/vmess.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.config.protocols import ProtocolOptions

# `packet-encoding` (with mihomo's `packet-addr` / `xudp` switches): how UDP
# rides a VMess stream. "" is plain VMess UDP (command 2).
PacketEncoding = Literal["", "packetaddr", "xudp"]


@dataclass(frozen=True)
class VmessOptions(ProtocolOptions):
    """`uuid` (any other string: its UUIDv5, as Xray does), `cipher` (auto,
    aes-128-gcm, chacha20-poly1305, none, zero), `global-padding` and
    `authenticated-length` (request options), `packet-encoding`.
    `alterId` must be 0 (the AEAD header): a proxy with alterId > 0 is
    skipped at load."""

    uuid: str
    cipher: str = "auto"
    global_padding: bool = False
    authenticated_length: bool = False
    packet_encoding: PacketEncoding = ""
