"""The problem a profile's loader reports for one bad value: the
ConfigError behind the proxy skipped for it (a value mihomo loads and only
fails on when it dials: Mirage skips that proxy and says why, see
appliance/config/loader/proxies.py `mihomo_refuses`), or else the first
ConfigError raised (a value mihomo refuses too)."""

from __future__ import annotations

from typing import Any

from appliance.config import ConfigError
from appliance.config.loader.section import LoadContext
from appliance.config.loader.top import parse_root


def reported(data: Any) -> ConfigError:
    ctx = LoadContext(None, collect=True)
    raised: ConfigError | None = None
    try:
        parse_root(data, ctx)
    except ConfigError as err:
        raised = err
    skipped = [n.error for n in ctx.notes if isinstance(n.error, ConfigError)]
    if skipped:
        return skipped[0]
    assert raised is not None, "the profile loaded without a problem"
    return raised
