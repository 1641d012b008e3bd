"""The proxy ports' handshake without sockets (appliance/gateway/proxyport/
handshake.py): sniffing, credentials, the refusal vocabulary, scripted
SOCKS5 and HTTP exchanges (bytes in, events and bytes out), and hypothesis
for the parser: any bytes, split anywhere, end in the same event and never
raise."""

from __future__ import annotations

import base64
import ipaddress
import itertools
import logging
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.gateway.proxyport.handshake import (
    NEED_MORE,
    SOCKS4_REJECT,
    Ask,
    Authenticator,
    Event,
    Handshake,
    NeedMore,
    Refusal,
    Refuse,
    UdpAssociate,
    classify_dial_error,
    sniff,
)
from appliance.proto import socks5 as s5
from appliance.proto.http_proxy import CONNECT_OK

ALICE = Authenticator([("alice", "s3cret")])
GREETING = s5.encode_greeting(b"\x00")
USERPASS = s5.encode_greeting(b"\x00\x02")


def drive(hs: Handshake, chunks: Iterable[bytes]) -> tuple[Event, bytes, int]:
    """Feed `chunks` as a service would: (the last event, every byte the
    client was sent, how many bytes were fed before that event)."""
    sent, fed = b"", 0
    for chunk in chunks:
        if not chunk:
            continue
        event = hs.receive_data(chunk)
        fed += len(chunk)
        if isinstance(event, Refuse):
            return event, sent + event.reply, fed
        sent += hs.data_to_send()
        if not isinstance(event, NeedMore):
            return event, sent, fed
    return NEED_MORE, sent, fed


# --------------------------------------------------------------- sniff and credentials


def test_sniff_by_first_byte() -> None:
    assert sniff(0x05) == "socks5"
    assert sniff(0x04) == "socks4"
    for first in b"GCPHDOT\x00\x16\xff":
        assert sniff(first) == "http"


def test_authenticator() -> None:
    assert not Authenticator().required
    auth = Authenticator([("alice", "s3cret"), ("bob", "pa:ss")])
    assert auth.required
    assert auth.check("alice", "s3cret")
    assert auth.check("bob", "pa:ss")
    assert not auth.check("alice", "pa:ss")
    assert not auth.check("alice", "")
    assert not auth.check("carol", "s3cret")
    assert not auth.check("", "")


def test_dial_errors_map_to_refusals() -> None:
    assert classify_dial_error("rejected") == "rejected"
    assert classify_dial_error("connect to 1.2.3.4 port 80 failed: Connection refused") == "refused"
    assert classify_dial_error("DIRECT x:80: timed out after 5s") == "timeout"
    assert classify_dial_error("no connection within 5s") == "timeout"
    assert classify_dial_error("cannot resolve x.test: NXDOMAIN") == "unreachable"


# ---------------------------------------------------------------------------- SOCKS5


def test_socks5_connect_step_by_step() -> None:
    hs = Handshake()
    assert hs.receive_data(GREETING) == NEED_MORE
    assert hs.data_to_send() == b"\x05\x00"
    ask = hs.receive_data(s5.encode_request(s5.CMD_CONNECT, "www.alpha.test", 443))
    assert ask == Ask("www.alpha.test", 443, "connect")
    assert hs.data_to_send() == b"" and hs.reply_names_address
    assert hs.accept("10.0.0.1", 5555) == s5.encode_reply(0, "10.0.0.1", 5555)


def test_socks5_pipelined_with_tunnel_bytes() -> None:
    raw = GREETING + s5.encode_request(s5.CMD_CONNECT, "x.test", 7) + b"early"
    event, sent, _ = drive(Handshake(), [raw])
    assert event == Ask("x.test", 7, "connect", rest=b"early")
    assert sent == b"\x05\x00"


def test_socks5_ip_targets_come_as_addresses() -> None:
    raw = GREETING + s5.encode_request(s5.CMD_CONNECT, "198.18.0.7", 80)
    event, _, _ = drive(Handshake(), [raw])
    assert isinstance(event, Ask) and event.host == ipaddress.IPv4Address("198.18.0.7")


