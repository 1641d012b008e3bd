"""The stream transports a protocol can ride on (`network:` in mihomo):
tcp (nothing), ws (and v2ray-http-upgrade), grpc (gun), h2 (v2ray's http
transport) and http (an HTTP/1.1 request disguise).

A protocol outbound does: dial -> TLS (appliance/outbound/tls.py, with
`transport_alpn`) -> `open_transport` -> its own header. The result is a
`trio.abc.Stream` carrying the protocol's bytes; the transports that have
a sans-I/O core keep it apart (`gun` framing, `http_obfs` heads, the ws
upgrade and frames in `ws.py`, the HTTP/2 client in `h2core.py`).

How it fails: the opening exchange and later reads raise
trio.BrokenResourceError with the reason (an upgrade refused, a gRPC
error status), which the outbound's connect deadline turns into
OutboundError while the flow is connecting. `open_transport` owns
`stream` from the call on: it is closed if opening fails.
"""

from __future__ import annotations

import trio

from appliance.config.protocols.common import TransportOptions
from appliance.outbound.tls import ALPN_H2, ALPN_HTTP1
from appliance.outbound.transport.h2 import GunPool, open_grpc, open_h2
from appliance.outbound.transport.http_obfs import HttpObfsStream
from appliance.outbound.transport.ws import WsStream, open_http_upgrade


def transport_alpn(t: TransportOptions | None) -> tuple[str, ...] | None:
    """The ALPN the transport needs over TLS (None: the configured one):
    HTTP/2 for grpc and h2, HTTP/1.1 for ws and http, as mihomo sets."""
    if t is None or t.network == "tcp":
        return None
    return ALPN_H2 if t.network in ("grpc", "h2") else ALPN_HTTP1


def gun_pool(t: TransportOptions | None, host: str, *, tls: bool) -> GunPool | None:
    """For grpc, the outbound's pool of calls on one shared HTTP/2
    connection (`GunPool.open` instead of dial + `open_transport` per flow);
    None for every other transport."""
    if t is None or t.network != "grpc":
        return None
    assert t.grpc is not None
    return GunPool(t.grpc, host, tls=tls)


async def open_transport(stream: trio.abc.Stream, t: TransportOptions | None,
                         host: str, *, tls: bool) -> trio.abc.Stream:
    """`stream` (to the proxy server, TLS already on it when `tls`) as the
    transport `t` says. `host` is the name for Host / :authority when the
    options give none (the SNI, else the server)."""
    if t is None or t.network == "tcp":
        return stream
    try:
        if t.network == "ws":
            assert t.ws is not None
            if t.ws.v2ray_http_upgrade:
                return await open_http_upgrade(stream, t.ws, host)
            return WsStream(stream, t.ws, host)
        if t.network == "grpc":
            assert t.grpc is not None
            return await open_grpc(stream, t.grpc, host, tls=tls)
        if t.network == "h2":
            assert t.h2 is not None
            return await open_h2(stream, t.h2, host, tls=tls)
        assert t.http is not None
        return HttpObfsStream(stream, t.http, host)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
