"""Kernel DNS answers: bpf/mirage_dns.c loaded, its name map, and the pool's mirror.

What it is for: LAN devices ask for the same names again and again (TTL 1).
`KernelAnswers` compiles bpf/mirage_dns.c with bcc, keeps its `mirage_names`
map equal to the part of the fake-IP pool that the DNS handler answers from
the pool, and attaches the program on tc ingress of the LAN interfaces at
`ANSWER_PREF`, one preference before the eBPF capture's filter (with the
nftables backend it is the only filter there). A query for a name in the map
is answered in the kernel; anything else goes on untouched (see the C file).

Consistency (docs/architecture.md, "Kernel DNS answers"): the pool is the
map's only writer and calls `bound` after a mapping exists and `unbound`
before its address can go to another name (pool.py `_unbind`, which every
recycle, drop and reload filter goes through); entries are written only for
names `eligible` says the handler answers from the pool (not hosts, not the
canary, AAAA only with IPv6 fake IPs), and `resync` rewrites the whole map
after a reload changed that. The kernel stamps `last_hit`; the pool asks
`hit_since_check` for an LRU victim before recycling it (once per recycle,
never per query).

Owns: the bcc BPF object (program fd, maps) and the tc filters it attached;
`close()` detaches and releases all. Failures: CaptureError (bcc missing,
compile/verifier error, netlink refusal); map writes that the kernel refuses
(map full) are counted and logged, never raised into the DNS path: a name
missing from the map is answered by userspace, which is always correct.
Synchronous; not thread-safe (the pool calls it from the trio thread).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from appliance.capture.ebpf import tc
from appliance.capture.ebpf.bpfsys import TestRun, test_run
from appliance.capture.ebpf.plan import (
    BPF_DIR,
    BYPASS_MAX,
    CLIENTS_MAX,
    FILTER_PREF,
    _word,
    _words,
    trie_key,
)
from appliance.capture.ebpf.program import BCC_LOCK, HEADERS_FIX, _kernel_build_dir
from appliance.capture.spec import CaptureError, CaptureSpec
from appliance.config.model import FAKE_IP_TTL, Config, IPNetwork

log = logging.getLogger(__name__)

DNS_SOURCE = BPF_DIR / "mirage_dns.c"
DNS_FUNCTION = "mirage_dns_answer"
# Runs before the capture filter (lower preference first); it returns
# TC_ACT_UNSPEC for everything it does not answer, so the capture (or the
# stack) sees those packets as if it were not there.
ANSWER_PREF = FILTER_PREF - 1
ANSWER_HANDLE = 1
ANSWER_NAME = "mirage_dns:mirage_dns_answer"
# Bytes of the wire-format name in the map's key (bpf/mirage_dns.c
# MIRAGE_KDNS_NAME): names up to 125 characters; longer ones go to userspace.
NAME_MAX = 126
DEFAULT_ENTRIES = 1 << 17
TYPE_A, TYPE_AAAA = 1, 28

# Must list bpf/lib/dns_stats.h's enum in order (tests check).
DNS_STAT_NAMES = (
    "answered",
    "miss",
    "no_socket",
    "not_query",
    "name",
    "long_name",
    "qtype",
    "edns",
    "do",
    "shape",
    "transport",
    "resize",
)

_HOST_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")

Eligible = Callable[[str, int], bool]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def name_key(name: str) -> bytes | None:
    """The wire form of a normalised name as the program keys it (lower
    case, zero-padded to NAME_MAX), or None when it cannot be a key: too
    long, or a label outside host-name bytes (such names never get fake IPs,
    and their text would not map back to one wire form)."""
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("ascii", "replace")
        if not 1 <= len(raw) <= 63 or not _HOST_BYTES.issuperset(raw):
            return None
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > NAME_MAX:
        return None
    return bytes(out) + b"\0" * (NAME_MAX - len(out))


def answer_cflags(cfg: Config, *, entries: int = DEFAULT_ENTRIES) -> list[str]:
    """-D flags of bpf/mirage_dns.c for `cfg` (the DNS listener, hijack,
    IPv6, sizes). CaptureError where the config has no DNS service to
    answer for."""
    spec = CaptureSpec.from_config(cfg, "kernel DNS answers")
    dns = spec.dns
    if dns is None:
        # Without hijack the listener is still reachable on the gateway's
        # addresses: answer those, at the listener's port.
        from appliance.capture.spec import dns_bind

        listen = dns_bind(cfg)
        port = listen.port
        addr = ipaddress.ip_address(listen.host)
        addr4 = addr if addr.version == 4 else (ipaddress.IPv4Address(0) if
                                                 addr == ipaddress.IPv6Address(0) else None)
        addr6 = addr if addr.version == 6 else None
        hijack = False
    else:
        port, addr4, addr6, hijack = dns.port, dns.addr4, dns.addr6, True
    flags = [
        f"-I{BPF_DIR}",
        f"-DMIRAGE_DNS_PORT={port}",
        f"-DMIRAGE_KDNS_ENTRIES={entries}",
        f"-DMIRAGE_KDNS_NAME={NAME_MAX}",
        f"-DMIRAGE_KDNS_TTL={FAKE_IP_TTL}",
        f"-DMIRAGE_CLIENTS_MAX={CLIENTS_MAX}",
        f"-DMIRAGE_BYPASS_MAX={BYPASS_MAX}",
    ]
    if hijack:
        flags.append("-DMIRAGE_KDNS_HIJACK")
    if addr4 is not None:
        flags += ["-DMIRAGE_DNS4", f"-DMIRAGE_DNS4_ADDR={_word(addr4.packed):#x}"]
    if addr6 is not None:
        flags += ["-DMIRAGE_IPV6", "-DMIRAGE_DNS6"]
        flags += [f"-DMIRAGE_DNS6_A{i}={w:#x}" for i, w in enumerate(_words(addr6))]
    if addr4 is None and addr6 is None:
        raise CaptureError("dns.listen: kernel DNS answers need the DNS listener's address")
    return flags


def _bypass(cfg: Config) -> list[IPNetwork]:
    spec = CaptureSpec.from_config(cfg, "kernel DNS answers")
    return [*spec.bypass4, *spec.bypass6]


class KernelAnswers:
    """bpf/mirage_dns.c loaded, its maps, and the fake-IP pool's mirror.

    `eligible(name, family)`: does the DNS handler answer this name's A
    (family 4) / AAAA (6) from the pool? Only those are written. Close with
    `close()` (detaches too).
    """

    def __init__(self, cfg: Config, eligible: Eligible, *, entries: int = DEFAULT_ENTRIES,
                 marker: Path | None = None) -> None:
        try:
            from bcc import BPF
        except ImportError as exc:
            raise CaptureError(
                f"kernel DNS answers need bcc ({exc}): apt-get install python3-bpfcc, or set "
                "dns.kernel-answers: false"
            ) from None
        self.cfg = cfg
        self.eligible = eligible
        self.entries = entries
        self._marker = marker or cfg.appliance.state_dir / tc.QDISC_MARKER
        flags = answer_cflags(cfg, entries=entries)
        build = _kernel_build_dir()
        try:
            with BCC_LOCK:
                self.bpf: Any = BPF(src_file=str(DNS_SOURCE).encode(), cflags=flags)
                self.fn: Any = self.bpf.load_func(DNS_FUNCTION.encode(), BPF.SCHED_CLS)
        except Exception as exc:
            hint = "" if build.exists() else f" ({build} is missing: {HEADERS_FIX})"
            raise CaptureError(
                f"cannot compile/load {DNS_SOURCE.name}{hint}: {exc}; set "
                "dns.kernel-answers: false to answer every query in userspace"
            ) from None
        self.fd = int(self.fn.fd)
        self._names = self.bpf[b"mirage_names"]
        # (family, name) -> the last_hit stamp the pool has already seen.
        self._seen: dict[tuple[int, str], int] = {}
        self.attached: list[str] = []
        self.written = 0
        self.deleted = 0
        self.write_failures = 0
        trie = self.bpf[b"mirage_dns_bypass"]
        for plen, words in (trie_key(n) for n in _bypass(cfg)):
            k = trie.Key()
            k.prefixlen = plen
            for i, w in enumerate(words):
                k.addr[i] = w
            trie[k] = ctypes.c_uint8(1)

    # -- the pool's mirror ------------------------------------------------------

    def _key(self, family: int, name: str) -> Any | None:
        raw = name_key(name)
        if raw is None:
            return None
        k = self._names.Key()
        k.qtype = TYPE_A if family == 4 else TYPE_AAAA
        ctypes.memmove(ctypes.addressof(k.name), raw, NAME_MAX)
        return k

    def bound(self, family: int, name: str, ip: IPAddress) -> None:
        """`name` now maps to `ip` in the pool: answer it here if eligible."""
        if not self.eligible(name, family):
            return
        k = self._key(family, name)
        if k is None:
            return
        v = self._names.Leaf()
        ctypes.memmove(ctypes.addressof(v.addr), ip.packed, len(ip.packed))
        v.last_hit = 0
        try:
            self._names[k] = v
        except Exception as exc:
            self.write_failures += 1
            if self.write_failures == 1 or self.write_failures % 1000 == 0:
                log.warning("kernel DNS answers: cannot add %s (%s); userspace answers it "
                            "(%d such)", name, exc, self.write_failures)
            return
        self._seen[(family, name)] = 0
        self.written += 1

    def unbound(self, family: int, name: str) -> None:
        """`name` no longer maps to its address: stop answering it, now."""
        self._seen.pop((family, name), None)
        k = self._key(family, name)
        if k is None:
            return
        try:
            del self._names[k]
        except KeyError:
            return
        self.deleted += 1

    def hit_since_check(self, family: int, name: str) -> bool:
        """Was `name` answered in the kernel since the last time this was
        asked (or since it was written)? One map lookup."""
        seen = self._seen.get((family, name))
        if seen is None:
            return False
        k = self._key(family, name)
        if k is None:
            return False
        try:
            hit = int(self._names[k].last_hit)
        except KeyError:
            return False
        if hit == seen:
            return False
        self._seen[(family, name)] = hit
        return True

    def resync(self, mappings: Iterable[tuple[str, IPAddress, int]]) -> None:
        """Make the map exactly the eligible part of `mappings` (the pool's
        (name, ip, family) rows): after a reload changed what is eligible."""
        self._names.clear()
        self._seen.clear()
        for name, ip, family in mappings:
            self.bound(family, name, ip)

    def __len__(self) -> int:
        return len(self._seen)

    # -- attach / detach --------------------------------------------------------

    def attach(self, lan: tuple[str, ...]) -> None:
        """Attach to each LAN interface's clsact ingress at ANSWER_PREF.
        CaptureError on refusal (what was attached is detached again)."""
        try:
            tc.attach(self.fd, tc.interfaces(lan), self._marker, self.attached,
                      pref=ANSWER_PREF, name=ANSWER_NAME)
        except BaseException:
            self.detach()
            raise
        log.info("kernel DNS answers: tc ingress on %s (pref %#x)", ", ".join(self.attached),
                 ANSWER_PREF)

    def detach(self) -> None:
        tc.detach(tuple(self.cfg.appliance.lan), self._marker, pref=ANSWER_PREF)
        self.attached.clear()

    def close(self) -> None:
        """Detach, then release the program and maps (idempotent)."""
        try:
            self.detach()
        finally:
            if self.bpf is not None:
                with BCC_LOCK:
                    self.bpf.cleanup()
                self.bpf = None

    # -- counters ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Totals of the program's counters (summed over CPUs), by name, plus
        the map's size and the writes that failed."""
        per_cpu = self.bpf[b"mirage_dns_stats"].getvalue(0)
        out = {name: int(sum(c.v[i] for c in per_cpu)) for i, name in enumerate(DNS_STAT_NAMES)}
        out["entries"] = len(self._seen)
        out["write_failures"] = self.write_failures
        return out

    def clients(self) -> list[dict[str, Any]]:
        """Queries answered in the kernel per client address, busiest first:
        rows of {"address", "answered"}."""
        rows: list[dict[str, Any]] = []
        for key, values in self.bpf[b"mirage_dns_clients"].items():
            ip6 = ipaddress.IPv6Address(bytes(bytearray(key.addr)))
            ip: IPAddress = ip6.ipv4_mapped or ip6
            rows.append({"address": str(ip),
                         "answered": int(sum(getattr(v, "value", v) for v in values))})
        rows.sort(key=lambda r: -int(r["answered"]))
        return rows

    def test_run(self, packet: bytes, *, ifindex: int = 0, repeat: int = 1) -> TestRun:
        """BPF_PROG_TEST_RUN on one Ethernet frame, in this thread's netns."""
        return test_run(self.fd, packet, ifindex=ifindex, repeat=repeat)
