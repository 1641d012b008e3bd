"""Proxy providers: subscriptions that feed groups (`use:`, include-all).

Each provider is a `ProviderSource` (appliance/providers/source.py: http /
file / inline, cache file, refresh every `interval`, last good copy kept)
whose content is turned into proxy configs here: Clash YAML or share links
(share_links.py), then the provider's `filter` / `exclude-filter` /
`exclude-type` and `override`, then the profile's own proxy loader, one
proxy at a time, so a proxy Mirage cannot speak (or a bad entry) is
skipped with its reason and the rest load. Content that yields no proxy at
all is refused (the last good set stays).

`ProxyProviders` owns the sources and their tasks. New content calls
`on_change` (the app rebuilds the router: the groups that use the provider
get the new members in one swap, choices and delay history kept by name).
What the control API reads: `list()`, `update(name)`, `healthcheck(name)`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
import yaml

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.proxies import parse_proxies
from appliance.config.loader.section import LoadContext
from appliance.config.model import ProxyConfig, ProxyProviderConfig
from appliance.outbound.base import Outbound
from appliance.outbound.health import DelayHistory, measure
from appliance.providers.share_links import decode_subscription
from appliance.providers.source import Outcome, ProviderSource, SourceSpec, cache_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProvidedProxies:
    """What one provider's content yields: the proxies Mirage can use, and
    {name: why skipped} for the others."""

    proxies: tuple[ProxyConfig, ...]
    skipped: dict[str, str] = field(default_factory=dict)


def apply_override(item: dict[str, Any], cfg: ProxyProviderConfig) -> dict[str, Any]:
    """mihomo's provider `override` on one proxy mapping (a copy)."""
    o = cfg.override
    out = dict(item)
    for key, value in (("skip-cert-verify", o.skip_cert_verify), ("udp", o.udp),
                       ("dialer-proxy", o.dialer_proxy), ("ip-version", o.ip_version)):
        if value is not None:
            out[key] = value
    name = str(out.get("name", ""))
    for pattern, target in o.proxy_name:
        name = re.sub(pattern, target, name)
    out["name"] = f"{o.additional_prefix}{name}{o.additional_suffix}"
    return out


def keep(item: dict[str, Any], cfg: ProxyProviderConfig) -> bool:
    """The provider's filters on one mapping: `filter` (any regex matches
    the name), `exclude-filter`, `exclude-type` (the `type` key)."""
    name = str(item.get("name", ""))
    f = cfg.filter
    if f.filter and not any(re.search(p, name) for p in f.filter):
        return False
    if f.exclude_filter and re.search(f.exclude_filter, name):
        return False
    ptype = str(item.get("type", "")).lower()
    return not any(t.strip().lower() == ptype for t in f.exclude_type)


def parse_provided(data: bytes, cfg: ProxyProviderConfig) -> ProvidedProxies:
    """A provider's content -> its proxies. Raises ValueError when the
    content is not a subscription or yields no usable proxy."""
    items = decode_subscription(data)
    if not items:
        raise ValueError("no proxies in the content")
    proxies: list[ProxyConfig] = []
    skipped: dict[str, str] = {}
    names: set[str] = set()
    ctx = LoadContext(None)
    for i, item in enumerate(items):
        if not keep(item, cfg):
            continue
        item = apply_override(item, cfg)
        path = f"proxy-providers.{cfg.name}[{i}]"
        try:
            parsed, why = parse_proxies([item], path, ctx)
        except ConfigError as e:
            skipped[str(item.get("name", i))] = str(e)
            continue
        skipped.update(why)
        for p in parsed:
            if p.name in names:
                skipped[p.name] = "a second proxy with this name"
                continue
            names.add(p.name)
            proxies.append(p)
    if not proxies:
        raise ValueError(f"no usable proxy ({len(skipped)} skipped)")
    return ProvidedProxies(tuple(proxies), skipped)


def _parse_for(cfg: ProxyProviderConfig, data: bytes) -> ProvidedProxies:
    return parse_provided(data, cfg)


def source_spec(cfg: ProxyProviderConfig, state_dir: Path) -> SourceSpec:
    path = cfg.path
    if cfg.type == "http" and path is None:
        assert cfg.url is not None
        path = cache_path(state_dir, "proxies", cfg.url)
    payload = (yaml.safe_dump({"proxies": list(cfg.payload)}).encode()
               if cfg.type == "inline" else None)
    return SourceSpec(kind=cfg.type, url=cfg.url, path=path, interval=cfg.interval,
                      size_limit=cfg.size_limit, proxy=cfg.proxy, payload=payload,
                      headers=cfg.header)


