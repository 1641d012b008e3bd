"""Hysteria2's own options (mihomo's names), read by
appliance/config/loader/protocols/hysteria2.py; TLS (`sni`, `alpn`,
`skip-cert-verify`, `fingerprint`) is in the proxy's `tls_options`."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.protocols import ProtocolOptions


@dataclass(frozen=True)
class Hysteria2Options(ProtocolOptions):
    """`password` authenticates (the `Hysteria-Auth` header); `obfs`
    "salamander" with `obfs_password` obfuscates every UDP packet.
    `up`/`down` (bandwidth, as written) ask for Brutal congestion control,
    which Mirage does not have: the QUIC stack's default (cubic) is used.
    `ports` (port hopping) is kept as written; the `port` is used."""

    password: str
    obfs: str | None = None
    obfs_password: str = ""
    up: str | None = None
    down: str | None = None
    ports: str | None = None