def test_socks5_auth() -> None:
    request = s5.encode_request(s5.CMD_CONNECT, "x.test", 7)
    event, sent, _ = drive(
        Handshake(auth=ALICE), [USERPASS, s5.encode_userpass("alice", "s3cret"), request]
    )
    assert event == Ask("x.test", 7, "connect")
    assert sent == b"\x05\x02\x01\x00"
    # Pipelined all at once: the same.
    hs = Handshake(auth=ALICE)
    assert drive(hs, [USERPASS + s5.encode_userpass("alice", "s3cret") + request])[:2] == (
        event,
        sent,
    )
    # Wrong password: the RFC 1929 failure status, and close.
    event, sent, _ = drive(Handshake(auth=ALICE), [USERPASS + s5.encode_userpass("alice", "no")])
    assert isinstance(event, Refuse) and event.level == logging.WARNING
    assert sent == b"\x05\x02\x01\x01" and not event.linger
    # No username/password offered: "no acceptable methods".
    event, sent, _ = drive(Handshake(auth=ALICE), [GREETING])
    assert isinstance(event, Refuse) and sent == b"\x05\xff"


@pytest.mark.parametrize(
    ("raw", "answer", "linger"),
    [
        # BIND: command not supported
        (GREETING + s5.encode_request(s5.CMD_BIND, "x.test", 1), b"\x05\x00\x05\x07", False),
        # unknown command 9
        (b"\x05\x01\x00\x05\x09\x00\x01" + bytes(6), b"\x05\x00\x05\x07", True),
        # unknown address type 7
        (b"\x05\x01\x00\x05\x01\x00\x07" + bytes(6), b"\x05\x00\x05\x08", True),
        # a greeting that offers no methods
        (b"\x05\x00", b"\x05\xff", True),
        # SOCKS4 CONNECT
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00", SOCKS4_REJECT, False),
    ],
)
def test_malformed_socks_gets_its_error_reply(raw: bytes, answer: bytes, linger: bool) -> None:
    event, sent, _ = drive(Handshake(), [raw])
    assert isinstance(event, Refuse) and event.linger is linger
    assert sent[: len(answer)] == answer
    hs = Handshake()
    drive(hs, [raw])
    with pytest.raises(RuntimeError):  # a finished handshake is not fed again
        hs.receive_data(b"more")


def test_udp_associate() -> None:
    raw = GREETING + s5.encode_request(s5.CMD_UDP_ASSOCIATE, "0.0.0.0", 0)
    hs = Handshake()
    event, _, _ = drive(hs, [raw])
    assert event == UdpAssociate(ipaddress.IPv4Address("0.0.0.0"), 0)
    assert hs.accept("127.0.0.1", 40000) == s5.encode_reply(0, "127.0.0.1", 40000)


@pytest.mark.parametrize(
    ("refusal", "reply", "status"),
    [
        ("unmapped", s5.REP_HOST_UNREACHABLE, 502),
        ("rejected", s5.REP_NOT_ALLOWED, 403),
        ("refused", s5.REP_CONNECTION_REFUSED, 502),
        ("timeout", s5.REP_HOST_UNREACHABLE, 504),
        ("unreachable", s5.REP_HOST_UNREACHABLE, 502),
        ("bad-target", s5.REP_GENERAL_FAILURE, 400),
        ("unsupported", s5.REP_COMMAND_NOT_SUPPORTED, 501),
    ],
)
def test_refusals_in_both_protocols(refusal: Refusal, reply: int, status: int) -> None:
    hs = Handshake()
    drive(hs, [GREETING + s5.encode_request(s5.CMD_CONNECT, "x.test", 1)])
    got = hs.refuse(refusal, "why")
    assert got.reply == s5.encode_reply(reply) and not got.linger
    hs = Handshake()
    drive(hs, [b"CONNECT x.test:1 HTTP/1.1\r\n\r\n"])
    got = hs.refuse(refusal, "dial failed: because")
    assert got.reply.startswith(b"HTTP/1.1 %d " % status) and got.linger
    assert got.reply.endswith(b"\r\n\r\ndial failed: because\n")
    with pytest.raises(RuntimeError):
        hs.accept()


# ------------------------------------------------------------------------------ HTTP


def test_http_connect() -> None:
    hs = Handshake()
    assert hs.receive_data(b"CONNECT tunnel.test:7 HTTP/1.1\r\n") == NEED_MORE
    event = hs.receive_data(b"Host: tunnel.test:7\r\n\r\nfirst")
    assert isinstance(event, Ask) and event.command == "connect" and event.rest == b"first"
    assert (event.host, event.port) == ("tunnel.test", 7)
    assert not hs.reply_names_address
    assert hs.accept() == CONNECT_OK


