"""mihomo's DNS policy against real servers (and against mihomo itself): DoT,
queries through a proxy, fallback and its filter, nameserver-policy sets.

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
from lab_client import loopback_net

from appliance.config.loader import parse_config
from appliance.config.model import (
    DnsConfig,
    DomainPolicy,
    FallbackFilter,
    Nameserver,
    ProxyConfig,
)
from appliance.dns.policy import FakeIpFilter
from appliance.dns.upstream import Resolver
from appliance.dns.upstream_api import UpstreamError
from appliance.geodata import Geodata
from appliance.lab.certs import CertPaths, make_ca_and_cert
from appliance.lab.doh_server import ServerConfig, UnboundServer
from appliance.lab.reference import mihomo_geodata
from appliance.lab.servers import terminate
from appliance.outbound.base import Outbound, OutboundEnv
from appliance.outbound.build import build_proxy
from appliance.rules.engine import ProviderRules, RuleEnv

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="binds ports 53/443/853: needs root"),
]

_NET = loopback_net(192, 60)
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
    with UnboundServer(ServerConfig([ADDR_A], pki.cert, pki.key, records=RECORDS_A,
                                    dot_port=853, log_queries=True)) as a, \
            UnboundServer(ServerConfig([ADDR_B], pki.cert, pki.key, records=RECORDS_B,
                                       dot_port=853, log_queries=True)) as b:
        yield a, b


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
        terminate(proc)


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


async def test_dot_connections_are_reused_and_renewed(pki: CertPaths) -> None:
    """Sequential queries share one TLS connection; when the server restarts
    (the kept connection is dead) the next query opens a new one."""
    addr = f"{_NET}.5"
    cert = make_ca_and_cert(pki.ca_cert.parent / "c", ips=[addr], names=[])
    server = UnboundServer(ServerConfig([addr], cert.cert, cert.key, records=RECORDS_B,
                                        dot_port=853))
    await trio.to_thread.run_sync(server.start)
    try:
        async with Resolver(config(ns("tls", addr), pki=cert)) as resolver:
            for i in range(5):
                assert (await ask(resolver, f"n{i}.lab.test")).header.rcode == RCODE.NXDOMAIN
            assert resolver.dot_connects == 1
            await trio.to_thread.run_sync(server.stop)
            await trio.to_thread.run_sync(server.start)
            assert rdatas(await ask(resolver, "pick.lab.test")) == ["192.0.2.2"]
            assert resolver.dot_connects == 2
    finally:
        await trio.to_thread.run_sync(server.stop)


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


# -- the same dns section in mihomo ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dig(port: int, name: str) -> list[str]:
    """A records mihomo's DNS listener answers for `name` ([] for none)."""
    query = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(4)
        sock.sendto(query.pack(), ("127.0.0.1", port))
        try:
            reply = DNSRecord.parse(sock.recv(4096))
        except TimeoutError:
            return ["timeout"]
    return rdatas(reply)


def _mihomo_answers(tmp_path: Path, dns_section: dict[str, Any], names: list[str]
                    ) -> dict[str, list[str]]:
    from appliance.lab.reference import start_mihomo

    dns_port, mixed = _free_port(), _free_port()
    profile = {"mixed-port": mixed, "log-level": "warning", "ipv6": False,
               "dns": {"enable": True, "listen": f"127.0.0.1:{dns_port}", "ipv6": False,
                       **dns_section}}
    proc = start_mihomo(tmp_path / "mihomo", profile, mixed)
    try:
        return {name: _dig(dns_port, name) for name in names}
    finally:
        proc.terminate()
        proc.wait(10)


FALLBACK_NAMES = ["poison.lab.test", "clean.lab.test", "nx.lab.test", "only.lab.test",
                  "cn.lab.test", "lan.lab.test", "pick.lab.test"]


