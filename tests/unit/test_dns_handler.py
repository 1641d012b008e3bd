"""The DNS handler, sans-I/O: feed query bytes, read the reply bytes back with
dnslib. Upstream replies are dnslib records built here (what the resolver
would return); the pool is the real one."""

from __future__ import annotations

import logging
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from dnslib import (
    AAAA,
    CLASS,
    CNAME,
    EDNS0,
    HTTPS,
    MX,
    QTYPE,
    RCODE,
    RD,
    RR,
    TXT,
    A,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
    EDNSOption,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config.model import DnsConfig
from appliance.dns import wire
from appliance.dns.handler import DnsHandler, UpstreamQuery, reverse_pointer, strip_svc_hints
from appliance.fakeip.pool import FakeIPPool

RANGE4 = IPv4Network("198.18.0.0/16")
RANGE6 = IPv6Network("fdfe:dcba:9876::/64")


def make(*, block_canary: bool = False, **kw: object) -> tuple[DnsHandler, FakeIPPool]:
    dns = DnsConfig(**kw)  # type: ignore[arg-type]
    pool = FakeIPPool(dns.fake_ip_range, dns.fake_ip_range6)
    return DnsHandler(dns, pool, block_canary=block_canary), pool


def ask(name: str, qtype: str = "A", *, qid: int = 4242, edns: bool = False,
        do: bool = False, qclass: str = "IN") -> bytes:
    rec = DNSRecord(
        DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype), getattr(CLASS, qclass))
    )
    if edns:
        rec.add_ar(EDNS0(udp_len=4096, flags="do" if do else ""))
    return bytes(rec.pack())


def answer(handler: DnsHandler, data: bytes) -> DNSRecord:
    out = handler.handle(data)
    assert isinstance(out, bytes), out
    return DNSRecord.parse(out)


def upstream(handler: DnsHandler, data: bytes) -> UpstreamQuery:
    out = handler.handle(data)
    assert isinstance(out, UpstreamQuery), out
    return out


def test_a_gets_fake_ip() -> None:
    h, pool = make()
    rec = answer(h, ask("www.Example.com"))
    assert rec.header.id == 4242 and rec.header.rcode == RCODE.NOERROR
    assert rec.header.aa and rec.header.ra and rec.header.rd and rec.header.qr
    [rr] = rec.rr
    ip = IPv4Address(str(rr.rdata))
    assert ip in RANGE4 and rr.ttl == 1 and rr.rtype == QTYPE.A
    assert str(rr.rname) == "www.Example.com."
    assert pool.reverse(ip) == "www.example.com"
    again = answer(h, ask("WWW.example.COM."))
    assert str(again.rr[0].rdata) == str(ip)
    assert h.queries == 2 and h.fake_answers == 2 and h.upstream == 0


def test_aaaa_when_ipv6_off_is_empty() -> None:
    h, _ = make()
    rec = answer(h, ask("v6.example.com", "AAAA"))
    assert rec.header.rcode == RCODE.NOERROR and not rec.rr
    h, _ = make(ipv6=True)  # no fake-ip-range6: fake names get nothing
    assert not answer(h, ask("v6.example.com", "AAAA")).rr


def test_aaaa_with_range6_gets_fake_ipv6() -> None:
    h, pool = make(ipv6=True, fake_ip_range6=RANGE6)
    rec = answer(h, ask("v6.example.com", "AAAA", edns=True))
    [rr] = rec.rr
    ip = IPv6Address(str(rr.rdata))
    assert ip in RANGE6 and rr.ttl == 1 and pool.reverse(ip) == "v6.example.com"


def test_blacklist_filter_goes_upstream() -> None:
    h, pool = make(fake_ip_filter=("+.lan", "time.*.com"))
    uq = upstream(h, ask("NAS.lan", qid=77, edns=True, do=True))
    req = uq.request
    assert req.q.qname == "nas.lan" and req.q.qtype == QTYPE.A and req.header.rd
    assert len(req.ar) == 1 and req.ar[0].rtype == QTYPE.OPT and req.ar[0].ttl & 0x8000
    reply = req.reply()
    reply.header.id = 999
    reply.add_answer(RR("NAS.lan", QTYPE.A, rdata=A("192.168.1.5"), ttl=300))
    reply.add_ar(EDNS0(udp_len=512))
    rec = DNSRecord.parse(uq.finish(reply))
    assert rec.header.id == 77 and rec.header.ra and not rec.header.aa
    assert str(rec.q.qname) == "NAS.lan."
    assert [str(r.rdata) for r in rec.rr] == ["192.168.1.5"]
    [opt] = rec.ar  # ours, not the upstream's
    assert opt.rclass == wire.EDNS_UDP_SIZE and opt.ttl & 0x8000
    assert pool.lookup("nas.lan") is None
    assert isinstance(h.handle(ask("time.apple.com")), UpstreamQuery)
    assert h.upstream == 2 and h.fake_answers == 0


