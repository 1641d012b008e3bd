"""YAML file -> validated `Config`: the only place a config value is checked.

The format is the Clash/mihomo profile format (kebab-case keys) restricted to
what Mirage implements, plus one `appliance:` block. Three kinds of keys:

* implemented keys: parsed strictly (a string where a number belongs is an
  error, booleans are YAML booleans, ports 1..65535, marks 0..2^32-1);
* Clash/mihomo keys Mirage does not implement (`tun`, `dns.fallback`,
  `GEOIP` rules, `tls://` nameservers, `vmess` proxies, ...): accepted, left
  out of the model and listed in `Config.ignored_keys`, so an existing profile
  loads and `mirage check` can say what it will not do;
* anything else: a `ConfigError` naming the key path (`dns.fake-ip-range`,
  `proxies[2].port`) with the offending value and the reason.

Nothing here touches the network or the file system beyond reading the one
file; `mirage check` must work on a machine that is not the gateway.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import yaml

from appliance.config.model import (
    ApplianceConfig,
    Config,
    DnsConfig,
    DomainPolicy,
    IPAddress,
    IPNetwork,
    Listen,
    Nameserver,
    ProxyConfig,
    ProxyGroupConfig,
    Rule,
)
from appliance.names import pattern_is_valid

T = TypeVar("T")

# --------------------------------------------------------------------------
# Errors and key paths


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


def _key_path(parent: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{key!r}]"


def _index_path(parent: str, index: int) -> str:
    return f"{parent}[{index}]"


# --------------------------------------------------------------------------
# Scalar converters: (value, path) -> typed value, or ConfigError.

MAX_MARK = 2**32 - 1


def _type_name(value: Any) -> str:
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


def _fail_type(value: Any, path: str, expected: str) -> NoReturn:
    raise ConfigError(path, value, f"expected {expected}, got {_type_name(value)}")


def _int(value: Any, path: str, lo: int, hi: int, what: str = "an integer") -> int:
    # bool is an int subclass in Python; YAML `true` is not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail_type(value, path, what)
    if not lo <= value <= hi:
        raise ConfigError(path, value, f"out of range ({lo}..{hi})")
    return value


def _port(value: Any, path: str) -> int:
    return _int(value, path, 1, 65535, "a port number")


def _mark(value: Any, path: str) -> int:
    return _int(value, path, 0, MAX_MARK, "a mark (integer)")


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        _fail_type(value, path, "a boolean (true/false)")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        _fail_type(value, path, "a string")
    return value


def _nonempty_str(value: Any, path: str) -> str:
    text = _str(value, path)
    if not text.strip():
        raise ConfigError(path, value, "must not be empty")
    return text


def _seconds(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail_type(value, path, "a number of seconds")
    seconds = float(value)
    if not 0 < seconds <= 86400 or seconds != seconds:
        raise ConfigError(path, value, "must be more than 0 and at most 86400 seconds")
    return seconds


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], Any]:
    def convert(value: Any, path: str) -> Any:
        text = _str(value, path)
        if text not in options:
            raise ConfigError(path, value, "must be one of " + ", ".join(options))
        return text

    return convert


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        _fail_type(value, path, "a list")
    return value


def _path(value: Any, path: str, base: Path | None) -> Path:
    text = _nonempty_str(value, path)
    if "\0" in text:
        raise ConfigError(path, value, "contains a NUL byte")
    result = Path(text)
    # A relative path means relative to the config file, not to wherever
    # `mirage` happened to be started.
    if not result.is_absolute() and base is not None:
        result = base / result
    return result


def _ip(value: Any, path: str) -> IPAddress:
    text = _str(value, path)
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(path, value, "not an IP address") from None


def _cidr(value: Any, path: str) -> IPNetwork:
    """A v4 or v6 network; host bits are allowed and masked off (as mihomo)."""
    text = _str(value, path)
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError(path, value, f"not an IP network ({exc})") from None


def _split_host_port(text: str) -> tuple[str, str | None]:
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


def _port_text(text: str, value: Any, path: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ConfigError(path, value, f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(path, value, f"port {port} out of range (1..65535)")
    return port


def _listen(value: Any, path: str, *, wildcard: str = "0.0.0.0") -> Listen:
    """`host:port`; an empty host (`:9090`) means every address."""
    text = _nonempty_str(value, path).strip()
    try:
        host, port = _split_host_port(text)
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
    return Listen(str(addr), _port_text(port, value, path))


# Domain patterns in mihomo's trie syntax: `example.com`, `+.example.com`
# (the name and everything under it), `.example.com` (everything under it),
# `*.example.com` / `time.*.com` (`*` is exactly one label).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _to_ascii(label: str) -> str:
    if label.isascii():
        return label
    try:
        return label.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"label {label!r} is not a valid internationalised name ({exc})") from None


def _domain(value: Any, path: str, *, wildcards: bool) -> str:
    """A domain name (lower case, no trailing dot), or a pattern if
    `wildcards`. Returns the normalised text."""
    text = _nonempty_str(value, path).strip().lower()
    body = text
    prefix = ""
    if wildcards:
        if body.startswith("+."):
            prefix, body = "+.", body[2:]
        elif body.startswith("."):
            prefix, body = ".", body[1:]
    if body.endswith("."):
        body = body[:-1]
    if not body:
        raise ConfigError(path, value, "empty domain name")
    labels = body.split(".")
    out: list[str] = []
    for label in labels:
        if wildcards and label == "*":
            out.append(label)
            continue
        try:
            ascii_label = _to_ascii(label)
        except ValueError as exc:
            raise ConfigError(path, value, str(exc)) from None
        if not _LABEL.fullmatch(ascii_label):
            hint = "" if wildcards or "*" not in label else " (wildcards are not allowed here)"
            raise ConfigError(path, value, f"invalid label {label!r} in domain name{hint}")
        out.append(ascii_label)
    name = ".".join(out)
    if len(name) > 253:
        raise ConfigError(path, value, "domain name longer than 253 characters")
    if wildcards:
        # The DNS service builds its tries from these patterns; let the trie's
        # own check speak here so it never has to refuse a loaded config.
        why = pattern_is_valid(prefix + name)
        if why is not None:
            raise ConfigError(path, value, why)
    return prefix + name


# --------------------------------------------------------------------------
# Mapping sections


class _Ctx:
    """State of one load: where relative paths start, what was ignored."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
        self.base = source.parent if source is not None else None
        self.ignored: list[str] = []

    def ignore(self, path: str, note: str = "") -> None:
        self.ignored.append(f"{path} ({note})" if note else path)


