"""`proxies:`: the outbounds Mirage implements, parsed strictly.

A proxy of a type Mirage cannot speak (`vmess`, ...) or with an option that
changes its wire protocol (an ss stream cipher, a trojan `ss-opts`, ...)
is skipped and reported; `parse_proxies` returns why, so a group can drop it
and a rule that targets it can say so.
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.config.loader.errors import NO_VALUE, ConfigError, index_path
from appliance.config.loader.protocols import (
    IP_VERSIONS,
    PROTOCOLS,
    UnusableProxy,
    parse_protocol_proxy,
    server_value,
)
from appliance.config.loader.scalars import (
    as_bool,
    as_domain,
    as_int,
    as_list,
    as_nonempty_str,
    as_proxy_port,
    as_str,
    choice,
)
from appliance.config.loader.section import LoadContext, Section, fold_proxy_key
from appliance.config.model import ProxyConfig

log = logging.getLogger(__name__)

# Targets every profile has (mihomo's built-in outbounds and GLOBAL, its
# implicit select group of everything).
BUILTIN_TARGETS = ("DIRECT", "REJECT", "REJECT-DROP", "PASS", "COMPATIBLE", "GLOBAL")

# Options every mihomo outbound takes (BasicOption) and a few per-type keys
# that only tune transport details Mirage does not have.
_IGNORED_PROXY_COMMON = (
    "tfo", "mptcp", "interface-name", "routing-mark", "ip-version",
    "dialer-proxy", "fingerprint", "client-fingerprint", "smux",
)  # fmt: skip
# What socks5, http and direct ignore of those (they read `ip-version`).
_IGNORED_SERVER_PROXY = tuple(k for k in _IGNORED_PROXY_COMMON if k != "ip-version")
PROXY_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (implemented keys besides name/type, ignored keys)
    "socks5": (
        ("server", "port", "username", "password", "tls", "skip-cert-verify", "udp", "preconnect",
         "dialer-proxy", "ip-version"),
        _IGNORED_SERVER_PROXY,
    ),
    "http": (
        ("server", "port", "username", "password", "tls", "skip-cert-verify", "sni", "preconnect",
         "dialer-proxy", "ip-version"),
        # udp: converters emit it on every proxy; an http proxy has no UDP.
        (*_IGNORED_SERVER_PROXY, "headers", "udp"),
    ),
    # udp: mihomo's direct takes it (and converters write it); Mirage's
    # DIRECT carries UDP either way.
    "direct": (("ip-version",), (*_IGNORED_SERVER_PROXY, "udp")),
    "reject": ((), (*_IGNORED_PROXY_COMMON, "udp")),
}
# `preconnect` of plain SOCKS5 / HTTP proxies: connections kept open ahead
# of the flows (appliance/outbound/preconnect.py).
PRECONNECT_DEFAULT = 2
PRECONNECT_MAX = 64
# mihomo outbound types Mirage cannot speak: such a proxy is skipped (and
# reported); a rule that targets it is an error, a group drops it.
UNSUPPORTED_PROXY_TYPES = (
    "ssr", "snell", "socks4", "hysteria",
    "mieru", "dns", "semi", "sudoku",
)  # fmt: skip

# Why, where there is more to say than "not implemented".
_UNSUPPORTED_WHY = {
    "hysteria": " (Hysteria v1; hysteria2 is supported)",
    # No Snell server is packaged (Debian, PyPI): no client without a real
    # server to test it against.
    "snell": " (no Snell server to test a client against)",
}


def parse_proxies(
    value: Any, path: str, ctx: LoadContext
) -> tuple[list[ProxyConfig], dict[str, str]]:
    """Returns the implemented proxies and {name: why skipped} for the rest."""
    proxies: list[ProxyConfig] = []
    skipped: dict[str, str] = {}
    names: set[str] = set()
    client_fingerprints = 0
    if value is None:
        return proxies, skipped
    for i, item in enumerate(as_list(value, path)):
        try:
            parsed = _parse_entry(item, index_path(path, i), ctx, names, skipped)
        except ConfigError as err:
            name = _written_name(item)
            if isinstance(name, str) and name in names and not mihomo_refuses(err):
                # mihomo loads it (and fails when it dials): skipped, said.
                ctx.ignore(index_path(path, i), f"{name!r}: {err}", kind="skipped", error=err)
                skipped[name] = f"a proxy with a value Mirage cannot use ({err})"
                continue
            # One broken proxy does not hide the next; its name (if it has
            # one) is known, so what names it is not reported again.
            ctx.fail(err)
            if isinstance(name, str):
                ctx.broken.add(name)
            continue
        if parsed is not None:
            proxies.append(parsed)
            if parsed.type in PROTOCOLS and isinstance(item, dict) \
                    and item.get("client-fingerprint") is not None:
                client_fingerprints += 1
    if client_fingerprints:
        log.info("client-fingerprint (uTLS) on %d prox%s has no effect: TLS is Python's "
                 "(OpenSSL's ClientHello); with reality-opts the ClientHello is always "
                 "Chrome-shaped", client_fingerprints,
                 "y" if client_fingerprints == 1 else "ies")
    return proxies, skipped


def warn_udp_behind_dialer(proxies: list[ProxyConfig]) -> None:
    """Say at load what `udp: true` does not do here: mihomo sends a SOCKS5
    proxy's UDP through its dialer-proxy; Mirage does not
    (outbound/socks5.py), so such a proxy's UDP flows go on to the next
    rule, as for any outbound without UDP."""
    names = [p.name for p in proxies if p.type == "socks5" and p.udp and p.dialer_proxy]
    if names:
        log.warning("udp: true on SOCKS5 prox%s behind a dialer-proxy (%s): Mirage carries no "
                    "SOCKS5 UDP through a dialer-proxy; UDP flows skip the rules that send "
                    "to %s",
                    "y" if len(names) == 1 else "ies", ", ".join(map(repr, names)),
                    "it" if len(names) == 1 else "them")


def _written_name(item: Any) -> Any:
    """The `name` of a proxy entry however it is spelled (`Name`), or None."""
    if not isinstance(item, dict):
        return None
    return next((v for k, v in item.items()
                 if isinstance(k, str) and fold_proxy_key(k) == "name"), None)


# A proxy's keys whose bad values `mihomo -t` loads (it never looks at them
# before dialling): a port of 0 or 99999, a server or SNI that is no host
# name, a `network`, `ip-version` or ss `plugin` it does not know, an empty
# password (ssh without password or key, anytls), anytls' min-idle-session
# below 0. Checked against the binary (tests/unit/test_config_lenient.py,
# test_ssh_config.py, test_anytls_config.py).
_UNCHECKED_BY_MIHOMO = ("port", "server", "sni", "servername", "network", "ip-version",
                        "plugin", "password", "min-idle-session")


def mihomo_refuses(err: ConfigError) -> bool:
    """Whether `mihomo -t` refuses a profile for this error in a proxy
    entry. mihomo decodes a proxy into a Go struct and builds its outbound:
    a missing key ("has unset fields"), a value of a type it cannot convert
    (a string for a bool), an unknown `type` or ss `cipher`, a key that is
    no key (WireGuard) stop it, and Mirage refuses those too. The values of
    `_UNCHECKED_BY_MIHOMO`, and a username without a password, load there
    and fail when the proxy is used: Mirage skips that proxy, with the
    reason, instead of refusing the whole profile. Anything else is
    refused (what Mirage does not know mihomo to load)."""
    leaf = err.path.rsplit(".", 1)[-1]
    if err.reason.startswith(("required", "expected ")):
        return True
    return not (leaf in _UNCHECKED_BY_MIHOMO or "go together" in err.reason)


def _parse_entry(item: Any, path: str, ctx: LoadContext, names: set[str],
                 skipped: dict[str, str]) -> ProxyConfig | None:
    """One `proxies[i]`: its ProxyConfig, or None when it is skipped (its
    reason put in `skipped`). Raises ConfigError."""
    sec = Section(item, path, ctx, fold_proxy_key, exact=("type",))
    name = sec.require("name", as_nonempty_str)
    if name in names:
        raise ConfigError(sec.at("name"), name, "duplicate proxy name")
    if name in BUILTIN_TARGETS:
        raise ConfigError(sec.at("name"), name, "reserved name (a built-in target)")
    names.add(name)
    ptype = sec.require("type", as_nonempty_str).lower()
    spec = PROTOCOLS.get(ptype)
    if spec is not None:
        try:
            return parse_protocol_proxy(sec, name, ptype, spec)
        except UnusableProxy as e:
            ctx.ignore(sec.path, f"{ptype} proxy {name!r}: {e.reason}", kind="skipped")
            skipped[name] = f"a {ptype} proxy with {e.reason}"
            return None
    if ptype in UNSUPPORTED_PROXY_TYPES:
        why = _UNSUPPORTED_WHY.get(ptype, "")
        ctx.ignore(sec.path, f"{ptype} proxy {name!r}{why}", kind="skipped")
        skipped[name] = f"a {ptype} proxy, which Mirage does not implement{why}"
        return None
    if ptype not in PROXY_KEYS:
        raise ConfigError(
            sec.at("type"), sec.data["type"],
            "unknown proxy type (Mirage implements "
            + ", ".join((*PROXY_KEYS, *PROTOCOLS)) + ")",
        )  # fmt: skip
    return _parse_proxy(sec, name, ptype)


def _parse_proxy(sec: Section, name: str, ptype: str) -> ProxyConfig:
    implemented, ignored = PROXY_KEYS[ptype]
    if ptype in ("direct", "reject"):
        # A named direct takes `ip-version` for its destinations, as
        # mihomo's does (the built-in DIRECT keeps RFC 8305's order).
        ip_version = (sec.get("ip-version", choice(IP_VERSIONS), "dual")
                      if "ip-version" in implemented else "dual")
        sec.finish(("name", "type", *implemented), ignored)
        return ProxyConfig(name=name, type=ptype, ip_version=ip_version)
    server = sec.require("server", server_value)
    port = sec.require("port", as_proxy_port)
    username = sec.get("username", as_str, None) if "username" in implemented else None
    password = sec.get("password", as_str, None)
    tls = sec.get("tls", as_bool, False) if "tls" in implemented else False
    skip_verify = sec.get("skip-cert-verify", as_bool, False)
    sni = (
        sec.get("sni", lambda v, p: as_domain(v, p, wildcards=False), None)
        if ("sni" in implemented)
        else None
    )
    udp = sec.get("udp", as_bool, False) if "udp" in implemented else False
    if (username is None) != (password is None) and ptype in ("socks5", "http"):
        missing = "password" if password is None else "username"
        raise ConfigError(sec.at(missing), NO_VALUE, "username and password go together")
    preconnect = 0
    if "preconnect" in implemented:
        preconnect = sec.get(
            "preconnect",
            lambda v, p: as_int(v, p, 0, PRECONNECT_MAX),
            0 if tls else PRECONNECT_DEFAULT,
        )
        if preconnect and tls:
            raise ConfigError(
                sec.at("preconnect"),
                preconnect,
                "kept connections are plain TCP: set 0 with tls: true",
            )
    dialer_proxy = (sec.get("dialer-proxy", as_nonempty_str, None)
                    if "dialer-proxy" in implemented else None)
    if dialer_proxy is not None:
        # Kept connections go straight to the server: not through a chain.
        preconnect = 0
    ip_version = sec.get("ip-version", choice(IP_VERSIONS), "dual")
    sec.finish(("name", "type", *implemented), ignored)
    return ProxyConfig(
        name=name,
        type=ptype,
        server=server,
        port=port,
        username=username,
        password=password,
        tls=tls,
        skip_cert_verify=skip_verify,
        sni=sni,
        udp=udp,
        preconnect=preconnect,
        dialer_proxy=dialer_proxy,
        ip_version=ip_version,
    )
