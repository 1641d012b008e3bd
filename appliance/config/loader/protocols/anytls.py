"""`type: anytls` (mihomo adapter/outbound/anytls.go): `password`,
`idle-session-check-interval`, `idle-session-timeout` (seconds),
`min-idle-session`, `udp`, and the shared TLS keys (`sni`, `alpn`,
`skip-cert-verify`, `fingerprint`; `client-fingerprint` is read without
effect, as for every TLS protocol)."""

from __future__ import annotations

from typing import Any

from appliance.config.loader.protocols import ProtocolSpec
from appliance.config.loader.scalars import as_int, as_nonempty_str
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.anytls import AnytlsOptions

KEYS = ("password", "idle-session-check-interval", "idle-session-timeout", "min-idle-session")


def _seconds(value: Any, path: str) -> float:
    # mihomo: a value of 5 s or less (0 included: unset) means 30 s.
    seconds = as_int(value, path, 0, 86400, "seconds (an integer)")
    return float(seconds) if seconds > 5 else 30.0


def parse(sec: Section) -> AnytlsOptions:
    return AnytlsOptions(
        password=sec.require("password", as_nonempty_str),
        idle_session_check_interval=sec.get("idle-session-check-interval", _seconds, 30.0),
        idle_session_timeout=sec.get("idle-session-timeout", _seconds, 30.0),
        min_idle_session=sec.get("min-idle-session",
                                 lambda v, p: as_int(v, p, 0, 1024), 0),
    )


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, AnytlsOptions)
    return {"password": "<redacted>" if redact else options.password,
            "idle-session-check-interval": round(options.idle_session_check_interval),
            "idle-session-timeout": round(options.idle_session_timeout),
            "min-idle-session": options.min_idle_session}


SPEC: ProtocolSpec = ProtocolSpec(parse=parse, render=render, keys=KEYS, tls="always")
