"""One load's state and the YAML mappings being read.

`LoadContext` carries what a whole load shares (where relative paths start,
what was ignored); `Section` reads one mapping and, at `finish`, reports
every key nobody consumed: a known Clash/mihomo key is recorded as ignored,
any other key is a ConfigError with a did-you-mean.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from appliance.config.loader.errors import NO_VALUE, ConfigError, key_path
from appliance.config.loader.scalars import fail_type, type_name

T = TypeVar("T")


class LoadContext:
    """State of one load: where relative paths start, what was ignored."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
        self.base = source.parent if source is not None else None
        self.ignored: list[str] = []

    def ignore(self, path: str, note: str = "") -> None:
        self.ignored.append(f"{path} ({note})" if note else path)


class Section:
    """A YAML mapping being read: tracks which keys were consumed so that
    `finish` can report the rest as ignored (known Clash keys) or unknown."""

    def __init__(self, data: Any, path: str, ctx: LoadContext) -> None:
        if not isinstance(data, dict):
            fail_type(data, path or "<top level>", "a mapping")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(
                    key_path(path, str(key)), key, f"keys must be strings, got {type_name(key)}"
                )
        self.data: dict[str, Any] = data
        self.path = path
        self.ctx = ctx
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return key_path(self.path, key)

    def raw(self, key: str) -> Any:
        """The value, or None if absent. YAML `key:` (null) counts as absent,
        as in Clash (a null leaves Go's zero value)."""
        self.seen.add(key)
        return self.data.get(key)

    def get(self, key: str, convert: Callable[[Any, str], T], default: T) -> T:
        value = self.raw(key)
        if value is None:
            return default
        return convert(value, self.at(key))

    def require(self, key: str, convert: Callable[[Any, str], T]) -> T:
        value = self.raw(key)
        if value is None:
            raise ConfigError(self.at(key), NO_VALUE, "required")
        return convert(value, self.at(key))

    def section(self, key: str) -> Section:
        value = self.raw(key)
        return Section({} if value is None else value, self.at(key), self.ctx)

    def finish(self, known: Iterable[str], ignored: Iterable[str]) -> None:
        """Report unconsumed keys: Clash keys in `ignored` are recorded, any
        other key is an error (with a did-you-mean from `known`)."""
        ignored_set = set(ignored)
        for key, value in self.data.items():
            if key in self.seen:
                continue
            if key in ignored_set:
                self.ctx.ignore(self.at(key))
                continue
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(self.at(key), value, f"unknown key{hint}")
