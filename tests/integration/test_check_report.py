"""`mirage check` on profiles as people have them (issue 13), run as the
user runs it, beside `mihomo -t` on the same file: a profile mihomo
accepts loads with its unknown keys warned about; a broken one is refused
with every problem listed; no secret of the profile is ever printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.lab.reference import mihomo_binary, mihomo_home

ROOT = Path(__file__).resolve().parents[2]

# Every value a message must never show.
SECRETS = ("T0kenId77", "Tr0janPw-9f2", "0b2c5a6e-1d7f-4c8a-9e3b-5f6a7b8c9d0e", "Ss-P4ss-77",
           "S0cksPw-31", "ApiS3cret-88", "SubT0ken-4a9", "RuleT0ken-5c1", "Bearer-Hdr-6d2",
           "H2Pw-0xx", "authPw-13")  # fmt: skip

LENIENT = """\
mixed-port: 7890
secret: ApiS3cret-88
external-controller: 127.0.0.1:9090
authentication: ["user:authPw-13"]
api-token: SubT0ken-4a9
rule-anchor:
  domain: &domain {type: http, interval: 86400, behavior: domain, format: yaml}
dns:
  enable: true
  enabled: true
  listen: 127.0.0.1:1053
  enhanced-mode: fake-ip
  default-nameserver: [223.5.5.5]
  nameserver: [223.5.5.5, "https://dns.example/dns-query?token=SubT0ken-4a9#PROXY",
               "https://dns.nextdns.example/T0kenId77"]
proxies:
  - {name: tj, type: trojan, server: t.example, port: 443, password: Tr0janPw-9f2,
     flow: xtls-rprx-direct, udp: true}
  - {name: vm, type: vmess, server: v.example, port: 443,
     uuid: 0b2c5a6e-1d7f-4c8a-9e3b-5f6a7b8c9d0e, alterId: 0, cipher: auto,
     made-up-opt: Tr0janPw-9f2}
  - {name: ss, type: ss, server: s.example, port: 8388, cipher: aes-128-gcm, password: Ss-P4ss-77}
  - {name: so, type: socks5, server: 192.0.2.1, port: 1080, username: u, password: S0cksPw-31}
  - {name: hy, type: hysteria2, server: h.example, port: 443, password: H2Pw-0xx}
  - {name: far, type: socks5, server: 192.0.2.2, port: 99999, password: S0cksPw-31}
  - {name: dr, type: direct, udp: true}
proxy-providers:
  sub:
    type: http
    url: "https://sub.example/api/v1/client/subscribe?token=SubT0ken-4a9"
    path: ./sub.yaml
    interval: 3600
    header: {Authorization: ["Bearer-Hdr-6d2"]}
proxy-groups:
  - {name: Proxy, type: select, proxies: [tj, vm, ss, so, hy, dr], use: [sub],
     empty-fallback: DIRECT}
rule-providers:
  ads: {<<: *domain, url: "https://rules.example/RuleT0ken-5c1/ads.yaml?t=RuleT0ken-5c1"}
sniffer: {enable: true, sniff: {TLS: {ports: [443]}}}
tun: {enable: false}
Proxy:
  - {name: old, type: socks5, server: 192.0.2.9, port: 1080}
rules:
  - RULE-SET,ads,REJECT
  - MATCH,Proxy
"""

BROKEN = """\
secret: ApiS3cret-88
dns:
  enable: true
  nameserver: [223.5.5.5]
proxies:
  - {name: a, type: trojan, server: t.example, port: 443, password: Tr0janPw-9f2, udp: maybe}
  - {name: b, type: socks5, server: 192.0.2.1, port: 1080, username: u, password: S0cksPw-31}
  - {name: c, type: vmess, server: v.example, port: 443, uuid: 0b2c5a6e-1d7f-4c8a-9e3b-5f6a7b8c9d0e,
     alterId: 0, cipher: auto}
proxy-groups:
  - {name: G, type: select, proxies: [a, c, nowhere]}
rules:
  - DOMAIN-SUFFIX,a.example,nothing
  - MATCH,G
"""


def mirage_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def mihomo_test(path: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(mihomo_binary()), "-t", "-d", str(mihomo_home(home)),
                           "-f", str(path)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return tmp_path / "config.yaml"


def test_a_profile_mihomo_accepts_loads_with_warnings_and_no_secret(
        profile: Path, tmp_path: Path) -> None:
    profile.write_text(LENIENT)
    reference = mihomo_test(profile, tmp_path / "mihomo")
    assert "test is successful" in reference.stdout, reference.stdout[-2000:]

    result = mirage_check(profile)
    assert result.returncode == 0, result.stderr
    comments = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    unknown = next(c for c in comments if c.startswith("# ignored (unknown keys"))
    for key in ("dns.enabled (did you mean 'enable'?)", "api-token",
                "proxies[1].made-up-opt", "proxy-groups[0].empty-fallback"):
        assert key in unknown, unknown
    assert any(c.startswith("# ignored (hold only YAML anchors): rule-anchor") for c in comments)
    assert any(c.startswith("# ignored (old Clash spellings") and "Proxy" in c
               for c in comments)
    assert any(c.startswith("# ignored (no meaning on a gateway): tun") for c in comments)
    # A value mihomo loads but no dial could use: that proxy is skipped, said.
    assert any(c.startswith("# skipped (Mirage cannot use them): ") and
               "proxies[5] ('far': proxies[5].port: 99999: out of range" in c for c in comments)
    # One line per kind.
    kinds = [c.split(":")[0] for c in comments]
    assert len(kinds) == len(set(kinds))
    shown = result.stdout + result.stderr
    for secret in SECRETS:
        assert secret not in shown, secret


def test_a_broken_profile_lists_every_problem_once_and_no_secret(
        profile: Path, tmp_path: Path) -> None:
    profile.write_text(BROKEN)
    reference = mihomo_test(profile, tmp_path / "mihomo")
    assert "test failed" in reference.stdout, reference.stdout[-2000:]

    result = mirage_check(profile)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1] == f"mirage: {profile}: 3 problems", lines
    paths = [line.removeprefix(f"mirage: {profile}: ").split(":")[0] for line in lines[:-1]]
    assert paths == ["proxies[0].udp", "proxy-groups[0].proxies[2]", "rules[0]"]
    for secret in SECRETS:
        assert secret not in result.stderr, secret
    assert "Traceback" not in result.stderr
