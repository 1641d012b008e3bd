"""Loading like mihomo, reporting better than it (issue 13): unknown keys
are warnings, every error of a profile in one run, no secret in any
message, the ignored list grouped by kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.config import (
    ConfigError,
    ConfigErrors,
    every_error,
    format_ignored,
    load_config,
    parse_config,
)
from appliance.config.loader.proxies import parse_proxies
from appliance.config.loader.redact import path_is_secret, scrub_text, shown_value
from appliance.config.loader.section import LoadContext

NS = {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]}}
SOCKS = {"name": "s", "type": "socks5", "server": "192.0.2.1", "port": 1080}
TROJAN = {"name": "t", "type": "trojan", "server": "t.example", "port": 443,
          "password": "pw"}  # fmt: skip


def notes(cfg: Any, kind: str) -> list[str]:
    return [n.path for n in cfg.load_notes if n.kind == kind]


def errors_of(data: Any) -> tuple[ConfigError, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return every_error(info.value)


# --------------------------------------------------------------------------
# 1. Unknown keys are warnings wherever mihomo ignores them


def test_the_issues_examples_load_with_warnings() -> None:
    cfg = parse_config({
        "dns": {**NS["dns"], "enabled": True},
        "proxies": [{**TROJAN, "flow": "xtls-rprx-direct"},
                    {"name": "d", "type": "direct", "udp": True},
                    {**SOCKS, "made-up": 1}],
        "proxy-groups": [{"name": "g", "type": "select", "proxies": ["t", "d", "s"],
                          "empty-fallback": "DIRECT"}],
        "rule-providers": {"r": {"type": "inline", "behavior": "domain", "payload": ["a.test"],
                                 "new-option": 1}},
        "sniffer": {"enable": False},
        "tun": {"enable": True},
        "rules": ["MATCH,g"],
    })  # fmt: skip
    assert notes(cfg, "unknown") == ["dns.enabled", "proxies[2].made-up",
                                     "proxy-groups[0].empty-fallback",
                                     "rule-providers.r.new-option"]
    # `udp` on direct is mihomo's own key: ignored, not unknown.
    assert "proxies[1].udp" in notes(cfg, "unimplemented")
    assert "proxies[0].flow" in notes(cfg, "unimplemented")
    assert "tun" in notes(cfg, "gateway")
    assert "dns.enabled (unknown key; did you mean 'enable'?)" in cfg.ignored_keys
    assert [p.name for p in cfg.proxies] == ["t", "d", "s"]


def test_anchor_holders_under_made_up_keys(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "rule-anchor:\n"
        "  domain: &domain {type: http, interval: 86400, behavior: domain, format: yaml}\n"
        "  ip: &ip {type: http, interval: 86400, behavior: ipcidr, format: yaml}\n"
        "dns: {nameserver: [192.0.2.53]}\n"
        "rule-providers:\n"
        "  r: {<<: *domain, url: 'https://rules.example/r.yaml'}\n"
        "rules: ['RULE-SET,r,DIRECT', 'MATCH,DIRECT']\n"
    )
    cfg = load_config(path)
    assert notes(cfg, "anchor") == ["rule-anchor"] and notes(cfg, "unknown") == []
    assert cfg.rule_providers[0].behavior == "domain"


def test_legacy_clash_spellings_are_read_as_mihomo_reads_them() -> None:
    # mihomo's RawConfig has no `Proxy` field: the proxies in it do not exist
    # (`mihomo -t` then fails a rule that names one: "proxy [p] not found").
    cfg = parse_config({**NS, "Proxy": [SOCKS], "Proxy Group": [], "Rule": ["MATCH,DIRECT"]})
    assert notes(cfg, "legacy") == ["Proxy", "Proxy Group", "Rule"]
    assert cfg.proxies == () and cfg.rules == ()
    err = errors_of({**NS, "Proxy": [SOCKS], "rules": ["MATCH,s"]})
    assert [e.path for e in err] == ["rules[0]"]


def test_a_runtime_parse_still_stops_at_the_first_error() -> None:
    # A provider's proxies are parsed one by one at run time; without
    # collecting, the first ConfigError still propagates.
    with pytest.raises(ConfigError) as info:
        parse_proxies([{**SOCKS, "udp": "maybe"}, {**SOCKS, "name": "b", "udp": 1}], "p",
                      LoadContext(None))
    assert not isinstance(info.value, ConfigErrors) and info.value.path == "p[0].udp"


# --------------------------------------------------------------------------
# 2. Every problem in one run


def test_every_error_of_a_profile_in_one_run() -> None:
    errs = errors_of({
        "mixed-port": "7890",
        "dns": {**NS["dns"], "fake-ip-range": "10.0.0.0/33", "listen": "nowhere"},
        "proxies": [{**SOCKS, "type": "sock5"}, {**SOCKS, "name": "ok"},
                    {**SOCKS, "name": "also-bad", "udp": "maybe"}],
        "proxy-groups": [{"name": "g", "type": "select", "proxies": ["ok", "missing"]},
                         {"name": "h", "type": "nonsense", "proxies": ["ok"]}],
        "rules": ["DOMAIN,a.test,s", "DOMAIN,b.test,nowhere", "BOGUS,x,ok", "MATCH,h"],
        "appliance": {"lan": ["br-lan"], "colour": "blue"},
    })  # fmt: skip
    assert [e.path for e in errs] == [
        "mixed-port", "dns.listen", "dns.fake-ip-range", "proxies[0].type", "proxies[2].udp",
        "proxy-groups[1].type", "proxy-groups[0].proxies[1]", "rules[1]", "rules[2]",
        "appliance.colour",
    ]
    # A rule naming the broken proxy `s` or the broken group `h` is not a
    # second error: its own entry was reported.
    assert not any(e.path in ("rules[0]", "rules[3]") for e in errs)


def test_several_errors_keep_the_first_as_the_error_and_print_all() -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_config({**NS, "proxies": [{**SOCKS, "udp": 0}, {**SOCKS, "name": "b",
                                                             "udp": "on-ish"}]})
    err = info.value
    assert (err.path, err.value) == ("proxies[0].udp", 0)
    assert str(err).splitlines() == [
        "proxies[0].udp: 0: expected a boolean (true/false), got an integer",
        "proxies[1].udp: 'on-ish': expected a boolean (true/false), got a string"]


def test_one_error_is_a_plain_config_error() -> None:
    (err,) = errors_of({**NS, "tproxy-port": True})
    assert type(err) is ConfigError and str(err).startswith("tproxy-port: True: expected")


def test_dns_keys_are_reported_each_and_without_echoes() -> None:
    # A broken nameserver list is one error, not also "nameserver required".
    errs = errors_of({"dns": {"nameserver": "tls//x", "ipv6": "maybe", "cache-size": -1}})
    assert [e.path for e in errs] == ["dns.ipv6", "dns.nameserver", "dns.cache-size"]


# --------------------------------------------------------------------------
# 3. No secret in any message


@pytest.mark.parametrize(("path", "secret"), [
    ("proxies[0].password", True), ("proxies[0].uuid", True), ("secret", True),
    ("proxies[0].private-key", True), ("proxies[0].auth-str", True),
    ("proxies[0].obfs-password", True), ("proxy-providers.sub.header.Authorization", True),
    ("authentication[0]", True), ("proxies[0].reality-opts.short-id", True),
    ("proxies[0].port", False), ("dns.nameserver[0]", False), ("rules[3]", False),
    ("hosts['*.lan']", False),
])  # fmt: skip
def test_secret_key_names(path: str, secret: bool) -> None:
    assert path_is_secret(path) is secret


@pytest.mark.parametrize(("text", "shown"), [
    ("https://sub.example/api/v1/client/subscribe?token=T0KEN",
     "https://sub.example/api/<hidden>/client/subscribe?<hidden>"),
    ("https://x.example/link/AbC9T0KEN?clash=1", "https://x.example/link/<hidden>?<hidden>"),
    ("http://user:T0KEN@192.0.2.1:8080/x", "http://<hidden>@192.0.2.1:8080/x"),
    ("ss://YWVzOlQwS0VO@h.example:443#HK 01", "ss://<hidden>@h.example:443#HK 01"),
    ("vmess://eyJhZGQiOiJoLmV4YW1wbGUiLCJpZCI6IlQwS0VOIiwicG9ydCI6NDQzLCJ2IjoiMiJ9",
     "vmess://<hidden>"),
    ("https://dns.nextdns.io/ab12cd", "https://dns.nextdns.io/<hidden>"),
    ("https://1.1.1.1/dns-query#PROXY", "https://1.1.1.1/dns-query#PROXY"),
    ("tls://8.8.8.8:853", "tls://8.8.8.8:853"),
])  # fmt: skip
def test_urls_lose_their_tokens(text: str, shown: str) -> None:
    assert scrub_text(text) == shown
    assert scrub_text(f"see {text} there") == f"see {shown} there"


def test_values_are_walked() -> None:
    value = {"name": "n", "password": "T0KEN", "ws-opts": {"headers": {"Host": "h"}},
             "url": "https://h.example/s?token=T0KEN", "list": ["http://h.example/?k=T0KEN"]}
    assert "T0KEN" not in repr(shown_value("proxies", value))
    assert shown_value("proxies[0].password", 12345) == "<hidden>"


def test_errors_never_carry_a_secret() -> None:
    errs = errors_of({
        **NS,
        "secret": 12345,
        "authentication": ["userT0KEN"],
        "proxies": {"name": "x", "password": "T0KEN1"},
        "proxy-providers": {"sub": {"type": "http", "url": "ftp://sub.example/x?token=T0KEN2"}},
        "rule-providers": {"r": {"type": "http", "behavior": "domain",
                                 "url": "gopher://T0KEN3@r.example/"}},
    })  # fmt: skip
    text = "\n".join(str(e) for e in errs)
    # The provider's ftp:// url loads with a note and the numeric secret as
    # its text, as mihomo loads both.
    assert len(errs) == 3 and "T0KEN" not in text, text
    assert "<hidden>" in text
    cfg = parse_config({**NS, "proxy-providers": {
        "sub": {"type": "http", "url": "ftp://sub.example/x?token=T0KEN2"}}})
    assert "T0KEN" not in format_ignored(cfg) + repr(cfg.ignored_keys) + repr(cfg.load_notes)


def test_unknown_keys_never_show_their_value() -> None:
    cfg = parse_config({**NS, "api-token": "T0KEN", "proxies": [{**SOCKS, "t0ken": "T0KEN"}],
                        "dns": {**NS["dns"], "nameserver-x": ["https://h.example/?k=T0KEN"]}})
    assert "T0KEN" not in format_ignored(cfg) + repr(cfg.ignored_keys)


def test_ignored_nameserver_text_is_scrubbed() -> None:
    cfg = parse_config({"dns": {"nameserver": ["192.0.2.53",
                                               "https://dns.example/T0KEN9#ecs=1.2.3.0/24"],
                                "default-nameserver": ["192.0.2.53"]}})
    assert "T0KEN9" not in repr(cfg.ignored_keys) + format_ignored(cfg)
    # A `#Name` naming no proxy is an error (appliance/config/loader/dns.py);
    # its message hides the token too.
    with pytest.raises(ConfigError) as info:
        parse_config({"dns": {"nameserver": ["https://dns.example/T0KEN9#PROXY"]}})
    assert "T0KEN9" not in str(info.value) and "#PROXY" in str(info.value)


def test_yaml_syntax_error_does_not_quote_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("dns: {nameserver: [192.0.2.53]}\nproxies:\n  - password: T0KEN: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "T0KEN" not in str(info.value) and "line 3" in str(info.value)


# --------------------------------------------------------------------------
# 4. The ignored list is grouped and short


def test_ignored_lines_are_one_per_kind_and_collapse_indices() -> None:
    nodes = [{**TROJAN, "name": f"n{i}", "flow": "x", "made-up": 1} for i in range(50)]
    cfg = parse_config({**NS, "proxies": [*nodes, {**SOCKS, "type": "ssr"},
                                          {**SOCKS, "name": "s2", "type": "ssr"}],
                        "tun": {}, "sniffer": {}, "iptables": {}, "mode": "rule"})
    lines = format_ignored(cfg).splitlines()
    assert len(lines) == len({line.split(":")[0] for line in lines}) <= 7
    assert "ignored (unknown keys; mihomo ignores them too): proxies[*].made-up (50 times)" \
        in lines
    assert "skipped (Mirage cannot use them): proxies[*] (ssr proxy; 2 times)" in lines
    assert "ignored (no meaning on a gateway): tun, iptables" in lines
    assert all(len(line) < 400 for line in lines)


# --------------------------------------------------------------------------
# 6. Modes


@pytest.mark.parametrize(("text", "mode"), [("rule", "rule"), ("Global", "global"),
                                            ("DIRECT", "direct")])
def test_mode_is_read_as_mihomo_reads_it(text: str, mode: str) -> None:
    assert parse_config({**NS, "mode": text}).mode == mode


def test_an_invalid_mode_is_an_error_as_in_mihomo() -> None:
    (err,) = errors_of({**NS, "mode": "script"})
    assert err.path == "mode" and "rule, global or direct" in err.reason


@pytest.mark.parametrize("mode", ["redir-host", "normal"])
def test_dns_modes_mirage_does_not_run_are_said_at_load(mode: str) -> None:
    cfg = parse_config({"dns": {**NS["dns"], "enhanced-mode": mode}})
    assert cfg.dns.enhanced_mode == "fake-ip"
    (note,) = [n for n in cfg.load_notes if n.kind == "mode"]
    assert note.path == "dns.enhanced-mode" and mode in note.note and "fake-ip" in note.note
    assert format_ignored(cfg).splitlines()[0].startswith(
        f"instead: dns.enhanced-mode ({mode} is not run: Mirage answers with fake IPs")


# --------------------------------------------------------------------------
# 2b. Per error: refuse where mihomo refuses, else skip the one proxy


def mihomo_accepts(tmp_path: Path, profile: dict[str, Any]) -> bool:
    import subprocess

    import yaml

    from appliance.lab.reference import mihomo_binary, mihomo_home

    path = tmp_path / "mihomo.yaml"
    path.write_text(yaml.safe_dump(profile))
    result = subprocess.run([str(mihomo_binary()), "-t", "-d", str(mihomo_home(tmp_path / "h")),
                             "-f", str(path)], capture_output=True, text=True, timeout=60)
    return "test is successful" in result.stdout


@pytest.mark.parametrize(("proxy", "refused"), [
    # mihomo -t: "has unset fields: port" / "'udp' expected type 'bool'" /
    # "unknown method: nope": the profile is refused.
    ({k: v for k, v in SOCKS.items() if k != "port"}, True),
    ({**SOCKS, "udp": "true"}, True),
    ({"name": "s", "type": "ss", "server": "192.0.2.1", "port": 1, "cipher": "nope",
      "password": "p"}, True),
    ({**SOCKS, "type": "nonsense"}, True),
    # mihomo -t loads these (they fail only when dialled): the proxy is skipped.
    ({**SOCKS, "port": 0}, False), ({**SOCKS, "port": 99999}, False),
    ({**SOCKS, "server": "bad host"}, False), ({**SOCKS, "username": "u"}, False),
    ({"name": "s", "type": "vmess", "server": "192.0.2.1", "port": 1, "uuid": "not-a-uuid",
      "alterId": 0, "cipher": "auto"}, False),
    ({**TROJAN, "name": "s", "network": "bogus"}, False),
    ({**SOCKS, "ip-version": "bogus"}, False),
])  # fmt: skip
def test_a_bad_proxy_is_refused_or_skipped_as_mihomo_does(
        tmp_path: Path, proxy: dict[str, Any], refused: bool) -> None:
    profile = {"proxies": [proxy, {**SOCKS, "name": "other"}],
               "proxy-groups": [{"name": "G", "type": "select", "proxies": ["s", "other"]}],
               "rules": ["MATCH,G"]}
    assert mihomo_accepts(tmp_path, profile) is not refused
    if refused:
        errors_of({**NS, **profile})
        return
    # Loads: the proxy itself where Mirage can use the value (vmess without
    # a uuid check, an unknown key), else without it, saying why.
    cfg = parse_config({**NS, **profile})
    if [p.name for p in cfg.proxies] == ["s", "other"]:
        return
    (note,) = [n for n in cfg.load_notes if n.kind == "skipped" and n.path == "proxies[0]"]
    assert note.error is not None and note.note.startswith("'s': proxies[0].")
    assert [p.name for p in cfg.proxies] == ["other"]
    assert cfg.proxy_groups[0].proxies == ("other",)


def test_a_proxy_port_may_be_a_string_of_digits_as_in_mihomo() -> None:
    assert parse_config({**NS, "proxies": [{**SOCKS, "port": "1080"}]}).proxies[0].port == 1080


@pytest.mark.parametrize(("profile", "path", "kind"), [
    # Each loads in `mihomo -t` (checked against the binary): said, not refused.
    ({"dns": {**NS["dns"], "fake-ip-filter": ["time?.*.com", "+.lan"]}},
     "dns.fake-ip-filter[0]", "skipped"),
    ({**NS, "proxy-groups": [{"name": "g", "type": "url-test", "proxies": ["DIRECT"],
                              "url": "www.gstatic.com/generate_204"}]},
     "proxy-groups[0].url", "mode"),
    ({**NS, "rule-providers": {"r": {"type": "http", "behavior": "domain", "interval": "86400",
                                     "url": "http://a.example/r.yaml"}}}, None, None),
])  # fmt: skip
def test_values_mihomo_loads_are_said_not_refused(
        tmp_path: Path, profile: dict[str, Any], path: str | None, kind: str | None) -> None:
    assert mihomo_accepts(tmp_path, {**profile, "rules": ["MATCH,DIRECT"]})
    cfg = parse_config(profile)
    if path is None:
        assert cfg.rule_providers[0].interval == 86400
        return
    assert [(n.path, n.kind) for n in cfg.load_notes if n.error is not None] == [(path, kind)]


def test_run_logs_the_same_lines_at_start(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from appliance.cli import _log_ignored

    cfg = parse_config({"dns": {**NS["dns"], "enabled": True, "enhanced-mode": "redir-host"},
                        "tun": {"enable": True}})
    with caplog.at_level(logging.INFO, logger="mirage"):
        _log_ignored(cfg)
    # What will not happen as written (a mode run instead, a likely typo)
    # is a WARNING; what is merely left out, INFO. One record per line.
    assert [(r.levelno, r.getMessage().split(":")[0]) for r in caplog.records] == [
        (logging.WARNING, "instead"),
        (logging.WARNING, "ignored (unknown keys; mihomo ignores them too)"),
        (logging.INFO, "ignored (no meaning on a gateway)"),
    ]
    assert [r.getMessage() for r in caplog.records] == format_ignored(cfg).splitlines()


# --------------------------------------------------------------------------
# Keys of proxies, groups and providers matched as mihomo's decoder does


def test_proxy_group_and_provider_keys_fold_as_in_mihomo(tmp_path: Path) -> None:
    # mihomo (common/structure): a proxy's keys case-insensitively with `_`
    # read as `-`; a group's and a provider's case-insensitively.
    profile = {
        "proxies": [{"Name": "a", "type": "socks5", "Server": "192.0.2.1", "port": 1080,
                     "skip_cert_verify": True, "UDP": True},
                    {"name": "b", "type": "vmess", "server": "v.example", "port": 443,
                     "uuid": "0b2c5a6e-1d7f-4c8a-9e3b-5f6a7b8c9d0e", "alterid": 0,
                     "Cipher": "auto", "ws_opts": {"Path": "/w"}, "network": "ws"}],
        "proxy-groups": [{"name": "G", "Type": "url-test", "Proxies": ["a", "b"],
                          "Interval": 60}],
        "rule-providers": {"R": {"Type": "inline", "Behavior": "domain",
                                 "Payload": ["a.test"]}},
        "rules": ["RULE-SET,R,G", "MATCH,G"],
    }  # fmt: skip
    assert mihomo_accepts(tmp_path, profile)
    cfg = parse_config({**NS, **profile})
    a, b = cfg.proxies
    assert (a.name, a.type, a.udp) == ("a", "socks5", True)
    assert b.transport is not None and b.transport.ws is not None
    assert b.transport.ws.path == "/w"
    assert cfg.proxy_groups[0].health.interval == 60
    assert cfg.rule_providers[0].payload == ("a.test",)
    assert notes(cfg, "unknown") == []
    # What matches nothing is still named as written.
    cfg = parse_config({**NS, "proxies": [{**SOCKS, "Made_Up": 1}]})
    assert notes(cfg, "unknown") == ["proxies[0].Made_Up"]
    # mihomo reads a proxy's `type` and a group's `name` before decoding:
    # only as spelled ("proxy 0: missing type", "proxy group 0: missing name").
    no_type = {k: v for k, v in SOCKS.items() if k != "type"}
    for bad in ({**NS, "proxies": [{**no_type, "Type": "socks5"}]},
                {**NS, "proxy-groups": [{"Name": "G", "type": "select", "proxies": ["DIRECT"]}]}):
        assert not mihomo_accepts(tmp_path, {**bad, "rules": ["MATCH,DIRECT"]})
        with pytest.raises(ConfigError) as info:
            parse_config(bad)
        assert info.value.reason == "required"
    # Only the entries fold: rule-provider names stay case-sensitive.
    with pytest.raises(ConfigError):
        parse_config({**NS, "rule-providers": profile["rule-providers"],
                      "rules": ["RULE-SET,r,DIRECT"]})


def test_appliance_keys_are_reported_each() -> None:
    errs = errors_of({**NS, "appliance": {"lan": ["br lan"], "redirect": "iptables",
                                          "udp-timeout": -1, "colour": "blue",
                                          "limits": {"flows-per-client": 0}}})
    assert [e.path for e in errs] == ["appliance.lan[0]", "appliance.redirect",
                                      "appliance.udp-timeout",
                                      "appliance.limits.flows-per-client", "appliance.colour"]


def test_cross_section_checks_are_reported_together() -> None:
    errs = errors_of({**NS, "mixed-port": 7890, "tproxy-port": 7890, "routing-mark": 0x233,
                      "appliance": {"bypass": ["198.18.0.0/15"]}})
    assert [e.path for e in errs] == ["routing-mark", "appliance.bypass[0]", "tproxy-port"]
