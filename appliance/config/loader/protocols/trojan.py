"""`type: trojan` (mihomo adapter/outbound/trojan.go): `password`, plus the
shared TLS (always on) and the `ws` / `grpc` transports.

`flow` is read and ignored with a note: mihomo's trojan no longer has XTLS
flows. `ss-opts` with `enabled: true` (Shadowsocks AEAD inside the Trojan
tunnel, trojan-go's extension) and `reality-opts` make the proxy unusable:
`unusable` names why and the loader skips it.
"""

from __future__ import annotations

from typing import Any

from appliance.config.loader.scalars import as_nonempty_str
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.trojan import TrojanOptions

KEYS = ("password",)
IGNORED = ("smux",)
REDACTED = "<redacted>"


def parse(sec: Section) -> TrojanOptions:
    if sec.raw("flow") is not None:
        sec.ctx.ignore(sec.at("flow"), "mihomo's trojan has no XTLS flow any more")
    # Only a disabled `ss-opts` reaches here (`unusable` skips the rest).
    sec.raw("ss-opts")
    return TrojanOptions(password=sec.require("password", as_nonempty_str))


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, TrojanOptions)
    return {"password": REDACTED if redact else options.password}


def unusable(data: dict[str, Any]) -> str | None:
    """Options that change the wire protocol into one Mirage does not speak."""
    ss = data.get("ss-opts")
    if isinstance(ss, dict) and ss.get("enabled"):
        return "ss-opts (Shadowsocks inside Trojan)"
    if data.get("network") == "grpc":
        return "network 'grpc'"
    if data.get("reality-opts") is not None:
        return "reality-opts (REALITY needs a TLS stack that sets the session ID)"
    return None
