"""RuleSet: first-match order across rule kinds, each kind's semantics, and
speed with 10k rules (checked against a naive top-down reference). Rules
are made as the loader makes them (`parse_rule`): the engine only ever sees
typed payloads."""

from __future__ import annotations

import ipaddress
import random
import time

import pytest

from appliance.config import ConfigError, DomainName, Rule, parse_config, parse_rule
from appliance.rules.engine import FlowContext, RuleSet

ip = ipaddress.ip_address


def rule(line: str) -> Rule:
    return parse_rule(line)


def ctx(
    domain: str | None = None,
    dst: str | None = None,
    port: int = 443,
    src: str | None = "192.168.1.10",
    network: str = "tcp",
) -> FlowContext:
    return FlowContext(
        domain=domain,
        dst_ip=ip(dst) if dst else None,
        dst_port=port,
        src_ip=ip(src) if src else None,
        network=network,  # type: ignore[arg-type]
    )


def target(rs: RuleSet, c: FlowContext) -> str | None:
    r = rs.match(c)
    return None if r is None else r.target


RULES = [
    rule("DOMAIN,exact.example.com,A"),
    rule("DOMAIN-SUFFIX,example.com,B"),
    rule("DOMAIN-KEYWORD,tracker,REJECT"),
    rule("IP-CIDR,10.0.0.0/8,LAN,no-resolve"),
    rule("IP-CIDR6,2001:db8::/32,V6"),
    rule("SRC-IP-CIDR,192.168.2.0/24,KIDS"),
    rule("DST-PORT,6881-6889,P2P"),
    rule("DST-PORT,53/853,DNS"),
    rule("NETWORK,udp,UDP"),
    rule("MATCH,PROXY"),
    rule("DOMAIN,after.match,NEVER"),
]


@pytest.mark.parametrize(
    ("c", "want"),
    [
        (ctx("exact.example.com"), "A"),
        (ctx("EXACT.example.com."), "A"),
        (ctx("example.com"), "B"),
        (ctx("deep.sub.example.com"), "B"),
        (ctx("notexample.com"), "PROXY"),  # suffix is label-aligned
        (ctx("tracker.example.com"), "B"),  # suffix rule comes first
        (ctx("ad-tracker.net"), "REJECT"),
        (ctx(None, "10.1.2.3"), "LAN"),
        (ctx("lan.test", None), "PROXY"),  # no resolution for IP rules
        (ctx(None, "::ffff:10.1.2.3"), "LAN"),  # v4-mapped
        (ctx(None, "2001:db8::5"), "V6"),
        (ctx("x.test", src="192.168.2.9"), "KIDS"),
        (ctx("x.test", port=6885), "P2P"),
        (ctx("x.test", port=853), "DNS"),
        (ctx("x.test", network="udp"), "UDP"),
        (ctx("after.match"), "PROXY"),
        (ctx(None, None, src=None), "PROXY"),
    ],
)
def test_first_match_wins(c: FlowContext, want: str) -> None:
    assert target(RuleSet(RULES), c) == want


def test_order_across_kinds() -> None:
    rs = RuleSet(
        [
            rule("DST-PORT,443,PORT"),
            rule("DOMAIN-SUFFIX,a.test,SUFFIX"),
            rule("DOMAIN,x.a.test,EXACT"),
        ]
    )
    assert target(rs, ctx("x.a.test", port=443)) == "PORT"
    assert target(rs, ctx("x.a.test", port=80)) == "SUFFIX"
    assert target(RuleSet([]), ctx("x.test")) is None


def test_leading_dot_suffix_and_duplicates_keep_first() -> None:
    rs = RuleSet(
        [
            rule("DOMAIN-SUFFIX,.a.test,FIRST"),
            rule("DOMAIN-SUFFIX,a.test,SECOND"),
            rule("IP-CIDR,10.0.0.0/8,C1"),
            rule("IP-CIDR,10.0.0.1/8,C2"),
        ]
    )
    assert target(rs, ctx("a.test")) == "FIRST"
    assert target(rs, ctx(None, "10.9.9.9")) == "C1"


