"""The DNS query handler: bytes in, bytes (or "ask upstream") out. No I/O.

The chain follows mihomo's `dns/middleware.go`: hosts -> fake IP -> resolver.

- `hosts` names are answered here with their configured addresses (A/AAAA,
  and PTR for those addresses): resolved for real without asking anyone.
- A and AAAA for a name that gets a fake IP (`enhanced-mode: fake-ip`, and
  the name is outside the blacklist / inside the whitelist of
  `fake-ip-filter`) are answered from the pool with TTL 1, AA=1. With IPv6
  off (`dns.ipv6` false) every AAAA gets an empty NOERROR, as in mihomo; with
  `dns.ipv6` on but no `fake-ip-range6`, fake-IP names get an empty AAAA.
- PTR for an address inside a fake range is answered from the pool
  (NXDOMAIN when the address is unmapped).
- ANY for a fake-IP name gets its fake A record only (RFC 8482 lets a server
  answer ANY with a subset), so ANY cannot leak real addresses.
- Everything else goes upstream: `handle` returns an `UpstreamQuery`; the
  server awaits the resolver and calls `finish(reply)`.
- HTTPS/SVCB replies for fake-IP names lose their ipv4hint/ipv6hint SvcParams
  and any A/AAAA records, which would hand the client the real addresses and
  let it bypass the fake IP; alpn, port, ech and the rest stay, so HTTP/3
  discovery still works. dnslib parses HTTPS (type 65) but not SVCB (64), so
  the edit works on the RDATA bytes of both (RFC 9460 2.2, `strip_svc_hints`).
  Likewise any other upstream reply (MX, SRV, NS, ...) loses the A/AAAA
  records of names that get fake IPs (additional-section glue): the client
  asks for them and gets the fake IP. Replies to A/AAAA questions (filtered
  names) pass unchanged, CNAME chains included.

Fair shares: with a `fake_ip_rate` (appliance/limits.py RateLimit) a
client (the `client` the server passes `handle`: its IPv4 address or IPv6
/64) may cause at most so many *new* fake-IP mappings per second. A name
that already has a fake IP is always answered; a new name over the rate
gets SERVFAIL (the same "try again" the global upstream bound gives, which
stub resolvers retry and do not cache for long, RFC 2308 7.1), never an
address taken from another name. Counted in `fake_ip_refused`.

With `appliance.block-encrypted-dns` (`block_canary=True`), the canary
name `use-application-dns.net` gets NXDOMAIN whatever the type: Firefox's
documented signal that the network filters DNS, on which it turns its
default DNS over HTTPS off and uses the system resolver (Mirage). Only that
name: Firefox asks for nothing below it.

Negative answers made here (NODATA for a hosts name without an address of
the family, AAAA with IPv6 off or without `fake-ip-range6`; NXDOMAIN for the
PTR of an unmapped fake IP) carry an SOA in the authority section with a
TTL of `wire.NEGATIVE_TTL`, so clients can cache them (RFC 2308).

Failure handling lives in exactly one place, `DnsHandler._guard`: input that
does not parse gets FORMERR (nothing at all when not even a header can be
read, or when it is a response), and an exception anywhere else gets
SERVFAIL. `handle` and `finish` never raise. Hostile input is cheap: a
malformed name (a label over 63 bytes, a name over 255, a pointer loop) is
caught by one walk over the bytes (`wire.malformed`) before dnslib sees it,
and none of it is logged per packet: `ProblemLog` counts queries by reason
and writes one line per interval (the first traceback of a handler crash in
an interval is kept, the others counted).

A/AAAA queries of the common shape skip dnslib entirely (wire.py): the
answers are the same bytes either way (tests/unit/test_dns_handler.py).
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from dnslib import (
    AAAA,
    EDNS0,
    PTR,
    RD,
    RR,
    A,
    DNSBuffer,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from appliance.config.model import FAKE_IP_TTL, DnsConfig, IPAddress
from appliance.dns import wire
from appliance.dns.policy import FakeIpFilter
from appliance.dns.wire import (
    CLASS_IN,
    EDNS_UDP_SIZE,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_HTTPS,
    TYPE_OPT,
    TYPE_PTR,
    TYPE_SOA,
    TYPE_SVCB,
)
from appliance.fakeip.pool import FakeIPPool, PoolExhausted
from appliance.limits import RateLimit
from appliance.names import DomainTrie, name_from_labels
from appliance.rules.engine import EMPTY_ENV, RuleEnv

log = logging.getLogger("mirage.dns")

# What a `hosts` answer is cached for (mihomo's hosts middleware uses 10 s).
HOSTS_TTL = 10
# At most one "pool exhausted" line per this many seconds (the condition can
# hit every query for a while; the count of the silenced ones is logged).
EXHAUSTED_LOG_INTERVAL = 10.0
# At most one line about malformed queries and handler crashes per this many
# seconds: a hostile client can send thousands a second.
PROBLEM_LOG_INTERVAL = 10.0

_F_AD = 0x0020
_RCODE_BADVERS = 16  # RFC 6891 9: extended RCODE, upper 8 bits go in the OPT TTL

# Firefox's canary domain (support.mozilla.org, "Canary domain -
# use-application-dns.net"): NXDOMAIN turns its default DoH off.
APPLICATION_DNS_CANARY = "use-application-dns.net"

# (rcode, packed addresses, TTL) of an A/AAAA answer made here.
Local = tuple[int, Sequence[bytes], int]
_Arg = TypeVar("_Arg")


class ProblemLog:
    """Counts of queries answered FORMERR/SERVFAIL (or dropped) for a reason,
    written as one log line per `interval`, never a line per packet.

    `note` counts; the first note after a quiet interval is reported at once,
    later ones wait for `report` (the DNS service calls it every interval) or
    for the next note after the interval. A handler crash also keeps its
    traceback: the first one of each interval is logged with it, the rest
    are counted. Owns nothing but counters; `clock` is injectable for tests.
    """

    def __init__(
        self, interval: float = PROBLEM_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._since = clock()
        self._reported_at = -interval - 1.0  # the first note reports at once
        self._traceback_at = -interval - 1.0
        self.total = 0

    def note(self, reason: str) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        self.total += 1
        if self._clock() - self._reported_at >= self.interval:
            self.report()

    def crash(self, reason: str, data: bytes) -> None:
        """A bug met on query `data` (reason: "handler crash", "upstream
        raised"): counted; logged with its traceback (call from the `except`
        block) only if no traceback was logged this interval."""
        now = self._clock()
        if now - self._traceback_at >= self.interval:
            self._traceback_at = now
            log.exception("DNS %s on query %s (SERVFAIL)", reason, data[:64].hex())
        self.note(reason)

    def report(self, force: bool = False) -> None:
        """Write the counts gathered since the last line, if an interval has
        passed (or `force`) and there are any."""
        now = self._clock()
        if not self._counts or (not force and now - self._reported_at < self.interval):
            return
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self._counts.items()))
        log.warning(
            "DNS: %d queries not answered normally in the last %.0f s: %s",
            sum(self._counts.values()), max(now - self._since, 0.0), counts,
        )
        self._counts = {}
        self._since = self._reported_at = now


class UpstreamQuery:
    """A query the handler cannot answer alone.

    `request` is what to ask the upstream resolver (one question, RD=1, EDNS
    with our UDP size and the client's DO bit). `finish(reply)` turns the
    resolver's reply into the bytes for the client (the client's ID, question
    and EDNS; HTTPS/SVCB hints stripped for fake-IP names), or into SERVFAIL
    when `reply` is None (the upstream failed or timed out). Never raises.
    """

    __slots__ = ("_data", "_handler", "_opt", "_query", "_strip", "request")

    def __init__(
        self,
        handler: DnsHandler,
        data: bytes,
        query: DNSRecord,
        opt: RR | None,
        request: DNSRecord,
        strip: bool,
    ) -> None:
        self._handler = handler
        self._data = data
        self._query = query
        self._opt = opt
        self._strip = strip
        self.request = request

    @property
    def data(self) -> bytes:
        """The client's query as received."""
        return self._data

    @property
    def problems(self) -> ProblemLog:
        """Where the service counts what went wrong with this query."""
        return self._handler.problems

    def finish(self, reply: DNSRecord | None) -> bytes:
        result = self._handler._guard(self._data, self._finish, reply)
        assert isinstance(result, bytes)
        return result

    def _finish(self, reply: DNSRecord | None) -> bytes:
        query = self._query
        if reply is None:
            return _reply(query, self._opt, RCODE_SERVFAIL, aa=False)
        rr, auth = list(reply.rr), list(reply.auth)
        ar = [r for r in reply.ar if r.rtype != TYPE_OPT]
        if query.q.qtype not in (TYPE_A, TYPE_AAAA):
            rr, auth, ar = (self._scrub(s) for s in (rr, auth, ar))
        flags = wire.reply_flags(query.header.bitmap, reply.header.rcode, aa=False)
        flags |= reply.header.bitmap & wire._F_TC
        if query.header.ad or (self._opt is not None and _do(self._opt)):
            flags |= reply.header.bitmap & _F_AD  # RFC 6840 5.8
        out = DNSRecord(
            DNSHeader(id=query.header.id, bitmap=flags),
            questions=list(query.questions),
            rr=rr,
            auth=auth,
            ar=ar,
        )
        if self._opt is not None:
            out.add_ar(_our_opt(_do(self._opt)))
        return bytes(out.pack())

    def _scrub(self, records: list[RR]) -> list[RR]:
        """Records of a (non-A/AAAA) upstream reply, minus what would hand the
        client a real address for a fake-IP name: A/AAAA records owned by
        such names (e.g. the additional section of MX/SRV/NS replies) and,
        for HTTPS/SVCB asked for a fake-IP name, every A/AAAA record and the
        address hints (the client resolves the target and gets a fake IP)."""
        out = []
        for rr in records:
            if rr.rtype in (TYPE_A, TYPE_AAAA):
                owner = name_from_labels(rr.rname.label)
                if self._strip or (owner and self._handler.wants_fake_ip(owner)):
                    continue
            elif self._strip and rr.rtype in (TYPE_SVCB, TYPE_HTTPS):
                buf = DNSBuffer()
                rr.rdata.pack(buf)
                stripped = strip_svc_hints(bytes(buf.data))
                if stripped is None:
                    continue  # malformed: drop it rather than pass hints through
                rr = RR(rr.rname, rr.rtype, rr.rclass, rr.ttl, RD(stripped))
            out.append(rr)
        return out


