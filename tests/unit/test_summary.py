"""The routing summary of `mirage check` (appliance/config/summary.py),
without a network: skipped proxies grouped by reason, rules that end on an
outbound Mirage skipped (runs, sub-rules), groups fed only by providers,
rule providers not yet downloaded, PROCESS-* rules, MATCH, and the JSON."""

from __future__ import annotations

import json
from typing import Any

from appliance.config import parse_config
from appliance.config.summary import COMPATIBLE_EFFECT, ProviderCopy, summarize

# A proxy Mirage skips at load: VMess's legacy header.
LEGACY = "a vmess proxy with alterId 64 (the legacy VMess header; only alterId 0)"


def _profile(**extra: Any) -> dict[str, Any]:
    vmess = {"type": "vmess", "server": "192.0.2.9", "port": 443, "uuid":
             "b831381d-6324-4d53-ad4f-8cda48b30811", "alterId": 64, "cipher": "auto"}
    proxies = [
        {"name": "socks", "type": "socks5", "server": "192.0.2.1", "port": 1080},
        *({"name": n, **vmess} for n in ("r1", "r2", "r3")),
        {"name": "old", "type": "ssr", "server": "192.0.2.2", "port": 1},
    ]
    return {"dns": {"enable": False}, "proxies": proxies, **extra}


def test_skipped_proxies_are_grouped_by_reason() -> None:
    s = summarize(parse_config(_profile(rules=["MATCH,socks"])))
    assert [(r.reason, r.names) for r in s.skipped_proxies] == [
        (LEGACY, ("r1", "r2", "r3")),
        ("a ssr proxy, which Mirage does not implement", ("old",)),
    ]
    assert dict(s.counts)["proxies"] == 1 and dict(s.counts)["proxies-skipped"] == 4
    assert f"skipped, {LEGACY}: 3 proxies (r1, r2, r3)" in s.lines()
    assert s.final == "MATCH -> 'socks'"


def test_rules_to_skipped_outbounds_are_runs_with_their_effect() -> None:
    cfg = parse_config(_profile(
        **{"proxy-groups": [{"name": "Netflix", "type": "url-test", "proxies": ["r1", "r2"]},
                            {"name": "Mixed", "type": "select", "proxies": ["r3", "socks"]}],
           "rule-providers": {"netflix": {"type": "http", "behavior": "domain", "format": "mrs",
                                          "url": "https://rules.example/netflix.mrs"}},
           "sub-rules": {"media": ["DOMAIN,s.test,old", "MATCH,DIRECT"]},
           "rules": ["DOMAIN,a.test,socks", "RULE-SET,netflix,Netflix",
                     "DOMAIN-SUFFIX,nflxvideo.net,Netflix", "DOMAIN,b.test,old",
                     "DOMAIN,c.test,Netflix", "DOMAIN,d.test,Mixed",
                     "SUB-RULE,(DOMAIN,s.test),media", "PROCESS-NAME,curl,DIRECT",
                     "MATCH,Netflix"]}))
    s = summarize(cfg)
    assert [(g.reason, g.names) for g in s.skipped_groups] == [
        ("a group with no member Mirage can use", ("Netflix",))]
    assert [(d.span, d.target, dict(d.types)) for d in s.dead_ends] == [
        ("rules[1..2]", "Netflix", {"DOMAIN-SUFFIX": 1, "RULE-SET": 1}),
        ("rules[3]", "old", {"DOMAIN": 1}),
        ("rules[4]", "Netflix", {"DOMAIN": 1}),
        ("rules[8]", "Netflix", {"MATCH": 1}),
        ("sub-rules.media[0]", "old", {"DOMAIN": 1}),
    ]
    lines = s.lines()
    assert ("rules[1..2] (1 DOMAIN-SUFFIX, 1 RULE-SET) send to 'Netflix', a group with no "
            f"member Mirage can use: {COMPATIBLE_EFFECT}") in lines
    assert s.final == ("MATCH -> 'Netflix' (a group with no member Mirage can use): "
                       "COMPATIBLE (DIRECT)")
    assert s.never_match == (("PROCESS-NAME", 1),)
    # Mixed lost r3 but keeps socks: not a dead end.
    assert all(d.target != "Mixed" for d in s.dead_ends)
    (netflix,) = [p for p in s.providers if p.name == "netflix"]
    assert (netflix.kind, netflix.ready, netflix.rules) == ("rule", False, 1)
    assert any(line.startswith("rule providers not yet downloaded (netflix): their 1 RULE-SET")
               for line in lines)


