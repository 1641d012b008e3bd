"""The proxy protocols the loader knows, one module each, in `PROTOCOLS`.

A protocol module here has `parse(sec) -> <Its>Options` (reading only its
own keys from the proxy's Section) and `render(options, redact) -> dict`
(the same keys back, secrets redacted when asked), plus a `SPEC`. The
keys every proxy has (server, port, udp, `dialer-proxy`, `ip-version`) and
the shared TLS and transport layers are read by `parse_protocol_proxy`, so
a protocol module never repeats them. Adding a protocol: its options class
in appliance/config/protocols/, its parser module here, one line in
`PROTOCOLS`, and its outbound's line in appliance/outbound/build.py.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.config.loader.protocols.common import (
    TLS_KEYS,
    TRANSPORT_KEYS,
    TlsUse,
    parse_tls,
    parse_transport,
    render_tls,
    render_transport,
)
from appliance.config.loader.scalars import (
    as_bool,
    as_domain,
    as_nonempty_str,
    as_proxy_port,
    choice,
)
from appliance.config.loader.section import Section
from appliance.config.model import ProxyConfig
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.common import Network

# mihomo's BasicOption keys Mirage reads for every protocol proxy.
COMMON_KEYS = ("server", "port", "udp", "dialer-proxy", "ip-version")
# BasicOption keys accepted without effect (they tune the local socket).
COMMON_IGNORED = ("tfo", "mptcp", "interface-name", "routing-mark")
IP_VERSIONS = ("dual", "ipv4", "ipv6", "ipv4-prefer", "ipv6-prefer")


class UnusableProxy(Exception):
    """Raised by a protocol's `parse` (or the shared layers) for a proxy
    whose options change its wire protocol in a way Mirage does not speak
    (a legacy header, an xtls flow): the loader skips that proxy
    and reports `reason` ("a <type> proxy with <reason>"), as it does for a
    type it does not implement."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProtocolSpec:
    """How one proxy `type` is read: its own keys' parser and renderer, the
    mihomo keys it accepts without effect, whether it runs over TLS (and
    which key names the SNI), and the `network` transports it takes."""

    parse: Callable[[Section], ProtocolOptions]
    render: Callable[[ProtocolOptions, bool], dict[str, Any]]
    keys: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    tls: TlsUse = "none"
    sni_key: str = "sni"
    networks: tuple[Network, ...] = ("tcp",)


# `proxies[].type` -> its spec. One line per protocol module.
PROTOCOLS: dict[str, ProtocolSpec] = {}


def server_value(value: Any, path: str) -> str:
    """`server`: an IP literal (normalised) or a host name."""
    text = as_nonempty_str(value, path).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return as_domain(text, path, wildcards=False)


def parse_protocol_proxy(sec: Section, name: str, ptype: str, spec: ProtocolSpec) -> ProxyConfig:
    """One proxy of a registered protocol type -> ProxyConfig."""
    server = sec.require("server", server_value)
    port = sec.require("port", as_proxy_port)
    udp = sec.get("udp", as_bool, False)
    dialer_proxy = sec.get("dialer-proxy", as_nonempty_str, None)
    ip_version = sec.get("ip-version", choice(IP_VERSIONS), "dual")
    tls = parse_tls(sec, spec.tls, spec.sni_key)
    transport = parse_transport(sec, spec.networks) if len(spec.networks) > 1 else None
    options = spec.parse(sec)
    known = (*COMMON_KEYS, *spec.keys,
             *(TLS_KEYS if spec.tls != "none" else ()),
             *(TRANSPORT_KEYS if len(spec.networks) > 1 else ()))
    sec.finish(("name", "type", *known), (*COMMON_IGNORED, *spec.ignored))
    return ProxyConfig(
        name=name, type=ptype, server=server, port=port, udp=udp,
        options=options, tls_options=tls, transport=transport,
        dialer_proxy=dialer_proxy, ip_version=ip_version,
    )  # fmt: skip


def render_protocol_proxy(p: ProxyConfig, redact: bool) -> dict[str, Any]:
    """A registered protocol's proxy back in mihomo spelling."""
    spec = PROTOCOLS[p.type]
    out: dict[str, Any] = {"name": p.name, "type": p.type, "server": p.server,
                           "port": p.port, "udp": p.udp, "ip-version": p.ip_version}
    if p.dialer_proxy is not None:
        out["dialer-proxy"] = p.dialer_proxy
    out.update(render_tls(p.tls_options, spec.tls, spec.sni_key))
    out.update(render_transport(p.transport))
    assert p.options is not None
    out.update(spec.render(p.options, redact))
    return out


# The protocol modules import ProtocolSpec from here: registered last.
from appliance.config.loader.protocols import (  # noqa: E402
    anytls,
    hysteria2,
    shadowsocks,
    ssh,
    trojan,
    tuic,
    vless,
    vmess,
    wireguard,
)

PROTOCOLS["vmess"] = vmess.SPEC
PROTOCOLS["vless"] = vless.SPEC
PROTOCOLS["trojan"] = trojan.SPEC
PROTOCOLS["ss"] = shadowsocks.SPEC
PROTOCOLS["hysteria2"] = hysteria2.SPEC
PROTOCOLS["tuic"] = tuic.SPEC
PROTOCOLS["ssh"] = ssh.SPEC
PROTOCOLS["anytls"] = anytls.SPEC
PROTOCOLS["wireguard"] = wireguard.SPEC
