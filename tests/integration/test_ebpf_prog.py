"""bpf/mirage_tc.c under BPF_PROG_TEST_RUN: hand-built packets, verdict and mark.

The program is compiled by the loader (`appliance.capture.ebpf.Program`) in
its test build (MIRAGE_TEST_ASSIGN: bpf_sk_assign works only at real tc
ingress, so the socket the program *would* assign is recorded in the
`mirage_probe` map), then driven through the bpf() syscall with ctypes.
Socket lookups are real: each run happens inside a throwaway namespace
(`ebpf-pt-*`) where the test opened the listeners the program must find
(or, in the `empty` namespace, none). Every case checks the verdict
(TC_ACT_OK 0 / TC_ACT_SHOT 2), the mark the packet leaves with, which socket
was chosen (kind and local port), and the counter that moved.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from appliance.capture.ebpf import STAT_NAMES, Program, TestRun, plan
from appliance.config.model import ApplianceConfig, Config, DnsConfig, Listen

pytestmark = [pytest.mark.netns]

OK, SHOT = 0, 2
MARK = 0x233
ROUTING_MARK = 0xFF
TPROXY = 7893
DNS_PORT = 5353
GW4, GW6 = "192.168.77.1", "fd77::1"
CLIENT4, CLIENT6 = "192.168.77.50", "fd77::50"
FAKE4 = "198.18.0.5"
FAKE6 = "fdfe:dcba:9876::5"
LOCAL_FAKE = "198.18.0.99"  # a fake address made local, for established sockets

STAT = {name: i for i, name in enumerate(STAT_NAMES)}

# --- namespaces -------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Move this thread into namespace `name` (sockets created and the test
    run happen there), and back."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(there, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(here, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(here)
        os.close(there)


# --- packets -------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


ETH_IP = b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x02" + b"\x08\x00"
ETH_IP6 = b"\x02\0\0\0\0\x01" + b"\x02\0\0\0\0\x02" + b"\x86\xdd"


SYN, ACK = 0x02, 0x10


def l4(proto: str, sport: int, dport: int, payload: bytes = b"q" * 12, flags: int = SYN
       ) -> bytes:
    if proto == "tcp":
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    if proto == "udp":
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return payload


PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "esp": 50}


def ipv4(src: str, dst: str, proto: str, sport: int = 40000, dport: int = 80, *,
         options: bytes = b"", frag: int = 0, body: bytes | None = None, flags: int = SYN
         ) -> bytes:
    payload = l4(proto, sport, dport, flags=flags) if body is None else body
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 1, frag, 64,
                      PROTO[proto], 0, socket.inet_aton(src), socket.inet_aton(dst)) + options
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return ETH_IP + hdr + payload


def ipv6(src: str, dst: str, proto: str, sport: int = 40000, dport: int = 80, *,
         ext: list[tuple[int, bytes]] | None = None, body: bytes | None = None) -> bytes:
    """`ext`: (header number, 8-byte extension header body without its
    next-header byte) in order."""
    payload = l4(proto, sport, dport) if body is None else body
    chain = [n for n, _ in ext or []] + [PROTO[proto] if proto != "icmp" else 58]
    exts = b""
    for i, (_n, rest) in enumerate(ext or []):
        exts += bytes([chain[i + 1]]) + rest
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(exts) + len(payload), chain[0], 64,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return ETH_IP6 + hdr + exts + payload


HOPOPTS = (0, b"\x00\x01\x04\x00\x00\x00\x00")  # hdr len 0, PadN 4
DSTOPTS = (60, b"\x00\x01\x04\x00\x00\x00\x00")
FRAG_FIRST = (44, b"\x00\x00\x01\x00\x00\x00\x07")  # offset 0, M=1
FRAG_LATER = (44, b"\x00\x00\x10\x00\x00\x00\x07")  # offset 2 (x8), M=0


# --- fixtures -------------------------------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


def make_ns() -> str:
    name = f"ebpf-pt-{uuid.uuid4().hex[:8]}"
    sh("ip", "netns", "add", name)
    try:
        x = ["ip", "-n", name]
        sh(*x, "link", "set", "lo", "up")
        sh(*x, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
        sh(*x, "link", "set", "lan1", "up")
        sh(*x, "link", "set", "lan0", "up")
        sh(*x, "addr", "add", f"{GW4}/24", "dev", "lan0")
        sh(*x, "-6", "addr", "add", f"{GW6}/64", "dev", "lan0", "nodad")
        sh(*x, "addr", "add", f"{LOCAL_FAKE}/32", "dev", "lo")
        sh(*x, "route", "add", "default", "via", "192.168.77.254")
        sh(*x, "-6", "route", "add", "default", "via", "fd77::fe")
        for key in ("net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"):
            sh("ip", "netns", "exec", name, "sysctl", "-qw", key)
    except BaseException:
        sh("ip", "netns", "del", name)
        raise
    return name


def make_cfg(state: Path) -> Config:
    return Config(
        tproxy_port=TPROXY,
        routing_mark=ROUTING_MARK,
        ipv6=True,
        dns=DnsConfig(listen=Listen("::", DNS_PORT), ipv6=True,
                      fake_ip_range6=ipaddress.IPv6Network("fdfe:dcba:9876::/64")),
        appliance=ApplianceConfig(
            lan=("lan0",), redirect="ebpf", capture_mark=MARK, state_dir=state,
            bypass=(ipaddress.ip_network("198.18.5.0/24"), ipaddress.ip_network("9.9.9.9/32"),
                    ipaddress.ip_network("2001:db8:bbbb::/48")),
        ),
    )


class Lab:
    """The compiled test program and two namespaces: `full` (listeners and a
    few flow sockets open) and `empty` (none)."""

    def __init__(self, prog: Program, full: str, empty: str) -> None:
        self.prog = prog
        self.full = full
        self.empty = empty
        self.sockets: list[socket.socket] = []
        self.ifindex: dict[str, int] = {}
        self.flows: dict[str, int] = {}

    def run(self, packet: bytes, ns: str | None = None, mark: int = 0) -> TestRun:
        ns = ns or self.full
        with in_netns(ns):
            return self.prog.test_run(packet, ifindex=self.ifindex[ns], mark=mark)

    def stats(self) -> dict[str, int]:
        return self.prog.stats()

    def probe(self) -> dict[str, int]:
        v = self.prog.table("mirage_probe")[ctypes.c_int(0)]
        return {"which": v.which, "port": v.port, "assigned": v.assigned, "state": v.state}

    def open_sockets(self) -> None:
        def sock(family: int, kind: int, addr: tuple[Any, ...]) -> socket.socket:
            s = socket.socket(family, kind)
            self.sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(addr)
            if kind == socket.SOCK_STREAM and addr[1]:
                s.listen(16)
            return s

        with in_netns(self.full):
            # Mirage's sockets: dual-stack, like the gateway and DNS service.
            sock(socket.AF_INET6, socket.SOCK_STREAM, ("::", TPROXY))
            sock(socket.AF_INET6, socket.SOCK_DGRAM, ("::", TPROXY))
            sock(socket.AF_INET6, socket.SOCK_STREAM, ("::", DNS_PORT))
            sock(socket.AF_INET6, socket.SOCK_DGRAM, ("::", DNS_PORT))
            # Someone else's service on port 80 and 53 of every address: a
            # lookup by the packet's own tuple finds these listeners, which
            # must not take fake-range or hijacked traffic.
            sock(socket.AF_INET, socket.SOCK_STREAM, ("0.0.0.0", 80))
            sock(socket.AF_INET, socket.SOCK_DGRAM, ("0.0.0.0", 53))
            # An established TCP flow and a connected UDP flow to a fake
            # address (made local so the kernel builds them): GW4:port ->
            # LOCAL_FAKE:9000/9001.
            srv = sock(socket.AF_INET, socket.SOCK_STREAM, (LOCAL_FAKE, 9000))
            cli = sock(socket.AF_INET, socket.SOCK_STREAM, (GW4, 0))
            cli.connect((LOCAL_FAKE, 9000))
            self.sockets.append(srv.accept()[0])
            self.flows["tcp"] = cli.getsockname()[1]
            u = sock(socket.AF_INET, socket.SOCK_DGRAM, (LOCAL_FAKE, 9001))
            u.connect((GW4, 40001))
            # A reply socket (bound to a fake address and port, unconnected):
            # its datagrams' peers must still go to the tproxy-port socket.
            sock(socket.AF_INET, socket.SOCK_DGRAM, (LOCAL_FAKE, 9002))

    def close(self) -> None:
        for s in self.sockets:
            s.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    prog = Program(plan(make_cfg(tmp_path_factory.mktemp("ebpf"))), testing=True)
    made: list[str] = []
    try:
        made.append(make_ns())
        made.append(make_ns())
        t = Lab(prog, *made)
        for ns in made:
            with in_netns(ns):
                t.ifindex[ns] = socket.if_nametoindex("lan0")
        t.open_sockets()
        yield t
        t.close()
    finally:
        prog.close()
        for ns in made:
            sh("ip", "netns", "del", ns)


class Moved:
    """The counters that moved during a block."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def __enter__(self) -> Moved:
        self.before = self.lab.stats()
        self.probe_before = self.lab.probe()["assigned"]
        return self

    def __exit__(self, *exc: object) -> None:
        after = self.lab.stats()
        self.delta = {k: after[k] - self.before[k] for k in after
                      if after[k] != self.before[k] and k not in ("packets", "bytes")}
        self.assigned = self.lab.probe()["assigned"] - self.probe_before


