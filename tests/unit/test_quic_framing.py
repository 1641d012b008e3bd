"""The sans-I/O cores of the QUIC protocols (appliance/proto/hysteria2.py,
appliance/proto/tuic.py) and their config keys: every parser returns a
value (or None for an incomplete prefix) or raises its protocol's error for
any bytes; encoders round-trip through the parsers; UDP packets split into
fragments come back whole in any order; Salamander undoes itself.

Interoperability (that these bytes are what sing-box speaks) is
tests/integration/test_quic_outbounds.py's job."""

from __future__ import annotations

import hashlib
import ipaddress
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config.loader import parse_config
from appliance.config.protocols.hysteria2 import Hysteria2Options
from appliance.config.protocols.tuic import TuicOptions
from appliance.config.render import effective_config
from appliance.proto import hysteria2 as hy
from appliance.proto import tuic
from tests.config_problem import reported

names = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?\Z").filter(
    lambda n: not n.replace(".", "").isdigit())
hosts = st.one_of(names, st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
ports = st.integers(0, 65535)


# -- varints ---------------------------------------------------------------------


@given(st.integers(0, hy.MAX_VARINT))
def test_varints_round_trip_and_every_prefix_is_incomplete(value: int) -> None:
    data = hy.encode_varint(value)
    assert len(data) in (1, 2, 4, 8)
    assert hy.decode_varint(data + b"tail") == (value, len(data))
    for n in range(len(data)):
        assert hy.decode_varint(data[:n]) is None


def test_varint_sizes_are_the_smallest_rfc9000_allows() -> None:
    assert hy.encode_varint(63) == b"\x3f"
    assert hy.encode_varint(64) == b"\x40\x40"
    assert hy.encode_varint(0x401) == b"\x44\x01"  # the TCP request frame type
    assert hy.encode_varint(16384) == b"\x80\x00\x40\x00"
    with pytest.raises(hy.Hysteria2Error):
        hy.encode_varint(hy.MAX_VARINT + 1)


# -- Hysteria2 TCP ------------------------------------------------------------------


@given(hosts, ports, st.binary(max_size=600))
def test_tcp_request_round_trips(host: str, port: int, padding: bytes) -> None:
    data = hy.encode_tcp_request(host, port, padding)
    got = hy.parse_tcp_request(data)
    assert got is not None
    assert got[:2] == (host, port) and got[2] == len(data)
    for n in range(0, len(data), 7):
        assert hy.parse_tcp_request(data[:n]) is None


def test_tcp_request_starts_with_the_frame_type_and_brackets_ipv6() -> None:
    data = hy.encode_tcp_request("2001:db8::1", 443, b"")
    assert data == b"\x44\x01\x11[2001:db8::1]:443\x00"
    assert len(hy.encode_tcp_request("example.com", 80)) >= 64  # random padding


@given(st.booleans(), st.text(max_size=100), st.binary(max_size=300), st.binary(max_size=40))
def test_tcp_response_parses_after_its_last_byte_only(ok: bool, message: str, padding: bytes,
                                                      tunnel: bytes) -> None:
    data = hy.encode_tcp_response(ok, message, padding)
    for n in range(len(data)):
        assert hy.parse_tcp_response(data[:n]) is None
    got = hy.parse_tcp_response(data + tunnel)
    assert got == hy.TcpResponse(ok, message, len(data))


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_tcp_parsers_never_raise_anything_else(data: bytes) -> None:
    for parse in (hy.parse_tcp_response, hy.parse_tcp_request):
        try:
            parse(data)
        except hy.Hysteria2Error:
            pass


def test_tcp_response_refuses_an_oversized_message() -> None:
    with pytest.raises(hy.Hysteria2Error):
        hy.parse_tcp_response(b"\x01" + hy.encode_varint(hy.MAX_MESSAGE_LENGTH + 1))


# -- Hysteria2 UDP ------------------------------------------------------------------


@given(st.integers(0, 2**32 - 1), st.integers(0, 65535), hosts, ports,
       st.binary(max_size=5000), st.integers(200, 1400), st.randoms())
def test_udp_fragments_reassemble_in_any_order(session: int, packet: int, host: str, port: int,
                                               payload: bytes, size: int, rnd: Any) -> None:
    address = hy.format_address(host, port)
    datagrams = hy.encode_udp(session, packet, address, payload, size)
    assert all(len(d) <= size for d in datagrams)
    messages = [hy.parse_udp_message(d) for d in datagrams]
    rnd.shuffle(messages)
    defrag = hy.Defragmenter()
    out = [defrag.feed(m) for m in messages]
    whole = [m for m in out if m is not None]
    assert len(whole) == 1 and out[-1] is whole[0]
    assert (whole[0].session_id, whole[0].payload) == (session, payload)
    assert hy.parse_address(whole[0].address) == (host, port)


def test_a_newer_packet_drops_an_unfinished_one() -> None:
    first = [hy.parse_udp_message(d) for d in hy.encode_udp(1, 7, "a:1", b"x" * 300, 120)]
    second = [hy.parse_udp_message(d) for d in hy.encode_udp(1, 8, "a:1", b"y" * 300, 120)]
    defrag = hy.Defragmenter()
    assert defrag.feed(first[0]) is None
    results = [defrag.feed(m) for m in second]
    assert results[-1] is not None and results[-1].payload == b"y" * 300
    assert defrag.feed(first[1]) is None


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_udp_parser_never_raises_anything_else(data: bytes) -> None:
    try:
        hy.parse_udp_message(data)
    except hy.Hysteria2Error:
        pass


def test_udp_message_layout() -> None:
    msg = hy.UdpMessage(0x01020304, 0x0506, 0, 1, "1.2.3.4:53", b"q").encode()
    assert msg == b"\x01\x02\x03\x04\x05\x06\x00\x01\x0a1.2.3.4:53q"


# -- Salamander ----------------------------------------------------------------------


@given(st.text(min_size=4, max_size=20).filter(lambda t: len(t.encode()) >= 4),
       st.binary(min_size=1, max_size=1500))
def test_salamander_undoes_itself_and_hides_the_packet(password: str, packet: bytes) -> None:
    s = hy.Salamander(password)
    wire = s.obfuscate(packet)
    assert len(wire) == len(packet) + hy.SALAMANDER_SALT_LENGTH
    assert s.deobfuscate(wire) == packet


def test_salamander_is_blake2b_of_password_and_salt_repeated() -> None:
    salt = bytes(range(8))
    key = hashlib.blake2b(b"secret" + salt, digest_size=32).digest()
    packet = bytes(70)
    assert hy.Salamander("secret").obfuscate(packet, salt) == salt + (key * 3)[:70]
    assert hy.Salamander("secret").deobfuscate(salt) is None
    with pytest.raises(hy.Hysteria2Error):
        hy.Salamander("abc")


# -- TUIC ------------------------------------------------------------------------------


@given(hosts, ports)
def test_tuic_addresses_round_trip(host: str, port: int) -> None:
    data = tuic.encode_address(host, port)
    got_host, got_port, end = tuic.parse_address(data + b"rest")
    assert (got_host, got_port, end) == (host, port, len(data))
    kind = data[0]
    try:
        ip = ipaddress.ip_address(host)
        assert kind == (tuic.ADDR_IPV4 if ip.version == 4 else tuic.ADDR_IPV6)
    except ValueError:
        assert kind == tuic.ADDR_DOMAIN


def test_tuic_command_layouts() -> None:
    assert tuic.encode_connect("example.com", 443) == b"\x05\x01\x00\x0bexample.com\x01\xbb"
    assert tuic.encode_connect("10.0.0.1", 80) == b"\x05\x01\x01\x0a\x00\x00\x01\x00\x50"
    user = uuid.UUID("7b2f6a0e-4c1d-4e8a-9f3b-2d5c6e7f8a9b")
    auth = tuic.encode_authenticate(user, bytes(32))
    assert auth[:2] == b"\x05\x00" and auth[2:18] == user.bytes and len(auth) == 50
    assert tuic.encode_dissociate(0x0102) == b"\x05\x03\x01\x02"
    assert tuic.parse_command(tuic.HEARTBEAT) == (tuic.CMD_HEARTBEAT, None)
    with pytest.raises(tuic.TuicError):
        tuic.encode_authenticate(user, b"short")


@given(st.integers(0, 65535), st.integers(0, 65535), hosts, ports, st.binary(max_size=5000),
       st.integers(200, 1400), st.randoms())
def test_tuic_packets_fragment_and_reassemble(assoc: int, packet: int, host: str, port: int,
                                              payload: bytes, size: int, rnd: Any) -> None:
    frames = tuic.encode_packet(assoc, packet, host, port, payload, size)
    assert all(len(f) <= size for f in frames)
    parsed = []
    for f in frames:
        cmd, body = tuic.parse_command(f)
        assert cmd == tuic.CMD_PACKET and isinstance(body, tuic.Packet)
        parsed.append(body)
    assert all(p.host is None for p in parsed[1:])  # only the first carries the address
    rnd.shuffle(parsed)
    r = tuic.Reassembler()
    out = [r.feed(p) for p in parsed]
    whole = [p for p in out if p is not None]
    assert len(whole) == 1 and out[-1] is whole[0]
    assert (whole[0].host, whole[0].port, whole[0].payload) == (host, port, payload)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_tuic_parsers_never_raise_anything_else(data: bytes) -> None:
    for parse in (tuic.parse_command, tuic.parse_address):
        try:
            parse(data)
        except tuic.TuicError:
            pass


# -- config ------------------------------------------------------------------------------


def _profile(*proxies: dict[str, Any]) -> dict[str, Any]:
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]},
            "proxies": list(proxies), "rules": ["MATCH,DIRECT"]}