class DnsHandler:
    """Answers DNS queries for the appliance from the config, hosts and pool.

    Owns no resources: the pool is shared with the gateway (which reverses fake
    IPs) and is only asked to allocate/reverse here. Stats are plain ints the
    metrics read: `queries`, `fake_answers`, `local_answers` (hosts, PTR,
    empty AAAA, the canary), `upstream`, `formerr`, `servfail`,
    `fake_ip_refused` (new names over the client's `fake_ip_rate`).
    `fast_path=False` forces every query through dnslib (the tests compare
    both paths). `block_canary`: answer APPLICATION_DNS_CANARY with NXDOMAIN
    (`appliance.block-encrypted-dns`; fixed for the handler's life, like the
    capture rules that go with it). `clock` (seconds, monotonic) feeds the
    rate limit; injectable for tests.
    """

    def __init__(
        self,
        dns: DnsConfig,
        pool: FakeIPPool,
        *,
        fast_path: bool = True,
        problems: ProblemLog | None = None,
        fake_ip_rate: RateLimit | None = None,
        clock: Callable[[], float] = time.monotonic,
        block_canary: bool = False,
        env: RuleEnv = EMPTY_ENV,
    ) -> None:
        self._pool = pool
        self._env = env
        self._block_canary = block_canary
        self._fast = fast_path
        self._fake_ip_rate = fake_ip_rate
        self._clock = clock
        self.fake_ip_refused = 0
        # The client of the query being handled (`handle` is not re-entered).
        self._client: str | None = None
        self.problems = problems if problems is not None else ProblemLog()
        self.queries = 0
        self.fake_answers = 0
        self.local_answers = 0
        self.upstream = 0
        self.formerr = 0
        self.servfail = 0
        self._exhausted_logged_at = -EXHAUSTED_LOG_INTERVAL
        self._exhausted_silenced = 0
        self.reconfigure(dns)

    def reconfigure(self, dns: DnsConfig) -> None:
        """Take a new DNS config (SIGHUP). Filter, hosts and the IPv6 switch
        change at once; the pool and its ranges stay (they need a restart)."""
        self._fake_mode = dns.enhanced_mode == "fake-ip"
        # The server bounds each upstream wait with this (plus a grace).
        self.upstream_timeout = dns.upstream_timeout
        self._dns = dns
        self._filter = FakeIpFilter(dns, self._env)
        self._ipv6 = dns.ipv6
        self._fake6 = dns.ipv6 and dns.fake_ip_range6 is not None
        hosts: DomainTrie[tuple[tuple[bytes, ...], tuple[bytes, ...]]] = DomainTrie()
        reverse: dict[IPAddress, str] = {}
        for name, addrs in dns.hosts:
            v4 = tuple(a.packed for a in addrs if a.version == 4)
            v6 = tuple(a.packed for a in addrs if a.version == 6)
            hosts.add(name, (v4, v6))
            if "*" not in name and "+" not in name and not name.startswith("."):
                for a in addrs:
                    reverse.setdefault(a, name.rstrip(".").lower())
        self._hosts = hosts
        self._hosts_reverse = reverse

    def set_env(self, env: RuleEnv) -> None:
        """New geodata / rule-provider content for fake-ip-filter's sets."""
        self._env = env
        self._filter = FakeIpFilter(self._dns, env)

    def stats(self) -> dict[str, int]:
        return {
            "queries": self.queries,
            "fake_answers": self.fake_answers,
            "local_answers": self.local_answers,
            "upstream": self.upstream,
            "formerr": self.formerr,
            "servfail": self.servfail,
            "fake_ip_refused": self.fake_ip_refused,
        }

    def wants_fake_ip(self, name: str) -> bool:
        """Does `name` (normalized) get a fake IP under the current config?"""
        if not self._fake_mode or not name:
            return False
        return self._filter.wants_fake_ip(name)

    def answers_from_pool(self, name: str, family: int) -> bool:
        """Would an A (family 4) / AAAA (6) question for `name` (normalized)
        be answered from the pool under the current config? What the kernel
        DNS answerer may hold (appliance/capture/ebpf/answer.py): the same
        decisions as `_address`, without counting anything."""
        if self._block_canary and name == APPLICATION_DNS_CANARY:
            return False
        if self._hosts.first(name) is not None:
            return False
        if family == 6 and not self._fake6:
            return False
        return self.wants_fake_ip(name)

    # -- entry points --------------------------------------------------------

    def handle(self, data: bytes, client: str | None = None) -> bytes | UpstreamQuery:
        """The reply to the query `data`, b"" for no reply, or an UpstreamQuery.

        `client` (appliance.limits.client_key of the sender) is who a new
        fake IP is counted against; None: nobody (no rate applies).
        Never raises (see the module doc for what failures become)."""
        self.queries += 1
        self._client = client
        return self._guard(data, self._handle, data)

    def _guard(
        self, data: bytes, step: Callable[[_Arg], bytes | UpstreamQuery], arg: _Arg
    ) -> bytes | UpstreamQuery:
        # The one place where failures become answers.
        try:
            result = step(arg)
        except Exception:
            self.problems.crash("handler crash", data)
            result = wire.error_reply(data, RCODE_SERVFAIL)
        if isinstance(result, bytes) and len(result) >= 4:
            rcode = result[3] & 0xF
            if rcode == RCODE_SERVFAIL:
                self.servfail += 1
            elif rcode == RCODE_FORMERR:
                self.formerr += 1
        return result

    def _handle(self, data: bytes) -> bytes | UpstreamQuery:
        if self._fast:
            q = wire.parse_query(data)
            if q is not None and q.qclass == CLASS_IN and q.qtype in (TYPE_A, TYPE_AAAA):
                local = self._address(q.qname, q.qtype)
                if local is not None:
                    rcode, rdatas, ttl = local
                    return wire.pack_reply(q, rcode, rdatas, ttl, _negative(rcode, rdatas))
        return self._general(data)

    def report_problems(self, force: bool = False) -> None:
        """Log the malformed/crashed query counts due (see ProblemLog.report)."""
        self.problems.report(force)

    # -- decisions shared by both paths ---------------------------------------

    def _address(self, name: str | None, qtype: int) -> Local | None:
        """The local answer to an A/AAAA question for `name`, None to ask upstream."""
        if not name:  # not a host name (or the root): let the upstream say
            return None
        if self._is_canary(name):
            return RCODE_NXDOMAIN, (), 0
        entry = self._hosts.first(name)
        if entry is not None:
            self.local_answers += 1
            return RCODE_NOERROR, entry[0] if qtype == TYPE_A else entry[1], HOSTS_TTL
        if qtype == TYPE_AAAA and not self._ipv6:
            self.local_answers += 1
            return RCODE_NOERROR, (), 0
        if not self.wants_fake_ip(name):
            return None
        if qtype == TYPE_AAAA and not self._fake6:
            self.local_answers += 1
            return RCODE_NOERROR, (), 0
        family = 4 if qtype == TYPE_A else 6
        rate, client = self._fake_ip_rate, self._client
        if (rate is not None and client is not None
                and self._pool.lookup(name, family) is None
                and not rate.allow(client, self._clock())):
            # A new mapping over the client's rate: no address at all rather
            # than one recycled from a name another client still uses.
            self.fake_ip_refused += 1
            return RCODE_SERVFAIL, (), 0
        try:
            ip = self._pool.allocate(name, family)
        except PoolExhausted as exc:
            self._log_exhausted(name, exc)
            return RCODE_SERVFAIL, (), 0
        self.fake_answers += 1
        return RCODE_NOERROR, (ip.packed,), FAKE_IP_TTL

    def _is_canary(self, name: str | None) -> bool:
        """Is `name` the canary, answered NXDOMAIN here (counted)?"""
        if self._block_canary and name == APPLICATION_DNS_CANARY:
            self.local_answers += 1
            return True
        return False

    def _log_exhausted(self, name: str, exc: PoolExhausted) -> None:
        now = time.monotonic()
        if now - self._exhausted_logged_at < EXHAUSTED_LOG_INTERVAL:
            self._exhausted_silenced += 1
            return
        more = f" ({self._exhausted_silenced} more since the last report)"
        log.error(
            "fake-IP pool exhausted (%s): SERVFAIL for %s%s",
            exc,
            name,
            more if self._exhausted_silenced else "",
        )
        self._exhausted_logged_at = now
        self._exhausted_silenced = 0

    def _pointer(self, name: str | None) -> tuple[int, str | None, int] | None:
        """(rcode, target, ttl) for a PTR question answered here, else None."""
        ip = reverse_pointer(name) if name else None
        if ip is None:
            return None
        if self._pool.is_fake(ip):
            self.local_answers += 1
            domain = self._pool.reverse(ip)
            if domain is None:
                return RCODE_NXDOMAIN, None, 0
            return RCODE_NOERROR, domain, FAKE_IP_TTL
        host = self._hosts_reverse.get(ip)
        if host is not None:
            self.local_answers += 1
            return RCODE_NOERROR, host, HOSTS_TTL
        return None

    # -- the general path (dnslib) ---------------------------------------------

    def _general(self, data: bytes) -> bytes | UpstreamQuery:
        why = wire.malformed(data)
        if why is None:
            try:
                query = DNSRecord.parse(data)
            except Exception:
                # dnslib raises DNSError, but hostile bytes also reach struct,
                # index and Unicode errors inside it: all of them mean FORMERR.
                why = "unparsable"
        if why is not None:
            reply = wire.error_reply(data, RCODE_FORMERR)
            self.problems.note(why if reply else f"{why} (dropped)")
            return reply
        header = query.header
        if header.qr:
            return b""
        if header.opcode != 0:
            return wire.error_reply(data, RCODE_NOTIMP)
        opts = [r for r in query.ar if r.rtype == TYPE_OPT]
        if len(query.questions) != 1 or len(opts) > 1:  # RFC 6891 6.1.1
            return wire.error_reply(data, RCODE_FORMERR)
        opt = opts[0] if opts else None
        if opt is not None and (opt.ttl >> 16) & 0xFF != 0:
            return _reply(query, opt, _RCODE_BADVERS, aa=False)
        q = query.questions[0]
        if q.qclass != CLASS_IN:
            return _reply(query, opt, RCODE_REFUSED, aa=False)
        name = name_from_labels(q.qname.label)
        if q.qtype in (TYPE_A, TYPE_AAAA):
            local = self._address(name, q.qtype)
            if local is not None:
                rcode, rdatas, ttl = local
                rdata_cls = A if q.qtype == TYPE_A else AAAA
                answers = [_rr(q, q.qtype, ttl, rdata_cls(_ip_text(r))) for r in rdatas]
                return _reply(query, opt, rcode, answers, auth=_soa(q, rcode, rdatas))
        elif q.qtype == TYPE_PTR:
            ptr = self._pointer(name)
            if ptr is not None:
                rcode, target, ttl = ptr
                answers = [] if target is None else [_rr(q, TYPE_PTR, ttl, PTR(target + "."))]
                return _reply(query, opt, rcode, answers, auth=_soa(q, rcode, answers))
        elif q.qtype == TYPE_ANY and name and self.wants_fake_ip(name):
            local = self._address(name, TYPE_A)
            assert local is not None
            rcode, rdatas, ttl = local
            answers = [_rr(q, TYPE_A, ttl, A(_ip_text(r))) for r in rdatas]
            return _reply(query, opt, rcode, answers, auth=_soa(q, rcode, rdatas))
        elif self._is_canary(name):  # any other type (A/AAAA: in _address)
            return _reply(query, opt, RCODE_NXDOMAIN, auth=_soa(q, RCODE_NXDOMAIN, []))
        return self._ask_upstream(data, query, opt, name)

    def _ask_upstream(
        self, data: bytes, query: DNSRecord, opt: RR | None, name: str | None
    ) -> UpstreamQuery:
        q = query.questions[0]
        request = DNSRecord(
            DNSHeader(id=0, rd=1, cd=query.header.cd),
            q=DNSQuestion(q.qname, q.qtype, q.qclass),
        )
        request.add_ar(_our_opt(opt is not None and _do(opt)))
        strip = q.qtype in (TYPE_SVCB, TYPE_HTTPS) and bool(name) and self.wants_fake_ip(name or "")
        self.upstream += 1
        return UpstreamQuery(self, data, query, opt, request, strip)


