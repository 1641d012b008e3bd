"""Shadowsocks plugins: stream layers between the Shadowsocks framing and
the connection to the server. `obfs` (simple-obfs http/tls, obfs.py) and
`v2ray-plugin` (websocket, optionally TLS, with mux.cool; v2ray.py). The
loader refuses the others (shadow-tls, restls, kcptun) with the reason."""

from __future__ import annotations

from typing import Protocol

import trio

from appliance.config.protocols.shadowsocks import ShadowsocksOptions
from appliance.outbound.plugins.obfs import ObfsHttp, ObfsStream, ObfsTls
from appliance.outbound.plugins.v2ray import V2rayPlugin


class Plugin(Protocol):
    async def wrap(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        """`stream` (to the server) with the layer on it. May exchange bytes
        with the server (the websocket upgrade); no deadline of its own.
        Closes `stream` on failure."""
        ...


class ObfsPlugin:
    """`plugin: obfs`: a fresh sans-I/O core per connection."""

    def __init__(self, mode: str, host: str, port: int) -> None:
        self.mode = mode
        self.host = host
        self.port = port

    async def wrap(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        core = ObfsHttp(self.host, self.port) if self.mode == "http" else ObfsTls(self.host)
        return ObfsStream(stream, core)


def make_plugin(options: ShadowsocksOptions, server: str, port: int) -> Plugin | None:
    """The proxy's plugin layer (built once per outbound), or None."""
    if options.obfs is not None:
        return ObfsPlugin(options.obfs.mode, options.obfs.host, port)
    if options.v2ray_plugin is not None:
        return V2rayPlugin(options.v2ray_plugin, server, port)
    return None
