"""`type: trojan` (mihomo adapter/outbound/trojan.go): `password`, plus the
shared TLS (always on) and the `ws` / `grpc` transports.

`flow` is read and ignored with a note: mihomo's trojan no longer has XTLS
flows. `ss-opts` with `enabled: true` (Shadowsocks AEAD inside the Trojan
tunnel, trojan-go's extension) makes the proxy unusable (UnusableProxy:
the loader skips it with the reason). `reality-opts` is read by the
shared TLS layer (REALITY, appliance/outbound/reality.py).
"""

from __future__ import annotations

from typing import Any

from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy
from appliance.config.loader.scalars import as_nonempty_str
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.trojan import TrojanOptions

KEYS = ("password", "flow", "ss-opts")
IGNORED = ("smux",)


def parse(sec: Section) -> TrojanOptions:
    ss = sec.raw("ss-opts")
    if isinstance(ss, dict) and ss.get("enabled"):
        raise UnusableProxy("ss-opts (Shadowsocks inside Trojan)")
    if sec.raw("flow") is not None:
        sec.ctx.ignore(sec.at("flow"), "mihomo's trojan has no XTLS flow any more")
    return TrojanOptions(password=sec.require("password", as_nonempty_str))


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, TrojanOptions)
    return {"password": "<redacted>" if redact else options.password}


SPEC: ProtocolSpec = ProtocolSpec(parse=parse, render=render, keys=KEYS, ignored=IGNORED,
                                  tls="always", networks=("tcp", "ws", "grpc"))
