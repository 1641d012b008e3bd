"""Shared pytest fixtures.

`lab`: one namespace lab (client, gateway, upstream with real servers; see
appliance/lab/lab.py) for the whole test session, under the prefix
`mt<pid>` so that concurrent runs and a developer's `mirage lab up` (prefix
`mirage`) never collide. Built on first use, torn down at session end; a lab
left by a crashed run with the same prefix is replaced. Tests must leave it
as they found it (remove any nft table, rule or process they add) or use
their own namespaces.

A run killed before its teardown (a timeout's SIGKILL) leaves its lab
behind; the next session removes labs named after test runs whose process
is gone (`mt<pid>`, `mt<pid>x`), and only those.

We are root and CI is root: nothing here is skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from appliance.lab.lab import STATE_ROOT, Lab
from appliance.lab.mirage import MirageRuns
from appliance.lab.netns import NETNS_RUN_DIR

# Property tests judge correctness, not speed: on a shared 2-core CI machine a
# slow example must not fail a test (hypothesis' default deadline is 200 ms).
settings.register_profile(
    "mirage", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("mirage")

_TEST_LAB = re.compile(r"^mt(\d+)x?$")


def _remove_labs_of_dead_runs() -> None:
    prefixes = set()
    if STATE_ROOT.is_dir():
        prefixes |= {p.name for p in STATE_ROOT.iterdir()}
    if NETNS_RUN_DIR.is_dir():
        prefixes |= {p.name.rsplit("-", 1)[0] for p in NETNS_RUN_DIR.iterdir()}
    for prefix in sorted(prefixes):
        m = _TEST_LAB.match(prefix)
        if m and int(m.group(1)) != os.getpid() and not os.path.exists(f"/proc/{m.group(1)}"):
            Lab(prefix).down()


@pytest.fixture(scope="session")
def lab_prefix() -> str:
    """The session lab's prefix; namespaces are `<prefix>-client` etc."""
    return f"mt{os.getpid()}"


@pytest.fixture(scope="session")
def lab(lab_prefix: str) -> Iterator[Lab]:
    """The session's running lab (see the module docstring)."""
    _remove_labs_of_dead_runs()
    instance = Lab(lab_prefix)
    instance.up()
    try:
        yield instance
    finally:
        instance.down()


@pytest.fixture
def runs(lab: Lab) -> Iterator[MirageRuns]:
    """`mirage run` variants in the session's lab, all stopped (and the
    fake-IP store removed) when the test ends. test_ebpf_e2e.py overrides it
    with one that sets the capture backend."""
    r = MirageRuns(lab)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway namespace with only loopback (`mt-ns-<random>`), removed
    by name when the test ends."""
    name = f"mt-ns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