class _Section:
    """A YAML mapping being read: tracks which keys were consumed so that
    `finish` can report the rest as ignored (known Clash keys) or unknown."""

    def __init__(self, data: Any, path: str, ctx: _Ctx) -> None:
        if not isinstance(data, dict):
            _fail_type(data, path or "<top level>", "a mapping")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(
                    _key_path(path, str(key)), key, f"keys must be strings, got {_type_name(key)}"
                )
        self.data: dict[str, Any] = data
        self.path = path
        self.ctx = ctx
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return _key_path(self.path, key)

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

    def section(self, key: str) -> _Section:
        value = self.raw(key)
        return _Section({} if value is None else value, self.at(key), self.ctx)

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


# --------------------------------------------------------------------------
# Known Clash/mihomo keys that Mirage accepts and ignores (from mihomo's
# config/config.go RawConfig, RawDNS, RawProfile and adapter option structs).

TOP_LEVEL_KEYS = (
    "mixed-port", "socks-port", "port", "authentication", "allow-lan", "bind-address",
    "tproxy-port", "routing-mark", "ipv6", "log-level",
    "external-controller", "secret", "profile", "dns", "hosts", "proxies",
    "proxy-groups", "rules", "appliance",
)  # fmt: skip
IGNORED_TOP_LEVEL = (
    "redir-port", "ss-config", "vmess-config",
    "inbound-tfo", "inbound-mptcp", "skip-auth-prefixes",
    "lan-allowed-ips", "lan-disallowed-ips", "mode",
    "unified-delay", "external-controller-pipe", "external-controller-unix",
    "external-controller-tls", "external-controller-cors", "external-ui",
    "external-ui-url", "external-ui-name", "external-doh-server",
    "interface-name", "tunnels", "geo-auto-update", "geo-update-interval",
    "geodata-mode", "geodata-loader", "geosite-matcher", "tcp-concurrent",
    "find-process-mode", "global-client-fingerprint", "global-ua",
    "etag-support", "keep-alive-idle", "keep-alive-interval",
    "disable-keep-alive", "proxy-providers", "rule-providers", "sub-rules",
    "listeners", "ntp", "tun", "tuic-server", "iptables", "experimental",
    "geox-url", "sniffer", "tls", "clash-for-android", "auto-redir",
    "mitm-port", "mitm", "script", "log-file",
)  # fmt: skip
PROFILE_KEYS = ("store-fake-ip",)
IGNORED_PROFILE = ("store-selected",)
DNS_KEYS = (
    "enable", "listen", "ipv6", "enhanced-mode", "fake-ip-range",
    "fake-ip-range6", "fake-ip-filter", "fake-ip-filter-mode",
    "default-nameserver", "nameserver", "nameserver-policy", "hosts",
    "ca-file", "upstream-timeout", "cache-size",
)  # fmt: skip
IGNORED_DNS = (
    "prefer-h3", "ipv6-timeout", "use-hosts", "use-system-hosts",
    "respect-rules", "fallback", "fallback-filter", "cache-algorithm",
    "proxy-server-nameserver", "direct-nameserver",
    "direct-nameserver-follow-policy", "fake-ip-ttl",
)  # fmt: skip
APPLIANCE_KEYS = (
    "lan", "redirect", "dns-hijack", "bypass", "state-dir",
    "store-flush-interval", "route-table", "capture-mark", "connect-timeout",
    "idle-timeout", "udp-timeout", "udp-max-sessions", "offload-direct",
)  # fmt: skip

# Options every mihomo outbound takes (BasicOption) and a few per-type keys
# that only tune transport details Mirage does not have.
_IGNORED_PROXY_COMMON = (
    "tfo", "mptcp", "interface-name", "routing-mark", "ip-version",
    "dialer-proxy", "fingerprint", "client-fingerprint", "smux",
)  # fmt: skip
PROXY_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (implemented keys besides name/type, ignored keys)
    "socks5": (
        ("server", "port", "username", "password", "tls", "skip-cert-verify", "udp",
         "preconnect"),
        _IGNORED_PROXY_COMMON,
    ),
    "http": (
        ("server", "port", "username", "password", "tls", "skip-cert-verify", "sni",
         "preconnect"),
        # udp: converters emit it on every proxy; an http proxy has no UDP.
        (*_IGNORED_PROXY_COMMON, "headers", "udp"),
    ),
    "ss": (
        ("server", "port", "password", "cipher", "udp"),
        (*_IGNORED_PROXY_COMMON, "udp-over-tcp", "udp-over-tcp-version"),
    ),
    "trojan": (
        ("server", "port", "password", "sni", "skip-cert-verify", "udp"),
        (*_IGNORED_PROXY_COMMON, "alpn"),
    ),
    "direct": ((), _IGNORED_PROXY_COMMON),
    "reject": ((), _IGNORED_PROXY_COMMON),
}
# `preconnect` of plain SOCKS5 / HTTP proxies: connections kept open ahead
# of the flows (appliance/outbound/preconnect.py).
PRECONNECT_DEFAULT = 2
PRECONNECT_MAX = 64
# mihomo outbound types Mirage cannot speak: such a proxy is skipped (and
# reported); a rule that targets it is an error, a group drops it.
UNSUPPORTED_PROXY_TYPES = (
    "vmess", "vless", "ssr", "snell", "socks4", "hysteria", "hysteria2",
    "tuic", "wireguard", "ssh", "mieru", "anytls", "dns", "semi", "sudoku",
)  # fmt: skip
# AEAD ciphers (SIP004) only: the stream ciphers are broken and mihomo
# itself deprecates them.
SS_CIPHERS = ("aes-128-gcm", "aes-192-gcm", "aes-256-gcm", "chacha20-ietf-poly1305")

GROUP_KEYS = ("name", "type", "proxies")
IGNORED_GROUP = (
    "use", "url", "interval", "timeout", "max-failed-times", "lazy",
    "disable-udp", "filter", "exclude-filter", "exclude-type",
    "expected-status", "include-all", "include-all-proxies",
    "include-all-providers", "hidden", "icon", "tolerance", "strategy",
    "interface-name", "routing-mark",
)  # fmt: skip

