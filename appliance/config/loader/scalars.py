"""Scalar converters: `(value, path) -> typed value`, or ConfigError.

Strict as mihomo's Go types are: a string where a number belongs is an
error, booleans are YAML booleans, ports are 1..65535, marks 0..2^32-1. The
`as_*` functions take the raw YAML value and the key path to blame; the
section modules compose them with `Section.get` / `Section.require`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from appliance.config.loader.errors import ConfigError
from appliance.config.model import IPAddress, IPNetwork, Listen
from appliance.names import parse_name

MAX_MARK = 2**32 - 1


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def fail_type(value: Any, path: str, expected: str) -> NoReturn:
    raise ConfigError(path, value, f"expected {expected}, got {type_name(value)}")


def as_int(value: Any, path: str, lo: int, hi: int, what: str = "an integer") -> int:
    # bool is an int subclass in Python; YAML `true` is not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        fail_type(value, path, what)
    if not lo <= value <= hi:
        raise ConfigError(path, value, f"out of range ({lo}..{hi})")
    return value


def as_port(value: Any, path: str) -> int:
    return as_int(value, path, 1, 65535, "a port number")


def as_proxy_port(value: Any, path: str) -> int:
    """A proxy's `port`: mihomo decodes proxies with weak typing, so a
    string of digits (`port: "443"`, as some converters write it) is the
    number."""
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value.strip())
    return as_port(value, path)


def as_mark(value: Any, path: str) -> int:
    return as_int(value, path, 0, MAX_MARK, "a mark (integer)")


# YAML 1.1's other spellings of a boolean. yaml.v3 reads them as strings
# (yaml_source.py) but still decodes them into a Go bool field, which is
# what mihomo's typed keys are; Mirage takes them wherever it wants a bool.
_YAML11_BOOLS = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "off", "Off", "OFF"), False),
}


def as_bool(value: Any, path: str) -> bool:
    if isinstance(value, str) and value in _YAML11_BOOLS:
        return _YAML11_BOOLS[value]
    if not isinstance(value, bool):
        fail_type(value, path, "a boolean (true/false)")
    return value


def as_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        fail_type(value, path, "a string")
    return value


def as_nonempty_str(value: Any, path: str) -> str:
    text = as_str(value, path)
    if not text.strip():
        raise ConfigError(path, value, "must not be empty")
    return text


def as_seconds(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail_type(value, path, "a number of seconds")
    seconds = float(value)
    if not 0 < seconds <= 86400 or seconds != seconds:
        raise ConfigError(path, value, "must be more than 0 and at most 86400 seconds")
    return seconds


def choice(options: tuple[str, ...]) -> Callable[[Any, str], Any]:
    def convert(value: Any, path: str) -> Any:
        text = as_str(value, path)
        if text not in options:
            raise ConfigError(path, value, "must be one of " + ", ".join(options))
        return text

    return convert


def as_list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        fail_type(value, path, "a list")
    return value


def as_path(value: Any, path: str, base: Path | None) -> Path:
    text = as_nonempty_str(value, path)
    if "\0" in text:
        raise ConfigError(path, value, "contains a NUL byte")
    result = Path(text)
    # A relative path means relative to the config file, not to wherever
    # `mirage` happened to be started.
    if not result.is_absolute() and base is not None:
        result = base / result
    return result


def as_ip(value: Any, path: str) -> IPAddress:
    text = as_str(value, path)
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(path, value, "not an IP address") from None


def as_cidr(value: Any, path: str) -> IPNetwork:
    """A v4 or v6 network; host bits are allowed and masked off (as mihomo)."""
    text = as_str(value, path)
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(path, value, f"not an IP network ({exc})") from None


def split_host_port(text: str) -> tuple[str, str | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port`, `v6` -> (host, port text)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError("junk after ']'")
        return host, rest[1:]
    if text.count(":") > 1:  # bare IPv6 literal, no port
        return text, None
    if ":" in text:
        host, port = text.split(":", 1)
        return host, port
    return text, None


def port_from_text(text: str, value: Any, path: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ConfigError(path, value, f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(path, value, f"port {port} out of range (1..65535)")
    return port


def as_listen(value: Any, path: str, *, wildcard: str = "0.0.0.0") -> Listen:
    """`host:port`; an empty host (`:9090`) means every address."""
    text = as_nonempty_str(value, path).strip()
    try:
        host, port = split_host_port(text)
    except ValueError as exc:
        raise ConfigError(path, value, f"not host:port ({exc})") from None
    if port is None:
        raise ConfigError(path, value, "needs a port (host:port, or :port for all addresses)")
    if host in ("", "*"):
        host = wildcard
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(path, value, f"host {host!r} is not an IP address") from None
    return Listen(str(addr), port_from_text(port, value, path))


def as_domain(value: Any, path: str, *, wildcards: bool) -> str:
    """A domain name (lower case, punycode, no trailing dot), or a pattern
    if `wildcards` (see appliance/names.py). Returns the normalised text."""
    text = as_nonempty_str(value, path)
    try:
        return parse_name(text, pattern=wildcards)
    except ValueError as exc:
        raise ConfigError(path, value, str(exc)) from None
