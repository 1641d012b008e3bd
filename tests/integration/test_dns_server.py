"""The DNS service on loopback, asked by real clients (dig, plain sockets).

The upstream is a real dnsmasq on 127.61.0.1 (`--no-resolv`, its answers set
by `--address`/`--host-record`/`--txt-record`), reached through a small
Upstream that forwards over UDP. A second Upstream points at a socket that
never answers: the client must still get SERVFAIL in bounded time.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord

from appliance.config.model import DnsConfig, Listen
from appliance.dns import server
from appliance.dns.handler import DnsHandler
from appliance.dns.upstream_api import UpstreamError
from appliance.fakeip.pool import FakeIPPool
from appliance.lab.servers import stop_all
from appliance.limits import ConcurrencyLimit, RateLimit

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("dig") or not shutil.which("dnsmasq"),
    reason="needs root, dig and dnsmasq",
)

DNSMASQ_ADDR = "127.61.0.1"
SILENT_ADDR = "127.61.0.2"  # a UDP socket that reads nothing: a dead upstream
FAKE_RANGE = ipaddress.IPv4Network("198.18.0.0/16")
MANY = tuple(ipaddress.ip_address(f"10.9.{i // 250}.{i % 250 + 1}") for i in range(60))


def _free_port(host: str = "0.0.0.0") -> int:
    """A port free for both UDP and TCP on `host` (checked, then released)."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind((host, port))
                t.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


@dataclass
class UdpForwarder:
    """Upstream protocol over plain UDP to one server (test-only resolver)."""

    host: str
    port: int
    timeout: float = 1.0

    async def query(self, request: DNSRecord) -> DNSRecord:
        request = DNSRecord.parse(request.pack())
        request.header.id = random.randint(0, 0xFFFF)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.connect((self.host, self.port))
            with trio.move_on_after(self.timeout):
                try:
                    await sock.send(request.pack())
                    while True:
                        reply = DNSRecord.parse(await sock.recv(65535))
                        if reply.header.id == request.header.id:
                            return reply
                except OSError as err:
                    raise UpstreamError(f"{self.host}:{self.port}: {err}") from None
        raise UpstreamError(f"{self.host}:{self.port}: timed out")


@pytest.fixture(scope="module")
def dnsmasq() -> Iterator[int]:
    port = _free_port(DNSMASQ_ADDR)
    proc = subprocess.Popen(
        ["dnsmasq", "-k", "-C", "/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
         f"--listen-address={DNSMASQ_ADDR}", f"--port={port}", "--pid-file=",
         "--address=/real.test/10.1.2.3", "--host-record=host.real.test,10.1.2.4",
         "--txt-record=txt.real.test,hello dnsmasq", "--mx-host=mx.real.test,mail.real.test,5",
         "--ptr-record=4.4.8.8.in-addr.arpa,dns.example."],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # ready once it answers
            probe = subprocess.run(["dig", f"@{DNSMASQ_ADDR}", "-p", str(port), "+short",
                                    "+time=1", "+tries=1", "real.test"],
                                   capture_output=True, text=True, check=False)
            if probe.stdout.strip() == "10.1.2.3":
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        else:
            raise RuntimeError("dnsmasq did not come up")
        yield port
    finally:
        stop_all([proc])


@dataclass
class Server:
    port: int
    handler: DnsHandler
    pool: FakeIPPool


def _config(**kw: object) -> DnsConfig:
    base: dict[str, object] = {
        "fake_ip_filter": ("+.real.test", "+.in-addr.arpa"),
        "hosts": (("many.lan", MANY),),
        "upstream_timeout": 0.3,
    }
    base.update(kw)
    return DnsConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
async def dns_server(dnsmasq: int) -> AsyncIterator[Server]:
    cfg = _config()
    pool = FakeIPPool(FAKE_RANGE)
    handler = DnsHandler(cfg, pool)
    port = _free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: server.serve(
                Listen("0.0.0.0", port), handler, UdpForwarder(DNSMASQ_ADDR, dnsmasq),
                tcp_idle_timeout=2.0, task_status=task_status,
            )
        )
        yield Server(port, handler, pool)
        nursery.cancel_scope.cancel()


