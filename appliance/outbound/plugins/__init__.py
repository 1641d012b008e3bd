"""Shadowsocks plugins: stream layers between the Shadowsocks framing and
the connection to the server. `obfs` (simple-obfs http/tls, obfs.py) and
`v2ray-plugin` (websocket, optionally TLS, v2ray.py). The loader refuses
the others (shadow-tls, restls, kcptun) with the reason."""

from __future__ import annotations

import trio

from appliance.config.protocols.shadowsocks import ShadowsocksOptions
from appliance.outbound.plugins.obfs import ObfsHttp, ObfsStream, ObfsTls


async def wrap_plugin(stream: trio.abc.Stream, options: ShadowsocksOptions, server: str,
                      port: int) -> trio.abc.Stream:
    """`stream` (to the server) with the proxy's plugin layer on it, or as it
    is without one. May exchange bytes with the server (the websocket
    upgrade); no deadline of its own, never closes `stream` (the caller
    does, on any exception)."""
    if options.obfs is not None:
        core = (ObfsHttp(options.obfs.host, port) if options.obfs.mode == "http"
                else ObfsTls(options.obfs.host))
        return ObfsStream(stream, core)
    if options.v2ray_plugin is not None:
        from appliance.outbound.plugins.v2ray import open_v2ray_websocket

        return await open_v2ray_websocket(stream, options.v2ray_plugin, server, port)
    return stream
