"""Hostile DNS input is cheap and quiet; local negative answers carry an SOA.

Malformed names (labels over 63 bytes, names over 255, pointer loops) get
FORMERR from one walk over the bytes, never reach the pool, and a flood of
them writes one log line per interval, not one per packet.
"""

from __future__ import annotations

import logging
import struct
from ipaddress import IPv4Network

import pytest
from dnslib import CLASS, EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord

from appliance.config.model import DnsConfig
from appliance.dns import wire
from appliance.dns.handler import DnsHandler, ProblemLog
from appliance.fakeip.pool import FakeIPPool


def make() -> tuple[DnsHandler, FakeIPPool]:
    pool = FakeIPPool(IPv4Network("198.18.0.0/16"))
    return DnsHandler(DnsConfig(), pool), pool


def ask(name: str, qtype: str = "A", *, edns: bool = False) -> bytes:
    rec = DNSRecord(DNSHeader(id=7, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype), CLASS.IN))
    if edns:
        rec.add_ar(EDNS0(udp_len=4096))
    return bytes(rec.pack())


def answer(handler: DnsHandler, data: bytes) -> DNSRecord:
    out = handler.handle(data)
    assert isinstance(out, bytes), out
    return DNSRecord.parse(out)


def query(name: bytes, qtype: int = 1, flags: int = 0x0100, extra: bytes = b"") -> bytes:
    counts = (1, 0, 0, 1 if extra else 0)
    return struct.pack("!HHHHHH", 0x1234, flags, *counts) + name + struct.pack("!HH", qtype, 1) \
        + extra


def labels(*parts: bytes) -> bytes:
    return b"".join(bytes([len(p)]) + p for p in parts) + b"\0"


HOSTILE = {
    "label over 63": query(labels(b"a" * 64, b"example", b"com")),
    "name over 255": query(labels(*[b"b" * 63] * 5)),
    "bad pointer": query(b"\x01a\xc0\x0c"),
    "cut short": query(labels(b"www", b"example"))[:-3],
}


@pytest.mark.parametrize("reason", sorted(HOSTILE))
def test_malformed_names_are_found_by_one_walk(reason: str) -> None:
    assert wire.malformed(HOSTILE[reason]) == reason


def test_wellformed_messages_pass_the_walk() -> None:
    assert wire.malformed(ask("www.example.com", "A", edns=True)) is None
    reply = DNSRecord.question("a.example").reply()
    assert wire.malformed(bytes(reply.pack())) is None
    # 255 bytes exactly is a legal name: 3 x 63 + 61 + 5 length bytes + root.
    longest = labels(b"c" * 63, b"c" * 63, b"c" * 63, b"c" * 61)
    assert len(longest) == 255 and wire.malformed(query(longest)) is None
    too_long = labels(b"c" * 63, b"c" * 63, b"c" * 63, b"c" * 62)
    assert wire.malformed(query(too_long)) == "name over 255"
    # A pointer backwards into an earlier name is fine; forwards or to itself not.
    two = struct.pack("!HHHHHH", 1, 0x0100, 2, 0, 0, 0) + labels(b"a", b"b") + b"\0\1\0\1"
    assert wire.malformed(two + b"\x01x\xc0\x0e\0\1\0\1") is None
    assert wire.malformed(two + b"\x01x\xc0\x17\0\1\0\1") == "bad pointer"


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("reason", sorted(HOSTILE))
def test_malformed_name_is_formerr_and_never_reaches_the_pool(
    reason: str, fast_path: bool
) -> None:
    pool = FakeIPPool(IPv4Network("198.18.0.0/16"))
    h = DnsHandler(DnsConfig(), pool, fast_path=fast_path)
    out = h.handle(HOSTILE[reason])
    assert isinstance(out, bytes) and len(out) == 12
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", out)
    assert qid == 0x1234 and flags & 0x8000 and flags & 0xF == wire.RCODE_FORMERR
    assert (qd, an, ns, ar) == (0, 0, 0, 0)
    assert len(pool) == 0 and h.formerr == 1 and h.servfail == 0


