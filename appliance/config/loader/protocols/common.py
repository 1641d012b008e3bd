"""Parsing and rendering the shared TLS and transport options
(appliance/config/protocols/common.py) in mihomo's key names."""

from __future__ import annotations

from typing import Any, Literal

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.scalars import (
    as_bool,
    as_domain,
    as_int,
    as_list,
    as_nonempty_str,
    as_str,
    choice,
)
from appliance.config.loader.section import Section
from appliance.config.protocols.common import (
    GrpcOptions,
    H2Options,
    HttpOptions,
    Network,
    RealityOptions,
    TlsOptions,
    TransportOptions,
    WsOptions,
)
from appliance.proto.reality import parse_public_key, parse_short_id

# "none": the protocol has no TLS; "optional": a `tls: true` switch turns it
# on (vmess, vless); "always": it is TLS (trojan, hysteria2, tuic, anytls).
TlsUse = Literal["none", "optional", "always"]
TLS_KEYS = ("tls", "sni", "servername", "alpn", "skip-cert-verify", "fingerprint",
            "client-fingerprint", "reality-opts")
TRANSPORT_KEYS = ("network", "ws-opts", "grpc-opts", "h2-opts", "http-opts")


def _sni(value: Any, path: str) -> str:
    return as_domain(value, path, wildcards=False)


def _str_tuple(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(as_str(v, f"{path}[{i}]") for i, v in enumerate(as_list(value, path)))


def _fingerprint(value: Any, path: str) -> str:
    text = as_nonempty_str(value, path).replace(":", "").lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(path, value, "a certificate SHA-256 in hex (64 digits)")
    return text


def _reality_public_key(value: Any, path: str) -> str:
    text = as_nonempty_str(value, path)
    try:
        parse_public_key(text)
    except ValueError as e:
        raise ConfigError(path, value, f"a REALITY public key ({e})") from None
    return text


def _reality_short_id(value: Any, path: str) -> str:
    text = "" if value is None else as_str(value, path)
    try:
        parse_short_id(text)
    except ValueError as e:
        raise ConfigError(path, value, f"a REALITY short id ({e})") from None
    return text


def parse_tls(sec: Section, use: TlsUse, sni_key: str = "sni") -> TlsOptions | None:
    """The TLS options of one proxy, or None when it does not use TLS."""
    if use == "none":
        return None
    if use == "optional" and not sec.get("tls", as_bool, False):
        return None
    reality = None
    if sec.raw("reality-opts") is not None:
        r = sec.section("reality-opts")
        reality = RealityOptions(
            public_key=r.require("public-key", _reality_public_key),
            short_id=r.get("short-id", _reality_short_id, ""),
            support_x25519mlkem768=r.get("support-x25519mlkem768", as_bool, False),
        )
        r.finish(("public-key", "short-id", "support-x25519mlkem768"), ())
    sec.raw("client-fingerprint")
    return TlsOptions(
        sni=sec.get(sni_key, _sni, None),
        alpn=sec.get("alpn", _str_tuple, ()),
        skip_cert_verify=sec.get("skip-cert-verify", as_bool, False),
        fingerprint=sec.get("fingerprint", _fingerprint, None),
        reality=reality,
    )


def _headers(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), as_str(v, f"{path}.{k}")) for k, v in _mapping(value, path).items())


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, value, "a mapping")
    return value


def parse_transport(sec: Section, networks: tuple[Network, ...]) -> TransportOptions:
    """`network` (one of `networks`, default tcp) and its `*-opts`."""
    network: Network = sec.get("network", choice(networks), "tcp")
    ws = grpc = h2 = http = None
    if network == "ws":
        w = sec.section("ws-opts")
        ws = WsOptions(
            path=w.get("path", as_str, "/") or "/",
            headers=w.get("headers", _headers, ()),
            max_early_data=w.get("max-early-data", lambda v, p: as_int(v, p, 0, 1 << 16), 0),
            early_data_header_name=w.get("early-data-header-name", as_str, ""),
            v2ray_http_upgrade=w.get("v2ray-http-upgrade", as_bool, False),
        )
        w.finish(("path", "headers", "max-early-data", "early-data-header-name",
                  "v2ray-http-upgrade"), ("v2ray-http-upgrade-fast-open",))
    elif network == "grpc":
        g = sec.section("grpc-opts")
        grpc = GrpcOptions(service_name=g.get("grpc-service-name", as_str, ""))
        g.finish(("grpc-service-name",), ("grpc-user-agent", "ping-interval"))
    elif network == "h2":
        h = sec.section("h2-opts")
        h2 = H2Options(hosts=h.get("host", _str_tuple, ()), path=h.get("path", as_str, "/"))
        h.finish(("host", "path"), ())
    elif network == "http":
        h = sec.section("http-opts")
        raw_headers: dict[str, Any] = h.get("headers", _mapping, {})
        http = HttpOptions(
            method=h.get("method", as_nonempty_str, "GET"),
            paths=h.get("path", _str_tuple, ("/",)) or ("/",),
            headers=tuple((str(k), _str_tuple(v, f"{h.at('headers')}.{k}"))
                          for k, v in raw_headers.items()),
        )
        h.finish(("method", "path", "headers"), ())
    for key in TRANSPORT_KEYS[1:]:
        # `*-opts` of a network not in use: mihomo reads them and ignores them.
        if key.removesuffix("-opts") != network:
            sec.raw(key)
    return TransportOptions(network=network, ws=ws, grpc=grpc, h2=h2, http=http)


def render_tls(tls: TlsOptions | None, use: TlsUse, sni_key: str = "sni") -> dict[str, Any]:
    if tls is None:
        return {"tls": False} if use == "optional" else {}
    out: dict[str, Any] = {"tls": True} if use == "optional" else {}
    if tls.sni is not None:
        out[sni_key] = tls.sni
    if tls.alpn:
        out["alpn"] = list(tls.alpn)
    out["skip-cert-verify"] = tls.skip_cert_verify
    if tls.fingerprint is not None:
        out["fingerprint"] = tls.fingerprint
    if tls.reality is not None:
        out["reality-opts"] = {
            "public-key": tls.reality.public_key, "short-id": tls.reality.short_id,
            "support-x25519mlkem768": tls.reality.support_x25519mlkem768}
    return out


def render_transport(t: TransportOptions | None) -> dict[str, Any]:
    if t is None or t.network == "tcp":
        return {}
    out: dict[str, Any] = {"network": t.network}
    if t.ws is not None:
        out["ws-opts"] = {
            "path": t.ws.path, "headers": dict(t.ws.headers),
            "max-early-data": t.ws.max_early_data,
            "early-data-header-name": t.ws.early_data_header_name,
            "v2ray-http-upgrade": t.ws.v2ray_http_upgrade,
        }  # fmt: skip
    if t.grpc is not None:
        out["grpc-opts"] = {"grpc-service-name": t.grpc.service_name}
    if t.h2 is not None:
        out["h2-opts"] = {"host": list(t.h2.hosts), "path": t.h2.path}
    if t.http is not None:
        out["http-opts"] = {"method": t.http.method, "path": list(t.http.paths),
                            "headers": {k: list(v) for k, v in t.http.headers}}
    return out
