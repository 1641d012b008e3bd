"""Subscription content -> the proxy mappings a profile would have.

A proxy provider's content is Clash YAML (`proxies:`) or a list of share
links, one per line, often base64 as a whole (mihomo's
common/convert/converter.go `ConvertsV2Ray`, which this follows key for
key): ss:// (SIP002, and the legacy form with everything base64),
vmess:// (v2rayN base64 JSON, or the Xray URL form), vless://, trojan://,
hysteria2:// (hy2://), tuic://, hysteria:// and ssr:// (the last two so
that they are reported as skipped like a profile's).

Pure: text in, `list[dict]` out; nothing here validates a value. The
mappings go through the normal proxy loader (config/loader/proxies.py),
which checks them and skips what Mirage cannot speak, with the reason.
A line that is not a link this module reads is dropped (mihomo does the
same); `parse_link` raises ValueError for one.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

SCHEMES = ("ss", "vmess", "vless", "trojan", "hysteria2", "hy2", "tuic", "hysteria", "ssr")


def b64decode_loose(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not (subscriptions use all
    four). Raises ValueError."""
    data = "".join(text.split())
    data = data.replace("-", "+").replace("_", "/")
    data += "=" * (-len(data) % 4)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64: {e}") from None


def decode_subscription(data: bytes) -> list[dict[str, Any]]:
    """The proxies of a provider's content: Clash YAML with `proxies:`,
    else share links (the whole body base64, or plain lines). Raises
    ValueError when it is neither (so a refresh keeps its last good set)."""
    text = data.decode("utf-8", "replace").lstrip("\ufeff")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    if isinstance(doc, dict):
        proxies = doc.get("proxies")
        if isinstance(proxies, list):
            return [p for p in proxies if isinstance(p, dict)]
        if "proxies" in doc:
            return []  # `proxies:` present but empty (null)
    if "://" not in text:
        try:
            text = b64decode_loose(text).decode("utf-8", "replace")
        except ValueError:
            raise ValueError("neither Clash YAML with proxies: nor share links") from None
    out = parse_share_links(text)
    if not out and text.strip():
        raise ValueError("no share link this reader understands")
    return out


def parse_share_links(text: str) -> list[dict[str, Any]]:
    """Every link of `text` (one per line) that parses, as proxy mappings;
    names made unique as mihomo does (`name-01`, `name-02`, ...)."""
    names: dict[str, int] = {}
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if "://" not in line:
            continue
        try:
            proxy = parse_link(line)
        except ValueError:
            continue
        proxy["name"] = _unique(names, str(proxy.get("name", "")))
        out.append(proxy)
    return out


def _unique(names: dict[str, int], name: str) -> str:
    if name in names:
        names[name] += 1
        return f"{name}-{names[name]:02d}"
    names[name] = 0
    return name


def _port(value: Any, default: int | None = None) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        if default is not None:
            return default
        raise ValueError(f"bad port {value!r}") from None
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"bad port {port}")
    return port


def _bool(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "t", "yes")


def parse_link(link: str) -> dict[str, Any]:
    """One share link -> a proxy mapping (raises ValueError)."""
    scheme, _, body = link.partition("://")
    scheme = scheme.lower()
    if scheme == "ss":
        return _ss(link)
    if scheme == "vmess":
        return _vmess(link, body)
    if scheme == "vless":
        proxy = _v_link(link, "vless")
        flow = _query(link).get("flow")
        if flow:
            proxy["flow"] = flow.lower()
        return proxy
    if scheme == "trojan":
        return _trojan(link)
    if scheme in ("hysteria2", "hy2"):
        return _hysteria2(link)
    if scheme == "tuic":
        return _tuic(link)
    if scheme == "hysteria":
        return _hysteria(link)
    if scheme == "ssr":
        return _ssr(body)
    raise ValueError(f"unknown scheme {scheme!r}")


