"""`ConfigError` and the key paths it names: what every section module raises.

A key path is spelled as the user wrote the YAML: `dns.fake-ip-range`,
`proxies[2].port`, `hosts['*.lan']`; `<file>` for an unreadable file or a
YAML syntax error, `<top level>` for the document itself.
"""

from __future__ import annotations

import re
from typing import Any


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
    """

    def __init__(self, path: str, value: Any, reason: str) -> None:
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
