"""bpf/mirage_dns.c under BPF_PROG_TEST_RUN: kernel answers against the userspace ones.

The answerer is compiled by its loader (`KernelAnswers`) with the map kept
by a real `FakeIPPool`; each query is first answered by the real
`DnsHandler` (which allocates the mapping, as the DNS service does), then
run through the program in a throwaway namespace (`kdns-pt-*`) where a UDP
socket stands for Mirage's DNS listener (the fail-safe looks it up). A
kernel answer must be the userspace answer byte for byte (DNS message),
turned around (MACs, addresses, ports swapped, valid checksums); anything
the program does not answer must leave untouched with TC_ACT_UNSPEC and
one fall-through reason counted.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, DNSRecord

from appliance.capture.ebpf.answer import DNS_STAT_NAMES, KernelAnswers, name_key
from appliance.config.model import ApplianceConfig, Config, DnsConfig, Listen
from appliance.dns.handler import DnsHandler
from appliance.fakeip.pool import FakeIPPool
from tests.integration.test_ebpf_prog import (
    CLIENT4,
    CLIENT6,
    GW4,
    in_netns,
    ipv4,
    ipv6,
    make_ns,
    sh,
)

pytestmark = [pytest.mark.netns]

REDIRECT, UNSPEC = 7, 0xFFFFFFFF
DNS_PORT = 5353
RESOLVER4, RESOLVER6 = "8.8.8.8", "2001:4860:4860::8888"
RANGE4 = ipaddress.IPv4Network("198.18.0.0/16")
RANGE6 = ipaddress.IPv6Network("fdfe:dcba:9876::/64")
REPO = Path(__file__).resolve().parents[2]


def make_cfg(state: Path) -> Config:
    return Config(
        tproxy_port=7893,
        ipv6=True,
        dns=DnsConfig(listen=Listen("::", DNS_PORT), ipv6=True, fake_ip_range6=RANGE6,
                      fake_ip_filter=("*.lan",), hosts=()),
        appliance=ApplianceConfig(lan=("lan0",), redirect="ebpf", capture_mark=0x233,
                                  state_dir=state,
                                  bypass=(ipaddress.ip_network("9.9.9.9/32"),)),
    )


class Lab:
    def __init__(self, cfg: Config, ns: str, empty: str) -> None:
        self.cfg = cfg
        self.ns, self.empty = ns, empty
        self.pool = FakeIPPool(RANGE4, RANGE6)
        self.handler = DnsHandler(cfg.dns, self.pool)
        self.kernel = KernelAnswers(cfg, self.handler.answers_from_pool)
        self.pool.set_mirror(self.kernel)
        self.ifindex = {n: _ifindex(n) for n in (ns, empty)}

    def run(self, frame: bytes, ns: str | None = None) -> tuple[int, bytes]:
        ns = ns or self.ns
        with in_netns(ns):
            r = self.kernel.test_run(frame, ifindex=self.ifindex[ns])
        return r.retval, r.data

    def stats(self) -> dict[str, int]:
        return self.kernel.stats()


def _ifindex(ns: str) -> int:
    with in_netns(ns):
        return socket.if_nametoindex("lan0")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    ns, empty = make_ns(), make_ns()
    sock = None
    lab = None
    try:
        with in_netns(ns):
            # Mirage's DNS listener, as the DNS service binds it (dual-stack).
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", DNS_PORT))
        lab = Lab(make_cfg(tmp_path_factory.mktemp("kdns")), ns, empty)
        yield lab
    finally:
        if lab is not None:
            lab.kernel.close()
        if sock is not None:
            sock.close()
        sh("ip", "netns", "del", ns)
        sh("ip", "netns", "del", empty)


# --- packets ---------------------------------------------------------------------


def query(name: str, qtype: str = "A", *, qid: int = 0x1234, edns: EDNS0 | None = None,
          rd: bool = True) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    q.header.rd = int(rd)
    if edns is not None:
        q.add_ar(edns)
    return q.pack()


def udp(payload: bytes, sport: int = 40000, dport: int = 53) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def frame4(payload: bytes, dst: str = RESOLVER4, dport: int = 53) -> bytes:
    return ipv4(CLIENT4, dst, "udp", body=udp(payload, dport=dport))


def frame6(payload: bytes, dst: str = RESOLVER6, dport: int = 53) -> bytes:
    return ipv6(CLIENT6, dst, "udp", body=udp(payload, dport=dport))


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def check_reply(query_frame: bytes, out: bytes) -> bytes:
    """Assert `out` is `query_frame` turned around (with valid checksums);
    return its DNS message."""
    assert out[0:6] == query_frame[6:12] and out[6:12] == query_frame[0:6]
    assert out[12:14] == query_frame[12:14]
    if out[12:14] == b"\x08\x00":
        ip, l4 = out[14:34], 34
        assert ip[12:16] == query_frame[30:34] and ip[16:20] == query_frame[26:30]
        assert struct.unpack("!H", ip[2:4])[0] == len(out) - 14
        assert _sum16(ip) == 0xFFFF, "IPv4 header checksum"
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(out) - l4)
    else:
        ip, l4 = out[14:54], 54
        assert ip[8:24] == query_frame[38:54] and ip[24:40] == query_frame[22:38]
        assert struct.unpack("!H", ip[4:6])[0] == len(out) - l4
        pseudo = ip[8:40] + struct.pack("!IxxxB", len(out) - l4, 17)
    q_sport, q_dport = struct.unpack("!HH", query_frame[l4 : l4 + 4])
    sport, dport, length, csum = struct.unpack("!HHHH", out[l4 : l4 + 8])
    assert (sport, dport) == (q_dport, q_sport)
    assert length == len(out) - l4
    assert csum != 0
    assert _sum16(pseudo + out[l4:]) == 0xFFFF, "UDP checksum"
    return out[l4 + 8 :]


def answered(lab: Lab, frame: bytes, payload: bytes) -> bytes:
    """The userspace answer to `payload` (allocating as the service does),
    then the kernel's: both must agree; returns the DNS message."""
    user = lab.handler.handle(payload)
    assert isinstance(user, bytes)
    rc, out = lab.run(frame)
    assert rc == REDIRECT, f"not answered in the kernel: {lab.stats()}"
    kernel = check_reply(frame, out)
    assert kernel == user, f"\nkernel {kernel.hex()}\nuser   {user.hex()}"
    return kernel


