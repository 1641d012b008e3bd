"""`type: vmess` keys (mihomo's names) <-> VmessOptions."""

from __future__ import annotations

from typing import Any

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy
from appliance.config.loader.protocols.common import TLS_KEYS
from appliance.config.loader.scalars import as_bool, as_int, as_nonempty_str, choice
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.vmess import PacketEncoding, VmessOptions
from appliance.proto.vmess import SECURITIES

KEYS = ("uuid", "alterId", "cipher", "global-padding", "authenticated-length",
        "packet-encoding", "packet-addr", "xudp")
# With `tls: false` the TLS keys subscriptions still carry (servername,
# skip-cert-verify, ...) have no effect: reported as ignored, not refused.
TLS_OFF_KEYS = tuple(k for k in TLS_KEYS if k != "tls")
# `packet-encoding: packet` is mihomo's other spelling of packetaddr.
PACKET_ENCODINGS = ("", "packetaddr", "packet", "xudp")


def _cipher(value: Any, path: str) -> str:
    text = as_nonempty_str(value, path).lower()
    if text not in SECURITIES:
        raise ConfigError(path, value, "one of " + ", ".join(SECURITIES))
    return text


def packet_encoding(sec: Section, default: PacketEncoding) -> PacketEncoding:
    """`packet-encoding` and the `packet-addr` / `xudp` switches, resolved
    as mihomo does (xudp wins over packet-addr)."""
    encoding = sec.get("packet-encoding", choice(PACKET_ENCODINGS), "")
    packet_addr = sec.get("packet-addr", as_bool, False)
    xudp = sec.get("xudp", as_bool, False)
    if xudp or encoding == "xudp":
        return "xudp"
    if packet_addr or encoding in ("packetaddr", "packet"):
        return "packetaddr"
    return default


def parse(sec: Section) -> VmessOptions:
    uuid = sec.require("uuid", as_nonempty_str)
    alter_id = sec.get("alterId", lambda v, p: as_int(v, p, 0, 0xFFFF), 0)
    if alter_id > 0:
        # The MD5 (pre-AEAD) header: deprecated by v2ray and mihomo, refused
        # by servers since 2022.
        raise UnusableProxy(f"alterId {alter_id} (the legacy VMess header; only alterId 0)")
    return VmessOptions(
        uuid=uuid,
        cipher=sec.get("cipher", _cipher, "auto"),
        global_padding=sec.get("global-padding", as_bool, False),
        authenticated_length=sec.get("authenticated-length", as_bool, False),
        packet_encoding=packet_encoding(sec, ""),
    )


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, VmessOptions)
    out: dict[str, Any] = {
        "uuid": "<redacted>" if redact else options.uuid, "alterId": 0,
        "cipher": options.cipher, "global-padding": options.global_padding,
        "authenticated-length": options.authenticated_length,
    }  # fmt: skip
    if options.packet_encoding:
        out["packet-encoding"] = options.packet_encoding
    return out


SPEC: ProtocolSpec = ProtocolSpec(parse=parse, render=render, keys=KEYS, ignored=TLS_OFF_KEYS,
                    tls="optional", sni_key="servername",
                    networks=("tcp", "ws", "grpc", "h2", "http"))
