"""The eBPF capture backend: bpf/mirage_tc.c on tc ingress of every LAN interface.

It holds no nftables rule: the program does what nft/mirage.nft's TPROXY
rules do, with `bpf_sk_assign` (see the C file's header comment for the
verdicts). The configuration reaches the C as `-D` defines and maps written
at load (the bypass LPM trie); nothing is substituted into the source text.

One module per layer, each usable alone:

- `plan`: pure; config -> compile flags, map contents, interfaces, and
  the text `mirage rules` prints; refuses what the program cannot express.
- `program`: bcc compile + load (SCHED_CLS and SK_LOOKUP) and the maps;
  `stats()` and `clients()` read the counters.
- `bpfsys`: the bpf(2) commands bcc lacks, through ctypes (BPF_PROG_TEST_RUN
  for the tests, BPF_LINK_CREATE for the sk_lookup link).
- `tc`: attach/detach with pyroute2, and the marker of the clsact qdiscs
  Mirage created.
- `capture`: `EbpfCapture`, which applies and removes all of it with the
  policy routing (the service `capture/backend.py` holds).

Failures: bcc missing, kernel headers missing, a compile or verifier error,
an interface that is missing or not Ethernet, or a netlink refusal all raise
`CaptureError` whose message says how to fix it, or to choose
`appliance.redirect: nftables`.
"""

from __future__ import annotations

from appliance.capture.ebpf.bpfsys import TestRun
from appliance.capture.ebpf.capture import EbpfCapture, remove_leftovers
from appliance.capture.ebpf.plan import (
    BPF_DIR,
    FILTER_HANDLE,
    FILTER_NAME,
    FILTER_PREF,
    SOURCE,
    STAT_NAMES,
    Plan,
    plan,
    render_text,
    trie_key,
)
from appliance.capture.ebpf.program import Program

__all__ = [
    "BPF_DIR",
    "FILTER_HANDLE",
    "FILTER_NAME",
    "FILTER_PREF",
    "SOURCE",
    "STAT_NAMES",
    "EbpfCapture",
    "Plan",
    "Program",
    "TestRun",
    "plan",
    "remove_leftovers",
    "render_text",
    "trie_key",
]