def falls(lab: Lab, frame: bytes, reason: str, ns: str | None = None) -> None:
    before = lab.stats()
    rc, out = lab.run(frame, ns)
    assert rc == UNSPEC
    assert out == frame, "a packet that falls through is untouched"
    after = lab.stats()
    moved = {k for k in DNS_STAT_NAMES if after[k] != before[k]}
    assert moved == ({reason} if reason else set()), (reason, moved)


# --- tests -------------------------------------------------------------------------


def test_stat_names_match_the_header() -> None:
    text = (REPO / "bpf/lib/dns_stats.h").read_text()
    enum = text[text.index("enum mirage_dns_stat") :]
    names = [line.split()[0].rstrip(",").split("=")[0].strip()
             for line in enum.splitlines()[1:] if line.strip().startswith("MIRAGE_DS_")]
    assert names[-1] == "MIRAGE_DS_MAX"
    assert [n.removeprefix("MIRAGE_DS_").lower() for n in names[:-1]] == list(DNS_STAT_NAMES)


def test_name_key() -> None:
    assert name_key("a.example.com")[:15] == b"\x01a\x07example\x03com\x00"  # type: ignore[index]
    assert name_key("x" * 64 + ".com") is None
    assert name_key("a b.com") is None
    assert name_key(".".join(["abcdefghi"] * 12) + ".coma") is not None  # 126 bytes
    assert name_key(".".join(["abcdefghi"] * 12) + ".comab") is None


def test_hit_and_miss(lab: Lab) -> None:
    payload = query("hit.example.com")
    frame = frame4(payload)
    falls(lab, frame, "miss")  # not mapped yet
    answered(lab, frame, payload)
    # Repeated: the same answer, the mapping unchanged.
    answered(lab, frame, payload)
    answered_by = {r["address"]: r["answered"] for r in lab.kernel.clients()}
    assert answered_by.get(CLIENT4, 0) >= 2


