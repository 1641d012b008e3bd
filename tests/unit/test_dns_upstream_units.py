"""Pure parts of the upstream resolver: cache, DoH codec, policy, reply checks."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlsplit

import pytest
from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from appliance.config.model import DnsConfig, DomainPolicy, Nameserver
from appliance.dns.cache import DnsCache, cache_key, cache_ttl
from appliance.dns.doh import (
    DNS_MESSAGE,
    DohError,
    b64url_decode,
    b64url_encode,
    decode_response,
    encode_request,
    with_zero_id,
)
from appliance.dns.upstream import Resolver, doh_method, reply_problem


def answer(name: str, ttls: list[int], qtype: str = "A") -> DNSRecord:
    request = DNSRecord.question(name, qtype)
    reply = request.reply()
    for i, ttl in enumerate(ttls):
        rdata = A(f"192.0.2.{i + 1}") if qtype == "A" else AAAA(f"2001:db8::{i + 1}")
        reply.add_answer(RR(name, getattr(QTYPE, qtype), rdata=rdata, ttl=ttl))
    return reply


def negative(name: str, rcode: int, soa_ttl: int, minimum: int) -> DNSRecord:
    reply = DNSRecord.question(name, "A").reply()
    reply.header.rcode = rcode
    soa = SOA("ns.lab.test", "hostmaster.lab.test", (1, 3600, 600, 86400, minimum))
    reply.add_auth(RR("lab.test", QTYPE.SOA, rdata=soa, ttl=soa_ttl))
    return reply


# -- cache -----------------------------------------------------------------------


def test_cache_returns_decremented_ttls_and_the_requests_id() -> None:
    cache = DnsCache(10)
    assert cache.put(answer("www.lab.test", [300, 100]), now=1000.0)
    request = DNSRecord.question("WWW.Lab.Test", "A")
    request.header.id = 4242
    hit = cache.get(request, now=1040.5)
    assert hit is not None
    assert hit.header.id == 4242
    assert [rr.ttl for rr in hit.rr] == [260, 60]
    assert str(hit.q.qname) == "WWW.Lab.Test."  # question echoed as asked
    assert [str(rr.rdata) for rr in hit.rr] == ["192.0.2.1", "192.0.2.2"]


def test_cache_expires_at_the_smallest_answer_ttl() -> None:
    cache = DnsCache(10)
    cache.put(answer("www.lab.test", [300, 100]), now=0.0)
    request = DNSRecord.question("www.lab.test", "A")
    assert cache.get(request, now=99.9) is not None
    assert cache.get(request, now=100.0) is None
    assert len(cache) == 0  # the expired entry is dropped


def test_cache_key_separates_type_and_class() -> None:
    cache = DnsCache(10)
    cache.put(answer("www.lab.test", [300]), now=0.0)
    assert cache.get(DNSRecord.question("www.lab.test", "AAAA"), now=1.0) is None
    assert cache.get(DNSRecord.question("www.lab.test", "A", "CH"), now=1.0) is None
    assert cache_key(DNSRecord.question("WWW.LAB.TEST", "A")) == ("www.lab.test.", 1, 1)


def test_negative_answers_cache_for_soa_minimum_rfc2308() -> None:
    cache = DnsCache(10)
    nx = negative("nx.lab.test", RCODE.NXDOMAIN, soa_ttl=3600, minimum=30)
    assert cache_ttl(nx) == 30
    assert cache.put(nx, now=0.0)
    hit = cache.get(DNSRecord.question("nx.lab.test", "A"), now=10.0)
    assert hit is not None
    assert hit.header.rcode == RCODE.NXDOMAIN
    assert hit.auth[0].ttl == 3590
    assert cache.get(DNSRecord.question("nx.lab.test", "A"), now=30.0) is None
    # NODATA (NOERROR, no answer) too, bounded by the SOA's own TTL.
    assert cache_ttl(negative("a.lab.test", RCODE.NOERROR, soa_ttl=5, minimum=30)) == 5


def test_uncacheable_replies_are_not_stored() -> None:
    cache = DnsCache(10)
    servfail = DNSRecord.question("x.lab.test", "A").reply()
    servfail.header.rcode = RCODE.SERVFAIL
    no_soa = DNSRecord.question("y.lab.test", "A").reply()
    no_soa.header.rcode = RCODE.NXDOMAIN
    refused = negative("z.lab.test", RCODE.REFUSED, 60, 60)
    for reply in (servfail, no_soa, refused, answer("zero.lab.test", [0])):
        assert not cache.put(reply, now=0.0)
    assert len(cache) == 0


def test_cache_is_lru_bounded() -> None:
    cache = DnsCache(3)
    for i in range(3):
        cache.put(answer(f"n{i}.lab.test", [300]), now=0.0)
    # Touch n0 so n1 is the least recently used when n3 arrives.
    assert cache.get(DNSRecord.question("n0.lab.test", "A"), now=1.0) is not None
    cache.put(answer("n3.lab.test", [300]), now=2.0)
    assert len(cache) == 3
    present = {
        i for i in range(4) if cache.get(DNSRecord.question(f"n{i}.lab.test", "A"), 3.0)
    }
    assert present == {0, 2, 3}


def test_cache_caps_ttl_and_keeps_edns_flags() -> None:
    cache = DnsCache(10, max_ttl=60)
    reply = answer("www.lab.test", [999999])
    reply.add_ar(EDNS0(flags="do", udp_len=1232))
    opt_ttl = reply.ar[0].ttl
    assert opt_ttl != 0
    cache.put(reply, now=0.0)
    hit = cache.get(DNSRecord.question("www.lab.test", "A"), now=59.0)
    assert hit is not None
    assert hit.ar[0].ttl == opt_ttl  # EDNS flags live in the OPT "TTL"
    assert cache.get(DNSRecord.question("www.lab.test", "A"), now=60.0) is None


def test_zero_size_cache_stores_nothing() -> None:
    cache = DnsCache(0)
    assert not cache.put(answer("www.lab.test", [300]), now=0.0)


# -- DoH codec -----------------------------------------------------------------


@given(st.binary(max_size=600))
def test_b64url_round_trips_without_padding(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64url_decode(text) == data


def test_rfc8484_get_example() -> None:
    # RFC 8484 section 4.1.1: www.example.com A, ID 0, RD set.
    query = DNSRecord.question("www.example.com", "A")
    query.header.id = 0
    request = encode_request(query.pack(), "/dns-query", "GET")
    assert request.method == "GET"
    assert request.body == b""
    assert request.target == "/dns-query?dns=AAABAAABAAAAAAAAA3d3dwdleGFtcGxlA2NvbQAAAQAB"
    assert ("accept", DNS_MESSAGE) in request.headers


def test_get_appends_to_an_existing_query_string() -> None:
    wire = DNSRecord.question("a.lab.test", "AAAA").pack()
    request = encode_request(wire, "/resolve?ct=x", "GET")
    parts = urlsplit(request.target)
    params = parse_qs(parts.query)
    assert params["ct"] == ["x"]
    assert b64url_decode(params["dns"][0]) == wire


def test_post_carries_the_message_as_body() -> None:
    wire = DNSRecord.question("a.lab.test", "A").pack()
    request = encode_request(wire)
    assert request.method == "POST"
    assert request.target == "/dns-query"
    assert request.body == wire
    assert dict(request.headers) == {"accept": DNS_MESSAGE, "content-type": DNS_MESSAGE}


def test_query_id_is_zeroed_for_doh() -> None:
    query = DNSRecord.question("a.lab.test", "A")
    query.header.id = 0xBEEF
    zeroed = DNSRecord.parse(with_zero_id(query.pack()))
    assert zeroed.header.id == 0
    assert zeroed.q == query.q


def test_decode_response_accepts_a_dns_message() -> None:
    wire = answer("www.lab.test", [60]).pack()
    assert decode_response(200, "application/dns-message", wire) == wire
    assert decode_response(200, "Application/DNS-Message; charset=x", wire) == wire


@pytest.mark.parametrize(
    ("status", "ctype", "body", "reason"),
    [
        (502, DNS_MESSAGE, b"x" * 20, "status 502"),
        (200, "text/html", b"x" * 20, "content type"),
        (200, None, b"x" * 20, "content type"),
        (200, DNS_MESSAGE, b"\x00" * 5, "no DNS message"),
        (200, DNS_MESSAGE, DNSRecord.question("a.b", "A").pack(), "query"),
    ],
)
def test_decode_response_rejects(status: int, ctype: str | None, body: bytes, reason: str) -> None:
    with pytest.raises(DohError, match=reason):
        decode_response(status, ctype, body)


@given(st.binary(max_size=100))
def test_decode_response_never_raises_anything_but_doherror(body: bytes) -> None:
    try:
        decode_response(200, DNS_MESSAGE, body)
    except DohError:
        pass


def test_get_method_is_a_per_nameserver_url_fragment() -> None:
    assert doh_method(Nameserver("https", "dns.lab.test", 443, text="https://dns.lab.test/q")) == (
        "POST"
    )
    get = Nameserver("https", "dns.lab.test", 443, text="https://dns.lab.test/q#method=GET")
    assert doh_method(get) == "GET"
    both = Nameserver("https", "x", 443, text="https://x/q#PROXY&method=get")
    assert doh_method(both) == "GET"


# -- reply checks and policy -------------------------------------------------------


def test_reply_problem() -> None:
    request = DNSRecord.question("www.lab.test", "A")
    assert reply_problem(request, answer("www.lab.test", [1])) is None
    assert reply_problem(request, answer("WWW.LAB.TEST", [1])) is None
    nx = negative("www.lab.test", RCODE.NXDOMAIN, 1, 1)
    assert reply_problem(request, nx) is None
    assert reply_problem(request, answer("other.lab.test", [1])) == "reply is for another question"
    assert reply_problem(request, request) == "not a response"
    fail = request.reply()
    fail.header.rcode = RCODE.SERVFAIL
    assert reply_problem(request, fail) == "rcode SERVFAIL"


def ns(host: str) -> Nameserver:
    return Nameserver("udp", host, 53)


def test_policy_selects_first_matching_entry_in_config_order() -> None:
    dns = DnsConfig(
        nameserver=(ns("192.0.2.1"),),
        nameserver_policy=(
            DomainPolicy("+.corp.lab.test", (ns("192.0.2.2"),)),
            DomainPolicy("*.lab.test", (ns("192.0.2.3"),)),
            DomainPolicy("exact.test", (ns("192.0.2.4"), ns("192.0.2.5"))),
        ),
    )
    resolver = Resolver(dns)  # no I/O before `async with`

    def hosts(name: str) -> list[str]:
        return [n.host for n in resolver.nameservers_for(name)]

    assert hosts("corp.lab.test") == ["192.0.2.2"]
    assert hosts("a.b.corp.lab.test") == ["192.0.2.2"]
    assert hosts("www.lab.test.") == ["192.0.2.3"]
    assert hosts("a.www.lab.test") == ["192.0.2.1"]  # `*` is one label only
    assert hosts("lab.test") == ["192.0.2.1"]
    assert hosts("Exact.Test") == ["192.0.2.4", "192.0.2.5"]
    assert hosts("sub.exact.test") == ["192.0.2.1"]
    assert hosts("elsewhere.example") == ["192.0.2.1"]


async def test_query_outside_async_with_fails_cleanly() -> None:
    from appliance.dns.upstream_api import UpstreamError

    resolver = Resolver(DnsConfig(nameserver=(ns("192.0.2.1"),)))
    with pytest.raises(UpstreamError, match="outside"):
        await resolver.query(DNSRecord.question("www.lab.test", "A"))


def test_b64_matches_stdlib_urlsafe() -> None:
    data = bytes(range(256))
    assert b64url_encode(data) == base64.urlsafe_b64encode(data).decode().rstrip("=")
