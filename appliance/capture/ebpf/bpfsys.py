"""The bpf(2) commands bcc has no wrapper for, through ctypes.

- `test_run`: BPF_PROG_TEST_RUN of a SCHED_CLS program on one Ethernet frame
  (the tests and bench/capture.py run the tc program this way);
- `link_to_netns`: BPF_LINK_CREATE of an sk_lookup program on the calling
  thread's network namespace; the link is a file descriptor (closing it, or
  the process ending, detaches the program).

Each raises OSError (errno and the command's name) when the kernel refuses.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "mips": 4355}.get(os.uname().machine,
                                                                           321)

# --- BPF_PROG_TEST_RUN ----------------------------------------------------------

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


# --- BPF_LINK_CREATE for the sk_lookup program -------------------------------------

_BPF_LINK_CREATE = 28
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36  # enum bpf_attach_type


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


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(2) with `attr`; its result, or OSError naming `what`."""
    rc = int(_libc().syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def link_to_netns(prog_fd: int) -> int:
    """Attach an sk_lookup program to this thread's network namespace; the
    link's fd (closing it detaches)."""
    netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=netns, attach_type=BPF_SK_LOOKUP)
        return _bpf(_BPF_LINK_CREATE, attr, "BPF_LINK_CREATE (sk_lookup)")
    finally:
        os.close(netns)


@dataclass(frozen=True)
class TestRun:
    """One BPF_PROG_TEST_RUN: the verdict (TC_ACT_OK 0, TC_ACT_SHOT 2,
    TC_ACT_REDIRECT 7; TC_ACT_UNSPEC reads 0xffffffff), the mark the packet
    left with, the kernel's mean ns per run, and the packet as the program
    left it."""

    __test__ = False  # not a pytest class

    retval: int
    mark: int
    duration_ns: int
    data: bytes = b""


def test_run(prog_fd: int, packet: bytes, *, ifindex: int = 0, mark: int = 0,
             repeat: int = 1) -> TestRun:
    """Run the SCHED_CLS program `prog_fd` on `packet` (an Ethernet frame)
    in the calling thread's network namespace; `ifindex` is the ingress
    interface there. OSError when the kernel refuses (say, a frame shorter
    than Ethernet + IP header)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx_in = ctypes.create_string_buffer(_SKB_CTX)
    struct.pack_into("=I", ctx_in, _CTX_MARK, mark)
    struct.pack_into("=I", ctx_in, _CTX_INGRESS_IFINDEX, ifindex)
    struct.pack_into("=I", ctx_in, _CTX_IFINDEX, ifindex)
    ctx_out = ctypes.create_string_buffer(_SKB_CTX)
    attr = _TestRunAttr(
        prog_fd=prog_fd, data_size_in=len(packet), data_size_out=len(data_out),
        data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out),
        repeat=repeat, ctx_size_in=_SKB_CTX, ctx_size_out=_SKB_CTX,
        ctx_in=ctypes.addressof(ctx_in), ctx_out=ctypes.addressof(ctx_out),
    )
    _bpf(_BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return TestRun(int(attr.retval), int(struct.unpack_from("=I", ctx_out, _CTX_MARK)[0]),
                   int(attr.duration), data_out.raw[: attr.data_size_out])
