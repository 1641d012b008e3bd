"""Proxy and rule providers as the API shows them (mihomo's
/providers/proxies and /providers/rules), behind one narrow adapter.

`Providers` is what the routes call; today Mirage has no providers, so it
shows mihomo's built-in "default" proxy provider (every proxy of the
profile, vehicleType Compatible) and no rule providers. Provider objects
plug in through `proxy` / `rule` lists of objects with `name`,
`vehicle_type`, `updated_at` (epoch seconds), `async update()`, and for
proxy providers `proxies` (outbound names) and `async healthcheck()`, for
rule providers `behavior`, `format` and `rule_count`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from appliance.api import clash
from appliance.config.model import Config


class Providers:
    def __init__(self, outbounds: Callable[[], Mapping[str, object]]) -> None:
        self.outbounds = outbounds
        self.proxy: list[Any] = []
        self.rule: list[Any] = []

    def proxy_docs(self, cfg: Config) -> dict[str, Any]:
        outbounds = self.outbounds()
        docs = {}
        for p in self.proxy:
            docs[p.name] = self._proxy_doc(p.name, getattr(p, "vehicle_type", "HTTP"),
                                           list(p.proxies), outbounds, cfg,
                                           getattr(p, "updated_at", None))
        named = {p.name for p in cfg.proxies}
        docs["default"] = self._proxy_doc(
            "default", "Compatible", [n for n in outbounds if n in named], outbounds, cfg, None)
        return docs

    @staticmethod
    def _proxy_doc(name: str, vehicle: str, members: list[str],
                   outbounds: Mapping[str, object], cfg: Config,
                   updated: float | None) -> dict[str, Any]:
        return {
            "name": name, "type": "Proxy", "vehicleType": vehicle,
            "proxies": [clash.proxy_doc(m, outbounds[m], cfg) for m in members
                        if m in outbounds],
            "testUrl": "", "expectedStatus": "*",
            "updatedAt": clash.rfc3339(updated) if updated else "0001-01-01T00:00:00Z",
            "subscriptionInfo": None,
        }

    def rule_docs(self) -> dict[str, Any]:
        return {r.name: {
            "name": r.name, "type": "Rule", "vehicleType": getattr(r, "vehicle_type", "HTTP"),
            "behavior": getattr(r, "behavior", "domain"), "format": getattr(r, "format", "yaml"),
            "ruleCount": int(getattr(r, "rule_count", 0)),
            "updatedAt": clash.rfc3339(r.updated_at) if getattr(r, "updated_at", None)
            else "0001-01-01T00:00:00Z",
        } for r in self.rule}

    async def update_proxy(self, name: str) -> bool:
        return await self._call(self.proxy, name, "update")

    async def healthcheck(self, name: str) -> bool:
        if name == "default":
            return True
        return await self._call(self.proxy, name, "healthcheck")

    async def update_rule(self, name: str) -> bool:
        return await self._call(self.rule, name, "update")

    @staticmethod
    async def _call(items: list[Any], name: str, method: str) -> bool:
        for item in items:
            if item.name == name:
                await getattr(item, method)()
                return True
        return False