# Exactly what appliance/rules/engine.py matches (FINAL is read as MATCH).
RULE_TYPES = (
    "DOMAIN", "DOMAIN-SUFFIX", "DOMAIN-KEYWORD", "IP-CIDR", "IP-CIDR6",
    "SRC-IP-CIDR", "DST-PORT", "SRC-PORT", "NETWORK", "MATCH",
)  # fmt: skip
IGNORED_RULE_TYPES = (
    "DOMAIN-REGEX", "DOMAIN-WILDCARD", "GEOSITE", "GEOIP", "SRC-GEOIP",
    "IP-ASN", "SRC-IP-ASN", "IP-SUFFIX", "SRC-IP-SUFFIX",
    "IN-PORT", "IN-USER", "IN-NAME", "IN-TYPE", "PROCESS-NAME",
    "PROCESS-PATH", "PROCESS-NAME-REGEX", "PROCESS-PATH-REGEX",
    "PROCESS-NAME-WILDCARD", "PROCESS-PATH-WILDCARD", "UID",
    "DSCP", "RULE-SET", "AND", "OR", "NOT", "SUB-RULE", "SCRIPT",
    "USER-AGENT", "URL-REGEX", "SRC-IP-CIDR6",
)  # fmt: skip
BUILTIN_TARGETS = ("DIRECT", "REJECT")

# mihomo's default fake-ip-range6 (used only when dns.ipv6 is on and the key
# is absent).
DEFAULT_FAKE_IP_RANGE6 = ipaddress.IPv6Network("fdfe:dcba:9876::/64")


# --------------------------------------------------------------------------
# Entry points


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, as Go's yaml.v3 (and so
    mihomo) does: silently keeping the last one hides mistakes. It also notes
    which nodes carry an `&anchor`, see `_anchor_holders`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.anchored: set[int] = set()

    def compose_scalar_node(self, anchor: Any) -> yaml.ScalarNode:
        node = super().compose_scalar_node(anchor)
        if anchor is not None:
            self.anchored.add(id(node))
        return node

    def compose_sequence_node(self, anchor: Any) -> yaml.SequenceNode:
        node = super().compose_sequence_node(anchor)
        if anchor is not None:
            self.anchored.add(id(node))
        return node

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        if anchor is not None:
            self.anchored.add(id(node))
        return node


def _anchor_holders(loader: _UniqueKeyLoader, root: yaml.Node | None) -> list[str]:
    """Top-level keys that exist only to hold a YAML anchor.

    mihomo ignores unknown top-level keys, and profiles use that to keep
    shared fragments (`p: &p {type: http, interval: 86400}`) reused by
    `<<: *p` elsewhere. Mirage rejects unknown keys, except a non-Clash
    top-level key whose whole value is anchored: that is such a holder.
    """
    if not isinstance(root, yaml.MappingNode):
        return []
    known = set(TOP_LEVEL_KEYS) | set(IGNORED_TOP_LEVEL)
    return [
        key.value
        for key, value in root.value
        if isinstance(key, yaml.ScalarNode)
        and isinstance(key.value, str)
        and key.value not in known
        and id(value) in loader.anchored
    ]


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Only keys written in this mapping count: a key that overrides one
    # pulled in by a `<<: *anchor` merge is the point of merging.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node)