class ProxyProviders:
    """Every proxy provider of one configuration: its source, the proxies
    its last good content yields (`provided()`, what the router builds),
    the outbounds the router built for them (`attach`), and its refresh
    tasks (`serve`). Owns the sources' tasks and cache files."""

    def __init__(self, configs: Sequence[ProxyProviderConfig], state_dir: Path,
                 on_change: Callable[[], None] = lambda: None,
                 delays: DelayHistory | None = None) -> None:
        self.configs = {c.name: c for c in configs}
        self.on_change = on_change
        self.delays = delays if delays is not None else DelayHistory()
        self.sources: dict[str, ProviderSource[ProvidedProxies]] = {}
        self.outbounds: dict[str, list[Outbound]] = {}
        self._started = False
        self._in_use: dict[str, tuple[ProxyConfig, ...]] = {}
        for cfg in configs:
            self.sources[cfg.name] = ProviderSource(
                name=f"proxy-provider {cfg.name}",
                spec=source_spec(cfg, state_dir),
                parse=partial(_parse_for, cfg),
                on_update=partial(self._updated, cfg.name),
            )

    def load_cached(self) -> None:
        """Inline payloads and cache files, without network (at start,
        before the first router is built: a boot without network runs on
        the cached proxies)."""
        for source in self.sources.values():
            source.load_cached()

    def provided(self) -> dict[str, tuple[ProxyConfig, ...]]:
        """The proxies of each provider's content in use (empty: none yet)."""
        return {name: (s.value.proxies if s.value is not None else ())
                for name, s in self.sources.items()}

    def attach(self, outbounds: dict[str, Outbound],
               provided: dict[str, list[Outbound]]) -> None:
        """A new router's outbounds: downloads go through each provider's
        `proxy:` (DIRECT by default, marked, names by DoH); `provided` are
        the outbounds built for each provider's proxies."""
        self.outbounds = provided
        for name, source in self.sources.items():
            via = outbounds.get(self.configs[name].proxy or "DIRECT") or outbounds["DIRECT"]
            source.dial = via.connect_tcp

    def _updated(self, name: str, value: ProvidedProxies) -> None:
        log.info("proxy-provider %s: %d proxies (%d skipped)", name, len(value.proxies),
                 len(value.skipped))
        for proxy, why in value.skipped.items():
            log.debug("proxy-provider %s: %r skipped: %s", name, proxy, why)
        if self._started and self._in_use.get(name) != value.proxies:
            self.on_change()
        self._in_use[name] = value.proxies

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Each source's refresh loop (the first download of a stale or
        missing cache at once, in the background) and each provider's
        health check. Started at once: the cached content is in use."""
        self._started = True
        async with trio.open_nursery() as nursery:
            for source in self.sources.values():
                nursery.start_soon(self._run_source, source)
            for name, cfg in self.configs.items():
                if cfg.health.enable and cfg.health.interval > 0:
                    nursery.start_soon(self._health_loop, name)
            task_status.started()

    @staticmethod
    async def _run_source(source: ProviderSource[ProvidedProxies]) -> None:
        await source.serve()

    async def _health_loop(self, name: str) -> None:
        interval = self.configs[name].health.interval
        while True:
            await self.healthcheck(name)
            await trio.sleep(interval)

    # -- the control API ------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """mihomo's GET /providers/proxies entries: name, type, vehicleType,
        proxies (names), updatedAt (Unix seconds or None), plus Mirage's
        last error and skipped proxies with their reasons."""
        out = []
        for name, source in self.sources.items():
            value = source.value
            out.append({
                "name": name, "type": "Proxy",
                "vehicleType": {"http": "HTTP", "file": "File",
                                "inline": "Inline"}[self.configs[name].type],
                "proxies": [p.name for p in value.proxies] if value is not None else [],
                "updatedAt": source.status.updated_at,
                "error": source.status.last_error,
                "skipped": dict(value.skipped) if value is not None else {},
            })
        return out

    async def update(self, name: str) -> Outcome:
        """Fetch `name` now (KeyError if no such provider)."""
        return await self.sources[name].refresh()

    async def healthcheck(self, name: str) -> dict[str, int]:
        """Probe every proxy of `name` with its health-check settings (the
        default test URL when it has none); {proxy: delay ms, 0 = failed}."""
        cfg = self.configs[name]
        results: dict[str, int] = {}

        async def one(o: Outbound) -> None:
            results[o.name] = await measure(o, self.delays, cfg.health.url,
                                            cfg.health.timeout, cfg.health.expected_status)

        async with trio.open_nursery() as nursery:
            for o in self.outbounds.get(name, []):
                nursery.start_soon(one, o)
        return results
