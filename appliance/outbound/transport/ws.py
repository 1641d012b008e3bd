"""The `ws` transport: a byte stream carried in WebSocket binary messages
(RFC 6455) over the (TLS) stream to the proxy server, as v2ray and mihomo
carry vmess, vless, trojan and v2ray-plugin.

wsproto is the sans-I/O core of the upgrade (request, response checks)
and of sending (framing, masking); `ServerFrames` (below) parses what the
server sends after the upgrade, at a fraction of wsproto's cost per byte.
`WsStream` is the thin adapter: each `send_all` is one binary message,
`receive_some` returns message bytes as they come (a message may be split
over reads; message boundaries carry no meaning here).

Early data (`max-early-data`, `early-data-header-name`; or `?ed=N` in the
path, Xray's spelling, which means the Sec-WebSocket-Protocol header): the
first up to N bytes the protocol sends travel in the upgrade request itself,
base64url without padding, saving a round trip. The upgrade then waits for
the first `send_all`. Without a header name the bytes are appended to the
path, as mihomo does.

`v2ray-http-upgrade`: a plain HTTP/1.1 Upgrade exchange, after which the
stream carries raw bytes (no framing): `open_http_upgrade`.

Failures after the transport was opened (refused upgrade, a peer that
speaks garbage) raise trio.BrokenResourceError with the reason; the
outbound turns that into OutboundError while it is still connecting.
Owns the stream it wraps.
"""

from __future__ import annotations

import base64
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    Pong,
    RejectConnection,
    Request,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from appliance.config.protocols.common import WsOptions
from appliance.outbound.base import ReplayStream
from appliance.outbound.transport.chunks import Chunks

# One read from the server: big reads, few wakeups (a TLS record is 16 KiB).
READ_SIZE = 1 << 16
# The upgrade response head; a server that sends more is not a ws server.
MAX_RESPONSE_HEAD = 16 << 10
EARLY_DATA_HEADER = "Sec-WebSocket-Protocol"


def early_data_plan(ws: WsOptions) -> tuple[str, int, str]:
    """(path, max early bytes, header name) for `ws`: `?ed=N` in the path
    (Xray) becomes N bytes in Sec-WebSocket-Protocol, the parameter removed
    from the path; otherwise `max-early-data` and `early-data-header-name`
    as configured (no header name: the path carries them)."""
    path = ws.path or "/"
    parts = urlsplit(path)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ed = [v for k, v in query if k == "ed"]
    if ed and ed[0].isdigit() and int(ed[0]) > 0:
        rest = urlencode([(k, v) for k, v in query if k != "ed"])
        return urlunsplit(("", "", parts.path or "/", rest, parts.fragment)), int(ed[0]), \
            EARLY_DATA_HEADER
    return path, ws.max_early_data, ws.early_data_header_name


def host_header(headers: tuple[tuple[str, str], ...], default: str) -> tuple[
        str, list[tuple[bytes, bytes]]]:
    """The Host to send (a `Host` entry of `headers` wins over `default`)
    and the other headers as wsproto wants them."""
    host = default
    extra: list[tuple[bytes, bytes]] = []
    for k, v in headers:
        if k.lower() == "host":
            host = v
        else:
            extra.append((k.encode(), v.encode()))
    return host, extra


def encode_early(data: bytes | bytearray | memoryview) -> str:
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


# RFC 6455 5.2 opcodes.
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WsFrameError(ValueError):
    """Bytes from the server that are not WebSocket frames it may send."""


