"""The forward proxy's message logic (appliance/proto/http_proxy.py), without
sockets: origin-form heads, hop-by-hop fields, request body framing (with
hypothesis for the framer), error responses."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.proto.http_connect import HttpConnectError, ProxyRequest, parse_request
from appliance.proto.http_proxy import (
    CONNECT_OK,
    PROXY_AUTH_REQUIRED,
    BodyFramer,
    forwarding,
    http_error,
    origin_request,
)

# ------------------------------------------------------------------ forwarding head


def request(raw: bytes) -> ProxyRequest:
    parsed = parse_request(raw)
    assert parsed is not None
    return parsed[0]


def test_origin_request_rewrites_line_host_and_hop_by_hop() -> None:
    req = request(
        b"POST http://www.alpha.test:8080/p?q=1 HTTP/1.1\r\n"
        b"Host: evil.test\r\n"
        b"Proxy-Authorization: Basic dTpw\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"X-Secret: drop me\r\n"
        b"TE: trailers\r\n"
        b"Content-Length: 3\r\n"
        b"User-Agent: t\r\n\r\n"
    )
    head, upgrade = origin_request(req)
    assert not upgrade
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /p?q=1 HTTP/1.1"
    assert lines[1] == "Host: www.alpha.test:8080"
    assert "Content-Length: 3" in lines and "User-Agent: t" in lines
    assert "Connection: close" in lines
    text = head.decode().lower()
    for gone in ("proxy-", "keep-alive", "x-secret", "te:", "evil.test"):
        assert gone not in text, gone
    assert head.endswith(b"\r\n\r\n")


def test_origin_request_default_port_and_v6_host() -> None:
    head, _ = origin_request(request(b"GET http://www.beta.test/ HTTP/1.0\r\n\r\n"))
    assert head.startswith(b"GET / HTTP/1.0\r\nHost: www.beta.test\r\n")
    head, _ = origin_request(request(b"GET http://[fd57::10]/x HTTP/1.1\r\n\r\n"))
    assert b"\r\nHost: [fd57::10]\r\n" in head


def test_origin_request_keeps_an_upgrade() -> None:
    head, upgrade = origin_request(
        request(
            b"GET http://ws.test/chat HTTP/1.1\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n"
        )
    )
    assert upgrade
    assert b"Upgrade: websocket\r\n" in head and b"Connection: upgrade\r\n" in head
    assert b"Sec-WebSocket-Key: k" in head and b"close" not in head


# ----------------------------------------------------------------------- body framing


def framer(raw_head: bytes) -> BodyFramer:
    return BodyFramer.for_request(request(raw_head))


def test_framing_none_and_content_length() -> None:
    f = framer(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    assert f.done and f.feed(b"GET /next") == 0
    f = framer(b"POST http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
    assert not f.done
    assert f.feed(b"abc") == 3
    assert f.feed(b"deGET http://b.test/") == 2
    assert f.done


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 3\r\nContent-Length: 4\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 1e3\r\n",
        b"Transfer-Encoding: gzip\r\n",
    ],
)
def test_framing_refuses_ambiguous_requests(headers: bytes) -> None:
    with pytest.raises(HttpConnectError) as exc:
        framer(b"POST http://a.test/ HTTP/1.1\r\n" + headers + b"\r\n")
    assert exc.value.status == 400


CHUNKED = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n"


def chunked() -> BodyFramer:
    return framer(b"POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_chunked_body_whole_and_byte_by_byte() -> None:
    f = chunked()
    assert f.feed(CHUNKED + b"NEXT") == len(CHUNKED) and f.done
    f = chunked()
    total = sum(f.feed(CHUNKED[i : i + 1]) for i in range(len(CHUNKED)))
    assert total == len(CHUNKED) and f.done


@given(st.lists(st.integers(min_value=1, max_value=len(CHUNKED)), max_size=10))
def test_chunked_body_any_split(cuts: list[int]) -> None:
    f = chunked()
    points = sorted({0, len(CHUNKED), *cuts})
    consumed = sum(f.feed(CHUNKED[a:b]) for a, b in itertools.pairwise(points))
    assert consumed == len(CHUNKED) and f.done


@pytest.mark.parametrize("bad", [b"zz\r\n", b"4\nWiki", b"4\r\nWikiX\r\n", b"1" * 5000])
def test_chunked_malformed_is_400(bad: bytes) -> None:
    with pytest.raises(HttpConnectError) as exc:
        chunked().feed(bad)
    assert exc.value.status == 400


@given(st.binary(max_size=300))
def test_chunked_never_raises_anything_else(data: bytes) -> None:
    f = chunked()
    try:
        n = f.feed(data)
    except HttpConnectError:
        return
    assert 0 <= n <= len(data)


# ---------------------------------------------------------------------- forwarding


def test_forwarding_is_head_framer_and_upgrade() -> None:
    fwd = forwarding(request(b"POST http://a.test/x HTTP/1.1\r\nContent-Length: 2\r\n\r\n"))
    assert fwd.head.startswith(b"POST /x HTTP/1.1\r\nHost: a.test\r\n")
    assert not fwd.upgrade and not fwd.framer.done and fwd.framer.feed(b"abc") == 2
    fwd = forwarding(
        request(b"GET http://ws.test/ HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n")
    )
    assert fwd.upgrade
    with pytest.raises(HttpConnectError) as exc:
        forwarding(request(b"POST http://a.test/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"))
    assert exc.value.status == 400


# -------------------------------------------------------------------------- answers


def test_http_error_is_a_complete_closing_response() -> None:
    raw = http_error(502, "dial failed: no route\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 502 Bad Gateway"
    assert b"Connection: close" in lines
    assert b"Content-Length: %d" % len(body) in lines
    assert body == b"dial failed: no route\n"
    assert http_error(599, "x").startswith(b"HTTP/1.1 599 Error\r\n")


def test_fixed_answers() -> None:
    assert CONNECT_OK == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert PROXY_AUTH_REQUIRED.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Basic realm="mirage"' in PROXY_AUTH_REQUIRED