def test_upstream_failure_is_servfail() -> None:
    h, _ = make()
    uq = upstream(h, ask("example.com", "MX", qid=5))
    rec = DNSRecord.parse(uq.finish(None))
    assert rec.header.id == 5 and rec.header.rcode == RCODE.SERVFAIL
    assert rec.q.qtype == QTYPE.MX
    assert h.servfail == 1


def test_whitelist_only_listed_names_are_fake() -> None:
    h, _ = make(fake_ip_filter=("+.proxied.com",), fake_ip_filter_mode="whitelist")
    rec = answer(h, ask("a.proxied.com"))
    assert IPv4Address(str(rec.rr[0].rdata)) in RANGE4
    assert isinstance(h.handle(ask("other.org")), UpstreamQuery)


def test_other_modes_never_fake() -> None:
    h, _ = make(enhanced_mode="redir-host")
    assert isinstance(h.handle(ask("example.com")), UpstreamQuery)


def test_hosts_answered_locally() -> None:
    hosts = (("router.lan", (ip_address("192.168.1.1"), ip_address("fd00::1"))),
             ("*.box.lan", (ip_address("192.168.1.9"),)))
    h, pool = make(hosts=hosts, ipv6=True)
    rec = answer(h, ask("Router.lan"))
    assert [str(r.rdata) for r in rec.rr] == ["192.168.1.1"] and rec.rr[0].ttl == 10
    rec = answer(h, ask("router.lan", "AAAA"))
    assert [str(r.rdata) for r in rec.rr] == ["fd00::1"]
    assert [str(r.rdata) for r in answer(h, ask("tv.box.lan")).rr] == ["192.168.1.9"]
    assert not answer(h, ask("tv.box.lan", "AAAA")).rr
    rec = answer(h, ask("1.1.168.192.in-addr.arpa", "PTR"))
    assert [str(r.rdata) for r in rec.rr] == ["router.lan."]
    assert len(pool) == 0 and h.local_answers == 5
    assert isinstance(h.handle(ask("router.lan", "MX")), UpstreamQuery)


def test_other_types_go_upstream() -> None:
    h, _ = make()
    for qtype in ("MX", "TXT", "SRV", "NS", "SOA", "CNAME", "HTTPS", "SVCB", "CAA"):
        uq = upstream(h, ask("example.com", qtype))
        assert uq.request.q.qtype == getattr(QTYPE, qtype)
    uq = upstream(h, ask("example.com", "TXT"))
    reply = uq.request.reply()
    reply.add_answer(RR("example.com", QTYPE.TXT, rdata=TXT("hello")))
    assert str(DNSRecord.parse(uq.finish(reply)).rr[0].rdata) == '"hello"'


def test_ptr_of_fake_ip() -> None:
    h, pool = make(ipv6=True, fake_ip_range6=RANGE6)
    ip4 = pool.allocate("mapped.example.com")
    ip6 = pool.allocate("six.example.com", 6)
    rec = answer(h, ask(ip4.reverse_pointer, "PTR"))
    assert [str(r.rdata) for r in rec.rr] == ["mapped.example.com."] and rec.header.aa
    rec = answer(h, ask(ip6.reverse_pointer, "PTR"))
    assert [str(r.rdata) for r in rec.rr] == ["six.example.com."]
    unmapped = IPv4Address("198.18.200.200")
    rec = answer(h, ask(unmapped.reverse_pointer, "PTR"))
    assert rec.header.rcode == RCODE.NXDOMAIN and not rec.rr
    assert isinstance(h.handle(ask("8.8.8.8.in-addr.arpa", "PTR")), UpstreamQuery)
    assert isinstance(h.handle(ask("18.198.in-addr.arpa", "PTR")), UpstreamQuery)


def test_reverse_pointer() -> None:
    assert reverse_pointer("4.3.2.1.in-addr.arpa") == IPv4Address("1.2.3.4")
    assert reverse_pointer("4.3.2.01.in-addr.arpa") is None
    assert reverse_pointer("4.3.2.256.in-addr.arpa") is None
    assert reverse_pointer("3.2.1.in-addr.arpa") is None
    v6 = IPv6Address("2001:db8::1")
    assert reverse_pointer(v6.reverse_pointer) == v6
    assert reverse_pointer(v6.reverse_pointer.replace("b", "g")) is None


