"""HTTP CONNECT tunnels (RFC 9110 section 9.3.6), without I/O.

What this is for: the HTTP outbound (client side: build the CONNECT request,
parse the proxy's response head) and the proxy ports (server side: parse a
CONNECT or absolute-URI proxy request; appliance/gateway/proxyport, with
the forwarding rules in appliance/proto/http_proxy.py). Nothing here
imports trio.

The head of a message ends at the first CRLFCRLF; heads longer than
`max_head` bytes are refused, so a peer cannot make us buffer without bound.
Bytes after the head are returned untouched: after a 2xx CONNECT response
they are the first bytes of the tunnel.

How it fails: every malformed or refused input raises `HttpConnectError`
(`status` is the proxy's status code for a refusal, or the status a server
should answer for a bad request). Nothing else escapes for bad bytes; the
fuzz tests hold the parsers to that.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_MAX_HEAD = 16 * 1024
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_STATUS_LINE = re.compile(rb"^HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?\Z")
_REQUEST_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) HTTP/1\.([01])\Z")


class HttpConnectError(Exception):
    """An HTTP proxy exchange failed. `status` is the proxy's non-2xx status,
    or, for a malformed message, the status a server should answer (400,
    431 for an over-long head); 502 when the proxy's own answer is garbage."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


Headers = tuple[tuple[str, str], ...]


def _header_value(headers: Headers, name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def split_head(buf: bytes | bytearray, max_head: int, status: int) -> tuple[bytes, int] | None:
    """Find the end of a message head. Returns (head without the final CRLFCRLF,
    offset of the first byte after it) or None if incomplete; raises when the
    head exceeds `max_head` bytes."""
    end = buf.find(b"\r\n\r\n", 0, max_head + 4)
    if end < 0:
        if len(buf) >= max_head + 4:
            raise HttpConnectError(f"message head longer than {max_head} bytes", status)
        return None
    return bytes(buf[:end]), end + 4


def _parse_headers(lines: list[bytes], status: int) -> Headers:
    out: list[tuple[str, str]] = []
    for line in lines:
        if b"\r" in line or b"\n" in line:
            # A bare CR or LF inside a head is how request smuggling starts.
            raise HttpConnectError("bare CR or LF in a header line", status)
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            # Includes obs-fold (a line starting with whitespace): RFC 9112
            # lets a proxy reject it, and accepting it invites smuggling.
            raise HttpConnectError(f"malformed header line {line[:40]!r}", status)
        out.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return tuple(out)


def format_authority(host: str | IPAddress, port: int) -> str:
    """host:port with IPv6 literals in brackets (RFC 9112 authority-form)."""
    if isinstance(host, ipaddress.IPv6Address) or (isinstance(host, str) and ":" in host):
        return f"[{str(host).strip('[]')}]:{port}"
    return f"{host}:{port}"


def parse_authority(text: str, default_port: int | None, status: int = 400) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port). The host comes back
    without brackets and lower-cased; raises HttpConnectError."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise HttpConnectError(f"bad authority {text!r}", status)
        host, rest = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HttpConnectError(f"bad IPv6 literal in {text!r}", status) from None
        if rest and not rest.startswith(":"):
            raise HttpConnectError(f"bad authority {text!r}", status)
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise HttpConnectError(f"authority {text!r} has no port", status)
        port = default_port
    else:
        if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
            raise HttpConnectError(f"bad port in {text!r}", status)
        port = int(port_text)
    if not 0 < port <= 0xFFFF:
        raise HttpConnectError(f"port out of range in {text!r}", status)
    if not host or not host.isascii() or not host.isprintable() or any(c in host for c in " /@?#"):
        raise HttpConnectError(f"bad host in {text!r}", status)
    return host.lower(), port


# ---------------------------------------------------------------------------
# Client side


def basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


@dataclass(frozen=True)
class ConnectResponse:
    status: int
    reason: str
    headers: Headers


