"""`type: ss` keys: cipher, password, plugin, plugin-opts, udp-over-tcp.

A proxy this build cannot speak safely is skipped (`UnusableProxy`, with
the reason): stream ciphers and `none`/`plain` (no integrity: anyone on
the path can change the stream; mihomo still accepts them, Mirage says
why not), and the plugins it does not have (shadow-tls, restls, kcptun,
gost-plugin). A 2022 password is checked here (base64, key size), so a
bad PSK is a load error with its key path, not a failing flow.
"""

from __future__ import annotations

from typing import Any

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy
from appliance.config.loader.protocols.common import _headers
from appliance.config.loader.scalars import as_bool, as_nonempty_str, as_str, choice
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.shadowsocks import (
    ObfsOptions,
    ShadowsocksOptions,
    V2rayPluginOptions,
)
from appliance.proto.shadowsocks import METHODS, parse_psks

KEYS = ("cipher", "password", "plugin", "plugin-opts", "udp-over-tcp")
IGNORED = ("udp-over-tcp-version", "client-fingerprint", "smux")
# mihomo's stream ciphers (and no cipher at all): no integrity protection.
STREAM_CIPHERS = (
    "none", "plain", "dummy", "rc4", "rc4-md5", "aes-128-ctr", "aes-192-ctr", "aes-256-ctr",
    "aes-128-cfb", "aes-192-cfb", "aes-256-cfb", "chacha20", "chacha20-ietf", "xchacha20",
    "bf-cfb", "camellia-128-cfb", "camellia-192-cfb", "camellia-256-cfb", "salsa20",
)  # fmt: skip
PLUGINS = ("obfs", "v2ray-plugin")
UNSUPPORTED_PLUGINS = ("shadow-tls", "restls", "kcptun", "gost-plugin")


def unusable(data: dict[str, Any]) -> str | None:
    """Why a proxy entry cannot be used (it is skipped and reported), or None."""
    cipher = data.get("cipher")
    if isinstance(cipher, str) and cipher.lower() in STREAM_CIPHERS:
        return (f"cipher {cipher!r}, which is not supported: insecure (a stream cipher "
                "without integrity); use an AEAD or 2022 cipher")
    plugin = data.get("plugin")
    if isinstance(plugin, str) and plugin in UNSUPPORTED_PLUGINS:
        return f"plugin {plugin!r}, which Mirage does not implement"
    return None


def _cipher(value: Any, path: str) -> str:
    text = as_nonempty_str(value, path).lower()
    if text not in METHODS:
        raise ConfigError(path, value, "must be one of " + ", ".join(METHODS))
    return text


def parse(sec: Section) -> ShadowsocksOptions:
    why = unusable(sec.data)
    if why is not None:
        raise UnusableProxy(why)
    cipher = sec.require("cipher", _cipher)
    password = sec.require("password", as_nonempty_str)
    method = METHODS[cipher]
    if method.is_2022:
        try:
            parse_psks(method, password)
        except ValueError as e:
            raise ConfigError(sec.at("password"), "<redacted>", str(e)) from None
    if sec.get("udp-over-tcp", as_bool, False):
        sec.ctx.ignore(sec.at("udp-over-tcp"),
                       "not supported: UDP goes as Shadowsocks UDP packets")
    plugin = sec.get("plugin", choice(PLUGINS), None)
    obfs = v2ray = None
    opts = sec.section("plugin-opts")
    if plugin == "obfs":
        obfs = ObfsOptions(mode=opts.require("mode", choice(("http", "tls"))),
                           host=opts.get("host", as_nonempty_str, "bing.com"))
        opts.finish(("mode", "host"), ())
    elif plugin == "v2ray-plugin":
        mode = opts.get("mode", choice(("websocket",)), "websocket")
        assert mode == "websocket"
        v2ray = V2rayPluginOptions(
            host=opts.get("host", as_nonempty_str, "bing.com"),
            path=opts.get("path", as_str, "/") or "/",
            tls=opts.get("tls", as_bool, False),
            skip_cert_verify=opts.get("skip-cert-verify", as_bool, False),
            headers=opts.get("headers", _headers, ()),
            mux=opts.get("mux", as_bool, True),
        )
        opts.finish(("mode", "host", "path", "tls", "skip-cert-verify", "mux", "headers"),
                    ("fingerprint", "certificate", "private-key", "v2ray-http-upgrade",
                     "v2ray-http-upgrade-fast-open", "ed25519"))
    return ShadowsocksOptions(cipher=cipher, password=password, obfs=obfs, v2ray_plugin=v2ray)


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, ShadowsocksOptions)
    out: dict[str, Any] = {"cipher": options.cipher,
                           "password": "<redacted>" if redact else options.password}
    if options.obfs is not None:
        out["plugin"] = "obfs"
        out["plugin-opts"] = {"mode": options.obfs.mode, "host": options.obfs.host}
    if options.v2ray_plugin is not None:
        v = options.v2ray_plugin
        out["plugin"] = "v2ray-plugin"
        out["plugin-opts"] = {"mode": "websocket", "host": v.host, "path": v.path,
                              "tls": v.tls, "skip-cert-verify": v.skip_cert_verify,
                              "mux": v.mux, "headers": dict(v.headers)}
    return out


SPEC: ProtocolSpec = ProtocolSpec(parse=parse, render=render, keys=KEYS, ignored=IGNORED)
