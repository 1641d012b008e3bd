"""DNS-over-HTTPS (RFC 8484) messages without I/O: DNS wire bytes in, an HTTP
request description out; an HTTP response in, DNS wire bytes out.

The transport (`upstream.py`) sends what `encode_request` describes with httpx
and hands the response's status, content type and body to `decode_response`.
Nothing here imports trio or httpx. Every malformed response raises
`DohError`, the one failure of this module.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

DNS_MESSAGE = "application/dns-message"
# A DNS message is at most 65535 octets (RFC 8484 section 6 / RFC 1035 TCP framing).
MAX_MESSAGE = 65535
_HEADER_LEN = 12

Method = Literal["GET", "POST"]


class DohError(Exception):
    """The DoH response is not a usable DNS message (status, media type, body)."""


@dataclass(frozen=True)
class DohRequest:
    """What to send: `target` is the path (plus `?dns=` for GET) to append to
    the server's origin; `body` is empty for GET."""

    method: Method
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def b64url_encode(wire: bytes) -> str:
    """base64url without padding, as RFC 8484 section 4.1 requires for `dns=`."""
    return base64.urlsafe_b64encode(wire).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of `b64url_encode` (accepts missing padding)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def with_zero_id(wire: bytes) -> bytes:
    """The query with DNS ID 0: RFC 8484 section 4.1 asks DoH clients to use
    ID 0 so identical GET requests are HTTP-cache friendly. The transport
    restores the caller's ID on the reply."""
    if len(wire) < _HEADER_LEN:
        raise ValueError("DNS message shorter than its header")
    return b"\x00\x00" + wire[2:]


def encode_request(wire: bytes, path: str = "/dns-query", method: Method = "POST") -> DohRequest:
    """Describe the HTTP request carrying the DNS query `wire` to `path`.

    POST sends the message as the body; GET sends it base64url-encoded in
    the `dns` query parameter (appended with `&` if `path` already has a
    query string, as for URI templates with fixed parameters).
    """
    if len(wire) > MAX_MESSAGE:
        raise ValueError("DNS message longer than 65535 octets")
    if method == "POST":
        headers = (("accept", DNS_MESSAGE), ("content-type", DNS_MESSAGE))
        return DohRequest("POST", path, headers, wire)
    separator = "&" if "?" in path else "?"
    target = f"{path}{separator}dns={quote(b64url_encode(wire), safe='-_')}"
    return DohRequest("GET", target, (("accept", DNS_MESSAGE),), b"")


def decode_response(status: int, content_type: str | None, body: bytes) -> bytes:
    """The DNS message carried by a DoH response, or DohError.

    RFC 8484 section 4.2.1: a DNS answer (even SERVFAIL or NXDOMAIN) comes with
    2xx; any other status means the server did not answer the query.
    """
    if not 200 <= status < 300:
        raise DohError(f"HTTP status {status}")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != DNS_MESSAGE:
        raise DohError(f"unexpected content type {content_type!r}")
    if len(body) < _HEADER_LEN:
        raise DohError(f"body of {len(body)} octets is no DNS message")
    if len(body) > MAX_MESSAGE:
        raise DohError("body longer than a DNS message")
    (flags,) = struct.unpack_from("!H", body, 2)
    if not flags & 0x8000:
        raise DohError("body is a DNS query, not a response")
    return body