def test_narrower_cidr_later_does_not_win() -> None:
    rs = RuleSet([rule("IP-CIDR,10.0.0.0/8,WIDE"), rule("IP-CIDR,10.1.0.0/16,NARROW")])
    assert target(rs, ctx(None, "10.1.1.1")) == "WIDE"
    rs = RuleSet([rule("IP-CIDR,10.1.0.0/16,NARROW"), rule("IP-CIDR,10.0.0.0/8,WIDE")])
    assert target(rs, ctx(None, "10.1.1.1")) == "NARROW"
    assert target(rs, ctx(None, "10.2.1.1")) == "WIDE"


@pytest.mark.parametrize(
    "line",
    [
        "IP-CIDR,10.0.0.0/33,X",
        "IP-CIDR6,10.0.0.0/8,X",
        "DST-PORT,70000,X",
        "DST-PORT,9-1,X",
        "DST-PORT,http,X",
        "DOMAIN,.,X",
        "NETWORK,sctp,X",
        "DOMAIN-KEYWORD,,X",
        "FOO,bar,X",
    ],
)
def test_bad_rules_are_refused_at_load_with_their_index(line: str) -> None:
    """What the engine once refused at construction the loader refuses at
    `rules[i]`: a RuleSet is only ever built from typed payloads."""
    with pytest.raises(ConfigError) as e:
        parse_rule(line, "rules[1]")
    assert e.value.path == "rules[1]"
    data = {
        "dns": {"nameserver": ["https://192.0.2.53/dns-query"]},
        "proxies": [{"name": "X", "type": "direct"}],
        "rules": ["DOMAIN,ok.test,DIRECT", line],
    }
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert e.value.path == "rules[1]"
    assert "rules[1]" in str(e.value)


def test_unimplemented_rule_types_never_reach_the_engine() -> None:
    # Types mihomo dropped are reported ignored by the loader; `parse_rule`
    # refuses them, and a Rule cannot carry untyped text.
    with pytest.raises(ConfigError, match="not implemented"):
        parse_rule("SCRIPT,x,DIRECT", "rules[1]")
    with pytest.raises(TypeError):
        Rule("DOMAIN", "x.test", "X")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Rule("DOMAIN-SUFFIX", DomainName("x.test"), "X")
    with pytest.raises(TypeError):
        Rule("IP-CIDR6", ipaddress.IPv4Network("10.0.0.0/8"), "X")


def test_keyword_is_matched_as_written() -> None:
    # mihomo's DOMAIN-KEYWORD: a substring of the name, dots included.
    rs = RuleSet([rule("DOMAIN-KEYWORD,Google.,K")])
    assert target(rs, ctx("www.google.com")) == "K"
    assert target(rs, ctx("googleapis.com")) is None


def reference(rules: list[Rule], c: FlowContext) -> int | None:
    """Naive top-down evaluation, the semantics RuleSet must reproduce."""
    for i, r in enumerate(rules):
        t, v = r.type, r.value
        d = (c.domain or "").lower().rstrip(".")
        if t == "DOMAIN" and c.domain and d == v:
            return i
        if t == "DOMAIN-SUFFIX" and c.domain and (d == v or d.endswith("." + v)):
            return i
        if t == "DOMAIN-KEYWORD" and c.domain and v in d:
            return i
        if t == "IP-CIDR" and c.dst_ip is not None:
            net = ipaddress.ip_network(v, strict=False)
            if c.dst_ip.version == net.version and c.dst_ip in net:
                return i
        if t == "DST-PORT":
            lo, _, hi = v.partition("-")
            if int(lo) <= c.dst_port <= int(hi or lo):
                return i
        if t == "MATCH":
            return i
    return None


