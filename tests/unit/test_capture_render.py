"""The nftables capture ruleset as rendered from the config (no kernel involved).

The kernel-side checks (the batch applies, template and JSON agree, removal
is exact) are in tests/integration/test_capture.py.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from appliance.capture.nftables import (
    CaptureError,
    render,
    render_nft,
    render_remove,
    render_text,
)
from appliance.capture.routing import PolicyRouting
from appliance.config.model import ApplianceConfig, Config, DnsConfig, Listen

net = ipaddress.ip_network


def make_cfg(**kw: Any) -> Config:
    app = {
        "lan": ("br-lan", "eth1"),
        "bypass": (net("192.168.0.0/16"), net("fd00::/8")),
        "capture_mark": 0x233,
        "route_table": 233,
    }
    app.update(kw.pop("appliance", {}))
    dns = kw.pop("dns", DnsConfig(fake_ip_range6=ipaddress.IPv6Network("fc00::/18")))
    base: dict[str, Any] = {"tproxy_port": 7893, "routing_mark": 0x100, "ipv6": True}
    base.update(kw)
    return Config(dns=dns, appliance=ApplianceConfig(**app), **base)


def objects(cmds: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [c["add"][kind] for c in cmds if "add" in c and kind in c["add"]]


def rules(cmds: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [r["expr"] for r in objects(cmds, "rule") if r["chain"] == chain]


def tproxy_rules(cmds: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [e for e in rules(cmds, "prerouting") if any("tproxy" in x for x in e)]


def dport_of(expr: list[dict[str, Any]]) -> Any:
    for x in expr:
        m = x.get("match")
        if m and m["left"] == {"payload": {"protocol": "th", "field": "dport"}}:
            return m["right"]
    return None


def test_batch_replaces_leftover_then_builds_one_table() -> None:
    cmds = render(make_cfg(), table="mirage-test")
    table = {"table": {"family": "inet", "name": "mirage-test"}}
    # add+delete first: valid whether or not a crashed run left the table.
    assert cmds[:3] == [{"add": table}, {"delete": table}, {"add": table}]
    # Everything else is an `add` inside that one table; nothing flushes.
    for c in cmds[3:]:
        (verb, obj), = c.items()
        assert verb == "add"
        (_kind, body), = obj.items()
        assert body["table"] == "mirage-test" and body["family"] == "inet"
    assert not any("flush" in c for c in cmds)
    assert render_remove("mirage-test") == [{"add": table}, {"delete": table}]


def test_sets_carry_lan_fake_and_bypass_from_config() -> None:
    sets = {s["name"]: s for s in objects(render(make_cfg()), "set")}
    assert sets["lan"]["elem"] == ["br-lan", "eth1"]
    assert sets["fake4"]["elem"] == [{"prefix": {"addr": "198.18.0.0", "len": 16}}]
    assert sets["fake6"]["elem"] == [{"prefix": {"addr": "fc00::", "len": 18}}]
    b4 = {(e["prefix"]["addr"], e["prefix"]["len"]) for e in sets["bypass4"]["elem"]}
    assert {("192.168.0.0", 16), ("127.0.0.0", 8), ("169.254.0.0", 16), ("224.0.0.0", 4)} <= b4
    assert ("255.255.255.255", 32) in b4
    b6 = {(e["prefix"]["addr"], e["prefix"]["len"]) for e in sets["bypass6"]["elem"]}
    assert {("fd00::", 8), ("::", 127), ("fe80::", 10), ("ff00::", 8)} <= b6


def test_overlapping_bypass_is_collapsed() -> None:
    # Interval sets refuse overlaps; 127.1.0.0/16 lies inside 127.0.0.0/8.
    bypass = (net("10.0.0.0/8"), net("10.1.0.0/16"), net("127.1.0.0/16"))
    cfg = make_cfg(appliance={"bypass": bypass})
    sets = {s["name"]: s for s in objects(render(cfg), "set")}
    b4 = [(e["prefix"]["addr"], e["prefix"]["len"]) for e in sets["bypass4"]["elem"]]
    assert ("10.0.0.0", 8) in b4 and ("10.1.0.0", 16) not in b4 and ("127.1.0.0", 16) not in b4


def test_prerouting_returns_before_any_tproxy() -> None:
    pre = rules(render(make_cfg()), "prerouting")
    first_tproxy = next(i for i, e in enumerate(pre) if any("tproxy" in x for x in e))
    guards = pre[:first_tproxy]
    flat = [x for e in guards for x in e]
    # Only LAN ingress; own outbound mark; DNAT; local/broadcast/multicast; bypass sets.
    assert {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "@lan"}} in flat
    assert {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 0x100}} in flat
    assert {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}} in flat
    fib = next(x for x in flat if "fib" in x.get("match", {}).get("left", {}))
    assert set(fib["match"]["right"]["set"]) == {"local", "broadcast", "multicast"}
    rights = [x["match"]["right"] for x in flat if "match" in x]
    assert "@bypass4" in rights and "@bypass6" in rights
    # Every guard rule ends in return (never accept/drop: other tables still see it).
    assert all(
        e[-1] == {"return": None} for e in guards if not any("socket" in str(x) for x in e)
    )


def test_established_transparent_sockets_are_marked() -> None:
    pre = rules(render(make_cfg()), "prerouting")
    sock = [e for e in pre if any("socket" in x.get("match", {}).get("left", {}) for x in e)]
    assert len(sock) == 1
    assert {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x233}} in sock[0]
    assert sock[0][-1] == {"accept": None}


def test_fake_ranges_go_to_tproxy_port_with_capture_mark() -> None:
    cmds = render(make_cfg(tproxy_port=12345, appliance={"capture_mark": 0x77}))
    by_set = {}
    for e in tproxy_rules(cmds):
        for x in e:
            r = x.get("match", {}).get("right")
            if r in ("@fake4", "@fake6"):
                by_set[r] = e
    assert set(by_set) == {"@fake4", "@fake6"}
    for name, fam in (("@fake4", "ip"), ("@fake6", "ip6")):
        e = by_set[name]
        assert {"tproxy": {"family": fam, "port": 12345}} in e
        assert {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x77}} in e
        l4 = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                        "right": {"set": ["tcp", "udp"]}}}
        assert l4 in e


def test_fake_ranges_never_fall_through_to_forwarding() -> None:
    pre = rules(render(make_cfg()), "prerouting")
    last_tproxy = max(i for i, e in enumerate(pre) if any("tproxy" in x for x in e))
    tail = pre[last_tproxy + 1:]
    daddr = [x["match"]["right"] for e in tail for x in e[:1]]
    assert daddr == ["@fake4", "@fake4", "@fake6", "@fake6"]
    assert [e[-1] for e in tail] == [{"reject": {"type": "tcp reset"}}, {"drop": None}] * 2


def test_dns_hijack_redirects_port_53_to_dns_listen_port() -> None:
    cfg = make_cfg(dns=DnsConfig(listen=Listen("0.0.0.0", 1053)))
    cmds = render(cfg)
    chain = next(c for c in objects(cmds, "chain") if c["name"] == "dns")
    assert (chain["type"], chain["hook"], chain["prio"]) == ("nat", "prerouting", -100)
    dns = rules(cmds, "dns")
    # The same guards as the capture: LAN only, not the gateway, not bypassed.
    assert dns[0] == [{"match": {"op": "!=", "left": {"meta": {"key": "iifname"}},
                                 "right": "@lan"}}, {"return": None}]
    rights = [x["match"]["right"] for e in dns[:-1] for x in e if "match" in x]
    assert rights[1:] == ["local", "@bypass4", "@bypass6"]
    # Redirect (conntrack answers from the address and port asked), v4 and v6.
    last = dns[-1]
    assert dport_of(last) == 53
    assert last[-1] == {"redirect": {"port": 1053}}
    assert not any(x.get("match", {}).get("left") == {"meta": {"key": "nfproto"}} for x in last)
    # DNS never goes through TPROXY.
    assert [e for e in tproxy_rules(cmds) if dport_of(e) == 53] == []
    assert "th dport 53 redirect to :1053" in render_nft(cfg)


def test_dns_hijack_to_specific_address_uses_dnat_of_that_family() -> None:
    cfg = make_cfg(dns=DnsConfig(listen=Listen("10.0.0.1", 5353)))
    last = rules(render(cfg), "dns")[-1]
    assert {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}} in last
    assert last[-1] == {"dnat": {"family": "ip", "addr": "10.0.0.1", "port": 5353}}
    assert "meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.0.0.1:5353" \
        in render_nft(cfg)
    cfg6 = make_cfg(dns=DnsConfig(listen=Listen("fd00::1", 53)))
    assert rules(render(cfg6), "dns")[-1][-1] == {
        "dnat": {"family": "ip6", "addr": "fd00::1", "port": 53}
    }
    assert "dnat ip6 to [fd00::1]:53" in render_nft(cfg6)


def test_dns_hijack_v4_only_without_ipv6() -> None:
    last = rules(render(make_cfg(ipv6=False)), "dns")[-1]
    assert {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}} in last


def test_dns_hijack_to_loopback_listener_is_refused() -> None:
    with pytest.raises(CaptureError, match="loopback"):
        render(make_cfg(dns=DnsConfig(listen=Listen("127.0.0.1", 53))))
    # Without hijack the listen address does not matter to the capture.
    render(make_cfg(dns=DnsConfig(listen=Listen("127.0.0.1", 53)),
                    appliance={"dns_hijack": False}))


def test_no_dns_rule_without_hijack() -> None:
    cfg = make_cfg(appliance={"dns_hijack": False})
    assert "dns" not in {c["name"] for c in objects(render(cfg), "chain")}
    assert "th dport 53" not in render_nft(cfg)
    assert "dns" not in {c["name"] for c in objects(render(make_cfg(dns=DnsConfig(enable=False))),
                                                    "chain")}


def test_ipv4_only_config_has_no_v6_objects() -> None:
    cfg = make_cfg(ipv6=False)
    cmds = render(cfg)
    names = {s["name"] for s in objects(cmds, "set")}
    assert names == {"lan", "fake4", "bypass4"}
    assert "ip6" not in str(rules(cmds, "prerouting"))
    text = render_nft(cfg)
    assert "ip6" not in text and "fake6" not in text
    assert PolicyRouting.from_config(cfg).describe() == [
        "ip rule add fwmark 0x233 lookup 233 priority 32000",
        "ip route add local 0.0.0.0/0 dev lo table 233",
    ]


def test_no_routing_mark_no_mark_guard() -> None:
    cmds = render(make_cfg(routing_mark=None))
    assert not re.search(r"meta mark 0x\w+ return", render_nft(make_cfg(routing_mark=None)))
    guards = [e for e in rules(cmds, "prerouting") if e[-1] == {"return": None}]
    assert not any(x.get("match", {}).get("left") == {"meta": {"key": "mark"}} for e in guards
                   for x in e)


def test_input_chain_refuses_direct_connections_to_tproxy_port() -> None:
    inp = rules(render(make_cfg()), "input")
    assert len(inp) == 2
    tcp, udp = inp
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                      "right": 7893}} in tcp
    assert {"match": {"op": "!=", "left": {"meta": {"key": "mark"}}, "right": 0x233}} in tcp
    assert tcp[-1] == {"reject": {"type": "tcp reset"}}
    assert udp[-1]["reject"]["expr"] == "port-unreachable"


def test_text_names_the_same_values() -> None:
    text = render_text(make_cfg(), table="gw-t")
    assert "table inet gw-t {" in text
    assert "delete table inet gw-t" in text
    assert 'elements = { "br-lan", "eth1" }' in text
    assert "tproxy ip to :7893 meta mark set 0x233 accept" in text
    assert "tproxy ip6 to :7893" in text
    assert "meta mark 0x100 return" in text
    assert "$" not in text
    assert not re.search(r"^\s*#\s*(if \w+|endif)\s*$", text, re.M)
    assert "#   ip rule add fwmark 0x233 lookup 233 priority 32000" in text
    assert "#   ip -6 route add local ::/0 dev lo table 233" in text


def test_bad_configs_are_refused() -> None:
    with pytest.raises(CaptureError, match="tproxy-port"):
        render(make_cfg(tproxy_port=None))
    with pytest.raises(CaptureError, match="routing-mark"):
        render(make_cfg(routing_mark=0x233))


def test_empty_lan_captures_nothing() -> None:
    cmds = render(make_cfg(appliance={"lan": ()}))
    lan = next(s for s in objects(cmds, "set") if s["name"] == "lan")
    assert "elem" not in lan
    assert "set lan {\n        type ifname\n        \n    }" in render_nft(
        make_cfg(appliance={"lan": ()})
    )
