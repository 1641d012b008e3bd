"""Scripted exchanges against the sans-I/O SOCKS5 client and server."""

from __future__ import annotations

import ipaddress

import pytest

from appliance.proto import socks5 as s5


def drive_client(client: s5.Socks5Client, server_bytes: bytes) -> bytes:
    """Feed the server's bytes as the client asks for them (bytes_wanted);
    return everything the client sent, greeting included."""
    sent = client.data_to_send()
    pos = 0
    for _ in range(100):
        if client.established or pos >= len(server_bytes):
            break
        n = client.bytes_wanted()
        client.receive_data(server_bytes[pos : pos + n])
        pos += n
        sent += client.data_to_send()
    return sent


def test_connect_by_name_sends_atyp_domain() -> None:
    c = s5.Socks5Client("www.example.com", 443)
    reply = s5.encode_reply(0, "10.0.0.1", 5555)
    sent = drive_client(c, b"\x05\x00" + reply)
    assert sent == (b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0fwww.example.com\x01\xbb")
    assert c.established
    assert c.reply == s5.Reply(0, ipaddress.IPv4Address("10.0.0.1"), 5555)
    assert c.trailing_data == b""


@pytest.mark.parametrize(
    ("host", "atyp", "packed"),
    [
        ("192.0.2.7", 1, bytes([192, 0, 2, 7])),
        (ipaddress.IPv4Address("192.0.2.7"), 1, bytes([192, 0, 2, 7])),
        ("2001:db8::1", 4, ipaddress.IPv6Address("2001:db8::1").packed),
        ("[2001:db8::1]", 4, ipaddress.IPv6Address("2001:db8::1").packed),
    ],
)
def test_ip_literals_use_atyp_1_and_4(host: s5.Host, atyp: int, packed: bytes) -> None:
    wire = s5.encode_request(s5.CMD_CONNECT, host, 80)
    assert wire == b"\x05\x01\x00" + bytes([atyp]) + packed + b"\x00P"


def test_userpass_auth_then_connect() -> None:
    c = s5.Socks5Client("a.test", 80, username="u", password="pw")
    assert c.data_to_send() == b"\x05\x02\x00\x02"
    c.receive_data(b"\x05\x02")
    assert c.data_to_send() == b"\x01\x01u\x02pw"
    c.receive_data(b"\x01\x00")
    assert c.data_to_send() == b"\x05\x01\x00\x03\x06a.test\x00P"
    c.receive_data(s5.encode_reply(0, "::1", 1) + b"tunnel")
    assert c.established
    assert c.trailing_data == b"tunnel"


def test_auth_refused_raises_not_allowed() -> None:
    c = s5.Socks5Client("a.test", 80, username="u", password="bad")
    c.data_to_send()
    c.receive_data(b"\x05\x02")
    with pytest.raises(s5.Socks5Error) as e:
        c.receive_data(b"\x01\x01")
    assert e.value.reply == s5.REP_NOT_ALLOWED


def test_no_acceptable_method_and_unoffered_method() -> None:
    c = s5.Socks5Client("a.test", 80)
    with pytest.raises(s5.Socks5Error, match="none of the offered"):
        c.receive_data(b"\x05\xff")
    c = s5.Socks5Client("a.test", 80)
    with pytest.raises(s5.Socks5Error, match="not offered"):
        c.receive_data(b"\x05\x02")


def test_error_reply_carries_code() -> None:
    c = s5.Socks5Client("a.test", 80)
    c.receive_data(b"\x05\x00")
    with pytest.raises(s5.Socks5Error, match="connection refused") as e:
        c.receive_data(s5.encode_reply(s5.REP_CONNECTION_REFUSED))
    assert e.value.reply == s5.REP_CONNECTION_REFUSED


def test_eof_during_handshake() -> None:
    c = s5.Socks5Client("a.test", 80)
    with pytest.raises(s5.Socks5Error, match="closed"):
        c.receive_data(b"")


def test_bytes_wanted_never_overreads_domain_reply() -> None:
    c = s5.Socks5Client("a.test", 80)
    reply = s5.encode_reply(0, "bound.example", 1080)
    sent = drive_client(c, b"\x05\x00" + reply + b"TUNNEL")
    assert sent.endswith(b"\x00P")
    assert c.established and c.trailing_data == b""
    assert c.reply is not None and c.reply.host == "bound.example"


def test_bad_targets_fail_before_sending() -> None:
    with pytest.raises(s5.Socks5Error):
        s5.Socks5Client("x" * 256, 80)
    with pytest.raises(s5.Socks5Error):
        s5.Socks5Client("a.test", 70000)
    with pytest.raises(s5.Socks5Error):
        s5.Socks5Client("a.test", 80, username="", password="x")


def test_udp_header_roundtrip() -> None:
    d = s5.encode_udp("dns.test", 53, b"payload")
    assert d == b"\x00\x00\x00\x03\x08dns.test\x005payload"
    assert s5.parse_udp(d) == s5.UdpDatagram("dns.test", 53, b"payload", 0)
    with pytest.raises(s5.Socks5Error):
        s5.parse_udp(b"\x00\x00\x00\x01\x01\x02")


def test_udp_associate_request() -> None:
    c = s5.Socks5Client("0.0.0.0", 0, command=s5.CMD_UDP_ASSOCIATE, pipeline=False)
    assert c.data_to_send() == b"\x05\x01\x00"
    c.receive_data(b"\x05\x00")
    assert c.data_to_send() == b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"


def test_no_auth_request_is_pipelined_with_the_greeting() -> None:
    c = s5.Socks5Client("a.test", 80)
    assert c.data_to_send() == b"\x05\x01\x00" + b"\x05\x01\x00\x03\x06a.test\x00P"
    # Method selection + the reply's fixed head: one read, nothing of the tunnel.
    assert c.bytes_wanted() == 7
    c.receive_data(b"\x05\x00\x05\x00\x00\x01\x0a")
    assert c.data_to_send() == b""  # the request is not sent twice
    assert c.bytes_wanted() == 5
    c.receive_data(b"\x00\x00\x01\x00P")
    assert c.established and c.trailing_data == b""


def test_pipelined_client_split_reads_and_refusal() -> None:
    c = s5.Socks5Client("a.test", 80)
    c.data_to_send()
    c.receive_data(b"\x05")  # half a method selection
    assert c.bytes_wanted() == 6
    with pytest.raises(s5.Socks5Error, match="none of the offered"):
        c.receive_data(b"\xff")
    # A server that refuses "no auth" closes after 0xFF: EOF before any reply.
    c = s5.Socks5Client("a.test", 80)
    c.data_to_send()
    with pytest.raises(s5.Socks5Error, match="closed"):
        c.receive_data(b"")


def test_credentials_are_never_pipelined() -> None:
    # The server may pick either offered method: the request has to wait.
    c = s5.Socks5Client("a.test", 80, username="u", password="pw")
    assert c.data_to_send() == b"\x05\x02\x00\x02"
    assert c.bytes_wanted() == 2
    c.receive_data(b"\x05\x00")
    assert c.data_to_send() == b"\x05\x01\x00\x03\x06a.test\x00P"


def test_request_sent_and_received_track_the_exchange() -> None:
    # What a kept proxy connection's user needs: when the request is out
    # (time to open a replacement) and whether the proxy has said anything
    # (if not, a dead connection may be retried on a new one).
    c = s5.Socks5Client("a.test", 80)
    assert not c.request_sent and c.received == 0
    c.data_to_send()
    assert c.request_sent  # pipelined with the greeting
    c.receive_data(b"\x05\x00")
    assert c.received == 2
    # With credentials: only once the auth succeeded and the request left.
    c = s5.Socks5Client("a.test", 80, username="u", password="pw")
    c.data_to_send()
    assert not c.request_sent
    c.receive_data(b"\x05\x02")
    c.data_to_send()  # the credentials
    assert not c.request_sent
    c.receive_data(b"\x01\x00")
    assert c.data_to_send() == b"\x05\x01\x00\x03\x06a.test\x00P"
    assert c.request_sent and c.received == 4
    # Lock-step: after the method selection.
    c = s5.Socks5Client("a.test", 80, pipeline=False)
    c.data_to_send()
    assert not c.request_sent
    c.receive_data(b"\x05\x00")
    c.data_to_send()
    assert c.request_sent


def test_lock_step_client_sends_request_after_selection() -> None:
    c = s5.Socks5Client("a.test", 80, pipeline=False)
    assert c.data_to_send() == b"\x05\x01\x00"
    assert c.bytes_wanted() == 2
    c.receive_data(b"\x05\x00")
    assert c.data_to_send() == b"\x05\x01\x00\x03\x06a.test\x00P"


def test_server_no_auth_pipelined() -> None:
    srv = s5.Socks5Server()
    ev = srv.receive_data(b"\x05\x01\x00" + s5.encode_request(1, "a.test", 443) + b"hello")
    assert ev == s5.Request(1, "a.test", 443)
    assert srv.data_to_send() == b"\x05\x00"
    assert srv.trailing_data == b"hello"
    srv.reply(0, "127.0.0.1", 9)
    assert srv.state is s5.ServerState.ESTABLISHED
    assert srv.data_to_send() == s5.encode_reply(0, "127.0.0.1", 9)


def test_server_auth_flow_and_refusal() -> None:
    srv = s5.Socks5Server(require_auth=True)
    assert srv.receive_data(b"\x05\x02\x00\x02") is None
    assert srv.data_to_send() == b"\x05\x02"
    ev = srv.receive_data(s5.encode_userpass("u", "p"))
    assert ev == s5.AuthRequest("u", "p")
    assert srv.auth_result(True) is None
    assert srv.data_to_send() == b"\x01\x00"
    assert srv.receive_data(s5.encode_request(3, "::", 0)) == s5.Request(
        3, ipaddress.IPv6Address("::"), 0
    )
    srv2 = s5.Socks5Server(require_auth=True)
    with pytest.raises(s5.Socks5Error):
        srv2.receive_data(b"\x05\x01\x00")
    assert srv2.data_to_send() == b"\x05\xff"


def test_server_unknown_command_reply_code() -> None:
    srv = s5.Socks5Server()
    with pytest.raises(s5.Socks5Error) as e:
        srv.receive_data(b"\x05\x01\x00\x05\x09\x00\x01\x00\x00\x00\x00\x00\x00")
    assert e.value.reply == s5.REP_COMMAND_NOT_SUPPORTED
    with pytest.raises(s5.Socks5Error) as e:
        s5.parse_request(b"\x05\x01\x00\x07")
    assert e.value.reply == s5.REP_ADDRESS_TYPE_NOT_SUPPORTED