def _svc_rdata(params: list[tuple[int, bytes]], target: bytes = b"\x00", prio: int = 1) -> bytes:
    body = b"".join(struct.pack("!HH", k, len(v)) + v for k, v in params)
    return struct.pack("!H", prio) + target + body


def test_strip_svc_hints() -> None:
    alpn = (1, b"\x02h3\x02h2")
    v4 = (4, bytes([1, 2, 3, 4]))
    v6 = (6, IPv6Address("2001:db8::1").packed)
    mandatory = (0, struct.pack("!HH", 1, 4))
    got = strip_svc_hints(_svc_rdata([mandatory, alpn, v4, (5, b"ech"), v6]))
    assert got == _svc_rdata([(0, struct.pack("!H", 1)), alpn, (5, b"ech")])
    assert strip_svc_hints(_svc_rdata([(0, struct.pack("!H", 4)), v4])) == _svc_rdata([])
    alias = _svc_rdata([], target=b"\x03svc\x00", prio=0)
    assert strip_svc_hints(alias) == alias
    assert strip_svc_hints(_svc_rdata([alpn])[:-1]) is None
    assert strip_svc_hints(b"\x00") is None


def test_https_for_fake_name_loses_hints() -> None:
    h, _ = make(fake_ip_filter=("real.example.com",))
    record = HTTPS.fromZone(["1", ".", "alpn=h3,h2", "ipv4hint=104.16.132.229",
                             "ipv6hint=2606:4700::6810:84e5"])
    for name, stripped in (("www.example.com", True), ("real.example.com", False)):
        uq = upstream(h, ask(name, "HTTPS"))
        reply = uq.request.reply()
        reply.add_answer(RR(name, QTYPE.HTTPS, rdata=record, ttl=300))
        reply.add_ar(RR(name, QTYPE.A, rdata=A("104.16.132.229")))
        rec = DNSRecord.parse(uq.finish(reply))
        [rr] = rec.rr
        text = str(rr.rdata)
        assert "alpn=h3,h2" in text
        assert ("ipv4hint" in text) is not stripped and ("ipv6hint" in text) is not stripped
        assert bool(rec.ar) is not stripped
    # SVCB (type 64): dnslib keeps it as raw bytes; the edit still applies.
    uq = upstream(h, ask("www.example.com", "SVCB"))
    reply = uq.request.reply()
    raw = _svc_rdata([(1, b"\x02h3"), (4, bytes([9, 9, 9, 9]))])
    reply.add_answer(RR("www.example.com", QTYPE.SVCB, rdata=RD(raw)))
    rec = DNSRecord.parse(uq.finish(reply))
    assert rec.rr[0].rdata.data == _svc_rdata([(1, b"\x02h3")])


def test_any_for_fake_name_gets_only_the_fake_a() -> None:
    h, _ = make()
    rec = answer(h, ask("example.com", "ANY"))
    [rr] = rec.rr
    assert rr.rtype == QTYPE.A and IPv4Address(str(rr.rdata)) in RANGE4


def test_pool_exhausted_is_servfail_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    h, pool = make(fake_ip_range=IPv4Network("198.18.0.0/29"))
    for i in range(16):  # pin every address of the tiny range
        ip = pool.allocate(f"pinned{i}.example.com")
        if pool.pin(ip) is None or len(pool) == 6:
            break
    with caplog.at_level(logging.ERROR, logger="mirage.dns"):
        for qid in (1, 2, 3):
            rec = answer(h, ask("new.example.com", qid=qid))
            assert rec.header.rcode == RCODE.SERVFAIL and not rec.rr and rec.header.id == qid
    lines = [r for r in caplog.records if r.name == "mirage.dns"]
    assert len(lines) == 1 and "exhausted" in lines[0].getMessage()
    assert h.servfail == 3
    general = DnsHandler(DnsConfig(fake_ip_range=IPv4Network("198.18.0.0/29")), pool,
                         fast_path=False)
    for data in (ask("new.example.com"), ask("new.example.com", edns=True, do=True)):
        assert general.handle(data) == h.handle(data)


class _BrokenPool(FakeIPPool):
    """Fault injection: a pool whose allocate has a bug."""

    def allocate(self, domain: str, family: int = 4) -> IPv4Address | IPv6Address:
        raise RuntimeError("bug")


