"""AnyTLS's own options (mihomo `type: anytls`, adapter/outbound/anytls.go);
TLS is always on and comes in `ProxyConfig.tls_options`."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.protocols import ProtocolOptions


@dataclass(frozen=True)
class AnytlsOptions(ProtocolOptions):
    """`password`; the idle session pool: sessions idle longer than
    `idle_session_timeout` seconds are closed at each check (every
    `idle_session_check_interval` seconds), keeping `min_idle_session` of
    them. mihomo's rule: an interval or timeout of 5 s or less means 30 s."""

    password: str
    idle_session_check_interval: float = 30.0
    idle_session_timeout: float = 30.0
    min_idle_session: int = 0
