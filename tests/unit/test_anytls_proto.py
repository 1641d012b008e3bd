"""The AnyTLS session core without sockets: the auth head, frames both
ways, the padding scheme's record sizes, scheme updates, heartbeats and
UDP over TCP; a hypothesis run of the frame reader on arbitrary bytes.
Interop with sing-box is tests/integration/test_anytls.py."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.proto import anytls as at
from appliance.proto.socks5 import encode_address


def _frames(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        cmd, sid, n = at.HEADER.unpack_from(data)
        out.append((cmd, sid, data[at.HEADER_SIZE:at.HEADER_SIZE + n]))
        data = data[at.HEADER_SIZE + n:]
    return out


def test_scheme_parses_sizes_checks_and_md5() -> None:
    scheme = at.PaddingScheme(at.DEFAULT_PADDING_SCHEME)
    assert scheme.stop == 8
    assert scheme.md5 == hashlib.md5(at.DEFAULT_PADDING_SCHEME).hexdigest()
    sizes = scheme.record_sizes(2)
    assert sizes[1] == at.CHECK and 400 <= sizes[0] <= 500 and len(sizes) == 11
    assert 34 <= scheme.record_sizes(0)[0] <= 120
    assert scheme.record_sizes(9) == []
    with pytest.raises(at.AnytlsError):
        at.PaddingScheme(b"0=1-2")


def test_session_start_auth_then_settings_with_the_first_stream() -> None:
    scheme = at.PaddingScheme(b"stop=3\n0=40-40\n1=200-200\n2=10-10,c,10-10")
    core = at.ClientSession("pw", scheme, client="test")
    (auth,) = core.start()
    assert auth[:32] == hashlib.sha256(b"pw").digest()
    assert struct.unpack(">H", auth[32:34]) == (40,) and auth[34:] == bytes(40)
    address = encode_address("www.example.test", 80)
    sid, writes = core.open_stream(address)
    # Write 1: one 200-byte record holding settings, SYN, PSH(address) and waste.
    assert [len(w) for w in writes] == [200]
    frames = _frames(writes[0])
    assert frames[0][0] == at.CMD_SETTINGS
    assert at.parse_settings(frames[0][2]) == {"v": "2", "client": "test",
                                               "padding-md5": scheme.md5}
    assert frames[1] == (at.CMD_SYN, sid, b"")
    assert frames[2] == (at.CMD_PSH, sid, address)
    assert frames[3][0] == at.CMD_WASTE
    # Write 2: cut into 10-byte records while data lasts, then "c" stops.
    writes = core.send(sid, b"x" * 15)
    assert [len(w) for w in writes] == [10, 10, 2]
    assert _frames(b"".join(writes)) == [(at.CMD_PSH, sid, b"x" * 15)]
    # Write 3 reaches stop: no padding any more.
    assert core.fin(sid) == [at.frame(at.CMD_FIN, sid)]
    big = core.send(sid, b"y" * 70000)
    assert len(big) == 1
    assert [f[2] for f in _frames(big[0])] == [b"y" * 65535, b"y" * 4465]


def test_server_frames_become_events() -> None:
    core = at.ClientSession("pw", at.PaddingScheme(at.DEFAULT_PADDING_SCHEME))
    core.start()
    assert not core.answered
    wire = (at.frame(at.CMD_SERVER_SETTINGS, 0, b"v=2") + at.frame(at.CMD_WASTE, 0, bytes(9))
            + at.frame(at.CMD_SYNACK, 1) + at.frame(at.CMD_PSH, 1, b"hello")
            + at.frame(at.CMD_SYNACK, 3, b"dial tcp: connection refused")
            + at.frame(at.CMD_HEART_REQUEST, 0) + at.frame(at.CMD_FIN, 1)
            + at.frame(at.CMD_UPDATE_PADDING_SCHEME, 0, b"stop=2\n1=50-50"))
    events = []
    for i in range(0, len(wire), 7):  # a few bytes at a time
        events += core.receive(wire[i:i + 7])
    assert events == [at.SynAck(1, None), at.Data(1, b"hello"),
                      at.SynAck(3, "dial tcp: connection refused"), at.Fin(1)]
    assert core.answered and core.server_version == 2
    assert core.scheme.stop == 2
    assert b"".join(core.replies()).endswith(at.frame(at.CMD_HEART_RESPONSE, 0))
    assert core.receive(at.frame(at.CMD_ALERT, 0, b"bad")) == [at.Alert("bad")]
    with pytest.raises(at.AnytlsError, match="unknown AnyTLS command 99"):
        core.receive(at.frame(99, 0))


def test_uot_packets() -> None:
    address = encode_address("www.example.test", 53)
    assert at.uot_request(address) == b"\x01" + address
    decoder = at.UotDecoder()
    wire = at.uot_packet(b"one") + at.uot_packet(b"") + at.uot_packet(b"three")
    assert decoder.feed(wire[:4]) == []
    assert decoder.feed(wire[4:]) == [b"one", b"", b"three"]
    with pytest.raises(at.AnytlsError):
        at.uot_packet(bytes(70000))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_the_frame_reader_takes_any_bytes(data: bytes) -> None:
    core = at.ClientSession("pw", at.PaddingScheme(at.DEFAULT_PADDING_SCHEME))
    try:
        core.receive(data)
    except at.AnytlsError:
        pass