def test_groups_fed_only_by_providers_wait_for_a_copy() -> None:
    data = _profile(**{
        "proxy-providers": {
            "sub": {"type": "http", "url": "https://sub.example/x?token=secret",
                    "path": "./providers/sub.yaml"},
            "mine": {"type": "inline", "payload": [
                {"name": "p", "type": "socks5", "server": "192.0.2.3", "port": 1}]}},
        "proxy-groups": [{"name": "Auto", "type": "url-test", "use": ["sub"]},
                         {"name": "Manual", "type": "select", "use": ["sub"],
                          "proxies": ["socks"]},
                         {"name": "Own", "type": "select", "use": ["mine"]}],
        "rules": ["DOMAIN,a.test,Auto", "MATCH,Manual"]})
    cfg = parse_config(data)
    mine = ProviderCopy(proxies=1)
    s = summarize(cfg, copies={"mine": mine})
    assert [(g.name, g.ready, g.rules) for g in s.provider_only_groups] == [
        ("Auto", False, 1), ("Own", True, 0)]
    assert ("1 group (Auto) takes its members only from sub, with no usable proxy at hand: "
            "COMPATIBLE (DIRECT) until a download brings one; 1 rule sends flows to them"
            ) in s.lines()
    # A cached copy with a usable proxy: the group has members at start.
    cached = summarize(cfg, copies={"mine": mine, "sub": ProviderCopy(proxies=2)})
    assert [g.ready for g in cached.provider_only_groups] == [True, True]
    assert not any("members only from" in line for line in cached.lines())
    # A copy whose every proxy is skipped does not count, and says why.
    legacy = summarize(cfg, copies={"mine": mine, "sub": ProviderCopy(
        skipped=(("n1", LEGACY), ("n2", LEGACY)), error="no usable proxy (2 skipped)")})
    assert [g.ready for g in legacy.provider_only_groups] == [False, True]
    assert f"proxy provider 'sub' skips, {LEGACY}: 2 proxies (n1, n2)" in legacy.lines()
    (sub,) = [p for p in legacy.as_data()["providers"] if p["name"] == "sub"]
    assert sub["copy"] == {"proxies": 0, "error": "no usable proxy (2 skipped)", "skipped": [
        {"reason": LEGACY, "count": 2, "names": ["n1", "n2"]}]}


def test_json_is_plain_data_and_hides_provider_urls() -> None:
    data = _profile(**{
        "proxy-providers": {"sub": {"type": "http", "url": "https://sub.example/x?token=s3cr3t"}},
        "proxy-groups": [{"name": "Auto", "type": "url-test", "use": ["sub"]}],
        "rules": ["DOMAIN,a.test,r1", "MATCH,Auto"]})
    out = summarize(parse_config(data)).as_data()
    text = json.dumps(out)
    assert "s3cr3t" not in text
    assert json.loads(text) == out
    assert out["dead-ends"] == [{"rules": "rules[0]", "count": 1, "types": {"DOMAIN": 1},
                                 "target": "r1", "why": LEGACY, "effect": COMPATIBLE_EFFECT}]
    assert out["counts"]["proxy-providers"] == 1
    assert out["final"] == "MATCH -> 'Auto'"


def test_groups_with_no_member_at_all_hold_compatible() -> None:
    # include-all with no proxy to include (a template whose nodes come
    # later): mihomo gives the group COMPATIBLE, so does Mirage.
    cfg = parse_config({"dns": {"enable": False},
                        "proxy-groups": [{"name": "Auto", "type": "url-test",
                                          "include-all": True},
                                         {"name": "Pick", "type": "select",
                                          "proxies": ["Auto", "DIRECT"]}],
                        "rules": ["DOMAIN,a.test,Auto", "MATCH,Pick"]})
    s = summarize(cfg)
    assert s.empty_groups == (("Auto", 1),)
    assert ("1 group (Auto) has no member (no proxy named or included, no provider): "
            "COMPATIBLE (DIRECT); 1 rule sends flows to them") in s.lines()
    assert s.as_data()["empty-groups"] == [{"name": "Auto", "rules": 1}]


def test_no_match_rule_says_direct() -> None:
    s = summarize(parse_config(_profile(rules=["DOMAIN,a.test,socks"])))
    assert s.final == "no MATCH rule: flows no rule matches go DIRECT"
    assert s.dead_ends == () and s.skipped_groups == ()


def test_a_placeholder_subscription_url_loads_and_is_said() -> None:
    # Templates ship '订阅链接1' or '' where the user's URL goes; mihomo -t
    # accepts them (its download fails later), so does Mirage.
    cfg = parse_config(_profile(**{
        "proxy-providers": {"a": {"type": "http", "url": "订阅链接1"},
                            "b": {"type": "http", "url": ""}},
        "proxy-groups": [{"name": "Auto", "type": "url-test", "use": ["a", "b"]}],
        "rules": ["MATCH,Auto"]}))
    assert [p.url for p in cfg.proxy_providers] == ["订阅链接1", ""]
    assert {n.path for n in cfg.load_notes if "not an http(s) URL" in n.note} == {
        "proxy-providers.a.url", "proxy-providers.b.url"}
    assert [g.ready for g in summarize(cfg).provider_only_groups] == [False]
