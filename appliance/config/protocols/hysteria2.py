"""Hysteria2's own options (mihomo's names), read by
appliance/config/loader/protocols/hysteria2.py; TLS (`sni`, `alpn`,
`skip-cert-verify`, `fingerprint`) is in the proxy's `tls_options`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.config.protocols import ProtocolOptions


@dataclass(frozen=True)
class Hysteria2Options(ProtocolOptions):
    """`password` authenticates (the `Hysteria-Auth` header); `obfs`
    "salamander" with `obfs_password` obfuscates every UDP packet.
    `down` (bandwidth, as written; `proto.hysteria2.rate_bps` reads it) is
    declared to the server, which then sends with Brutal at that rate;
    `up` asks for Brutal on our sending side, which Mirage does not have:
    the QUIC stack's default (cubic) is used.
    `ports` (port hopping) is kept as written; the `port` is used."""

    password: str
    obfs: str | None = None
    obfs_password: str = ""
    up: str | None = None
    down: str | None = None
    ports: str | None = None
    # `ca` (a PEM file) and `ca-str` (PEM text): CAs trusted for the server
    # instead of the default bundle.
    ca: Path | None = None
    ca_str: str | None = None