def test_malformed_response_is_dropped_and_counted() -> None:
    h, _ = make()
    assert h.handle(query(labels(b"a" * 64), flags=0x8100)) == b""
    assert h.problems.total == 1


def test_a_flood_of_malformed_queries_logs_one_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    h = DnsHandler(DnsConfig(), FakeIPPool(IPv4Network("198.18.0.0/16")),
                   problems=ProblemLog(10.0, clock=lambda: now[0]))
    with caplog.at_level(logging.INFO, logger="mirage.dns"):
        for i in range(5000):
            h.handle(HOSTILE[sorted(HOSTILE)[i % 4]])
            now[0] += 0.001  # 5 s of flood at 1,000/s
        h.report_problems()  # the service's tick: not due yet
        assert len(caplog.records) == 1  # the first packet, reported at once
        now[0] += 10.0
        h.report_problems()
    assert len(caplog.records) == 2
    assert all(r.exc_info is None for r in caplog.records)
    last = caplog.records[1].getMessage()
    assert "4999 queries" in last
    for reason in HOSTILE:
        assert reason in last


def test_crash_tracebacks_are_kept_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]

    class Broken(FakeIPPool):
        def allocate(self, domain: str, family: int = 4):  # type: ignore[no-untyped-def]
            raise RuntimeError("bug")

    h = DnsHandler(DnsConfig(), Broken(IPv4Network("198.18.0.0/16")),
                   problems=ProblemLog(10.0, clock=lambda: now[0]))
    with caplog.at_level(logging.INFO, logger="mirage.dns"):
        for _ in range(100):
            assert answer(h, ask("a.com")).header.rcode == RCODE.SERVFAIL
        now[0] += 10.0
        h.handle(ask("a.com"))
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2 and h.servfail == 101
    assert len(caplog.records) <= 4


# -- RFC 2308: local negative answers carry an SOA ----------------------------------


def soa_of(rec: DNSRecord) -> tuple[str, int, int]:
    assert len(rec.auth) == 1 and rec.auth[0].rtype == QTYPE.SOA
    soa = rec.auth[0]
    return str(soa.rname), soa.ttl, soa.rdata.times[-1]


@pytest.mark.parametrize("fast_path", [True, False])
def test_local_nodata_carries_an_soa(fast_path: bool) -> None:
    cases = [
        (DnsConfig(), "www.example.com", "AAAA"),  # IPv6 off
        (DnsConfig(ipv6=True), "www.example.com", "AAAA"),  # no fake-ip-range6
    ]
    from ipaddress import ip_address

    cases.append((DnsConfig(hosts=(("router.lan", (ip_address("192.168.1.1"),)),)),
                  "router.lan", "AAAA"))
    for dns, name, qtype in cases:
        h = DnsHandler(dns, FakeIPPool(dns.fake_ip_range), fast_path=fast_path)
        rec = answer(h, ask(name, qtype, edns=True))
        assert rec.header.rcode == RCODE.NOERROR and not rec.rr
        assert soa_of(rec) == (name + ".", wire.NEGATIVE_TTL, wire.NEGATIVE_TTL)


def test_positive_and_upstream_bound_answers_have_no_soa() -> None:
    h, _ = make()
    rec = answer(h, ask("www.example.com", "A"))
    assert rec.rr and not rec.auth


def test_ptr_of_unmapped_fake_ip_is_nxdomain_with_an_soa() -> None:
    h, _ = make()
    rec = answer(h, ask("9.9.18.198.in-addr.arpa", "PTR"))
    assert rec.header.rcode == RCODE.NXDOMAIN
    assert soa_of(rec) == ("in-addr.arpa.", wire.NEGATIVE_TTL, wire.NEGATIVE_TTL)
