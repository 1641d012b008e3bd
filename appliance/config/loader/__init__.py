"""YAML file -> validated `Config`: the only place a config value is checked.

The format is the Clash/mihomo profile format (kebab-case keys) restricted to
what Mirage implements, plus one `appliance:` block. Three kinds of keys:

* implemented keys: parsed strictly (a string where a number belongs is an
  error, booleans are YAML booleans, ports 1..65535, marks 0..2^32-1); a bad
  value is a `ConfigError` naming the key path (`dns.fake-ip-range`,
  `proxies[2].port`), the value (never a secret one, see redact.py) and
  the reason;
* Clash/mihomo keys Mirage does not implement (`tun`, `sniffer`,
  `quic://` nameservers, `ssr` proxies, ...): accepted, left out of the
  model and listed in `Config.ignored_keys` / `Config.load_notes` by kind,
  so an existing profile loads and `mirage check` can say what it will not
  do;
* any other key: ignored as mihomo ignores it, with a warning and a
  did-you-mean (except inside Mirage's own `appliance:` block: an error).

A load reads the whole profile even after an error: each broken key, proxy,
group, rule or provider is reported and the next one read, and all the
errors are raised together (`ConfigErrors`, one line each in `str()`).

One module per section, each owning its keys (known, ignored) and its
parsers: `top` (the top level and the order sections are read in), `dns`
(with `hosts`), `proxies`, `groups`, `rules`, `appliance`, and `cross` for
the checks that need the whole `Config`. Under them: `errors` (ConfigError,
key paths), `scalars` (the `as_*` converters), `section` (reading one
mapping, reporting unknown keys) and `yaml_source` (the file to data).

Nothing here touches the network or the file system beyond reading the one
file; `mirage check` must work on a machine that is not the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from appliance.config.loader.errors import (
    NO_VALUE,
    ConfigError,
    ConfigErrors,
    every_error,
    key_path,
)
from appliance.config.loader.rules import parse_rule
from appliance.config.loader.section import LoadContext
from appliance.config.loader.top import parse_root
from appliance.config.loader.yaml_source import read_yaml
from appliance.config.model import Config

__all__ = [
    "NO_VALUE",
    "ConfigError",
    "ConfigErrors",
    "check_runnable",
    "every_error",
    "load_config",
    "parse_config",
    "parse_rule",
]


def load_config(path: str | Path) -> Config:
    """Read and validate the YAML file at `path`.

    Raises ConfigError for everything wrong with it: missing or unreadable
    file, YAML syntax (reason carries line and column), any invalid value.
    """
    source = Path(path)
    data, holders = read_yaml(source)
    return parse_config(data, source=source.absolute(), anchor_keys=holders)


def parse_config(
    data: Any, source: Path | None = None, *, anchor_keys: Iterable[str] = ()
) -> Config:
    """Validate already-loaded YAML data (`yaml.safe_load` output).

    `source` is recorded in `Config.source` and anchors relative paths
    (`appliance.state-dir`, `dns.ca-file`). `anchor_keys` are top-level keys
    that only hold YAML anchors (found by `load_config`): reported ignored.
    Raises ConfigError only (a ConfigErrors when there are several).
    """
    ctx = LoadContext(source, collect=True)
    if data is None:
        data = {}
    holders = set(anchor_keys)
    if holders and isinstance(data, dict):
        for key in holders:
            if key in data:
                ctx.ignore(key_path("", key), "YAML anchor", kind="anchor")
        data = {k: v for k, v in data.items() if k not in holders}
    try:
        return parse_root(data, ctx)
    except RecursionError:
        raise ConfigError("<top level>", NO_VALUE, "nested too deeply") from None


def check_runnable(cfg: Config) -> None:
    """What `mirage run` needs beyond what `mirage check` validates: an
    appliance must know which interfaces it serves. Raises ConfigError."""
    if not cfg.appliance.lan:
        raise ConfigError(
            "appliance.lan", list(cfg.appliance.lan), "name at least one LAN interface to serve"
        )