async def dig(port: int, *args: str, at: str = "127.0.0.1") -> str:
    with trio.fail_after(10):
        proc = await trio.run_process(
            ["dig", f"@{at}", "-p", str(port), "+time=2", "+tries=1", *args],
            capture_stdout=True, check=False,
        )
    return proc.stdout.decode()


async def test_a_gets_fake_ip_aaaa_empty(dns_server: Server) -> None:
    out = await dig(dns_server.port, "+short", "www.example.com", "A")
    ip = ipaddress.ip_address(out.strip())
    assert ip in FAKE_RANGE
    assert dns_server.pool.reverse(ip) == "www.example.com"
    full = await dig(dns_server.port, "www.example.com", "AAAA")
    assert "status: NOERROR" in full and "ANSWER: 0" in full
    assert "flags: qr aa rd ra" in await dig(dns_server.port, "www.example.com")


async def test_tcp_query(dns_server: Server) -> None:
    out = await dig(dns_server.port, "+tcp", "+short", "tcp.example.com")
    assert ipaddress.ip_address(out.strip()) in FAKE_RANGE


async def test_ptr_of_fake_ip(dns_server: Server) -> None:
    ip = ipaddress.ip_address((await dig(dns_server.port, "+short", "ptr.example.com")).strip())
    assert (await dig(dns_server.port, "+short", "-x", str(ip))).strip() == "ptr.example.com."
    unmapped = await dig(dns_server.port, "-x", "198.18.250.250")
    assert "status: NXDOMAIN" in unmapped
    # PTR outside the fake range goes to the real upstream.
    assert (await dig(dns_server.port, "+short", "-x", "8.8.4.4")).strip() == "dns.example."


async def test_filtered_and_other_types_come_from_upstream(dns_server: Server) -> None:
    assert (await dig(dns_server.port, "+short", "real.test")).strip() == "10.1.2.3"
    assert (await dig(dns_server.port, "+short", "host.real.test")).strip() == "10.1.2.4"
    assert (await dig(dns_server.port, "+short", "txt.real.test", "TXT")).strip() == \
        '"hello dnsmasq"'
    assert (await dig(dns_server.port, "+short", "+tcp", "mx.real.test", "MX")).strip() == \
        "5 mail.real.test."
    assert dns_server.pool.lookup("real.test") is None


def _query(name: str, qtype: str = "A", *, qid: int = 1, edns: int | None = None) -> bytes:
    rec = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        rec.add_ar(EDNS0(udp_len=edns))
    return bytes(rec.pack())


async def _udp_ask(sock: trio.socket.SocketType, data: bytes, to: tuple[str, int]) -> tuple[
        DNSRecord, bytes, tuple[str, int]]:
    await sock.sendto(data, to)
    with trio.fail_after(3):
        raw, peer = await sock.recvfrom(65535)
    return DNSRecord.parse(raw), raw, peer


async def test_reply_comes_from_the_address_asked(dns_server: Server) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        for qid, dst in enumerate(["127.0.0.2", "127.0.0.1", "127.0.0.2", "127.0.0.3"]):
            # fake answer (synchronous path) and upstream answer (task path)
            for name in ("src.example.com", "real.test"):
                rec, _raw, peer = await _udp_ask(sock, _query(name, qid=qid),
                                                 (dst, dns_server.port))
                assert peer == (dst, dns_server.port)
                assert rec.header.id == qid and rec.rr


async def test_udp_truncation_and_tcp_fallback(dns_server: Server) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        rec, raw, _ = await _udp_ask(sock, _query("many.lan", qid=9), ("127.0.0.1",
                                                                      dns_server.port))
        assert rec.header.tc and len(raw) <= 512 and not rec.rr and rec.header.id == 9
        rec, raw, _ = await _udp_ask(sock, _query("many.lan", qid=10, edns=4096),
                                     ("127.0.0.1", dns_server.port))
        assert not rec.header.tc and len(rec.rr) == len(MANY)
    out = await dig(dns_server.port, "+noedns", "+short", "many.lan")  # dig retries on TCP
    assert len(out.split()) == len(MANY)


async def _tcp_connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _read_frames(stream: trio.SocketStream, count: int) -> list[DNSRecord]:
    buf = b""
    out: list[DNSRecord] = []
    with trio.fail_after(5):
        while len(out) < count:
            chunk = await stream.receive_some(65535)
            assert chunk, "connection closed early"
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                size = int.from_bytes(buf[:2], "big")
                out.append(DNSRecord.parse(buf[2 : 2 + size]))
                buf = buf[2 + size :]
    return out


