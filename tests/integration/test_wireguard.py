"""WireGuard end to end: a real client in the lab's client namespace, `mirage
run` in the gateway with two `type: wireguard` proxies, a real WireGuard
peer in the upstream namespace.

The peer is the kernel's (`ip link add ... type wireguard`) where the
kernel has WireGuard, else wireguard-go (Debian's; this project's test
machines run a kernel built without CONFIG_WIREGUARD, so Mirage's side is
wireguard-go there too). Keys are made by the test with `wg genkey`.

Behind the peer, on the tunnel's own network 10.99.0.0/24 (which the
gateway has no route to): nginx, a dnsmasq on port 5353 that answers
*.wg.test with the tunnel address, and the tagged UDP echo. The proxy
`good` resolves names through the tunnel (`remote-dns-resolve`, that
dnsmasq): www.wg.test exists nowhere else, so its page proves both the
tunnel and the tunnel's DNS. The proxy `bad` has a private key the peer
does not know: its flows must fail within connect-timeout, saying that no
handshake completed.

Last, the kernel objects: after SIGTERM the interfaces and their rules are
gone; after SIGKILL, `mirage cleanup` removes what is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lab_client import FAKE, curl, dig

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config, running
from appliance.lab.servers import stop_all
from appliance.proto.wireguard import interface_name

pytestmark = pytest.mark.netns

ECHO = Path(__file__).resolve().parents[2] / "bench" / "udp_echo.py"
PEER_ADDR = "10.99.0.1"
MIRAGE_ADDR = "10.99.0.2"
PEER_ADDR6 = "fd99::1"
MIRAGE_ADDR6 = "fd99::2"
WG_PORT = 51820
DNS_PORT = 5353
ECHO_PORT = 9997
CONNECT_TIMEOUT = 3.0
BIG_BYTES = 4 << 20
# Unique per test process: wireguard-go's control sockets share one directory
# across namespaces, so concurrent runs must not pick the same names.
GOOD = f"wg-good-{os.getpid()}"
BAD = f"wg-bad-{os.getpid()}"
PEER_IF = f"wgu{os.getpid()}"


def wg_keys() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                             check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout.strip()
    return private, public


@dataclass
class Tunnel:
    peer_public: str
    good_private: str
    bad_private: str
    kernel: bool


def _add_peer_interface(lab: Lab, logs: Path, procs: list[subprocess.Popen[bytes]]) -> bool:
    """The upstream's WireGuard interface: the kernel's, else wireguard-go's."""
    if lab.exec("upstream", ["ip", "link", "add", PEER_IF, "type", "wireguard"]).returncode == 0:
        return True
    with open(logs / "wireguard-go.log", "wb") as out:
        procs.append(lab.popen("upstream", ["wireguard-go", "-f", PEER_IF], stdout=out,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, "WG_PROCESS_FOREGROUND": "1"}))
    deadline = time.monotonic() + 10
    while lab.exec("upstream", ["wg", "show", PEER_IF]).returncode != 0:
        assert time.monotonic() < deadline, "wireguard-go did not come up"
        time.sleep(0.05)
    return False


NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {addr}:80;
        listen [{addr6}]:80;
        location = /big {{ default_type application/octet-stream; alias {d}/big.bin; }}
        location / {{ return 200 "MARKER-TUNNEL host=$host from=$remote_addr\\n"; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def tunnel(lab: Lab) -> Iterator[Tunnel]:
    for tool in ("wg", "wireguard-go", "nginx", "dnsmasq"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")
    logs = lab.state_dir / "wireguard"
    logs.mkdir(parents=True, exist_ok=True)
    peer_private, peer_public = wg_keys()
    good_private, good_public = wg_keys()
    bad_private, _ = wg_keys()
    (logs / "peer.key").write_text(peer_private)
    os.chmod(logs / "peer.key", 0o600)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        kernel = _add_peer_interface(lab, logs, procs)
        for argv in (
            ["wg", "set", PEER_IF, "private-key", str(logs / "peer.key"), "listen-port",
             str(WG_PORT), "peer", good_public, "allowed-ips",
             f"{MIRAGE_ADDR}/32,{MIRAGE_ADDR6}/128"],
            ["ip", "addr", "add", f"{PEER_ADDR}/24", "dev", PEER_IF],
            ["ip", "-6", "addr", "add", f"{PEER_ADDR6}/64", "dev", PEER_IF],
            ["ip", "link", "set", PEER_IF, "up"],
        ):
            lab.exec("upstream", argv, check=True)
        web = logs / "nginx"
        web.mkdir(exist_ok=True)
        (web / "big.bin").write_bytes(os.urandom(BIG_BYTES))
        (web / "nginx.conf").write_text(NGINX_CONF.format(d=web, addr=PEER_ADDR,
                                                          addr6=PEER_ADDR6))
        with open(logs / "servers.log", "wb") as out:
            procs.append(lab.popen("upstream", ["nginx", "-c", str(web / "nginx.conf"), "-p",
                                                str(web)], stdout=out, stderr=subprocess.STDOUT))
            procs.append(lab.popen("upstream", [
                "dnsmasq", "-k", "-p", str(DNS_PORT), f"--listen-address={PEER_ADDR},{PEER_ADDR6}",
                "--bind-interfaces", "--no-resolv", "--no-hosts",
                f"--address=/wg.test/{PEER_ADDR}", f"--address=/wg.test/{PEER_ADDR6}",
                f"--pid-file={logs}/dnsmasq.pid"],
                stdout=out, stderr=subprocess.STDOUT))
        echo = lab.popen("upstream", [sys.executable, str(ECHO), "--tag", "--max-seconds", "600",
                                      f"{PEER_ADDR}:{ECHO_PORT}",
                                      f"[{PEER_ADDR6}]:{ECHO_PORT}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(echo)
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 10
        while not (f"{PEER_ADDR}:80 " in lab.exec("upstream", ["ss", "-Hltn"]).stdout
                   and f"{PEER_ADDR}:{DNS_PORT} " in lab.exec("upstream", ["ss", "-Hlun"]).stdout):
            assert time.monotonic() < deadline, "tunnel servers not listening"
            time.sleep(0.1)
        yield Tunnel(peer_public, good_private, bad_private, kernel)
    finally:
        stop_all(procs)
        lab.exec("upstream", ["ip", "link", "del", PEER_IF])


def wg_proxies(lab: Lab, t: Tunnel) -> list[dict[str, Any]]:
    server = lab.addr("upstream")
    common = {"type": "wireguard", "server": server, "port": WG_PORT, "ip": MIRAGE_ADDR,
              "public-key": t.peer_public, "udp": True, "mtu": 1400}
    return [
        {"name": GOOD, **common, "ipv6": MIRAGE_ADDR6, "private-key": t.good_private,
         "remote-dns-resolve": True,
         "dns": [f"{PEER_ADDR}:{DNS_PORT}"]},
        # A key the peer does not know: names resolve through Mirage's resolver.
        {"name": BAD, **common, "private-key": t.bad_private},
    ]


@pytest.fixture(scope="module")
def mirage(lab: Lab, tunnel: Tunnel) -> Iterator[MirageRun]:
    state = lab.state_dir / "wg-mirage-state"
    cfg = lab_config(lab, appliance={"state-dir": str(state), "udp-timeout": 5,
                                     "connect-timeout": CONNECT_TIMEOUT})
    cfg["proxies"] = [*cfg["proxies"], *wg_proxies(lab, tunnel)]
    cfg["rules"] = [f"DOMAIN-SUFFIX,wg.test,{GOOD}", f"DOMAIN,www.gamma.test,{BAD}",
                    "MATCH,DIRECT"]
    run = MirageRun(lab, cfg, name="wg-mirage")
    try:
        with running(run):
            yield run
    finally:
        lab.exec("gateway", [sys.executable, "-m", "appliance", "cleanup", "-c",
                             str(run.config_path)])


def links(lab: Lab) -> dict[str, dict[str, Any]]:
    out = lab.exec("gateway", ["ip", "-j", "-d", "link", "show"], check=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def our_rules(lab: Lab) -> list[str]:
    """The rules that look up a WireGuard interface's table: `oif NAME` or
    `from ADDRESS`."""
    rules = []
    for family in ("-4", "-6"):
        out = lab.exec("gateway", ["ip", family, "-j", "rule", "show"], check=True).stdout
        rules += [r["oif"] if "oif" in r else r["src"] for r in json.loads(out)
                  if str(r.get("table", "")).isdigit()
                  and int(r["table"]) & 0xFFFF0000 == 0x6D770000]
    return rules


def wait_for(check: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_http_through_the_tunnel_by_its_dns(lab: Lab, mirage: MirageRun) -> None:
    # Nothing but the tunnel reaches its network.
    direct = lab.exec("gateway", ["curl", "-s", "-m", "2", f"http://{PEER_ADDR}/"])
    assert direct.returncode != 0
    rc, body, _ = curl(lab, "http://www.wg.test/")
    assert rc == 0, (body, mirage.log_text()[-2000:])
    # Came out of the tunnel from Mirage's tunnel address, asked by name: the
    # tunnel's DNS answered A and AAAA, and IPv6 goes first (RFC 8305).
    assert "MARKER-TUNNEL host=www.wg.test from=" + MIRAGE_ADDR6 in body
    # The interface and its rule, as `ip` and `wg` show them.
    good = interface_name(GOOD)
    assert good in links(lab)
    assert sorted(r for r in our_rules(lab) if r != interface_name(BAD)) == sorted(
        [good, good, MIRAGE_ADDR, MIRAGE_ADDR6, MIRAGE_ADDR])  # oif v4+v6; from each
    shown = lab.exec("gateway", ["wg", "show", good, "latest-handshakes"], check=True).stdout
    _peer, when = shown.split()
    assert int(when) > 0  # a handshake completed
    mtu = links(lab)[good]["mtu"]
    assert mtu == 1400


def test_bulk_download_through_the_tunnel(lab: Lab, mirage: MirageRun) -> None:
    big = (lab.state_dir / "wireguard" / "nginx" / "big.bin").read_bytes()
    out = lab.exec("client", ["sh", "-c", "curl -s -m 20 http://www.wg.test/big | sha256sum"],
                   timeout=30)
    assert out.stdout.split()[0] == hashlib.sha256(big).hexdigest()


def test_udp_dig_and_echo_through_the_tunnel(lab: Lab, mirage: MirageRun) -> None:
    fake = dig(lab, "+short", "ns.wg.test")
    assert FAKE.match(fake), fake
    # dnsmasq behind the tunnel, asked through Mirage's fake IP for it.
    assert dig(lab, f"@{fake}", "-p", str(DNS_PORT), "+short", "anything.wg.test") == PEER_ADDR
    assert dig(lab, f"@{fake}", "-p", str(DNS_PORT), "+short", "AAAA", "x.wg.test") == PEER_ADDR6
    script = (
        "import json, socket, sys\n"
        "ip = socket.getaddrinfo('echo.wg.test', 9997, socket.AF_INET)[0][4][0]\n"
        "c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3)\n"
        "c.connect((ip, 9997)); reply = None\n"
        "for _ in range(2):\n"
        "    c.send(b'ping-wg')\n"
        "    try:\n"
        "        reply = c.recv(4096).decode(); break\n"
        "    except TimeoutError:\n"
        "        pass\n"
        "print(json.dumps([ip, reply]))\n"
    )
    out = lab.exec("client", [sys.executable, "-c", script], timeout=20)
    ip, reply = json.loads(out.stdout)
    assert FAKE.match(ip)
    assert reply is not None and reply.startswith(f"ping-wg from={MIRAGE_ADDR6}:"), reply
    assert reply.endswith(f"to={PEER_ADDR6}:{ECHO_PORT}")


def test_wrong_key_fails_within_connect_timeout_saying_why(lab: Lab, mirage: MirageRun) -> None:
    offset = mirage.log_path.stat().st_size
    rc, body, seconds = curl(lab, "http://www.gamma.test/")
    assert rc != 0 and "MARKER" not in body
    assert seconds < CONNECT_TIMEOUT + 1.5, seconds
    log = mirage.log_text(offset)
    assert re.search(rf"{BAD}: no WireGuard handshake with {lab.addr('upstream')}:{WG_PORT} "
                     r"within [\d.]+s \(wrong keys", log), log[-2000:]
    # The flow's failure, with that reason, on the gateway's line for it.
    assert f"dial via {BAD} failed" in log and "no WireGuard handshake" in log


def reload(run: MirageRun) -> None:
    offset = run.log_path.stat().st_size
    run.write_config()
    run.reload()
    wait_for(lambda: "SIGHUP: reloaded" in run.log_text(offset), "reloaded")


def test_reload_keeps_an_unchanged_interface_and_removes_a_dropped_one(
        lab: Lab, mirage: MirageRun) -> None:
    good, bad = interface_name(GOOD), interface_name(BAD)
    index = links(lab)[good]["ifindex"]
    proxies = mirage.config["proxies"]
    mirage.config["proxies"] = [p for p in proxies if p["name"] != BAD]
    mirage.config["rules"] = [f"DOMAIN-SUFFIX,wg.test,{GOOD}", "MATCH,DIRECT"]
    reload(mirage)
    wait_for(lambda: bad not in links(lab), "the dropped proxy's interface removed")
    assert links(lab)[good]["ifindex"] == index  # untouched: its flows go on
    wait_for(lambda: sorted(our_rules(lab)) == sorted([good, good, MIRAGE_ADDR, MIRAGE_ADDR6]),
             f"only the remaining interface's rules: {our_rules(lab)}")
    assert curl(lab, "http://www.wg.test/")[0] == 0
    # Back again: made anew by a run that has dropped its setup capabilities.
    mirage.config["proxies"] = proxies
    mirage.config["rules"] = [f"DOMAIN-SUFFIX,wg.test,{GOOD}", f"DOMAIN,www.gamma.test,{BAD}",
                              "MATCH,DIRECT"]
    reload(mirage)
    wait_for(lambda: bad in links(lab), "the proxy's interface back")


def test_stop_and_cleanup_remove_interfaces_and_rules(lab: Lab, tunnel: Tunnel,
                                                     mirage: MirageRun) -> None:
    names = {interface_name(GOOD), interface_name(BAD)}
    assert names <= set(links(lab)), links(lab).keys()
    mirage.stop()
    assert not names & set(links(lab))
    assert our_rules(lab) == []
    # A crash: SIGKILL leaves the rules (and a kernel interface) behind.
    mirage.start()
    wait_for(lambda: names <= set(links(lab)) and len(our_rules(lab)) == 6,
             "interfaces up after the restart")
    mirage.kill()
    assert our_rules(lab) != []
    if not tunnel.kernel:
        # wireguard-go dies with the Mirage that started it (PR_SET_PDEATHSIG),
        # and its interface with it; the rules wait for cleanup.
        wait_for(lambda: not names & set(links(lab)), "wireguard-go gone with Mirage")
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "cleanup", "-c",
                               str(mirage.config_path)], timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"rule oif {interface_name(GOOD)}" in out.stderr, out.stderr
    assert not names & set(links(lab))
    assert our_rules(lab) == []
