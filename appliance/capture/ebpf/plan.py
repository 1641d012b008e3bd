"""The eBPF capture plan: what the config means for bpf/mirage_tc.c, without a kernel.

`plan(cfg)` turns the `CaptureSpec` into the compile flags (`-D` defines:
fake ranges, ports, marks, DNS listener), the bypass trie's keys and the
interfaces to attach to; `Plan.describe()` is what `mirage rules` prints.
Nothing is substituted into the C source: the program is configured by
defines and maps only.

Pure: no compiler, no kernel. Refuses configs the program cannot express
with `CaptureError` (those `CaptureSpec` refuses, and a bypass list longer
than the trie).
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.capture.routing import PolicyRouting
from appliance.capture.spec import CaptureError, CaptureSpec
from appliance.config.model import Config, IPNetwork

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"
SOURCE = BPF_DIR / "mirage_tc.c"
FUNCTION = "mirage_ingress"
SK_LOOKUP_FUNCTION = "mirage_sk_lookup"

# How Mirage recognises its own filter (also one a crashed run left): kind
# bpf at this preference on clsact ingress. 0x4d47 ("MG") is far from the
# small preferences tc and other tools pick by default.
FILTER_PREF = 0x4D47
FILTER_HANDLE = 1
FILTER_NAME = "mirage_tc:mirage_ingress"

CLIENTS_MAX = 4096
BYPASS_MAX = 1024

# Must list bpf/lib/stats.h's enum in order (tests/unit/test_ebpf_plan.py
# parses the header and compares).
STAT_NAMES = (
    "packets",
    "bytes",
    "not_ip",
    "short",
    "own",
    "bypass",
    "local",
    "tcp_established",
    "tcp_listener",
    "udp_connected",
    "udp_listener",
    "dns_tcp",
    "dns_udp",
    "drop_no_listener",
    "drop_assign",
    "drop_fragment",
    "drop_not_tcp_udp",
    "drop_malformed",
    "drop_loop",
    "dns_no_socket",
)

TrieKey = tuple[int, tuple[int, ...]]


def _word(b: bytes) -> int:
    """Four network-order bytes as the integer the program reads natively."""
    return int.from_bytes(b, sys.byteorder)


def _words(addr: ipaddress.IPv6Address | ipaddress.IPv4Address) -> tuple[int, ...]:
    p = addr.packed
    return tuple(_word(p[i : i + 4]) for i in range(0, len(p), 4))


def trie_key(net: IPNetwork) -> TrieKey:
    """(prefix length, 4 words) of `net` as a key of the bypass trie; IPv4
    as IPv4-mapped IPv6 (::ffff:a.b.c.d/96+len), like the program builds it."""
    if isinstance(net, ipaddress.IPv4Network):
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + net.network_address.packed)
        return 96 + net.prefixlen, _words(mapped)
    return net.prefixlen, _words(net.network_address)


@dataclass(frozen=True)
class Plan:
    """What `EbpfCapture` would compile and attach for a config."""

    interfaces: tuple[str, ...]
    cflags: tuple[str, ...]
    bypass: tuple[IPNetwork, ...]
    fake: tuple[IPNetwork, ...]
    tproxy_port: int
    dns: tuple[str, ...]  # "udp+tcp port 53 (v4) -> 0.0.0.0:53" lines; empty: no hijack
    routing: PolicyRouting
    notes: tuple[str, ...] = field(default=())

    @property
    def bypass_keys(self) -> list[TrieKey]:
        """The contents of the LPM trie `mirage_bypass` (value 1 each)."""
        return [trie_key(n) for n in self.bypass]

    def describe(self) -> str:
        """The plan as `mirage rules` prints it: comments, then the
        equivalent tc and ip commands."""
        out = [
            "# Mirage capture plan (appliance.redirect: ebpf): no nftables rule;",
            f"# {SOURCE.relative_to(BPF_DIR.parent)} compiled by bcc (SCHED_CLS, entry "
            f"{FUNCTION}) and attached to tc clsact ingress (direct-action) on: "
            f"{', '.join(self.interfaces)}",
            "#",
            "# Captured (bpf_sk_assign + fwmark, no NAT):",
        ]
        for net in self.fake:
            out.append(f"#   tcp/udp to {net} -> flow socket, else transparent "
                       f"socket on tproxy-port {self.tproxy_port}")
        out += [f"#   {line}" for line in self.dns] or ["#   (no DNS hijack)"]
        out += [
            "# Never captured (LPM trie mirage_bypass):",
            *(f"#   {n}" for n in self.bypass),
            "# Also passed untouched: packets with routing-mark, port 53 to the "
            "gateway's own addresses, everything else.",
            "# Dropped and counted: fake-range traffic with no socket to take it, "
            "fragments, non-TCP/UDP or truncated; tproxy-port on the gateway's own "
            "address (loop guard).",
            *(f"# Note: {n}" for n in self.notes),
            f"# Plus {SK_LOOKUP_FUNCTION} (sk_lookup, linked to this network namespace "
            "while Mirage runs): a TCP SYN to a fake range that met a TIME-WAIT socket "
            "gets the transparent listener (map mirage_listener).",
            "#",
            "# Compile flags:",
            *(f"#   {f}" for f in self.cflags),
            "#",
            "# Equivalent commands (applied with pyroute2; the qdisc only where missing):",
        ]
        for ifname in self.interfaces:
            out.append(f"tc qdisc add dev {ifname} clsact")
            out.append(
                f"tc filter replace dev {ifname} ingress pref {FILTER_PREF} handle "
                f"{FILTER_HANDLE} bpf direct-action fd <mirage_ingress> name {FILTER_NAME}"
            )
        out += self.routing.describe()
        return "\n".join(out) + "\n"


def _dns_plan(spec: CaptureSpec) -> tuple[list[str], list[str]]:
    """(cflags, description lines) for DNS hijack; empty when off."""
    dns = spec.dns
    if dns is None:
        return [], []
    listen = dns.listen
    flags = [f"-DMIRAGE_DNS_PORT={dns.port}"]
    lines = []
    if dns.addr4 is not None:
        flags += ["-DMIRAGE_DNS4", f"-DMIRAGE_DNS4_ADDR={_word(dns.addr4.packed):#x}"]
        lines.append(f"udp/tcp port 53 (IPv4, any destination) -> DNS socket {listen}")
    if dns.addr6 is not None:
        flags.append("-DMIRAGE_DNS6")
        flags += [f"-DMIRAGE_DNS6_A{i}={w:#x}" for i, w in enumerate(_words(dns.addr6))]
        lines.append(f"udp/tcp port 53 (IPv6, any destination) -> DNS socket {listen}")
    return flags, lines


def plan(cfg: Config) -> Plan:
    """The eBPF capture for `cfg`, without touching the kernel.

    Raises CaptureError for what the program cannot express: no tproxy-port,
    routing-mark equal to the capture mark, DNS on a loopback address, more
    bypass entries than the trie holds.
    """
    spec = CaptureSpec.from_config(cfg, "eBPF")
    flags = [
        f"-I{BPF_DIR}",
        f"-DMIRAGE_CAPTURE_MARK={spec.capture_mark:#x}",
        f"-DMIRAGE_TPROXY_PORT={spec.tproxy_port}",
        f"-DMIRAGE_FAKE4_NET={_word(spec.fake4.network_address.packed):#x}",
        f"-DMIRAGE_FAKE4_MASK={_word(spec.fake4.netmask.packed):#x}",
        f"-DMIRAGE_CLIENTS_MAX={CLIENTS_MAX}",
        f"-DMIRAGE_BYPASS_MAX={BYPASS_MAX}",
    ]
    if spec.routing_mark is not None:
        flags.append(f"-DMIRAGE_ROUTING_MARK={spec.routing_mark:#x}")
    fake: list[IPNetwork] = [spec.fake4]
    # IPv6 is parsed while the gateway carries it, and for DNS hijack to
    # IPv6 resolvers whatever `ipv6` says.
    parse6 = spec.ipv6 or (spec.dns is not None and spec.dns.addr6 is not None)
    if parse6:
        flags.append("-DMIRAGE_IPV6")
    if spec.fake6 is not None:
        f6 = spec.fake6
        fake.append(f6)
        flags.append("-DMIRAGE_FAKE6")
        flags += [f"-DMIRAGE_FAKE6_A{i}={w:#x}" for i, w in enumerate(_words(f6.network_address))]
        flags += [f"-DMIRAGE_FAKE6_M{i}={w:#x}" for i, w in enumerate(_words(f6.netmask))]
    dns_flags, dns_lines = _dns_plan(spec)
    flags += dns_flags
    bypass: list[IPNetwork] = [*spec.bypass4]
    if parse6:
        bypass += spec.bypass6
    if len(bypass) > BYPASS_MAX:
        raise CaptureError(f"appliance.bypass: {len(bypass)} entries; the eBPF capture "
                           f"holds at most {BYPASS_MAX}")
    notes = []
    if not parse6 and any(isinstance(n, ipaddress.IPv6Network) for n in cfg.appliance.bypass):
        notes.append("IPv6 bypass entries are unused: ipv6 and IPv6 DNS hijack are off, "
                     "IPv6 passes untouched")
    return Plan(
        interfaces=spec.lan,
        cflags=tuple(flags),
        bypass=tuple(bypass),
        fake=tuple(fake),
        tproxy_port=spec.tproxy_port,
        dns=tuple(dns_lines),
        routing=PolicyRouting.from_config(cfg),
        notes=tuple(notes),
    )


def render_text(cfg: Config) -> str:
    """What `mirage rules -c FILE` prints for `redirect: ebpf`."""
    return plan(cfg).describe()