_MERGE_TAG = "tag:yaml.org,2002:merge"
_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_config(path: str | Path) -> Config:
    """Read and validate the YAML file at `path`.

    Raises ConfigError for everything wrong with it: missing or unreadable
    file, YAML syntax (reason carries line and column), any invalid value.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", str(source), f"cannot read: {exc}") from None
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
        holders = _anchor_holders(loader, root)
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", NO_VALUE, f"{source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError("<file>", NO_VALUE, f"{source}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return parse_config(data, source=source.absolute(), anchor_keys=holders)


def parse_config(
    data: Any, source: Path | None = None, *, anchor_keys: Iterable[str] = ()
) -> Config:
    """Validate already-loaded YAML data (`yaml.safe_load` output).

    `source` is recorded in `Config.source` and anchors relative paths
    (`appliance.state-dir`, `dns.ca-file`). `anchor_keys` are top-level keys
    that only hold YAML anchors (found by `load_config`): reported ignored.
    Raises ConfigError only.
    """
    ctx = _Ctx(source)
    if data is None:
        data = {}
    holders = set(anchor_keys)
    if holders and isinstance(data, dict):
        for key in holders:
            if key in data:
                ctx.ignore(_key_path("", key), "YAML anchor")
        data = {k: v for k, v in data.items() if k not in holders}
    try:
        return _parse_root(data, ctx)
    except RecursionError:
        raise ConfigError("<top level>", NO_VALUE, "nested too deeply") from None


def check_runnable(cfg: Config) -> None:
    """What `mirage run` needs beyond what `mirage check` validates: an
    appliance must know which interfaces it serves. Raises ConfigError."""
    if not cfg.appliance.lan:
        raise ConfigError(
            "appliance.lan", list(cfg.appliance.lan), "name at least one LAN interface to serve"
        )


# --------------------------------------------------------------------------
# The tree


def _parse_root(data: Any, ctx: _Ctx) -> Config:
    root = _Section(data, "", ctx)
    mixed_port = root.get("mixed-port", _optional_port, None)
    socks_port = root.get("socks-port", _optional_port, None)
    http_port = root.get("port", _optional_port, None)
    authentication = _parse_authentication(root.raw("authentication"), root.at("authentication"))
    allow_lan = root.get("allow-lan", _bool, True)
    bind_address = root.get("bind-address", _bind_address, "*")
    tproxy_port = root.get("tproxy-port", _optional_port, None)
    routing_mark = root.get("routing-mark", _mark, None)
    ipv6 = root.get("ipv6", _bool, False)
    log_level = root.get(
        "log-level", _choice(("silent", "error", "warning", "info", "debug")), "info"
    )
    external_controller = root.get("external-controller", _controller, None)
    secret = root.get("secret", _str, "")

    profile = root.section("profile")
    store_fake_ip = profile.get("store-fake-ip", _bool, False)
    profile.finish(PROFILE_KEYS, IGNORED_PROFILE)

    top_hosts = _parse_hosts(root.raw("hosts"), root.at("hosts"), ctx)
    dns = _parse_dns(root.section("dns"), top_hosts)

    proxies, skipped = _parse_proxies(root.raw("proxies"), root.at("proxies"), ctx)
    groups = _parse_groups(root.raw("proxy-groups"), root.at("proxy-groups"), ctx, proxies, skipped)
    targets = {p.name for p in proxies} | {g.name for g in groups} | set(BUILTIN_TARGETS)
    rules = _parse_rules(root.raw("rules"), root.at("rules"), ctx, targets, skipped)
    appliance = _parse_appliance(root.section("appliance"))
    root.finish(TOP_LEVEL_KEYS, IGNORED_TOP_LEVEL)

    cfg = Config(
        mixed_port=mixed_port,
        socks_port=socks_port,
        http_port=http_port,
        authentication=authentication,
        allow_lan=allow_lan,
        bind_address=bind_address,
        tproxy_port=tproxy_port,
        routing_mark=routing_mark,
        ipv6=ipv6,
        log_level=cast(Any, log_level),
        external_controller=external_controller,
        secret=secret,
        store_fake_ip=store_fake_ip,
        dns=dns,
        proxies=tuple(proxies),
        proxy_groups=tuple(groups),
        rules=tuple(rules),
        appliance=appliance,
        ignored_keys=tuple(ctx.ignored),
        source=ctx.source,
    )
    _check_cross(cfg)
    return cfg


def _parse_authentication(raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    """Clash `authentication: ["user:pass", ...]` (split at the first colon,
    as mihomo does) -> ((user, pass), ...). RFC 1929 bounds both to 1..255
    bytes; a user listed twice is an error."""
    if raw is None:
        return ()
    users: list[tuple[str, str]] = []
    for i, item in enumerate(_list(raw, path)):
        at = _index_path(path, i)
        user, sep, password = _str(item, at).partition(":")
        if not sep or not user or not password:
            raise ConfigError(at, "<hidden>", 'expected "username:password"')
        if len(user.encode()) > 255 or len(password.encode()) > 255:
            raise ConfigError(at, "<hidden>", "username and password are at most 255 bytes each")
        if any(u == user for u, _ in users):
            raise ConfigError(at, user, "username listed twice")
        users.append((user, password))
    return tuple(users)


def _bind_address(value: Any, path: str) -> str:
    """`*` (every LAN address) or one IP literal."""
    text = _str(value, path).strip()
    if text == "*":
        return text
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise ConfigError(path, value, 'expected "*" or an IP address') from None


def _optional_port(value: Any, path: str) -> int | None:
    # Clash spells "this listener is off" as port 0.
    if type(value) is int and value == 0:
        return None
    return _port(value, path)


def _controller(value: Any, path: str) -> Listen | None:
    if isinstance(value, str) and not value.strip():
        return None  # empty string: controller off, as in Clash
    return _listen(value, path)


# --- hosts -----------------------------------------------------------------


def _parse_hosts(value: Any, path: str, ctx: _Ctx) -> dict[str, list[IPAddress]]:
    """`name: ip | [ip, ...]`. mihomo also allows a domain as the value (an
    alias); Mirage does not, so such an entry is reported ignored."""
    result: dict[str, list[IPAddress]] = {}
    if value is None:
        return result
    section = _Section(value, path, ctx)
    for key in list(section.data):
        entry_path = section.at(key)
        name = _domain(key, entry_path, wildcards=True)
        raw = section.raw(key)
        items = raw if isinstance(raw, list) else [raw]
        addrs: list[IPAddress] = []
        for i, item in enumerate(items):
            item_path = _index_path(entry_path, i) if isinstance(raw, list) else entry_path
            if isinstance(item, str):
                try:
                    addrs.append(ipaddress.ip_address(item.strip()))
                    continue
                except ValueError:
                    pass
                try:
                    alias = _domain(item, item_path, wildcards=False)
                except ConfigError:
                    alias = ""
                # No top-level domain is all digits: `300.0.0.1` is a bad IP.
                if not alias or alias.rsplit(".", 1)[-1].isdigit():
                    raise ConfigError(item_path, item, "not an IP address")
                ctx.ignore(item_path, "domain alias")
                continue
            _fail_type(item, item_path, "an IP address")
        if not addrs and not items:
            raise ConfigError(entry_path, raw, "needs at least one address")
        if addrs:
            _merge_addrs(result, name, addrs)
    return result


def _merge_addrs(into: dict[str, list[IPAddress]], name: str, addrs: list[IPAddress]) -> None:
    current = into.setdefault(name, [])
    for addr in addrs:
        if addr not in current:
            current.append(addr)


# --- dns -------------------------------------------------------------------


_NS_IGNORED_SCHEMES = ("tls", "quic", "dhcp", "h3", "sdns", "rcode", "doq", "dot")


def _nameserver(value: Any, path: str, ctx: _Ctx, *, ip_only: bool = False) -> Nameserver | None:
    """One nameserver entry, or None if it is a real Clash form Mirage does not
    implement (then reported ignored)."""
    text = _nonempty_str(value, path).strip()
    lower = text.lower()
    if lower == "system" or "#" in text:
        ctx.ignore(path, text)
        return None
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "udp", text
    else:
        scheme = scheme.lower()
    if scheme in _NS_IGNORED_SCHEMES:
        ctx.ignore(path, text)
        return None
    if scheme not in ("https", "udp", "tcp"):
        raise ConfigError(path, value, f"unknown nameserver scheme {scheme!r}")
    if ip_only and scheme == "https":
        raise ConfigError(
            path, value, "must be an IP address (udp/tcp): it bootstraps the other names"
        )
    if scheme == "https":
        authority, slash, rest_path = rest.partition("/")
        ns_path = "/" + rest_path if slash else "/dns-query"
        if "?" in ns_path:
            raise ConfigError(path, value, "a query string in a DoH URL is not supported")
    else:
        authority = rest.rstrip("/")
        if "/" in authority:
            raise ConfigError(path, value, f"{scheme} nameserver takes no path")
        ns_path = "/dns-query"
    try:
        host, port_text = _split_host_port(authority)
    except ValueError as exc:
        raise ConfigError(path, value, f"not host[:port] ({exc})") from None
    if not host:
        raise ConfigError(path, value, "missing host")
    if "@" in host:
        raise ConfigError(path, value, "credentials in a nameserver URL are not supported")
    port = (
        _port_text(port_text, value, path)
        if port_text is not None
        else (443 if scheme == "https" else 53)
    )
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if scheme != "https":
            raise ConfigError(
                path,
                value,
                f"{host!r} is not an IP address ({scheme} nameservers are given by IP;"
                " use https:// for a server known by name)",
            ) from None
        host = _domain(host, path, wildcards=False)
    return Nameserver(scheme=cast(Any, scheme), host=host, port=port, path=ns_path, text=text)


def _nameserver_entries(
    value: Any, path: str, ctx: _Ctx, *, ip_only: bool = False
) -> list[tuple[str, Nameserver]]:
    """The usable nameservers of a list (or single string), with their paths."""
    if isinstance(value, str):  # mihomo accepts a single string here too
        single = _nameserver(value, path, ctx, ip_only=ip_only)
        return [] if single is None else [(path, single)]
    result: list[tuple[str, Nameserver]] = []
    for i, item in enumerate(_list(value, path)):
        item_path = _index_path(path, i)
        ns = _nameserver(item, item_path, ctx, ip_only=ip_only)
        if ns is not None:
            result.append((item_path, ns))
    return result


def _nameserver_list(
    value: Any, path: str, ctx: _Ctx, *, ip_only: bool = False
) -> list[Nameserver]:
    return [ns for _, ns in _nameserver_entries(value, path, ctx, ip_only=ip_only)]


_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _fake_range(kind: type[_Net], example: str) -> Callable[[Any, str], _Net]:
    """A parser for a fake-IP range of `kind`: a network with an explicit
    prefix length that leaves room for fake IPs."""
    probe = kind(0)
    longest = probe.max_prefixlen - 2

    def parse(value: Any, path: str) -> _Net:
        text = _str(value, path).strip()
        try:
            net = kind(text, strict=False)
        except ValueError as exc:
            raise ConfigError(path, value, f"not an IPv{probe.version} network ({exc})") from None
        if "/" not in text:
            raise ConfigError(path, value, f"needs a prefix length (e.g. {example})")
        if net.prefixlen > longest:
            raise ConfigError(
                path, value, f"prefix longer than /{longest} leaves no room for fake IPs")
        return net

    return parse


_fake_ip_range = _fake_range(ipaddress.IPv4Network, "198.18.0.1/16")
_fake_ip_range6 = _fake_range(ipaddress.IPv6Network, "fdfe:dcba:9876::1/64")


def _pattern_list(value: Any, path: str, ctx: _Ctx) -> list[str]:
    result: list[str] = []
    for i, item in enumerate(_list(value, path)):
        item_path = _index_path(path, i)
        text = _str(item, item_path).strip()
        if text.lower().startswith(("geosite:", "rule-set:")):
            ctx.ignore(item_path, text)
            continue
        pattern = _domain(text, item_path, wildcards=True)
        if pattern not in result:
            result.append(pattern)
    return result


def _parse_policy(
    value: Any, path: str, ctx: _Ctx, named: list[tuple[str, Nameserver]]
) -> list[DomainPolicy]:
    """`nameserver-policy: {pattern: ns | [ns, ...]}`; a key may hold several
    comma-separated patterns (mihomo). Appends (path, server) to `named`."""
    result: list[DomainPolicy] = []
    if value is None:
        return result
    section = _Section(value, path, ctx)
    seen: set[str] = set()
    for key in list(section.data):
        entry_path = section.at(key)
        raw = section.raw(key)
        if raw is None:
            raise ConfigError(entry_path, raw, "needs at least one nameserver")
        entries = _nameserver_entries(raw, entry_path, ctx)
        servers = [ns for _, ns in entries]
        if key.strip().lower().startswith(("geosite:", "rule-set:")):
            # `geosite:cn,private`: the comma list is of geosite/rule-set names.
            ctx.ignore(entry_path, key.strip())
            continue
        usable = [_domain(p.strip(), entry_path, wildcards=True) for p in key.split(",")]
        if not servers:
            ctx.ignore(entry_path, "no usable nameserver")
            continue
        named.extend(entries)
        for pattern in usable:
            if pattern in seen:
                raise ConfigError(entry_path, pattern, "pattern already has a policy")
            seen.add(pattern)
            result.append(DomainPolicy(pattern, tuple(servers)))
    return result


def _parse_dns(sec: _Section, top_hosts: dict[str, list[IPAddress]]) -> DnsConfig:
    ctx = sec.ctx
    d = DnsConfig()
    enable = sec.get("enable", _bool, d.enable)
    listen = sec.get("listen", _listen, d.listen)
    ipv6 = sec.get("ipv6", _bool, d.ipv6)
    mode = sec.get("enhanced-mode", _choice(("fake-ip", "redir-host", "normal")), d.enhanced_mode)
    fake_range = sec.get("fake-ip-range", _fake_ip_range, d.fake_ip_range)
    fake_range6 = sec.get("fake-ip-range6", _fake_ip_range6, d.fake_ip_range6)
    if fake_range6 is None and ipv6:
        fake_range6 = DEFAULT_FAKE_IP_RANGE6
    fake_filter: list[str] = sec.get("fake-ip-filter", lambda v, p: _pattern_list(v, p, ctx), [])
    filter_mode = sec.get(
        "fake-ip-filter-mode", _choice(("blacklist", "whitelist")), d.fake_ip_filter_mode
    )
    default_ns: list[Nameserver] = sec.get(
        "default-nameserver", lambda v, p: _nameserver_list(v, p, ctx, ip_only=True), []
    )
    nameserver_raw = sec.raw("nameserver")
    named = (
        [] if nameserver_raw is None
        else _nameserver_entries(nameserver_raw, sec.at("nameserver"), ctx)
    )  # fmt: skip
    nameservers = [ns for _, ns in named]
    policy = _parse_policy(sec.raw("nameserver-policy"), sec.at("nameserver-policy"), ctx, named)
    hosts = {name: list(addrs) for name, addrs in top_hosts.items()}
    for name, addrs in _parse_hosts(sec.raw("hosts"), sec.at("hosts"), ctx).items():
        _merge_addrs(hosts, name, addrs)
    ca_file = sec.get("ca-file", lambda v, p: _path(v, p, ctx.base), d.ca_file)
    upstream_timeout = sec.get("upstream-timeout", _seconds, d.upstream_timeout)
    cache_size = sec.get("cache-size", lambda v, p: _int(v, p, 0, 10_000_000), d.cache_size)
    sec.finish(DNS_KEYS, IGNORED_DNS)

    if enable and not nameservers:
        why = (
            "required when dns.enable is true"
            if nameserver_raw is None
            else "no usable nameserver left (only forms Mirage does not implement)"
        )
        raise ConfigError(
            sec.at("nameserver"), NO_VALUE if nameserver_raw is None else nameserver_raw, why
        )
    # A DoH server known by name needs an IP-literal resolver to find it;
    # asking the system resolver would ask the poisoned one.
    for where, ns in named:
        if not default_ns and not _is_ip(ns.host):
            raise ConfigError(
                where,
                ns.text,
                "server is known by name: list an IP-address resolver in"
                " dns.default-nameserver to bootstrap it",
            )
    return DnsConfig(
        enable=enable,
        listen=listen,
        ipv6=ipv6,
        enhanced_mode=cast(Any, mode),
        fake_ip_range=fake_range,
        fake_ip_range6=fake_range6,
        fake_ip_filter=tuple(fake_filter),
        fake_ip_filter_mode=cast(Any, filter_mode),
        default_nameserver=tuple(default_ns),
        nameserver=tuple(nameservers),
        nameserver_policy=tuple(policy),
        hosts=tuple((name, tuple(addrs)) for name, addrs in hosts.items()),
        ca_file=ca_file,
        upstream_timeout=upstream_timeout,
        cache_size=cache_size,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- proxies and groups ----------------------------------------------------


def _server(value: Any, path: str) -> str:
    text = _nonempty_str(value, path).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return _domain(text, path, wildcards=False)


def _parse_proxies(value: Any, path: str, ctx: _Ctx) -> tuple[list[ProxyConfig], dict[str, str]]:
    """Returns the implemented proxies and {name: why skipped} for the rest."""
    proxies: list[ProxyConfig] = []
    skipped: dict[str, str] = {}
    names: set[str] = set()
    if value is None:
        return proxies, skipped
    for i, item in enumerate(_list(value, path)):
        sec = _Section(item, _index_path(path, i), ctx)
        name = sec.require("name", _nonempty_str)
        if name in names:
            raise ConfigError(sec.at("name"), name, "duplicate proxy name")
        if name in BUILTIN_TARGETS:
            raise ConfigError(sec.at("name"), name, "reserved name (a built-in target)")
        names.add(name)
        ptype = sec.require("type", _nonempty_str).lower()
        if ptype in UNSUPPORTED_PROXY_TYPES:
            ctx.ignore(sec.path, f"{ptype} proxy {name!r}")
            skipped[name] = f"a {ptype} proxy, which Mirage does not implement"
            continue
        if ptype not in PROXY_KEYS:
            raise ConfigError(
                sec.at("type"), sec.data["type"],
                "unknown proxy type (Mirage implements " + ", ".join(PROXY_KEYS) + ")",
            )  # fmt: skip
        reason = _unusable_proxy(sec, ptype)
        if reason is not None:
            ctx.ignore(sec.path, f"{ptype} proxy {name!r}: {reason}")
            skipped[name] = f"a {ptype} proxy with {reason}, which Mirage does not implement"
            continue
        proxies.append(_parse_proxy(sec, name, ptype))
    return proxies, skipped


def _unusable_proxy(sec: _Section, ptype: str) -> str | None:
    """Real mihomo options that change the wire protocol: without them the
    proxy cannot work, so the whole proxy is skipped rather than the key."""
    data = sec.data
    if ptype == "ss":
        if data.get("plugin") is not None:
            return f"plugin {data['plugin']!r}"
        cipher = data.get("cipher")
        if isinstance(cipher, str) and cipher.lower() not in SS_CIPHERS:
            return f"cipher {cipher!r}"
    if ptype == "trojan":
        network = data.get("network")
        if network is not None and network != "tcp":
            return f"network {network!r}"
        for key in ("reality-opts", "grpc-opts", "ws-opts", "ss-opts"):
            if data.get(key) is not None:
                return key
    return None


def _parse_proxy(sec: _Section, name: str, ptype: str) -> ProxyConfig:
    implemented, ignored = PROXY_KEYS[ptype]
    if ptype in ("direct", "reject"):
        sec.finish(("name", "type", *implemented), ignored)
        return ProxyConfig(name=name, type=cast(Any, ptype))
    server = sec.require("server", _server)
    port = sec.require("port", _port)
    username = sec.get("username", _str, None) if "username" in implemented else None
    password: str | None
    if ptype in ("ss", "trojan"):
        password = sec.require("password", _nonempty_str)
    else:
        password = sec.get("password", _str, None)
    tls = sec.get("tls", _bool, False) if "tls" in implemented else ptype == "trojan"
    skip_verify = sec.get("skip-cert-verify", _bool, False) if ptype != "ss" else False
    sni = (
        sec.get("sni", lambda v, p: _domain(v, p, wildcards=False), None)
        if ("sni" in implemented)
        else None
    )
    udp = sec.get("udp", _bool, False) if "udp" in implemented else False
    cipher = sec.require("cipher", _choice(SS_CIPHERS)) if ptype == "ss" else None
    if (username is None) != (password is None) and ptype in ("socks5", "http"):
        missing = "password" if password is None else "username"
        raise ConfigError(sec.at(missing), NO_VALUE, "username and password go together")
    preconnect = 0
    if "preconnect" in implemented:
        preconnect = sec.get("preconnect", lambda v, p: _int(v, p, 0, PRECONNECT_MAX),
                             0 if tls else PRECONNECT_DEFAULT)
        if preconnect and tls:
            raise ConfigError(sec.at("preconnect"), preconnect,
                              "kept connections are plain TCP: set 0 with tls: true")
    sec.finish(("name", "type", *implemented), ignored)
    return ProxyConfig(
        name=name,
        type=cast(Any, ptype),
        server=server,
        port=port,
        username=username,
        password=password,
        tls=tls,
        skip_cert_verify=skip_verify,
        sni=sni,
        udp=udp,
        cipher=cipher,
        preconnect=preconnect,
    )


def _parse_groups(
    value: Any,
    path: str,
    ctx: _Ctx,
    proxies: list[ProxyConfig],
    skipped: dict[str, str],
) -> list[ProxyGroupConfig]:
    """select and fallback as such; url-test and load-balance are run as
    fallback (first reachable member, in order) and reported; relay is skipped.
    Members that name skipped proxies are dropped; a group left empty is
    skipped in turn (and reported)."""
    if value is None:
        return []
    proxy_names = {p.name for p in proxies}
    entries: list[tuple[_Section, str, str, list[tuple[str, str]]]] = []
    group_names: set[str] = set()
    for i, item in enumerate(_list(value, path)):
        sec = _Section(item, _index_path(path, i), ctx)
        name = sec.require("name", _nonempty_str)
        if name in group_names or name in proxy_names or name in skipped:
            raise ConfigError(
                sec.at("name"), name, "duplicate name (proxies and groups share names)"
            )
        if name in BUILTIN_TARGETS:
            raise ConfigError(sec.at("name"), name, "reserved name (a built-in target)")
        group_names.add(name)
        gtype = sec.require("type", _nonempty_str)
        members_raw = sec.raw("proxies")
        members: list[tuple[str, str]] = []
        if members_raw is not None:
            for j, member in enumerate(_list(members_raw, sec.at("proxies"))):
                member_path = _index_path(sec.at("proxies"), j)
                members.append((_nonempty_str(member, member_path), member_path))
        sec.finish(GROUP_KEYS, IGNORED_GROUP)
        if gtype in ("url-test", "load-balance"):
            ctx.ignore(sec.at("type"), f"{gtype} runs as fallback")
            gtype = "fallback"
        elif gtype == "relay":
            ctx.ignore(sec.path, f"relay group {name!r}")
            skipped[name] = "a relay group, which Mirage does not implement"
            continue
        elif gtype not in ("select", "fallback"):
            raise ConfigError(
                sec.at("type"), gtype,
                "unknown group type (select, fallback; url-test and load-balance run as fallback)",
            )  # fmt: skip
        if (
            not members
            and members_raw is None
            and (sec.data.get("use") is None and not sec.data.get("include-all"))
        ):
            raise ConfigError(sec.at("proxies"), NO_VALUE, "a group needs members")
        entries.append((sec, name, gtype, members))

    # Members may name groups defined later; resolve after all names are known.
    known = proxy_names | group_names | set(BUILTIN_TARGETS)
    for _sec, name, _gtype, members in entries:
        for member, member_path in members:
            if member == name:
                raise ConfigError(member_path, member, "a group cannot contain itself")
            if member not in known and member not in skipped:
                raise ConfigError(member_path, member, "no proxy or group has this name")

    # Skip groups left without a usable member until nothing changes (an
    # emptied group is skipped, which may empty the groups that contain it).
    changed = True
    while changed:
        changed = False
        for sec, name, _gtype, members in entries:
            if name not in skipped and all(m in skipped for m, _ in members):
                ctx.ignore(sec.path, f"group {name!r} has no usable member")
                skipped[name] = "a group with no member Mirage can use"
                changed = True
    groups: list[ProxyGroupConfig] = []
    for _sec, name, gtype, members in entries:
        if name in skipped:
            continue
        usable: list[str] = []
        for member, member_path in members:
            if member in skipped:
                ctx.ignore(member_path, f"{member!r} skipped")
            else:
                usable.append(member)
        groups.append(ProxyGroupConfig(name=name, type=cast(Any, gtype), proxies=tuple(usable)))
    _check_group_cycles(groups, entries)
    return groups


def _check_group_cycles(
    groups: list[ProxyGroupConfig], entries: list[tuple[_Section, str, str, Any]]
) -> None:
    members = {g.name: g.proxies for g in groups}
    paths = {name: sec.at("proxies") for sec, name, _t, _m in entries}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for member in members.get(name, ()):
            if member not in members:
                continue
            if state.get(member) == 1:
                cycle = [*trail[trail.index(member) :], member] if member in trail else [member]
                raise ConfigError(paths[name], " -> ".join(cycle), "groups contain each other")
            if state.get(member) is None:
                visit(member, [*trail, member])
        state[name] = 2

    for g in groups:
        if state.get(g.name) is None:
            visit(g.name, [g.name])


# --- rules -----------------------------------------------------------------


def _port_spec(text: str, value: Any, path: str) -> str:
    """`80`, `8000-9000`, or mihomo's `/`-separated list of those."""
    parts = text.split("/")
    out: list[str] = []
    for part in parts:
        lo_text, dash, hi_text = part.strip().partition("-")
        lo = _port_text(lo_text.strip(), value, path)
        if dash:
            hi = _port_text(hi_text.strip(), value, path)
            if hi < lo:
                raise ConfigError(path, value, f"port range {lo}-{hi} is backwards")
            out.append(f"{lo}-{hi}")
        else:
            out.append(str(lo))
    return "/".join(out)


