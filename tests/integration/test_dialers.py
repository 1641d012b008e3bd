"""How proxies reach their own servers, end to end in the lab: `ip-version`
with happy eyeballs (RFC 8305) for the server's address, and UDP through
chains (a relay group, `dialer-proxy`).

One sing-box upstream (module-scoped, stopped by PID) with a SOCKS5 inbound
on `::` (reachable at 192.168.57.10 and fd57::10), a Shadowsocks one on
fd57::10 and a Trojan inbound (TLS with the lab certificate, www.alpha.test); a
UDP echo server
(bench/udp_echo.py) on www.gamma.test's addresses and a dnsmasq on
www.beta.test's, port 5354 (port 53 is hijacked to Mirage). Mirage runs
with `ipv6: true` and `hosts` that give the proxy names their records:

- `he.proxy.test`: an A that black-holes (192.168.57.99: nobody answers
  ARP, so a connection waits ~3 s for "no route to host") and an AAAA that
  works (fd57::10);
- `v6only.proxy.test`: an AAAA only.

The client fetches each lab name through a proxy of another `ip-version`,
and sing-box's log shows from which family the gateway reached it. The
chains are chosen by the client's source port (SRC-PORT rules): the relay
`Chain` (the SOCKS5 hop, then Trojan) and `tj-via` (Trojan with
`dialer-proxy: hop`); sing-box's log shows the Trojan server reached
through the SOCKS5 inbound, by name. Shadowsocks UDP sends to one address
of `he.proxy.test` picked by `ip-version` (mihomo's choice: `dual` takes
the A, `ipv6-prefer` the AAAA). `dante-via` is the lab's dante (SOCKS5 with
UDP ASSOCIATE) with `dialer-proxy` sing-box's SOCKS5 inbound: its UDP goes
through that inbound (control connection and datagrams both).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from lab_client import curl, udp_echo

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.reference import SingBox
from appliance.lab.servers import stop_all

pytestmark = pytest.mark.netns

SOCKS_PORT = 21080
TROJAN_PORT = 21443
SS_PORT = 21388
SS_CIPHER, SS_PASSWORD = "aes-128-gcm", "dialers-ss"
TROJAN_NAME = "www.alpha.test"  # in the lab certificate
PASSWORD = "dialers-trojan"
ECHO_PORT = 9996
DNS_PORT = 5354
BLACKHOLE4 = "192.168.57.99"  # in the upstream subnet, on no interface
# Below the ~3 s a connection to BLACKHOLE4 waits for "no route to host"
# (three ARP probes a second apart): tried alone, the A fails the flow.
CONNECT_TIMEOUT = 2.5
UP6 = "fd57::10"
# Client source ports -> the chain the SRC-PORT rules send them through.
CHAIN_PORTS = {"Chain": 32000, "tj-via": 32010}
SS_PORTS = {"ss-v6prefer": 32020, "ss-dual": 32030}
# Shadowsocks UDP as a UDP flow of the outbound before it: Trojan's.
SS_CHAIN_PORTS = {"ss-via-tj": 32040, "SsChain": 32050}
# SOCKS5 UDP behind a dialer-proxy: dante, reached through sing-box's SOCKS5.
DANTE_VIA_PORT = 32060


@pytest.fixture(scope="module")
def upstream(lab: Lab) -> Iterator[SingBox]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (scripts/setup.sh installs it)")
    tls = lab.state_dir / "tls"
    trojan = {"type": "trojan", "tag": "trojan-in", "listen": "::", "listen_port": TROJAN_PORT,
              "users": [{"name": "lab", "password": PASSWORD}],
              "tls": {"enabled": True, "certificate_path": str(tls / "server.pem"),
                      "key_path": str(tls / "server.key")}}
    # Bound to the one address: a socket on `::` may answer a datagram from
    # another of the node's addresses, which a connected client drops.
    ss = {"type": "shadowsocks", "tag": "ss-in", "listen": UP6, "listen_port": SS_PORT,
          "method": SS_CIPHER, "password": SS_PASSWORD}
    sb = SingBox(lab, [{"type": "socks", "tag": "socks-in", "listen": "::",
                        "listen_port": SOCKS_PORT}, trojan, ss], name="sing-box-dialers")
    logs = lab.state_dir / "dialers-servers"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with udp_echo(lab, f"192.168.57.12:{ECHO_PORT}", f"[fd57::12]:{ECHO_PORT}"):
            with open(logs / "dnsmasq.log", "wb") as out:
                procs.append(lab.popen("upstream", [
                    "dnsmasq", "-k", "-p", str(DNS_PORT), "--listen-address=192.168.57.11",
                    # Both of beta's families: dante resolves it to the AAAA.
                    "--listen-address=fd57::11",
                    "--bind-interfaces", "--no-resolv", "--no-hosts", "--server=192.168.57.53",
                    f"--pid-file={logs}/dnsmasq.pid"], stdout=out, stderr=subprocess.STDOUT))
            yield sb.start()
    finally:
        sb.stop()
        stop_all(procs)


def socks(name: str, server: str, ip_version: str) -> dict[str, Any]:
    return {"name": name, "type": "socks5", "server": server, "port": SOCKS_PORT,
            "ip-version": ip_version}


@pytest.fixture(scope="module")
def mirage(lab: Lab, upstream: SingBox) -> Iterator[MirageRun]:
    state = lab.state_dir / "dialers-mirage-state"
    cfg = lab_config(lab, ipv6=True,
                     appliance={"state-dir": str(state), "connect-timeout": CONNECT_TIMEOUT},
                     hosts={"he.proxy.test": [BLACKHOLE4, UP6], "v6only.proxy.test": [UP6]})
    trojan = {"type": "trojan", "server": TROJAN_NAME, "port": TROJAN_PORT,
              "password": PASSWORD, "udp": True}
    cfg["proxies"] = [
        socks("he-v4prefer", "he.proxy.test", "ipv4-prefer"),
        socks("he-dual", "he.proxy.test", "dual"),
        socks("six-v4", "v6only.proxy.test", "ipv4"),
        socks("hop", "192.168.57.10", "dual"),
        {"name": "tj", **trojan},
        {"name": "tj-via", **trojan, "dialer-proxy": "hop"},
        *({"name": name, "type": "ss", "server": "he.proxy.test", "port": SS_PORT,
           "cipher": SS_CIPHER, "password": SS_PASSWORD, "udp": True,
           "ip-version": name.removeprefix("ss-").replace("v6prefer", "ipv6-prefer")}
          for name in SS_PORTS),
        {"name": "ss6", "type": "ss", "server": UP6, "port": SS_PORT, "cipher": SS_CIPHER,
         "password": SS_PASSWORD, "udp": True},
        {"name": "ss-via-tj", "type": "ss", "server": UP6, "port": SS_PORT, "cipher": SS_CIPHER,
         "password": SS_PASSWORD, "udp": True, "dialer-proxy": "tj"},
        {**socks("hop-udp", "192.168.57.10", "dual"), "udp": True},
        {"name": "dante-via", "type": "socks5", "server": str(lab.topology.socks[0].address),
         "port": lab.topology.socks[0].port, "udp": True, "dialer-proxy": "hop-udp"},
    ]
    cfg["proxy-groups"] = [{"name": "Chain", "type": "relay", "proxies": ["hop", "tj"]},
                           {"name": "SsChain", "type": "relay", "proxies": ["tj", "ss6"]}]
    cfg["rules"] = [
        *(f"SRC-PORT,{first}-{first + 9},{name}"
          for name, first in (*CHAIN_PORTS.items(), *SS_PORTS.items(),
                              *SS_CHAIN_PORTS.items(), ("dante-via", DANTE_VIA_PORT))),
        "DOMAIN,www.alpha.test,he-v4prefer", "DOMAIN,www.beta.test,six-v4",
        "DOMAIN,www.gamma.test,he-dual", "MATCH,DIRECT"]
    run = MirageRun(lab, cfg, name="dialers-mirage", env={"SSL_CERT_FILE": str(lab.ca_path)})
    run.start()
    try:
        yield run
    finally:
        run.stop()
        for f in state.glob("fakeip*"):
            f.unlink()


def from_gateway_v6(log: str) -> int:
    """How many connections sing-box took from the gateway's IPv6 address."""
    return len(re.findall(r"inbound connection from \[fd57::1\]:\d+", log))


