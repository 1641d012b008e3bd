"""The control API's keys: `external-controller`, `secret`, `external-ui`,
`external-ui-name`, `external-ui-url`, `external-controller-cors` (names and
meaning as in mihomo's config/config.go).

One rule Mirage adds: an `external-controller` that is not a loopback address
needs a `secret`. The API can switch proxies, close connections and reload
the profile; without a secret anyone on the LAN could. Refused at load with
the key path, so it never starts listening that way.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.scalars import (
    as_bool,
    as_list,
    as_listen,
    as_nonempty_str,
    as_path,
    as_str,
)
from appliance.config.loader.section import Section
from appliance.config.model import ControllerConfig, CorsConfig, Listen

CONTROLLER_KEYS = (
    "external-controller", "secret", "external-ui", "external-ui-name", "external-ui-url",
    "external-controller-cors",
)  # fmt: skip


def parse_controller(root: Section) -> tuple[Listen | None, str, ControllerConfig]:
    """(address, secret, the rest) from the top level of a profile."""
    listen = root.get("external-controller", _controller, None)
    secret = root.get("secret", _secret, "")
    base = root.ctx.base
    ui = root.get("external-ui", lambda v, p: as_path(v, p, base), None)
    ui_name = root.get("external-ui-name", _ui_name, "")
    ui_url = root.get("external-ui-url", _ui_url, "")
    if urlsplit(ui_url).scheme in ("http", "https"):
        # mihomo downloads the dashboard; this appliance makes no download
        # for it. Not a reason to refuse the profile: /ui serves what
        # external-ui already holds.
        root.ctx.ignore("external-ui-url", "not downloaded: unpack the dashboard into "
                        "external-ui yourself, or give a local zip file or file:// URL",
                        kind="unimplemented")
        ui_url = ""
    cors = _cors(root.section("external-controller-cors"))
    if listen is not None and not secret and not ipaddress.ip_address(listen.host).is_loopback:
        # The API switches proxies and closes connections: without a secret
        # it is served to the gateway itself only (mihomo would open it to
        # the LAN; a profile that asks for that still loads).
        loopback = "::1" if ipaddress.ip_address(listen.host).version == 6 else "127.0.0.1"
        root.ctx.ignore("external-controller", f"{listen} has no secret: served on "
                        f"{Listen(loopback, listen.port)} only (set a secret to open it to "
                        "the LAN)", kind="mode")
        listen = Listen(loopback, listen.port)
    return listen, secret, ControllerConfig(ui=ui, ui_name=ui_name, ui_url=ui_url, cors=cors)


def _secret(value: Any, path: str) -> str:
    """A string; a number is its text (`secret: 123456`: mihomo's YAML
    reader puts any scalar into a string field, and mihomo -t loads it)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return as_str(value, path)


def _controller(value: Any, path: str) -> Listen | None:
    if isinstance(value, str) and not value.strip():
        return None  # empty string: controller off, as in Clash
    return as_listen(value, path)


def _ui_name(value: Any, path: str) -> str:
    name = as_str(value, path).strip()
    if name and (name in (".", "..") or "/" in name or "\0" in name):
        raise ConfigError(path, value, "a directory name inside external-ui (no '/')")
    return name


def _ui_url(value: Any, path: str) -> str:
    """Offline: a local zip file or a file:// URL of one; an http(s) URL
    is returned as is for parse_controller to report and drop."""
    text = as_str(value, path).strip()
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme in ("http", "https"):
        return text  # not downloaded: parse_controller says so and drops it
    if parts.scheme not in ("", "file"):
        raise ConfigError(path, value, "a local zip file or a file:// URL")
    return str(Path(parts.path)) if parts.scheme == "file" else text


def _cors(sec: Section) -> CorsConfig:
    d = CorsConfig()
    origins = sec.get("allow-origins", lambda v, p: tuple(
        as_nonempty_str(o, f"{p}[{i}]") for i, o in enumerate(as_list(v, p))), d.allow_origins)
    private = sec.get("allow-private-network", as_bool, d.allow_private_network)
    sec.finish(("allow-origins", "allow-private-network"), ())
    return CorsConfig(allow_origins=origins, allow_private_network=private)
