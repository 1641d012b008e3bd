"""Groups and proxy-providers in the lab, one story on one lab and one set of
servers: a subscription served over HTTP from the upstream node (Clash YAML
and base64 share links) feeds a url-test group of sing-box SOCKS5 and VMess
inbounds; killing the node in use moves new flows within one interval; a
refresh that fails keeps the last good set; a boot with the subscription
server gone runs on the cached files; a relay of two SOCKS5 proxies
carries a curl; a select group's choice outlives a restart.

Which proxy carried a flow is read from the sing-box logs ("inbound
connection to NAME:PORT"), never from Mirage itself.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.reference import SingBox
from appliance.lab.servers import terminate

pytestmark = pytest.mark.netns

SUB_PORT = 18180
INTERVAL = 2  # seconds: group probes and provider refreshes
VMESS_UUID = "5a1e0b4c-3f7d-4c2a-9e1b-7d2f6c8a9b10"
# Auto's members: name -> (sing-box inbound type, port).
NODES = {"fast-1": ("socks", 18121), "fast-2": ("socks", 18122), "vm-link": ("vmess", 18123)}
HOPS = {"hop-a": 18111, "hop-b": 18112}


def inbound(kind: str, port: int) -> dict[str, object]:
    if kind == "vmess":
        return {"type": "vmess", "tag": "in", "listen": "::", "listen_port": port,
                "users": [{"uuid": VMESS_UUID, "alterId": 0}]}
    return {"type": "socks", "tag": "in", "listen": "::", "listen_port": port}


@dataclass
class Story:
    lab: Lab
    up: str
    sub_dir: Path
    state_dir: Path
    boxes: dict[str, SingBox] = field(default_factory=dict)
    server: subprocess.Popen[bytes] | None = None
    run: MirageRun | None = None

    def serve_subscription(self) -> None:
        self.server = self.lab.popen(
            "upstream", [sys.executable, "-m", "http.server", str(SUB_PORT), "--bind", self.up,
                         "--directory", str(self.sub_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            probe = self.lab.exec("gateway", ["curl", "-s", "-o", "/dev/null", "-m", "1",
                                              f"http://{self.up}:{SUB_PORT}/sub.yaml"])
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the subscription server did not come up")

    def stop_subscription(self) -> None:
        if self.server is not None:
            terminate(self.server)
            self.server = None

    def config(self) -> dict[str, object]:
        url = f"http://{self.up}:{SUB_PORT}"
        return lab_config(
            self.lab,
            proxies=[{"name": name, "type": "socks5", "server": self.up, "port": port}
                     for name, port in HOPS.items()],
            **{
                "proxy-providers": {
                    "yaml": {"type": "http", "url": f"{url}/sub.yaml", "interval": INTERVAL},
                    "links": {"type": "http", "url": f"{url}/sub.txt", "interval": INTERVAL},
                },
                "proxy-groups": [
                    {"name": "Auto", "type": "url-test", "use": ["yaml", "links"],
                     "url": "http://www.gamma.test/", "interval": INTERVAL, "lazy": False,
                     "timeout": 1000, "expected-status": "200"},
                    {"name": "Pick", "type": "select", "proxies": list(HOPS)},
                    {"name": "Chain", "type": "relay", "proxies": list(HOPS)},
                ],
                "rules": ["DOMAIN-SUFFIX,alpha.test,Auto", "DOMAIN-SUFFIX,beta.test,Chain",
                          "DOMAIN,www.gamma.test,Pick", "MATCH,DIRECT"],
            },
            appliance={"state-dir": str(self.state_dir)},
        )

    def start(self) -> MirageRun:
        self.run = MirageRun(self.lab, self.config(), name="mirage-groups").start()
        return self.run

    def stop(self) -> None:
        if self.run is not None:
            self.run.stop()
            self.run = None

    def wait_log(self, text: str, offset: int = 0, timeout: float = 10.0) -> None:
        assert self.run is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.run.log_text(offset):
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged:\n{self.run.log_text(offset)[-3000:]}")

    def curl(self, host: str) -> subprocess.CompletedProcess[str]:
        return self.lab.exec("client", ["curl", "-sS", "-m", "3", "-o", "/dev/null", "-w",
                                        "%{http_code}", f"http://{host}/"])

    def carriers(self, host: str) -> dict[str, int]:
        """How many connections to host:80 each sing-box has logged."""
        needle = f"inbound connection to {host}:80"
        return {name: box.log_text().count(needle) for name, box in self.boxes.items()}


def write_subscription(d: Path, up: str) -> None:
    proxies = [{"name": name, "type": "socks5", "server": up, "port": port}
               for name, (kind, port) in NODES.items() if kind == "socks"]
    (d / "sub.yaml").write_text(yaml.safe_dump({"proxies": proxies}))
    link = {"v": "2", "ps": "vm-link", "add": up, "port": str(NODES["vm-link"][1]),
            "id": VMESS_UUID, "aid": "0", "scy": "auto", "net": "tcp", "type": "none", "tls": ""}
    text = "vmess://" + base64.b64encode(json.dumps(link).encode()).decode() + "\n"
    (d / "sub.txt").write_text(base64.b64encode(text.encode()).decode())


@pytest.fixture(scope="module")
def story(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    up = lab.addr("upstream")
    sub_dir = tmp_path_factory.mktemp("subscription")
    write_subscription(sub_dir, up)
    s = Story(lab, up, sub_dir, lab.state_dir / "groups-state")
    shutil.rmtree(s.state_dir, ignore_errors=True)
    try:
        for name, (kind, port) in NODES.items():
            s.boxes[name] = SingBox(lab, [inbound(kind, port)], name=f"sb-{name}").start()
        for name, port in HOPS.items():
            s.boxes[name] = SingBox(lab, [inbound("socks", port)], name=f"sb-{name}").start()
        s.serve_subscription()
        s.start()
        s.wait_log("proxy-provider yaml: loaded")
        s.wait_log("proxy-provider links: loaded")
        yield s
    finally:
        s.stop()
        s.stop_subscription()
        for box in s.boxes.values():
            box.stop()
        shutil.rmtree(s.state_dir, ignore_errors=True)


def test_relay_of_two_socks5_proxies_carries_a_curl(story: Story) -> None:
    result = story.curl("www.beta.test")
    assert result.stdout == "200", result.stderr
    # hop-a was asked for hop-b's server; hop-b for the destination, by name.
    assert f"inbound connection to {story.up}:{HOPS['hop-b']}" in \
        story.boxes["hop-a"].log_text()
    assert story.carriers("www.beta.test") == {name: (1 if name == "hop-b" else 0)
                                               for name in story.boxes}


def test_both_subscription_formats_feed_the_url_test_group(story: Story) -> None:
    """The Clash YAML subscription's nodes and the share-link list's node
    are all Auto's members, and each format's nodes carry Auto's flows when
    the other format's are down."""
    assert story.run is not None
    auto = story.lab.exec("gateway", ["curl", "-sf", "-m", "3",
                                      "http://127.0.0.1:9090/proxies/Auto"])
    assert sorted(json.loads(auto.stdout)["all"]) == sorted(NODES), auto.stdout

    def carrier_within_an_interval(allowed: set[str]) -> str:
        deadline = time.monotonic() + INTERVAL + 3
        while time.monotonic() < deadline:
            before = story.carriers("www.alpha.test")
            if story.curl("www.alpha.test").stdout == "200":
                after = story.carriers("www.alpha.test")
                used = next(n for n in NODES if after[n] > before[n])
                if used in allowed:
                    return used
            time.sleep(0.2)
        raise AssertionError(f"no flow through {allowed}:\n{story.run.log_text()[-2000:]}")

    from_yaml = {n for n, (kind, _) in NODES.items() if kind == "socks"}
    from_links = set(NODES) - from_yaml
    for down, up in ((from_links, from_yaml), (from_yaml, from_links)):
        for name in down:
            story.boxes[name].stop()
        try:
            carrier_within_an_interval(up)
        finally:
            for name in down:
                story.boxes[name].start()