def test_happy_eyeballs_reaches_the_server_over_the_family_that_works(
        lab: Lab, mirage: MirageRun, upstream: SingBox) -> None:
    before = len(upstream.log_text())
    # ipv4-prefer: the black-holed A first, the AAAA 250 ms later wins.
    # Tried one after the other, the A would hold the flow past the connect
    # timeout (it fails only after ~3 s, when ARP gives up).
    rc, body, _ = curl(lab, "http://www.alpha.test/")
    assert rc == 0 and "MARKER-ALPHA" in body, (body[:200], mirage.log_text()[-2000:])
    # dual: both families at once, the AAAA answers.
    rc, body, _ = curl(lab, "http://www.gamma.test/")
    assert rc == 0 and "MARKER-GAMMA" in body, body[:200]
    log = upstream.log_text()[before:]
    assert from_gateway_v6(log) == 2, log[-2000:]
    assert "inbound connection to www.alpha.test:80" in log


def test_ipv4_only_fails_fast_with_the_reason(lab: Lab, mirage: MirageRun,
                                              upstream: SingBox) -> None:
    offset = mirage.log_path.stat().st_size
    rc, body, seconds = curl(lab, "http://www.beta.test/")
    assert rc != 0 and "MARKER" not in body
    assert seconds < CONNECT_TIMEOUT, seconds  # not a timeout: no A record, said at once
    log = mirage.log_text(offset)
    assert "cannot resolve v6only.proxy.test: no A record (ip-version: ipv4)" in log, log[-2000:]


