"""The API's /providers documents come from the appliance's own proxy- and
rule-providers (inline ones here: no network), beside mihomo's built-in
"default" provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from appliance.api.providers import Providers
from appliance.config.loader import parse_config
from appliance.outbound.base import Outbound
from appliance.providers.proxies import ProxyProviders
from appliance.providers.rules import RuleProviders
from appliance.routing import Router


def _profile(state: Path) -> dict[str, Any]:
    return {
        "dns": {"nameserver": ["https://192.0.2.53/dns-query"]},
        "appliance": {"state-dir": str(state)},
        "proxies": [{"name": "own", "type": "socks5", "server": "192.0.2.1", "port": 1080}],
        "proxy-providers": {"sub": {"type": "inline", "payload": [
            {"name": "p1", "type": "socks5", "server": "192.0.2.2", "port": 1080},
            {"name": "p2", "type": "http", "server": "192.0.2.3", "port": 8080}]}},
        "rule-providers": {"ads": {"type": "inline", "behavior": "domain",
                                   "payload": ["+.ads.test", "tracker.test"]}},
        "proxy-groups": [{"name": "Auto", "type": "select", "use": ["sub"],
                          "proxies": ["own"]}],
        "rules": ["RULE-SET,ads,REJECT", "MATCH,Auto"],
    }


async def test_providers_documents_and_actions_read_the_appliances_providers(
        tmp_path: Path) -> None:
    cfg = parse_config(_profile(tmp_path))
    proxy = ProxyProviders(cfg.proxy_providers, tmp_path)
    proxy.load_cached()
    out: dict[str, list[Outbound]] = {}
    router = Router.from_config(cfg, None, provided=proxy.provided(), provided_out=out)
    proxy.attach(router.outbounds, out)
    rule = RuleProviders(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(rule.serve)
        nursery.cancel_scope.cancel()
    api = Providers(lambda: router.outbounds, lambda: proxy, lambda: rule)

    docs = api.proxy_docs(cfg)
    assert set(docs) == {"sub", "default"}
    assert [p["name"] for p in docs["sub"]["proxies"]] == ["p1", "p2"]
    assert docs["sub"]["vehicleType"] == "Inline"
    assert [p["name"] for p in docs["default"]["proxies"]] == ["own"]
    rules = api.rule_docs()
    assert rules["ads"]["ruleCount"] == 2 and rules["ads"]["type"] == "Rule"
    assert await api.update_proxy("sub") and not await api.update_proxy("nope")
    assert await api.update_rule("ads") and not await api.update_rule("nope")
    assert await api.healthcheck("default") and not await api.healthcheck("nope")


def test_without_providers_only_the_default_one_is_listed(tmp_path: Path) -> None:
    data = _profile(tmp_path)
    del data["proxy-providers"], data["rule-providers"]
    data["proxy-groups"][0]["use"] = []
    data["rules"] = ["MATCH,Auto"]
    cfg = parse_config(data)
    router = Router.from_config(cfg, None)
    api = Providers(lambda: router.outbounds)
    assert list(api.proxy_docs(cfg)) == ["default"] and api.rule_docs() == {}
