"""HTTP CONNECT client and proxy-request parser: scripted exchanges + fuzz."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.proto import http_connect as hc


def test_request_bytes_with_basic_auth() -> None:
    c = hc.HttpConnectClient("www.example.com", 443, username="u", password="p:w")
    req = c.request_bytes()
    assert req.startswith(b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\n")
    token = base64.b64encode(b"u:p:w").decode()
    assert f"Proxy-Authorization: Basic {token}\r\n".encode() in req
    assert req.endswith(b"\r\n\r\n")


def test_ipv6_target_is_bracketed() -> None:
    req = hc.HttpConnectClient(ipaddress.IPv6Address("2001:db8::1"), 80).request_bytes()
    assert req.startswith(b"CONNECT [2001:db8::1]:80 HTTP/1.1\r\n")
    assert b"Proxy-Authorization" not in req


def test_response_split_across_reads_keeps_tunnel_bytes() -> None:
    c = hc.HttpConnectClient("a.test", 80)
    assert c.receive_data(b"HTTP/1.0 200 Connection est") is None
    assert c.receive_data(b"ablished\r\nProxy-agent: x\r\n") is None
    resp = c.receive_data(b"\r\nSSH-2.0-banner")
    assert resp == hc.ConnectResponse(200, "Connection established", (("Proxy-agent", "x"),))
    assert c.trailing_data == b"SSH-2.0-banner"


def test_head_length_for_peeking() -> None:
    c = hc.HttpConnectClient("a.test", 80)
    buf = b"HTTP/1.1 200 OK\r\n\r\nrest"
    assert c.head_length(buf) == len(buf) - 4
    assert c.head_length(buf[:10]) is None


@pytest.mark.parametrize("status", [403, 407, 502])
def test_refusal_raises_with_status(status: int) -> None:
    c = hc.HttpConnectClient("a.test", 80)
    with pytest.raises(hc.HttpConnectError) as e:
        c.receive_data(f"HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\n\r\n".encode())
    assert e.value.status == status


def test_garbage_and_eof_and_oversize() -> None:
    with pytest.raises(hc.HttpConnectError):
        hc.HttpConnectClient("a.test", 80).receive_data(b"SSH-2.0\r\n\r\n")
    with pytest.raises(hc.HttpConnectError, match="closed"):
        hc.HttpConnectClient("a.test", 80).receive_data(b"")
    c = hc.HttpConnectClient("a.test", 80, max_head=100)
    with pytest.raises(hc.HttpConnectError, match="longer"):
        c.receive_data(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200)


def test_parse_connect_request() -> None:
    buf = (
        b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n"
        b"Proxy-Authorization: Basic dTpw\r\n\r\nTLS"
    )
    found = hc.parse_request(buf)
    assert found is not None
    req, end = found
    assert (req.method, req.host, req.port, req.path) == ("CONNECT", "::1", 8443, "")
    assert req.credentials() == ("u", "p")
    assert buf[end:] == b"TLS"


def test_parse_absolute_uri() -> None:
    buf = (
        b"GET http://Example.COM/a?b=1 HTTP/1.1\r\nHost: example.com\r\n"
        b"Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n"
    )
    found = hc.parse_request(buf)
    assert found is not None
    req, _ = found
    assert (req.host, req.port, req.path) == ("example.com", 80, "/a?b=1")


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT example.com HTTP/1.1",  # no port
        b"CONNECT example.com:0 HTTP/1.1",
        b"CONNECT example.com:99999 HTTP/1.1",
        b"CONNECT [zz]:1 HTTP/1.1",
        b"GET /relative HTTP/1.1",
        b"GET ftp://x/ HTTP/1.1",
        b"GET http://u@x/ HTTP/1.1",
        b"GET  http://x/ HTTP/1.1",
    ],
)
def test_bad_requests_are_400(line: bytes) -> None:
    with pytest.raises(hc.HttpConnectError) as e:
        hc.parse_request(line + b"\r\n\r\n")
    assert e.value.status == 400


def test_header_smuggling_shapes_refused() -> None:
    for head in (b"X: a\nY: b", b" folded: x", b"Bad Name: x", b"NoColon"):
        with pytest.raises(hc.HttpConnectError):
            hc.parse_request(b"CONNECT a:1 HTTP/1.1\r\n" + head + b"\r\n\r\n")


def test_request_head_bound_is_431() -> None:
    with pytest.raises(hc.HttpConnectError) as e:
        hc.parse_request(b"CONNECT a:1 HTTP/1.1\r\nX: " + b"a" * 5000, max_head=1024)
    assert e.value.status == 431


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_parse_request(data: bytes) -> None:
    try:
        hc.parse_request(data, max_head=200)
    except hc.HttpConnectError:
        pass


@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda a, b: b"HTTP/1.1 " + a + b"\r\n" + b + b"\r\n\r\n",
            st.binary(max_size=20),
            st.binary(max_size=60),
        ),
    )
)
def test_fuzz_client_response(data: bytes) -> None:
    c = hc.HttpConnectClient("a.test", 80, max_head=200)
    try:
        c.receive_data(data)
        c.head_length(data)
    except hc.HttpConnectError:
        pass


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_fuzz_parse_authority(text: str) -> None:
    try:
        host, port = hc.parse_authority(text, 80)
    except hc.HttpConnectError:
        return
    assert 0 < port <= 65535 and host


names = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?\Z")


@settings(max_examples=200, deadline=None)
@given(host=st.one_of(names, st.ip_addresses()), port=st.integers(1, 65535))
def test_client_request_parses_on_the_server_side(host: object, port: int) -> None:
    assert isinstance(host, str | ipaddress.IPv4Address | ipaddress.IPv6Address)
    wire = hc.HttpConnectClient(host, port).request_bytes()
    found = hc.parse_request(wire)
    assert found is not None
    req, end = found
    assert end == len(wire)
    assert (req.host, req.port) == (str(host), port)
