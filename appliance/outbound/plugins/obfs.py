"""simple-obfs (`plugin: obfs`), client side: the Shadowsocks stream
disguised as an HTTP websocket upgrade (`mode: http`) or as a TLS 1.2
session (`mode: tls`), byte-compatible with simple-obfs 0.0.5's obfs-local.

http: the first write goes as the body of a `GET / HTTP/1.1` with
`Upgrade: websocket` and `Host: host[:port]`; the server's `101` head is
stripped from the first bytes it sends; everything after is the raw stream.

tls: the first write rides in the session-ticket extension of a
ClientHello (SNI = host); later writes are TLS application-data records
(at most 16 KiB each, the server's limit). The server answers ServerHello,
ChangeCipherSpec and a handshake record whose body is its first payload,
then application-data records. Nothing is encrypted by this layer: the
Shadowsocks AEAD inside is the protection; this only shapes the bytes.

`ObfsHttp` and `ObfsTls` are the sans-I/O cores (`wrap(data)` -> bytes to
send, `unwrap(data)` -> payload received); `ObfsStream` puts one on a
stream. Malformed server bytes raise `ObfsError`.
"""

from __future__ import annotations

import base64
import os
import random
import struct
import time

import trio

MAX_TLS_FRAME = 16384
_APP_DATA = b"\x17\x03\x03"
# ServerHello record (5 + 91), ChangeCipherSpec record (6), then the header
# of the handshake record that carries the first payload (5).
_SERVER_HELLO = 96
_CCS = 6
_CIPHER_SUITES = bytes.fromhex(
    "c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00a"
    "c0140039c009c0130033009d009c003d003c0035002f00ff")
_OTHER_EXTENSIONS = bytes.fromhex(
    "000b000403010002"  # ec_point_formats
    "000a000a0008001d001700190018"  # supported groups
    "000d0020001e060106020603050105020503040104020403030103020303"
    "020102020203"  # signature algorithms
    "00160000"  # encrypt_then_mac
    "00170000")  # extended_master_secret


class ObfsError(Exception):
    """The server's bytes are not what an obfs-server sends."""


class ObfsHttp:
    """`mode: http`: see the module doc."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host if port == 80 else f"{host}:{port}"
        self._sent = False
        self._head = bytearray()
        self._in_head = True

    def wrap(self, data: bytes) -> bytes:
        if self._sent:
            return data
        self._sent = True
        key = base64.b64encode(os.urandom(16)).decode()
        head = (f"GET / HTTP/1.1\r\nHost: {self.host}\r\n"
                f"User-Agent: curl/7.{random.randrange(51)}.{random.randrange(2)}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nContent-Length: {len(data)}\r\n\r\n")
        return head.encode() + data

    def unwrap(self, data: bytes) -> bytes:
        if not self._in_head:
            return data
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > 4096:
                raise ObfsError("no end of the obfs-http response head in 4 KiB")
            return b""
        if not self._head.startswith(b"HTTP/1.1 101"):
            raise ObfsError(f"obfs-http: server answered {bytes(self._head[:24])!r}")
        self._in_head = False
        rest = bytes(self._head[end + 4:])
        self._head = bytearray()
        return rest


class ObfsTls:
    """`mode: tls`: see the module doc."""

    def __init__(self, host: str) -> None:
        self.host = host.encode("idna")
        self._sent = False
        self._buf = bytearray()
        self._hello_done = False
        self._left = 0  # payload bytes still due in the current record

    def wrap(self, data: bytes) -> bytes:
        if self._sent:
            return self._records(data)
        self._sent = True
        first, rest = data[:0xFFFF - 512], data[0xFFFF - 512:]
        return self._client_hello(first) + (self._records(rest) if rest else b"")

    @staticmethod
    def _records(data: bytes) -> bytes:
        parts = []
        for i in range(0, len(data), MAX_TLS_FRAME):
            piece = data[i:i + MAX_TLS_FRAME]
            parts.append(_APP_DATA + len(piece).to_bytes(2, "big") + piece)
        return b"".join(parts)

    def _client_hello(self, payload: bytes) -> bytes:
        host = self.host
        ticket = struct.pack(">HH", 0x0023, len(payload)) + payload
        sni = struct.pack(">HHHBH", 0, len(host) + 5, len(host) + 3, 0, len(host)) + host
        extensions = ticket + sni + _OTHER_EXTENSIONS
        body = (b"\x03\x03" + struct.pack(">I", int(time.time())) + os.urandom(28)
                + b"\x20" + os.urandom(32)
                + len(_CIPHER_SUITES).to_bytes(2, "big") + _CIPHER_SUITES
                + b"\x01\x00" + len(extensions).to_bytes(2, "big") + extensions)
        handshake = b"\x01\x00" + len(body).to_bytes(2, "big") + body
        return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake

    def unwrap(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        out = []
        if not self._hello_done:
            if len(buf) < _SERVER_HELLO + _CCS + 5:
                return b""
            if buf[0] != 0x16 or buf[_SERVER_HELLO] != 0x14:
                raise ObfsError("obfs-tls: the server did not answer with a ServerHello")
            self._left = int.from_bytes(buf[_SERVER_HELLO + _CCS + 3:_SERVER_HELLO + _CCS + 5],
                                        "big")
            del buf[:_SERVER_HELLO + _CCS + 5]
            self._hello_done = True
        while buf:
            if self._left:
                take = min(self._left, len(buf))
                out.append(bytes(buf[:take]))
                del buf[:take]
                self._left -= take
                continue
            if len(buf) < 5:
                break
            if buf[:3] != _APP_DATA:
                raise ObfsError("obfs-tls: not an application-data record")
            self._left = int.from_bytes(buf[3:5], "big")
            del buf[:5]
        return b"".join(out)


class ObfsStream(trio.abc.HalfCloseableStream):
    """`transport_stream` seen through an obfs core. Owns the stream."""

    def __init__(self, transport_stream: trio.abc.Stream, core: ObfsHttp | ObfsTls) -> None:
        self.transport_stream = transport_stream
        self.core = core

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            data = await self.transport_stream.receive_some(max_bytes or 65536)
            if not data:
                return b""
            try:
                out = self.core.unwrap(bytes(data))
            except ObfsError as e:
                raise trio.BrokenResourceError(str(e)) from None
            if out:
                return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(self.core.wrap(bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
            await self.transport_stream.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