def test_crash_is_servfail(caplog: pytest.LogCaptureFixture) -> None:
    for fast_path in (True, False):
        h = DnsHandler(DnsConfig(), _BrokenPool(RANGE4), fast_path=fast_path)
        with caplog.at_level(logging.ERROR, logger="mirage.dns"):
            rec = answer(h, ask("a.com", qid=9, edns=True))
        assert rec.header.id == 9 and rec.header.rcode == RCODE.SERVFAIL
        assert str(rec.q.qname) == "a.com." and h.servfail == 1
    assert any("RuntimeError" in (r.exc_text or "") for r in caplog.records)


def test_malformed_input() -> None:
    h, _ = make()
    assert h.handle(b"") == b""
    assert h.handle(b"\x01\x02\x03") == b""
    rec = DNSRecord.parse(h.handle(b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07exa"))
    assert rec.header.id == 0xBEEF and rec.header.rcode == RCODE.FORMERR
    response = bytes(DNSRecord.question("a.com").reply().pack())
    assert h.handle(response) == b""
    assert h.formerr == 1


def test_protocol_edges() -> None:
    h, _ = make()
    q = DNSRecord.question("a.com")
    q.header.opcode = 2  # STATUS
    assert answer(h, bytes(q.pack())).header.rcode == RCODE.NOTIMP
    assert answer(h, ask("version.bind", "TXT", qclass="CH")).header.rcode == RCODE.REFUSED
    q = DNSRecord.question("a.com")
    q.add_ar(EDNS0(udp_len=1232, version=1))
    rec = answer(h, bytes(q.pack()))
    assert rec.header.rcode == 0 and rec.ar[0].ttl >> 24 == 1  # BADVERS = 16
    two = DNSRecord.question("a.com")
    two.add_question(DNSQuestion("b.com"))
    assert answer(h, bytes(two.pack())).header.rcode == RCODE.FORMERR


def test_stats() -> None:
    h, _ = make()
    h.handle(ask("a.com"))
    h.handle(ask("a.com", "MX"))
    h.handle(b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff")
    assert h.stats() == {"queries": 3, "fake_answers": 1, "local_answers": 0,
                         "upstream": 1, "formerr": 1, "servfail": 0, "fake_ip_refused": 0}


# -- the fast path and the general path give the same bytes --------------------

LABEL = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1, max_size=63,
)
NAMES = st.lists(LABEL, min_size=1, max_size=8).map(".".join).filter(lambda n: len(n) <= 253)
FLAGS = st.sampled_from([0x0000, 0x0100, 0x0010, 0x0020, 0x0040, 0x0130, 0x0170])


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    name = draw(st.one_of(NAMES, st.sampled_from(["Router.lan", "x.LAN", "tv.box.lan"])))
    rec = DNSRecord(
        DNSHeader(id=draw(st.integers(0, 0xFFFF)), bitmap=draw(FLAGS)),
        q=DNSQuestion(name, draw(st.sampled_from([QTYPE.A, QTYPE.AAAA]))),
    )
    if draw(st.booleans()):
        opts = draw(st.lists(st.builds(EDNSOption, st.integers(1, 20), st.binary(max_size=8)),
                             max_size=2))
        rec.add_ar(EDNS0(udp_len=draw(st.integers(0, 0xFFFF)),
                         flags=draw(st.sampled_from(["", "do"])), opts=opts))
    return bytes(rec.pack())


@pytest.mark.parametrize("ipv6", [False, True])
def test_fast_and_general_paths_agree(ipv6: bool) -> None:
    dns = DnsConfig(
        ipv6=ipv6, fake_ip_range6=RANGE6 if ipv6 else None,
        fake_ip_filter=("+.lan",),
        hosts=(("router.lan", (ip_address("192.168.1.1"), ip_address("fd00::1"))),
               ("*.box.lan", (ip_address("192.168.1.9"), ip_address("192.168.1.10")))),
    )
    pool = FakeIPPool(dns.fake_ip_range, dns.fake_ip_range6)
    fast = DnsHandler(dns, pool)
    general = DnsHandler(dns, pool, fast_path=False)

    @settings(max_examples=400, deadline=None)
    @given(queries())
    def check(data: bytes) -> None:
        assert wire.parse_query(data) is not None
        a, b = fast.handle(data), general.handle(data)
        if isinstance(a, UpstreamQuery):
            assert isinstance(b, UpstreamQuery)
            assert a.request.pack() == b.request.pack()
        else:
            assert a == b

    check()
    assert fast.fake_answers > 0 and fast.local_answers > 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    h, _ = make()
    out = h.handle(data)
    assert isinstance(out, bytes | UpstreamQuery)
    if isinstance(out, UpstreamQuery):
        assert isinstance(out.finish(None), bytes)


def test_mx_reply_loses_glue_of_fake_ip_names() -> None:
    h, _ = make(fake_ip_filter=("+.lan",))
    uq = upstream(h, ask("example.com", "MX"))
    reply = uq.request.reply()
    reply.add_answer(RR("example.com", QTYPE.MX, rdata=MX("mx.example.com", 10)))
    reply.add_answer(RR("example.com", QTYPE.MX, rdata=MX("mail.lan", 20)))
    reply.add_ar(RR("mx.example.com", QTYPE.AAAA, rdata=AAAA("2001:db8::25")))
    reply.add_ar(RR("mx.example.com", QTYPE.A, rdata=A("192.0.2.25")))
    reply.add_ar(RR("mail.lan", QTYPE.A, rdata=A("192.168.1.25")))
    rec = DNSRecord.parse(uq.finish(reply))
    assert [str(r.rdata) for r in rec.rr] == ["10 mx.example.com.", "20 mail.lan."]
    assert [(str(r.rname), str(r.rdata)) for r in rec.ar] == [("mail.lan.", "192.168.1.25")]


def test_a_reply_for_filtered_name_keeps_its_cname_chain() -> None:
    h, _ = make(fake_ip_filter=("real.example.com",))
    uq = upstream(h, ask("real.example.com"))
    reply = uq.request.reply()
    reply.add_answer(RR("real.example.com", QTYPE.CNAME, rdata=CNAME("cdn.example.net")))
    reply.add_answer(RR("cdn.example.net", QTYPE.A, rdata=A("192.0.2.80")))
    rec = DNSRecord.parse(uq.finish(reply))
    assert [str(r.rdata) for r in rec.rr] == ["cdn.example.net.", "192.0.2.80"]


# -- fair shares: new fake IPs per second per client ------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_new_fake_ips_over_a_clients_rate_get_servfail_never_a_recycled_address(
        fast: bool) -> None:
    from appliance.limits import RateLimit

    dns = DnsConfig()
    pool = FakeIPPool(dns.fake_ip_range)
    now = [100.0]
    rate = RateLimit(rate=2, burst=3)
    h = DnsHandler(dns, pool, fast_path=fast, fake_ip_rate=rate, clock=lambda: now[0])
    first = [DNSRecord.parse(h.handle(ask(f"n{i}.test"), "192.168.56.10")) for i in range(5)]
    assert [r.header.rcode for r in first] == [0, 0, 0, 2, 2]  # burst 3, then SERVFAIL
    assert all(not r.rr for r in first[3:])
    assert len(pool) == 3  # nothing allocated (so nothing recycled) for the refused
    # A name already mapped is always answered, whoever asks.
    again = DNSRecord.parse(h.handle(ask("n0.test"), "192.168.56.10"))
    assert again.header.rcode == 0 and str(again.rr[0].rdata) == str(first[0].rr[0].rdata)
    # Another client has its own bucket; no client (the API, tests): no rate.
    assert DNSRecord.parse(h.handle(ask("other.test"), "192.168.56.21")).header.rcode == 0
    assert DNSRecord.parse(h.handle(ask("free.test"))).header.rcode == 0
    # The bucket refills at the rate: one more name after half a second.
    now[0] += 0.5
    assert DNSRecord.parse(h.handle(ask("n3.test"), "192.168.56.10")).header.rcode == 0
    assert DNSRecord.parse(h.handle(ask("n4.test"), "192.168.56.10")).header.rcode == 2
    assert h.stats()["fake_ip_refused"] == 3
    assert rate.stats()["top_refused"] == [{"client": "192.168.56.10", "refused": 3}]
@pytest.mark.parametrize("fast_path", [True, False])
def test_application_dns_canary_is_nxdomain_only_when_blocking(fast_path: bool) -> None:
    handler, pool = make(block_canary=True, ipv6=True, fake_ip_range6=RANGE6)
    handler._fast = fast_path
    for qtype in ("A", "AAAA", "HTTPS", "TXT"):
        for name in ("use-application-dns.net", "USE-application-dns.NET."):
            reply = answer(handler, ask(name, qtype))
            assert reply.header.rcode == RCODE.NXDOMAIN, (name, qtype)
            assert not reply.rr
            assert [r.rtype for r in reply.auth] == [QTYPE.SOA]  # cacheable (RFC 2308)
    assert len(pool) == 0  # no fake IP spent on it
    # Other names are untouched; without the option the canary is an
    # ordinary name (a fake IP; other types upstream).
    assert answer(handler, ask("www.example.com")).short()
    plain, _ = make()
    assert answer(plain, ask("use-application-dns.net")).header.rcode == RCODE.NOERROR
    upstream(plain, ask("use-application-dns.net", "TXT"))
