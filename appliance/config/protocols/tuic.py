"""TUIC v5's own options (mihomo's names), read by
appliance/config/loader/protocols/tuic.py; TLS (`sni`, `alpn`,
`skip-cert-verify`, `fingerprint`) is in the proxy's `tls_options`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from appliance.config.protocols import ProtocolOptions

UdpRelayMode = Literal["native", "quic"]
CongestionController = Literal["cubic", "bbr", "new_reno"]


@dataclass(frozen=True)
class TuicOptions(ProtocolOptions):
    """`uuid` and `password` authenticate (the token is the TLS exporter's);
    `udp_relay_mode` carries UDP as QUIC datagrams (native) or one
    unidirectional stream per packet (quic). `ip` is the address to dial
    instead of resolving `server` (which stays the SNI). Times in seconds
    (mihomo writes milliseconds). `congestion_controller` bbr has no
    implementation in the QUIC stack: cubic is used. `reduce_rtt` (0-RTT)
    is accepted and has no effect."""

    uuid: uuid.UUID
    password: str
    udp_relay_mode: UdpRelayMode = "native"
    congestion_controller: CongestionController = "cubic"
    heartbeat_interval: float = 10.0
    request_timeout: float = 8.0
    reduce_rtt: bool = False
    ip: str | None = None
    # `ca` (a PEM file) and `ca-str` (PEM text): CAs trusted for the server
    # instead of the default bundle.
    ca: Path | None = None
    ca_str: str | None = None