async def test_tcp_pipelined_queries(dns_server: Server) -> None:
    stream = await _tcp_connect(dns_server.port)
    async with stream:
        names = ["p1.example.com", "real.test", "p2.example.com", "txt.real.test", "many.lan"]
        types = ["A", "A", "A", "TXT", "A"]
        blob = b"".join(
            len(q).to_bytes(2, "big") + q
            for q in (_query(n, t, qid=100 + i) for i, (n, t) in enumerate(zip(names, types,
                                                                                strict=True)))
        )
        await stream.send_all(blob)
        replies = await _read_frames(stream, len(names))
        by_id = {r.header.id: r for r in replies}
        assert sorted(by_id) == [100, 101, 102, 103, 104]
        assert str(by_id[101].rr[0].rdata) == "10.1.2.3"
        assert len(by_id[104].rr) == len(MANY)  # no truncation over TCP


async def test_tcp_idle_connection_is_closed(dns_server: Server) -> None:
    stream = await _tcp_connect(dns_server.port)
    async with stream:
        await stream.send_all(b"\x00\x40partial")  # never completes
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # closed after ~2 s


async def test_hostile_packets_then_a_good_query(dns_server: Server) -> None:
    rng = random.Random(1234)
    good = _query("survivor.example.com", qid=4321)
    hostile: list[bytes] = [
        b"", b"\x00", b"\xff" * 11, b"\x12\x34" + b"\xff" * 10,
        good[:13], good[:-3], good + b"\x00" * 7,
        b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\xc0\x0c" * 40,  # pointer loop
        b"\xab\xce\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01" + b"\x3f" + b"a" * 63 * 5,
        b"\x00\x01\x81\x80" + good[4:],  # a response
        bytes(rng.getrandbits(8) for _ in range(60000)),  # oversized
    ]
    hostile += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 700))) for _ in range(200)]
    for _ in range(100):  # mutated real queries
        b = bytearray(_query("m.example.com", "A", edns=1232))
        for _ in range(3):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        hostile.append(bytes(b))
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        for data in hostile:
            await sock.sendto(data, ("127.0.0.1", dns_server.port))
        # Drain whatever came back (FORMERR etc.), then the good query.
        with trio.move_on_after(1.5):
            while True:
                await sock.recv(65535)
        rec, _, _ = await _udp_ask(sock, good, ("127.0.0.1", dns_server.port))
        assert rec.header.id == 4321 and ipaddress.ip_address(str(rec.rr[0].rdata)) in FAKE_RANGE
    # Same over TCP: garbage frames, a frame cut short and a hung-up client.
    stream = await _tcp_connect(dns_server.port)
    async with stream:
        await stream.send_all(b"\x00\x05hello" + b"\x00\x0c\x12\x34\x01\x00" + b"\xff" * 8)
        replies = await _read_frames(stream, 1)  # FORMERR for the 12-byte frame
        assert replies[0].header.rcode == RCODE.FORMERR
    stream = await _tcp_connect(dns_server.port)
    await stream.send_all(b"\xff\xff" + b"x" * 1000)
    await stream.aclose()
    out = await dig(dns_server.port, "+tcp", "+short", "survivor2.example.com")
    assert ipaddress.ip_address(out.strip()) in FAKE_RANGE
    assert dns_server.handler.formerr > 0


async def test_dead_upstream_gives_servfail_in_bounded_time(dnsmasq: int) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((SILENT_ADDR, 0))
    port = _free_port()
    handler = DnsHandler(_config(upstream_timeout=0.3), FakeIPPool(FAKE_RANGE))
    try:
        async with trio.open_nursery() as nursery:
            dead = UdpForwarder(SILENT_ADDR, silent.getsockname()[1], timeout=30)
            await nursery.start(
                lambda task_status: server.serve(Listen("127.0.0.1", port), handler, dead,
                                                 task_status=task_status)
            )
            start = trio.current_time()
            out = await dig(port, "real.test")
            elapsed = trio.current_time() - start
            assert "status: SERVFAIL" in out
            assert elapsed < 1.5  # 0.3 s timeout + 0.5 s grace + dig
            out = await dig(port, "+tcp", "txt.real.test", "TXT")
            assert "status: SERVFAIL" in out
            # Fake answers do not wait for the upstream at all.
            assert "198.18." in await dig(port, "+short", "fine.example.com")
            nursery.cancel_scope.cancel()
    finally:
        silent.close()
    assert handler.servfail == 2