def check(lab: Lab, packet: bytes, retval: int, mark: int, counter: str | None,
          *, ns: str | None = None, in_mark: int = 0) -> Moved:
    with Moved(lab) as m:
        v = lab.run(packet, ns, in_mark)
    assert (v.retval, v.mark) == (retval, mark), (v, m.delta)
    assert m.delta == ({counter: 1} if counter else {}), m.delta
    return m


def assigned(lab: Lab, m: Moved, counter: str, port: int) -> None:
    assert m.assigned == 1
    p = lab.probe()
    assert (p["which"], p["port"]) == (STAT[counter], port), p


# --- the cases --------------------------------------------------------------------


def test_fake_tcp_syn_goes_to_the_tproxy_listener_with_the_mark(lab: Lab) -> None:
    m = check(lab, ipv4(CLIENT4, FAKE4, "tcp", dport=80), OK, MARK, "tcp_listener")
    # Not to the port-80 service that a lookup by the packet's tuple finds.
    assigned(lab, m, "tcp_listener", TPROXY)


def test_fake_tcp_with_no_listener_is_dropped_and_counted(lab: Lab) -> None:
    m = check(lab, ipv4(CLIENT4, FAKE4, "tcp"), SHOT, 0, "drop_no_listener", ns=lab.empty)
    assert m.assigned == 0
    check(lab, ipv4(CLIENT4, FAKE4, "udp", dport=443), SHOT, 0, "drop_no_listener",
          ns=lab.empty)
    # DNS with no DNS socket (Mirage gone, program still attached) is the
    # fail-safe's case: passed on to the resolver asked, unmarked, counted.
    for proto in ("udp", "tcp"):
        check(lab, ipv4(CLIENT4, "8.8.8.8", proto, dport=53), OK, 0, "dns_no_socket",
              ns=lab.empty)