HY2 = {"name": "hy", "type": "hysteria2", "server": "hy.example", "port": 443,
       "password": 123456, "obfs": "salamander", "obfs-password": "cover",
       "up": "30 Mbps", "down": 100, "ports": "443,8443-8450", "sni": "front.example",
       "skip-cert-verify": True, "hop-interval": 30,
       "ca-str": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}
TUIC = {"name": "tu", "type": "tuic", "server": "203.0.113.5", "port": 443,
        "uuid": "7b2f6a0e-4c1d-4e8a-9f3b-2d5c6e7f8a9b", "password": "pw",
        "udp-relay-mode": "quic", "congestion-controller": "bbr", "heartbeat-interval": 5000,
        "request-timeout": 4000, "reduce-rtt": True, "alpn": ["h3"], "max-open-streams": 20,
        "ca": "/etc/mirage/tuic-ca.pem"}


def test_hysteria2_and_tuic_load_with_mihomo_names_and_render_back() -> None:
    cfg = parse_config(_profile(HY2, TUIC))
    hy2, tu = cfg.proxies
    assert hy2.options == Hysteria2Options(password="123456", obfs="salamander",
                                           obfs_password="cover", up="30 Mbps", down="100",
                                           ports="443,8443-8450", ca_str=HY2["ca-str"])
    assert hy2.tls_options is not None and hy2.tls_options.sni == "front.example"
    assert isinstance(tu.options, TuicOptions)
    assert tu.options.uuid == uuid.UUID(str(TUIC["uuid"]))
    assert tu.options.udp_relay_mode == "quic" and tu.options.heartbeat_interval == 5.0
    assert tu.options.request_timeout == 4.0 and tu.options.congestion_controller == "bbr"
    assert str(tu.options.ca) == "/etc/mirage/tuic-ca.pem"
    assert parse_config(effective_config(cfg, redact=False)).proxies == cfg.proxies
    shown = effective_config(cfg, redact=True)["proxies"]
    assert shown[0]["password"] == shown[0]["obfs-password"] == shown[1]["password"] == (
        "<redacted>")