def test_url_test_moves_new_flows_off_a_killed_node_within_an_interval(story: Story) -> None:
    assert story.run is not None
    # The first round of probes has run once every member was measured.
    time.sleep(INTERVAL + 1)
    before = story.carriers("www.alpha.test")
    assert story.curl("www.alpha.test").stdout == "200"
    after = story.carriers("www.alpha.test")
    used = [n for n in NODES if after[n] > before[n]]
    assert len(used) == 1, (before, after)
    story.boxes[used[0]].stop()
    killed = time.monotonic()
    moved_to = None
    while time.monotonic() - killed < INTERVAL + 3:
        before = story.carriers("www.alpha.test")
        if story.curl("www.alpha.test").stdout == "200":
            after = story.carriers("www.alpha.test")
            moved_to = next(n for n in NODES if after[n] > before[n])
            break
        time.sleep(0.2)
    took = time.monotonic() - killed
    assert moved_to is not None and moved_to != used[0], story.run.log_text()[-2000:]
    assert took < INTERVAL + 3


def test_a_failed_refresh_keeps_the_last_good_set(story: Story) -> None:
    assert story.run is not None
    offset = len(story.run.log_text())
    (story.sub_dir / "sub.yaml").write_text("<html>subscription expired</html>\n")
    story.wait_log("proxy-provider yaml: content refused", offset, timeout=INTERVAL * 3)
    story.wait_log("keeping the last good copy", offset)
    result = story.curl("www.alpha.test")
    assert result.stdout == "200", result.stderr


def test_boot_with_the_subscription_unreachable_uses_the_cache(story: Story) -> None:
    story.stop()
    story.stop_subscription()
    run = story.start()
    assert "proxy-provider yaml: loaded" in run.log_text()
    assert "proxy-provider links: loaded" in run.log_text()
    result = story.curl("www.alpha.test")
    assert result.stdout == "200", result.stderr


def test_select_is_remembered_across_a_restart(story: Story) -> None:
    # The choice as the control API's PUT /proxies/Pick stores it.
    (story.state_dir / "selected.json").write_text(json.dumps({"Pick": "hop-b"}))
    story.stop()
    story.start()
    before = story.carriers("www.gamma.test")
    assert story.curl("www.gamma.test").stdout == "200"
    after = story.carriers("www.gamma.test")
    assert after["hop-b"] == before["hop-b"] + 1 and after["hop-a"] == before["hop-a"]
    # And a reload (SIGHUP) keeps it too.
    assert story.run is not None
    offset = len(story.run.log_text())
    story.run.reload()
    story.wait_log("SIGHUP: reloaded", offset)
    assert story.curl("www.gamma.test").stdout == "200"
    again = story.carriers("www.gamma.test")
    assert again["hop-b"] == after["hop-b"] + 1 and again["hop-a"] == after["hop-a"]
    # Every run of the story, start to end, without a crash of any task.
    assert story.run is not None
    assert "Traceback" not in story.run.log_text(), story.run.log_text()[-3000:]
