"""Proxy and rule providers as the API shows them (mihomo's
/providers/proxies and /providers/rules), over the appliance's own
`ProxyProviders` (appliance/providers/proxies.py) and `RuleProviders`
(appliance/providers/rules.py), read when asked (a reload may replace
them). mihomo's built-in "default" proxy provider (every proxy of the
profile, vehicleType Compatible) is always listed, as mihomo does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from appliance.api import clash
from appliance.config.model import Config
from appliance.providers.proxies import ProxyProviders
from appliance.providers.rules import RuleProviders

NEVER = "0001-01-01T00:00:00Z"  # Go's zero time, what mihomo shows for "not yet"


class ProviderError(Exception):
    """A provider's update failed (its last error); the API answers 503."""


class Providers:
    def __init__(self, outbounds: Callable[[], Mapping[str, object]],
                 proxy: Callable[[], ProxyProviders | None] = lambda: None,
                 rule: Callable[[], RuleProviders | None] = lambda: None) -> None:
        self.outbounds = outbounds
        self.proxy = proxy
        self.rule = rule

    def proxy_docs(self, cfg: Config) -> dict[str, Any]:
        outbounds = self.outbounds()
        docs = {}
        providers = self.proxy()
        if providers is not None:
            for entry in providers.list():
                members = {o.name: o for o in providers.outbounds.get(entry["name"], [])}
                docs[entry["name"]] = self._proxy_doc(
                    entry["name"], entry["vehicleType"],
                    [(m, members[m]) for m in entry["proxies"] if m in members], cfg,
                    entry["updatedAt"])
        named = {p.name for p in cfg.proxies}
        docs["default"] = self._proxy_doc(
            "default", "Compatible", [(n, o) for n, o in outbounds.items() if n in named],
            cfg, None)
        return docs

    @staticmethod
    def _proxy_doc(name: str, vehicle: str, members: list[tuple[str, object]], cfg: Config,
                   updated: float | None) -> dict[str, Any]:
        return {
            "name": name, "type": "Proxy", "vehicleType": vehicle,
            "proxies": [clash.proxy_doc(m, outbound, cfg) for m, outbound in members],
            "testUrl": "", "expectedStatus": "*",
            "updatedAt": clash.rfc3339(updated) if updated else NEVER,
            "subscriptionInfo": None,
        }

    def rule_docs(self) -> dict[str, Any]:
        providers = self.rule()
        if providers is None:
            return {}
        return {entry["name"]: {k: v for k, v in entry.items() if k != "lastError"}
                | {"updatedAt": entry["updatedAt"] or NEVER}
                for entry in providers.list()}

    async def update_proxy(self, name: str) -> bool:
        providers = self.proxy()
        if providers is None or name not in providers.sources:
            return False
        if await providers.update(name) == "failed":
            raise ProviderError(providers.sources[name].status.last_error or "update failed")
        return True

    async def healthcheck(self, name: str) -> bool:
        if name == "default":
            return True
        providers = self.proxy()
        if providers is None or name not in providers.sources:
            return False
        await providers.healthcheck(name)
        return True

    async def update_rule(self, name: str) -> bool:
        providers = self.rule()
        if providers is None or name not in providers.sources:
            return False
        if await providers.update(name) == "failed":
            raise ProviderError(providers.sources[name].status.last_error or "update failed")
        return True