def test_to_the_gateway_at_the_listener_port(lab: Lab) -> None:
    payload = query("gw.example.com")
    answered(lab, frame4(payload, dst=GW4, dport=DNS_PORT), payload)
    # Port 53 on the gateway belongs to whatever resolver runs there.
    falls(lab, frame4(payload, dst=GW4, dport=53), "")


def test_case_is_echoed(lab: Lab) -> None:
    lab.handler.handle(query("mixed.example.com"))
    for name in ("MiXeD.ExAmPlE.cOm", "MIXED.EXAMPLE.COM"):
        payload = query(name, qid=0x4242)
        dns = answered(lab, frame4(payload), payload)
        assert name.encode() in dns.replace(b"\x05", b".").replace(b"\x07", b".").replace(
            b"\x03", b".")


def test_edns_and_cookie(lab: Lab) -> None:
    plain = EDNS0(udp_len=4096)
    answered(lab, frame4(q := query("edns.example.com", edns=plain)), q)
    cookie = EDNS0(udp_len=1232, opts=[])
    payload = query("edns.example.com", edns=cookie)
    # A COOKIE option (what dig sends): 8 client bytes.
    payload = payload[:-2] + struct.pack("!H", 12) + struct.pack("!HH", 10, 8) + b"c" * 8
    answered(lab, frame4(payload), payload)


def test_do_bit_falls_through(lab: Lab) -> None:
    lab.handler.handle(query("do.example.com"))
    falls(lab, frame4(query("do.example.com", edns=EDNS0(flags="do"))), "do")
    falls(lab, frame4(query("do.example.com", edns=EDNS0(version=1))), "edns")


def test_unusual_shapes_fall_through(lab: Lab) -> None:
    lab.handler.handle(query("shape.example.com"))
    two = DNSRecord.question("shape.example.com")
    two.add_question(*DNSRecord.question("other.example.com").questions)
    falls(lab, frame4(two.pack()), "not_query")
    notify = bytearray(query("shape.example.com"))
    notify[2] |= 0x20  # opcode 4 (NOTIFY)
    falls(lab, frame4(bytes(notify)), "not_query")
    falls(lab, frame4(query("shape.example.com", "MX")), "qtype")
    falls(lab, frame4(query("shape.example.com") + b"\0"), "shape")
    pointer = query("shape.example.com")[:12] + b"\xc0\x0c" + b"\0\x01\0\x01"
    falls(lab, frame4(pointer), "name")


def test_long_name(lab: Lab) -> None:
    name = ".".join(["abcdefghij"] * 12) + ".example.com"  # 144 bytes on the wire
    payload = query(name)
    assert isinstance(lab.handler.handle(payload), bytes)
    falls(lab, frame4(payload), "long_name")
    longest = ".".join(["abcdefghi"] * 12) + ".coma"  # exactly the key's 126 bytes
    answered(lab, frame4(q := query(longest)), q)


def test_aaaa_and_ipv6_transport(lab: Lab) -> None:
    for qtype in ("A", "AAAA"):
        payload = query("six.example.com", qtype)
        answered(lab, frame4(payload), payload)
        answered(lab, frame6(payload), payload)
        answered(lab, frame6(q := query("six.example.com", qtype, edns=EDNS0())), q)
    # Every odd/even position of the tail and question, for the checksum.
    for n in range(1, 9):
        name = "x" * n + ".example.com"
        answered(lab, frame6(q := query(name, "AAAA")), q)
        answered(lab, frame4(q := query(name, "A", edns=EDNS0())), q)


def test_not_answered_names(lab: Lab) -> None:
    # A filtered name is never in the map: the handler goes upstream.
    falls(lab, frame4(query("printer.lan")), "miss")
    # A bypassed resolver is not Mirage's to answer.
    lab.handler.handle(query("bypass.example.com"))
    falls(lab, frame4(query("bypass.example.com"), dst="9.9.9.9"), "")


def test_truncated_packets(lab: Lab) -> None:
    payload = query("trunc.example.com", edns=EDNS0())
    lab.handler.handle(payload)
    for frame in (frame4(payload), frame6(payload)):
        for cut in range(len(frame) - len(payload) - 8, len(frame)):
            try:
                rc, _out = lab.run(frame[:cut])
            except OSError:
                continue  # shorter than the kernel lets a test run take
            assert rc == UNSPEC, cut
        # A UDP length that lies about the datagram.
        bad = bytearray(frame)
        l4 = 34 if frame[12:14] == b"\x08\x00" else 54
        struct.pack_into("!H", bad, l4 + 4, 8 + len(payload) - 3)
        falls(lab, bytes(bad), "shape")


