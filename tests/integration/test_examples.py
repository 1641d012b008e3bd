"""Every profile in examples/ passes `mirage check` as it is: they are what
the README, docs/operations.md and the Ansible role (`mirage_config_src`)
point users at, so each must load with what the product does today."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "check", *extra, "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_examples_are_there() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"lab.yaml", "clash-profile.yaml", "home-gateway.yaml"} <= names, names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_mirage_check(example: Path) -> None:
    result = check(example)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stderr, result.stderr


def test_home_gateway_uses_every_proxy_and_provider() -> None:
    """The deployment example: a WireGuard and a Trojan proxy, a proxy
    provider and rule providers, all used (nothing skipped), their caches
    under the state directory the unit lets Mirage write."""
    result = check(ROOT / "examples/home-gateway.yaml", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["counts"]["proxies"] == 2
    assert summary["counts"]["proxies-skipped"] == 0
    assert summary["counts"]["groups-skipped"] == 0
    assert summary["skipped-proxies"] == [] and summary["dead-ends"] == []
    providers = {(p["kind"], p["name"]): p for p in summary["providers"]}
    assert set(providers) == {("proxy", "subscription"), ("rule", "ads"),
                              ("rule", "private-nets")}
    assert providers["proxy", "subscription"]["used-by"] == ["Auto"]
    # Relative provider paths live under appliance.state-dir.
    assert providers["rule", "ads"]["path"] == "rules/ads.yaml"
    # Subscription tokens never appear in what check prints.
    assert "token=" not in result.stdout and "token=" not in result.stderr
