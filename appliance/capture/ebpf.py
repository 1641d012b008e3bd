"""The eBPF capture backend: bpf/mirage_tc.c on tc ingress of every LAN interface.

What it owns: the compiled program (a bcc `BPF` object: program fd and maps),
one tc filter per `appliance.lan` interface (clsact ingress, direct-action,
preference `FILTER_PREF`, handle `FILTER_HANDLE`, name `FILTER_NAME`), the
clsact qdisc on an interface only where Mirage created it (remembered in
`<state-dir>/ebpf-clsact.json` per network namespace, so a run after a
crash still knows), and, through `PolicyRouting`, the fwmark rule and local
route that deliver the assigned packets locally. It holds no nftables rule at all: the program does
what nft/mirage.nft's TPROXY rules do, with `bpf_sk_assign` (see the C file's
header comment for the verdicts).

The configuration reaches the C as `-D` defines (`plan(cfg).cflags`: fake
ranges, ports, marks, DNS listener) and one map written at load (the bypass
LPM trie); nothing is substituted into the source text.

Three layers, each usable alone:

- `plan(cfg)`: pure; what would be compiled and attached (`mirage rules`
  prints `plan.describe()`); refuses configs the program cannot express
  with `CaptureError`.
- `Program`: compile + load (bcc, SCHED_CLS) and the maps; `stats()` and
  `clients()` read the counters. The tests run it through BPF_PROG_TEST_RUN.
- `EbpfCapture`: routing + attach/detach on the interfaces; replaces a
  crashed run's filter (same preference) on start; removes exactly its own.
  Given the transparent TCP listener's fd it also links the file's
  `mirage_sk_lookup` program to the network namespace (BPF_SK_LOOKUP), so a
  SYN that meets a TIME-WAIT socket still reaches the listener (see the C
  source); the link is a file descriptor of ours: closing it, or the
  process ending, detaches it, so no crash leaves it behind.

Failures: bcc missing, kernel headers missing, a compile or verifier error,
an interface that is missing or not Ethernet, or a netlink refusal all raise
`CaptureError` whose message says how to fix it, or to choose
`appliance.redirect: nftables`. Synchronous (bcc and pyroute2 block): call at
setup and teardown, or through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import logging
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.capture.nftables import (
    ALWAYS_BYPASS4,
    ALWAYS_BYPASS6,
    DEFAULT_TABLE,
    CaptureError,
    apply_routing,
    check_capturable,
    delete_table,
)
from appliance.capture.routing import PolicyRouting
from appliance.config.model import Config, IPNetwork

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
SOURCE = BPF_DIR / "mirage_tc.c"
FUNCTION = "mirage_ingress"
SK_LOOKUP_FUNCTION = "mirage_sk_lookup"

# How Mirage recognises its own filter (also one a crashed run left): kind
# bpf at this preference on clsact ingress. 0x4d47 ("MG") is far from the
# small preferences tc and other tools pick by default.
FILTER_PREF = 0x4D47
FILTER_HANDLE = 1
FILTER_NAME = "mirage_tc:mirage_ingress"
CLSACT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
CLSACT_EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
QDISC_MARKER = "ebpf-clsact.json"

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
)

HEADERS_FIX = (
    "run scripts/setup.sh (it links Debian's linux-headers-amd64 in as the build "
    "directory), install the headers of the running kernel, or set "
    "appliance.redirect: nftables"
)


def _word(b: bytes) -> int:
    """Four network-order bytes as the integer the program reads natively."""
    return int.from_bytes(b, sys.byteorder)


def _words(addr: ipaddress.IPv6Address | ipaddress.IPv4Address) -> tuple[int, ...]:
    p = addr.packed
    return tuple(_word(p[i : i + 4]) for i in range(0, len(p), 4))


def _mapped(net: IPNetwork) -> tuple[int, tuple[int, ...]]:
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


def _dns_plan(cfg: Config) -> tuple[list[str], list[str]]:
    """(cflags, description lines) for DNS hijack; empty when off."""
    if not (cfg.appliance.dns_hijack and cfg.dns.enable):
        return [], []
    listen = cfg.dns.listen
    addr = ipaddress.ip_address(listen.host)
    if addr.is_loopback:
        raise CaptureError(
            f"dns.listen {listen}: a loopback address cannot receive hijacked LAN queries; "
            "listen on 0.0.0.0 (or a LAN address) or turn appliance.dns-hijack off"
        )
    flags = [f"-DMIRAGE_DNS_PORT={listen.port}"]
    lines = []
    v4: ipaddress.IPv4Address | None = None
    v6: ipaddress.IPv6Address | None = None
    if isinstance(addr, ipaddress.IPv4Address):
        v4 = addr
    elif addr.is_unspecified:
        # "::" is dual-stack (the DNS server clears IPV6_V6ONLY): IPv4 queries
        # find it through the IPv4 wildcard.
        v4, v6 = ipaddress.IPv4Address(0), addr
    else:
        v6 = addr
    if v4 is not None:
        flags += ["-DMIRAGE_DNS4", f"-DMIRAGE_DNS4_ADDR={_word(v4.packed):#x}"]
        lines.append(f"udp/tcp port 53 (IPv4, any destination) -> DNS socket {listen}")
    if v6 is not None and cfg.ipv6:
        flags.append("-DMIRAGE_DNS6")
        flags += [f"-DMIRAGE_DNS6_A{i}={w:#x}" for i, w in enumerate(_words(v6))]
        lines.append(f"udp/tcp port 53 (IPv6, any destination) -> DNS socket {listen}")
    return flags, lines


def plan(cfg: Config) -> Plan:
    """The eBPF capture for `cfg`, without touching the kernel.

    Raises CaptureError for what the program cannot express: no tproxy-port,
    routing-mark equal to the capture mark, DNS on a loopback address.
    """
    tproxy_port = check_capturable(cfg, "eBPF")
    a = cfg.appliance
    fake4 = cfg.dns.fake_ip_range
    flags = [
        f"-I{BPF_DIR}",
        f"-DMIRAGE_CAPTURE_MARK={a.capture_mark:#x}",
        f"-DMIRAGE_TPROXY_PORT={tproxy_port}",
        f"-DMIRAGE_FAKE4_NET={_word(fake4.network_address.packed):#x}",
        f"-DMIRAGE_FAKE4_MASK={_word(fake4.netmask.packed):#x}",
        f"-DMIRAGE_CLIENTS_MAX={CLIENTS_MAX}",
        f"-DMIRAGE_BYPASS_MAX={BYPASS_MAX}",
    ]
    if cfg.routing_mark is not None:
        flags.append(f"-DMIRAGE_ROUTING_MARK={cfg.routing_mark:#x}")
    fake: list[IPNetwork] = [fake4]
    if cfg.ipv6:
        flags.append("-DMIRAGE_IPV6")
        f6 = cfg.dns.fake_ip_range6
        if f6 is not None:
            fake.append(f6)
            flags.append("-DMIRAGE_FAKE6")
            flags += [f"-DMIRAGE_FAKE6_A{i}={w:#x}" for i, w in
                      enumerate(_words(f6.network_address))]
            flags += [f"-DMIRAGE_FAKE6_M{i}={w:#x}" for i, w in enumerate(_words(f6.netmask))]
    dns_flags, dns_lines = _dns_plan(cfg)
    flags += dns_flags
    bypass: list[IPNetwork] = [*ALWAYS_BYPASS4]
    if cfg.ipv6:
        bypass += ALWAYS_BYPASS6
    bypass += [n for n in a.bypass if cfg.ipv6 or isinstance(n, ipaddress.IPv4Network)]
    if len(bypass) > BYPASS_MAX:
        raise CaptureError(f"appliance.bypass: {len(bypass)} entries; the eBPF capture "
                           f"holds at most {BYPASS_MAX}")
    notes = []
    if not cfg.ipv6 and any(isinstance(n, ipaddress.IPv6Network) for n in a.bypass):
        notes.append("IPv6 bypass entries are unused: ipv6 is off, IPv6 passes untouched")
    return Plan(
        interfaces=tuple(a.lan),
        cflags=tuple(flags),
        bypass=tuple(bypass),
        fake=tuple(fake),
        tproxy_port=tproxy_port,
        dns=tuple(dns_lines),
        routing=PolicyRouting.from_config(cfg),
        notes=tuple(notes),
    )


def render_text(cfg: Config) -> str:
    """What `mirage rules -c FILE` prints for `redirect: ebpf`."""
    return plan(cfg).describe()


# --- the program ------------------------------------------------------------


# --- BPF_PROG_TEST_RUN (bpf(2) through ctypes: bcc has no wrapper for it) ---

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "mips": 4355}.get(os.uname().machine,
                                                                           321)
_BPF_PROG_TEST_RUN = 10
_SKB_CTX = 192  # sizeof(struct __sk_buff)
_CTX_MARK, _CTX_INGRESS_IFINDEX, _CTX_IFINDEX = 8, 36, 40


class _TestRunAttr(ctypes.Structure):
    # union bpf_attr, the BPF_PROG_TEST_RUN member.
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(2) with `attr`; its result, or OSError naming `what`."""
    rc = int(_libc().syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


# --- BPF_LINK_CREATE for the sk_lookup program (bcc has no wrapper either) ----

_BPF_LINK_CREATE = 28
_BPF_PROG_TYPE_SK_LOOKUP = 30
_BPF_SK_LOOKUP = 36  # enum bpf_attach_type


class _LinkCreateAttr(ctypes.Structure):
    # union bpf_attr, the link_create member, zero-padded: the kernel wants
    # every byte it does not use to be zero.
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("_rest", ctypes.c_uint64 * 8),
    ]


