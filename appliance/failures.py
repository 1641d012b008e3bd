"""Recent failed flows: why a flow never got through, for the control API.

/connections lists live flows only (as mihomo's), so a flow whose outbound
failed to connect (server down, wrong password, bad certificate, timeout)
would leave its reason in the log only. The listeners (gateway/tcp.py,
gateway/udp.py, gateway/proxyport/service.py) record each such flow here:
the flow as routing left it (outbound, chain, rule) and the reason text the
outbound raised, which is already meant for logs (no secrets: outbounds
never put a password or key in a reason).

- `FailedFlows`: a bounded ring of the last `size` failures (oldest dropped)
  and a count per (outbound, kind) since start, for /metrics.
- `classify`: a reason's kind, one of a fixed few (`KINDS`), so that a
  metric label never carries raw text.

Sans-I/O: memory only, used from the trio thread; nothing here fails.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.flow import Flow

# How many failures are kept (GET /mirage/failures).
RING_SIZE = 256

# Every kind `classify` returns; "other" when no marker matches.
KINDS = ("auth", "certificate", "refused", "timeout", "unreachable", "protocol", "other")

# Markers of each kind in the reason texts the outbounds and the system
# raise, lower case, tried in this order: a certificate failure mentions a
# handshake, and a wrong password is often only seen as the server's silence
# ("closed ... without answering (wrong password"), so those two come first.
_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("certificate", ("certificate", "fingerprint mismatch", "hostname mismatch", "self-signed",
                     "self signed", "unknown ca")),
    ("auth", ("password", "auth", "uuid", "credential", "407", "401", "user")),
    ("timeout", ("timed out", "timeout", "no connection within", "deadline", "etimedout",
                 "did not finish", "not answered")),
    ("refused", ("refused", "econnrefused", "reset", "econnreset", "rejected")),
    ("unreachable", ("unreachable", "no route", "ehostunreach", "enetunreach",
                     "cannot resolve", "no address", "network is down", "nxdomain")),
    ("protocol", ("handshake", "tls", "protocol", "bad ", "unexpected", "closed", "invalid",
                  "reply", "status", "eof")),
)


# What REJECT raises: a decision of the rules, not a failure.
POLICY_REASONS = frozenset({"rejected", "rejected (dropped)"})


def classify(reason: str) -> str:
    """The kind of a failure's reason text: one of `KINDS`."""
    text = reason.lower()
    for kind, markers in _MARKERS:
        if any(m in text for m in markers):
            return kind
    return "other"


class FailedFlows:
    """The last `size` failed flows (newest last) and how many failed per
    outbound and kind since start. Owns memory only."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=size)
        self._ids = itertools.count(1)
        self.counts: dict[tuple[str, str], int] = {}

    def record(self, flow: Flow, reason: str, *, flow_id: int | None = None
               ) -> dict[str, Any] | None:
        """Keep `flow` (as routing left it) as failed for `reason`; the row
        kept (the fields of a /connections row plus `reason`, `kind` and
        `failed`, the time it failed); None for a REJECT (policy, not a
        failure). `flow_id`: the live flow's id when it had one (a UDP
        session), else a number of this ring's own."""
        if reason in POLICY_REASONS:
            return None
        kind = classify(reason)
        outbound = flow.outbound or "?"
        key = (outbound, kind)
        self.counts[key] = self.counts.get(key, 0) + 1
        rule, payload = flow.rule_shown()
        now = time.time()
        row: dict[str, Any] = {
            "id": str(flow_id) if flow_id is not None else f"failed-{next(self._ids)}",
            "network": flow.network,
            "src_ip": str(flow.src),
            "src_port": flow.src_port,
            "dst_ip": str(flow.dst) if flow.dst is not None else "",
            "dst_port": flow.dst_port,
            "domain": flow.domain,
            "outbound": flow.outbound,
            "chains": list(flow.chains or ((flow.outbound,) if flow.outbound else ())),
            "rule": rule,
            "rule_payload": payload,
            "by_mode": flow.by_mode,
            "started": now,
            "failed": now,
            "up": 0,
            "down": 0,
            **(flow.entry.as_dict() if flow.entry is not None else {}),
            "reason": reason,
            "kind": kind,
        }
        self._ring.append(row)
        return row

    def __len__(self) -> int:
        return len(self._ring)

    def snapshot(self) -> list[dict[str, Any]]:
        """The failures kept, oldest first."""
        return list(self._ring)

    def series(self) -> Iterator[tuple[str, dict[str, str], int]]:
        """`mirage_flow_failures_total{outbound, kind}`: a bounded label set
        (the configured outbounds times `KINDS`)."""
        for (outbound, kind), count in sorted(self.counts.items()):
            yield "mirage_flow_failures_total", {"outbound": outbound, "kind": kind}, count
