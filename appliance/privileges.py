"""Keep only the capabilities `mirage run` still needs once it is set up,
and raise the open-file limit it runs with (`raise_descriptor_limit`).

What this is for: setup (binding port 53, loading nftables rules, compiling
and attaching the tc program, linking the sk_lookup program) needs more than
running does. Once every service is up and the capture is in place,
`drop_to_runtime` removes every other capability from the process's
effective, permitted, inheritable, ambient and bounding sets, so a bug in a
flow or a parser has nothing more to abuse, whether Mirage was started by
systemd (which already grants only the unit's set) or by root by hand.

Kept while running, and why (docs/operations.md lists them too):

- CAP_NET_ADMIN: SO_MARK (`routing-mark`) and IP_TRANSPARENT on every new
  outbound and UDP reply socket; DIRECT-offload map updates; WireGuard
  interfaces a reload adds; removing the nftables table, ip rules and tc
  filter at exit. The only one kept ambient, for wireguard-go (HELPER_SET).
- CAP_NET_BIND_SERVICE: UDP replies leave from a socket bound to the fake
  address *and port* the client used, which may be below 1024 (DNS over a
  fake IP, NTP, ...).
- CAP_NET_RAW: the transparent reply sockets (IP_TRANSPARENT accepts it
  where CAP_NET_ADMIN is not granted).
- CAP_BPF (eBPF backend only): the map reads and writes of a running
  program (per-client counters, the bypass map on reload) go through the
  bpf() syscall.

Dropped, among others: CAP_SYS_ADMIN and CAP_PERFMON (bcc's compile and
load only), CAP_DAC_OVERRIDE, CAP_SYS_PTRACE, CAP_SETUID/SETGID, CAP_SYS_MODULE.

Linux only, through libc's capset/prctl via ctypes (no dependency). How it
fails: `drop_to_runtime` raises PrivilegeError with the failing call; a
process that holds none of the capabilities (an unprivileged test) is left
as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import resource
from collections.abc import Iterable
from typing import Final

log = logging.getLogger(__name__)

# linux/capability.h
CAP_DAC_OVERRIDE: Final = 1
CAP_NET_BIND_SERVICE: Final = 10
CAP_NET_ADMIN: Final = 12
CAP_NET_RAW: Final = 13
CAP_SYS_ADMIN: Final = 21
CAP_PERFMON: Final = 38
CAP_BPF: Final = 39

NAMES: Final = {
    CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE",
    CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_NET_RAW: "CAP_NET_RAW",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_PERFMON: "CAP_PERFMON",
    CAP_BPF: "CAP_BPF",
}

_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
_PR_CAPBSET_READ: Final = 23
_PR_CAPBSET_DROP: Final = 24
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_RAISE: Final = 2
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4


class PrivilegeError(OSError):
    """A capability call failed; the message names it."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def runtime_set(ebpf: bool) -> frozenset[int]:
    """The capabilities `mirage run` keeps once set up (see the module doc)."""
    keep = {CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_NET_RAW}
    if ebpf:
        keep.add(CAP_BPF)
    return frozenset(keep)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"{what}: {os.strerror(err)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def current() -> dict[str, frozenset[int]]:
    """This process's effective, permitted and bounding sets."""
    libc = _libc()
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    _check(libc.capget(ctypes.byref(header), data), "capget")
    last = _last_cap()

    def bits(word0: int, word1: int) -> frozenset[int]:
        mask = word0 | word1 << 32
        return frozenset(c for c in range(last + 1) if mask >> c & 1)

    bounding = frozenset(c for c in range(last + 1)
                         if libc.prctl(_PR_CAPBSET_READ, c, 0, 0, 0) == 1)
    return {
        "effective": bits(data[0].effective, data[1].effective),
        "permitted": bits(data[0].permitted, data[1].permitted),
        "bounding": bounding,
    }


def drop_to(keep: Iterable[int], inherit: Iterable[int] = ()) -> frozenset[int]:
    """Keep only `keep` (where held): bounding set first (needs
    CAP_SETPCAP, which a root process holds until this call), then ambient,
    then effective/permitted/inheritable in one capset; then `inherit` (a
    part of `keep`) is raised as ambient, so that a helper Mirage starts
    later holds it too. Returns the set dropped from the permitted set."""
    keep = frozenset(keep)
    inherit = frozenset(inherit) & keep
    libc = _libc()
    before = current()
    last = _last_cap()
    for cap in range(last + 1):
        if cap in keep or cap not in before["bounding"]:
            continue
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            # EPERM: no CAP_SETPCAP (a systemd unit that bounds the set
            # already). The permitted set below is what counts: with it gone
            # and no execve of a privileged file (the unit has
            # NoNewPrivileges), a capability cannot come back.
            if ctypes.get_errno() != errno.EPERM:
                _check(-1, f"PR_CAPBSET_DROP {cap}")
            break
    # Ambient capabilities are inherited across execve: only `inherit`
    # stays, raised again below. EINVAL: kernel without them.
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    held = before["permitted"] & keep
    words, inheritable = [0, 0], [0, 0]
    for cap in held:
        words[cap // 32] |= 1 << (cap % 32)
        if cap in inherit:
            inheritable[cap // 32] |= 1 << (cap % 32)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)(_Data(words[0], words[0], inheritable[0]),
                       _Data(words[1], words[1], inheritable[1]))
    _check(libc.capset(ctypes.byref(header), data), "capset")
    for cap in sorted(held & inherit):
        if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
            log.warning("could not keep %s for helper processes: %s", NAMES.get(cap, cap),
                        os.strerror(ctypes.get_errno()))
    return before["permitted"] - keep


# What a helper process started after the drop needs: wireguard-go (where
# the kernel has no WireGuard, for an interface a reload or a provider adds)
# creates its TUN device and addresses with CAP_NET_ADMIN. Mirage holds it
# anyway, so the helper gains nothing Mirage itself lacks; as a non-root
# user (the systemd unit) it would otherwise start with no capability.
HELPER_SET: Final = frozenset({CAP_NET_ADMIN})


def drop_to_runtime(ebpf: bool) -> list[str]:
    """Drop everything `mirage run` no longer needs (HELPER_SET stays
    ambient for its helpers); the names dropped."""
    dropped = drop_to(runtime_set(ebpf), HELPER_SET)
    return sorted(NAMES.get(c, f"cap{c}") for c in dropped)


# Raise the soft descriptor limit at most this far (an unlimited hard limit
# does not make memory for a million flows).
MAX_DESCRIPTORS = 1 << 20


def raise_descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE after raising it to the hard limit (an
    operator's or systemd's LimitNOFILE), at most MAX_DESCRIPTORS; raising
    the soft limit up to the hard one needs no capability."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(hard, MAX_DESCRIPTORS)
    if soft == resource.RLIM_INFINITY:
        return MAX_DESCRIPTORS
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (OSError, ValueError) as err:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, want, err)
    return soft
