"""Trojan's own options (mihomo `type: trojan`); TLS is always on and
comes in `ProxyConfig.tls_options`, the `ws` / `grpc` transports in
`ProxyConfig.transport`."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.protocols import ProtocolOptions


@dataclass(frozen=True)
class TrojanOptions(ProtocolOptions):
    """`password`: what the server checks (as hex(SHA-224) in each request)."""

    password: str