async def test_inflight_bound_answers_servfail_at_once(dnsmasq: int) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((SILENT_ADDR, 0))
    port = _free_port()
    handler = DnsHandler(_config(upstream_timeout=2.0), FakeIPPool(FAKE_RANGE))
    dead = UdpForwarder(SILENT_ADDR, silent.getsockname()[1], timeout=30)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: server.serve(Listen("127.0.0.1", port), handler, dead,
                                                 max_inflight=2, task_status=task_status)
            )
            for qid in (1, 2, 3):
                await sock.sendto(_query("real.test", qid=qid), ("127.0.0.1", port))
            with trio.fail_after(1):  # the third is refused long before the deadline
                rec = DNSRecord.parse(await sock.recv(65535))
            assert rec.header.id == 3 and rec.header.rcode == RCODE.SERVFAIL
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
        silent.close()


async def test_transparent_socket_still_serves(dnsmasq: int) -> None:
    port = _free_port()
    handler = DnsHandler(_config(), FakeIPPool(FAKE_RANGE))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: server.serve(Listen("0.0.0.0", port), handler,
                                             UdpForwarder(DNSMASQ_ADDR, dnsmasq),
                                             transparent=True, task_status=task_status)
        )
        out = await dig(port, "+short", "t.example.com", at="127.0.0.5")
        assert ipaddress.ip_address(out.strip()) in FAKE_RANGE
        nursery.cancel_scope.cancel()


async def test_bind_failure_raises_before_started() -> None:
    port = _free_port()
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", port))
    handler = DnsHandler(_config(), FakeIPPool(FAKE_RANGE))
    try:
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError):
                await nursery.start(
                    lambda task_status: server.serve(Listen("127.0.0.1", port), handler,
                                                     UdpForwarder("127.0.0.1", 9),
                                                     task_status=task_status)
                )
    finally:
        holder.close()
    # The UDP socket bound first was released again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))


# -- fair shares: one client over its share, another served --------------------

FLOODER, NEIGHBOUR = "127.61.1.2", "127.61.1.3"  # two loopback clients


class SlowForSome:
    """An upstream that never answers names under slow.test (a flooder's
    queries) and forwards the rest to dnsmasq."""

    def __init__(self, dnsmasq: int) -> None:
        self.forward = UdpForwarder(DNSMASQ_ADDR, dnsmasq)

    async def query(self, request: DNSRecord) -> DNSRecord:
        if str(request.q.qname).rstrip(".").endswith("slow.test"):
            await trio.sleep_forever()
        return await self.forward.query(request)


async def _ask_from(source: str, port: int, name: str, qid: int) -> DNSRecord:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind((source, 0))
        await sock.sendto(_query(name, qid=qid), ("127.0.0.1", port))
        with trio.fail_after(3):
            return DNSRecord.parse(await sock.recv(65535))


async def test_one_clients_upstream_flood_leaves_the_others_upstream_queries_alone(
        dnsmasq: int) -> None:
    port = _free_port()
    handler = DnsHandler(_config(upstream_timeout=5.0, fake_ip_filter=("+.test",)),
                         FakeIPPool(FAKE_RANGE))
    share = ConcurrencyLimit(per_client=4, total=server.MAX_INFLIGHT)
    flood = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await flood.bind((FLOODER, 0))
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: server.serve(Listen("127.0.0.1", port), handler,
                                                 SlowForSome(dnsmasq), max_inflight=32,
                                                 upstream_share=share, task_status=task_status)
            )
            # 50 queries that never come back: without a share they would
            # take all 32 places and the neighbour would get SERVFAIL.
            for qid in range(50):
                await flood.sendto(_query(f"n{qid}.slow.test", qid=qid), ("127.0.0.1", port))
            refused = 0
            with trio.fail_after(2):  # refused at once, not after the deadline
                while refused < 46:
                    rec = DNSRecord.parse(await flood.recv(65535))
                    assert rec.header.rcode == RCODE.SERVFAIL
                    refused += 1
            answers = [await _ask_from(NEIGHBOUR, port, "real.test", qid) for qid in range(20)]
            assert [str(a.rr[0].rdata) for a in answers] == ["10.1.2.3"] * 20
            nursery.cancel_scope.cancel()
    finally:
        flood.close()
    assert share.stats()["refused"] == 46
    assert share.stats()["top_refused"] == [{"client": FLOODER, "refused": 46}]