# -- helpers ------------------------------------------------------------------


def _do(opt: RR) -> bool:
    return bool(opt.ttl & wire.EDNS_DO)


def _our_opt(do: bool) -> RR:
    return EDNS0(udp_len=EDNS_UDP_SIZE, flags="do" if do else "")


def _rr(q: DNSQuestion, rtype: int, ttl: int, rdata: RD) -> RR:
    # The same DNSLabel object as the question: dnslib compresses it into a
    # pointer to offset 12, as the fast path does.
    return RR(rname=q.qname, rtype=rtype, rclass=q.qclass, ttl=ttl, rdata=rdata)


def _negative(rcode: int, answers: Sequence[object]) -> bool:
    """Is a local answer with `rcode` and `answers` NODATA or NXDOMAIN?"""
    return rcode == RCODE_NXDOMAIN or (rcode == RCODE_NOERROR and not answers)


def _soa(q: DNSQuestion, rcode: int, answers: Sequence[object]) -> list[RR]:
    """The authority section of a local answer: our SOA when it is negative.

    NODATA: owned by the question's name (the same label object, so it packs
    as a pointer to offset 12, as wire.pack_reply does). NXDOMAIN (a PTR of
    an unmapped fake IP): owned by the reverse tree's root, since the name
    itself does not exist (RFC 2308 3)."""
    if not _negative(rcode, answers):
        return []
    owner = q.qname
    if rcode == RCODE_NXDOMAIN:
        owner = DNSLabel(q.qname.label[-2:])
    return [RR(rname=owner, rtype=TYPE_SOA, rclass=CLASS_IN, ttl=wire.NEGATIVE_TTL,
               rdata=RD(wire.SOA_RDATA))]