def test_fail_safe_without_the_dns_socket(lab: Lab) -> None:
    payload = query("failsafe.example.com")
    lab.handler.handle(payload)
    falls(lab, frame4(payload), "no_socket", ns=lab.empty)
    falls(lab, frame6(payload), "no_socket", ns=lab.empty)


def test_recycling_under_load_never_answers_stale(lab: Lab) -> None:
    """A pool of 14 addresses cycling through 60 names: every kernel answer
    is the pool's mapping of that moment; a recycled name is not answered."""
    cfg = lab.cfg
    pool = FakeIPPool(ipaddress.IPv4Network("198.19.0.0/28"), None)
    handler = DnsHandler(cfg.dns, pool)
    lab.pool.set_mirror(None)
    pool.set_mirror(lab.kernel)
    try:
        rng = random.Random(16)
        names = [f"n{i}.recycle.example.com" for i in range(60)]
        answers = stale = 0
        for _ in range(400):
            handler.handle(query(rng.choice(names)))
            live = {n: ip for n, ip, _pins in pool.mappings()}
            for name in rng.sample(names, 8):
                rc, out = lab.run(frame4(query(name)))
                if rc != REDIRECT:
                    assert name not in live or len(name_key(name) or b"") == 0
                    continue
                answers += 1
                rr = DNSRecord.parse(check_reply(frame4(query(name)), out)).rr[0]
                if str(rr.rdata) != str(live.get(name)):
                    stale += 1
            # Every live mapping is answered, nothing else.
            for name in names:
                rc, _out = lab.run(frame4(query(name)))
                assert (rc == REDIRECT) == (name in live), name
        assert stale == 0
        assert answers > 100
        assert pool.stats()["recycled"] > 100
    finally:
        pool.set_mirror(None)
        lab.pool.set_mirror(lab.kernel)


def test_kernel_hits_keep_a_name_from_recycling(lab: Lab) -> None:
    """LRU with kernel answers: a name answered only in the kernel is not
    the one recycled."""
    cfg = lab.cfg
    pool = FakeIPPool(ipaddress.IPv4Network("198.19.1.0/29"), None)  # 6 addresses
    handler = DnsHandler(cfg.dns, pool)
    lab.pool.set_mirror(None)
    pool.set_mirror(lab.kernel)
    try:
        for i in range(6):
            handler.handle(query(f"h{i}.lru.example.com"))
        # h0 is the least recently used in userspace, but the kernel answers it.
        rc, _ = lab.run(frame4(query("h0.lru.example.com")))
        assert rc == REDIRECT
        handler.handle(query("new.lru.example.com"))
        live = {n for n, _ip, _p in pool.mappings()}
        assert "h0.lru.example.com" in live
        assert "h1.lru.example.com" not in live
        assert pool.stats()["kernel_spared"] == 1
        rc, _ = lab.run(frame4(query("h1.lru.example.com")))
        assert rc == UNSPEC
    finally:
        pool.set_mirror(None)
        lab.pool.set_mirror(lab.kernel)


def test_reload_resync_follows_the_handler(lab: Lab) -> None:
    payload = query("soon-hosts.example.com")
    lab.handler.handle(payload)
    rc, _ = lab.run(frame4(payload))
    assert rc == REDIRECT
    dns = lab.cfg.dns
    new = DnsConfig(listen=dns.listen, ipv6=True, fake_ip_range6=RANGE6,
                    fake_ip_filter=dns.fake_ip_filter,
                    hosts=(("soon-hosts.example.com", (ipaddress.ip_address("10.1.2.3"),)),))
    lab.handler.reconfigure(new)
    try:
        lab.pool.resync_mirror()
        falls(lab, frame4(payload), "miss")
        assert QTYPE.get(DNSRecord.parse(lab.handler.handle(payload)).rr[0].rtype) == "A"
    finally:
        lab.handler.reconfigure(dns)
        lab.pool.resync_mirror()