# Datagrams (argv 4, default 3) from one connected socket bound to a
# source port, each waiting argv 5 seconds (default 3) for its reply.
UDP_EXCHANGE = """
import json, socket, sys
name, port, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
count, wait = (int(sys.argv[4]), float(sys.argv[5])) if len(sys.argv) > 5 else (3, 3.0)
ip = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(wait)
s.bind(("0.0.0.0", local)); s.connect((ip, port))
replies = []
for i in range(count):
    s.send(b"chained %d" % i)
    try:
        replies.append(s.recv(4096).decode())
    except TimeoutError:
        replies.append(None)
print(json.dumps({"ip": ip, "replies": replies}))
"""


@pytest.mark.parametrize("chain", list(CHAIN_PORTS))
def test_udp_through_a_chain_rides_the_earlier_hops_tcp(
        lab: Lab, mirage: MirageRun, upstream: SingBox, chain: str) -> None:
    first = CHAIN_PORTS[chain]
    before = len(upstream.log_text())
    out = lab.exec("client", [sys.executable, "-c", UDP_EXCHANGE, "www.gamma.test",
                              str(ECHO_PORT), str(first + 1)], timeout=20)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["ip"].startswith("198.18.")
    for i, reply in enumerate(got["replies"]):
        assert reply is not None, mirage.log_text()[-2000:]
        # The echo saw sing-box (upstream), not the gateway's WAN address.
        assert reply.startswith(f"chained {i} from=192.168.57."), reply
        assert "from=192.168.57.1:" not in reply
    # A DNS exchange through the chain: dig to dnsmasq on beta's address.
    fake = lab.exec("client", ["dig", "+time=3", "+tries=1", "+short",
                               "www.beta.test"]).stdout.strip()
    assert fake.startswith("198.18."), fake
    answer = lab.exec("client", ["dig", "+time=3", "+tries=2", "+short", "-b",
                                 f"0.0.0.0#{first + 2}", f"@{fake}", "-p", str(DNS_PORT),
                                 "www.alpha.test"]).stdout.strip()
    assert answer == "192.168.57.10", (answer, mirage.log_text()[-2000:])
    log = upstream.log_text()[before:]
    # Trojan was reached through the SOCKS5 hop, by name; it got the
    # datagrams' destination by name too.
    assert f"inbound/socks[socks-in]: inbound connection to {TROJAN_NAME}:{TROJAN_PORT}" \
        in log, log[-3000:]
    assert f"inbound packet connection to www.gamma.test:{ECHO_PORT}" in log
    assert f"inbound packet connection to www.beta.test:{DNS_PORT}" in log


def test_udp_protocols_send_to_the_family_ip_version_picks(
        lab: Lab, mirage: MirageRun, upstream: SingBox) -> None:
    before = len(upstream.log_text())
    # ipv6-prefer: the AAAA, which answers.
    out = lab.exec("client", [sys.executable, "-c", UDP_EXCHANGE, "www.gamma.test",
                              str(ECHO_PORT), str(SS_PORTS["ss-v6prefer"] + 1)], timeout=20)
    assert out.returncode == 0, out.stderr
    replies = json.loads(out.stdout)["replies"]
    for i, reply in enumerate(replies):
        assert reply is not None, (mirage.log_text()[-2000:], upstream.log_text()[before:])
        # From sing-box (whichever family it resolved gamma to), not the gateway.
        assert reply.startswith(f"chained {i} from="), reply
        assert "from=192.168.57.1:" not in reply and "from=fd57::1:" not in reply
    log = upstream.log_text()[before:]
    assert re.search(r"inbound/shadowsocks\[ss-in\]: inbound packet connection from "
                     r"\[fd57::1\]:\d+", log), log[-2000:]
    # dual: mihomo's UDP takes the A first, which black-holes: no reply
    # (no race: a datagram has no handshake to race with).
    out = lab.exec("client", [sys.executable, "-c", UDP_EXCHANGE, "www.gamma.test",
                              str(ECHO_PORT), str(SS_PORTS["ss-dual"] + 1), "1", "1.5"],
                   timeout=20)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["replies"] == [None]


