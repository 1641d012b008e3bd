"""v2ray-plugin (`plugin: v2ray-plugin`, `mode: websocket`), client side:
the Shadowsocks stream as the binary messages of one websocket (RFC 6455)
to `path` with `host` as Host (and as SNI with `tls`), what the Debian
`ss-v2ray-plugin` server takes. With `mux` (true by default, as in mihomo;
the v2ray-plugin server expects it) the stream is one session of v2ray's
mux.cool framing inside the websocket (`MuxCool`), as mihomo's
single-session client does.

The websocket framing is wsproto's (sans-I/O); TLS is trio's SSLStream
over the stdlib `ssl` module (certificate verified against the system
store unless `skip-cert-verify`).
"""

from __future__ import annotations

import ssl

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from appliance.config.protocols.shadowsocks import V2rayPluginOptions
from appliance.outbound.base import OutboundError

_MAX_HANDSHAKE_READS = 64


async def open_v2ray_websocket(stream: trio.abc.Stream, opts: V2rayPluginOptions,
                               server: str, port: int) -> WebsocketStream:
    """TLS (with `tls`) and the websocket upgrade on `stream`. Raises
    OutboundError when the server refuses the upgrade or closes."""
    host = opts.host or server
    if opts.tls:
        ctx = ssl.create_default_context()
        if opts.skip_cert_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        tls = trio.SSLStream(stream, ctx, server_hostname=host)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as e:
            raise OutboundError(f"v2ray-plugin TLS to {server}:{port}: {e.__cause__ or e}"
                                ) from None
        stream = tls
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=host, target=opts.path,
                                          extra_headers=[(k.encode(), v.encode())
                                                         for k, v in opts.headers])))
    for _ in range(_MAX_HANDSHAKE_READS):
        data = await stream.receive_some(65536)
        ws.receive_data(bytes(data) if data else None)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return WebsocketStream(stream, ws, MuxCool() if opts.mux else None)
            if isinstance(event, RejectConnection):
                raise OutboundError(
                    f"v2ray-plugin: {server}:{port} refused the websocket upgrade "
                    f"(HTTP {event.status_code})")
        if not data:
            raise OutboundError(f"v2ray-plugin: {server}:{port} closed during the upgrade")
    raise OutboundError(f"v2ray-plugin: {server}:{port}: no upgrade answer")


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


class WebsocketStream(trio.abc.HalfCloseableStream):
    """One websocket's binary messages as a byte stream. Owns
    `transport_stream`. No half-close on a websocket: `send_eof` sends
    the close frame."""

    def __init__(self, transport_stream: trio.abc.Stream, ws: WSConnection,
                 mux: MuxCool | None = None) -> None:
        self.transport_stream = transport_stream
        self.ws = ws
        self.mux = mux
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        ws = self.ws
        while True:
            out: list[bytes] = []
            reply = b""
            for event in ws.events():
                if isinstance(event, BytesMessage | TextMessage):
                    data = event.data
                    out.append(data.encode() if isinstance(data, str) else bytes(data))
                elif isinstance(event, Ping):
                    reply += ws.send(event.response())
                elif isinstance(event, CloseConnection):
                    self._closed = True
            if reply:
                await self.transport_stream.send_all(reply)
            if out and self.mux is not None:
                try:
                    data, ended = self.mux.unwrap(b"".join(out))
                except ValueError as e:
                    raise trio.BrokenResourceError(str(e)) from None
                self._closed = self._closed or ended
                out = [data] if data else []
            if out:
                return b"".join(out)
            if self._closed:
                return b""
            data = await self.transport_stream.receive_some(65536)
            if not data:
                return b""
            ws.receive_data(bytes(data))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        payload = bytes(data) if self.mux is None else self.mux.wrap(bytes(data))
        await self.transport_stream.send_all(self.ws.send(_message(payload)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not self._closed:
            self._closed = True
            if self.mux is not None:
                await self.transport_stream.send_all(
                    self.ws.send(_message(self.mux.close_frame())))
            await self.transport_stream.send_all(self.ws.send(CloseConnection(code=1000)))

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


def _message(data: bytes) -> Event:
    return Message(data=data)
