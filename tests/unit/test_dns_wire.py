"""The fast path: which queries it takes, what it packs (read back by dnslib),
and that hostile bytes never make it raise."""

from __future__ import annotations

import struct

from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord, EDNSOption
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.dns import wire


def query(
    name: str = "www.Example.com",
    qtype: str = "A",
    *,
    qid: int = 0x1234,
    edns: bool = False,
    do: bool = False,
    opts: list[EDNSOption] | None = None,
) -> bytes:
    rec = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        rec.add_ar(EDNS0(udp_len=4096, flags="do" if do else "", opts=opts))
    return bytes(rec.pack())


def test_parse_plain_query() -> None:
    q = wire.parse_query(query())
    assert q is not None
    assert (q.qid, q.qname, q.qtype, q.qclass) == (0x1234, "www.example.com", 1, 1)
    assert q.question == b"\x03www\x07Example\x03com\x00\x00\x01\x00\x01"
    assert q.flags & 0x0100  # RD
    assert not q.edns and not q.do


def test_parse_edns_query() -> None:
    q = wire.parse_query(query(qtype="AAAA", edns=True, do=True))
    assert q is not None and q.edns and q.do and q.qtype == 28
    q = wire.parse_query(query(edns=True, opts=[EDNSOption(10, b"12345678")]))  # a cookie
    assert q is not None and q.edns and not q.do


def _mutate(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_parse_rejects_other_shapes() -> None:
    plain = query()
    response = DNSRecord.question("a.com").reply()
    opt_v1 = DNSRecord.question("a.com")
    opt_v1.add_ar(EDNS0(udp_len=1232, version=1))
    two_opts = DNSRecord.question("a.com")
    two_opts.add_ar(EDNS0())
    two_opts.add_ar(EDNS0())
    not_opt = DNSRecord.question("a.com")
    not_opt.add_ar(RR("a.com", QTYPE.A, rdata=A("1.2.3.4")))
    cases = [
        bytes(response.pack()),
        _mutate(plain, 2, b"\x28"),  # opcode UPDATE
        _mutate(plain, 2, b"\x03"),  # TC in a query
        _mutate(plain, 4, b"\x00\x02"),  # QDCOUNT 2
        _mutate(plain, 6, b"\x00\x01"),  # ANCOUNT 1
        plain + b"\x00",  # trailing byte
        plain[:-1],  # cut short
        plain[:12] + b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer in the question
        bytes(opt_v1.pack()),
        bytes(two_opts.pack()),
        bytes(not_opt.pack()),
        query("a b.com"),  # not a host name
        query(edns=True, opts=[EDNSOption(10, b"12345678")])[:-1] + b"\x00\x00",  # bad tiling
        b"",
        b"\x00" * 11,
    ]
    for data in cases:
        assert wire.parse_query(data) is None, data.hex()


def test_pack_reply_reads_back() -> None:
    q = wire.parse_query(query(qid=7, edns=True, do=True))
    assert q is not None
    data = wire.pack_reply(q, rdatas=[bytes([198, 18, 0, 5]), bytes([198, 18, 0, 6])], ttl=1)
    rec = DNSRecord.parse(data)
    assert rec.header.id == 7 and rec.header.qr and rec.header.aa and rec.header.ra
    assert rec.header.rd and rec.header.rcode == RCODE.NOERROR
    assert str(rec.q.qname) == "www.Example.com."  # case kept (0x20 randomization)
    assert [str(r.rdata) for r in rec.rr] == ["198.18.0.5", "198.18.0.6"]
    assert all(r.ttl == 1 and r.rtype == QTYPE.A for r in rec.rr)
    assert data[len(q.question) + 12 : len(q.question) + 14] == b"\xc0\x0c"  # pointer
    [opt] = rec.ar
    assert opt.rtype == QTYPE.OPT and opt.rclass == wire.EDNS_UDP_SIZE and opt.ttl == 0x8000
    q = wire.parse_query(query())
    assert q is not None
    empty = DNSRecord.parse(wire.pack_reply(q, wire.RCODE_SERVFAIL))
    assert empty.header.rcode == RCODE.SERVFAIL and not empty.header.aa
    assert not empty.rr and not empty.ar


def test_error_reply() -> None:
    assert wire.error_reply(b"", wire.RCODE_FORMERR) == b""
    assert wire.error_reply(b"\x12\x34" + b"\x00" * 9, wire.RCODE_FORMERR) == b""
    response = bytes(DNSRecord.question("a.com").reply().pack())
    assert wire.error_reply(response, wire.RCODE_FORMERR) == b""
    garbage = b"\xab\xcd\x01\x00\x00\x05" + b"\xff" * 30
    rec = DNSRecord.parse(wire.error_reply(garbage, wire.RCODE_FORMERR))
    assert rec.header.id == 0xABCD and rec.header.rcode == RCODE.FORMERR
    assert rec.header.qr and rec.header.rd and not rec.questions
    good = query(edns=True)
    rec = DNSRecord.parse(wire.error_reply(good, wire.RCODE_SERVFAIL))
    assert rec.header.rcode == RCODE.SERVFAIL and len(rec.questions) == 1 and len(rec.ar) == 1


def test_udp_limit() -> None:
    assert wire.udp_limit(query()) == 512
    assert wire.udp_limit(query(edns=True)) == 4096
    small = DNSRecord.question("a.com")
    small.add_ar(EDNS0(udp_len=100))
    assert wire.udp_limit(bytes(small.pack())) == 512
    assert wire.udp_limit(b"\x00\x01") == 512
    assert wire.udp_limit(query(edns=True)[:-3]) == 512


def test_truncate_keeps_question_and_opt() -> None:
    q = wire.parse_query(query(edns=True, do=True))
    assert q is not None
    big = wire.pack_reply(q, rdatas=[bytes([10, 0, i // 256, i % 256]) for i in range(100)])
    assert len(big) > 1232
    assert wire.truncate(big, 4096) == big
    cut = wire.truncate(big, 512)
    assert len(cut) <= 512
    rec = DNSRecord.parse(cut)
    assert rec.header.tc and rec.header.id == q.qid and not rec.rr
    assert rec.q.qname == "www.example.com" and len(rec.ar) == 1 and rec.ar[0].rtype == QTYPE.OPT
    # A reply that does not walk still comes back as a bare TC header.
    bare = wire.truncate(big[:600], 512)
    assert len(bare) == 12 and bare[2] & 0x02
    assert struct.unpack("!4H", bare[4:]) == (0, 0, 0, 0)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    q = wire.parse_query(data)
    assert q is None or q.question == data[12 : 12 + len(q.question)]
    wire.error_reply(data, wire.RCODE_FORMERR)
    assert 512 <= wire.udp_limit(data) <= 65535
    assert len(wire.truncate(data, 512)) <= max(512, len(data))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_queries_never_raise(data: st.DataObject) -> None:
    raw = bytearray(query(edns=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = bytes(raw[: data.draw(st.integers(0, len(raw)))])
    for blob in (bytes(raw), cut):
        q = wire.parse_query(blob)
        if q is not None:  # whatever it accepts, dnslib reads the same way
            rec = DNSRecord.parse(blob)
            assert (rec.header.id, rec.q.qtype, rec.q.qclass) == (q.qid, q.qtype, q.qclass)
            assert str(rec.q.qname).rstrip(".").lower() == q.qname
        wire.error_reply(blob, wire.RCODE_FORMERR)
