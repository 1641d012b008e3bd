"""`type: ss`: Shadowsocks AEAD and 2022, with the obfs and v2ray-plugin
plugins (mihomo's option names). Parsed by
appliance/config/loader/protocols/shadowsocks.py; spoken by
appliance/outbound/shadowsocks.py over appliance/proto/shadowsocks.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.config.protocols import ProtocolOptions


@dataclass(frozen=True)
class ObfsOptions:
    """`plugin: obfs` (simple-obfs): `mode` http or tls, `host` the name
    the disguise carries (Host header or TLS SNI)."""

    mode: Literal["http", "tls"]
    host: str = "bing.com"


@dataclass(frozen=True)
class V2rayPluginOptions:
    """`plugin: v2ray-plugin`: websocket (`mode: websocket`) to `path`
    with `host` as the Host header (and SNI with `tls`); `mux` (default
    true, as in mihomo) runs one mux.cool session inside."""

    host: str = "bing.com"
    path: str = "/"
    tls: bool = False
    skip_cert_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    mux: bool = True


@dataclass(frozen=True)
class ShadowsocksOptions(ProtocolOptions):
    """`cipher` (an AEAD or 2022 method: appliance/proto/shadowsocks.py
    METHODS), `password` (a base64 PSK, `psk1:psk2` for identity headers,
    for 2022), and at most one plugin."""

    cipher: str
    password: str
    obfs: ObfsOptions | None = None
    v2ray_plugin: V2rayPluginOptions | None = None
