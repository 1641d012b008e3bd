"""How proxies reach their own servers, end to end in the lab: `ip-version`
with happy eyeballs (RFC 8305) for the server's address.

One sing-box upstream (module-scoped, stopped by PID) with a SOCKS5 inbound
on `::`, reachable at 192.168.57.10 and fd57::10. Mirage runs with
`ipv6: true` and `hosts` that give the proxy names their records:

- `he.proxy.test`: an A that black-holes (192.168.57.99: nobody answers
  ARP, so a connection waits ~3 s for "no route to host") and an AAAA that
  works (fd57::10);
- `v6only.proxy.test`: an AAAA only.

The client fetches each lab name through a proxy of another `ip-version`,
and sing-box's log shows from which family the gateway reached it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lab_client import curl

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.reference import SingBox

pytestmark = pytest.mark.netns

SOCKS_PORT = 21080
BLACKHOLE4 = "192.168.57.99"  # in the upstream subnet, on no interface
UP6 = "fd57::10"


@pytest.fixture(scope="module")
def upstream(lab: Lab) -> Iterator[SingBox]:
    sb = SingBox(lab, [{"type": "socks", "tag": "socks-in", "listen": "::",
                        "listen_port": SOCKS_PORT}], name="sing-box-dialers")
    try:
        yield sb.start()
    finally:
        sb.stop()


def socks(name: str, server: str, ip_version: str) -> dict[str, Any]:
    return {"name": name, "type": "socks5", "server": server, "port": SOCKS_PORT,
            "ip-version": ip_version}


@pytest.fixture(scope="module")
def mirage(lab: Lab, upstream: SingBox) -> Iterator[MirageRun]:
    state = lab.state_dir / "dialers-mirage-state"
    cfg = lab_config(lab, ipv6=True, appliance={"state-dir": str(state)},
                     hosts={"he.proxy.test": [BLACKHOLE4, UP6], "v6only.proxy.test": [UP6]})
    cfg["proxies"] = [
        socks("he-v4prefer", "he.proxy.test", "ipv4-prefer"),
        socks("he-dual", "he.proxy.test", "dual"),
        socks("six-v4", "v6only.proxy.test", "ipv4"),
    ]
    cfg["rules"] = ["DOMAIN,www.alpha.test,he-v4prefer", "DOMAIN,www.beta.test,six-v4",
                    "DOMAIN,www.gamma.test,he-dual", "MATCH,DIRECT"]
    run = MirageRun(lab, cfg, name="dialers-mirage")
    run.start()
    try:
        yield run
    finally:
        run.stop()
        for f in state.glob("fakeip*"):
            f.unlink()


def from_gateway_v6(log: str) -> int:
    """How many connections sing-box took from the gateway's IPv6 address."""
    return len(re.findall(r"inbound connection from \[fd57::1\]:\d+", log))


def test_happy_eyeballs_reaches_the_server_over_the_family_that_works(
        lab: Lab, mirage: MirageRun, upstream: SingBox) -> None:
    before = len(upstream.log_text())
    # ipv4-prefer: the black-holed A first, the AAAA 250 ms later wins.
    # Tried one after the other, the A would hold the flow ~3 s (ARP fails).
    t0 = time.monotonic()
    rc, body, _ = curl(lab, "http://www.alpha.test/")
    took = time.monotonic() - t0
    assert rc == 0 and "MARKER-ALPHA" in body, body[:200]
    assert took < 2.0, took
    # dual: both families at once, the AAAA answers.
    rc, body, _ = curl(lab, "http://www.gamma.test/")
    assert rc == 0 and "MARKER-GAMMA" in body, body[:200]
    log = upstream.log_text()[before:]
    assert from_gateway_v6(log) == 2, log[-2000:]
    assert "inbound connection to www.alpha.test:80" in log


def test_ipv4_only_fails_fast_with_the_reason(lab: Lab, mirage: MirageRun,
                                              upstream: SingBox) -> None:
    offset = mirage.log_path.stat().st_size
    rc, body, seconds = curl(lab, "http://www.beta.test/")
    assert rc != 0 and "MARKER" not in body
    assert seconds < 2.0, seconds  # connect-timeout is 5 s
    log = mirage.log_text(offset)
    assert "cannot resolve v6only.proxy.test: no A record (ip-version: ipv4)" in log, log[-2000:]
