"""Hypothesis: every SOCKS5 parser either returns (None or a value) or raises
Socks5Error, for any bytes; encoders round-trip through the parsers, and every
proper prefix of a valid message parses as incomplete."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.proto import socks5 as s5

PARSERS: list[Callable[[bytes], Any]] = [
    s5.parse_greeting,
    s5.parse_method_selection,
    s5.parse_userpass,
    s5.parse_userpass_status,
    s5.parse_request,
    s5.parse_reply,
    s5.parse_udp,
    lambda b: s5.decode_address(b, 0),
    s5.reply_size_hint,
]

names = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?\Z").filter(lambda n: _not_ip(n))
hosts = st.one_of(
    names,
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
)
ports = st.integers(0, 65535)


def _not_ip(n: str) -> bool:
    try:
        ipaddress.ip_address(n)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_parsers_only_raise_socks5error(parse: Callable[[bytes], Any], data: bytes) -> None:
    try:
        parse(data)
    except s5.Socks5Error:
        pass


@settings(max_examples=200, deadline=None)
@given(cmd=st.sampled_from([1, 2, 3]), host=hosts, port=ports)
def test_request_roundtrip_and_prefixes(cmd: int, host: s5.Host, port: int) -> None:
    wire = s5.encode_request(cmd, host, port)
    assert s5.parse_request(wire + b"x") == (s5.Request(cmd, host, port), len(wire))
    for i in range(len(wire)):
        assert s5.parse_request(wire[:i]) is None


@settings(max_examples=200, deadline=None)
@given(rep=st.integers(0, 255), host=hosts, port=ports)
def test_reply_roundtrip_and_size_hint(rep: int, host: s5.Host, port: int) -> None:
    wire = s5.encode_reply(rep, host, port)
    assert s5.parse_reply(wire) == (s5.Reply(rep, host, port), len(wire))
    for i in range(len(wire)):
        assert s5.parse_reply(wire[:i]) is None
        # The hint never asks past the end of the reply.
        assert 0 < s5.reply_size_hint(wire[:i]) <= len(wire) - i
    assert s5.reply_size_hint(wire) == 0


@settings(max_examples=200, deadline=None)
@given(host=hosts, port=ports, payload=st.binary(max_size=64), frag=st.integers(0, 255))
def test_udp_roundtrip(host: s5.Host, port: int, payload: bytes, frag: int) -> None:
    assert s5.parse_udp(s5.encode_udp(host, port, payload, frag)) == s5.UdpDatagram(
        host, port, payload, frag
    )


@settings(max_examples=200, deadline=None)
@given(
    user=st.text(min_size=1, max_size=30).filter(lambda u: 0 < len(u.encode()) <= 255),
    pw=st.text(min_size=1, max_size=30).filter(lambda u: 0 < len(u.encode()) <= 255),
)
def test_userpass_roundtrip(user: str, pw: str) -> None:
    wire = s5.encode_userpass(user, pw)
    assert s5.parse_userpass(wire) == (user, pw, len(wire))
    for i in range(len(wire)):
        assert s5.parse_userpass(wire[:i]) is None


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=6), auth=st.booleans(),
       pipeline=st.booleans())
def test_client_state_machine_only_raises_socks5error(
        chunks: list[bytes], auth: bool, pipeline: bool) -> None:
    c = s5.Socks5Client("a.test", 80, username="u" if auth else None, password="p",
                        pipeline=pipeline)
    try:
        for chunk in chunks:
            c.receive_data(chunk)
            c.data_to_send()
            c.bytes_wanted()
    except s5.Socks5Error:
        pass


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=6), auth=st.booleans())
def test_server_state_machine_only_raises_socks5error(chunks: list[bytes], auth: bool) -> None:
    srv = s5.Socks5Server(require_auth=auth)
    try:
        for chunk in chunks:
            ev = srv.receive_data(chunk)
            if isinstance(ev, s5.AuthRequest):
                srv.auth_result(ev.password == "p")
            srv.data_to_send()
    except s5.Socks5Error:
        pass


@settings(max_examples=300, deadline=None)
@given(host=hosts, port=st.integers(0, 65535), auth=st.booleans(), pipeline=st.booleans(),
       tunnel=st.binary(min_size=1, max_size=20))
def test_client_reading_bytes_wanted_never_takes_tunnel_bytes(
        host: s5.Host, port: int, auth: bool, pipeline: bool, tunnel: bytes) -> None:
    # Whatever address the reply carries, pipelined or not: reading exactly
    # bytes_wanted() each time ends the handshake on the reply's last byte.
    c = s5.Socks5Client("a.test", 80, username="u" if auth else None, password="p",
                        pipeline=pipeline)
    server = (b"\x05\x02\x01\x00" if auth else b"\x05\x00") + s5.encode_reply(0, host, port)
    wire = server + tunnel
    pos = 0
    while not c.established:
        n = c.bytes_wanted()
        assert n >= 1 and pos + n <= len(server)
        c.receive_data(wire[pos:pos + n])
        pos += n
    assert pos == len(server) and c.trailing_data == b""
