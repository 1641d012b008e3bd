"""The `http` transport (mihomo `network: http`, v2ray's TCP "http"
header): the stream is disguised as one HTTP/1.1 exchange. The first
write goes out behind a request head (`http-opts`: method, a path and
each header's value chosen at random, `Content-Length` of that first
write, as mihomo sends it), the first read skips the server's response
head; after that the bytes are the protocol's.

`request_head` and `ResponseHeadSkipper` are the sans-I/O parts;
`HttpObfsStream` applies them. A server that closes before its head is
complete, or answers with something that is not HTTP/1.x, raises
trio.BrokenResourceError. Owns the stream it wraps.
"""

from __future__ import annotations

import random

import trio

from appliance.config.protocols.common import HttpOptions

READ_SIZE = 1 << 16
MAX_RESPONSE_HEAD = 16 << 10


def request_head(opts: HttpOptions, host: str, body_length: int,
                 choose: random.Random | None = None) -> bytes:
    """The request head (method, random path, Host, the configured headers,
    Content-Length). `host` is used unless the headers carry a Host."""
    pick = (choose or random).choice
    path = pick(opts.paths) if opts.paths else "/"
    headers: dict[str, str] = {}
    for key, values in opts.headers:
        if values:
            headers[key] = pick(values)
    host = next((v for k, v in headers.items() if k.lower() == "host"), host)
    lines = [f"{opts.method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()
              if k.lower() not in ("host", "content-length")]
    lines.append(f"Content-Length: {body_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ResponseHeadSkipper:
    """Eats the response head; `feed` returns the bytes after it (b"" while
    the head is incomplete) and `done` says when it was seen."""

    def __init__(self) -> None:
        self._buf = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._buf += data
        if len(self._buf) >= 5 and not self._buf.startswith(b"HTTP/"):
            raise trio.BrokenResourceError("http: the server's answer is not HTTP")
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_RESPONSE_HEAD:
                raise trio.BrokenResourceError("http: response head too long")
            return b""
        self.done = True
        rest, self._buf = self._buf[end + 4:], b""
        return rest


class HttpObfsStream(trio.abc.Stream):
    """See the module doc."""

    def __init__(self, stream: trio.abc.Stream, opts: HttpOptions, host: str) -> None:
        self.transport_stream = stream
        self._opts = opts
        self._host = host
        self._sent_head = False
        self._skipper = ResponseHeadSkipper()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._sent_head:
            self._sent_head = True
            data = request_head(self._opts, self._host, len(data)) + bytes(data)
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while not self._skipper.done:
            data = await self.transport_stream.receive_some(READ_SIZE)
            if not data:
                raise trio.BrokenResourceError(
                    "http: the server closed the connection before its response head")
            rest = self._skipper.feed(bytes(data))
            if rest:
                return rest
        return await self.transport_stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
