"""`type: wireguard` (mihomo adapter/outbound/wireguard.go): the keys of one
tunnel (WireguardOptions), read as mihomo reads them.

- `private-key`, `public-key`, `pre-shared-key`: base64 of 32 bytes each;
  `public-key` is required unless `peers:` is given (then each peer has its
  own and the top-level peer keys are ignored, as in mihomo).
- `ip` / `ipv6`: the interface's addresses (`/32` and `/128` when no
  prefix is written); at least one of them, as mihomo requires.
- `peers:` entries: `server`, `port`, `public-key`, `pre-shared-key`,
  `allowed-ips` (required for each), `reserved`.
- `mtu` (default 1408, mihomo's), `persistent-keepalive` (seconds),
  `remote-dns-resolve` with `dns` (plain DNS servers: an address, with an
  optional `:port` or `udp://` in front).

What mihomo refuses is a ConfigError here too (a key that is not base64,
`reserved` not 3 bytes, no `ip`/`ipv6`, a peer without `allowed-ips`).
What mihomo loads but Mirage's WireGuard (the kernel's, or wireguard-go's
where the kernel has none) cannot do makes the proxy unusable
(UnusableProxy: skipped with the reason, as the registry does for every
protocol): a key of another length than 32 bytes or an `mtu` no interface
takes (mihomo fails every flow of those),
`amnezia-wg-option` (AmneziaWG's junk packets and changed headers are not
WireGuard), `reserved` bytes other than zeros (Cloudflare WARP's client id
in the three reserved header bytes: the kernel always sends zeros there),
and `dialer-proxy` (the kernel sends the tunnel's UDP itself: it cannot
ride another proxy). `workers` (wireguard-go's goroutines) and
`refresh-server-ip-interval` are accepted without effect.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Any

from appliance.config.loader.errors import ConfigError
from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy, server_value
from appliance.config.loader.scalars import (
    as_bool,
    as_cidr,
    as_int,
    as_list,
    as_nonempty_str,
    as_port,
    as_str,
    split_host_port,
)
from appliance.config.loader.section import Section
from appliance.config.model import IPAddress, IPNetwork
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.wireguard import WireguardOptions, WireguardPeer

KEYS = ("ip", "ipv6", "private-key", "public-key", "pre-shared-key", "reserved", "mtu",
        "persistent-keepalive", "amnezia-wg-option", "peers", "remote-dns-resolve", "dns")
IGNORED = ("workers", "refresh-server-ip-interval")
PEER_KEYS = ("server", "port", "public-key", "pre-shared-key", "reserved", "allowed-ips")
DEFAULT_MTU = 1408
MIN_MTU, MAX_MTU = 576, 65535
KEY_BYTES = 32


def wg_key(value: Any, path: str) -> str:
    """A WireGuard key: base64 of 32 bytes (returned as written, trimmed).
    Text that is not base64 is a ConfigError (mihomo refuses the profile);
    base64 of another length makes the proxy unusable (mihomo loads it and
    fails its every flow)."""
    text = as_nonempty_str(value, path).strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(path, "<redacted>", "not base64 (a WireGuard key)") from None
    if len(raw) != KEY_BYTES:
        raise UnusableProxy(f"{path.rsplit('.', 1)[-1]} of {len(raw)} bytes (a WireGuard "
                            f"key is {KEY_BYTES})")
    return text


def _mtu(value: Any, path: str) -> int:
    mtu = as_int(value, path, 0, 1 << 31)
    if mtu == 0:
        return DEFAULT_MTU  # mihomo's zero value: its default
    if not MIN_MTU <= mtu <= MAX_MTU:
        # mihomo takes any number here; an interface takes only these.
        raise UnusableProxy(f"mtu {mtu} (an interface's MTU is {MIN_MTU}..{MAX_MTU})")
    return mtu


def reserved_value(value: Any, path: str) -> bytes:
    """`reserved`: three bytes, as a list of numbers or in base64 (mihomo
    takes both)."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(path, value, "three bytes in base64 or a list of 3 numbers") from None
    else:
        raw = bytes(as_int(v, f"{path}[{i}]", 0, 255) for i, v in enumerate(as_list(value, path)))
    if len(raw) != 3:
        raise ConfigError(path, value, f"required 3 bytes, got {len(raw)}")
    return raw


def _interface(value: Any, path: str, version: int) -> Any:
    text = as_nonempty_str(value, path).strip()
    if "/" not in text:
        text += "/32" if version == 4 else "/128"
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise ConfigError(path, value, f"not an address ({exc})") from None
    if iface.version != version:
        raise ConfigError(path, value, f"not an IPv{version} address")
    return iface


def dns_server(text: str) -> tuple[IPAddress, int] | None:
    """One `dns` entry as (address, port) if it is plain DNS over UDP
    (`1.1.1.1`, `1.1.1.1:53`, `[::1]:53`, `udp://...`), else None."""
    rest = text.strip().removeprefix("udp://")
    if "://" in rest:
        return None
    try:
        host, port = split_host_port(rest)
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if port is None:
        return addr, 53
    return (addr, int(port)) if port.isdigit() and 0 < int(port) < 65536 else None


def _networks(value: Any, path: str) -> tuple[IPNetwork, ...]:
    return tuple(as_cidr(x, f"{path}[{i}]") for i, x in enumerate(as_list(value, path)))