def test_fake_tcp_of_an_established_flow_is_marked_for_its_own_socket(lab: Lab) -> None:
    # Not a SYN: marked only, the kernel's own lookup finds the flow's
    # socket (no lookup, no assignment in the program).
    pkt = ipv4(GW4, LOCAL_FAKE, "tcp", sport=lab.flows["tcp"], dport=9000, flags=ACK)
    m = check(lab, pkt, OK, MARK, "tcp_established")
    assert m.assigned == 0
    # Even with no socket at all: delivered locally (the kernel resets it),
    # never forwarded.
    m = check(lab, ipv4(CLIENT4, FAKE4, "tcp", flags=ACK), OK, MARK, "tcp_established",
              ns=lab.empty)
    # A retransmitted SYN of the flow goes to the flow's socket, not the
    # listener.
    pkt = ipv4(GW4, LOCAL_FAKE, "tcp", sport=lab.flows["tcp"], dport=9000)
    m = check(lab, pkt, OK, MARK, "tcp_established")
    assigned(lab, m, "tcp_established", 9000)


def test_fake_udp_to_the_tproxy_socket_or_the_connected_flow(lab: Lab) -> None:
    m = check(lab, ipv4(CLIENT4, FAKE4, "udp", dport=443), OK, MARK, "udp_listener")
    assigned(lab, m, "udp_listener", TPROXY)
    m = check(lab, ipv4(GW4, LOCAL_FAKE, "udp", sport=40001, dport=9001), OK, MARK,
              "udp_connected")
    assigned(lab, m, "udp_connected", 9001)
    # An unconnected socket bound to the destination (a reply socket) is
    # not a flow socket: the datagram goes to the tproxy-port socket.
    m = check(lab, ipv4(CLIENT4, LOCAL_FAKE, "udp", dport=9002), OK, MARK, "udp_listener")
    assigned(lab, m, "udp_listener", TPROXY)