def _link_to_netns(prog_fd: int) -> int:
    """Attach an sk_lookup program to this thread's network namespace; the
    link's fd (closing it detaches)."""
    netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=netns, attach_type=_BPF_SK_LOOKUP)
        return _bpf(_BPF_LINK_CREATE, attr, "BPF_LINK_CREATE (sk_lookup)")
    finally:
        os.close(netns)


@dataclass(frozen=True)
class TestRun:
    """One BPF_PROG_TEST_RUN: the verdict (TC_ACT_OK 0, TC_ACT_SHOT 2), the
    mark the packet left with, and the kernel's mean ns per run."""

    __test__ = False  # not a pytest class

    retval: int
    mark: int
    duration_ns: int


def _kernel_build_dir() -> Path:
    return Path("/lib/modules") / os.uname().release / "build"


class Program:
    """bpf/mirage_tc.c compiled and loaded (not attached), with its maps.

    `testing=True` builds the BPF_PROG_TEST_RUN variant (MIRAGE_TEST_ASSIGN:
    the socket the program would assign is recorded in `mirage_probe`
    instead, since bpf_sk_assign only works at real tc ingress). Raises
    CaptureError when bcc is missing or the kernel refuses the program.
    Close with `close()`.
    """

    def __init__(self, p: Plan, *, testing: bool = False) -> None:
        try:
            from bcc import BPF
        except ImportError as exc:
            raise CaptureError(
                f"the eBPF capture needs bcc ({exc}): apt-get install python3-bpfcc "
                "(and make the virtualenv with --system-site-packages), or set "
                "appliance.redirect: nftables"
            ) from None
        build = _kernel_build_dir()
        if not build.exists():
            log.warning("ebpf: %s is missing, bcc may not compile bpf/mirage_tc.c; fix: %s",
                        build, HEADERS_FIX)
        flags = [*p.cflags, *(["-DMIRAGE_TEST_ASSIGN"] if testing else [])]
        try:
            self.bpf = BPF(src_file=str(SOURCE).encode(), cflags=flags)
            self.fn = self.bpf.load_func(FUNCTION.encode(), BPF.SCHED_CLS)
            self.lookup_fn = self.bpf.load_func(SK_LOOKUP_FUNCTION.encode(),
                                                _BPF_PROG_TYPE_SK_LOOKUP,
                                                attach_type=_BPF_SK_LOOKUP)
        except Exception as exc:
            hint = "" if build.exists() else f" ({build} is missing: {HEADERS_FIX})"
            raise CaptureError(
                f"cannot compile/load {SOURCE.name}{hint}: {exc}; bcc printed the compiler or "
                "verifier log above; set appliance.redirect: nftables to run without eBPF"
            ) from None
        self.fd: int = self.fn.fd
        self.link_fd: int | None = None
        try:
            self._fill_bypass(p.bypass)
        except BaseException:
            self.close()
            raise

    def link_sk_lookup(self, listener_fd: int) -> None:
        """Put the transparent TCP listener in `mirage_listener` and link
        `mirage_sk_lookup` to this network namespace. OSError if the kernel
        refuses (the socket is not a listener, no sk_lookup support)."""
        # bcc's Table has no sockmap type: the map's fd and libbcc's update.
        from bcc.libbcc import lib

        map_fd = lib.bpf_table_fd(self.bpf.module, b"mirage_listener")
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(listener_fd)
        if map_fd < 0 or lib.bpf_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value),
                                             0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mirage_listener: cannot add the listener: {os.strerror(err)}")
        self.link_fd = _link_to_netns(self.lookup_fn.fd)

    def _fill_bypass(self, nets: tuple[IPNetwork, ...]) -> None:
        trie = self.bpf[b"mirage_bypass"]
        for net in nets:
            plen, words = _mapped(net)
            key = trie.Key()
            key.prefixlen = plen
            for i, w in enumerate(words):
                key.addr[i] = w
            trie[key] = ctypes.c_uint8(1)

    def test_run(self, packet: bytes, *, ifindex: int = 0, mark: int = 0,
                 repeat: int = 1) -> TestRun:
        """Run the program on `packet` (an Ethernet frame) through
        BPF_PROG_TEST_RUN, in the calling thread's network namespace (socket
        lookups happen there). `ifindex` is the ingress interface there.
        Raises OSError when the kernel refuses (say, a frame shorter than
        Ethernet + IP header)."""
        data_in = ctypes.create_string_buffer(packet, len(packet))
        data_out = ctypes.create_string_buffer(len(packet) + 256)
        ctx_in = ctypes.create_string_buffer(_SKB_CTX)
        struct.pack_into("=I", ctx_in, _CTX_MARK, mark)
        struct.pack_into("=I", ctx_in, _CTX_INGRESS_IFINDEX, ifindex)
        struct.pack_into("=I", ctx_in, _CTX_IFINDEX, ifindex)
        ctx_out = ctypes.create_string_buffer(_SKB_CTX)
        attr = _TestRunAttr(
            prog_fd=self.fd, data_size_in=len(packet), data_size_out=len(data_out),
            data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out),
            repeat=repeat, ctx_size_in=_SKB_CTX, ctx_size_out=_SKB_CTX,
            ctx_in=ctypes.addressof(ctx_in), ctx_out=ctypes.addressof(ctx_out),
        )
        _bpf(_BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
        return TestRun(attr.retval, struct.unpack_from("=I", ctx_out, _CTX_MARK)[0],
                       attr.duration)

    def table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def stats(self) -> dict[str, int]:
        """Totals of the program's counters (summed over CPUs), by name."""
        per_cpu = self.bpf[b"mirage_stats"].getvalue(0)
        return {name: int(sum(c.v[i] for c in per_cpu)) for i, name in enumerate(STAT_NAMES)}

    def clients(self) -> list[dict[str, Any]]:
        """Per-client counters (LAN -> gateway), busiest first."""
        rows = []
        for key, values in self.bpf[b"mirage_clients"].items():
            raw = bytes(bytearray(key.addr))
            ip6 = ipaddress.IPv6Address(raw)
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ip6.ipv4_mapped or ip6
            rows.append({
                "address": str(ip),
                "packets": sum(v.packets for v in values),
                "bytes": sum(v.bytes for v in values),
                "captured_packets": sum(v.captured_packets for v in values),
                "captured_bytes": sum(v.captured_bytes for v in values),
            })
        rows.sort(key=lambda r: -r["bytes"])
        return rows

    def close(self) -> None:
        if self.link_fd is not None:
            os.close(self.link_fd)
            self.link_fd = None
        self.bpf.cleanup()


# --- attaching -----------------------------------------------------------------


def _is_ours(f: Any) -> bool:
    return bool(f.get_attr("TCA_KIND") == "bpf" and (f.get("info", 0) >> 16) == FILTER_PREF)


def _filters(ipr: IPRoute, idx: int, parent: int) -> list[Any]:
    return list(ipr.get_filters(idx, parent=parent))


def _has_clsact(ipr: IPRoute, idx: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(idx))


def _netns_key() -> str:
    # Several runs (lab namespaces) may share a state dir: the marker keeps
    # each namespace's interfaces apart, keyed by the namespace's inode.
    return str(os.stat("/proc/thread-self/ns/net").st_ino)


def _read_marker(marker: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(marker.read_text())
        return {str(k): [str(n) for n in v] for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _read_created(marker: Path) -> set[str]:
    """Interfaces of this namespace whose clsact qdisc Mirage created (also
    in a crashed run)."""
    return set(_read_marker(marker).get(_netns_key(), []))


def _save_created(marker: Path, names: set[str]) -> None:
    data = _read_marker(marker)
    data.pop(_netns_key(), None)
    if names:
        data[_netns_key()] = sorted(names)
    try:
        if data:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(data) + "\n")
        else:
            marker.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("ebpf: cannot record the clsact qdiscs Mirage created in %s: %s",
                    marker, exc)


def _delete_filter(ipr: IPRoute, idx: int) -> bool:
    """Delete Mirage's filter preference on `idx`'s clsact ingress; False if
    there was none."""
    try:
        ipr.tc("del-filter", "bpf", idx, parent=CLSACT_INGRESS, prio=FILTER_PREF,
               protocol=ETH_P_ALL)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EINVAL):
            return False
        raise
    return True


class EbpfCapture:
    """Applies and removes the eBPF capture (program on tc + policy routing).

    `apply` compiles and loads the program, writes its maps, applies the
    policy routing, then attaches to each LAN interface (replacing a leftover
    filter of a crashed run); on any failure it undoes what it did and raises
    CaptureError. `remove` detaches exactly its filters, deletes the clsact
    qdiscs it created (only while empty), removes the routing, and is safe to
    call twice.
    """

    def __init__(self, cfg: Config, *, table: str = DEFAULT_TABLE,
                 tcp_listener: int | None = None) -> None:
        self.cfg = cfg
        self.tcp_listener = tcp_listener  # fd of the transparent TCP listener
        self.plan = plan(cfg)
        self.routing = self.plan.routing
        self.nft_table = table
        self.program: Program | None = None
        self.attached: list[str] = []
        self._marker = cfg.appliance.state_dir / QDISC_MARKER

    # -- counters (control API, metrics) ----------------------------------------

    def stats(self) -> dict[str, int]:
        return self.program.stats() if self.program is not None else {}

    def clients(self) -> list[dict[str, Any]]:
        return self.program.clients() if self.program is not None else []

    # -- lifecycle ------------------------------------------------------------------

    def apply(self) -> None:
        ifaces = self._interfaces()
        self.program = Program(self.plan)
        try:
            if self.tcp_listener is not None:
                try:
                    self.program.link_sk_lookup(self.tcp_listener)
                except OSError as exc:
                    raise CaptureError(f"sk_lookup program: {exc}") from exc
            _remove_nft_leftover(self.nft_table)
            apply_routing(self.routing)
            self._attach(ifaces)
        except BaseException:
            self.remove()
            raise
        log.info("capture: eBPF tc ingress on %s (pref %#x), fwmark %#x -> table %d, "
                 "%sno nftables rules", ", ".join(self.attached), FILTER_PREF,
                 self.cfg.appliance.capture_mark, self.routing.table,
                 "sk_lookup for the TCP listener, " if self.tcp_listener is not None else "")

    def _interfaces(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with IPRoute() as ipr:
            for name in self.plan.interfaces:
                links = ipr.get_links(ifname=name)
                if not links:
                    raise CaptureError(f"appliance.lan: no interface {name!r} here")
                link = links[0]
                if link.get("ifi_type") != ARPHRD_ETHER:
                    raise CaptureError(
                        f"appliance.lan: {name} is not an Ethernet interface (link type "
                        f"{link.get('ifi_type')}); the eBPF capture parses Ethernet frames: "
                        "set appliance.redirect: nftables"
                    )
                out[name] = link["index"]
        return out

    def _attach(self, ifaces: dict[str, int]) -> None:
        assert self.program is not None
        created = _read_created(self._marker)
        with IPRoute() as ipr:
            for name, idx in ifaces.items():
                try:
                    if not _has_clsact(ipr, idx):
                        ipr.tc("add", "clsact", idx)
                        created.add(name)
                        _save_created(self._marker, created)
                    if _delete_filter(ipr, idx):
                        log.info("ebpf: replaced a leftover Mirage filter on %s", name)
                    ipr.tc("add-filter", "bpf", idx, FILTER_HANDLE, fd=self.program.fd,
                           name=FILTER_NAME, parent=CLSACT_INGRESS, classid=1,
                           direct_action=True, prio=FILTER_PREF, protocol=ETH_P_ALL)
                except NetlinkError as exc:
                    raise CaptureError(f"tc on {name}: {exc}") from exc
                self.attached.append(name)

    def remove(self) -> None:
        try:
            _detach(self.plan.interfaces, self._marker)
        finally:
            self.attached.clear()
            self.routing.remove()
            if self.program is not None:
                self.program.close()
                self.program = None
        log.info("capture: eBPF filters and policy routing removed")


def _detach(interfaces: tuple[str, ...], marker: Path) -> None:
    """Delete Mirage's filter from each interface, and the clsact qdisc where
    Mirage created it (per `marker`) and nothing else uses it. Logs and goes
    on where the kernel refuses."""
    created = _read_created(marker)
    try:
        with IPRoute() as ipr:
            for name in interfaces:
                idxs = ipr.link_lookup(ifname=name)
                if not idxs:
                    created.discard(name)
                    continue
                idx = idxs[0]
                try:
                    _delete_filter(ipr, idx)
                    if name in created and _has_clsact(ipr, idx):
                        rest = _filters(ipr, idx, CLSACT_INGRESS) + \
                            _filters(ipr, idx, CLSACT_EGRESS)
                        if rest:
                            log.info("ebpf: keeping the clsact qdisc on %s: %d other "
                                     "filter(s) use it", name, len(rest))
                        else:
                            ipr.tc("del", "clsact", idx)
                    created.discard(name)
                except NetlinkError as exc:
                    log.warning("ebpf: detaching from %s failed: %s", name, exc)
    finally:
        _save_created(marker, created)


def _remove_nft_leftover(table: str) -> None:
    """A crashed `redirect: nftables` run may have left its table (TPROXY
    rules that would capture alongside the program): delete it. Best effort:
    without nftables bindings there is nothing nft could have left."""
    try:
        delete_table(table)
    except ImportError:
        return
    except CaptureError as exc:
        log.warning("ebpf: could not remove a leftover nftables table %s: %s", table, exc)


def remove_leftovers(cfg: Config) -> None:
    """Detach a crashed eBPF run's filters (and the clsact it created) from
    the LAN interfaces, without compiling anything: the nftables backend
    calls this so the two never capture side by side. Best effort."""
    lan = tuple(cfg.appliance.lan)
    try:
        with IPRoute() as ipr:
            found = [n for n in lan for idx in ipr.link_lookup(ifname=n)[:1]
                     if any(_is_ours(f) for f in _filters(ipr, idx, CLSACT_INGRESS))]
    except (OSError, NetlinkError) as exc:
        log.debug("ebpf: leftover check failed: %s", exc)
        return
    if found:
        log.info("ebpf: removing a leftover Mirage tc filter from %s", ", ".join(found))
        _detach(lan, cfg.appliance.state_dir / QDISC_MARKER)
