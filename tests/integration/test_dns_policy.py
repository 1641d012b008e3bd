"""mihomo's DNS policy against real servers: DoT, queries through a proxy,
fallback and its filter, nameserver-policy sets.

Two unbounds on loopback addresses (A on NET.1, B on NET.2) serve plain
DNS, DoH and DoT with certificates from a private CA, log every query with
the client's address, and answer some names differently, which shows who
answered. Debian's dante (SOCKS5, CONNECT and UDP ASSOCIATE) listens on
NET.6 and sends from NET.6: a query that went through it reaches unbound
from NET.6, one that did not from the loopback source the kernel picks.
NET is a loopback /24 derived from the PID (not test_upstream.py's), so
concurrent runs never share an address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from dnslib import QTYPE, RCODE, DNSRecord

from appliance.config.model import (
    DnsConfig,
    DomainPolicy,
    FallbackFilter,
    Nameserver,
    ProxyConfig,
)
from appliance.dns.upstream import Resolver
from appliance.dns.upstream_api import UpstreamError
from appliance.geodata import Geodata
from appliance.lab.certs import CertPaths, make_ca_and_cert
from appliance.lab.doh_server import ServerConfig, UnboundServer
from appliance.lab.reference import mihomo_geodata
from appliance.outbound.base import Outbound, OutboundEnv
from appliance.outbound.build import build_proxy
from appliance.rules.engine import ProviderRules, RuleEnv

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="binds ports 53/443/853: needs root"),
]

_NET = f"127.{192 + (os.getpid() // 256) % 60}.{os.getpid() % 256}"
ADDR_A = f"{_NET}.1"
ADDR_B = f"{_NET}.2"
ADDR_PROXY = f"{_NET}.6"
SOCKS_PORT = 1080
TIMEOUT = 1.5

RECORDS_A = {
    "www.lab.test": ["A 192.0.2.10"],
    "pick.lab.test": ["A 192.0.2.1"],
    # What a poisoning resolver answers: inside fallback-filter.ipcidr.
    "poison.lab.test": ["A 240.0.0.1"],
    # An address in China (geoip CN keeps it), one on a LAN.
    "cn.lab.test": ["A 114.114.114.114"],
    "lan.lab.test": ["A 10.1.2.3"],
    "clean.lab.test": ["A 192.0.2.5"],
    "dot.lab.test": [f"A {ADDR_A}"],
    "wrongname.lab.test": [f"A {ADDR_A}"],
}
RECORDS_B = {
    "www.lab.test": ["A 192.0.2.10"],
    "pick.lab.test": ["A 192.0.2.2"],
    "poison.lab.test": ["A 192.0.2.99"],
    "cn.lab.test": ["A 192.0.2.98"],
    "nx.lab.test": ["A 192.0.2.97"],
    "only.lab.test": ["A 192.0.2.96"],
    "clean.lab.test": ["A 192.0.2.6"],
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_ca_and_cert(tmp_path_factory.mktemp("dnspol-pki"), ips=[ADDR_A, ADDR_B],
                            names=["dot.lab.test"])


@pytest.fixture(scope="module")
def servers(pki: CertPaths) -> Iterator[tuple[UnboundServer, UnboundServer]]:
    a = UnboundServer(ServerConfig([ADDR_A], pki.cert, pki.key, records=RECORDS_A,
                                   dot_port=853, log_queries=True))
    b = UnboundServer(ServerConfig([ADDR_B], pki.cert, pki.key, records=RECORDS_B,
                                   dot_port=853, log_queries=True))
    a.start()
    try:
        b.start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


@pytest.fixture(scope="module")
def dante(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """danted on ADDR_PROXY:1080 sending from ADDR_PROXY; yields its log."""
    d = tmp_path_factory.mktemp("dnspol-dante")
    log = d / "dante.log"
    conf = d / "dante.conf"
    conf.write_text(
        f"logoutput: {log}\n"
        f"internal: {ADDR_PROXY} port = {SOCKS_PORT}\n"
        f"external: {ADDR_PROXY}\n"
        "socksmethod: none\nclientmethod: none\n"
        "user.privileged: root\nuser.unprivileged: nobody\n"
        "client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
        "socks pass { from: 0/0 to: 0/0\n"
        "  command: connect udpassociate udpreply\n  log: connect }\n"
    )
    with (d / "dante.err").open("wb") as err:
        proc = subprocess.Popen(["danted", "-f", str(conf), "-p", str(d / "dante.pid"),
                                 "-N", "1"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((ADDR_PROXY, SOCKS_PORT), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("danted did not start: "
                                       + (d / "dante.err").read_text(errors="replace")) from None
                time.sleep(0.05)
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def ns(scheme: str, host: str, port: int | None = None, *, proxy: str | None = None,
       params: tuple[tuple[str, str], ...] = ()) -> Nameserver:
    port = port or {"udp": 53, "tcp": 53, "tls": 853, "https": 443}[scheme]
    return Nameserver(scheme, host, port, "/dns-query", f"{scheme}://{host}:{port}",  # type: ignore[arg-type]
                      proxy=proxy, params=params)


def config(*nameservers: Nameserver, pki: CertPaths, **changes: Any) -> DnsConfig:
    base = DnsConfig(nameserver=nameservers, ca_file=pki.ca_cert, upstream_timeout=TIMEOUT)
    return dataclasses.replace(base, **changes)


def socks_outbound(udp: bool = True) -> Outbound:
    cfg = ProxyConfig(name="socks", type="socks5", server=ADDR_PROXY, port=SOCKS_PORT, udp=udp,
                      preconnect=0)
    return build_proxy(cfg, OutboundEnv(None, None, 5.0))


async def ask(resolver: Resolver, name: str, qtype: str = "A") -> DNSRecord:
    return await resolver.query(DNSRecord.question(name, qtype))


def rdatas(reply: DNSRecord, qtype: str = "A") -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == getattr(QTYPE, qtype)]


def clients_of(server: UnboundServer, name: str) -> list[str]:
    """The client addresses unbound logged for queries of `name`."""
    pattern = re.compile(rf"info: (\S+) {re.escape(name)}\. ")
    return pattern.findall(server.log_text())


# -- DoT -----------------------------------------------------------------------


async def test_dot_by_ip_and_by_bootstrapped_name(servers: Any, pki: CertPaths) -> None:
    a, _ = servers
    async with Resolver(config(ns("tls", ADDR_A), pki=pki)) as resolver:
        assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]
        assert (await ask(resolver, "dot-ip-nx.lab.test")).header.rcode == RCODE.NXDOMAIN
    assert clients_of(a, "dot-ip-nx.lab.test")
    by_name = config(ns("tls", "dot.lab.test"), pki=pki,
                     default_nameserver=(ns("udp", ADDR_A),))
    async with Resolver(by_name) as resolver:
        assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.1"]


async def test_dot_checks_the_certificate_unless_told_not_to(servers: Any,
                                                             pki: CertPaths) -> None:
    boot = (ns("udp", ADDR_A),)
    wrong = config(ns("tls", "wrongname.lab.test"), pki=pki, default_nameserver=boot)
    async with Resolver(wrong) as resolver:
        with pytest.raises(UpstreamError, match="certificate"):
            await ask(resolver, "www.lab.test")
    skip = ns("tls", "wrongname.lab.test", params=(("skip-cert-verify", "true"),))
    async with Resolver(config(skip, pki=pki, default_nameserver=boot)) as resolver:
        assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]


# -- through a proxy -------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tls", "https", "tcp", "udp"])
async def test_proxy_nameserver_queries_reach_the_server_from_the_proxy(
    servers: Any, pki: CertPaths, dante: Path, scheme: str
) -> None:
    a, _ = servers
    outbound = socks_outbound()
    name = f"via-{scheme}.lab.test"
    async with Resolver(config(ns(scheme, ADDR_A, proxy="socks"), pki=pki)) as resolver:
        resolver.attach({"socks": outbound}.get)
        reply = await ask(resolver, name)
        assert reply.header.rcode == RCODE.NXDOMAIN
        assert rdatas(await ask(resolver, "www.lab.test")) == ["192.0.2.10"]
    assert clients_of(a, name) == [ADDR_PROXY]
    # The same server without the proxy: the gateway's own source address.
    direct = f"direct-{scheme}.lab.test"
    async with Resolver(config(ns(scheme, ADDR_A), pki=pki)) as resolver:
        assert (await ask(resolver, direct)).header.rcode == RCODE.NXDOMAIN
    assert clients_of(a, direct) and ADDR_PROXY not in clients_of(a, direct)


async def test_udp_nameserver_through_a_tcp_only_proxy_asks_over_tcp(
    servers: Any, pki: CertPaths, dante: Path
) -> None:
    a, _ = servers
    async with Resolver(config(ns("udp", ADDR_A, proxy="socks"), pki=pki)) as resolver:
        resolver.attach({"socks": socks_outbound(udp=False)}.get)
        assert (await ask(resolver, "udp-over-tcp.lab.test")).header.rcode == RCODE.NXDOMAIN
    assert clients_of(a, "udp-over-tcp.lab.test") == [ADDR_PROXY]


async def test_proxy_nameserver_without_its_outbound_fails_over(servers: Any,
                                                                pki: CertPaths) -> None:
    """Before the outbounds run (or once one is gone) that server fails its
    attempt; the next nameserver answers."""
    dns = config(ns("udp", ADDR_A, proxy="socks"), ns("udp", ADDR_B), pki=pki)
    async with Resolver(dns) as resolver:
        assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.2"]


async def test_respect_rules_sends_nameserver_connections_where_the_rules_say(
    servers: Any, pki: CertPaths, dante: Path
) -> None:
    a, _ = servers
    outbound = socks_outbound()
    routed: list[tuple[str, int]] = []

    def route(host: str, port: int) -> Outbound | None:
        routed.append((host, port))
        return outbound

    dns = config(ns("tls", ADDR_A), pki=pki, respect_rules=True,
                 proxy_server_nameserver=(ns("udp", ADDR_B),))
    async with Resolver(dns) as resolver:
        resolver.attach({"socks": outbound}.get, route)
        assert (await ask(resolver, "by-rules.lab.test")).header.rcode == RCODE.NXDOMAIN
        # proxy-server-nameserver is never routed by the rules.
        ips, _ = await resolver.resolve_proxy_server_ips("pick.lab.test")
        assert ips == [ipaddress.ip_address("192.0.2.2")]
    assert routed == [(ADDR_A, 853)]
    assert clients_of(a, "by-rules.lab.test") == [ADDR_PROXY]


# -- fallback ------------------------------------------------------------------


async def test_fallback_takes_the_other_answer_when_the_first_is_filtered(
    servers: Any, pki: CertPaths
) -> None:
    a, b = servers
    dns = config(ns("udp", ADDR_A), pki=pki, fallback=(ns("tls", ADDR_B),),
                 fallback_filter=FallbackFilter(geoip=False, ipcidr=(
                     ipaddress.ip_network("240.0.0.0/4"),),
                     domain=("+.only.lab.test",)))
    async with Resolver(dns) as resolver:
        # A's answer is inside the filter: B's stands.
        assert rdatas(await ask(resolver, "poison.lab.test")) == ["192.0.2.99"]
        # A's answer is clean: it stands, B is not asked.
        assert rdatas(await ask(resolver, "clean.lab.test")) == ["192.0.2.5"]
        # A has no address (NXDOMAIN): B's answer.
        assert rdatas(await ask(resolver, "nx.lab.test")) == ["192.0.2.97"]
        # fallback-filter.domain: B alone.
        assert rdatas(await ask(resolver, "only.lab.test")) == ["192.0.2.96"]
        # Not an address query: A alone.
        assert (await ask(resolver, "poison.lab.test", "MX")).header.rcode == RCODE.NOERROR
    assert clients_of(b, "clean.lab.test") == []
    assert clients_of(a, "only.lab.test") == []
    assert clients_of(b, "poison.lab.test") != [] and len(clients_of(b, "poison.lab.test")) == 1


async def test_fallback_geoip_keeps_answers_in_the_country_and_lan(
    servers: Any, pki: CertPaths
) -> None:
    """fallback-filter's default geoip (CN) with mihomo's own country.mmdb."""
    geo = Geodata(mihomo_geodata())
    dns = config(ns("udp", ADDR_A), pki=pki, fallback=(ns("udp", ADDR_B),))
    async with Resolver(dns, env=RuleEnv(geo=geo)) as resolver:
        assert rdatas(await ask(resolver, "cn.lab.test")) == ["114.114.114.114"]
        assert rdatas(await ask(resolver, "lan.lab.test")) == ["10.1.2.3"]
        # 192.0.2.1 is in no country: not CN, so the fallback answers.
        assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.2"]


async def test_fallback_answers_when_the_first_server_is_dead(servers: Any,
                                                              pki: CertPaths) -> None:
    dead = ns("udp", f"{_NET}.3")
    dns = config(dead, pki=pki, fallback=(ns("udp", ADDR_B),))
    async with Resolver(dns) as resolver:
        with trio.fail_after(TIMEOUT + 1):
            assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.2"]


# -- nameserver-policy sets and the proxy-server / direct resolvers ----------------


async def test_policy_rule_set_and_direct_nameserver(servers: Any, pki: CertPaths) -> None:
    env = RuleEnv(providers={"lab": ProviderRules("domain", domains=("+.pick.lab.test",))})
    dns = config(ns("udp", ADDR_A), pki=pki,
                 nameserver_policy=(DomainPolicy("rule-set:lab", (ns("tls", ADDR_B),)),),
                 direct_nameserver=(ns("udp", ADDR_B),))
    async with Resolver(dns, env=env) as resolver:
        assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.2"]
        assert rdatas(await ask(resolver, "poison.lab.test")) == ["240.0.0.1"]
        ips, _ = await resolver.resolve_direct_ips("poison.lab.test")
        assert [str(ip) for ip in ips] == ["192.0.2.99"]
        # The provider's content changes: the policy follows.
        assert resolver.nameservers_for("pick.lab.test") == (ns("tls", ADDR_B),)
        resolver.set_env(RuleEnv(providers={"lab": ProviderRules("domain", domains=())}))
        assert resolver.nameservers_for("pick.lab.test") == (ns("udp", ADDR_A),)