async def test_one_clients_held_tcp_connections_leave_the_others_dns_over_tcp(
        dnsmasq: int) -> None:
    port = _free_port()
    handler = DnsHandler(_config(), FakeIPPool(FAKE_RANGE))
    share = ConcurrencyLimit(per_client=3, total=server.MAX_TCP_CONNECTIONS)
    held: list[trio.SocketStream] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: server.serve(Listen("127.0.0.1", port), handler,
                                                 UdpForwarder(DNSMASQ_ADDR, dnsmasq),
                                                 max_tcp_connections=8, tcp_idle_timeout=30,
                                                 tcp_share=share, task_status=task_status)
            )
            for _ in range(10):  # more than the whole service's 8
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                await sock.bind((FLOODER, 0))
                await sock.connect(("127.0.0.1", port))
                held.append(trio.SocketStream(sock))
            closed = 0
            for stream in held[3:]:  # over the share: closed at once
                with trio.fail_after(2):
                    try:
                        closed += await stream.receive_some(10) == b""
                    except trio.BrokenResourceError:
                        closed += 1
            assert closed == 7
            out = await dig(port, "-b", NEIGHBOUR, "+tcp", "+short", "real.test")
            assert out.strip() == "10.1.2.3"
            nursery.cancel_scope.cancel()
    finally:
        for stream in held:
            stream.socket.close()
    assert share.stats()["top_refused"] == [{"client": FLOODER, "refused": 7}]


async def test_new_names_over_one_clients_rate_leave_the_others_fake_ips() -> None:
    port = _free_port()
    rate = RateLimit(rate=1, burst=5)
    handler = DnsHandler(_config(), FakeIPPool(FAKE_RANGE), fake_ip_rate=rate)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: server.serve(Listen("127.0.0.1", port), handler,
                                             UdpForwarder("127.0.0.1", 9),
                                             task_status=task_status)
        )
        rcodes = [(await _ask_from(FLOODER, port, f"new{i}.example", i)).header.rcode
                  for i in range(20)]
        assert rcodes.count(RCODE.NOERROR) in (5, 6) and rcodes[-1] == RCODE.SERVFAIL
        # A name the flooder already has still answers; the neighbour is served.
        again = await _ask_from(FLOODER, port, "new0.example", 99)
        assert again.header.rcode == RCODE.NOERROR and again.rr
        for i in range(5):
            rec = await _ask_from(NEIGHBOUR, port, f"other{i}.example", i)
            assert ipaddress.ip_address(str(rec.rr[0].rdata)) in FAKE_RANGE
        nursery.cancel_scope.cancel()
    assert handler.stats()["fake_ip_refused"] >= 14


def test_struct_sizes() -> None:
    assert struct.calcsize("=i4s4s") == 12  # struct in_pktinfo


async def test_dual_stack_listen_replies_from_the_address_asked(dnsmasq: int) -> None:
    port = _free_port()
    handler = DnsHandler(_config(), FakeIPPool(FAKE_RANGE))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: server.serve(Listen("::", port), handler,
                                             UdpForwarder(DNSMASQ_ADDR, dnsmasq),
                                             task_status=task_status)
        )
        for family, dst in ((socket.AF_INET, "127.0.0.6"), (socket.AF_INET6, "::1"),
                            (socket.AF_INET6, "::ffff:127.0.0.7")):
            sock = trio.socket.socket(family, socket.SOCK_DGRAM)
            with sock:
                for name in ("ds.example.com", "real.test"):
                    rec, _raw, peer = await _udp_ask(sock, _query(name), (dst, port))
                    assert peer[:2] == (dst, port) and rec.rr
        out = await dig(port, "+tcp", "+short", "ds6.example.com", at="::1")
        assert ipaddress.ip_address(out.strip()) in FAKE_RANGE
        nursery.cancel_scope.cancel()


# -- TPROXY: a query to another resolver's address is answered from that address --

