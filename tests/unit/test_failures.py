"""The ring of recent failed flows and the classification of their reasons
(appliance/failures.py), without sockets."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from appliance.failures import KINDS, FailedFlows, classify
from appliance.flow import Flow


def make_flow(port: int = 40000, outbound: str = "ss-1") -> Flow:
    return Flow("tcp", "tproxy", IPv4Address("192.168.1.20"), port, IPv4Address("198.18.0.9"),
                80, "www.alpha.test", outbound=outbound, chains=(outbound, "Proxy"))


# Reason texts as the outbounds and the listeners raise them.
@pytest.mark.parametrize(("reason", "kind"), [
    ("ss sb-wrong www.alpha.test:80: the server closed the connection before answering: "
     "authentication failed or wrong cipher/password", "auth"),
    ("tj-wrong-password www.alpha.test:80: the server closed the tunnel without answering "
     "(wrong password, or it could not reach the destination)", "auth"),
    ("vless-1: auth refused by the server (HTTP status 401)", "auth"),
    ("tj-rogue: TLS to 192.168.57.10:18446: certificate verify failed: unable to get local "
     "issuer certificate", "certificate"),
    ("tj-pin-wrong: fingerprint mismatch: the server's certificate has SHA-256 ab", "certificate"),
    ("dead: 192.168.57.10:18449: Connection refused", "refused"),
    ("no connection within 5s", "timeout"),
    ("hy2: QUIC handshake timed out after 5s", "timeout"),
    ("dead: 192.0.2.1:443: No route to host", "unreachable"),
    ("DIRECT: cannot resolve nx.test: NXDOMAIN", "unreachable"),
    ("socks: bad reply version 0x48", "protocol"),
    ("something nobody foresaw", "other"),
])
def test_reasons_are_classified_into_a_few_kinds(reason: str, kind: str) -> None:
    assert classify(reason) == kind
    assert kind in KINDS


def test_the_ring_keeps_the_last_failures_and_counts_every_one() -> None:
    ring = FailedFlows(size=3)
    for i in range(5):
        ring.record(make_flow(40000 + i), "Connection refused", flow_id=i)
    ring.record(make_flow(41000, outbound="tj"), "no connection within 5s")
    rows = ring.snapshot()
    assert len(ring) == 3
    assert [r["src_port"] for r in rows] == [40003, 40004, 41000]
    assert [r["id"] for r in rows] == ["3", "4", "failed-1"]
    assert rows[-1]["kind"] == "timeout" and rows[-1]["chains"] == ["tj", "Proxy"]
    assert list(ring.series()) == [
        ("mirage_flow_failures_total", {"outbound": "ss-1", "kind": "refused"}, 5),
        ("mirage_flow_failures_total", {"outbound": "tj", "kind": "timeout"}, 1),
    ]


def test_a_reject_is_policy_not_a_failure() -> None:
    ring = FailedFlows()
    assert ring.record(make_flow(outbound="REJECT"), "rejected") is None
    assert len(ring) == 0 and not list(ring.series())


def test_a_flow_that_got_nothing_back_says_the_outbounds_note_first() -> None:
    from typing import Any, cast

    import trio

    from appliance.gateway.splice import SpliceResult
    from appliance.gateway.tcp import noted, unanswered

    class Noted:
        why_unanswered = "tj a.test:80: the server closed the tunnel without answering"

    plain = cast(trio.abc.Stream, object())
    trojan = cast(trio.abc.Stream, Noted())
    echo: Any = SpliceResult("error", "up: ECONNRESET (Connection reset by peer)", 5, 0)
    assert noted(plain) == "" and noted(trojan) == Noted.why_unanswered
    assert unanswered(echo, trojan) == Noted.why_unanswered
    assert unanswered(echo, plain) == echo.detail
    assert classify(unanswered(SpliceResult("done", "", 5, 0), plain)) == "protocol"