@pytest.mark.parametrize("chain", list(SS_CHAIN_PORTS))
def test_shadowsocks_udp_rides_the_udp_of_the_outbound_before_it(
        lab: Lab, mirage: MirageRun, upstream: SingBox, chain: str) -> None:
    before = len(upstream.log_text())
    out = lab.exec("client", [sys.executable, "-c", UDP_EXCHANGE, "www.gamma.test",
                              str(ECHO_PORT), str(SS_CHAIN_PORTS[chain] + 1)], timeout=20)
    assert out.returncode == 0, out.stderr
    for i, reply in enumerate(json.loads(out.stdout)["replies"]):
        assert reply is not None, (mirage.log_text()[-2000:], upstream.log_text()[before:])
        assert reply.startswith(f"chained {i} from="), reply
        assert "from=192.168.57.1:" not in reply and "from=fd57::1:" not in reply
    log = upstream.log_text()[before:]
    # The sealed datagrams reached the Shadowsocks server as a UDP flow of
    # the Trojan server (to the address, resolved by Mirage as mihomo
    # does), and the Shadowsocks server got the destination by name.
    assert re.search(r"inbound/trojan\[trojan-in\]: (\[lab\] )?inbound packet connection to "
                     + re.escape(f"[{UP6}]:{SS_PORT}"), log), log[-3000:]
    assert f"inbound/shadowsocks[ss-in]: inbound packet connection to " \
        f"www.gamma.test:{ECHO_PORT}" in log
    # Not one datagram went from the gateway to the Shadowsocks server.
    assert not re.search(r"inbound/shadowsocks\[ss-in\]: inbound packet connection from "
                         r"\[fd57::1\]", log), log[-3000:]


def test_socks5_udp_rides_its_dialer_proxy(lab: Lab, mirage: MirageRun,
                                           upstream: SingBox) -> None:
    """dante with `dialer-proxy` (sing-box's SOCKS5), as mihomo: the UDP
    ASSOCIATE's control connection goes through the dialer-proxy's TCP and
    the datagrams as a UDP flow of the dialer-proxy to dante's relay."""
    dante = lab.topology.socks[0]
    before, dante_before = len(upstream.log_text()), len(lab.dante_log.read_text())
    out = lab.exec("client", [sys.executable, "-c", UDP_EXCHANGE, "www.gamma.test",
                              str(ECHO_PORT), str(DANTE_VIA_PORT + 1)], timeout=20)
    assert out.returncode == 0, out.stderr
    for i, reply in enumerate(json.loads(out.stdout)["replies"]):
        assert reply is not None, (mirage.log_text()[-2000:], upstream.log_text()[before:])
        # From dante's relay (whichever family dante resolved gamma to),
        # not the gateway.
        assert reply.startswith(f"chained {i} from="), reply
        assert "from=192.168.57.1:" not in reply and "from=fd57::1:" not in reply
    # A DNS exchange the same way: dig to dnsmasq on beta's address.
    fake = lab.exec("client", ["dig", "+time=3", "+tries=1", "+short",
                               "www.beta.test"]).stdout.strip()
    assert fake.startswith("198.18."), fake
    answer = lab.exec("client", ["dig", "+time=3", "+tries=2", "+short", "-b",
                                 f"0.0.0.0#{DANTE_VIA_PORT + 2}", f"@{fake}", "-p",
                                 str(DNS_PORT), "www.alpha.test"]).stdout.strip()
    assert answer == "192.168.57.10", (answer, mirage.log_text()[-2000:])
    log = upstream.log_text()[before:]
    # The control connection went through sing-box's TCP, the datagrams
    # through its UDP, to dante's relay (an address: dante answered one).
    assert f"inbound/socks[socks-in]: inbound connection to {dante.address}:{dante.port}" \
        in log, log[-3000:]
    assert re.search(r"inbound/socks\[socks-in\]: inbound packet connection to "
                     + re.escape(f"{dante.address}:"), log), log[-3000:]
    # dante got the destinations by name (ATYP 3), from sing-box, never
    # from the gateway.
    dante_log = lab.dante_log.read_text()[dante_before:]
    assert f"www.gamma.test.{ECHO_PORT}" in dante_log, dante_log[-3000:]
    assert f"www.beta.test.{DNS_PORT}" in dante_log
    assert "192.168.57.1." not in dante_log, dante_log[-3000:]
