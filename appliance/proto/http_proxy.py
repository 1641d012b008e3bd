"""The HTTP forward proxy's message logic, without I/O.

What this is for: the proxy ports (appliance/gateway/proxyport) serve HTTP
proxy requests parsed by `appliance.proto.http_connect.parse_request`. A
CONNECT becomes a tunnel; an absolute-URI request (`GET http://host/path`)
is forwarded to the origin, and this module says with which bytes:

- `origin_request`: the head to send, in origin-form (RFC 9112 section
  3.2.1), with hop-by-hop fields (RFC 9110 section 7.6.1) and the Proxy-*
  fields a proxy consumes removed and `Connection: close` added, so that
  one request is served per client connection (the response ends when the
  origin closes: no response parsing, and a pipelined second request can
  never reach the wrong origin). An `Upgrade` request (WebSocket) keeps its
  upgrade and becomes a two-way tunnel.
- `BodyFramer`: which of the client's bytes after the head are that
  request's body (RFC 9112 section 6.3), so no byte of a next request is
  ever relayed.
- `http_error` and the fixed answers (`CONNECT_OK`, `PROXY_AUTH_REQUIRED`).

Nothing here imports trio. How it fails: a request whose framing is
ambiguous or malformed raises `HttpConnectError` with status 400 (from
`BodyFramer.for_request` or `BodyFramer.feed`); nothing else escapes for bad
bytes (tests/unit/test_http_proxy.py holds the framer to that).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from appliance.proto.http_connect import (
    Headers,
    HttpConnectError,
    ProxyRequest,
    encode_response,
    format_authority,
)

REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def http_error(status: int, text: str, headers: Headers = ()) -> bytes:
    """A complete error response (plain-text body `text`); the connection
    closes after it, as its `Connection: close` says."""
    body = (text.rstrip() + "\n").encode("utf-8", "replace")
    head = encode_response(
        status,
        REASONS.get(status, "Error"),
        (
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *headers,
        ),
    )
    return head + body


PROXY_AUTH_REQUIRED = http_error(
    407, "proxy authentication required", (("Proxy-Authenticate", 'Basic realm="mirage"'),)
)
CONNECT_OK = encode_response(200, "Connection established")


# RFC 9110 section 7.6.1 hop-by-hop fields, plus the Proxy-* ones a proxy
# consumes. Transfer-Encoding stays: the body is relayed as received, so its
# framing must go with it.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)


def _values(headers: Headers, name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def _tokens(values: Iterable[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def origin_request(req: ProxyRequest) -> tuple[bytes, bool]:
    """The head to send to the origin for an absolute-URI request, and
    whether it is an upgrade (then the connection becomes a tunnel).

    Request line in origin-form; Host set to the request-target's authority
    (RFC 9112 section 3.2.2: a proxy replaces Host); hop-by-hop fields and
    the fields that `Connection` names are dropped; `Connection: close` is
    added, or `Connection: upgrade` + `Upgrade` for an upgrade request.
    """
    named = set(_tokens(_values(req.headers, "connection")))
    upgrade_to = _values(req.headers, "upgrade")
    upgrade = "upgrade" in named and bool(upgrade_to)
    drop = HOP_BY_HOP | named | {"host"}
    if req.port != 80:
        host = format_authority(req.host, req.port)
    else:
        host = f"[{req.host}]" if ":" in req.host else req.host
    lines = [f"{req.method} {req.path} HTTP/{req.version}", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in drop]
    if upgrade:
        lines += [f"Upgrade: {upgrade_to[0]}", "Connection: upgrade"]
    else:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), upgrade


_FramerState = Literal["size", "data", "crlf", "trailers", "done"]


class BodyFramer:
    """Which of the client's bytes after a request head are its body.

    RFC 9112 section 6.3 for requests: chunked if Transfer-Encoding ends in
    chunked, else Content-Length, else no body. `feed(data)` returns how many
    leading bytes of `data` belong to the body; once `done`, the rest is a
    next request, which this proxy does not serve (one request per
    connection). Malformed framing raises HttpConnectError(400). Bounded:
    a chunk-size or trailer line is at most MAX_LINE bytes, all trailers
    together MAX_TRAILERS.
    """

    MAX_LINE = 4096  # a chunk-size line with extensions, or a trailer line
    MAX_TRAILERS = 16 * 1024

    def __init__(self, *, length: int = 0, chunked: bool = False) -> None:
        self.chunked = chunked
        self._remaining = length
        self._line = b""
        self._trailers = 0
        self._state: _FramerState
        if chunked:
            self._state = "size"
        else:
            self._state = "data" if length > 0 else "done"

    @property
    def done(self) -> bool:
        return self._state == "done"

    @classmethod
    def for_request(cls, req: ProxyRequest) -> BodyFramer:
        """The framer for `req`'s body. Raises HttpConnectError(400) for
        framing a proxy must not guess at (both Transfer-Encoding and
        Content-Length, conflicting or bad lengths, a coding other than
        chunked last, chunked on HTTP/1.0)."""
        te = _tokens(_values(req.headers, "transfer-encoding"))
        cl = _values(req.headers, "content-length")
        if te:
            if cl:
                # Both: the classic request-smuggling shape; refuse it.
                raise HttpConnectError("both Transfer-Encoding and Content-Length", 400)
            if te[-1] != "chunked" or req.version == "1.0":
                raise HttpConnectError(f"unsupported Transfer-Encoding {te!r}", 400)
            return cls(chunked=True)
        if cl:
            values = {v.strip() for v in _tokens(cl)}
            if len(values) != 1:
                raise HttpConnectError("conflicting Content-Length values", 400)
            (text,) = values
            if not text.isascii() or not text.isdigit() or len(text) > 18:
                raise HttpConnectError(f"bad Content-Length {text[:20]!r}", 400)
            return cls(length=int(text))
        return cls()

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """How many leading bytes of `data` are body (the rest, if any, is
        not: the body ended inside `data`)."""
        buf = bytes(data)
        i, n = 0, len(buf)
        while i < n and self._state != "done":
            if self._state == "data":
                take = min(self._remaining, n - i)
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "crlf" if self.chunked else "done"
                continue
            j = buf.find(b"\n", i)
            end = n if j < 0 else j + 1
            self._line += buf[i:end]
            i = end
            if len(self._line) > self.MAX_LINE:
                raise HttpConnectError("chunked framing line too long", 400)
            if j >= 0:
                line, self._line = self._line, b""
                self._on_line(line)
        return i

    def _on_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise HttpConnectError("bare CR or LF in chunked framing", 400)
        body = line[:-2]
        if self._state == "size":
            size_text = body.split(b";", 1)[0].rstrip(b" \t")
            if (
                not size_text
                or len(size_text) > 16
                or not all(c in b"0123456789abcdefABCDEF" for c in size_text)
            ):
                raise HttpConnectError(f"bad chunk size {size_text[:20]!r}", 400)
            size = int(size_text, 16)
            if size == 0:
                self._state = "trailers"
            else:
                self._remaining = size
                self._state = "data"
        elif self._state == "crlf":
            if body:
                raise HttpConnectError("chunk data longer than its size", 400)
            self._state = "size"
        else:  # trailers
            if not body:
                self._state = "done"
                return
            self._trailers += len(line)
            if self._trailers > self.MAX_TRAILERS:
                raise HttpConnectError("chunked trailers too long", 400)


@dataclass(frozen=True)
class Forwarding:
    """How to forward one absolute-URI request: `head` goes to the origin
    first; without `upgrade`, `framer` says which client bytes follow it
    (the body) and the response ends when the origin closes; with
    `upgrade`, the connection becomes a two-way tunnel after the head."""

    head: bytes
    framer: BodyFramer
    upgrade: bool


def forwarding(req: ProxyRequest) -> Forwarding:
    """The `Forwarding` of an absolute-URI request. Raises
    HttpConnectError(400) for framing a proxy must not guess at."""
    framer = BodyFramer.for_request(req)
    head, upgrade = origin_request(req)
    return Forwarding(head, framer, upgrade)