def _peer(sec: Section) -> WireguardPeer:
    reserved = sec.get("reserved", reserved_value, None)
    allowed: tuple[IPNetwork, ...] = sec.get("allowed-ips", _networks, ())
    if not allowed:
        raise ConfigError(sec.at("allowed-ips"), None, "required for each peer (mihomo: "
                          "missing allowed_ips)")
    peer = WireguardPeer(
        server=sec.require("server", server_value),
        port=sec.require("port", as_port),
        public_key=sec.require("public-key", wg_key),
        pre_shared_key=sec.get("pre-shared-key", wg_key, None),
        allowed_ips=allowed,
    )
    sec.finish(PEER_KEYS, ())
    _refuse_reserved(reserved)
    return peer


def _refuse_reserved(reserved: bytes | None) -> None:
    if reserved is not None and any(reserved):
        raise UnusableProxy("reserved bytes other than zeros (the kernel's WireGuard "
                            "always sends zeros in the three reserved header bytes)")


def parse(sec: Section) -> WireguardOptions:
    private_key = sec.require("private-key", wg_key)
    ip = sec.get("ip", lambda v, p: _interface(v, p, 4), None)
    ipv6 = sec.get("ipv6", lambda v, p: _interface(v, p, 6), None)
    if ip is None and ipv6 is None:
        raise ConfigError(sec.at("ip"), None, "required: the interface's address (ip, ipv6 "
                          "or both; mihomo: missing local address)")
    raw_peers: list[Any] = sec.get("peers", as_list, [])
    peers = tuple(_peer(Section(item, f"{sec.at('peers')}[{i}]", sec.ctx, sec.fold))
                  for i, item in enumerate(raw_peers))
    if peers:
        # mihomo ignores the top-level peer keys when `peers:` is given.
        public_key = pre_shared_key = None
        for key in ("public-key", "pre-shared-key", "reserved"):
            if sec.raw(key) is not None:
                sec.ctx.ignore(sec.at(key), "peers: is given")
    else:
        public_key = sec.require("public-key", wg_key)
        pre_shared_key = sec.get("pre-shared-key", wg_key, None)
        _refuse_reserved(sec.get("reserved", reserved_value, None))
    remote_dns = sec.get("remote-dns-resolve", as_bool, False)
    raw_dns: list[Any] = sec.get("dns", as_list, [])
    entries = [as_str(v, f"{sec.at('dns')}[{i}]") for i, v in enumerate(raw_dns)]
    dns: list[tuple[IPAddress, int]] = []
    if entries and not remote_dns:
        sec.ctx.ignore(sec.at("dns"), "used only with remote-dns-resolve: true")
    elif remote_dns:
        for i, text in enumerate(entries):
            server = dns_server(text)
            if server is None:
                sec.ctx.ignore(f"{sec.at('dns')}[{i}]", "only plain DNS over UDP is asked "
                               "through the tunnel")
            else:
                dns.append(server)
        if entries and not dns:
            raise UnusableProxy("remote-dns-resolve with no plain DNS server in dns (DoH, "
                                "DoT and names are not asked through the tunnel)")
    options = WireguardOptions(
        private_key=private_key, ip=ip, ipv6=ipv6, public_key=public_key,
        pre_shared_key=pre_shared_key, peers=peers,
        mtu=sec.get("mtu", _mtu, DEFAULT_MTU),
        persistent_keepalive=sec.get("persistent-keepalive",
                                     lambda v, p: as_int(v, p, 0, 65535), 0),
        remote_dns_resolve=remote_dns and bool(dns), dns=tuple(dns),
    )  # fmt: skip
    if sec.raw("amnezia-wg-option") is not None:
        raise UnusableProxy("amnezia-wg-option (AmneziaWG's junk packets and changed "
                            "headers are not WireGuard: the kernel cannot send them)")
    if sec.data.get("dialer-proxy") is not None:
        raise UnusableProxy("dialer-proxy (the kernel sends the tunnel's UDP itself: it "
                            "cannot ride another proxy)")
    return options


def _dns_text(server: tuple[IPAddress, int]) -> str:
    addr, port = server
    host = f"[{addr}]" if addr.version == 6 else str(addr)
    return host if port == 53 else f"{host}:{port}"


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, WireguardOptions)

    def secret(value: str) -> str:
        return "<redacted>" if redact else value

    out: dict[str, Any] = {"private-key": secret(options.private_key)}
    if options.ip is not None:
        out["ip"] = str(options.ip)
    if options.ipv6 is not None:
        out["ipv6"] = str(options.ipv6)
    if options.public_key is not None:
        out["public-key"] = options.public_key
    if options.pre_shared_key is not None:
        out["pre-shared-key"] = secret(options.pre_shared_key)
    if options.peers:
        out["peers"] = []
        for peer in options.peers:
            entry: dict[str, Any] = {"server": peer.server, "port": peer.port,
                                     "public-key": peer.public_key}
            if peer.pre_shared_key is not None:
                entry["pre-shared-key"] = secret(peer.pre_shared_key)
            entry["allowed-ips"] = [str(n) for n in peer.allowed_ips]
            out["peers"].append(entry)
    out["mtu"] = options.mtu
    if options.persistent_keepalive:
        out["persistent-keepalive"] = options.persistent_keepalive
    out["remote-dns-resolve"] = options.remote_dns_resolve
    if options.dns:
        out["dns"] = [_dns_text(s) for s in options.dns]
    return out


SPEC: ProtocolSpec = ProtocolSpec(parse=parse, render=render, keys=KEYS, ignored=IGNORED)