def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _reply(
    query: DNSRecord,
    opt: RR | None,
    rcode: int,
    answers: Sequence[RR] = (),
    aa: bool = True,
    auth: Sequence[RR] = (),
) -> bytes:
    """Our reply to a parsed query (the dnslib twin of wire.pack_reply)."""
    header = DNSHeader(id=query.header.id, bitmap=wire.reply_flags(query.header.bitmap, rcode, aa))
    out = DNSRecord(header, questions=list(query.questions), rr=list(answers), auth=list(auth))
    if opt is not None:
        reply_opt = _our_opt(_do(opt))
        reply_opt.ttl |= (rcode >> 4) << 24  # extended RCODE (BADVERS)
        out.add_ar(reply_opt)
    return bytes(out.pack())


def reverse_pointer(name: str) -> IPAddress | None:
    """The address a full `in-addr.arpa` / `ip6.arpa` name stands for, or None
    (partial names, bad digits, anything else)."""
    labels = name.split(".")
    if len(labels) == 6 and labels[4:] == ["in-addr", "arpa"]:
        octets = labels[3::-1]
        if not all(o.isdigit() and len(o) <= 3 and (o == "0" or o[0] != "0") for o in octets):
            return None
        if any(int(o) > 255 for o in octets):
            return None
        return ipaddress.IPv4Address(".".join(octets))
    if len(labels) == 34 and labels[32:] == ["ip6", "arpa"]:
        nibbles = labels[31::-1]
        if not all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
            return None
        return ipaddress.IPv6Address(int("".join(nibbles), 16))
    return None


