"""The nftables capture ruleset as rendered from the config (no kernel involved).

nft/mirage.nft is the only source: these tests read the text `render_nft`
fills from it (what `mirage rules` prints and `apply` applies). The kernel
side (the transaction applies, `nft -j list table` shows the sets and rules,
removal is exact) is in tests/integration/test_capture.py.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from appliance.capture.nftables import TEMPLATE, render_nft, render_remove, render_text
from appliance.capture.routing import PolicyRouting
from appliance.capture.spec import CaptureError, CaptureSpec
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
    dns = kw.pop("dns", DnsConfig(ipv6=True, fake_ip_range6=ipaddress.IPv6Network("fc00::/18")))
    base: dict[str, Any] = {"tproxy_port": 7893, "routing_mark": 0x100, "ipv6": True}
    base.update(kw)
    return Config(dns=dns, appliance=ApplianceConfig(**app), **base)


def set_elements(text: str, name: str) -> list[str]:
    """The elements of set `name` as the text lists them ([] when empty)."""
    m = re.search(rf"^    (?:set|map) {name} {{\n(.*?)^    }}", text, re.M | re.S)
    assert m, name
    el = re.search(r"elements = \{ (.*) \}", m.group(1))
    return [e.strip() for e in el.group(1).split(",")] if el else []


def chain(text: str, name: str) -> list[str]:
    """The statements of chain `name`, comments and blank lines dropped."""
    m = re.search(rf"^    chain {name} {{\n(.*?)^    }}", text, re.M | re.S)
    assert m, name
    lines = [ln.strip() for ln in m.group(1).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_one_transaction_replaces_leftover_then_builds_one_table() -> None:
    text = render_nft(make_cfg(), table="mirage-test")
    statements = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#", "}"))]
    # Declare + delete first: valid whether or not a crashed run left the
    # table; then the one table. Nothing else at top level, nothing flushes.
    assert statements == ["table inet mirage-test", "delete table inet mirage-test",
                          "table inet mirage-test {"]
    assert not any(ln.strip().startswith("flush") for ln in text.splitlines())
    table = {"table": {"family": "inet", "name": "mirage-test"}}
    assert render_remove("mirage-test") == [{"add": table}, {"delete": table}]


def test_template_is_plain_nft_with_value_placeholders_only() -> None:
    # No home-made preprocessor: every placeholder is a value, and the
    # rendered text has none left.
    source = TEMPLATE.read_text()
    assert not re.search(r"^\s*#\s*(if \w+|endif)\s*$", source, re.M)
    text = render_nft(make_cfg())
    assert "$" not in text


def test_sets_carry_lan_fake_and_bypass_from_config() -> None:
    text = render_nft(make_cfg())
    assert set_elements(text, "lan") == ['"br-lan"', '"eth1"']
    assert set_elements(text, "fake4") == ["198.18.0.0/16"]
    assert set_elements(text, "fake6") == ["fc00::/18"]
    b4 = set(set_elements(text, "bypass4"))
    assert {"192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4"} <= b4
    assert "255.255.255.255/32" in b4
    b6 = set(set_elements(text, "bypass6"))
    assert {"fd00::/8", "::/127", "fe80::/10", "ff00::/8"} <= b6


def test_fake6_is_the_range_in_effect() -> None:
    # Config.fake_range6: only with ipv6 *and* dns.ipv6.
    v6_off = make_cfg(dns=DnsConfig(ipv6=False, fake_ip_range6=net("fc00::/18")))
    assert set_elements(render_nft(v6_off), "fake6") == []
    assert CaptureSpec.from_config(v6_off).fake6 is None


def test_overlapping_bypass_is_collapsed() -> None:
    # Interval sets refuse overlaps; 127.1.0.0/16 lies inside 127.0.0.0/8.
    bypass = (net("10.0.0.0/8"), net("10.1.0.0/16"), net("127.1.0.0/16"))
    b4 = set_elements(render_nft(make_cfg(appliance={"bypass": bypass})), "bypass4")
    assert "10.0.0.0/8" in b4 and "10.1.0.0/16" not in b4 and "127.1.0.0/16" not in b4


def test_prerouting_returns_before_any_tproxy() -> None:
    text = render_nft(make_cfg())
    pre = chain(text, "prerouting")
    first_tproxy = next(i for i, r in enumerate(pre) if "tproxy" in r)
    guards = pre[:first_tproxy]
    # Only LAN ingress; own outbound mark; DNAT; local/broadcast/multicast; bypass sets.
    assert guards[1:7] == [
        "iifname != @capture_lan return",
        "meta mark @own_marks return",
        "ct status dnat return",
        "fib daddr type { local, broadcast, multicast } return",
        "ip daddr @bypass4 return",
        "ip6 daddr @bypass6 return",
    ]
    assert set_elements(text, "own_marks") == ["0x100"]
    # Every guard rule ends in return (never accept/drop: other tables still see it).
    assert all(r.endswith(" return") for r in guards[1:] if "socket" not in r)


def test_established_transparent_sockets_are_marked() -> None:
    pre = chain(render_nft(make_cfg()), "prerouting")
    assert [r for r in pre if "socket" in r] == [
        "tcp flags ! syn socket transparent 1 meta mark set 0x233 accept"]


def test_fake_ranges_go_to_tproxy_port_with_capture_mark() -> None:
    pre = chain(render_nft(make_cfg(tproxy_port=12345, appliance={"capture_mark": 0x77})),
                "prerouting")
    assert [r for r in pre if "tproxy" in r and "fake" in r] == [
        "ip daddr @fake4 meta l4proto { tcp, udp } tproxy ip to :12345 meta mark set 0x77 accept",
        "ip6 daddr @fake6 meta l4proto { tcp, udp } tproxy ip6 to :12345 meta mark set 0x77 "
        "accept",
    ]


def test_fake_ranges_never_fall_through_to_forwarding() -> None:
    pre = chain(render_nft(make_cfg()), "prerouting")
    last_tproxy = max(i for i, r in enumerate(pre) if "tproxy" in r and "fake" in r)
    assert pre[last_tproxy + 1:last_tproxy + 5] == [
        "ip daddr @fake4 meta l4proto tcp reject with tcp reset",
        "ip daddr @fake4 drop",
        "ip6 daddr @fake6 meta l4proto tcp reject with tcp reset",
        "ip6 daddr @fake6 drop",
    ]


def test_dns_hijack_to_loopback_listener_is_refused() -> None:
    with pytest.raises(CaptureError, match="loopback"):
        render_nft(make_cfg(dns=DnsConfig(listen=Listen("127.0.0.1", 53))))
    # Without hijack the listen address does not matter to the capture.
    render_nft(make_cfg(dns=DnsConfig(listen=Listen("127.0.0.1", 53)),
                        appliance={"dns_hijack": False}))


def test_no_routing_mark_no_mark_guard() -> None:
    assert set_elements(render_nft(make_cfg(routing_mark=None)), "own_marks") == []


def test_offload_maps_are_sized_and_start_empty() -> None:
    text = render_nft(make_cfg(appliance={"offload_direct": True}))
    for name in ("offload4", "offload6"):
        assert set_elements(text, name) == []
    assert text.count("size 65536") == 2
    assert chain(text, "direct_nat")[1:] == [
        "iifname != @capture_lan return",
        "dnat ip to ip daddr map @offload4",
        "dnat ip6 to ip6 daddr map @offload6",
    ]


def test_text_names_the_same_values() -> None:
    text = render_text(make_cfg(), table="gw-t")
    assert text.startswith(render_nft(make_cfg(), table="gw-t"))
    assert "table inet gw-t {" in text
    assert "delete table inet gw-t" in text
    assert 'elements = { "br-lan", "eth1" }' in text
    assert "tproxy ip to :7893 meta mark set 0x233 accept" in text
    assert "tproxy ip6 to :7893" in text
    assert "#   ip rule add fwmark 0x233 lookup 233 priority 32000" in text
    assert "#   ip -6 route add local ::/0 dev lo table 233" in text


def test_bad_configs_are_refused() -> None:
    with pytest.raises(CaptureError, match="tproxy-port"):
        render_nft(make_cfg(tproxy_port=None))
    with pytest.raises(CaptureError, match="routing-mark"):
        render_nft(make_cfg(routing_mark=0x233))


def test_empty_lan_captures_nothing() -> None:
    assert set_elements(render_nft(make_cfg(appliance={"lan": ()})), "lan") == []


def dns_rules(text: str) -> list[str]:
    return [r for r in chain(text, "prerouting") if "@hijack" in r]


def test_dns_hijack_tproxies_port_53_to_the_dns_socket() -> None:
    # TPROXY, not NAT: the query keeps the address and port asked, and when
    # no DNS socket exists (Mirage gone) the rule does not match and the
    # query goes on to the resolver asked.
    text = render_nft(make_cfg(dns=DnsConfig(listen=Listen("0.0.0.0", 1053))))
    pre = chain(text, "prerouting")
    assert dns_rules(text) == [
        "meta nfproto ipv4 meta l4proto { tcp, udp } th dport @hijack4 tproxy ip to "
        "0.0.0.0:1053 meta mark set 0x233 accept",
        "meta nfproto ipv6 meta l4proto { tcp, udp } th dport @hijack6 tproxy ip6 to "
        "[::]:1053 meta mark set 0x233 accept",
    ]
    # After every guard (LAN only, not the gateway, not bypassed) and after
    # the fake ranges (a fake IP's port 53 is a captured flow).
    assert pre.index(dns_rules(text)[0]) > pre.index("ip6 daddr @fake6 drop")
    assert not [r for r in pre if "redirect" in r or "dnat ip" in r]
    assert "chain dns" not in text


def test_dns_hijack_covers_ipv6_whatever_ipv6_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.capture import spec

    monkeypatch.setattr(spec, "_kernel_has_ipv6", lambda: True)
    for ipv6 in (True, False):
        text = render_nft(make_cfg(ipv6=ipv6))
        assert set_elements(text, "hijack4") == ["53"]
        assert set_elements(text, "hijack6") == ["53"]
    # ... and the IPv6 policy routing the TPROXY'd queries need.
    assert PolicyRouting.from_config(make_cfg(ipv6=False)).ipv6
    # The DNS service binds the dual-stack wildcard for it.
    assert spec.dns_bind(make_cfg(ipv6=False)) == Listen("::", 53)
    # Without IPv6 in the kernel, the IPv4 wildcard stays (and no v6 hijack).
    monkeypatch.setattr(spec, "_kernel_has_ipv6", lambda: False)
    assert spec.dns_bind(make_cfg(ipv6=False)) == Listen("0.0.0.0", 53)
    assert set_elements(render_nft(make_cfg(ipv6=False)), "hijack6") == []


def test_dns_hijack_to_a_specific_address_is_of_its_family() -> None:
    text = render_nft(make_cfg(dns=DnsConfig(listen=Listen("10.0.0.1", 5353))))
    assert set_elements(text, "hijack4") == ["53"] and set_elements(text, "hijack6") == []
    assert "tproxy ip to 10.0.0.1:5353" in dns_rules(text)[0]
    text6 = render_nft(make_cfg(dns=DnsConfig(listen=Listen("fd00::1", 53))))
    assert set_elements(text6, "hijack4") == [] and set_elements(text6, "hijack6") == ["53"]
    assert "tproxy ip6 to [fd00::1]:53" in dns_rules(text6)[1]


def test_no_dns_hijack_leaves_its_port_sets_empty() -> None:
    # The rules stay (the template has no conditionals); empty sets match nothing.
    for cfg in (make_cfg(appliance={"dns_hijack": False}), make_cfg(dns=DnsConfig(enable=False))):
        text = render_nft(cfg)
        assert set_elements(text, "hijack4") == [] and set_elements(text, "hijack6") == []


def test_ipv4_only_config_without_hijack_has_no_v6_routing() -> None:
    cfg = make_cfg(ipv6=False, appliance={"dns_hijack": False})
    assert set_elements(render_nft(cfg), "fake6") == []
    assert PolicyRouting.from_config(cfg).describe() == [
        "ip rule add fwmark 0x233 lookup 233 priority 32000",
        "ip route add local 0.0.0.0/0 dev lo table 233",
    ]


def test_input_chain_walls_off_the_wan_and_guards_tproxy_port() -> None:
    cfg = make_cfg(mixed_port=7890, socks_port=7891, http_port=7892,
                   external_controller=Listen("0.0.0.0", 9090),
                   dns=DnsConfig(listen=Listen("0.0.0.0", 1053)))
    text = render_nft(cfg)
    assert set_elements(text, "served_ports") == ["1053", "7890", "7891", "7892", "7893", "9090"]
    assert chain(text, "input")[1:] == [
        'iifname != @lan iifname != "lo" meta l4proto { tcp, udp } th dport @served_ports drop',
        "tcp dport 7893 meta mark != 0x233 reject with tcp reset",
        "udp dport 7893 meta mark != 0x233 reject",
    ]


def test_ebpf_table_keeps_the_wall_and_captures_nowhere() -> None:
    text = render_nft(make_cfg(), capture=False)
    assert set_elements(text, "lan") == ['"br-lan"', '"eth1"']
    assert set_elements(text, "capture_lan") == []
    for name in ("prerouting", "direct_nat", "fake_guard"):
        assert chain(text, name)[1] == "iifname != @capture_lan return"


ENCRYPTED_DNS_SETS = ("encrypted_dns_ports", "doh_ports", "doh4", "doh6")


def test_encrypted_dns_is_refused_only_with_the_option() -> None:
    # Off (the default): the chain's sets are empty, so its rules match
    # nothing (the template has no conditionals; an empty set is the off state).
    off = render_nft(make_cfg())
    assert all(set_elements(off, s) == [] for s in ENCRYPTED_DNS_SETS)
    on = render_nft(make_cfg(appliance={
        "block_encrypted_dns": True,
        "encrypted_dns_resolvers": (net("192.0.2.53/32"), net("8.8.8.0/24"), net("2001:db8::/64")),
    }))
    assert set_elements(on, "encrypted_dns_ports") == ["853"]
    assert set_elements(on, "doh_ports") == ["443"]
    doh4, doh6 = set_elements(on, "doh4"), set_elements(on, "doh6")
    # The well-known resolvers and the configured ones, overlaps collapsed
    # (8.8.8.8 inside 8.8.8.0/24: an interval set refuses overlaps).
    assert {"1.1.1.1/32", "9.9.9.9/32", "192.0.2.53/32", "8.8.8.0/24"} <= set(doh4)
    assert "8.8.8.8/32" not in doh4
    assert {"2001:4860:4860::8888/128", "2606:4700:4700::1111/128", "2001:db8::/64"} <= set(doh6)
    # Refused, not dropped (clients fall back at once), LAN only, and before
    # the capture (a lower priority than the prerouting chain's mangle), so a
    # fake IP on 853 is refused too.
    rules = chain(on, "encrypted_dns")
    assert rules[0] == "type filter hook prerouting priority mangle - 5; policy accept;"
    assert rules[1:] == [
        "iifname != @lan return",
        "meta mark @own_marks return",
        "tcp dport @encrypted_dns_ports reject with tcp reset",
        "udp dport @encrypted_dns_ports reject",
        "ip daddr @doh4 tcp dport @doh_ports reject with tcp reset",
        "ip daddr @doh4 udp dport @doh_ports reject",
        "ip6 daddr @doh6 tcp dport @doh_ports reject with tcp reset",
        "ip6 daddr @doh6 udp dport @doh_ports reject",
    ]
    # The eBPF backend's table (no capture interfaces) keeps the refusal.
    ebpf = render_nft(make_cfg(appliance={"block_encrypted_dns": True}), capture=False)
    assert set_elements(ebpf, "encrypted_dns_ports") == ["853"]
    assert set_elements(ebpf, "lan") == ['"br-lan"', '"eth1"']
