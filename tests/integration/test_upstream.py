"""The upstream resolver against real unbound servers on loopback addresses.

Two unbounds (A on NET.1, B on NET.2) serve DoH on 443 (HTTP/2
only: unbound drops HTTP/1.1, so every DoH answer here was an HTTP/2 answer)
and plain DNS on 53, with certificates from a private CA made by certs.py.
They give different answers for `pick.lab.test`, which shows which one
answered. NET.3 has nothing listening; blackholes (sockets that never
answer) are bound per test on NET.4; NET.5 hosts short-lived servers.
NET is a loopback /24 derived from the PID, so concurrent runs of the suite
never share an address (and the fixture checks nothing else listens there).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from lab_client import loopback_net

from appliance.config.model import DnsConfig, DomainPolicy, Nameserver
from appliance.dns.upstream import STAGGER, Resolver
from appliance.dns.upstream_api import UpstreamError
from appliance.lab.certs import CertPaths, make_ca_and_cert
from appliance.lab.doh_server import ServerConfig, UnboundServer

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="binds ports 53/443: needs root"),
]

# Its own loopback /24 (test_upstream_policy.py takes 127.192-251.*).
_NET = loopback_net(64, 128)
ADDR_A = f"{_NET}.1"
ADDR_B = f"{_NET}.2"
ADDR_DEAD = f"{_NET}.3"
ADDR_HOLE = f"{_NET}.4"
ADDR_C = f"{_NET}.5"
MARK = 0x5A5
TIMEOUT = 0.6
# Scheduling slack on a loaded 2-core machine.
MARGIN = 0.5

BIG_TXT = [f'TXT "{i:02d}-{"x" * 60}"' for i in range(20)]

COMMON = {
    "www.lab.test": [
        "A 192.0.2.10",
        "AAAA 2001:db8::10",
        "MX 10 mail.lab.test.",
        'TXT "hello world"',
        "HTTPS 1 . alpn=h2 ipv4hint=192.0.2.11",
    ],
    "10.2.0.192.in-addr.arpa": ["PTR www.lab.test."],
    "doh.lab.test": [f"A {ADDR_A}"],
    # Resolves to A, but A's certificate does not carry this name.
    "wrongname.lab.test": [f"A {ADDR_A}"],
    "big.lab.test": BIG_TXT,
}


def _bound_on(address: str) -> str:
    ss = subprocess.run(
        ["ss", "-Hlntu", "src", address], capture_output=True, text=True, check=True, timeout=10
    )
    return ss.stdout.strip()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_ca_and_cert(
        tmp_path_factory.mktemp("ups-pki"),
        ips=[ADDR_A, ADDR_B, ADDR_C],
        names=["doh.lab.test", "doh-b.lab.test"],
    )


@pytest.fixture(scope="module")
def servers(pki: CertPaths) -> Iterator[tuple[UnboundServer, UnboundServer]]:
    for address in (ADDR_A, ADDR_B, ADDR_DEAD, ADDR_HOLE, ADDR_C):
        assert not _bound_on(address), f"{address} is taken:\n{_bound_on(address)}"
    records_a = {**COMMON, "pick.lab.test": ["A 192.0.2.1"]}
    records_b = {**COMMON, "pick.lab.test": ["A 192.0.2.2"], "doh-b.lab.test": [f"A {ADDR_B}"]}
    with UnboundServer(ServerConfig([ADDR_A], pki.cert, pki.key, records=records_a)) as a, \
            UnboundServer(ServerConfig([ADDR_B], pki.cert, pki.key, records=records_b)) as b:
        yield a, b


def doh(host: str, *, get: bool = False, port: int = 443) -> Nameserver:
    text = f"https://{host}:{port}/dns-query" + ("#method=GET" if get else "")
    return Nameserver("https", host, port, "/dns-query", text)


def udp(host: str, port: int = 53) -> Nameserver:
    return Nameserver("udp", host, port, text=f"udp://{host}:{port}")


def tcp(host: str, port: int = 53) -> Nameserver:
    return Nameserver("tcp", host, port, text=f"tcp://{host}:{port}")


def config(*nameservers: Nameserver, pki: CertPaths | None, **changes: Any) -> DnsConfig:
    base = DnsConfig(
        nameserver=nameservers,
        ca_file=pki.ca_cert if pki is not None else None,
        upstream_timeout=TIMEOUT,
    )
    return dataclasses.replace(base, **changes)


async def ask(resolver: Resolver, name: str, qtype: str = "A") -> DNSRecord:
    request = DNSRecord.question(name, qtype)
    request.header.id = 0x1234
    reply = await resolver.query(request)
    assert reply.header.id == 0x1234
    assert reply.q.qname == request.q.qname and reply.q.qtype == request.q.qtype
    return reply


def rdatas(reply: DNSRecord, qtype: str = "A") -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == getattr(QTYPE, qtype)]


# -- DoH -----------------------------------------------------------------------


@pytest.mark.parametrize("get", [False, True], ids=["POST", "GET"])
async def test_doh_answers_every_record_type(servers: object, pki: CertPaths, get: bool) -> None:
    async with Resolver(config(doh(ADDR_A, get=get), pki=pki)) as resolver:
        assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]
        assert rdatas(await ask(resolver, "www.lab.test", "AAAA"), "AAAA") == ["2001:db8::10"]
        assert rdatas(await ask(resolver, "www.lab.test", "MX"), "MX") == ["10 mail.lab.test."]
        assert rdatas(await ask(resolver, "www.lab.test", "TXT"), "TXT") == ['"hello world"']
        https = await ask(resolver, "www.lab.test", "HTTPS")
        assert [rr.rtype for rr in https.rr] == [QTYPE.HTTPS]
        assert "192.0.2.11" in str(https.rr[0].rdata)
        ptr = await ask(resolver, "10.2.0.192.in-addr.arpa", "PTR")
        assert rdatas(ptr, "PTR") == ["www.lab.test."]
        nx = await ask(resolver, "nope.lab.test")
        assert nx.header.rcode == RCODE.NXDOMAIN


async def test_private_ca_via_ssl_cert_file(
    servers: object, pki: CertPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    async with Resolver(config(doh(ADDR_A), pki=None)) as resolver:
        assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]


async def test_untrusted_certificate_is_refused(
    servers: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with Resolver(config(doh(ADDR_A), pki=None)) as resolver:
        with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
            await ask(resolver, "www.lab.test")


async def test_doh_host_name_is_bootstrapped_via_default_nameserver(
    servers: object, pki: CertPaths
) -> None:
    # B (plain UDP) says doh.lab.test is A's address; the answer for
    # pick.lab.test then comes from A over DoH (A: 192.0.2.1, B: .2).
    dns = config(doh("doh.lab.test"), pki=pki, default_nameserver=(udp(ADDR_B),))
    async with Resolver(dns) as resolver:
        assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.1"]
    # The certificate is checked against the name, not the address, even
    # with a verified connection to the same address already in the pool.
    dns = config(
        doh("doh.lab.test"),
        pki=pki,
        default_nameserver=(udp(ADDR_B),),
        nameserver_policy=(DomainPolicy("+.other.lab.test", (doh("wrongname.lab.test"),)),),
    )
    async with Resolver(dns) as resolver:
        assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.1"]
        with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
            await ask(resolver, "x.other.lab.test")
    # Without a default-nameserver nothing (not the system resolver) is asked.
    async with Resolver(config(doh("doh.lab.test"), pki=pki)) as resolver:
        with pytest.raises(UpstreamError, match="default-nameserver"):
            await ask(resolver, "pick.lab.test")


async def test_nameserver_policy_routes_by_name(servers: object, pki: CertPaths) -> None:
    dns = config(
        doh(ADDR_A),
        pki=pki,
        nameserver_policy=(DomainPolicy("+.pick.lab.test", (doh(ADDR_B, get=True),)),),
    )
    async with Resolver(dns) as resolver:
        assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.2"]  # B
        assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]


# -- plain DNS ---------------------------------------------------------------------


async def test_udp_and_tcp_nameservers(servers: object) -> None:
    for ns in (udp(ADDR_A), tcp(ADDR_B)):
        async with Resolver(config(ns, pki=None)) as resolver:
            reply = await ask(resolver, "pick.lab.test")
            assert rdatas(reply) == ["192.0.2.1" if ns.host == ADDR_A else "192.0.2.2"]


async def test_truncated_udp_answer_is_retried_over_tcp(servers: object) -> None:
    # Independent check that the answer does not fit a plain UDP reply.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(DNSRecord.question("big.lab.test", "TXT").pack(), (ADDR_A, 53))
        assert DNSRecord.parse(sock.recv(4096)).header.tc == 1
    async with Resolver(config(udp(ADDR_A), pki=None)) as resolver:
        reply = await ask(resolver, "big.lab.test", "TXT")
        assert reply.header.tc == 0
        assert len(rdatas(reply, "TXT")) == len(BIG_TXT)


# -- failures, races and the deadline -------------------------------------------


class Blackhole:
    """Sockets on ADDR_HOLE that take queries and never answer: a UDP socket,
    and a TCP listener whose backlog completes handshakes nobody accepts."""

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((ADDR_HOLE, 0))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind((ADDR_HOLE, 0))
        self.tcp.listen(16)

    @property
    def udp_port(self) -> int:
        return int(self.udp.getsockname()[1])

    @property
    def tcp_port(self) -> int:
        return int(self.tcp.getsockname()[1])

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


@pytest.fixture
def hole() -> Iterator[Blackhole]:
    blackhole = Blackhole()
    try:
        yield blackhole
    finally:
        blackhole.close()


async def test_dead_first_nameserver_loses_the_race(
    servers: object, pki: CertPaths, hole: Blackhole
) -> None:
    assert not _bound_on(ADDR_DEAD)
    # Refused at once: the next nameserver starts without waiting the stagger.
    async with Resolver(config(doh(ADDR_DEAD), doh(ADDR_B), pki=pki)) as resolver:
        start = time.monotonic()
        assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.2"]
        assert time.monotonic() - start < STAGGER + MARGIN
    # Silent: the next one starts after the stagger and wins.
    for silent in (udp(ADDR_HOLE, hole.udp_port), doh(ADDR_HOLE, port=hole.tcp_port)):
        async with Resolver(config(silent, udp(ADDR_A), pki=pki)) as resolver:
            start = time.monotonic()
            assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.1"]
            elapsed = time.monotonic() - start
            assert STAGGER * 0.9 <= elapsed < STAGGER + MARGIN


async def test_unreachable_upstreams_fail_within_the_deadline(
    servers: object, pki: CertPaths, hole: Blackhole
) -> None:
    cases = [
        (doh(ADDR_DEAD), False),
        (tcp(ADDR_DEAD), False),
        (udp(ADDR_HOLE, hole.udp_port), True),
        (tcp(ADDR_HOLE, hole.tcp_port), True),
        (doh(ADDR_HOLE, port=hole.tcp_port), True),
    ]
    for ns, silent in cases:
        async with Resolver(config(ns, pki=pki)) as resolver:
            start = time.monotonic()
            with pytest.raises(UpstreamError):
                await ask(resolver, "www.lab.test")
            elapsed = time.monotonic() - start
            assert elapsed < TIMEOUT + MARGIN, ns.text
            if silent:
                assert elapsed >= TIMEOUT * 0.9, ns.text


async def test_negative_answers_are_cached_per_soa(pki: CertPaths, servers: object) -> None:
    server = UnboundServer(
        ServerConfig([ADDR_C], pki.cert, pki.key, records=COMMON, negative_ttl=30)
    )
    await trio.to_thread.run_sync(server.start)
    try:
        async with Resolver(config(doh(ADDR_C), pki=pki)) as resolver:
            first = await ask(resolver, "nx.lab.test")
            assert first.header.rcode == RCODE.NXDOMAIN
            assert [rr.rtype for rr in first.auth] == [QTYPE.SOA]
            assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]
            await trio.to_thread.run_sync(server.stop)
            # The server is gone: what still answers comes from the cache.
            again = await ask(resolver, "NX.lab.test")
            assert again.header.rcode == RCODE.NXDOMAIN
            assert 0 < again.auth[0].ttl <= 30
            assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]
            with pytest.raises(UpstreamError):
                await ask(resolver, "other.lab.test")
    finally:
        await trio.to_thread.run_sync(server.stop)


async def test_identical_concurrent_queries_share_one_upstream_request() -> None:
    """A counting UDP server (not unbound) that answers after 0.2 s."""
    seen: list[int] = []
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((ADDR_HOLE, 0))
    port = sock.getsockname()[1]

    async def serve() -> None:
        while True:
            data, peer = await sock.recvfrom(4096)
            request = DNSRecord.parse(data)
            seen.append(request.header.id)
            await trio.sleep(0.2)
            reply = request.reply()
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("192.0.2.99"), ttl=60))
            await sock.sendto(reply.pack(), peer)

    results: dict[int, DNSRecord] = {}
    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with Resolver(config(udp(ADDR_HOLE, port), pki=None)) as resolver:

                async def one(i: int) -> None:
                    request = DNSRecord.question("same.lab.test", "A")
                    request.header.id = i
                    results[i] = await resolver.query(request)

                async with trio.open_nursery() as askers:
                    for i in range(1, 21):
                        askers.start_soon(one, i)
                # Cached now: no new upstream request.
                assert rdatas(await ask(resolver, "same.lab.test")) == ["192.0.2.99"]
            nursery.cancel_scope.cancel()
    assert len(seen) == 1
    assert sorted(results) == list(range(1, 21))
    assert all(r.header.id == i and rdatas(r) == ["192.0.2.99"] for i, r in results.items())


async def test_resolve_ips(servers: object, pki: CertPaths) -> None:
    async with Resolver(config(doh(ADDR_A), pki=pki)) as resolver:
        ips, ttl = await resolver.resolve_ips("www.lab.test")
        assert [str(ip) for ip in ips] == ["192.0.2.10"]
        assert 0 < ttl <= 300
        ips, _ = await resolver.resolve_ips("www.lab.test", family=6)
        assert [str(ip) for ip in ips] == ["2001:db8::10"]
        assert await resolver.resolve_ips("nx.lab.test") == ([], 30)
        ips, _ = await resolver.resolve_ips("192.0.2.7")
        assert [str(ip) for ip in ips] == ["192.0.2.7"]


async def test_upstream_sockets_carry_the_routing_mark(
    servers: object, pki: CertPaths, hole: Blackhole
) -> None:
    async with Resolver(config(doh(ADDR_A), pki=pki), routing_mark=MARK) as resolver:
        await ask(resolver, "www.lab.test")
        # The pooled HTTP/2 connection is still open: read its mark with ss.
        out = await trio.run_process(
            ["ss", "-Htnie", "dst", f"{ADDR_A}:443"], capture_stdout=True
        )
        assert f"fwmark:{MARK:#x}" in out.stdout.decode()

    # A UDP query socket, caught while it waits on the blackhole.
    dns = config(udp(ADDR_HOLE, hole.udp_port), pki=None, upstream_timeout=2.0)
    async with Resolver(dns, routing_mark=MARK) as resolver, trio.open_nursery() as nursery:

        async def pending() -> None:
            with pytest.raises(UpstreamError):
                await ask(resolver, "www.lab.test")

        nursery.start_soon(pending)
        await trio.sleep(0.2)
        out = await trio.run_process(
            ["ss", "-Huanie", "dst", f"{ADDR_HOLE}:{hole.udp_port}"], capture_stdout=True
        )
        assert f"fwmark:{MARK:#x}" in out.stdout.decode()
        nursery.cancel_scope.cancel()


async def test_servfail_moves_on_to_the_next_nameserver_and_is_not_cached(
    servers: object,
) -> None:
    """A UDP server (not unbound) that answers SERVFAIL at once."""
    seen: list[int] = []
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((ADDR_HOLE, 0))
    port = sock.getsockname()[1]

    async def serve() -> None:
        while True:
            data, peer = await sock.recvfrom(4096)
            request = DNSRecord.parse(data)
            seen.append(request.header.id)
            reply = request.reply()
            reply.header.rcode = RCODE.SERVFAIL
            await sock.sendto(reply.pack(), peer)

    with sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with Resolver(config(udp(ADDR_HOLE, port), udp(ADDR_A), pki=None)) as resolver:
                start = time.monotonic()
                assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.1"]
                assert time.monotonic() - start < STAGGER  # no waiting on a failure
            async with Resolver(config(udp(ADDR_HOLE, port), pki=None)) as resolver:
                for _ in range(2):
                    with pytest.raises(UpstreamError, match="SERVFAIL"):
                        await ask(resolver, "pick.lab.test")
            nursery.cancel_scope.cancel()
    assert len(seen) == 3  # the second SERVFAIL was asked again, not cached


async def test_doh_server_restart_does_not_fail_a_query(pki: CertPaths, servers: object) -> None:
    """The pooled HTTP/2 connection dies with the server; the next query
    must open a new one rather than report the dead connection."""
    cfg = ServerConfig([ADDR_C], pki.cert, pki.key, records={"www.lab.test": ["1 A 192.0.2.10"]})
    server = UnboundServer(cfg)
    await trio.to_thread.run_sync(server.start)
    try:
        async with Resolver(config(doh(ADDR_C), pki=pki)) as resolver:
            assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]
            await trio.to_thread.run_sync(server.stop)
            server = UnboundServer(cfg)
            await trio.to_thread.run_sync(server.start)
            await trio.sleep(1.1)  # let the 1 s cache entry expire
            assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]
    finally:
        await trio.to_thread.run_sync(server.stop)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ups-doh-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        subprocess.run(
            ["ip", "-n", name, "addr", "add", "10.83.0.1/32", "dev", "lo"], check=True, timeout=10
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def test_unbound_serves_doh_inside_a_namespace(
    netns: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pki = make_ca_and_cert(tmp_path_factory.mktemp("ups-ns-pki"), ["10.83.0.1"], [])
    cfg = ServerConfig(["10.83.0.1"], pki.cert, pki.key, records=COMMON)
    with UnboundServer(cfg, netns=netns) as server:
        pid = server.pid
        assert pid is not None
        dig = subprocess.run(
            ["ip", "netns", "exec", netns, "dig", "+https", f"+tls-ca={pki.ca_cert}",
             "+short", "@10.83.0.1", "www.lab.test", "AAAA"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert dig.stdout.split() == ["2001:db8::10"], dig.stderr
        # Not reachable from the host's namespace: it really runs inside.
        assert not _bound_on("10.83.0.1")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
