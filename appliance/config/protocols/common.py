"""The layers several protocols share: TLS (with REALITY) and the stream
transports (`network: ws | grpc | h2 | http`), in mihomo's option names.

Parsed by appliance/config/loader/protocols/common.py; carried out by the
outbound side's TLS and transport layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Network = Literal["tcp", "ws", "grpc", "h2", "http"]


@dataclass(frozen=True)
class RealityOptions:
    """`reality-opts`: the server's X25519 public key (unpadded URL-safe
    base64, 32 bytes), the short id (up to 16 hex digits) and whether to
    offer the X25519MLKEM768 hybrid key share (both checked at load)."""

    public_key: str
    short_id: str = ""
    support_x25519mlkem768: bool = False


@dataclass(frozen=True)
class TlsOptions:
    """TLS to the proxy server. `sni` (mihomo: `sni`, or `servername` for
    vmess/vless) defaults to the server name; `fingerprint` pins the server
    certificate's SHA-256 (hex); `client-fingerprint` (uTLS) is accepted
    and has no effect, except with `reality` (REALITY's own TLS client
    always sends a Chrome-shaped ClientHello)."""

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    skip_cert_verify: bool = False
    fingerprint: str | None = None
    reality: RealityOptions | None = None


@dataclass(frozen=True)
class WsOptions:
    """`ws-opts`: path, extra headers (Host among them), early data sent
    in the `early-data-header-name` header (or in the path when unset)
    up to `max-early-data` bytes; `v2ray-http-upgrade` switches to plain
    HTTP upgrade without websocket framing."""

    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    max_early_data: int = 0
    early_data_header_name: str = ""
    v2ray_http_upgrade: bool = False


@dataclass(frozen=True)
class GrpcOptions:
    """`grpc-opts`: the gun service name (path /NAME/Tun)."""

    service_name: str = ""


@dataclass(frozen=True)
class H2Options:
    """`h2-opts`: hosts to pick from and the path."""

    hosts: tuple[str, ...] = ()
    path: str = "/"


@dataclass(frozen=True)
class HttpOptions:
    """`http-opts`: HTTP/1.1 request disguise (method, paths, headers)."""

    method: str = "GET"
    paths: tuple[str, ...] = ("/",)
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class TransportOptions:
    """`network` and the options of that network (only that one is set)."""

    network: Network = "tcp"
    ws: WsOptions | None = None
    grpc: GrpcOptions | None = None
    h2: H2Options | None = None
    http: HttpOptions | None = None
