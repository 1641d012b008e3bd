"""`type: hysteria2`: its own keys in mihomo's names (Hysteria2Options).

TLS is always on (`sni`, `alpn` default h3, `skip-cert-verify`,
`fingerprint`: the shared layer). `obfs` is salamander or nothing;
`up`/`down` and `ports` are kept as written (see Hysteria2Options for what
they do and do not do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy
from appliance.config.loader.scalars import as_nonempty_str, as_path, as_str, fail_type
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.hysteria2 import Hysteria2Options

OBFS_TYPES = ("salamander",)
# mihomo keys accepted without effect: QUIC tuning (windows, MTU, initial
# congestion window) and port hopping's interval.
IGNORED = ("hop-interval", "cwnd", "udp-mtu",
           "initial-stream-receive-window", "max-stream-receive-window",
           "initial-connection-receive-window", "max-connection-receive-window")


def text_value(value: Any, path: str) -> str:
    """A string, or a number written without quotes (a numeric password,
    `up: 100`)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        fail_type(value, path, "a string")
    return str(value)


def _obfs(value: Any, path: str) -> str:
    text = as_str(value, path).lower()
    if text not in OBFS_TYPES:
        raise ConfigError(path, value, "must be salamander (the only Hysteria2 obfuscation)")
    return text


def refuse_dialer_proxy(sec: Section) -> None:
    """QUIC runs over UDP from our own socket: it cannot be carried through
    another proxy's TCP stream. Such a proxy is skipped, not sent direct
    (the chain usually exists to hide the server from the local network)."""
    if sec.data.get("dialer-proxy") is not None:
        raise UnusableProxy("dialer-proxy (not supported for QUIC protocols: "
                            "QUIC cannot ride another proxy)")


def parse_ca(sec: Section) -> tuple[Path | None, str | None]:
    """`ca` (a file, relative to the profile) and `ca-str` (PEM text)."""
    ca = sec.get("ca", lambda v, p: as_path(v, p, sec.ctx.base), None)
    ca_str = sec.get("ca-str", as_nonempty_str, None)
    if ca_str is not None and "BEGIN CERTIFICATE" not in ca_str:
        raise ConfigError(sec.at("ca-str"), ca_str, "PEM certificates")
    return ca, ca_str


def render_ca(ca: Path | None, ca_str: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ca is not None:
        out["ca"] = str(ca)
    if ca_str is not None:
        out["ca-str"] = ca_str
    return out


def parse(sec: Section) -> Hysteria2Options:
    refuse_dialer_proxy(sec)
    password = sec.require("password", text_value)
    obfs = sec.get("obfs", _obfs, None) or None
    obfs_password = sec.get("obfs-password", text_value, "")
    ca, ca_str = parse_ca(sec)
    if obfs is not None and len(obfs_password.encode()) < 4:
        raise ConfigError(sec.at("obfs-password"), obfs_password or None,
                          "salamander needs an obfs-password of at least 4 bytes")
    return Hysteria2Options(
        password=password, obfs=obfs, obfs_password=obfs_password,
        up=sec.get("up", text_value, None), down=sec.get("down", text_value, None),
        ports=sec.get("ports", text_value, None),
        ca=ca, ca_str=ca_str,
    )  # fmt: skip


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, Hysteria2Options)
    out: dict[str, Any] = {"password": "<redacted>" if redact else options.password}
    if options.obfs is not None:
        out["obfs"] = options.obfs
        out["obfs-password"] = "<redacted>" if redact else options.obfs_password
    for key, value in (("up", options.up), ("down", options.down), ("ports", options.ports)):
        if value is not None:
            out[key] = value
    out.update(render_ca(options.ca, options.ca_str))
    return out


SPEC: ProtocolSpec = ProtocolSpec(
    parse=parse, render=render,
    keys=("password", "obfs", "obfs-password", "up", "down", "ports", "ca", "ca-str"),
    ignored=IGNORED, tls="always",
)  # fmt: skip
