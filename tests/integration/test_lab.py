"""The namespace lab itself: topology, real servers, isolation, teardown.

Every check runs a real client (curl, dig, a raw SOCKS5 UDP client) inside
the lab's client namespace and asserts on what that client received, or reads
the kernel's state with `ip`. No Mirage code is in the path: this is the
ground the end-to-end tests stand on.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path

import pytest

from appliance.lab.lab import Lab
from appliance.lab.netns import ns_exists
from appliance.lab.servers import is_running
from appliance.lab.topology import TopologyError, VHost, load_topology, parse_topology

pytestmark = pytest.mark.netns

TOPO = load_topology()
VHOSTS = TOPO.web.vhosts
HONEST = TOPO.honest_resolver
POISON = TOPO.poisoned_resolver


def curl(lab: Lab, *args: str) -> str:
    r = lab.exec("client", ["curl", "-sS", "--max-time", "5", *args], timeout=15)
    assert r.returncode == 0, f"curl {args}: rc={r.returncode} {r.stderr}"
    return r.stdout


def dig(lab: Lab, *args: str) -> list[str]:
    r = lab.exec("client", ["dig", "+short", "+time=2", "+tries=1", *args], timeout=15)
    assert r.returncode == 0, f"dig {args}: {r.stdout}{r.stderr}"
    return r.stdout.split()


def wait_for_log(path: Path, needle: str, timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


# ------------------------------------------------------------------ topology data


def test_topology_file_describes_the_lab() -> None:
    assert set(TOPO.nodes) == {"client", "gateway", "upstream"}
    assert TOPO.node("gateway").forwarding
    assert [v.marker for v in VHOSTS] == ["MARKER-ALPHA", "MARKER-BETA", "MARKER-GAMMA"]
    # The poisoned resolver never answers a name with its own vhost's address.
    for v in VHOSTS:
        assert not set(POISON.answers[v.name]) & set(v.addresses)


def test_topology_errors_name_the_key_path() -> None:
    with pytest.raises(TopologyError, match=r"^nodes: expected a mapping"):
        parse_topology({"nodes": []})
    raw = {
        "nodes": {"a": {"ns": "a", "interfaces": {"eth0": {"addresses": ["10.0.0.300/24"]}}}},
    }
    with pytest.raises(TopologyError, match=r"^nodes\.a\.interfaces\.eth0\.addresses\[0\]"):
        parse_topology(raw)


# ------------------------------------------------------------------ namespaces


def test_namespaces_and_interfaces_match_the_topology(lab: Lab) -> None:
    for key, node in lab.topology.nodes.items():
        r = lab.exec(key, ["ip", "-j", "addr", "show"], check=True)
        links = {link["ifname"]: link for link in json.loads(r.stdout)}
        assert set(links) == {"lo"} | {i.name for i in node.interfaces}
        for iface in node.interfaces:
            got = {
                ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
                for a in links[iface.name]["addr_info"]
                if a.get("scope") == "global"
            }
            assert got == set(iface.addresses)
            assert "UP" in links[iface.name]["flags"]
    gw = lab.ns("gateway")
    sysctl = lab.exec(
        "gateway",
        ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
         "net.ipv4.conf.all.rp_filter"],
        check=True,
    )  # fmt: skip
    assert sysctl.stdout.split() == ["1", "1", "2"], gw


def test_client_resolver_is_the_isp(lab: Lab) -> None:
    r = lab.exec("client", ["cat", "/etc/resolv.conf"], check=True)
    assert r.stdout.split() == ["nameserver", str(POISON.address)]
    r = lab.exec("upstream", ["cat", "/etc/resolv.conf"], check=True)
    assert r.stdout.split() == ["nameserver", str(HONEST.address)]


def test_lab_has_no_way_out(lab: Lab) -> None:
    # The client's default route leads to the gateway...
    r = lab.exec("client", ["ip", "route", "get", "8.8.8.8"], check=True)
    assert f"via {lab.addr('gateway', 'lan0')} dev lan0" in r.stdout
    # ...and the gateway has no route beyond the lab, for either family.
    for target in ("8.8.8.8", "10.0.2.2", "172.17.0.1", "2001:4860:4860::8888"):
        r = lab.exec("gateway", ["ip", "route", "get", target])
        assert r.returncode != 0, r.stdout
        assert "unreachable" in r.stderr
    # No lab interface has its peer in the host's namespace: each veth's peer
    # namespace (its link-netnsid, as this namespace numbers it) is a lab one.
    for key in lab.topology.nodes:
        r = lab.exec(key, ["ip", "-j", "netns", "list-id"], check=True)
        names = {e["nsid"]: e.get("name") for e in json.loads(r.stdout or "[]")}
        r = lab.exec(key, ["ip", "-j", "-d", "link", "show", "type", "veth"], check=True)
        for link in json.loads(r.stdout):
            assert names.get(link["link_netnsid"]) in lab.namespaces, (key, link["ifname"])


def test_routing_through_the_gateway_both_families(lab: Lab) -> None:
    alpha = VHOSTS[0]
    for a in alpha.addresses:
        url = f"http://[{a}]/" if a.version == 6 else f"http://{a}/"
        body = curl(lab, "-g", url)
        src = lab.addr("client", family=a.version)
        assert body.strip() == f"{alpha.marker} host={url[7:-1]} from={src}"


# ------------------------------------------------------------------ web


@pytest.mark.parametrize("vhost", VHOSTS, ids=lambda v: v.name)
def test_vhost_by_ip_and_by_name(lab: Lab, vhost: VHost) -> None:
    v4 = next(a for a in vhost.addresses if a.version == 4)
    assert curl(lab, f"http://{v4}/").startswith(vhost.marker + " ")
    body = curl(lab, "--resolve", f"{vhost.name}:80:{v4}", f"http://{vhost.name}/")
    assert body.startswith(f"{vhost.marker} host={vhost.name} ")


def test_vhosts_over_https_and_http2(lab: Lab) -> None:
    port = lab.topology.web.https_port
    tls = ("--cacert", str(lab.ca_path), "--http2", "-w", "proto=%{http_version}")
    for v in VHOSTS:
        v4 = next(a for a in v.addresses if a.version == 4)
        out = curl(lab, *tls, "--resolve", f"{v.name}:{port}:{v4}", f"https://{v.name}:{port}/")
        assert out.startswith(f"{v.marker} host={v.name} ")
        assert out.endswith("proto=2")
    # By IP literal too: the certificate carries every vhost address.
    beta6 = next(a for a in VHOSTS[1].addresses if a.version == 6)
    out = curl(lab, *tls, "-g", f"https://[{beta6}]:{port}/")
    assert out.startswith(VHOSTS[1].marker)


def test_wrong_ip_shows_the_wrong_marker(lab: Lab) -> None:
    alpha, _, gamma = VHOSTS
    wrong = next(a for a in gamma.addresses if a.version == 4)
    body = curl(lab, "--resolve", f"{alpha.name}:80:{wrong}", f"http://{alpha.name}/")
    assert body.startswith(f"{gamma.marker} host={alpha.name} ")


def test_big_download(lab: Lab) -> None:
    beta = VHOSTS[1]
    out = lab.state_dir / "big.download"
    curl(lab, "-o", str(out), f"http://{beta.addresses[0]}{lab.topology.web.big_path}")
    try:
        got = hashlib.sha256(out.read_bytes()).hexdigest()
        want = hashlib.sha256((lab.state_dir / "big.bin").read_bytes()).hexdigest()
        assert out.stat().st_size == lab.topology.web.big_bytes
        assert got == want
    finally:
        out.unlink()


# ------------------------------------------------------------------ DNS


def test_poisoned_resolver_gives_the_wrong_address(lab: Lab) -> None:
    for v in VHOSTS:
        wrong = POISON.answers[v.name]
        assert dig(lab, v.name, "A") == [str(a) for a in wrong if a.version == 4]
        assert dig(lab, v.name, "AAAA") == [str(a) for a in wrong if a.version == 6]
        # The client following its resolver lands on the wrong vhost.
        assert not curl(lab, f"http://{v.name}/").startswith(v.marker)
    assert "query[A] www.alpha.test" in wait_for_log(lab.log("dnsmasq"), "www.alpha.test")


def test_honest_resolver_plain_dns(lab: Lab) -> None:
    at = f"@{HONEST.address}"
    for v in VHOSTS:
        assert dig(lab, at, v.name, "A") == [str(a) for a in v.addresses if a.version == 4]
        assert dig(lab, at, v.name, "AAAA") == [str(a) for a in v.addresses if a.version == 6]
    assert dig(lab, at, "alpha.test", "MX") == ["10", "mail.alpha.test."]
    assert dig(lab, at, "alpha.test", "TXT") == ['"mirage-lab', 'alpha"']
    assert dig(lab, at, "time.ntp.test") == ["192.168.57.123"]
    assert dig(lab, at, HONEST.name) == [str(HONEST.address)]
    assert dig(lab, f"@{HONEST.address6}", "+tcp", "www.beta.test") == ["192.168.57.11"]
    r = lab.exec("client", ["dig", "+time=2", "+tries=1", at, "nothere.test"], check=True)
    assert "status: NXDOMAIN" in r.stdout


def test_honest_resolver_doh(lab: Lab) -> None:
    # curl resolves over DoH (HTTP/2, verified against the lab CA by IP and
    # by name), then fetches: the right vhost despite the poisoned resolver.
    beta = VHOSTS[1]
    for doh in (HONEST.url, f"https://{HONEST.name}:{HONEST.https_port}{HONEST.path}"):
        body = curl(
            lab,
            "--cacert", str(lab.ca_path),
            "--resolve", f"{HONEST.name}:{HONEST.https_port}:{HONEST.address}",
            "--doh-url", doh,
            "-4", f"http://{beta.name}/",
        )  # fmt: skip
        assert body.startswith(f"{beta.marker} host={beta.name} ")


# ------------------------------------------------------------------ proxies


def test_dante_receives_the_name(lab: Lab) -> None:
    beta = VHOSTS[1]
    dante = lab.topology.socks_server("dante")
    body = curl(lab, "--socks5-hostname", f"{dante.address}:{dante.port}", f"http://{beta.name}/")
    assert body.startswith(f"{beta.marker} host={beta.name} ")
    needle = f"ATYP: 3 address: {beta.name}.80"
    assert needle in wait_for_log(lab.dante_log, needle)


def test_dante_with_username(lab: Lab) -> None:
    gamma = VHOSTS[2]
    s = lab.topology.socks_server("dante-auth")
    proxy = f"{s.username}:{s.password}@{s.address}:{s.port}"
    body = curl(lab, "--socks5-hostname", proxy, f"http://{gamma.name}/")
    assert body.startswith(gamma.marker)
    bad = lab.exec(
        "client",
        ["curl", "-sS", "--max-time", "5", "--socks5-hostname",
         f"{s.username}:wrong@{s.address}:{s.port}", f"http://{gamma.name}/"],
        timeout=15,
    )  # fmt: skip
    assert bad.returncode == 97, bad  # CURLE_PROXY: SOCKS5 authentication failed
    # The lab user lives only in the upstream namespace, not on the host.
    assert s.username is not None
    assert f"\n{s.username}:" not in "\n" + Path("/etc/passwd").read_text()


UDP_ASSOCIATE = r"""
import socket, struct, sys
proxy, port, target, qname = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
t = socket.create_connection((proxy, port), timeout=5)
t.sendall(b"\x05\x01\x00"); assert t.recv(2) == b"\x05\x00"
t.sendall(b"\x05\x03\x00\x01" + bytes(6))        # UDP ASSOCIATE, source unknown
rep = t.recv(10); assert rep[1] == 0, rep
relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
labels = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0"
query = struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
dst = b"\x03" + bytes([len(target)]) + target.encode() + struct.pack("!H", 53)  # ATYP 3
u.sendto(b"\0\0\0" + dst + query, relay)
data = u.recv(4096)
hdr = {1: 10, 4: 22}[data[3]]
reply = data[hdr:]
assert reply[:2] == b"\x42\x42", reply
print(socket.inet_ntoa(reply[-4:]))
"""


def test_dante_udp_associate(lab: Lab) -> None:
    # A DNS query relayed over SOCKS5 UDP to the honest resolver, given by name.
    dante = lab.topology.socks_server("dante")
    r = lab.exec(
        "client",
        ["python3", "-c", UDP_ASSOCIATE, str(dante.address), str(dante.port),
         HONEST.name, "www.gamma.test"],
        timeout=20,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["192.168.57.12"]


def test_tinyproxy_connect(lab: Lab) -> None:
    alpha = VHOSTS[0]
    hp = lab.topology.http_proxy
    proxy = f"http://{hp.address}:{hp.port}"
    body = curl(lab, "--proxytunnel", "-x", proxy, f"http://{alpha.name}/")
    assert body.startswith(f"{alpha.marker} host={alpha.name} ")
    assert "CONNECT" in wait_for_log(lab.log("tinyproxy"), "CONNECT")
    # CONNECT only to the allowed ports.
    r = lab.exec(
        "client",
        ["curl", "-sS", "--max-time", "5", "--proxytunnel", "-x", proxy,
         f"http://{alpha.name}:22/"],
        timeout=15,
    )  # fmt: skip
    assert r.returncode != 0
    assert "403" in r.stderr


# ------------------------------------------------------------------ lifecycle


def test_second_lab_coexists_and_down_leaves_nothing(lab: Lab, lab_prefix: str) -> None:
    prefix = f"{lab_prefix}x"
    try:
        first = Lab(prefix).up()
        records = first.processes
        names = {rec.name for rec in records}
        assert names >= {"nginx", "dante", "tinyproxy", "dnsmasq", "unbound"}
        assert all(is_running(rec) for rec in records)
        res = first.exec("client", ["curl", "-sS", "--max-time", "5", "http://192.168.57.11/"])
        assert res.stdout.startswith("MARKER-BETA")
        # A crashed lab (object gone, processes left) is replaced by up().
        second = Lab(prefix).up()
        assert not any(is_running(rec) for rec in records)
        new_records = second.processes
        assert all(is_running(rec) for rec in new_records)
        res = second.exec("client", ["curl", "-sS", "--max-time", "5", "http://192.168.57.12/"])
        assert res.stdout.startswith("MARKER-GAMMA")
    finally:
        # Down by prefix, as `mirage lab down` does from another process.
        Lab(prefix).down()
    for ns in second.namespaces:
        assert not ns_exists(ns)
        assert not Path("/etc/netns", ns).exists()
    assert not second.state_dir.exists()
    for rec in [*records, *new_records]:
        assert not is_running(rec)
        # Not even a zombie of ours: down() reaps what this process started.
        assert not _is_our_zombie(rec.pid)
    # The session lab was not touched.
    assert curl(lab, "http://192.168.57.11/").startswith("MARKER-BETA")


def _is_our_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] == "Z" and int(fields[1]) == os.getpid()