class HttpConnectClient:
    """One CONNECT exchange over a fresh connection to the proxy.

    Use: send `request_bytes()`, then feed what the proxy sends to
    `receive_data()` until it returns a ConnectResponse; `trailing_data` then
    holds the bytes after the head, which belong to the tunnel. Only 2xx is
    success; anything else raises HttpConnectError with the status (407 means
    the credentials were missing or refused). Owns no resources.
    """

    def __init__(
        self,
        host: str | IPAddress,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        max_head: int = DEFAULT_MAX_HEAD,
        user_agent: str = "mirage",
    ) -> None:
        if not 0 < port <= 0xFFFF:
            raise HttpConnectError(f"port out of range: {port}", 400)
        host_text = str(host)
        if not host_text.isascii() or not host_text.isprintable() or " " in host_text:
            raise HttpConnectError(f"bad host {host_text!r}", 400)
        authority = format_authority(host, port)
        lines = [
            f"CONNECT {authority} HTTP/1.1",
            f"Host: {authority}",
            f"User-Agent: {user_agent}",
            "Proxy-Connection: keep-alive",
        ]
        if username is not None:
            lines.append(f"Proxy-Authorization: {basic_auth(username, password or '')}")
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._max_head = max_head
        self._in = bytearray()
        self.response: ConnectResponse | None = None
        self.trailing_data = b""
        # Bytes fed so far: 0 means the proxy has not said anything yet.
        self.received = 0

    def request_bytes(self) -> bytes:
        return self._request

    def receive_data(self, data: bytes | bytearray) -> ConnectResponse | None:
        """Feed bytes from the proxy (empty = EOF). Returns the response once
        its head is complete; raises HttpConnectError for a refusal or garbage."""
        self.received += len(data)
        if self.response is not None:
            self.trailing_data += data
            return self.response
        if not data:
            raise HttpConnectError("proxy closed the connection before answering CONNECT")
        self._in += data
        return self._try_parse()

    def head_length(self, buf: bytes | bytearray) -> int | None:
        """Length of the complete response head at the start of `buf`, or None.
        For callers that peek at a socket (MSG_PEEK) and then read exactly the
        head, leaving the tunnel bytes in the kernel."""
        found = split_head(buf, self._max_head, 502)
        return None if found is None else found[1]

    def _try_parse(self) -> ConnectResponse | None:
        found = split_head(self._in, self._max_head, 502)
        if found is None:
            return None
        head, end = found
        resp = parse_response_head(head)
        if not 200 <= resp.status < 300:
            raise HttpConnectError(
                f"proxy answered CONNECT with {resp.status} {resp.reason}".rstrip(), resp.status
            )
        self.response = resp
        self.trailing_data = bytes(self._in[end:])
        self._in.clear()
        return resp


def parse_response_head(head: bytes) -> ConnectResponse:
    """Status line and headers (without the final CRLFCRLF)."""
    lines = head.split(b"\r\n")
    m = _STATUS_LINE.match(lines[0])
    if m is None:
        raise HttpConnectError(f"malformed status line {lines[0][:60]!r}")
    return ConnectResponse(
        int(m.group(2)), (m.group(3) or b"").decode("latin-1"), _parse_headers(lines[1:], 502)
    )


# ---------------------------------------------------------------------------
# Server side


@dataclass(frozen=True)
class ProxyRequest:
    """A request received by an HTTP proxy.

    `method` CONNECT: `host`/`port` are the tunnel target, `path` is "".
    Any other method: the request-target was absolute-form
    (`http://host[:port]/path`), `path` is the origin-form to forward.
    `headers` are as received (`appliance.proto.http_proxy.origin_request`
    rewrites them for forwarding).
    """

    method: str
    host: str
    port: int
    path: str
    version: str
    headers: Headers = field(default=())

    def header(self, name: str) -> str | None:
        return _header_value(self.headers, name)

    def credentials(self) -> tuple[str, str] | None:
        """(username, password) from Proxy-Authorization: Basic, or None."""
        value = self.header("proxy-authorization")
        if value is None:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        user, sep, pw = text.partition(":")
        return (user, pw) if sep else None


def parse_request(
    buf: bytes | bytearray, max_head: int = DEFAULT_MAX_HEAD
) -> tuple[ProxyRequest, int] | None:
    """Parse a proxy request head at the start of `buf`.

    Returns (request, offset of the first byte after the head) or None while
    incomplete. Raises HttpConnectError with status 400 (malformed, or a
    non-http absolute URI), 431 (head too long).
    """
    found = split_head(buf, max_head, 431)
    if found is None:
        return None
    head, end = found
    lines = head.split(b"\r\n")
    m = _REQUEST_LINE.match(lines[0])
    if m is None:
        raise HttpConnectError(f"malformed request line {lines[0][:60]!r}", 400)
    method = m.group(1).decode("ascii")
    target = m.group(2).decode("latin-1")
    version = "1." + m.group(3).decode("ascii")
    headers = _parse_headers(lines[1:], 400)
    if method == "CONNECT":
        host, port = parse_authority(target, None)
        path = ""
    else:
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() != "http":
            raise HttpConnectError(f"not an absolute http URI: {target[:60]!r}", 400)
        slash = rest.find("/")
        authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
        if "@" in authority:
            raise HttpConnectError("userinfo in the request target is not allowed", 400)
        host, port = parse_authority(authority, 80)
    return ProxyRequest(method, host, port, path, version, headers), end


def encode_response(status: int, reason: str, headers: Headers = ()) -> bytes:
    """A response head a proxy sends (e.g. 200 Connection established)."""
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