class ServerFrames:
    """The server's frames after the upgrade, without I/O: `feed(data)`
    returns the payload bytes of the data frames it completes (text,
    binary and continuation alike: message boundaries mean nothing to a
    tunnel) and the control frames as (opcode, payload).

    Why not wsproto here: its frame parser costs about 1.9 ms of CPU per MB
    received (520 MB/s on these machines), most of a ws tunnel's download
    cost; this one slices payloads out of the read. Server frames are never
    masked (RFC 6455 5.1) and no extension is negotiated, so RSV bits are
    errors; a control frame is at most 125 bytes and never fragmented (5.5).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> tuple[list[bytes], list[tuple[int, bytes]]]:
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        payloads: list[bytes] = []
        controls: list[tuple[int, bytes]] = []
        pos, end = 0, len(src)
        # Payloads are copied once, out of the read.
        with memoryview(src) as view:
            while end - pos >= 2:
                b0, b1 = src[pos], src[pos + 1]
                if b0 & 0x70:
                    raise WsFrameError("a frame with RSV bits set (no extension was agreed)")
                if b1 & 0x80:
                    raise WsFrameError("a masked frame from the server")
                opcode, size, head = b0 & 0x0F, b1 & 0x7F, 2
                if size == 126:
                    if end - pos < 4:
                        break
                    size, head = int.from_bytes(src[pos + 2:pos + 4], "big"), 4
                elif size == 127:
                    if end - pos < 10:
                        break
                    size, head = int.from_bytes(src[pos + 2:pos + 10], "big"), 10
                if opcode >= OP_CLOSE:
                    if opcode > OP_PONG:
                        raise WsFrameError(f"reserved control opcode {opcode:#x}")
                    if size > 125 or not b0 & 0x80:
                        raise WsFrameError("a control frame longer than 125 bytes or fragmented")
                elif opcode > OP_BINARY:
                    raise WsFrameError(f"reserved data opcode {opcode:#x}")
                if end - pos - head < size:
                    break
                start = pos + head
                pos = start + size
                if opcode >= OP_CLOSE:
                    controls.append((opcode, bytes(view[start:pos])))
                elif size:
                    payloads.append(bytes(view[start:pos]))
            rest = bytearray(view[pos:]) if pos < end else bytearray()
        self._buf = rest
        return payloads, controls


class WsStream(trio.abc.Stream):
    """A byte stream over one WebSocket connection (see the module doc).

    Owns `stream`. Not half-closeable: a ws Close ends both directions, and
    the TLS below cannot half-close either.
    """

    def __init__(self, stream: trio.abc.Stream, ws: WsOptions, host: str) -> None:
        self.transport_stream = stream
        self.path, self.max_early_data, self.early_header = early_data_plan(ws)
        self.host, self.headers = host_header(ws.headers, host)
        self._conn = WSConnection(ConnectionType.CLIENT)
        self._opened = False
        self._open_lock = trio.Lock()
        self._send_lock = trio.Lock()
        self._received = Chunks()
        self._frames = ServerFrames()
        self._eof = False
        self._pending_pong = b""

    async def open(self, early: bytes | bytearray | memoryview = b"") -> None:
        """The upgrade exchange, with `early` data in the request; once.
        BrokenResourceError if the server refuses it."""
        async with self._open_lock:
            if self._opened:
                return
            path = self.path
            headers = list(self.headers)
            subprotocols: list[str] = []
            if early:
                text = encode_early(early)
                if not self.early_header:
                    path += text
                elif self.early_header.lower() == EARLY_DATA_HEADER.lower():
                    # The server echoes it as the chosen subprotocol, which
                    # wsproto accepts only if it was offered as one.
                    subprotocols.append(text)
                else:
                    headers.append((self.early_header.encode(), text.encode()))
            request = Request(host=self.host, target=path, extra_headers=headers,
                              subprotocols=subprotocols)
            await self.transport_stream.send_all(self._conn.send(request))
            head = bytearray()
            while (end := head.find(b"\r\n\r\n")) < 0:
                if len(head) > MAX_RESPONSE_HEAD:
                    raise trio.BrokenResourceError("ws: upgrade response head too long")
                data = await self.transport_stream.receive_some(READ_SIZE)
                if not data:
                    raise trio.BrokenResourceError(
                        "ws: the server closed the connection before the upgrade")
                head += data
            # wsproto checks the response head (status, Sec-WebSocket-Accept);
            # the frames after it are ours (`ServerFrames`).
            try:
                self._conn.receive_data(bytes(head[:end + 4]))
            except RemoteProtocolError as e:
                raise trio.BrokenResourceError(f"ws: bad upgrade response: {e}") from None
            if not self._process_events():
                raise trio.BrokenResourceError("ws: bad upgrade response")
            self._opened = True
            if len(head) > end + 4:
                self._receive_frames(bytes(head[end + 4:]))

    def _process_events(self) -> bool:
        """The upgrade response's events: True once upgraded. Raises
        BrokenResourceError for a refused upgrade."""
        upgraded = False
        try:
            for event in self._conn.events():
                if isinstance(event, AcceptConnection):
                    upgraded = True
                elif isinstance(event, RejectConnection):
                    raise trio.BrokenResourceError(
                        f"ws: upgrade refused with HTTP {event.status_code}")
        except RemoteProtocolError as e:
            raise trio.BrokenResourceError(f"ws: {e}") from None
        return upgraded

    def _receive_frames(self, data: bytes | bytearray) -> None:
        """Frames from the server into the buffer; a ping is answered by the
        reader right away (`receive_some`), a close ends the stream."""
        try:
            payloads, controls = self._frames.feed(data)
        except WsFrameError as e:
            raise trio.BrokenResourceError(f"ws: {e}") from None
        self._received.extend(payloads)
        for opcode, payload in controls:
            if opcode == OP_CLOSE:
                self._eof = True
            elif opcode == OP_PING:
                self._pending_pong += self._conn.send(Pong(payload=payload))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._opened:
            early = memoryview(data)[:self.max_early_data] if self.max_early_data else b""
            await self.open(early)
            data = memoryview(data)[len(early):]
        async with self._send_lock:
            out = b""
            if self._pending_pong:
                out, self._pending_pong = self._pending_pong, b""
            if data:
                try:
                    out += self._conn.send(BytesMessage(data=bytes(data)))
                except LocalProtocolError as e:
                    raise trio.ClosedResourceError(f"ws: {e}") from None
            if out:
                await self.transport_stream.send_all(out)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._opened:
            await self.open()
        while not self._received:
            if self._eof:
                return b""
            data = await self.transport_stream.receive_some(READ_SIZE)
            if not data:
                self._eof = True
                return b""
            self._receive_frames(data)
            if self._pending_pong:
                await self.send_all(b"")
        return self._received.take(max_bytes)

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


# --- v2ray-http-upgrade ------------------------------------------------------


def http_upgrade_request(path: str, host: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: Upgrade",
             "Upgrade: websocket"]
    lines += [f"{k.decode()}: {v.decode()}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_upgrade_response(head: bytes) -> int | None:
    """The status code of the response head in `head`, or None if the head
    is not complete yet. BrokenResourceError if it is not HTTP."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line = head[:head.find(b"\r\n")].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") \
            or not status_line[1].isdigit():
        raise trio.BrokenResourceError("http-upgrade: the answer is not HTTP/1.1")
    return int(status_line[1])


async def open_http_upgrade(stream: trio.abc.Stream, ws: WsOptions, host: str
                            ) -> trio.abc.Stream:
    """v2ray's HTTP upgrade: one request, a 101, then raw bytes. Returns
    `stream` (or a ReplayStream if the answer came with tunnel bytes)."""
    path, _, _ = early_data_plan(ws)
    host, headers = host_header(ws.headers, host)
    await stream.send_all(http_upgrade_request(path, host, headers))
    buf = b""
    while True:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            raise trio.BrokenResourceError(
                "http-upgrade: the server closed the connection before answering")
        buf += data
        status = parse_upgrade_response(buf)
        if status is not None:
            break
        if len(buf) > MAX_RESPONSE_HEAD:
            raise trio.BrokenResourceError("http-upgrade: response head too long")
    if status != 101:
        raise trio.BrokenResourceError(f"http-upgrade: refused with HTTP {status}")
    rest = buf[buf.find(b"\r\n\r\n") + 4:]
    return ReplayStream(stream, rest) if rest else stream