_SVC_MANDATORY = 0
_SVC_IPV4HINT = 4
_SVC_IPV6HINT = 6
_HINTS = frozenset((_SVC_IPV4HINT, _SVC_IPV6HINT))


def strip_svc_hints(rdata: bytes) -> bytes | None:
    """SVCB/HTTPS RDATA (RFC 9460 2.2) without ipv4hint and ipv6hint, and
    without those keys in `mandatory` (dropping `mandatory` if it empties).
    None if the RDATA is malformed. AliasMode (priority 0) passes unchanged."""
    try:
        (priority,) = struct.unpack_from("!H", rdata)
        pos = 2
        while rdata[pos]:  # TargetName, never compressed (RFC 9460 2.2)
            if rdata[pos] > 63:
                return None
            pos += 1 + rdata[pos]
        pos += 1
        if priority == 0:
            return rdata
        out = [rdata[:pos]]
        while pos < len(rdata):
            key, length = struct.unpack_from("!HH", rdata, pos)
            value = rdata[pos + 4 : pos + 4 + length]
            if len(value) != length:
                return None
            pos += 4 + length
            if key in _HINTS:
                continue
            if key == _SVC_MANDATORY:
                if length % 2:
                    return None
                keys = [k for (k,) in struct.iter_unpack("!H", value) if k not in _HINTS]
                if not keys:
                    continue
                value = struct.pack(f"!{len(keys)}H", *keys)
            out.append(struct.pack("!HH", key, len(value)) + value)
        return b"".join(out)
    except (IndexError, struct.error):
        return None