def test_http_absolute_uri_is_a_forward() -> None:
    hs = Handshake()
    raw = b"POST http://a.test:8080/p HTTP/1.1\r\nContent-Length: 1\r\n\r\nxy"
    event, sent, _ = drive(hs, [raw])
    assert isinstance(event, Ask) and event.command == "forward" and sent == b""
    assert (event.host, event.port, event.rest) == ("a.test", 8080, b"xy")
    assert event.request is not None and event.request.path == "/p"
    assert hs.accept() == b""


def basic(user: str, password: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_http_auth() -> None:
    get = b"GET http://a.test/ HTTP/1.1\r\n"
    for extra in (b"", basic("alice", "no") + b"\r\n", b"Proxy-Authorization: Digest x\r\n"):
        event, _, _ = drive(Handshake(auth=ALICE), [get + extra + b"\r\n"])
        assert isinstance(event, Refuse) and event.linger and event.level == logging.WARNING
        assert event.reply.startswith(b"HTTP/1.1 407 ")
    event, _, _ = drive(Handshake(auth=ALICE), [get + basic("alice", "s3cret") + b"\r\n\r\n"])
    assert isinstance(event, Ask)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", 400),  # origin-form: not a proxy request
        (b"GET https://a.test/ HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a.test HTTP/1.1\r\n\r\n", 400),  # no port
        (b"GET http://a.test/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_malformed_http_gets_its_status(raw: bytes, status: int) -> None:
    event, sent, _ = drive(Handshake(), [raw])
    assert isinstance(event, Refuse) and event.linger
    assert sent.startswith(b"HTTP/1.1 %d " % status)


def test_port_variants() -> None:
    event, sent, _ = drive(Handshake(socks=False), [b"\x05\x01\x00"])
    assert isinstance(event, Refuse) and sent.startswith(b"HTTP/1.1 400 ")
    event, sent, _ = drive(Handshake(socks=False), [b"\x04\x01"])
    assert isinstance(event, Refuse) and sent.startswith(b"HTTP/1.1 400 ")
    event, sent, _ = drive(Handshake(http=False), [b"GET http://a.test/ HTTP/1.1\r\n\r\n"])
    assert isinstance(event, Refuse) and sent == b"" and not event.linger


def test_eof_closes_quietly() -> None:
    for first in (b"", b"\x05", b"GET http://a"):
        hs = Handshake()
        if first:
            assert hs.receive_data(first) == NEED_MORE
        event = hs.receive_data(b"")
        assert event == Refuse(b"", "client closed before a complete request", False, logging.DEBUG)


# ------------------------------------------------------------------------- the parser

PREFIXES = [
    b"",
    GREETING,
    USERPASS,
    USERPASS + s5.encode_userpass("alice", "s3cret"),
    GREETING + s5.encode_request(s5.CMD_CONNECT, "x.test", 80),
    b"\x05",
    b"\x04",
    b"CONNECT x.test:443 HTTP/1.1\r\n",
    b"GET http://a.test/ HTTP/1.1\r\n",
]


@given(
    prefix=st.sampled_from(PREFIXES),
    tail=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    socks=st.booleans(),
    http=st.booleans(),
    auth=st.booleans(),
)
def test_any_bytes_any_split_same_outcome(
    prefix: bytes, tail: bytes, cuts: list[int], socks: bool, http: bool, auth: bool
) -> None:
    if not (socks or http):
        http = True
    data = prefix + tail
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]

    def new() -> Handshake:
        return Handshake(socks=socks, http=http, auth=ALICE if auth else None, max_head=256)

    whole, whole_sent, _ = drive(new(), [data])
    split, split_sent, split_fed = drive(new(), pieces)
    assert whole_sent == split_sent
    if isinstance(whole, Ask):
        assert isinstance(split, Ask)
        assert (split.host, split.port, split.command) == (whole.host, whole.port, whole.command)
        assert split.rest + data[split_fed:] == whole.rest
    elif isinstance(whole, Refuse):
        # The same refusal; its reply may have gone out in parts (the
        # method selection before a later error), hence whole_sent above.
        assert isinstance(split, Refuse)
        assert (split.why, split.linger, split.level) == (whole.why, whole.linger, whole.level)
    else:
        assert split == whole