def _rule_value(rtype: str, payload: str, value: Any, path: str) -> str:
    if rtype in ("DOMAIN", "DOMAIN-SUFFIX"):
        if rtype == "DOMAIN-SUFFIX" and payload.startswith("."):
            payload = payload[1:]  # Clash writes both `.example.com` and `example.com`
        return _domain(payload, path, wildcards=False)
    if rtype == "DOMAIN-KEYWORD":
        if not payload or any(c.isspace() for c in payload):
            raise ConfigError(path, value, "keyword must be non-empty without spaces")
        return payload.lower()
    if rtype in ("IP-CIDR", "IP-CIDR6", "SRC-IP-CIDR"):
        try:
            net = ipaddress.ip_network(payload, strict=False)
        except ValueError as exc:
            raise ConfigError(path, value, f"not an IP network ({exc})") from None
        if rtype == "IP-CIDR6" and net.version != 6:
            raise ConfigError(path, value, "IP-CIDR6 needs an IPv6 network (use IP-CIDR)")
        return str(net)
    if rtype in ("DST-PORT", "SRC-PORT"):
        return _port_spec(payload, value, path)
    if rtype == "NETWORK":
        if payload.lower() not in ("tcp", "udp"):
            raise ConfigError(path, value, "NETWORK is tcp or udp")
        return payload.lower()
    raise AssertionError(rtype)


