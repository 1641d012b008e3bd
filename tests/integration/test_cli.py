"""The `mirage` command as a user runs it: exit codes and what it prints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def mirage(*args: str, timeout: float = 30, netns: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "appliance", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_check_prints_the_effective_config() -> None:
    result = mirage("check", "-c", str(ROOT / "examples/lab.yaml"))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["dns"]["fake-ip-range"] == "198.18.0.0/16"
    assert effective["tproxy-port"] == 7893
    assert "configuration OK" in result.stderr


def test_check_reports_ignored_clash_keys_once() -> None:
    result = mirage("check", "-c", str(ROOT / "examples/clash-profile.yaml"))
    assert result.returncode == 0, result.stderr
    ignored = [line for line in result.stdout.splitlines() if line.startswith("# ignored")]
    # One line per kind of ignored key, each key named once.
    kinds = [line.split(":")[0] for line in ignored]
    assert ignored and len(kinds) == len(set(kinds))
    assert sum(line.count("tun") for line in ignored) == 1


@pytest.mark.parametrize(("text", "path"), [
    ("dns:\n  fake-ip-range: 10.0.0.0/33\n", "dns.fake-ip-range"),
    ("tproxy-port: '7893'\n", "tproxy-port"),
    ("appliance:\n  lan: [lan0]\n  colour: blue\n", "appliance.colour"),
    # (A port of 99999 is not here: mihomo loads that proxy, so Mirage skips
    # it and says so: tests/integration/test_check_report.py.)
    ("proxies:\n  - {name: a, type: socks5, server: 192.0.2.1, port: 1080, udp: maybe}\n",
     "proxies[0].udp"),
    ("rules:\n  - DOMAIN,example.com,nowhere\n", "rules[0]"),
    ("dns: [not, a, mapping\n", ""),
])
def test_broken_config_exits_2_with_the_key_path(tmp_path: Path, text: str, path: str) -> None:
    cfg = tmp_path / "bad.yaml"
    # A valid nameserver first, so that the error is the one under test.
    ns = "dns:\n  nameserver: ['udp://192.0.2.53']\n" if not text.startswith("dns") else ""
    cfg.write_text(ns + text)
    for command in ("check", "run", "rules"):
        result = mirage(command, "-c", str(cfg))
        assert result.returncode == 2, (command, result.stderr)
        assert path in result.stderr and "Traceback" not in result.stderr
        assert result.stdout == ""


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = mirage("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_rules_prints_a_ruleset_nft_accepts(tmp_path: Path) -> None:
    result = mirage("rules", "-c", str(ROOT / "examples/lab.yaml"))
    assert result.returncode == 0, result.stderr
    assert "table inet mirage" in result.stdout
    ruleset = tmp_path / "rules.nft"
    ruleset.write_text(result.stdout)
    check = subprocess.run(["nft", "-c", "-f", str(ruleset)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_run_with_a_port_in_use_fails_clearly(netns: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "dns:\n  listen: 127.0.0.1:5353\n  nameserver: ['udp://127.0.0.1:1']\n"
        f"appliance:\n  state-dir: {tmp_path}/state\n"
    )
    holder = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import socket,time\n"
         "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('127.0.0.1',5353))\n"
         "print('bound',flush=True);time.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
        result = mirage("run", "-c", str(cfg), netns=netns)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert result.returncode == 1
    assert "dns.listen 127.0.0.1:5353" in result.stderr and "Traceback" not in result.stderr


def test_status_without_a_running_appliance_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"external-controller: 127.0.0.1:{port}\n"
                   "dns:\n  nameserver: ['udp://127.0.0.1:1']\n")
    result = mirage("status", "-c", str(cfg))
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_run_serves_dns_without_capture_on_a_plain_host(netns: str, tmp_path: Path) -> None:
    """No `appliance.lan`: no capture rules, just the DNS service; SIGTERM
    exits 0 and the store holds the mapping."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "profile: {store-fake-ip: true}\n"
        "dns:\n  listen: 127.0.0.1:5353\n  nameserver: ['udp://127.0.0.1:1']\n"
        f"appliance:\n  state-dir: {tmp_path}/state\n  store-flush-interval: 0.1\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "appliance", "run", "-c", str(cfg)],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        for _ in range(50):
            line = proc.stderr.readline()
            if " running (pid " in line or not line:
                break
        dig = subprocess.run(["ip", "netns", "exec", netns, "dig", "+short", "+time=2",
                              "-p", "5353", "@127.0.0.1", "example.org"],
                             capture_output=True, text=True, timeout=10)
        assert dig.stdout.strip().startswith("198.18.")
        tables = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "tables"],
                                capture_output=True, text=True)
        assert "mirage" not in tables.stdout
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        if proc.stderr is not None:
            proc.stderr.close()
    rows = subprocess.run(["sqlite3", str(tmp_path / "state/fakeip.sqlite3"),
                           "select domain from mapping"], capture_output=True, text=True)
    assert rows.stdout.split() == ["example.org"]


def test_check_ends_with_a_routing_summary_and_json_says_the_same(tmp_path: Path) -> None:
    cfg = tmp_path / "profile.yaml"
    cfg.write_text(textwrap.dedent("""\
        dns: {enable: false}
        proxy-providers:
          sub: {type: http, url: "https://sub.example/s?token=s3cr3t", path: ./sub.yaml}
        proxies:
          - {name: ok, type: socks5, server: 192.0.2.1, port: 1080}
          - {name: old, type: ssr, server: 192.0.2.2, port: 1}
        proxy-groups:
          - {name: Media, type: select, proxies: [old]}
          - {name: Auto, type: url-test, use: [sub]}
        rules:
          - DOMAIN-SUFFIX,media.example,Media
          - DOMAIN,video.example,Media
          - DOMAIN,a.example,Auto
          - MATCH,ok
        """))
    text = mirage("check", "-c", str(cfg))
    assert text.returncode == 0, text.stderr
    summary = text.stdout[text.stdout.index("# routing summary:"):]
    assert ("rules[0..1] (1 DOMAIN, 1 DOMAIN-SUFFIX) send to 'Media', a group with no member "
            "Mirage can use: their flows go to COMPATIBLE, which sends them DIRECT") in summary
    assert "1 group (Auto) takes its members only from sub" in summary
    assert "s3cr3t" not in text.stdout + text.stderr
    as_json = mirage("check", "--json", "-c", str(cfg))
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)["summary"]
    assert data["dead-ends"][0]["rules"] == "rules[0..1]"
    assert data["skipped-proxies"] == [{"reason": "a ssr proxy, which Mirage does not implement",
                                        "count": 1, "names": ["old"]}]
    assert "s3cr3t" not in as_json.stdout
    # The provider's cached copy: what Auto holds at start.
    (tmp_path / "sub.yaml").write_text(
        "proxies:\n  - {name: c1, type: socks5, server: 192.0.2.3, port: 1080}\n")
    data = json.loads(mirage("check", "--json", "-c", str(cfg)).stdout)["summary"]
    assert data["provider-only-groups"] == [{"name": "Auto", "providers": ["sub"],
                                             "ready": True, "rules": 1}]
    assert data["providers"][0]["copy"] == {"proxies": 1, "skipped": [], "error": None}


def test_check_json_lists_errors_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dns: {enable: false}\nrules:\n  - DOMAIN,example.com,nowhere\n")
    result = mirage("check", "--json", "-c", str(cfg))
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert [e["path"] for e in data["errors"]] == ["rules[0]"]
