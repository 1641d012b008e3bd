"""The hand-written DNS fast path, and the few byte-level edits the server makes.

Most queries a LAN sends are one A or AAAA question, maybe with an EDNS OPT
record (RFC 6891). dnslib parses and packs those at about 7k queries/s on the
appliance's 2 cores; reading the question and packing the answer by hand does
about 28k/s. So `parse_query` recognizes exactly that simple shape and
`pack_reply` builds the locally made answer; everything else (other shapes,
other opcodes, names that are not host names) gets None and goes through
dnslib in handler.py. Both paths must produce the same bytes for every query
the fast path accepts (tests/unit/test_dns_handler.py checks this with
hypothesis), so the reply conventions live here as constants both use.

Reply conventions (both paths):
- header: QR=1, opcode QUERY, AA=1 for local answers, RD and CD copied from the
  query (RFC 1035 4.1.1, RFC 6840 5.9), RA=1, AD=0, Z=0;
- the question is echoed byte for byte, so a client's 0x20 case randomization
  survives; answers name it with a compression pointer to offset 12;
- an OPT record is echoed only if the query had one: our UDP size
  `EDNS_UDP_SIZE`, version 0, DO copied (RFC 3225), no options.

Nothing here raises on hostile input: the parsers return None / a default.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.names import name_from_labels

TYPE_A = 1
TYPE_NS = 2
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_SVCB = 64
TYPE_HTTPS = 65
TYPE_ANY = 255
CLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

# The UDP payload size we advertise: the DNS Flag Day 2020 value, which avoids
# IP fragmentation on any sane path.
EDNS_UDP_SIZE = 1232
# A client without EDNS accepts at most this over UDP (RFC 1035 4.2.1).
CLASSIC_UDP_SIZE = 512
EDNS_DO = 0x8000

# Negative answers Mirage makes itself (NODATA: hosts without an address of
# the family, AAAA with IPv6 off or no fake-ip-range6; NXDOMAIN: PTR of an
# unmapped fake IP) carry this SOA in the authority section, so clients may
# cache them (RFC 2308 3, 5: the negative TTL is min(SOA TTL, SOA MINIMUM)).
# Short: a SIGHUP that changes hosts or the IPv6 switch shows within 10 s.
NEGATIVE_TTL = 10


def _wire_name(text: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in text.split(".") if p) + b"\0"


# MNAME, RNAME (RFC 2606 .invalid: nobody to ask), serial, refresh, retry,
# expire, minimum. Raw bytes, never compressed, so both paths pack the same.
SOA_RDATA = (
    _wire_name("mirage.invalid")
    + _wire_name("hostmaster.mirage.invalid")
    + struct.pack("!IIIII", 1, 3600, 600, 86400, NEGATIVE_TTL)
)

_F_QR = 0x8000
_F_OPCODE = 0x7800
_F_AA = 0x0400
_F_TC = 0x0200
_F_RD = 0x0100
_F_RA = 0x0080
_F_CD = 0x0010

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength (after the name)
_ANSWER_PREFIX = struct.Struct("!HHHIH")  # pointer, type, class, ttl, rdlength
_TYPE_CLASS = struct.Struct("!HH")


@dataclass(frozen=True, slots=True)
class FastQuery:
    """One simple query, as `parse_query` read it."""

    qid: int
    flags: int
    qname: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    question: bytes  # the question section exactly as sent
    edns: bool  # the query carried an OPT record
    do: bool  # ... with the DNSSEC OK bit


def reply_flags(query_flags: int, rcode: int, aa: bool = True) -> int:
    """Header flags of our reply to a query with `query_flags` (see module doc)."""
    flags = _F_QR | _F_RA | (query_flags & (_F_RD | _F_CD)) | (rcode & 0xF)
    # Authoritative only for data we made: an answer or NXDOMAIN.
    return flags | _F_AA if aa and rcode in (RCODE_NOERROR, RCODE_NXDOMAIN) else flags


def parse_query(data: bytes) -> FastQuery | None:
    """Read the common query shape, or None for anything else.

    Accepted: QR=0, opcode QUERY, TC=0, RCODE=0, QDCOUNT=1, ANCOUNT=NSCOUNT=0,
    ARCOUNT=0 or one well-formed EDNS version 0 OPT record, no trailing bytes,
    an uncompressed name of host-name bytes (see names.name_from_labels).
    """
    n = len(data)
    if n < 17:
        return None
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if flags & (_F_QR | _F_OPCODE | _F_TC | 0xF) or qd != 1 or an or ns or ar > 1:
        return None
    pos = 12
    labels = []
    while True:
        length = data[pos]
        if length == 0:
            break
        if length > 63:  # a compression pointer or a reserved label type
            return None
        end = pos + 1 + length
        if end >= n:
            return None
        labels.append(data[pos + 1 : end])
        pos = end
        if pos - 12 > 254:  # wire name longer than 255 (RFC 1035 2.3.4)
            return None
    qend = pos + 5
    if qend > n:
        return None
    qtype, qclass = _TYPE_CLASS.unpack_from(data, pos + 1)
    edns = do = False
    if ar:
        if qend + 11 > n or data[qend] != 0:
            return None
        rtype, _size, ttl, rdlen = _RR_FIXED.unpack_from(data, qend + 1)
        # Version != 0 must get BADVERS, extended RCODE bits must be 0 in a
        # query: leave those to the general path.
        if rtype != TYPE_OPT or ttl & 0xFFFF0000 or qend + 11 + rdlen != n:
            return None
        opt = qend + 11
        while opt < n:  # options must tile the RDATA exactly
            if opt + 4 > n:
                return None
            opt += 4 + int.from_bytes(data[opt + 2 : opt + 4])
        if opt != n:
            return None
        edns, do = True, bool(ttl & EDNS_DO)
    elif qend != n:
        return None
    qname = name_from_labels(labels)
    if qname is None:
        return None
    return FastQuery(qid, flags, qname, qtype, qclass, data[12:qend], edns, do)


def pack_reply(
    q: FastQuery,
    rcode: int = RCODE_NOERROR,
    rdatas: Sequence[bytes] = (),
    ttl: int = 0,
    negative: bool = False,
) -> bytes:
    """Our reply to `q`: `rdatas` (packed addresses) as records of the question's
    own type and class, all named by a pointer to the question; with
    `negative` (a local NODATA) our SOA, owned by the question's name, in the
    authority section."""
    parts = [
        _HEADER.pack(q.qid, reply_flags(q.flags, rcode), 1, len(rdatas), 1 if negative else 0,
                     1 if q.edns else 0),
        q.question,
    ]
    for rdata in rdatas:
        parts.append(_ANSWER_PREFIX.pack(0xC00C, q.qtype, q.qclass, ttl, len(rdata)))
        parts.append(rdata)
    if negative:
        parts.append(_SOA_BY_POINTER)
    if q.edns:
        parts.append(opt_record(q.do))
    return b"".join(parts)


_SOA_BY_POINTER = (
    _ANSWER_PREFIX.pack(0xC00C, TYPE_SOA, CLASS_IN, NEGATIVE_TTL, len(SOA_RDATA)) + SOA_RDATA
)


def opt_record(do: bool) -> bytes:
    """Our OPT record: root name, our UDP size, version 0, DO as given, no options."""
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, EDNS_UDP_SIZE, EDNS_DO if do else 0, 0)


def error_reply(data: bytes, rcode: int) -> bytes:
    """A reply with `rcode` to whatever `data` is, without trusting anything past
    the header: the last-resort answer (FORMERR for unparsable input, SERVFAIL
    when the handler crashed). b"" when no reply should be sent: fewer than 12
    bytes (no ID to answer to) or QR=1 (answering a response could start a
    loop between two servers)."""
    q = parse_query(data)
    if q is not None:
        return pack_reply(q, rcode)
    if len(data) < 12:
        return b""
    qid, flags = struct.unpack_from("!HH", data)
    if flags & _F_QR:
        return b""
    flags = reply_flags(flags, rcode, aa=False) | (flags & _F_OPCODE)
    return _HEADER.pack(qid, flags, 0, 0, 0, 0)


def malformed(data: bytes) -> str | None:
    """Why `data` is not a well-formed DNS message, or None when every name in
    it is sound and every record fits.

    The cheap gate in front of dnslib: it walks the header counts and every
    name (following compression pointers) and reports the first of
    "short header", "cut short", "label over 63", "name over 255",
    "bad pointer" (one that does not point strictly backwards: loops end
    here). dnslib accepts labels over 63 bytes and
    names over 255 and only fails when the reply is packed, after the name
    has been looked at (and given a fake IP); checked here first, such a
    query costs one walk and gets FORMERR. Trailing bytes are not judged
    (dnslib ignores them too). Never raises.
    """
    n = len(data)
    if n < 12:
        return "short header"
    _qid, _flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    pos = 12
    for index in range(qd + an + ns + ar):
        pos, why = _walk_name(data, pos)
        if why is not None:
            return why
        if index < qd:
            pos += 4
        else:
            if pos + 10 > n:
                return "cut short"
            pos += 10 + int.from_bytes(data[pos + 8 : pos + 10])
        if pos > n:
            return "cut short"
    return None


def _walk_name(data: bytes, pos: int) -> tuple[int, str | None]:
    """(offset just past the name at `pos`, None) or (_, reason) as in `malformed`."""
    n = len(data)
    end = -1  # where the name ends in the message (set at the first pointer)
    floor = pos  # a pointer must jump below every label seen so far
    total = 1  # wire length of the name: the root label
    while True:
        if pos >= n:
            return pos, "cut short"
        length = data[pos]
        if length == 0:
            return (pos + 1 if end < 0 else end), None
        if length >= 0xC0:
            if pos + 1 >= n:
                return pos, "cut short"
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= floor:
                return pos, "bad pointer"
            if end < 0:
                end = pos + 2
            pos = floor = target
            continue
        if length > 63:  # 0x40-0xBF: what dnslib reads as a long label
            return pos, "label over 63"
        total += 1 + length
        if total > 255:
            return pos, "name over 255"
        pos += 1 + length


def _skip_name(data: bytes, pos: int) -> int:
    """Offset just past the name at `pos` (a pointer ends a name). IndexError
    when the name runs past the end, ValueError on a reserved label type."""
    while True:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length >= 0xC0:
            if pos + 1 >= len(data):
                raise IndexError("compression pointer cut short")
            return pos + 2
        if length > 63:
            raise ValueError("reserved label type")
        pos += 1 + length


def _sections(data: bytes) -> tuple[int, list[tuple[int, int, int]]] | None:
    """Offset where the question section ends, and (start, end, type) of every
    record after it; None if the message does not walk cleanly."""
    try:
        _qid, _flags, qd, an, ns, ar = _HEADER.unpack_from(data)
        pos = 12
        for _ in range(qd):
            pos = _skip_name(data, pos) + 4
        qend = pos
        records = []
        for _ in range(an + ns + ar):
            start = pos
            pos = _skip_name(data, pos)
            rtype, _cls, _ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
            pos += 10 + rdlen
            records.append((start, pos, rtype))
        if qend > len(data) or pos > len(data):
            return None
        return qend, records
    except (IndexError, ValueError, struct.error):
        return None


def udp_limit(query: bytes) -> int:
    """The largest UDP reply the sender of `query` accepts: 512, or the payload
    size its OPT record advertises (never less than 512, RFC 6891 6.2.5)."""
    walked = _sections(query)
    if walked is None:
        return CLASSIC_UDP_SIZE
    _qend, records = walked
    _qid, _flags, _qd, an, ns, _ar = _HEADER.unpack_from(query)
    for start, _end, rtype in records[an + ns :]:
        if rtype == TYPE_OPT:
            size: int = struct.unpack_from("!H", query, _skip_name(query, start) + 2)[0]
            return max(CLASSIC_UDP_SIZE, size)
    return CLASSIC_UDP_SIZE


def truncate(reply: bytes, limit: int) -> bytes:
    """`reply` if it fits in `limit` bytes, else the same header with TC=1 and
    no records but the question and the OPT record (RFC 6891 7: a truncated
    response still carries OPT), so the client retries over TCP."""
    if len(reply) <= limit:
        return reply
    walked = _sections(reply)
    if walked is None:
        head = bytearray(reply[:12])
        head[2] |= _F_TC >> 8
        head[4:12] = bytes(8)
        return bytes(head)
    qend, records = walked
    qid, flags, qd, an, ns, _ar = _HEADER.unpack_from(reply)
    opts = [reply[s:e] for s, e, t in records[an + ns :] if t == TYPE_OPT][:1]
    body = reply[12:qend]
    if 12 + len(body) + sum(map(len, opts)) > limit:
        opts = []
    if 12 + len(body) > limit:
        body, qd = b"", 0
    return _HEADER.pack(qid, flags | _F_TC, qd, 0, 0, len(opts)) + body + b"".join(opts)