def _parse_rules(
    value: Any, path: str, ctx: _Ctx, targets: set[str], skipped: dict[str, str]
) -> list[Rule]:
    rules: list[Rule] = []
    if value is None:
        return rules
    for i, item in enumerate(_list(value, path)):
        item_path = _index_path(path, i)
        line = _nonempty_str(item, item_path)
        fields = [f.strip() for f in line.split(",")]
        rtype = fields[0].upper()
        if rtype == "FINAL":  # Clash Premium's name for MATCH
            rtype = "MATCH"
        if rtype in IGNORED_RULE_TYPES:
            ctx.ignore(item_path, rtype)
            continue
        if rtype not in RULE_TYPES:
            raise ConfigError(item_path, line, f"unknown rule type {fields[0]!r}")
        if rtype == "MATCH":
            if len(fields) != 2:
                raise ConfigError(item_path, line, "expected MATCH,TARGET")
            payload, target, params = "", fields[1], []
        else:
            if len(fields) < 3:
                raise ConfigError(item_path, line, f"expected {rtype},VALUE,TARGET[,no-resolve]")
            payload, target, params = fields[1], fields[2], fields[3:]
        for param in params:
            if param != "no-resolve":
                raise ConfigError(item_path, line, f"unknown rule option {param!r} (no-resolve)")
        if target not in targets:
            why = skipped.get(target)
            reason = (
                f"target {target!r} is {why}"
                if why
                else f"target {target!r} names no proxy, group, DIRECT or REJECT"
            )
            raise ConfigError(item_path, line, reason)
        normal = "" if rtype == "MATCH" else _rule_value(rtype, payload, line, item_path)
        rules.append(Rule(rtype, normal, target, no_resolve="no-resolve" in params))
        if rtype == "MATCH" and i != len(value) - 1:
            # Rules after MATCH never run; say so rather than silently ignore.
            rest = len(value) - i - 1
            ctx.ignore(f"{_index_path(path, i + 1)}..", f"{rest} rule(s) after MATCH never run")
            break
    return rules


