"""The upstream resolver's transports side by side: uncached queries per
second, one at a time and 16 at once, against one unbound on a loopback
address, over UDP (the baseline), DoH (HTTP/2, pooled), DoT with its kept
connections, DoT with a new connection per query (what keeping them saves),
and DoT through a SOCKS5 proxy (dante) with `#Name`.

    sudo .venv/bin/python bench/dns_upstream.py [--queries 400]

Every query is a name never asked before (the cache never answers). Needs
root (ports 53/443/853 on a loopback address); stops its own unbound and
dante (by pid) on every exit path.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from dnslib import DNSRecord

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.config.model import DnsConfig, Nameserver, ProxyConfig
from appliance.dns import upstream
from appliance.dns.upstream import Resolver
from appliance.lab.certs import make_ca_and_cert
from appliance.lab.doh_server import ServerConfig, UnboundServer
from appliance.outbound.base import OutboundEnv
from appliance.outbound.build import build_proxy

NET = f"127.{200 + (os.getpid() // 256) % 50}.{os.getpid() % 256}"
ADDR, PROXY = f"{NET}.1", f"{NET}.6"


def _ns(scheme: str, port: int, proxy: str | None = None) -> Nameserver:
    return Nameserver(scheme, ADDR, port, "/dns-query", f"{scheme}://{ADDR}:{port}",  # type: ignore[arg-type]
                      proxy=proxy)


async def _run(dns: DnsConfig, queries: int, parallel: int, tag: str,
               socks: Any = None) -> float:
    async with Resolver(dns) as resolver:
        if socks is not None:
            resolver.attach({"socks": socks}.get)
        await resolver.query(DNSRecord.question(f"warm.{tag}.lab.test"))
        names = iter(range(queries))
        start = time.perf_counter()

        async def worker() -> None:
            for i in names:
                await resolver.query(DNSRecord.question(f"q{i}.{tag}.lab.test"))

        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)
        return queries / (time.perf_counter() - start)


def _start_dante(d: Path) -> subprocess.Popen[bytes]:
    conf = d / "dante.conf"
    conf.write_text(
        f"logoutput: {d / 'dante.log'}\ninternal: {PROXY} port = 1080\nexternal: {PROXY}\n"
        "socksmethod: none\nclientmethod: none\nuser.privileged: root\n"
        "user.unprivileged: nobody\nclient pass { from: 0/0 to: 0/0 }\n"
        "socks pass { from: 0/0 to: 0/0\n  command: connect udpassociate udpreply }\n")
    proc = subprocess.Popen(["danted", "-f", str(conf), "-p", str(d / "dante.pid"), "-N", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((PROXY, 1080), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("danted did not start") from None
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dnsup-") as tmp:
        d = Path(tmp)
        pki = make_ca_and_cert(d / "pki", ips=[ADDR], names=[])
        server = UnboundServer(ServerConfig([ADDR], pki.cert, pki.key, dot_port=853))
        server.start()
        dante = _start_dante(d)
        try:
            base = DnsConfig(ca_file=pki.ca_cert, upstream_timeout=5.0)
            socks = build_proxy(ProxyConfig(name="socks", type="socks5", server=PROXY,
                                            port=1080, preconnect=0),
                                OutboundEnv(None, None, 5.0))
            rows: list[tuple[str, float, float]] = []
            for label, ns, idle, via in (
                ("udp (baseline)", _ns("udp", 53), 4, None),
                ("doh, pooled", _ns("https", 443), 4, None),
                ("dot, kept connections", _ns("tls", 853), 4, None),
                ("dot, new connection each", _ns("tls", 853), 0, None),
                ("dot through socks5 (#Name)", _ns("tls", 853, "socks"), 4, socks),
            ):
                upstream._DOT_IDLE_MAX = idle
                dns = dataclasses.replace(base, nameserver=(ns,))
                tag = label.split()[0] + str(idle) + ("p" if via else "")
                one = trio.run(_run, dns, args.queries, 1, tag + "s", via)
                many = trio.run(_run, dns, args.queries, 16, tag + "m", via)
                rows.append((label, one, many))
        finally:
            dante.terminate()
            dante.wait(5)
            server.stop()
    udp_one, udp_many = rows[0][1], rows[0][2]
    print(f"{'transport':30} {'q/s x1':>9} {'vs udp':>7} {'q/s x16':>9} {'vs udp':>7}")
    for label, one, many in rows:
        print(f"{label:30} {one:9.0f} {one / udp_one:7.2f} {many:9.0f} {many / udp_many:7.2f}")


if __name__ == "__main__":
    main()
