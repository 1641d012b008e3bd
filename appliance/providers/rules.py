"""rule-providers at run time: one `ProviderSource` each (appliance/
providers/source.py: cache, refresh, last good copy), their content parsed
by appliance/rules/provider.py, and a rebuild of the rules when any changes.

`RuleProviders` is also the control API's hook: `list()` describes each
provider (mihomo's /providers/rules fields), `update(name)` refreshes one
now. Owns the providers' refresh tasks (`serve`).

Where files live: an http provider's cache is its `path` under the state
directory (mihomo's home) or, without `path`, `<state-dir>/rules/<md5 of
url>` (mihomo's naming); a file provider's relative `path` is read next to
the profile (where people keep them), else under the state directory.

How it fails: never. A provider that cannot load is empty (its RULE-SET
matches nothing) and says why in the log and in `list()`; one whose refresh
fails keeps its last good content.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from appliance.config.model import Config, RuleProviderConfig
from appliance.providers.source import (
    Dial,
    Outcome,
    ProviderSource,
    SourceSpec,
    cache_path,
    direct_dial,
)
from appliance.rules.engine import ProviderRules
from appliance.rules.provider import Parsed, parse_provider

log = logging.getLogger(__name__)

_VEHICLE = {"http": "HTTP", "file": "File", "inline": "Inline"}


def provider_spec(p: RuleProviderConfig, state_dir: Path, profile_dir: Path | None
                  ) -> SourceSpec:
    """Where provider `p`'s bytes come from (see the module doc)."""
    if p.type == "http":
        assert p.url is not None
        path = state_dir / p.path if p.path is not None else cache_path(state_dir, "rules", p.url)
        return SourceSpec("http", url=p.url, path=path, interval=p.interval,
                          size_limit=p.size_limit, proxy=p.proxy, headers=p.headers)
    if p.type == "file":
        assert p.path is not None
        path = p.path
        if not path.is_absolute():
            near = profile_dir / path if profile_dir is not None else None
            path = near if near is not None and near.exists() else state_dir / path
        return SourceSpec("file", path=path, interval=p.interval)
    return SourceSpec("inline", payload="\n".join(p.payload).encode())


class RuleProviders:
    """The rule-providers of one configuration.

    `dial_for(proxy)` gives the Dial a provider's downloads use (None: no
    `proxy:`, straight out); `on_change()` is awaited after any provider's
    content changed (the owner rebuilds the rules; several changes close
    together cause one call)."""

    def __init__(self, cfg: Config, *,
                 dial_for: Callable[[str | None], Dial] = lambda proxy: direct_dial,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.configs = {p.name: p for p in cfg.rule_providers}
        self._on_change = on_change
        self._changed = trio.Event()
        self._dial_for = dial_for
        profile_dir = cfg.source.parent if cfg.source is not None else None
        self.sources: dict[str, ProviderSource[Parsed]] = {}
        for p in cfg.rule_providers:
            spec = provider_spec(p, cfg.appliance.state_dir, profile_dir)
            self.sources[p.name] = ProviderSource(
                f"rule-provider {p.name}", spec, _parser(p), self._updated(p.name),
                dial=self._dial(spec.proxy))

    def _dial(self, proxy: str | None) -> Dial:
        async def dial(host: str, port: int) -> trio.abc.Stream:
            # Looked up per fetch: the outbound may change on reload.
            return await self._dial_for(proxy)(host, port)
        return dial

    def _updated(self, name: str) -> Callable[[Parsed], None]:
        def on_update(parsed: Parsed) -> None:
            if parsed.skipped:
                log.warning("rule-provider %s: %d entr%s skipped (not a %s entry)", name,
                            parsed.skipped, "y" if parsed.skipped == 1 else "ies",
                            parsed.content.behavior)
            log.info("rule-provider %s: %d rules", name, len(parsed.content))
            self._changed.set()
        return on_update

    def contents(self) -> dict[str, ProviderRules]:
        """Each loaded provider's current content (absent: not loaded)."""
        return {name: src.value.content for name, src in self.sources.items()
                if src.value is not None}

    def list(self) -> list[dict[str, Any]]:
        """For the control API: one entry per provider (mihomo's fields, and
        the last error)."""
        out = []
        for name, src in self.sources.items():
            p = self.configs[name]
            st = src.status
            out.append({
                "name": name,
                "type": "Rule",
                "vehicleType": _VEHICLE[p.type],
                "behavior": p.behavior.capitalize() if p.behavior != "ipcidr" else "IPCIDR",
                "format": p.format.capitalize() + "Rule",
                "ruleCount": len(src.value.content) if src.value is not None else 0,
                "updatedAt": _iso(st.updated_at),
                "lastError": st.last_error,
            })
        return out

    async def update(self, name: str) -> Outcome:
        """Refresh provider `name` now (KeyError if there is none); the
        rules are rebuilt before this returns when the content changed."""
        outcome = await self.sources[name].refresh()
        if outcome == "updated":
            await self._rebuild()
        return outcome

    async def _rebuild(self) -> None:
        self._changed = trio.Event()
        if self._on_change is not None:
            await self._on_change()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Load every provider (in parallel: cache first, the network when
        there is no cache or it is stale; each bounded by its timeout),
        rebuild the rules once, report started, then keep them refreshed."""
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as loading:
                for src in self.sources.values():
                    loading.start_soon(_start_in, nursery, src)
            await self._rebuild()
            task_status.started()
            while True:
                await self._changed.wait()
                await trio.sleep(0.1)  # several providers refreshed together: one rebuild
                await self._rebuild()


async def _start_in(nursery: trio.Nursery, src: ProviderSource[Parsed]) -> None:
    await nursery.start(src.serve)


def _parser(p: RuleProviderConfig) -> Callable[[bytes], Parsed]:
    fmt = "text" if p.type == "inline" else p.format

    def parse(data: bytes) -> Parsed:
        return parse_provider(data, p.behavior, fmt)
    return parse


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()