def test_dns_to_another_resolver_goes_to_the_dns_service(lab: Lab) -> None:
    # Not to the port-53 socket bound on 0.0.0.0 by someone else.
    m = check(lab, ipv4(CLIENT4, "8.8.8.8", "udp", dport=53), OK, MARK, "dns_udp")
    assigned(lab, m, "dns_udp", DNS_PORT)
    m = check(lab, ipv4(CLIENT4, "8.8.8.8", "tcp", dport=53), OK, MARK, "dns_tcp")
    assigned(lab, m, "dns_tcp", DNS_PORT)
    m = check(lab, ipv6(CLIENT6, "2001:db8::53", "udp", dport=53), OK, MARK, "dns_udp")
    assigned(lab, m, "dns_udp", DNS_PORT)


def test_dns_to_the_gateway_itself_passes(lab: Lab) -> None:
    check(lab, ipv4(CLIENT4, GW4, "udp", dport=53), OK, 0, "local")
    check(lab, ipv6(CLIENT6, GW6, "tcp", dport=53), OK, 0, "local")


def test_bypass_ranges_pass_untouched(lab: Lab) -> None:
    check(lab, ipv4(CLIENT4, "198.18.5.7", "tcp"), OK, 0, "bypass")
    check(lab, ipv4(CLIENT4, "9.9.9.9", "udp", dport=53), OK, 0, "bypass")
    check(lab, ipv6(CLIENT6, "2001:db8:bbbb::53", "udp", dport=53), OK, 0, "bypass")
    # Always bypassed: multicast.
    check(lab, ipv4(CLIENT4, "224.0.0.251", "udp", dport=53), OK, 0, "bypass")


def test_routing_mark_passes_untouched(lab: Lab) -> None:
    check(lab, ipv4(CLIENT4, FAKE4, "tcp"), OK, ROUTING_MARK, "own", in_mark=ROUTING_MARK)


def test_other_traffic_passes_untouched(lab: Lab) -> None:
    check(lab, ipv4(CLIENT4, "8.8.8.8", "tcp", dport=443), OK, 0, None)
    check(lab, ipv4(CLIENT4, "8.8.8.8", "icmp", body=b"\x08\0\0\0\0\0\0\0"), OK, 0, None)
    check(lab, ipv6(CLIENT6, "2001:db8::1", "udp", dport=443), OK, 0, None)
    arp = b"\xff" * 6 + b"\x02\0\0\0\0\x02" + b"\x08\x06" + bytes(28)
    check(lab, arp, OK, 0, "not_ip")


def test_ipv4_options_are_skipped_by_ihl(lab: Lab) -> None:
    # 8 bytes of options (NOPs): the ports come after them.
    pkt = ipv4(CLIENT4, FAKE4, "udp", dport=443, options=b"\x01" * 8)
    m = check(lab, pkt, OK, MARK, "udp_listener")
    assigned(lab, m, "udp_listener", TPROXY)
    check(lab, ipv4(CLIENT4, "8.8.8.8", "udp", dport=53, options=b"\x01" * 4), OK, MARK,
          "dns_udp")