async def test_fallback_answers_equal_mihomos(servers: Any, pki: CertPaths,
                                              tmp_path: Path) -> None:
    """Same nameserver, fallback and fallback-filter (default geoip CN, with
    mihomo's own country.mmdb for both) in mihomo and in Mirage: the same
    answer for every name."""
    section = {"enhanced-mode": "normal", "default-nameserver": [ADDR_A],
               "nameserver": [f"udp://{ADDR_A}"], "fallback": [f"udp://{ADDR_B}"],
               "fallback-filter": {"geoip": True, "geoip-code": "CN",
                                   "ipcidr": ["240.0.0.0/4"], "domain": ["+.only.lab.test"]}}
    theirs = await trio.to_thread.run_sync(_mihomo_answers, tmp_path, section, FALLBACK_NAMES)
    dns = config(ns("udp", ADDR_A), pki=pki, fallback=(ns("udp", ADDR_B),),
                 fallback_filter=FallbackFilter(ipcidr=(ipaddress.ip_network("240.0.0.0/4"),),
                                                domain=("+.only.lab.test",)))
    ours: dict[str, list[str]] = {}
    async with Resolver(dns, env=RuleEnv(geo=Geodata(mihomo_geodata()))) as resolver:
        for name in FALLBACK_NAMES:
            ours[name] = rdatas(await ask(resolver, name))
    assert ours == theirs
    assert ours["poison.lab.test"] == ["192.0.2.99"]


async def test_fake_ip_filter_decisions_equal_mihomos(servers: Any, pki: CertPaths,
                                                      tmp_path: Path) -> None:
    """Which names get a fake IP, mihomo against FakeIpFilter, in rule mode
    (first match decides, no match: fake), as a blacklist with geosite and
    mihomo's literal `?`, and as a whitelist."""
    names = ["www.lab.test", "pick.lab.test", "time1.lab.test", "www.baidu.com",
             "a.b.lab.test", "x.example"]
    geo = Geodata(mihomo_geodata())
    for mode, entries in (
        ("rule", ["DOMAIN,pick.lab.test,fake-ip", "DOMAIN-SUFFIX,lab.test,real-ip",
                  "GEOSITE,cn,real-ip"]),
        ("blacklist", ["*.lab.test", "geosite:cn", "time?.*.com"]),
        ("whitelist", ["+.b.lab.test", "x.example"]),
    ):
        section = {"enhanced-mode": "fake-ip", "fake-ip-range": "198.18.0.1/16",
                   "fake-ip-filter-mode": mode, "fake-ip-filter": entries,
                   "default-nameserver": [ADDR_A], "nameserver": [f"udp://{ADDR_A}"]}
        theirs = await trio.to_thread.run_sync(_mihomo_answers, tmp_path / mode, section, names)
        ours = FakeIpFilter(parse_config({"dns": section}).dns, RuleEnv(geo=geo))
        fakes = {name: any(a.startswith("198.18.") for a in theirs[name]) for name in names}
        assert {name: ours.wants_fake_ip(name) for name in names} == fakes, (mode, theirs)
        assert len(set(fakes.values())) == 2, (mode, theirs)  # both outcomes seen


async def test_policy_precedence_equals_mihomos(servers: Any, pki: CertPaths,
                                                tmp_path: Path) -> None:
    """nameserver-policy with a broad pattern first and a narrower one after
    it (mihomo's trie: the narrower wins), a duplicate (the later wins),
    and a set between patterns."""
    section = {"enhanced-mode": "normal", "default-nameserver": [ADDR_A],
               "nameserver": [f"udp://{ADDR_A}"],
               "nameserver-policy": {"+.lab.test": f"udp://{ADDR_A}",
                                     "pick.lab.test": f"udp://{ADDR_B}",
                                     "*.lab.test,poison.lab.test": f"udp://{ADDR_B}",
                                     "clean.lab.test": f"udp://{ADDR_A}"}}
    names = ["pick.lab.test", "poison.lab.test", "clean.lab.test", "cn.lab.test",
             "www.lab.test"]
    theirs = await trio.to_thread.run_sync(_mihomo_answers, tmp_path, section, names)
    cfg = parse_config({"dns": section})
    ours: dict[str, list[str]] = {}
    async with Resolver(dataclasses.replace(cfg.dns, ca_file=pki.ca_cert)) as resolver:
        for name in names:
            ours[name] = rdatas(await ask(resolver, name))
    assert ours == theirs
    assert ours["pick.lab.test"] == ["192.0.2.2"] and ours["clean.lab.test"] == ["192.0.2.5"]
