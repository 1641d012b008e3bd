"""A bounded DNS answer cache honouring TTLs, without I/O or a clock of its own.

What is cached (RFC 1035 section 7.4, RFC 2308):
- positive answers (NOERROR with answer records) for the smallest TTL of the
  answer section;
- negative answers (NXDOMAIN, and NOERROR without answers = NODATA) for
  min(SOA TTL, SOA MINIMUM) of the SOA in the authority section; without an
  SOA they are not cached (RFC 2308 section 5);
- nothing else: SERVFAIL, REFUSED and friends say the upstream failed, and
  caching that would stretch one bad moment into minutes.

Entries are keyed by (qname lower-cased, qtype, qclass), bounded by entry
count with least-recently-used eviction, and stored as wire bytes. `get`
returns a fresh message with every TTL decremented by the time spent in the
cache and the asking request's ID. Time is passed in (`now`, seconds on any
monotonic clock), so tests drive it directly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

CacheKey = tuple[str, int, int]

# Upper bound on how long anything is kept, whatever the upstream says
# (RFC 2181 section 8 allows 2^31-1; a day is what resolvers commonly cap at).
MAX_TTL = 86400


@dataclass
class _Entry:
    wire: bytes
    stored: float
    expires: float


def cache_key(message: DNSRecord) -> CacheKey | None:
    """The key of a message's (first and only) question, or None without one."""
    if not message.questions:
        return None
    q = message.q
    return (str(q.qname).lower(), int(q.qtype), int(q.qclass))


def cache_ttl(reply: DNSRecord) -> int | None:
    """How many seconds `reply` may be cached, or None if it must not be."""
    rcode = reply.header.rcode
    if rcode == RCODE.NOERROR and reply.rr:
        return min(int(rr.ttl) for rr in reply.rr)
    if rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
        soas = [rr for rr in reply.auth if rr.rtype == QTYPE.SOA]
        if not soas:
            return None
        return min(min(int(rr.ttl), int(rr.rdata.times[4])) for rr in soas)  # times[4]: MINIMUM
    return None


class DnsCache:
    """LRU cache of DNS replies (see the module docstring). Owns only memory."""

    def __init__(self, max_entries: int, max_ttl: int = MAX_TTL) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, reply: DNSRecord, now: float) -> bool:
        """Cache `reply` if it is cacheable; True if it was stored."""
        key = cache_key(reply)
        ttl = cache_ttl(reply)
        if key is None or ttl is None or ttl <= 0 or self.max_entries == 0:
            return False
        ttl = min(ttl, self.max_ttl)
        self._entries[key] = _Entry(reply.pack(), now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def get(self, request: DNSRecord, now: float) -> DNSRecord | None:
        """A cached reply to `request` with decremented TTLs and the request's
        ID, or None (missing or expired; expired entries are dropped)."""
        key = cache_key(request)
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        reply = DNSRecord.parse(entry.wire)
        elapsed = int(now - entry.stored)
        for rr in (*reply.rr, *reply.auth, *reply.ar):
            if rr.rtype != QTYPE.OPT:  # an OPT record's "TTL" is EDNS flags
                rr.ttl = max(0, rr.ttl - elapsed)
        reply.header.id = request.header.id
        # Echo the question exactly as asked (a client using 0x20 case
        # randomisation checks it).
        reply.questions = list(request.questions)
        return reply

    def clear(self) -> None:
        self._entries.clear()