def _query(link: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(link).query, keep_blank_values=True).items()}


def _host_port(link: str, default_port: int | None = None) -> tuple[str, int]:
    parts = urlsplit(link)
    host = parts.hostname
    if not host:
        raise ValueError("no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("bad port") from None
    if port is None:
        if default_port is None:
            raise ValueError("no port")
        port = default_port
    return host, _port(port)


def _ss(link: str) -> dict[str, Any]:
    parts = urlsplit(link)
    name = unquote(parts.fragment)
    if parts.port is None:
        # Legacy: ss://base64(method:password@host:port)#name
        decoded = b64decode_loose(unquote(parts.netloc)).decode("utf-8", "replace")
        parts = urlsplit(f"ss://{decoded}")
    host = parts.hostname
    if not host or parts.port is None:
        raise ValueError("ss link without host:port")
    userinfo = parts.netloc.rpartition("@")[0]
    if not userinfo:
        raise ValueError("ss link without method and password")
    user, sep, password = userinfo.partition(":")
    if sep:
        cipher, password = unquote(user), unquote(password)
    else:
        # SIP002: userinfo is base64url(method:password).
        decoded = b64decode_loose(unquote(user)).decode("utf-8", "replace")
        cipher, sep, password = decoded.partition(":")
        if not sep:
            raise ValueError("ss userinfo is not method:password")
    proxy: dict[str, Any] = {"name": name, "type": "ss", "server": host,
                             "port": _port(parts.port), "cipher": cipher,
                             "password": password, "udp": True}
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    if query.get("udp-over-tcp") == "true" or query.get("uot") == "1":
        proxy["udp-over-tcp"] = True
    plugin = query.get("plugin", "")
    if ";" in plugin:
        plugin_name, *opts = plugin.split(";")
        info = dict(o.partition("=")[::2] for o in opts)
        if "obfs" in plugin_name:
            proxy["plugin"] = "obfs"
            proxy["plugin-opts"] = {"mode": info.get("obfs", ""),
                                    "host": info.get("obfs-host", "")}
        elif "v2ray-plugin" in plugin_name:
            proxy["plugin"] = "v2ray-plugin"
            proxy["plugin-opts"] = {"mode": info.get("mode", ""), "host": info.get("host", ""),
                                    "path": info.get("path", ""), "tls": "tls" in plugin}
    return proxy


def _vmess(link: str, body: str) -> dict[str, Any]:
    try:
        values = json.loads(b64decode_loose(body.split("#", 1)[0]))
    except (ValueError, UnicodeDecodeError):
        # Xray's VMessAEAD URL form.
        aead = _v_link(link, "vmess")
        aead["alterId"] = 0
        aead["cipher"] = _query(link).get("encryption") or "auto"
        return aead
    if not isinstance(values, dict) or not isinstance(values.get("ps"), str):
        raise ValueError("vmess JSON without ps")
    proxy: dict[str, Any] = {
        "name": values["ps"], "type": "vmess", "server": values.get("add"),
        "port": _port(values.get("port")), "uuid": values.get("id"),
        "alterId": int(values.get("aid") or 0), "udp": True, "xudp": True, "tls": False,
        "skip-cert-verify": False, "cipher": values.get("scy") or "auto",
    }
    if values.get("sni"):
        proxy["servername"] = values["sni"]
    network = str(values.get("net") or "").lower()
    if values.get("type") == "http":
        network = "http"
    elif network == "http":
        network = "h2"
    proxy["network"] = network
    tls = values.get("tls")
    if isinstance(tls, str):
        if tls.lower().endswith("tls"):
            proxy["tls"] = True
        if isinstance(values.get("alpn"), str) and values["alpn"]:
            proxy["alpn"] = values["alpn"].split(",")
    host, path = values.get("host") or "", values.get("path") or ""
    if network == "http":
        proxy["http-opts"] = {"path": [path or "/"],
                              "headers": {"Host": [host]} if host else {}}
    elif network == "h2":
        proxy["h2-opts"] = {"path": path, "headers": {"Host": [host]} if host else {}}
    elif network in ("ws", "httpupgrade"):
        ws: dict[str, Any] = {"path": path or "/", "headers": {"Host": host} if host else {}}
        if path:
            p = urlsplit(path)
            q = parse_qs(p.query)
            ed = q.pop("ed", [None])[0]
            if ed is not None and ed.isdigit():
                if network == "ws":
                    ws["max-early-data"] = int(ed)
                    ws["early-data-header-name"] = "Sec-WebSocket-Protocol"
                else:
                    ws["v2ray-http-upgrade-fast-open"] = True
                rest = "&".join(f"{k}={v[0]}" for k, v in q.items())
                ws["path"] = p.path + (f"?{rest}" if rest else "")
            if q.get("eh"):
                ws["early-data-header-name"] = q["eh"][0]
        proxy["ws-opts"] = ws
    elif network == "grpc":
        proxy["grpc-opts"] = {"grpc-service-name": path}
    return proxy


def _v_link(link: str, scheme: str) -> dict[str, Any]:
    """Xray's VLESS / VMessAEAD share link (XTLS/Xray-core discussion 716)."""
    parts = urlsplit(link)
    query = _query(link)
    host, port = _host_port(link)
    proxy: dict[str, Any] = {"name": unquote(parts.fragment), "type": scheme, "server": host,
                             "port": port, "uuid": unquote(parts.username or ""), "udp": True}
    security = query.get("security", "").lower()
    if security.endswith("tls") or security == "reality":
        proxy["tls"] = True
        proxy["client-fingerprint"] = query.get("fp") or "chrome"
        if query.get("alpn"):
            proxy["alpn"] = query["alpn"].split(",")
    if query.get("sni"):
        proxy["servername"] = query["sni"]
    if query.get("pbk"):
        proxy["reality-opts"] = {"public-key": query["pbk"], "short-id": query.get("sid", "")}
    encoding = query.get("packetEncoding")
    if encoding == "packet":
        proxy["packet-addr"] = True
    elif encoding != "none":
        proxy["xudp"] = True
    network = (query.get("type") or "tcp").lower()
    fake = query.get("headerType", "").lower()
    if fake == "http":
        network = "http"
    elif network == "http":
        network = "h2"
    proxy["network"] = network
    if network == "tcp" and fake not in ("", "none"):
        opts: dict[str, Any] = {"path": [query.get("path") or "/"],
                                "headers": {"Host": [query["host"]]} if query.get("host") else {}}
        if query.get("method"):
            opts["method"] = query["method"]
        proxy["http-opts"] = opts
    elif network == "http":
        h2: dict[str, Any] = {"path": [query.get("path") or "/"], "headers": {}}
        if query.get("host"):
            h2["host"] = [query["host"]]
        proxy["h2-opts"] = h2
    elif network in ("ws", "httpupgrade"):
        ws: dict[str, Any] = {"path": query.get("path", ""),
                              "headers": {"Host": query.get("host", "")}}
        ed = query.get("ed")
        if ed:
            if not ed.isdigit():
                raise ValueError("bad WebSocket max early data size")
            if network == "ws":
                ws["max-early-data"] = int(ed)
                ws["early-data-header-name"] = "Sec-WebSocket-Protocol"
            else:
                ws["v2ray-http-upgrade-fast-open"] = True
        if query.get("eh"):
            ws["early-data-header-name"] = query["eh"]
        proxy["ws-opts"] = ws
    elif network == "grpc":
        proxy["grpc-opts"] = {"grpc-service-name": query.get("serviceName", "")}
    return proxy


def _trojan(link: str) -> dict[str, Any]:
    parts = urlsplit(link)
    query = _query(link)
    host, port = _host_port(link)
    proxy: dict[str, Any] = {"name": unquote(parts.fragment), "type": "trojan", "server": host,
                             "port": port, "password": unquote(parts.username or ""),
                             "udp": True, "skip-cert-verify": _bool(query.get("allowInsecure"))}
    if query.get("sni"):
        proxy["sni"] = query["sni"]
    if query.get("alpn"):
        proxy["alpn"] = query["alpn"].split(",")
    network = query.get("type", "").lower()
    if network:
        proxy["network"] = network
    if network == "ws":
        proxy["ws-opts"] = {"path": query.get("path", ""), "headers": {}}
    elif network == "grpc":
        proxy["grpc-opts"] = {"grpc-service-name": query.get("serviceName", "")}
    proxy["client-fingerprint"] = query.get("fp") or "chrome"
    return proxy


def _hysteria2(link: str) -> dict[str, Any]:
    parts = urlsplit(link)
    query = _query(link)
    host, port = _host_port(link, 443)
    proxy: dict[str, Any] = {"name": unquote(parts.fragment), "type": "hysteria2",
                             "server": host, "port": port}
    auth = parts.netloc.rpartition("@")[0]
    if auth:
        proxy["password"] = unquote(auth)
    for key, name in (("obfs", "obfs"), ("obfs-password", "obfs-password"), ("sni", "sni"),
                      ("pinSHA256", "fingerprint"), ("up", "up"), ("down", "down")):
        if query.get(key):
            proxy[name] = query[key]
    proxy["skip-cert-verify"] = _bool(query.get("insecure"))
    if query.get("alpn"):
        proxy["alpn"] = query["alpn"].split(",")
    return proxy


def _tuic(link: str) -> dict[str, Any]:
    parts = urlsplit(link)
    query = _query(link)
    host, port = _host_port(link)
    proxy: dict[str, Any] = {"name": unquote(parts.fragment), "type": "tuic", "server": host,
                             "port": port, "udp": True}
    if parts.password is not None:
        proxy["uuid"] = unquote(parts.username or "")
        proxy["password"] = unquote(parts.password)
    else:
        proxy["token"] = unquote(parts.username or "")
    if query.get("congestion_control"):
        proxy["congestion-controller"] = query["congestion_control"]
    if query.get("alpn"):
        proxy["alpn"] = query["alpn"].split(",")
    if query.get("sni"):
        proxy["sni"] = query["sni"]
    if query.get("disable_sni") == "1":
        proxy["disable-sni"] = True
    if query.get("udp_relay_mode"):
        proxy["udp-relay-mode"] = query["udp_relay_mode"]
    return proxy


def _hysteria(link: str) -> dict[str, Any]:
    parts = urlsplit(link)
    query = _query(link)
    host, port = _host_port(link)
    return {"name": unquote(parts.fragment), "type": "hysteria", "server": host, "port": port,
            "sni": query.get("peer", ""), "auth_str": query.get("auth", ""),
            "protocol": query.get("protocol", ""),
            "up": query.get("up") or query.get("upmbps", ""),
            "down": query.get("down") or query.get("downmbps", ""),
            "skip-cert-verify": _bool(query.get("insecure"))}


def _ssr(body: str) -> dict[str, Any]:
    decoded = b64decode_loose(body).decode("utf-8", "replace")
    before, sep, after = decoded.partition("/?")
    fields = before.split(":")
    if not sep or len(fields) != 6:
        raise ValueError("bad ssr link")
    host, port, protocol, method, obfs, password = fields
    query = {k: v[0] for k, v in parse_qs(after).items()}
    name = ""
    if query.get("remarks"):
        name = b64decode_loose(query["remarks"]).decode("utf-8", "replace")
    return {"name": name, "type": "ssr", "server": host, "port": _port(port),
            "protocol": protocol, "cipher": method, "obfs": obfs,
            "password": b64decode_loose(password).decode("utf-8", "replace")}
