"""The config loader: what loads, what is ignored, and the key path of every
kind of error. Pure: no sockets, files only under tmp_path."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import (
    NO_VALUE,
    Config,
    ConfigError,
    DomainKeyword,
    DomainSuffix,
    Listen,
    MatchAll,
    Nameserver,
    NetworkKind,
    PortSet,
    ProxyConfig,
    Rule,
    check_runnable,
    effective_config,
    format_effective,
    format_ignored,
    load_config,
    parse_config,
)
from appliance.config.model import SkippedOutbound
from appliance.config.protocols.shadowsocks import ObfsOptions, ShadowsocksOptions
from appliance.config.protocols.trojan import TrojanOptions
from appliance.names import pattern_is_valid
from appliance.rules.engine import RuleSet
from tests.config_problem import reported

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def base() -> dict[str, Any]:
    """The smallest config that loads: DNS needs an upstream."""
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]}}


def with_(**sections: Any) -> dict[str, Any]:
    data = base()
    for key, value in sections.items():
        key = key.replace("_", "-")
        if key == "dns":
            data["dns"].update(value)
        else:
            data[key] = value
    return data


def error(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


def from_yaml(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def yaml_error(text: str, tmp_path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_yaml(text, tmp_path)
    return info.value


# --------------------------------------------------------------------------
# The examples


def test_lab_example_loads_as_the_lab_needs() -> None:
    cfg = load_config(EXAMPLES / "lab.yaml")
    assert cfg.appliance.lan == ("lan0",)
    assert cfg.dns.nameserver == (
        Nameserver(
            "https", "192.168.57.53", 443, "/dns-query", text="https://192.168.57.53/dns-query"
        ),
    )
    assert cfg.dns.ca_file == Path("/run/mirage-lab/mirage/tls/ca.pem")
    assert cfg.dns.fake_ip_filter == ("+.lan", "time.*.test")
    assert cfg.dns.fake_ip_range == ipaddress.IPv4Network("198.18.0.0/16")
    assert cfg.proxies == (
        # preconnect: the loader's default for plain proxies.
        ProxyConfig(name="dante", type="socks5", server="192.168.57.10", port=1080, udp=True,
                    preconnect=2),
        ProxyConfig(name="tinyproxy", type="http", server="192.168.57.10", port=8888,
                    preconnect=2),
    )
    assert cfg.rules == (
        Rule("DOMAIN-SUFFIX", DomainSuffix("alpha.test"), "dante"),
        Rule("DOMAIN-SUFFIX", DomainSuffix("beta.test"), "tinyproxy"),
        Rule("MATCH", MatchAll(), "DIRECT"),
    )
    assert cfg.appliance.state_dir == Path("/var/lib/mirage")
    assert cfg.store_fake_ip is True
    assert cfg.ignored_keys == ()
    assert cfg.source == (EXAMPLES / "lab.yaml").absolute()
    check_runnable(cfg)


def test_clash_profile_example_loads_and_reports_what_it_ignores() -> None:
    cfg = load_config(EXAMPLES / "clash-profile.yaml")
    ignored = set(cfg.ignored_keys)
    for key in ("tun", "sniffer", "redir-port"):
        assert key in ignored
    assert not any(k.startswith(("dns.fallback", "dns.proxy-server", "dns.nameserver"))
                   for k in ignored)
    assert cfg.mode == "rule" and "mode" not in ignored
    assert not any(k.startswith(("rule-providers", "rules[")) for k in ignored)
    assert [p.name for p in cfg.rule_providers] == ["reject"]
    assert "proxies[3] (ssr proxy 'SG 01')" in ignored
    assert not any("runs as fallback" in key for key in ignored)
    dns = cfg.dns
    assert [ns.scheme for ns in dns.nameserver] == ["https", "https", "tls"]
    assert [ns.url for ns in dns.fallback] == ["https://1.1.1.1:443/dns-query",
                                               "tls://8.8.4.4:853"]
    assert dns.fallback_filter.geoip_code == "cn"
    assert [p.pattern for p in dns.nameserver_policy][:1] == ["geosite:cn"]
    assert "geosite:private" in dns.fake_ip_filter
    assert [p.name for p in cfg.proxies] == ["HK 01", "JP 01", "US 01", "Home SOCKS",
                                             "Office HTTP"]
    groups = {g.name: g for g in cfg.proxy_groups}
    auto = groups["Auto"]
    assert (auto.type, auto.proxies, auto.tolerance) == ("url-test", ("HK 01", "JP 01", "US 01"),
                                                         50)
    assert (auto.health.url, auto.health.interval) == ("http://www.gstatic.com/generate_204",
                                                       300.0)
    assert "SG 01" not in groups["Proxy"].proxies
    assert cfg.rules[-1] == Rule("MATCH", MatchAll(), "Proxy")
    assert {"GEOIP", "GEOSITE", "RULE-SET"} <= {r.type for r in cfg.rules}
    assert [h for h, _ in cfg.dns.hosts] == ["router.lan", "nas.lan"]


REAL_WORLD = """\
# Shaped like a subscription converter's output, with anchors.
mixed-port: 7890
allow-lan: false
mode: Rule
log-level: info
external-controller: :9090
secret: from-the-converter
ipv6: true
profile: {store-selected: true}
experimental: {ignore-resolve-fail: true}
clash-for-android: {append-system-dns: false}
ntp: {enable: true, server: time.apple.com, port: 123, interval: 30}
listeners:
  - {name: in, type: socks, port: 10808}
hosts:
  'mtalk.google.com': 108.177.125.188
  'services.googleapis.cn': services.googleapis.com