# --- appliance -------------------------------------------------------------

_IFNAME = re.compile(r"[^\s/:]{1,15}")


def _ifname(value: Any, path: str) -> str:
    text = _nonempty_str(value, path)
    if not _IFNAME.fullmatch(text) or text in (".", ".."):
        raise ConfigError(
            path, value, "not a Linux interface name (1-15 characters, no space, '/' or ':')"
        )
    return text


def _parse_appliance(sec: _Section) -> ApplianceConfig:
    d = ApplianceConfig()
    ctx = sec.ctx
    lan_raw = sec.raw("lan")
    lan: list[str] = []
    if lan_raw is not None:
        if isinstance(lan_raw, str):
            lan_raw = [lan_raw]
        for i, item in enumerate(_list(lan_raw, sec.at("lan"))):
            name = _ifname(item, _index_path(sec.at("lan"), i))
            if name in lan:
                raise ConfigError(_index_path(sec.at("lan"), i), item, "listed twice")
            lan.append(name)
    redirect = sec.get("redirect", _choice(("nftables", "ebpf", "auto")), d.redirect)
    dns_hijack = sec.get("dns-hijack", _bool, d.dns_hijack)
    bypass: list[IPNetwork] = []
    bypass_raw = sec.raw("bypass")
    if bypass_raw is not None:
        for i, item in enumerate(_list(bypass_raw, sec.at("bypass"))):
            net = _cidr(item, _index_path(sec.at("bypass"), i))
            if net not in bypass:
                bypass.append(net)
    state_dir = sec.get("state-dir", lambda v, p: _path(v, p, ctx.base), d.state_dir)
    flush = sec.get("store-flush-interval", _seconds, d.store_flush_interval)
    # 0 and 253-255 are the kernel's unspec/default/main/local tables.
    route_table = sec.get("route-table", lambda v, p: _route_table(v, p), d.route_table)
    capture_mark = sec.get("capture-mark", lambda v, p: _int(v, p, 1, MAX_MARK), d.capture_mark)
    connect_timeout = sec.get("connect-timeout", _seconds, d.connect_timeout)
    idle_timeout = sec.get("idle-timeout", _seconds, d.idle_timeout)
    udp_timeout = sec.get("udp-timeout", _seconds, d.udp_timeout)
    udp_max_sessions = sec.get(
        "udp-max-sessions", lambda v, p: _int(v, p, 1, 1 << 20), d.udp_max_sessions
    )
    offload_direct = sec.get("offload-direct", _bool, d.offload_direct)
    if offload_direct and redirect == "ebpf":
        raise ConfigError(
            sec.at("offload-direct"), offload_direct,
            "needs appliance.redirect nftables (or auto): the eBPF program hands fake-IP "
            "packets to Mirage before nftables could translate them")
    sec.finish(APPLIANCE_KEYS, ())
    return ApplianceConfig(
        lan=tuple(lan),
        redirect=cast(Any, redirect),
        dns_hijack=dns_hijack,
        bypass=tuple(bypass),
        state_dir=state_dir,
        store_flush_interval=flush,
        route_table=route_table,
        capture_mark=capture_mark,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        udp_timeout=udp_timeout,
        udp_max_sessions=udp_max_sessions,
        offload_direct=offload_direct,
    )


