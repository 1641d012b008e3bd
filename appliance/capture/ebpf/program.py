"""bpf/mirage_tc.c compiled by bcc and loaded (not attached), with its maps.

What it owns: the bcc `BPF` object (both programs' fds, the maps) and, once
`link_sk_lookup` ran, the sk_lookup link's fd; `close()` releases all of
them. Raises CaptureError when bcc is missing or the kernel refuses the
program (the message says how to fix it, or to choose
`appliance.redirect: nftables`). Synchronous: bcc compiles for seconds.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import threading
from pathlib import Path
from typing import Any

from appliance.capture.ebpf.bpfsys import (
    BPF_PROG_TYPE_SK_LOOKUP,
    BPF_SK_LOOKUP,
    TestRun,
    link_to_netns,
    test_run,
)
from appliance.capture.ebpf.plan import (
    FUNCTION,
    SK_LOOKUP_FUNCTION,
    SOURCE,
    STAT_NAMES,
    Plan,
    TrieKey,
)
from appliance.capture.spec import CaptureError

log = logging.getLogger(__name__)

HEADERS_FIX = (
    "run scripts/setup.sh (it links Debian's linux-headers-amd64 in as the build "
    "directory), install the headers of the running kernel, or set "
    "appliance.redirect: nftables"
)


# bcc's compiler (LLVM/clang state inside libbcc) and its cleanup are not
# thread-safe, and the capture program and the kernel DNS answerer are built
# and released in worker threads that may overlap (a stop closes both at
# once): two at a time once crashed `mirage run` with SIGSEGV. Every BPF()
# and cleanup() of the package holds this lock.
BCC_LOCK = threading.Lock()


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
            with BCC_LOCK:
                self.bpf: Any = BPF(src_file=str(SOURCE).encode(), cflags=flags)
                self.fn: Any = self.bpf.load_func(FUNCTION.encode(), BPF.SCHED_CLS)
                self.lookup_fn: Any = self.bpf.load_func(SK_LOOKUP_FUNCTION.encode(),
                                                         BPF_PROG_TYPE_SK_LOOKUP,
                                                         attach_type=BPF_SK_LOOKUP)
        except Exception as exc:
            hint = "" if build.exists() else f" ({build} is missing: {HEADERS_FIX})"
            raise CaptureError(
                f"cannot compile/load {SOURCE.name}{hint}: {exc}; bcc printed the compiler or "
                "verifier log above; set appliance.redirect: nftables to run without eBPF"
            ) from None
        self.fd: int = int(self.fn.fd)
        self.link_fd: int | None = None
        try:
            self._fill_bypass(p.bypass_keys)
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
        self.link_fd = link_to_netns(int(self.lookup_fn.fd))

    def _fill_bypass(self, keys: list[TrieKey]) -> None:
        trie = self.bpf[b"mirage_bypass"]
        for plen, words in keys:
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
        return test_run(self.fd, packet, ifindex=ifindex, mark=mark, repeat=repeat)

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
        rows.sort(key=lambda r: -int(r["bytes"]))
        return rows

    def close(self) -> None:
        if self.link_fd is not None:
            os.close(self.link_fd)
            self.link_fd = None
        with BCC_LOCK:
            self.bpf.cleanup()
