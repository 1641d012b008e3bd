"""Geodata files on disk: download the ones the rules need from `geox-url`
when missing, and again every `geo-update-interval` hours with
`geo-auto-update` (through appliance/providers/source.py: atomic write,
last good copy, the download's `proxy`).

Which files: `mmdb` (geoip.metadb) for GEOIP unless `geodata-mode`, then
`geoip` (GeoIP.dat); `asn` (GeoLite2-ASN.mmdb) for IP-ASN; `geosite`
(GeoSite.dat) for GEOSITE. A file present under any of mihomo's names is
used as it is (no download) unless auto-update is on. After a download the
`Geodata` reopens its files and `on_change` is awaited (GEOSITE lists are
compiled into the rules).

How it fails: never; a failed download is logged (the rules that need the
file match nothing until one succeeds).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import trio

from appliance.config.model import GeodataConfig, Rule
from appliance.geodata import (
    ASN_NAMES,
    GEOIP_DAT_NAMES,
    GEOSITE_NAMES,
    MMDB_NAMES,
    Geodata,
    _index_lists,
)
from appliance.providers.source import Dial, ProviderSource, SourceSpec, direct_dial

log = logging.getLogger(__name__)

_NAMES = {"mmdb": MMDB_NAMES, "asn": ASN_NAMES, "geoip": GEOIP_DAT_NAMES,
          "geosite": GEOSITE_NAMES}  # the first is the name a download gets
_MMDB_MARKER = b"\xab\xcd\xefMaxMind.com"


def needed(rules: Iterable[Rule], mode: bool) -> set[str]:
    """The geodata kinds `rules` (with nested logic and sub-rules) use."""
    kinds: set[str] = set()
    stack = list(rules)
    while stack:
        rule = stack.pop()
        if rule.type in ("GEOIP", "SRC-GEOIP"):
            if str(rule.payload) not in ("lan",):
                kinds.add("geoip" if mode else "mmdb")
        elif rule.type in ("IP-ASN", "SRC-IP-ASN"):
            kinds.add("asn")
        elif rule.type == "GEOSITE":
            kinds.add("geosite")
        payload = rule.payload
        stack.extend(getattr(payload, "rules", ()))
        condition = getattr(payload, "condition", None)
        if isinstance(condition, Rule):
            stack.append(condition)
    return kinds


def _check(kind: str) -> Callable[[bytes], bytes]:
    """Refuses what is not a file of `kind`; keeps nothing in memory (the
    file on disk is what `Geodata` reads)."""
    def parse(data: bytes) -> bytes:
        if kind in ("mmdb", "asn"):
            if _MMDB_MARKER not in data[-128 * 1024:]:
                raise ValueError("not a MaxMind DB file")
        elif not _index_lists(data):
            raise ValueError("no lists in this .dat file")
        return b""
    return parse


class GeodataFiles:
    """The downloads of one configuration's geodata (see the module doc)."""

    def __init__(self, cfg: GeodataConfig, geodata: Geodata, kinds: set[str], *,
                 dial: Dial = direct_dial,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.cfg = cfg
        self.geodata = geodata
        self.on_change = on_change
        self.sources: dict[str, ProviderSource[bytes]] = {}
        interval = cfg.update_interval * 3600 if cfg.auto_update else 0.0
        for kind in sorted(kinds):
            present = geodata.find(_NAMES[kind])
            if present is not None and not cfg.auto_update:
                continue
            path = present or Path(geodata.directory) / _NAMES[kind][0]
            spec = SourceSpec("http", url=cfg.url(kind), path=path, interval=interval,
                              timeout=120.0)
            self.sources[kind] = ProviderSource(f"geodata {kind}", spec, _check(kind),
                                                dial=dial)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Download what is missing (in parallel, each bounded), report
        started, then refresh on the interval."""
        changed = trio.Event()

        def on_update(_: bytes) -> None:
            changed.set()

        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as loading:
                for src in self.sources.values():
                    src.on_update = on_update
                    loading.start_soon(_start_in, nursery, src)
            if changed.is_set():
                await self._apply()
            task_status.started()
            while True:
                changed = trio.Event()
                await changed.wait()
                await self._apply()

    async def _apply(self) -> None:
        self.geodata.reopen()
        if self.on_change is not None:
            await self.on_change()


async def _start_in(nursery: trio.Nursery, src: ProviderSource[bytes]) -> None:
    await nursery.start(src.serve)