def test_ipv6_fake_range_and_extension_headers(lab: Lab) -> None:
    m = check(lab, ipv6(CLIENT6, FAKE6, "tcp"), OK, MARK, "tcp_listener")
    assigned(lab, m, "tcp_listener", TPROXY)
    m = check(lab, ipv6(CLIENT6, FAKE6, "udp", dport=443, ext=[HOPOPTS, DSTOPTS]), OK, MARK,
              "udp_listener")
    assigned(lab, m, "udp_listener", TPROXY)
    check(lab, ipv6(CLIENT6, FAKE6, "esp", body=bytes(16)), SHOT, 0, "drop_not_tcp_udp")


def test_truncated_headers(lab: Lab) -> None:
    full = ipv4(CLIENT4, FAKE4, "tcp")
    # An IPv4 header shorter than 20 bytes (ihl 4): passed, ip_rcv drops it.
    # (TEST_RUN itself refuses packets without a whole fixed IP header.)
    bad = bytearray(full)
    bad[14] = 0x44
    check(lab, bytes(bad), OK, 0, "short")
    # TCP header cut (IP header says more than there is): fake -> dropped.
    check(lab, full[:14 + 20 + 10], SHOT, 0, "drop_malformed")
    # Options longer than the packet.
    bad = bytearray(ipv4(CLIENT4, FAKE4, "udp", dport=443))
    bad[14] = 0x4F  # ihl 15: 60 bytes of header in a 48-byte packet
    check(lab, bytes(bad), SHOT, 0, "drop_malformed")
    six = ipv6(CLIENT6, FAKE6, "udp", ext=[HOPOPTS])
    check(lab, six[:14 + 40 + 4], SHOT, 0, "drop_malformed")
    # Not fake: a cut TCP header passes (the kernel drops it).
    check(lab, ipv4(CLIENT4, "8.8.8.8", "tcp", dport=53)[:14 + 20 + 6], OK, 0, None)


def test_fragments(lab: Lab) -> None:
    # First fragment of a fake-range datagram: dropped (cannot be assigned
    # whole); later fragments too (no ports, never to the WAN).
    check(lab, ipv4(CLIENT4, FAKE4, "udp", dport=443, frag=0x2000), SHOT, 0, "drop_fragment")
    check(lab, ipv4(CLIENT4, FAKE4, "udp", frag=0x0010, body=bytes(16)), SHOT, 0,
          "drop_fragment")
    check(lab, ipv6(CLIENT6, FAKE6, "udp", dport=443, ext=[FRAG_FIRST]), SHOT, 0,
          "drop_fragment")
    check(lab, ipv6(CLIENT6, FAKE6, "udp", ext=[HOPOPTS, FRAG_LATER], body=bytes(16)), SHOT,
          0, "drop_fragment")
    # Elsewhere fragments pass, DNS included.
    check(lab, ipv4(CLIENT4, "8.8.8.8", "udp", dport=53, frag=0x2000), OK, 0, None)
    check(lab, ipv4(CLIENT4, "8.8.8.8", "udp", frag=0x0010, body=bytes(16)), OK, 0, None)
    check(lab, ipv6(CLIENT6, "2001:db8::53", "udp", dport=53, ext=[FRAG_FIRST]), OK, 0, None)


def test_loop_guard_on_the_gateways_own_tproxy_port(lab: Lab) -> None:
    check(lab, ipv4(CLIENT4, GW4, "tcp", dport=TPROXY), SHOT, 0, "drop_loop")
    check(lab, ipv6(CLIENT6, GW6, "udp", dport=TPROXY), SHOT, 0, "drop_loop")
    # The same port on a remote host is just traffic.
    check(lab, ipv4(CLIENT4, "8.8.8.8", "tcp", dport=TPROXY), OK, 0, None)


def test_per_client_counters(lab: Lab) -> None:
    src = "192.168.77.123"
    for _ in range(3):
        lab.run(ipv4(src, FAKE4, "udp", dport=443))
    lab.run(ipv4(src, "8.8.8.8", "tcp", dport=443))
    rows = {r["address"]: r for r in lab.prog.clients()}
    row = rows[src]
    assert row["packets"] == 4 and row["captured_packets"] == 3
    assert row["bytes"] > row["captured_bytes"] > 0