def _route_table(value: Any, path: str) -> int:
    table = _int(value, path, 1, MAX_MARK, "a routing table number")
    if table in (253, 254, 255):
        raise ConfigError(path, value, "253-255 are the kernel's default/main/local tables")
    return table


# --- checks across sections ------------------------------------------------


def _check_cross(cfg: Config) -> None:
    a = cfg.appliance
    if cfg.routing_mark is not None and cfg.routing_mark == a.capture_mark:
        raise ConfigError(
            "routing-mark",
            cfg.routing_mark,
            "equals appliance.capture-mark: outbound traffic would be captured again",
        )
    fake_nets: list[IPNetwork] = [cfg.dns.fake_ip_range]
    if cfg.dns.fake_ip_range6 is not None:
        fake_nets.append(cfg.dns.fake_ip_range6)
    for i, net in enumerate(a.bypass):
        for fake in fake_nets:
            if net.version == fake.version and net.overlaps(fake):
                raise ConfigError(
                    f"appliance.bypass[{i}]",
                    str(net),
                    f"overlaps the fake-IP range {fake}: traffic to fake IPs must be captured",
                )
    _check_ports(cfg)


def _check_ports(cfg: Config) -> None:
    """Two TCP listeners of ours on one port and overlapping addresses cannot
    both bind; say which keys collide instead of failing at start."""
    wildcard = Listen("0.0.0.0", 0)
    listeners: list[tuple[str, Listen]] = []
    if cfg.mixed_port is not None:
        listeners.append(("mixed-port", Listen(wildcard.host, cfg.mixed_port)))
    if cfg.socks_port is not None:
        listeners.append(("socks-port", Listen(wildcard.host, cfg.socks_port)))
    if cfg.http_port is not None:
        listeners.append(("port", Listen(wildcard.host, cfg.http_port)))
    if cfg.tproxy_port is not None:
        listeners.append(("tproxy-port", Listen(wildcard.host, cfg.tproxy_port)))
    if cfg.external_controller is not None:
        listeners.append(("external-controller", cfg.external_controller))
    if cfg.dns.enable:
        listeners.append(("dns.listen", cfg.dns.listen))
    for i, (key_a, a) in enumerate(listeners):
        for key_b, b in listeners[i + 1 :]:
            if a.port == b.port and _hosts_overlap(a.host, b.host):
                raise ConfigError(key_b, str(b), f"port {b.port} is already used by {key_a}")


def _hosts_overlap(a: str, b: str) -> bool:
    wild = {"0.0.0.0", "::"}
    return a == b or a in wild or b in wild
