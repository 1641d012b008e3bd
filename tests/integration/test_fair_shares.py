"""Fair shares end to end: `mirage run` in the session lab, two LAN clients
(the client namespace's lan0 gets a second address), one flooding past its
share, the other measured (tests/integration/fair_share_client.py). Each
test asserts on what the neighbour received (20/20, p50 latency), what the
flooder was told (refused at once), and the refusals `mirage status` counts
for the flooder. Limits are set small so that the floods stay small.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, MirageRuns

pytestmark = pytest.mark.netns

NEIGHBOUR = "192.168.56.21"
SCRIPT = str(Path(__file__).with_name("fair_share_client.py"))
LIMITS = {
    "flows-per-client": 40,
    "dns-tcp-per-client": 4,
    "proxy-connections-per-client": 10,
    "dns-upstream-per-client": 8,
    "fake-ip-rate-per-client": 5,
    "fake-ip-burst-per-client": 20,
}
# p50 latency bound for the neighbour: generous for a loaded 2-core CI box.
P50_BOUND = 1.0


@pytest.fixture
def second_client(lab: Lab) -> Iterator[str]:
    """NEIGHBOUR added to the client namespace's lan0 (removed after)."""
    lab.exec("client", ["ip", "addr", "add", f"{NEIGHBOUR}/24", "dev", "lan0", "nodad"],
             check=True)
    try:
        yield NEIGHBOUR
    finally:
        lab.exec("client", ["ip", "addr", "del", f"{NEIGHBOUR}/24", "dev", "lan0"])


@pytest.fixture
def mirage(runs: MirageRuns, second_client: str) -> MirageRun:
    return runs.start(appliance={"limits": LIMITS}, **{"mixed-port": 7890})


def run_clients(lab: Lab, mode: str, target: str, count: int) -> dict[str, Any]:
    flooder = lab.addr("client", "lan0")
    out = lab.exec("client", [sys.executable, SCRIPT, mode, flooder, NEIGHBOUR, target,
                              str(count)], timeout=90, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def status(lab: Lab, run: MirageRun) -> dict[str, Any]:
    out = lab.exec("gateway", [sys.executable, "-m", "appliance", "status", "-c",
                               str(run.config_path), "--json"], check=True)
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def assert_neighbour_served(result: dict[str, Any]) -> None:
    assert result["ok"] == 20, result
    assert statistics.median(result["latencies"]) < P50_BOUND, result


def assert_flooder_refused(lab: Lab, run: MirageRun, limit: str, at_least: int) -> None:
    data = status(lab, run)
    assert data["counters"]["limits"][f"{limit}_refused"] >= at_least, data["counters"]["limits"]
    top = data["refused_clients"][limit]
    assert top[0]["client"] == lab.addr("client", "lan0"), top
    assert NEIGHBOUR not in {row["client"] for row in top}


def fake_ip(lab: Lab, name: str) -> str:
    out = lab.exec("client", ["dig", "+short", "+time=3", "+tries=1", "-b", NEIGHBOUR,
                              f"@{lab.addr('gateway', 'lan0')}", name], check=True)
    return out.stdout.strip()


def test_tcp_flows_past_one_clients_share_are_reset_and_the_other_is_served(
        lab: Lab, mirage: MirageRun) -> None:
    target = fake_ip(lab, "www.gamma.test")
    result = run_clients(lab, "tcp", target, 150)
    flood = result["flood"]
    assert flood.get("held") == LIMITS["flows-per-client"], flood
    refused = flood.get("reset", 0) + flood.get("closed", 0) + flood.get("ConnectionResetError", 0)
    assert refused == 150 - LIMITS["flows-per-client"], flood
    assert_neighbour_served(result)
    assert_flooder_refused(lab, mirage, "flows", 150 - LIMITS["flows-per-client"])


def test_held_dns_tcp_connections_of_one_client_leave_the_other_dns_over_tcp(
        lab: Lab, mirage: MirageRun) -> None:
    result = run_clients(lab, "dns-tcp", lab.addr("gateway", "lan0"), 60)
    flood = result["flood"]
    assert flood.get("held") == LIMITS["dns-tcp-per-client"], flood
    assert_neighbour_served(result)
    assert_flooder_refused(lab, mirage, "dns_tcp", 60 - LIMITS["dns-tcp-per-client"])


def test_one_clients_upstream_flood_leaves_the_others_upstream_queries(
        lab: Lab, mirage: MirageRun) -> None:
    result = run_clients(lab, "upstream", lab.addr("gateway", "lan0"), 300)
    assert result["flood"].get("servfail", 0) > 0, result["flood"]
    assert_neighbour_served(result)
    assert_flooder_refused(lab, mirage, "dns_upstream", 1)


def test_new_names_past_one_clients_rate_get_servfail_and_the_other_gets_fake_ips(
        lab: Lab, mirage: MirageRun) -> None:
    result = run_clients(lab, "fake-ip", lab.addr("gateway", "lan0"), 200)
    flood = result["flood"]
    # The burst and what the rate refills while the flood lasts (< 2 s).
    assert LIMITS["fake-ip-burst-per-client"] <= flood.get("noerror", 0) <= 40, flood
    assert flood.get("servfail", 0) >= 160, flood
    assert_neighbour_served(result)
    assert_flooder_refused(lab, mirage, "fake_ip", 160)


def test_held_proxy_connections_of_one_client_leave_the_proxy_port_to_the_other(
        lab: Lab, mirage: MirageRun) -> None:
    result = run_clients(lab, "proxy", lab.addr("gateway", "lan0"), 60)
    flood = result["flood"]
    per_client = LIMITS["proxy-connections-per-client"]
    assert flood.get("held") == per_client, flood
    # A reset can also reach the client while connect() still runs.
    refused = flood.get("reset", 0) + flood.get("closed", 0) + flood.get("ConnectionResetError", 0)
    assert refused == 60 - per_client, flood
    assert_neighbour_served(result)
    assert_flooder_refused(lab, mirage, "proxy", 60 - per_client)