def make_rules(n: int, rnd: random.Random) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(n):
        k = rnd.random()
        if k < 0.45:
            rules.append(rule(f"DOMAIN-SUFFIX,s{i}.d{rnd.randrange(50)}.test,T{i}"))
        elif k < 0.75:
            rules.append(rule(f"DOMAIN,h{i}.d{rnd.randrange(50)}.test,T{i}"))
        elif k < 0.77:
            rules.append(rule(f"DOMAIN-KEYWORD,kw{i}x,T{i}"))
        elif k < 0.97:
            a = rnd.randrange(256)
            plen = rnd.choice([8, 16, 24, 32])
            rules.append(rule(f"IP-CIDR,10.{a}.{rnd.randrange(256)}.0/{plen},T{i}"))
        else:
            lo = rnd.randrange(1, 60000)
            rules.append(rule(f"DST-PORT,{lo}-{lo + rnd.randrange(5)},T{i}"))
    rules.append(rule("MATCH,LAST"))
    return rules


def test_10k_rules_agree_with_reference_and_are_fast() -> None:
    rnd = random.Random(1234)
    rules = make_rules(10_000, rnd)
    t0 = time.perf_counter()
    rs = RuleSet(rules)
    build = time.perf_counter() - t0
    assert build < 2.0, build

    probes: list[FlowContext] = []
    for _ in range(300):
        r = rules[rnd.randrange(len(rules) - 1)]
        if r.type in ("DOMAIN", "DOMAIN-SUFFIX"):
            probes.append(ctx(rnd.choice(["", "a.", "b.c."]) + r.value, port=rnd.randrange(65536)))
        elif r.type == "DOMAIN-KEYWORD":
            probes.append(ctx(f"pre{r.value}post.test"))
        elif r.type == "IP-CIDR":
            net = ipaddress.ip_network(r.value, strict=False)
            probes.append(ctx(None, str(net.network_address + rnd.randrange(net.num_addresses))))
        else:
            probes.append(ctx("nothing.test", port=int(r.value.partition("-")[0])))
        probes.append(ctx(f"miss{rnd.randrange(10**6)}.example", f"172.16.0.{rnd.randrange(255)}"))

    for c in probes:
        assert rs.match_index(c) == reference(rules, c), c

    t0 = time.perf_counter()
    for c in probes * 10:
        rs.match_index(c)
    per_match = (time.perf_counter() - t0) / (len(probes) * 10)
    # A naive scan of 10k rules takes milliseconds; the indexes take a few
    # microseconds. 200 us leaves room for a loaded 2-core CI box.
    assert per_match < 200e-6, per_match


def test_decided_by_domain_only_before_the_first_per_flow_rule() -> None:
    rs = RuleSet([
        rule("DOMAIN-SUFFIX,direct.test,DIRECT"),     # 0: name alone
        rule("IP-CIDR,10.0.0.0/8,DIRECT"),            # 1: never matches a name-only flow
        rule("DST-PORT,22,proxy"),                    # 2: depends on the port
        rule("DOMAIN,late.test,DIRECT"),              # 3: after a per-flow rule
        rule("MATCH,proxy"),                         # 4
    ])
    for name, index, decided in [("a.direct.test", 0, True), ("late.test", 3, False),
                                 ("other.test", 4, False)]:
        got = rs.match_index(ctx(name, port=80))
        assert got == index
        assert rs.decided_by_domain(got) is decided, name
    # A name that only reached rule 3 because its port was not 22: port 22
    # would have gone elsewhere. That is exactly what `decided` False means.
    assert target(rs, ctx("late.test", port=22)) == "proxy"
    for kind, value in [("SRC-IP-CIDR", "192.168.1.0/24"), ("SRC-PORT", "1000-2000"),
                        ("NETWORK", "udp")]:
        rs = RuleSet([rule("DOMAIN,x.test,DIRECT"), rule(f"{kind},{value},proxy")])
        assert rs.decided_by_domain(0) is True
        assert rs.decided_by_domain(None) is False  # the default is reached only past it
    assert RuleSet([rule("DOMAIN,x.test,DIRECT")]).decided_by_domain(None) is True
    assert RuleSet([]).decided_by_domain(None) is True
