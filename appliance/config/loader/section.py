"""One load's state and the YAML mappings being read.

`LoadContext` carries what a whole load shares: where relative paths
start, what was ignored (each note with its kind, see `IgnoredKind`) and,
when collecting, every error found so far. `Section` reads one mapping
and, at `finish`, reports every key nobody consumed: a known Clash/mihomo
key is recorded as ignored; any other key is ignored too, as mihomo does
(it decodes into Go structs and drops what has no field), with a warning
and a did-you-mean, except in Mirage's own `appliance:` block where a
typo would silently change what the gateway does (an error there).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

from appliance.config.loader.errors import NO_VALUE, ConfigError, key_path
from appliance.config.loader.redact import scrub_text
from appliance.config.loader.scalars import fail_type, type_name
from appliance.config.model import IgnoredKind, LoadNote

T = TypeVar("T")


class LoadContext:
    """State of one load: where relative paths start, what was ignored, and
    (when `collect`) the errors found so far.

    With `collect` off (the default: a runtime parse of one provider's
    proxy, one rule line) the first ConfigError propagates. With it on
    (`parse_config`), the section loops hand each error to `fail`, which
    keeps it and lets them go on with the next item, so one run reports
    every problem; the caller raises them all at the end."""

    def __init__(self, source: Path | None, *, collect: bool = False) -> None:
        self.source = source
        self.base = source.parent if source is not None else None
        self.ignored: list[str] = []
        self.notes: list[LoadNote] = []
        self.collect = collect
        self.errors: list[ConfigError] = []
        # Names of proxies and groups whose own entry was broken: reported
        # once, so references to them are not reported again.
        self.broken: set[str] = set()
        self.broken_providers: set[str] = set()
        self.broken_sub_rules: set[str] = set()

    def ignore(self, path: str, note: str = "", kind: IgnoredKind = "unimplemented",
               error: ConfigError | None = None) -> None:
        note = scrub_text(note)
        self.ignored.append(f"{path} ({note})" if note else path)
        self.notes.append(LoadNote(path, kind, note, error))

    def fail(self, err: ConfigError) -> None:
        """Keep `err` and go on (collecting), or raise it."""
        if not self.collect:
            raise err
        self.errors.append(err)

    def attempt(self, parse: Callable[[], T], default: Any) -> T:
        """`parse()`, or `default` after keeping its ConfigError (`fail`).
        (`default` is Any: an empty `[]` would otherwise pin T to a list
        of nothing; it is a stand-in of parse's type, only read when the
        load fails anyway.)"""
        try:
            return parse()
        except ConfigError as err:
            self.fail(err)
            return cast(T, default)


def fold_case(key: str) -> str:
    """How mihomo's structure decoder matches a group's or provider's keys:
    exactly, else case-insensitively (common/structure/structure.go)."""
    return key.lower()


def fold_proxy_key(key: str) -> str:
    """... and a proxy's: `_` is read as `-` too (DefaultKeyReplacer), so
    `skip_cert_verify` and `Skip-Cert-Verify` are `skip-cert-verify`."""
    return key.lower().replace("_", "-")


class Section:
    """A YAML mapping being read: tracks which keys were consumed so that
    `finish` can report the rest as ignored (known Clash keys) or unknown.

    With `fold` (`fold_case`, `fold_proxy_key`), keys are matched as
    mihomo's structure decoder matches them: `data` holds them folded (an
    exact spelling wins over another that folds the same), code asks for
    the canonical name, and a report names the key as the user wrote it.
    Keys in `exact` are found only as spelled (mihomo reads them first,
    from the raw map).
    Child sections fold the same way (mihomo decodes nested options with
    the same decoder)."""

    def __init__(self, data: Any, path: str, ctx: LoadContext,
                 fold: Callable[[str], str] | None = None, exact: tuple[str, ...] = ()) -> None:
        if not isinstance(data, dict):
            fail_type(data, path or "<top level>", "a mapping")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(
                    key_path(path, str(key)), key, f"keys must be strings, got {type_name(key)}"
                )
        self.fold = fold
        # Keys mihomo reads from the raw map before decoding, so only as
        # spelled (a proxy's `type`, a group's `name`).
        self.exact = exact
        self.written: dict[str, str] = {}  # folded key -> as written
        if fold is not None:
            folded: dict[str, Any] = {}
            for key, value in data.items():
                name = fold(key)
                if name not in folded or key == name:
                    folded[name] = value
                    self.written[name] = key
            data = folded
        self.data: dict[str, Any] = data
        self.path = path
        self.ctx = ctx
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return key if self.fold is None else self.fold(key)

    def at(self, key: str) -> str:
        return key_path(self.path, key)

    def raw(self, key: str) -> Any:
        """The value, or None if absent. YAML `key:` (null) counts as absent,
        as in Clash (a null leaves Go's zero value)."""
        name = self._key(key)
        if key in self.exact and self.written.get(name, key) != key:
            return None
        self.seen.add(name)
        return self.data.get(name)

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
        return Section({} if value is None else value, self.at(key), self.ctx, self.fold)

    def finish(self, known: Iterable[str], ignored: Iterable[str], *,
               strict: bool = False, kinds: dict[str, IgnoredKind] | None = None) -> None:
        """Report unconsumed keys: Clash keys in `ignored` are recorded (of
        the kind `kinds` gives, else "unimplemented"); any other key is
        recorded as unknown with a did-you-mean from `known`, or with
        `strict` is an error (no value shown: it may be a secret)."""
        ignored_set = {self._key(k): k for k in ignored}
        for key in self.data:
            if key in self.seen:
                continue
            written = self.written.get(key, key)
            if key in ignored_set:
                self.ctx.ignore(self.at(written),
                                kind=(kinds or {}).get(ignored_set[key], "unimplemented"))
                continue
            # mihomo's keys Mirage ignores are suggestions too (`snifer`).
            close = difflib.get_close_matches(written, [*known, *ignored_set.values()], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if strict:
                self.ctx.fail(ConfigError(self.at(written), NO_VALUE, f"unknown key{hint}"))
                continue
            self.ctx.ignore(self.at(written), f"unknown key{hint}", kind="unknown")
