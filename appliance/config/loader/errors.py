"""`ConfigError` and the key paths it names: what every section module raises.

A key path is spelled as the user wrote the YAML: `dns.fake-ip-range`,
`proxies[2].port`, `hosts['*.lan']`; `<file>` for an unreadable file or a
YAML syntax error, `<top level>` for the document itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from appliance.config.loader.redact import scrub_text, shown_value


class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


NO_VALUE: Any = _NoValue()
"""`ConfigError.value` when the error is not about one value (missing key,
unreadable file, YAML syntax)."""


class ConfigError(Exception):
    """A configuration the appliance must not run with.

    `path` is the key path in YAML spelling (`dns.fake-ip-range`,
    `proxies[2].port`, `hosts['*.lan']`, or `<file>` for an unreadable file or
    a YAML syntax error), `value` the offending value (`NO_VALUE` if none),
    `reason` a sentence for a person. `mirage check` prints `str(err)`.

    The value is kept only as a message may show it (redact.py): under a
    key that holds a secret it is `<hidden>`, and the tokens of URLs in it
    or in the reason are hidden, so no error ever carries a password or a
    subscription token to a terminal or a log.
    """

    def __init__(self, path: str, value: Any, reason: str) -> None:
        value = value if value is NO_VALUE else shown_value(path, value)
        reason = scrub_text(reason)
        super().__init__(path, value, reason)
        self.path = path
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        if self.value is NO_VALUE:
            return f"{self.path}: {self.reason}"
        return f"{self.path}: {self.value!r}: {self.reason}"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_path(parent: str, key: str) -> str:
    """`parent.key`, or `parent['key']` for a key that is not a plain word."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{key!r}]"


def index_path(parent: str, index: int) -> str:
    """`parent[index]`: an item of a list."""
    return f"{parent}[{index}]"


class ConfigErrors(ConfigError):
    """Several problems of one profile, found in one load (each is a
    ConfigError in `errors`, in the order the loader reads the sections:
    top-level keys, dns, proxies, groups, rules, appliance). Its own path, value and reason
    are the first one's, so a caller that expects one ConfigError still
    reads a true one; `str()` is every error, one per line."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.path, first.value, first.reason)
        self.errors = tuple(errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def every_error(err: ConfigError) -> tuple[ConfigError, ...]:
    """The single errors of `err` (itself unless it is a ConfigErrors)."""
    return err.errors if isinstance(err, ConfigErrors) else (err,)


def raise_collected(errors: Sequence[ConfigError]) -> None:
    """Raise what a load collected: nothing, the one error, or all of them."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