def test_tuic_v4_hysteria_v1_and_quic_behind_a_dialer_proxy_are_skipped_with_why() -> None:
    cfg = parse_config(_profile(
        {"name": "v4", "type": "tuic", "server": "a.example", "port": 443, "token": "t"},
        {"name": "v1", "type": "hysteria", "server": "a.example", "port": 443},
        {**HY2, "name": "chained", "dialer-proxy": "v4"},
    ))
    assert cfg.proxies == ()
    ignored = " ".join(cfg.ignored_keys)
    assert "TUIC v4" in ignored
    assert "hysteria proxy 'v1'" in ignored
    assert "not supported for QUIC protocols" in ignored


@pytest.mark.parametrize(("extra", "path"), [
    ({"obfs": "xplus"}, "proxies[0].obfs"),
    ({"obfs": "salamander", "obfs-password": "abc"}, "proxies[0].obfs-password"),
    ({"password": None}, "proxies[0].password"),
    ({"ca-str": "not pem"}, "proxies[0].ca-str"),
])
def test_bad_hysteria2_options_name_their_key(extra: dict[str, Any], path: str) -> None:
    proxy = {k: v for k, v in {**HY2, "obfs": None, **extra}.items() if v is not None}
    assert reported(_profile(proxy)).path == path


@pytest.mark.parametrize(("extra", "path"), [
    ({"uuid": "not-a-uuid"}, "proxies[0].uuid"),
    ({"udp-relay-mode": "stream"}, "proxies[0].udp-relay-mode"),
    ({"heartbeat-interval": 0}, "proxies[0].heartbeat-interval"),
])
def test_bad_tuic_options_name_their_key(extra: dict[str, Any], path: str) -> None:
    assert reported(_profile({**TUIC, **extra})).path == path


@pytest.mark.parametrize(("text", "bps"), [
    ("100", 12_500_000),            # a bare number is Mbit/s
    ("100 Mbps", 12_500_000),
    ("100Mbps", 12_500_000),
    ("50 MBps", 50_000_000),        # B: bytes
    ("800 Kbps", 100_000),
    ("1 Gbps", 125_000_000),
    ("2 TBps", 2 * 10**12),
    ("1000 bps", 125),
    (None, 0), ("", 0),
    ("100.5 Mbps", 0),              # what mihomo cannot read is 0 (unknown)
    ("100 mbps", 0), ("fast", 0), ("100 Mbit/s", 0),
])
def test_hysteria2_rates_read_as_mihomo_reads_them(text: str | None, bps: int) -> None:
    """`down` becomes the auth request's Hysteria-CC-RX (bytes/s) by
    mihomo's StringToBps (adapter/outbound/util.go)."""
    assert hy.rate_bps(text) == bps