dns:
  enable: true
  ipv6: true
  respect-rules: false
  use-system-hosts: false
  enhanced-mode: fake-ip
  fake-ip-range: 28.0.0.1/8
  fake-ip-filter-mode: blacklist
  fake-ip-filter: ['+.lan', '+.local', 'rule-set:private', '*.*.xboxlive.com']
  default-nameserver: [system, 223.5.5.5, '[2400:3200::1]:53']
  nameserver: ['https://dns.alidns.com/dns-query#h3=true', 'https://doh.pub/dns-query',
               'quic://dns.adguard.com:784', 'dhcp://en0']
  direct-nameserver: [system]
  nameserver-policy:
    'rule-set:cn_domain,private_domain': [https://doh.pub/dns-query]
    '+.arpa': '10.0.0.1'
x-common: &common
  udp: true
  skip-cert-verify: false
proxies:
  - {name: 'ss-aead', type: ss, server: 198.51.100.1, port: 443,
     cipher: aes-256-gcm, password: pw, udp: true, udp-over-tcp: false}
  - {name: 'ss-plugin', type: ss, server: 198.51.100.2, port: 443, cipher: aes-128-gcm,
     password: pw, plugin: obfs, plugin-opts: {mode: tls, host: example.com}}
  - {name: 'ss-old', type: ss, server: 198.51.100.3, port: 443, cipher: rc4-md5, password: pw}
  - <<: *common
    name: trojan-1
    type: trojan
    server: tj.example.net
    port: 443
    password: pw
    sni: tj.example.net
    skip-cert-verify: true
  - {name: trojan-ws, type: trojan, server: tj.example.net, port: 443, password: pw,
     network: ws, ws-opts: {path: /x}}
  - {name: hy1, type: hysteria, server: hy.example.net, port: 443, auth-str: pw}
  - {name: vless-1, type: vless, server: vl.example.net, port: 443, uuid: x, tls: true,
     reality-opts: {public-key: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA}}
proxy-groups:
  - {name: Select, type: select, proxies: [Auto, Balance, Chain, trojan-1, DIRECT]}
  - {name: Auto, type: url-test, proxies: [ss-aead, trojan-1, hy1],
     url: 'https://cp.cloudflare.com', interval: 300, lazy: true}
  - {name: Balance, type: load-balance, strategy: consistent-hashing,
     proxies: [ss-aead, ss-old], url: 'https://cp.cloudflare.com', interval: 300}
  - {name: Chain, type: relay, proxies: [ss-aead, trojan-1]}
  - {name: Dead, type: select, proxies: [hy1]}
  - {name: Provided, type: select, use: [provider1]}
  - {name: Global, type: select, include-all: true, proxies: [Select]}
proxy-providers:
  provider1: {type: http, url: 'https://example.invalid/sub', interval: 3600,
              path: ./p1.yaml, health-check: {enable: true, url: 'https://x', interval: 300}}
rules:
  - AND,((DOMAIN,baidu.com),(NETWORK,UDP)),REJECT
  - DOMAIN-REGEX,^ads?\\.,REJECT
  - DOMAIN-SUFFIX,Example.COM.,Select
  - IP-CIDR,1.1.1.1/32,Auto,no-resolve
  - IP-CIDR6,2001:db8::1/64,Global
  - SRC-IP-CIDR,192.168.1.0/24,DIRECT
  - DST-PORT,80/443/8000-9000,Select
  - GEOIP,private,DIRECT,no-resolve
  - SUB-RULE,(NETWORK,tcp),sub
  - MATCH,Select
sub-rules:
  sub: ['DOMAIN,sub.example,DIRECT']
rule-providers:
  private: {type: inline, behavior: domain, payload: [+.lan]}
  cn_domain: {type: inline, behavior: domain, payload: [+.cn]}
  private_domain: {type: inline, behavior: classical, payload: ['DOMAIN-SUFFIX,home']}
appliance:
  lan: br-lan
"""


def test_real_world_profile_loads(tmp_path: Path) -> None:
    cfg = from_yaml(REAL_WORLD, tmp_path)
    ignored = cfg.ignored_keys
    assert cfg.external_controller == Listen("0.0.0.0", 9090)
    assert cfg.dns.fake_ip_range == ipaddress.IPv4Network("28.0.0.0/8")
    assert cfg.dns.fake_ip_range6 == ipaddress.IPv6Network("fdfe:dcba:9876::/64")
    assert cfg.dns.fake_ip_filter == ("+.lan", "+.local", "rule-set:private",
                                      "*.*.xboxlive.com")
    assert [ns.host for ns in cfg.dns.default_nameserver] == ["223.5.5.5", "2400:3200::1"]
    assert [ns.url for ns in cfg.dns.nameserver] == ["https://dns.alidns.com:443/dns-query",
                                                     "https://doh.pub:443/dns-query"]
    assert "dns.nameserver[0] (nameserver option 'h3')" in ignored
    assert [(p.pattern, p.nameservers[0].host) for p in cfg.dns.nameserver_policy] == [
        ("rule-set:cn_domain", "doh.pub"), ("rule-set:private_domain", "doh.pub"),
        ("+.arpa", "10.0.0.1")
    ]
    assert dict(cfg.dns.hosts) == {"mtalk.google.com": (ipaddress.ip_address("108.177.125.188"),)}
    assert "hosts['services.googleapis.cn'] (domain alias)" in ignored
    assert "x-common (YAML anchor)" in ignored
    assert [p.name for p in cfg.proxies] == ["ss-aead", "ss-plugin", "trojan-1", "trojan-ws",
                                            "vless-1"]
    trojan = cfg.proxies[2]
    assert trojan.tls_options is not None and trojan.tls_options.skip_cert_verify
    assert trojan.udp and trojan.tls_options.sni == "tj.example.net"
    ws = cfg.proxies[3].transport
    assert ws is not None and ws.ws is not None and ws.ws.path == "/x"
    ss_plugin = cfg.proxies[1].options
    assert isinstance(ss_plugin, ShadowsocksOptions)
    assert ss_plugin.obfs == ObfsOptions("tls", "example.com")
    assert ("proxies[2] (ss proxy 'ss-old': cipher 'rc4-md5', which is not supported: "
            "insecure (a stream cipher without integrity); use an AEAD or 2022 cipher)"
            in ignored)
    reality = cfg.proxies[4].tls_options
    assert reality is not None and reality.reality is not None
    assert reality.reality.public_key == "A" * 43
    groups = {g.name: g for g in cfg.proxy_groups}
    assert (groups["Auto"].type, groups["Auto"].proxies) == ("url-test", ("ss-aead", "trojan-1"))
    assert groups["Balance"].type == "load-balance"
    assert groups["Balance"].strategy == "consistent-hashing"
    assert groups["Balance"].proxies == ("ss-aead",)
    assert groups["Chain"].type == "relay"
    assert groups["Chain"].proxies == ("ss-aead", "trojan-1")
    assert "Dead" not in groups
    assert groups["Provided"].use == ("provider1",)
    assert groups["Select"].proxies == ("Auto", "Balance", "Chain", "trojan-1", "DIRECT")
    # include-all: every proxy of the file after the named ones (skipped dropped).
    assert groups["Global"].proxies == ("Select", "ss-aead", "ss-plugin", "trojan-1", "trojan-ws",
                                        "vless-1")
    assert groups["Global"].use == ("provider1",)
    assert "proxy-groups[4] (group 'Dead' has no usable member)" in ignored
    assert [r.type for r in cfg.rules] == [
        "AND",
        "DOMAIN-REGEX",
        "DOMAIN-SUFFIX",
        "IP-CIDR",
        "IP-CIDR6",
        "SRC-IP-CIDR",
        "DST-PORT",
        "GEOIP",
        "SUB-RULE",
        "MATCH",
    ]
    assert cfg.rules[2] == Rule("DOMAIN-SUFFIX", DomainSuffix("example.com"), "Select")
    assert cfg.rules[3] == Rule(
        "IP-CIDR", ipaddress.IPv4Network("1.1.1.1/32"), "Auto", no_resolve=True
    )
    assert cfg.rules[4].value == "2001:db8::/64"
    assert cfg.rules[4].payload == ipaddress.IPv6Network("2001:db8::/64")
    assert cfg.rules[6].value == "80/443/8000-9000"
    assert cfg.rules[6].payload == PortSet(((80, 80), (443, 443), (8000, 9000)))
    assert dict(cfg.sub_rules)["sub"][0].target == "DIRECT"
    assert not any(k.startswith("rules[") for k in ignored)
    assert cfg.appliance.lan == ("br-lan",)


def test_unknown_top_level_key_is_ignored_and_an_anchor_holder_said_so(
    tmp_path: Path,
) -> None:
    # mihomo ignores both (it decodes into a struct); Mirage says which is which.
    text = "dns: {nameserver: [192.0.2.53]}\nextra: &e {a: 1}\nother: {b: 2}\n"
    cfg = from_yaml(text, tmp_path)
    assert cfg.ignored_keys == ("extra (YAML anchor)", "other (unknown key)")
    assert [(n.path, n.kind) for n in cfg.load_notes] == [("extra", "anchor"),
                                                          ("other", "unknown")]


def test_yaml_merge_keys_may_override_without_being_duplicates(tmp_path: Path) -> None:
    cfg = from_yaml(
        """\
        dns: {nameserver: ['192.0.2.53']}
        proxies:
          - &base {name: a, type: socks5, server: 192.0.2.1, port: 1080}
          - <<: *base
            name: b
            port: 1081
        """,
        tmp_path,
    )
    assert [(p.name, p.port) for p in cfg.proxies] == [("a", 1080), ("b", 1081)]


# --------------------------------------------------------------------------
# Defaults, values, normalisation


def test_minimal_config_gets_mihomo_defaults() -> None:
    cfg = parse_config(base())
    assert cfg.dns.enable is True
    assert cfg.dns.listen == Listen("0.0.0.0", 53)
    assert cfg.dns.fake_ip_range == ipaddress.IPv4Network("198.18.0.0/16")
    assert cfg.dns.fake_ip_range6 is None
    assert cfg.dns.enhanced_mode == "fake-ip"
    assert cfg.log_level == "info"
    assert cfg.mixed_port is None and cfg.routing_mark is None
    assert cfg.appliance.redirect == "nftables"
    assert cfg.appliance.lan == ()
    assert cfg.ignored_keys == ()


def test_nulls_mean_default() -> None:
    cfg = parse_config(
        {"dns": {"nameserver": ["1.1.1.1"], "listen": None}, "proxies": None, "secret": None}
    )
    assert cfg.dns.listen == Listen("0.0.0.0", 53)
    assert cfg.proxies == () and cfg.secret == ""


def test_port_zero_means_off_as_in_clash() -> None:
    assert parse_config(with_(mixed_port=0)).mixed_port is None
    assert parse_config(with_(mixed_port=0)).proxy_ports == ()


def test_derived_settings_are_decided_in_the_model() -> None:
    cfg = parse_config(with_(mixed_port=7890, port=8080, socks_port=0))
    assert cfg.proxy_ports == (("mixed-port", 7890), ("port", 8080))
    cfg = parse_config(with_(socks_port=1080))
    assert cfg.proxy_ports == (("socks-port", 1080),)
    # DNS is hijacked only when asked for and there is a DNS service to answer.
    assert parse_config(base()).hijacks_dns is True
    assert parse_config(with_(appliance={"dns-hijack": False})).hijacks_dns is False
    assert parse_config({"dns": {"enable": False}}).hijacks_dns is False
    # The IPv6 fake range is in effect only with ipv6 and dns.ipv6 both on.
    six = {"ipv6": True, "fake-ip-range6": "fd00:1::/64"}
    assert parse_config(with_(dns=six)).fake_range6 is None
    assert parse_config(with_(dns=six, ipv6=True)).fake_range6 == ipaddress.IPv6Network(
        "fd00:1::/64"
    )
    assert parse_config(with_(dns={"fake-ip-range6": "fd00:1::/64"}, ipv6=True)).fake_range6 is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://dns.example/dns-query", Nameserver("https", "dns.example", 443, "/dns-query")),
        ("https://192.0.2.1", Nameserver("https", "192.0.2.1", 443, "/dns-query")),
        ("https://192.0.2.1:8443/q", Nameserver("https", "192.0.2.1", 8443, "/q")),
        ("https://[2001:db8::1]/dns-query", Nameserver("https", "2001:db8::1", 443, "/dns-query")),
        ("udp://192.0.2.1", Nameserver("udp", "192.0.2.1", 53, "/dns-query")),
        ("tcp://192.0.2.1:5353", Nameserver("tcp", "192.0.2.1", 5353, "/dns-query")),
        ("192.0.2.1", Nameserver("udp", "192.0.2.1", 53, "/dns-query")),
        ("192.0.2.1:5353", Nameserver("udp", "192.0.2.1", 5353, "/dns-query")),
        ("2001:db8::1", Nameserver("udp", "2001:db8::1", 53, "/dns-query")),
        ("[2001:db8::1]:5353", Nameserver("udp", "2001:db8::1", 5353, "/dns-query")),
    ],
)
def test_nameserver_forms(text: str, expected: Nameserver) -> None:
    cfg = parse_config({"dns": {"nameserver": [text], "default-nameserver": ["192.0.2.53"]}})
    assert cfg.dns.nameserver == (dataclasses.replace(expected, text=text),)


@pytest.mark.parametrize(
    ("text", "note"),
    [("quic://dns.adguard.com", "quic:// nameserver"), ("dhcp://eth0", "dhcp:// nameserver"),
     ("system", "system")],
)  # fmt: skip
def test_unimplemented_nameserver_forms_are_ignored(text: str, note: str) -> None:
    cfg = parse_config({"dns": {"nameserver": [text, "192.0.2.53"]}})
    assert cfg.ignored_keys == (f"dns.nameserver[0] ({note})",)
    assert [ns.host for ns in cfg.dns.nameserver] == ["192.0.2.53"]


def test_fake_ip_range_keeps_mihomo_spelling_with_host_bits() -> None:
    cfg = parse_config(with_(dns={"fake-ip-range": "10.64.0.1/10", "fake-ip-range6": "fd00::1/64"}))
    assert cfg.dns.fake_ip_range == ipaddress.IPv4Network("10.64.0.0/10")
    assert cfg.dns.fake_ip_range6 == ipaddress.IPv6Network("fd00::/64")


def test_hosts_top_level_and_dns_hosts_merge() -> None:
    cfg = parse_config(
        with_(
            hosts={"a.lan": "192.0.2.1", "B.Lan.": ["192.0.2.2", "2001:db8::2"]},
            dns={"hosts": {"a.lan": ["192.0.2.9", "192.0.2.1"], "c.lan": "192.0.2.3"}},
        )
    )
    ip = ipaddress.ip_address
    assert dict(cfg.dns.hosts) == {
        "a.lan": (ip("192.0.2.1"), ip("192.0.2.9")),
        "b.lan": (ip("192.0.2.2"), ip("2001:db8::2")),
        "c.lan": (ip("192.0.2.3"),),
    }


def test_patterns_are_normalised() -> None:
    cfg = parse_config(
        with_(dns={"fake-ip-filter": ["+.LAN", "*.Example.com.", ".home", "bücher.de", "+.lan"]})
    )
    assert cfg.dns.fake_ip_filter == ("+.lan", "*.example.com", ".home", "xn--bcher-kva.de")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = from_yaml(
        """\
        dns: {nameserver: [192.0.2.53], ca-file: certs/ca.pem}
        appliance: {state-dir: state}
        """,
        tmp_path,
    )
    assert cfg.dns.ca_file == tmp_path / "certs/ca.pem"
    assert cfg.appliance.state_dir == tmp_path / "state"


def test_appliance_extensions() -> None:
    cfg = parse_config(
        with_(
            appliance={
                "lan": ["br-lan", "wlan0"],
                "redirect": "ebpf",
                "dns-hijack": False,
                "bypass": ["192.168.0.1/16", "fd00::/8"],
                "store-flush-interval": 0.5,
                "route-table": 100,
                "capture-mark": 0x1000,
                "connect-timeout": 3,
                "idle-timeout": 60.0,
            }
        )
    )
    a = cfg.appliance
    assert a.lan == ("br-lan", "wlan0") and a.redirect == "ebpf" and not a.dns_hijack
    assert a.bypass == (ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("fd00::/8"))
    assert (a.store_flush_interval, a.route_table, a.capture_mark) == (0.5, 100, 0x1000)
    assert (a.connect_timeout, a.idle_timeout) == (3.0, 60.0)
    assert not a.block_encrypted_dns and a.encrypted_dns_resolvers == ()


def test_encrypted_dns_keys() -> None:
    a = parse_config(with_(appliance={
        "block-encrypted-dns": True,
        "encrypted-dns-resolvers": ["192.0.2.7", "2001:db8::/64", "192.0.2.7/32"],
    })).appliance
    assert a.block_encrypted_dns
    # Host addresses are /32 or /128 networks; duplicates dropped, order kept.
    assert a.encrypted_dns_resolvers == (ipaddress.ip_network("192.0.2.7/32"),
                                         ipaddress.ip_network("2001:db8::/64"))


def test_rules_after_match_are_reported() -> None:
    cfg = parse_config(with_(rules=["MATCH,DIRECT", "DOMAIN,a.test,REJECT", "MATCH,REJECT"]))
    assert cfg.rules == (Rule("MATCH", MatchAll(), "DIRECT"),)
    assert cfg.ignored_keys == ("rules[1].. (2 rule(s) after MATCH never run)",)


def test_dns_disabled_needs_no_nameserver() -> None:
    assert parse_config({"dns": {"enable": False}}).dns.nameserver == ()


def test_effective_config_round_trips() -> None:
    for path in (EXAMPLES / "lab.yaml", EXAMPLES / "clash-profile.yaml"):
        cfg = load_config(path)
        again = parse_config(effective_config(cfg), source=cfg.source)
        # Skipped proxies are left out of the effective config, as ignored keys are.
        assert again == dataclasses.replace(cfg, ignored_keys=(), skipped=())


def test_effective_config_round_trips_every_field() -> None:
    cfg = parse_config(
        {
            "mode": "global",
            "mixed-port": 7890,
            "socks-port": 7891,
            "port": 7892,
            "authentication": ["u:p", "v:w:x"],
            "allow-lan": False,
            "bind-address": "192.0.2.1",
            "tproxy-port": 7893,
            "routing-mark": 0,
            "ipv6": True,
            "log-level": "debug",
            "external-controller": "[::1]:9090",
            "secret": "s",
            "profile": {"store-fake-ip": True},
            "hosts": {"a.lan": "192.0.2.1", "+.b.lan": ["192.0.2.2", "2001:db8::2"]},
            "dns": {
                "enable": True,
                "listen": "[::]:1053",
                "ipv6": True,
                "enhanced-mode": "fake-ip",
                "fake-ip-range": "10.128.0.1/9",
                "fake-ip-filter": ["time.*.test", ".home"],
                "fake-ip-filter-mode": "whitelist",
                "default-nameserver": ["tcp://192.0.2.53:5353"],
                "nameserver": ["https://doh.example:8443/q", "udp://[2001:db8::53]"],
                "nameserver-policy": {"+.corp,*.x.test": ["192.0.2.54"]},
                "ca-file": "/etc/ssl/lab.pem",
                "upstream-timeout": 0.5,
                "cache-size": 0,
            },
            "proxies": [
                {"name": "d", "type": "direct"},
                {"name": "r", "type": "reject"},
                {"name": "s5", "type": "socks5", "server": "192.0.2.1", "port": 1,
                 "username": "u", "password": "", "tls": True, "skip-cert-verify": True},
                {"name": "t", "type": "trojan", "server": "t.example", "port": 443,
                 "password": "p", "sni": "sni.example", "udp": True},
            ],
            "proxy-groups": [{"name": "g", "type": "fallback", "proxies": ["t", "s5", "d"]}],
            "rules": ["NETWORK,udp,r", "SRC-PORT,1-1023,g", "MATCH,REJECT"],
            "appliance": {
                "lan": ["lan0"], "redirect": "auto", "dns-hijack": False,
                "bypass": ["2001:db8:ff::/48"], "state-dir": "/tmp/x", "route-table": 7,
                "capture-mark": 1, "store-flush-interval": 2, "connect-timeout": 1,
                "idle-timeout": 9, "udp-timeout": 10, "udp-max-sessions": 5,
                "limits": {"flows-per-client": 7, "flows-total": 100,
                           "proxy-connections-per-client": 6, "dns-upstream-per-client": 5,
                           "dns-tcp-per-client": 4, "fake-ip-rate-per-client": 2.5,
                           "fake-ip-burst-per-client": 3},
                "block-encrypted-dns": True,
                "encrypted-dns-resolvers": ["192.0.2.0/24", "2001:db8::53"],
            },
        }
    )  # fmt: skip
    assert cfg.ignored_keys == ()
    assert cfg.dns.fake_ip_range6 == ipaddress.IPv6Network("fdfe:dcba:9876::/64")
    assert parse_config(effective_config(cfg)) == cfg
    assert parse_config(yaml.safe_load(format_effective(cfg, redact=False))) == cfg


def test_format_effective_is_yaml_with_secrets_redacted() -> None:
    cfg = load_config(EXAMPLES / "clash-profile.yaml")
    shown = yaml.safe_load(format_effective(cfg))
    assert shown["secret"] == "<redacted>"
    assert {p.get("password") for p in shown["proxies"]} <= {"<redacted>", None}
    assert shown["dns"]["fake-ip-range"] == "198.18.0.0/16"
    assert shown["appliance"]["capture-mark"] == 0x233
    assert "change-me" not in format_effective(cfg)
    # One line per kind of what is left out, not one per key.
    lines = format_ignored(cfg).splitlines()
    assert "ignored (no meaning on a gateway): redir-port, find-process-mode, tun" in lines
    assert any(line.startswith("ignored (not implemented by Mirage): ") for line in lines)
    assert len(lines) == len({line.split(":")[0] for line in lines})
    assert format_ignored(parse_config(base())) == ""


def test_check_runnable_needs_a_lan() -> None:
    with pytest.raises(ConfigError) as info:
        check_runnable(parse_config(base()))
    assert info.value.path == "appliance.lan"


# --------------------------------------------------------------------------
# Errors: one per kind, each with its exact key path


def test_error_str_reads_path_value_reason() -> None:
    err = error(with_(dns={"fake-ip-range": "10.0.0.0/33"}))
    assert (err.path, err.value) == ("dns.fake-ip-range", "10.0.0.0/33")
    assert str(err).startswith("dns.fake-ip-range: '10.0.0.0/33': not an IPv4 network (")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.path == "<file>"
    assert "No such file" in info.value.reason


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    err = yaml_error("dns:\n  nameserver: [1.1.1.1\nrules: []\n", tmp_path)
    assert err.path == "<file>" and err.value is NO_VALUE
    assert "line 3" in err.reason and "column" in err.reason


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    err = yaml_error("mixed-port: 1\ndns: {nameserver: [1.1.1.1]}\nmixed-port: 2\n", tmp_path)
    assert err.path == "<file>" and "duplicate key 'mixed-port'" in err.reason
    assert "line 3" in err.reason


def test_top_level_must_be_a_mapping() -> None:
    assert error(["a"]).path == "<top level>"


def test_non_string_key() -> None:
    err = error({**base(), 1: "x"})
    assert err.path == "1" and "keys must be strings" in err.reason


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"mixd-port": 1}, "mixd-port"),
        ({"dns": {"nameserver": ["1.1.1.1"], "fake-ip-rang": "1.0.0.0/8"}}, "dns.fake-ip-rang"),
        ({"profile": {"store-fakeip": True}}, "profile.store-fakeip"),
        ({"proxies": [{"name": "p", "type": "socks5", "server": "h", "port": 1, "sni": "x"}]},
         "proxies[0].sni"),
        ({"proxy-groups": [{"name": "g", "type": "select", "proxies": ["DIRECT"], "x": 1}]},
         "proxy-groups[0].x"),
    ],
)  # fmt: skip
def test_unknown_keys_are_ignored_with_a_warning(data: dict[str, Any], path: str) -> None:
    # Was an error; mihomo ignores keys it has no field for, so a profile it
    # loads must load here too (issue 13).
    data = {**base(), **data} if "dns" not in data else data
    cfg = parse_config(data)
    assert [(n.path, n.kind) for n in cfg.load_notes if n.kind == "unknown"] == [
        (path, "unknown")]


def test_unknown_key_in_the_appliance_block_is_still_an_error() -> None:
    # Mirage's own block: no mihomo behaviour to follow, and a typo there
    # would silently change what the gateway does.
    for data, path in [({"appliance": {"interfaces": ["eth0"]}}, "appliance.interfaces"),
                       ({"appliance": {"limits": {"flows": 1}}}, "appliance.limits.flows")]:
        err = error({**base(), **data})
        assert err.path == path and err.reason.startswith("unknown key")


def test_unknown_key_suggests_the_near_one() -> None:
    cfg = parse_config({**base(), "mixd-port": 1})
    assert "mixd-port (unknown key; did you mean 'mixed-port'?)" in cfg.ignored_keys


@pytest.mark.parametrize(
    ("yaml_text", "path", "reason"),
    [
        ('mixed-port: "7890"', "mixed-port", "expected a port number, got a string"),
        ("tproxy-port: 70000", "tproxy-port", "out of range"),
        ("tproxy-port: true", "tproxy-port", "got a boolean"),
        ("routing-mark: -1", "routing-mark", "out of range"),
        ("routing-mark: 4294967296", "routing-mark", "out of range"),
        ('ipv6: "true"', "ipv6", "expected a boolean"),
        ("ipv6: 1", "ipv6", "expected a boolean"),
        ("log-level: verbose", "log-level", "must be one of"),
        ("secret: [1234]", "secret", "expected a string"),
        ("external-controller: localhost:9090", "external-controller", "not an IP"),
        ("external-controller: 127.0.0.1", "external-controller", "needs a port"),
        ("profile: {store-fake-ip: yes please}", "profile.store-fake-ip", "boolean"),
        ("appliance: {redirect: iptables}", "appliance.redirect", "must be one of"),
        ("appliance: {lan: [eth0, 'a b']}", "appliance.lan[1]", "interface name"),
        ("appliance: {lan: [eth0, eth0]}", "appliance.lan[1]", "listed twice"),
        ("appliance: {bypass: [10.0.0.0/8, 10.0.0.256/8]}", "appliance.bypass[1]", "network"),
        ("appliance: {bypass: 10.0.0.0/8}", "appliance.bypass", "expected a list"),
        ("appliance: {route-table: 254}", "appliance.route-table", "main"),
        ("appliance: {capture-mark: 0}", "appliance.capture-mark", "out of range"),
        ('appliance: {idle-timeout: "5"}', "appliance.idle-timeout", "seconds"),
        ("appliance: {connect-timeout: 0}", "appliance.connect-timeout", "more than 0"),
        ("appliance: {state-dir: ''}", "appliance.state-dir", "empty"),
        ("appliance: [lan0]", "appliance", "expected a mapping"),
        ("appliance: {offload-direct: 1}", "appliance.offload-direct", "boolean"),
        ("appliance: {block-encrypted-dns: 'always'}", "appliance.block-encrypted-dns", "boolean"),
        ("appliance: {encrypted-dns-resolvers: [dns.google]}",
         "appliance.encrypted-dns-resolvers[0]", "network"),
        ("appliance: {encrypted-dns-resolvers: 8.8.8.8}", "appliance.encrypted-dns-resolvers",
         "expected a list"),
        ("appliance: {redirect: ebpf, offload-direct: true}", "appliance.offload-direct",
         "needs appliance.redirect nftables"),
    ],
)
def test_top_level_and_appliance_values(
    yaml_text: str, path: str, reason: str, tmp_path: Path
) -> None:
    err = yaml_error("dns: {nameserver: [192.0.2.53]}\n" + yaml_text + "\n", tmp_path)
    assert err.path == path
    assert reason in err.reason


@pytest.mark.parametrize(
    ("dns", "path", "reason"),
    [
        ({"listen": "0.0.0.0"}, "dns.listen", "needs a port"),
        ({"listen": 53}, "dns.listen", "expected a string"),
        ({"enable": "true"}, "dns.enable", "boolean"),
        ({"enhanced-mode": "fakeip"}, "dns.enhanced-mode", "must be one of"),
        ({"fake-ip-range": "fd00::/64"}, "dns.fake-ip-range", "not an IPv4 network"),
        ({"fake-ip-range": "10.0.0.0/31"}, "dns.fake-ip-range", "/30"),
        ({"fake-ip-range": "10.0.0.1"}, "dns.fake-ip-range", "prefix length"),
        ({"fake-ip-range6": "10.0.0.0/8"}, "dns.fake-ip-range6", "not an IPv6 network"),
        ({"fake-ip-range6": "fd00::/127"}, "dns.fake-ip-range6", "/126"),
        ({"fake-ip-filter": ["+.lan", "a..b"]}, "dns.fake-ip-filter[1]", "invalid label"),
        ({"fake-ip-filter": ["ok", "+.x.+"]}, "dns.fake-ip-filter[1]", "invalid label"),
        ({"fake-ip-filter": ["a.+.b"]}, "dns.fake-ip-filter[0]", "invalid label"),
        ({"fake-ip-filter": "+.lan"}, "dns.fake-ip-filter", "expected a list"),
        ({"fake-ip-filter-mode": "list"}, "dns.fake-ip-filter-mode", "must be one of"),
        ({"nameserver": ["udp://dns.google"]}, "dns.nameserver[0]", "not an IP address"),
        ({"nameserver": ["dns.google"]}, "dns.nameserver[0]", "not an IP address"),
        ({"nameserver": ["https://1.1.1.1:99999/q"]}, "dns.nameserver[0]", "out of range"),
        ({"nameserver": ["ftp://1.1.1.1"]}, "dns.nameserver[0]", "unknown nameserver scheme"),
        ({"nameserver": ["https:///dns-query"]}, "dns.nameserver[0]", "missing host"),
        ({"nameserver": ["quic://1.1.1.1"]}, "dns.nameserver", "no usable nameserver"),
        ({"nameserver": []}, "dns.nameserver", "no usable nameserver"),
        ({"nameserver": [53]}, "dns.nameserver[0]", "expected a string"),
        ({"nameserver": ["quic://x", "https://doh.example/dns-query"], "default-nameserver": []},
         "dns.nameserver[1]",
         "dns.default-nameserver"),
        ({"nameserver-policy": {"+.a": ["1.1.1.1", "https://doh.example"]},
          "default-nameserver": []},
         "dns.nameserver-policy['+.a'][1]", "dns.default-nameserver"),
        ({"default-nameserver": ["https://dns.google/dns-query"]}, "dns.default-nameserver[0]",
         "must be given by IP address"),
        ({"default-nameserver": ["dns.google"]}, "dns.default-nameserver[0]", "not an IP"),
        ({"nameserver-policy": {"+.corp": "udp://ns.corp"}}, "dns.nameserver-policy['+.corp']",
         "not an IP address"),
        ({"nameserver-policy": {"+.corp": None}}, "dns.nameserver-policy['+.corp']",
         "at least one"),
        ({"nameserver-policy": {"a..b": "1.1.1.1"}}, "dns.nameserver-policy['a..b']",
         "invalid label"),
        ({"hosts": {"a.lan": "300.0.0.1"}}, "dns.hosts['a.lan']", "not an IP address"),
        ({"hosts": {"a.lan": [1]}}, "dns.hosts['a.lan'][0]", "expected an IP address"),
        ({"hosts": {"a.lan": []}}, "dns.hosts['a.lan']", "at least one"),
        ({"ca-file": 5}, "dns.ca-file", "expected a string"),
        ({"upstream-timeout": -1}, "dns.upstream-timeout", "more than 0"),
        ({"cache-size": 1.5}, "dns.cache-size", "expected an integer"),
    ],
)  # fmt: skip
def test_dns_values(dns: dict[str, Any], path: str, reason: str) -> None:
    data = {"dns": {"nameserver": ["192.0.2.53"], **dns}}
    # Raised, or (a fake-ip-filter entry mihomo loads and never matches)
    # the reason it is left out.
    err = reported(data)
    assert err.path == path
    assert reason in err.reason


def test_top_level_hosts_error_path() -> None:
    err = error(with_(hosts={"a.lan": "1.2.3"}))
    assert err.path == "hosts['a.lan']"


def test_missing_dns_section_says_nameserver_is_required() -> None:
    err = error({})
    assert (err.path, err.value) == ("dns.nameserver", NO_VALUE)
    assert str(err) == "dns.nameserver: required when dns.enable is true"


SOCKS = {"name": "s", "type": "socks5", "server": "192.0.2.1", "port": 1080}


@pytest.mark.parametrize(
    ("proxies", "path", "reason"),
    [
        ([SOCKS, {**SOCKS}], "proxies[1].name", "duplicate proxy name"),
        ([{**SOCKS, "name": "DIRECT"}], "proxies[0].name", "reserved"),
        ([{**SOCKS, "name": ""}], "proxies[0].name", "empty"),
        ([{"type": "socks5", "server": "h", "port": 1}], "proxies[0].name", "required"),
        ([{**SOCKS, "type": "sock5"}], "proxies[0].type", "unknown proxy type"),
        ([{k: v for k, v in SOCKS.items() if k != "port"}], "proxies[0].port", "required"),
        ([{**SOCKS, "port": "1o80"}], "proxies[0].port", "got a string"),
        ([{**SOCKS, "port": 0}], "proxies[0].port", "out of range"),
        ([{**SOCKS, "server": "bad host"}], "proxies[0].server", "invalid label"),
        ([{**SOCKS, "udp": "true"}], "proxies[0].udp", "boolean"),
        ([{**SOCKS, "username": "u"}], "proxies[0].password", "go together"),
        ([{**SOCKS, "preconnect": 65}], "proxies[0].preconnect", "out of range"),
        ([{**SOCKS, "preconnect": -1}], "proxies[0].preconnect", "out of range"),
        ([{**SOCKS, "preconnect": "2"}], "proxies[0].preconnect", "got a string"),
        ([{**SOCKS, "type": "http", "tls": True, "preconnect": 2}], "proxies[0].preconnect",
         "plain TCP"),
        ([{"name": "ss", "type": "ss", "server": "h.example", "port": 1, "password": "p"}],
         "proxies[0].cipher", "required"),
        ([{"name": "t", "type": "trojan", "server": "h.example", "port": 443}],
         "proxies[0].password", "required"),
        ("not a list", "proxies", "expected a list"),
        (["socks5://h:1"], "proxies[0]", "expected a mapping"),
    ],
)  # fmt: skip
def test_proxy_errors(proxies: Any, path: str, reason: str) -> None:
    # Raised, or the reason its proxy is skipped (a value mihomo loads).
    err = reported(with_(proxies=proxies))
    assert err.path == path
    assert reason in err.reason


def test_preconnect_defaults_and_values() -> None:
    cfg = parse_config(with_(proxies=[
        SOCKS,
        {**SOCKS, "name": "off", "preconnect": 0},
        {**SOCKS, "name": "many", "preconnect": 64},
        {"name": "h", "type": "http", "server": "192.0.2.2", "port": 3128},
        {"name": "hs", "type": "http", "server": "192.0.2.2", "port": 443, "tls": True},
    ]))
    # Plain proxies keep 2 by default; a TLS proxy none (kept ones are plain TCP).
    assert [p.preconnect for p in cfg.proxies] == [2, 0, 64, 2, 0]


def test_proxy_types() -> None:
    cfg = parse_config(
        with_(
            proxies=[
                {"name": "h", "type": "http", "server": "Proxy.Example", "port": 3128,
                 "username": "u", "password": "p", "tls": True, "sni": "proxy.example",
                 "skip-cert-verify": True},
                {"name": "ss", "type": "ss", "server": "2001:db8::1", "port": 8388,
                 "cipher": "aes-128-gcm", "password": "p", "udp": True},
                {"name": "t", "type": "trojan", "server": "t.example", "port": 443,
                 "password": "p"},
                {"name": "d", "type": "direct"},
            ]
        )
    )  # fmt: skip
    h, ss, t, d = cfg.proxies
    assert h == ProxyConfig(
        "h", "http", "proxy.example", 3128, "u", "p", True, True, "proxy.example", False
    )
    assert ss.server == "2001:db8::1" and ss.udp
    assert ss.options == ShadowsocksOptions("aes-128-gcm", "p")
    assert t.tls_options is not None and t.tls_options.sni is None and not t.udp
    assert t.options == TrojanOptions(password="p")
    assert d == ProxyConfig("d", "direct")


G = "proxy-groups"


@pytest.mark.parametrize(
    ("groups", "path", "reason"),
    [
        ([{"name": "g", "type": "select", "proxies": ["s", "nope"]}], "proxy-groups[0].proxies[1]",
         "no proxy or group"),
        ([{"name": "g", "type": "select", "proxies": ["g"]}], "proxy-groups[0].proxies[0]",
         "itself"),
        ([{"name": "a", "type": "select", "proxies": ["b"]},
          {"name": "b", "type": "fallback", "proxies": ["a", "s"]}], "proxy-groups[1].proxies",
         "contain each other"),
        ([{"name": "g", "type": "smart", "proxies": ["s"]}], "proxy-groups[0].type",
         "unknown group type"),
        ([{"name": "s", "type": "select", "proxies": ["DIRECT"]}], "proxy-groups[0].name",
         "duplicate name"),
        ([{"name": "REJECT", "type": "select", "proxies": ["DIRECT"]}], "proxy-groups[0].name",
         "reserved"),
        ([{"name": "g", "type": "select"}], "proxy-groups[0].proxies", "needs members"),
        ([{"name": "g", "type": "select", "proxies": "s"}], "proxy-groups[0].proxies",
         "expected a list"),
    ],
)  # fmt: skip
def test_group_errors(groups: Any, path: str, reason: str) -> None:
    err = error(with_(proxies=[SOCKS], proxy_groups=groups))
    assert err.path == path
    assert reason in err.reason


def test_groups_may_name_later_groups() -> None:
    cfg = parse_config(
        with_(
            proxies=[SOCKS],
            proxy_groups=[
                {"name": "a", "type": "select", "proxies": ["b", "DIRECT"]},
                {"name": "b", "type": "fallback", "proxies": ["s", "REJECT"]},
            ],
        )
    )
    assert [g.proxies for g in cfg.proxy_groups] == [("b", "DIRECT"), ("s", "REJECT")]


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ("DOMAIN,a.test,nope", "names no proxy, group, DIRECT or REJECT"),
        ("DOMAIN,a.test,direct", "names no proxy"),
        ("FOO,a.test,DIRECT", "unknown rule type"),
        ("DOMAIN,a.test", "expected DOMAIN,VALUE,TARGET"),
        ("MATCH", "expected MATCH,TARGET"),
        ("MATCH,DIRECT,no-resolve", "expected MATCH,TARGET"),
        ("DOMAIN,*.a.test,DIRECT", "wildcards are not allowed"),
        ("DOMAIN-SUFFIX,,DIRECT", "empty"),
        ("DOMAIN-KEYWORD,a b,DIRECT", "keyword"),
        ("IP-CIDR,10.0.0.0/33,DIRECT", "not an IP network"),
        ("IP-CIDR6,zz::/64,DIRECT", "not an IP network"),
        ("IP-CIDR6,10.0.0.0/8,DIRECT", "needs an IPv6 network"),
        ("NETWORK,icmp,DIRECT", "tcp or udp"),
        ("SRC-PORT,65536,DIRECT", "out of range"),
        ("SRC-IP-CIDR,nope,DIRECT", "not an IP network"),
        ("DST-PORT,0,DIRECT", "out of range"),
        ("DST-PORT,9000-8000,DIRECT", "backwards"),
        ("DST-PORT,http,DIRECT", "not a number"),
        ("IP-CIDR,10.0.0.0/8,DIRECT,srcs", "unknown rule option"),
        ("", "empty"),
    ],
)
def test_rule_errors(rule: str, reason: str) -> None:
    data = with_(
        proxies=[SOCKS, {"name": "v", "type": "vmess", "server": "x", "port": 1, "uuid": "u",
                         "alterId": 64}],
        proxy_groups=[{"name": "dead", "type": "select", "proxies": ["v"]}],
        rules=["DOMAIN,ok.test,s", rule],
    )
    err = error(data)
    assert err.path == "rules[1]"
    assert reason in err.reason


def test_a_numeric_secret_is_its_text() -> None:
    # mihomo -t loads `secret: 123456` (tests/profiles/lvbibir.yaml).
    assert parse_config({"dns": {"enable": False}, "secret": 123456}).secret == "123456"


def test_rules_may_name_skipped_outbounds() -> None:
    # mihomo would use them, so the profile loads; the flows go to COMPATIBLE.
    cfg = parse_config(with_(
        proxies=[SOCKS, {"name": "v", "type": "vmess", "server": "x", "port": 1, "uuid": "u",
                         "alterId": 64}],
        proxy_groups=[{"name": "dead", "type": "select", "proxies": ["v"]}],
        rules=["DOMAIN,a.test,v", "DOMAIN,b.test,dead", "MATCH,s"],
    ))
    assert [r.target for r in cfg.rules] == ["v", "dead", "s"]
    assert cfg.skipped == (
        SkippedOutbound("v", "proxy", "a vmess proxy with alterId 64 (the legacy VMess header; "
                        "only alterId 0)"),
        SkippedOutbound("dead", "group", "a group with no member Mirage can use"),
    )
    assert effective_config(cfg)["rules"] == ["DOMAIN,a.test,COMPATIBLE",
                                              "DOMAIN,b.test,COMPATIBLE", "MATCH,s"]


def _as_run(cfg: Config) -> Config:
    """`cfg` as its effective config spells it: no ignored keys or skipped
    outbounds, and rules that named a skipped one naming COMPATIBLE."""
    gone = {s.name for s in cfg.skipped}

    def run(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        return tuple(dataclasses.replace(r, target="COMPATIBLE")
                     if r.type != "SUB-RULE" and r.target in gone else r for r in rules)

    return dataclasses.replace(cfg, ignored_keys=(), skipped=(), rules=run(cfg.rules),
                               sub_rules=tuple((n, run(rs)) for n, rs in cfg.sub_rules))


def test_rule_forms() -> None:
    cfg = parse_config(
        with_(
            rules=[
                "domain-suffix,.Example.com,DIRECT",
                "SRC-PORT,1024-65535,REJECT",
                "NETWORK,UDP,REJECT",
                "DOMAIN-KEYWORD,Ads,REJECT",
                " DST-PORT , 443 , DIRECT ",
                "FINAL,DIRECT",
            ]
        )
    )
    assert cfg.rules == (
        Rule("DOMAIN-SUFFIX", DomainSuffix("example.com"), "DIRECT"),
        Rule("SRC-PORT", PortSet(((1024, 65535),)), "REJECT"),
        Rule("NETWORK", NetworkKind("udp"), "REJECT"),
        Rule("DOMAIN-KEYWORD", DomainKeyword("ads"), "REJECT"),
        Rule("DST-PORT", PortSet(((443, 443),)), "DIRECT"),
        Rule("MATCH", MatchAll(), "DIRECT"),
    )


def test_loaded_rules_compile_in_the_rule_engine() -> None:
    for name in ("lab.yaml", "clash-profile.yaml"):
        RuleSet(load_config(EXAMPLES / name).rules)


def test_rule_not_a_string() -> None:
    err = error(with_(rules=[{"DOMAIN": "x"}]))
    assert err.path == "rules[0]" and "expected a string" in err.reason


@pytest.mark.parametrize(
    ("data", "path", "reason"),
    [
        ({"routing-mark": 0x233}, "routing-mark", "capture-mark"),
        ({"appliance": {"bypass": ["198.0.0.0/7"]}}, "appliance.bypass[0]", "fake-IP range"),
        ({"mixed-port": 7890, "tproxy-port": 7890}, "tproxy-port", "already used by mixed-port"),
        ({"external-controller": "127.0.0.1:53"}, "dns.listen", "external-controller"),
    ],
)
def test_cross_checks(data: dict[str, Any], path: str, reason: str) -> None:
    err = error({**base(), **data})
    assert err.path == path
    assert reason in err.reason


def test_distinct_addresses_may_share_a_port() -> None:
    cfg = parse_config(
        with_(external_controller="127.0.0.1:1053", dns={"listen": "192.0.2.1:1053"})
    )
    assert cfg.external_controller == Listen("127.0.0.1", 1053)


# --------------------------------------------------------------------------
# Fuzz: whatever the input, the loader answers Config or ConfigError.

KEYS = [
    "mixed-port", "tproxy-port", "routing-mark", "ipv6", "log-level",
    "external-controller", "secret", "profile", "store-fake-ip", "dns", "hosts",
    "enable", "listen", "fake-ip-range", "fake-ip-range6", "fake-ip-filter",
    "nameserver", "default-nameserver", "nameserver-policy", "proxies",
    "proxy-groups", "rules", "appliance", "lan", "bypass", "redirect", "name",
    "type", "server", "port", "password", "cipher", "tun", "fallback",
    "socks-port", "authentication", "allow-lan", "bind-address", "udp-timeout",
    "udp-max-sessions", "limits", "flows-per-client", "flows-total",
    "fake-ip-rate-per-client",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(
        ["1.1.1.1", "https://1.1.1.1/dns-query", "tls://x", "198.18.0.1/16", "fd00::/64",
         "socks5", "ss", "select", "url-test", "MATCH,DIRECT", "DOMAIN,a.b,DIRECT",
         "IP-CIDR,1.0.0.0/8,X", "+.lan", "lan0", "DIRECT", "aes-128-gcm", ":9090"]
    ),
)  # fmt: skip
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=10))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=25,
)


def _outcome(data: Any) -> None:
    try:
        cfg = parse_config(data)
    except ConfigError as exc:
        assert isinstance(exc.path, str) and isinstance(exc.reason, str)
        str(exc)
        return
    assert isinstance(cfg, Config)
    # Nothing downstream re-checks: whatever loads, the rule engine compiles
    # and the DNS tries take every pattern.
    RuleSet(cfg.rules)
    patterns = [
        *cfg.dns.fake_ip_filter,
        *(name for name, _ in cfg.dns.hosts),
        *(p.pattern for p in cfg.dns.nameserver_policy),
    ]
    # `geosite:CODE` / `rule-set:NAME` entries are sets, not patterns.
    patterns = [p for p in patterns if not p.startswith(("geosite:", "rule-set:"))]
    assert [p for p in patterns if pattern_is_valid(p) is not None] == []
    # Whatever loads renders, and the rendering loads to the same model.
    again = parse_config(effective_config(cfg))
    assert again == _as_run(cfg)
    format_effective(cfg)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=8))
def test_random_documents_load_or_raise_config_error(data: dict[str, Any]) -> None:
    _outcome(data)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


LAB = yaml.safe_load((EXAMPLES / "clash-profile.yaml").read_text())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_real_profile_loads_or_raises_config_error(data: st.DataObject) -> None:
    doc = copy.deepcopy(LAB)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        target = data.draw(st.sampled_from(paths))
        parent = doc
        for step in target[:-1]:
            parent = parent[step]
        if data.draw(st.booleans()):
            parent[target[-1]] = data.draw(values)
        elif isinstance(parent, dict):
            del parent[target[-1]]
        else:
            parent.pop(target[-1])
        if not isinstance(doc, dict):
            break
    _outcome(doc)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_random_text_files_load_or_raise_config_error(text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        try:
            load_config(f.name)
        except ConfigError:
            pass


def test_limits_default_and_validate_with_key_paths() -> None:
    d = parse_config(base()).appliance.limits
    assert (d.flows_per_client, d.flows_total, d.dns_upstream_per_client) == (1024, None, 128)
    cfg = parse_config(with_(appliance={"limits": {"flows-total": "auto",
                                                  "fake-ip-rate-per-client": 10}}))
    assert cfg.appliance.limits.flows_total is None
    assert cfg.appliance.limits.fake_ip_rate_per_client == 10.0
    for limits, path in [
        ({"flows-per-client": 0}, "appliance.limits.flows-per-client"),
        ({"flows-per-client": True}, "appliance.limits.flows-per-client"),
        ({"flows-total": 10}, "appliance.limits.flows-total"),
        ({"flows-total": "lots"}, "appliance.limits.flows-total"),
        ({"flows-per-client": 500, "flows-total": 100}, "appliance.limits.flows-per-client"),
        ({"fake-ip-rate-per-client": 0}, "appliance.limits.fake-ip-rate-per-client"),
        ({"fake-ip-burst-per-client": 0.5}, "appliance.limits.fake-ip-burst-per-client"),
        ({"dns-tcp-per-clients": 3}, "appliance.limits.dns-tcp-per-clients"),
        ("many", "appliance.limits"),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_config(with_(appliance={"limits": limits}))
        assert err.value.path == path, (limits, err.value)


def test_udp_behind_a_dialer_proxy_is_said_at_load(caplog: pytest.LogCaptureFixture) -> None:
    # mihomo carries this proxy's UDP through socks-a; Mirage does not
    # (tests/integration/test_differential.py asserts both routings).
    parse_config({"dns": {"enable": False}, "proxies": [
        {"name": "socks-a", "type": "socks5", "server": "192.0.2.1", "port": 1080, "udp": True},
        {"name": "b-via-a", "type": "socks5", "server": "192.0.2.2", "port": 1080, "udp": True,
         "dialer-proxy": "socks-a"}]})
    assert "SOCKS5 proxy behind a dialer-proxy ('b-via-a')" in caplog.text
    assert "'socks-a'" not in caplog.text
