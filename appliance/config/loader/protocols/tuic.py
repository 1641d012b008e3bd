"""`type: tuic` (v5): its own keys in mihomo's names (TuicOptions).

TLS is always on (`sni`, `alpn` default h3, `skip-cert-verify`,
`fingerprint`: the shared layer). A TUIC v4 entry (`token` instead of
`uuid`/`password`) is skipped with the reason: v4 is a different protocol
that current servers dropped. Times are written in milliseconds, as mihomo
reads them.
"""

from __future__ import annotations

import uuid
from typing import Any

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy, server_value
from appliance.config.loader.protocols.hysteria2 import (
    parse_ca,
    refuse_dialer_proxy,
    render_ca,
    text_value,
)
from appliance.config.loader.scalars import as_bool, as_int, choice
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.tuic import TuicOptions

RELAY_MODES = ("native", "quic")
CONGESTION_CONTROLLERS = ("cubic", "bbr", "new_reno")
# mihomo keys accepted without effect: QUIC tuning and per-stream limits,
# UDP over a stream (a sing-box extension).
IGNORED = ("disable-sni", "max-udp-relay-packet-size", "fast-open", "max-open-streams",
           "cwnd", "recv-window-conn", "recv-window",
           "disable-mtu-discovery", "max-datagram-frame-size", "udp-over-stream",
           "udp-over-stream-version")


def _uuid(value: Any, path: str) -> uuid.UUID:
    try:
        return uuid.UUID(text_value(value, path))
    except ValueError:
        raise ConfigError(path, value, "a UUID") from None


def _millis(value: Any, path: str) -> float:
    return as_int(value, path, 1, 3_600_000, "milliseconds (an integer)") / 1000


def parse(sec: Section) -> TuicOptions:
    refuse_dialer_proxy(sec)
    if sec.raw("token") is not None and sec.raw("uuid") is None:
        raise UnusableProxy("token (TUIC v4, which Mirage does not implement: "
                            "only v5 with uuid and password)")
    ca, ca_str = parse_ca(sec)
    return TuicOptions(
        uuid=sec.require("uuid", _uuid),
        password=sec.require("password", text_value),
        udp_relay_mode=sec.get("udp-relay-mode", choice(RELAY_MODES), "native"),
        congestion_controller=sec.get("congestion-controller", choice(CONGESTION_CONTROLLERS),
                                      "cubic"),
        heartbeat_interval=sec.get("heartbeat-interval", _millis, 10.0),
        request_timeout=sec.get("request-timeout", _millis, 8.0),
        reduce_rtt=sec.get("reduce-rtt", as_bool, False),
        ip=sec.get("ip", server_value, None),
        ca=ca, ca_str=ca_str,
    )  # fmt: skip


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, TuicOptions)
    out: dict[str, Any] = {
        "uuid": str(options.uuid),
        "password": "<redacted>" if redact else options.password,
        "udp-relay-mode": options.udp_relay_mode,
        "congestion-controller": options.congestion_controller,
        "heartbeat-interval": round(options.heartbeat_interval * 1000),
        "request-timeout": round(options.request_timeout * 1000),
        "reduce-rtt": options.reduce_rtt,
    }
    if options.ip is not None:
        out["ip"] = options.ip
    out.update(render_ca(options.ca, options.ca_str))
    return out


SPEC: ProtocolSpec = ProtocolSpec(
    parse=parse, render=render,
    keys=("uuid", "password", "token", "udp-relay-mode", "congestion-controller",
          "heartbeat-interval", "request-timeout", "reduce-rtt", "ip", "ca", "ca-str"),
    ignored=IGNORED, tls="always",
)  # fmt: skip
