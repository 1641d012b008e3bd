"""v2ray-plugin (`plugin: v2ray-plugin`, `mode: websocket`), client side:
the Shadowsocks stream as the binary messages of one websocket (RFC 6455)
to `path` with `host` as Host (and as SNI with `tls`), what the Debian
`ss-v2ray-plugin` server takes. With `mux` (true by default, as in mihomo;
the v2ray-plugin server expects it) the stream is one session of v2ray's
mux.cool framing inside the websocket (`MuxCool`, sans-I/O; `MuxStream`),
as mihomo's single-session client does.

TLS and the websocket are the shared layers (appliance/outbound/tls.py
`TlsClient`, appliance/outbound/transport/ws.py `WsStream`).
"""

from __future__ import annotations

import trio

from appliance.config.protocols.common import TlsOptions, WsOptions
from appliance.config.protocols.shadowsocks import V2rayPluginOptions
from appliance.outbound.base import OutboundError
from appliance.outbound.tls import ALPN_HTTP1, TlsClient
from appliance.outbound.transport.ws import WsStream


class V2rayPlugin:
    """The plugin layer of one outbound: its TLS context (made once) and
    websocket options; `wrap` is per connection."""

    def __init__(self, opts: V2rayPluginOptions, server: str, port: int) -> None:
        self.opts = opts
        self.what = f"v2ray-plugin {server}:{port}"
        self.tls = (TlsClient(TlsOptions(sni=opts.host, skip_cert_verify=opts.skip_cert_verify),
                              server, alpn=ALPN_HTTP1) if opts.tls else None)
        self.ws = WsOptions(path=opts.path, headers=opts.headers)

    async def wrap(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        """TLS (with `tls`) and the websocket upgrade on `stream`. Raises
        OutboundError when either fails; closes `stream` then."""
        if self.tls is not None:
            stream = await self.tls.wrap(stream, self.what)
        ws = WsStream(stream, self.ws, self.opts.host)
        try:
            await ws.open()
        except trio.BrokenResourceError as e:
            await trio.aclose_forcefully(ws)
            raise OutboundError(f"{self.what}: {e}") from None
        return MuxStream(ws) if self.opts.mux else ws


# mux.cool session status and option bits (v2ray common/mux).
_NEW, _KEEP, _END, _KEEPALIVE = 1, 2, 3, 4
_OPTION_DATA = 1
_MAX_FRAME = 0xFFFF


class MuxCool:
    """One mux.cool session (id 0) over the websocket, sans I/O: `wrap`
    frames what is sent (the first frame opens the session), `unwrap`
    returns the session's data from what arrives. Frames of other
    sessions and keepalives are skipped. ValueError for a malformed frame."""

    def __init__(self) -> None:
        # New session, TCP, to 127.0.0.1:0 (the server's plugin forwards
        # every session to its ss-server, whatever the address says).
        meta = b"\0\0" + bytes([_NEW, 0, 1]) + b"\0\0" + b"\x01\x7f\0\0\x01"
        self._open: bytes | None = len(meta).to_bytes(2, "big") + meta
        self._buf = b""
        self._data_left = 0

    def wrap(self, data: bytes) -> bytes:
        parts = [self._open] if self._open is not None else []
        self._open = None
        for i in range(0, len(data), _MAX_FRAME):
            piece = data[i:i + _MAX_FRAME]
            parts.append(b"\0\x04\0\0" + bytes([_KEEP, _OPTION_DATA])
                         + len(piece).to_bytes(2, "big") + piece)
        return b"".join(parts)

    def close_frame(self) -> bytes:
        return b"\0\x04\0\0" + bytes([_END, 0])

    def unwrap(self, data: bytes) -> tuple[bytes, bool]:
        """(session data, whether the session ended)."""
        buf = self._buf + data
        out = []
        pos = 0
        ended = False
        while pos < len(buf):
            if self._data_left:
                take = buf[pos:pos + self._data_left]
                out.append(take)
                pos += len(take)
                self._data_left -= len(take)
                continue
            if len(buf) - pos < 2:
                break
            meta_len = int.from_bytes(buf[pos:pos + 2], "big")
            if meta_len < 4 or meta_len > 512:
                raise ValueError(f"mux.cool: metadata length {meta_len}")
            head_end = pos + 2 + meta_len
            if len(buf) < head_end:
                break
            status, option = buf[pos + 4], buf[pos + 5]
            has_data = option & _OPTION_DATA
            need = head_end + (2 if has_data else 0)
            if len(buf) < need:
                break
            if status == _END:
                ended = True
            pos = need
            if has_data:
                self._data_left = int.from_bytes(buf[head_end:need], "big")
        self._buf = buf[pos:]
        return b"".join(out), ended


class MuxStream(trio.abc.Stream):
    """One mux.cool session over `transport_stream` (the websocket). Owns
    it; closing sends the session's end frame first, when it can."""

    def __init__(self, transport_stream: trio.abc.Stream) -> None:
        self.transport_stream = transport_stream
        self.mux = MuxCool()
        self._ended = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._ended:
            data = await self.transport_stream.receive_some(max_bytes)
            if not data:
                return b""
            try:
                out, self._ended = self.mux.unwrap(bytes(data))
            except ValueError as e:
                raise trio.BrokenResourceError(str(e)) from None
            if out:
                return out
        return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(self.mux.wrap(bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        with trio.move_on_after(0.5) as scope:
            scope.shield = True
            try:
                await self.transport_stream.send_all(self.mux.close_frame())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await self.transport_stream.aclose()