TPROXY_SERVER = """
import sys, trio
sys.path.insert(0, {root!r})
from appliance.config.model import DnsConfig, Listen
from appliance.dns import server
from appliance.dns.handler import DnsHandler
from appliance.dns.upstream_api import UpstreamError
from appliance.fakeip.pool import FakeIPPool

class NoUpstream:
    async def query(self, request):
        raise UpstreamError("no upstream in this test")

async def main():
    cfg = DnsConfig()
    handler = DnsHandler(cfg, FakeIPPool(cfg.fake_ip_range))
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: server.serve(
            Listen("::", {port}), handler, NoUpstream(), transparent=True,
            task_status=task_status))
        print("ready", flush=True)
        with trio.move_on_after(60):
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()

trio.run(main)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def tproxy_lab(tmp_path: Path) -> Iterator[str]:
    """Two namespaces: a client whose default routes (v4 and v6) go to a
    gateway that TPROXYs port 53 to any address into our server, listening on
    [::]:5353 with transparent=True. Yields the client namespace's name."""
    tag = f"{os.getpid() % 100000}"
    client, gw = f"dnssrv-cl-{tag}", f"dnssrv-gw-{tag}"
    port = 5353
    proc: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", client)
        _ip("netns", "add", gw)
        _ip("-n", client, "link", "set", "lo", "up")
        _ip("-n", gw, "link", "set", "lo", "up")
        _ip("-n", client, "link", "add", "cl0", "type", "veth", "peer", "name", "gw0",
            "netns", gw)
        _ip("-n", client, "addr", "add", "10.61.0.2/24", "dev", "cl0")
        _ip("-n", gw, "addr", "add", "10.61.0.1/24", "dev", "gw0")
        _ip("-n", client, "link", "set", "cl0", "up")
        _ip("-n", gw, "link", "set", "gw0", "up")
        _ip("-n", client, "addr", "add", "fd61::2/64", "dev", "cl0", "nodad")
        _ip("-n", gw, "addr", "add", "fd61::1/64", "dev", "gw0", "nodad")
        _ip("-n", client, "route", "add", "default", "via", "10.61.0.1")
        _ip("-n", client, "-6", "route", "add", "default", "via", "fd61::1")
        for v in ("-4", "-6"):
            _ip("-n", gw, v, "rule", "add", "fwmark", "1", "lookup", "100")
            _ip("-n", gw, v, "route", "add", "local", "default", "dev", "lo", "table", "100")
        ruleset = "".join(
            f"table {fam} dnssrv {{\n chain pre {{\n"
            "  type filter hook prerouting priority mangle; policy accept;\n"
            f"  iifname gw0 udp dport 53 tproxy to :{port} meta mark set 1 accept\n"
            f"  iifname gw0 tcp dport 53 tproxy to :{port} meta mark set 1 accept\n"
            " }\n}\n"
            for fam in ("ip", "ip6")
        )
        subprocess.run(["ip", "netns", "exec", gw, "nft", "-f", "-"], input=ruleset, text=True,
                       check=True, capture_output=True)
        script = tmp_path / "tproxy_server.py"
        root = Path(__file__).resolve().parents[2]
        script.write_text(TPROXY_SERVER.format(root=str(root), port=port))
        proc = subprocess.Popen(
            ["ip", "netns", "exec", gw, sys.executable, str(script)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the script exits within 60 s
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield client
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        for ns in (client, gw):  # the nft table and rules go with the namespace
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.mark.netns
def test_tproxy_hijacked_query_answered_from_the_resolver_address(tproxy_lab: str) -> None:
    # dig ignores a UDP reply from any other address or port than it asked.
    for server_addr, port in (("203.0.113.53", 53), ("2001:db8::53", 53), ("10.61.0.1", 5353)):
        for extra in ([], ["+tcp"]):
            out = subprocess.run(
                ["ip", "netns", "exec", tproxy_lab, "dig", f"@{server_addr}", "-p", str(port),
                 "+time=2", "+tries=1", *extra, "hijacked.example.com"],
                capture_output=True, text=True, check=False, timeout=10,
            ).stdout
            assert "status: NOERROR" in out, out
            assert f"SERVER: {server_addr}#{port}" in out, out
            assert "198.18.0." in out.split("ANSWER SECTION:")[1], out
