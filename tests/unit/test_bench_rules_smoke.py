"""A few-second smoke of bench/rules.py (`make bench` runs the 200,000-rule
one beside mihomo): real rules from the wheel's geodata, the matcher's p50
under its target, the rule-set form agreeing in shape."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rules.py"


def test_rules_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_rules", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--rules", "5000", "--probes", "3000", "--no-mihomo"])
    out = capsys.readouterr().out
    assert "mirage, rules: lines" in out and "mirage, 3 RULE-SETs" in out, out
    assert code == 0, out
