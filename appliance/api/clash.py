"""mihomo's API documents, made from Mirage's running services.

Field names, types and shapes are mihomo's (hub/route/*.go and the JSON
tags of tunnel/statistic/tracker.go, constant/metadata.go, adapter/*.go),
since the dashboards read exactly those: a missing key breaks a page. No
I/O here: each function takes what it shows and returns plain data.

Outbounds are read through `OutboundView`, the narrow face a proxy or a
group shows the API: `name`, optional `type`, `members`, `selected`
(a switchable group), `current` (a group that chooses), `history`
(delay measurements). Groups and providers built elsewhere plug in by
having these attributes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from dnslib import QTYPE, DNSRecord

from appliance.config.model import Config, ProxyConfig
from appliance.rules.names import rule_payload, rule_type

# mihomo's adapter type names (constant/adapters.go), by profile `type`.
PROXY_TYPES = {
    "socks5": "Socks5", "http": "Http", "ss": "Shadowsocks", "ssr": "ShadowsocksR",
    "trojan": "Trojan", "vmess": "Vmess", "vless": "Vless", "snell": "Snell",
    "hysteria": "Hysteria", "hysteria2": "Hysteria2", "tuic": "Tuic",
    "wireguard": "WireGuard", "ssh": "Ssh", "mieru": "Mieru", "anytls": "AnyTLS",
    "direct": "Direct", "dns": "Dns",
}  # fmt: skip
BUILTIN_TYPES = {"DIRECT": "Direct", "REJECT": "Reject", "REJECT-DROP": "RejectDrop",
                 "PASS": "Pass", "COMPATIBLE": "Compatible"}
GROUP_TYPES = {"select": "Selector", "url-test": "URLTest", "fallback": "Fallback",
               "load-balance": "LoadBalance", "relay": "Relay"}
# How mihomo's metadata.type shows an inbound type (IN-TYPE's words).
INBOUND_TYPES = {"TPROXY": "TProxy", "SOCKS5": "Socks5", "HTTP": "HTTP", "HTTPS": "HTTPS"}


def rfc3339(seconds: float) -> str:
    """A wall-clock time as Go's time.Time marshals it."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


History = Callable[[str], list[dict[str, Any]]]


def no_history(name: str) -> list[dict[str, Any]]:
    return []


def history_of(delays: Any) -> History:
    """mihomo's `history` (oldest first) from a DelayHistory
    (appliance/outbound/health.py), or none without one."""
    if delays is None:
        return no_history

    def history(name: str) -> list[dict[str, Any]]:
        return [{"time": rfc3339(s.time), "delay": s.delay} for s in delays.history(name)]
    return history


def proxy_type(name: str, outbound: object, cfg: Config) -> str:
    if name in BUILTIN_TYPES:
        return BUILTIN_TYPES[name]
    declared = getattr(outbound, "type", None)
    if isinstance(declared, str) and declared:
        return declared
    for g in cfg.proxy_groups:
        if g.name == name:
            return GROUP_TYPES.get(g.type, g.type.title())
    for p in cfg.proxies:
        if p.name == name:
            return PROXY_TYPES.get(p.type, p.type.title())
    return "Unknown"


def is_group(outbound: object) -> bool:
    return hasattr(outbound, "members")


def now_of(outbound: object) -> str:
    """The member in use (a group's `now`)."""
    now = getattr(outbound, "now", None)
    if isinstance(now, str):
        return now
    current = getattr(outbound, "current", None)
    chosen = current() if callable(current) else getattr(outbound, "selected", None)
    return str(getattr(chosen, "name", ""))


def members_of(outbound: object) -> list[str]:
    names = getattr(outbound, "all", None)
    if isinstance(names, list):
        return [str(n) for n in names]
    return [str(getattr(m, "name", m)) for m in getattr(outbound, "members", ())]


def proxy_doc(name: str, outbound: object, cfg: Config,
              history: History = no_history) -> dict[str, Any]:
    """One entry of GET /proxies (adapter/adapter.go MarshalJSON, plus a
    group's fields from adapter/outboundgroup/*.go)."""
    pcfg: ProxyConfig | None = next((p for p in cfg.proxies if p.name == name), None)
    past = history(name)
    doc: dict[str, Any] = {
        "name": name,
        "type": proxy_type(name, outbound, cfg),
        "udp": bool(getattr(outbound, "carries_udp", pcfg.udp if pcfg else True)),
        "uot": False, "xudp": False, "tfo": False, "mptcp": False, "smux": False,
        "interface": "", "dialer-proxy": getattr(pcfg, "dialer_proxy", "") or "",
        "routing-mark": cfg.routing_mark or 0, "provider-name": "",
        "alive": bool(past[-1]["delay"]) if past else True,
        "history": past, "extra": {}, "id": name,
    }
    if is_group(outbound):
        health = getattr(outbound, "health", None)
        doc.update({
            "now": now_of(outbound),
            "all": members_of(outbound),
            "hidden": bool(getattr(outbound, "hidden", False)),
            "icon": str(getattr(outbound, "icon", "") or ""),
            "testUrl": str(getattr(health, "url", "") or ""),
            "expectedStatus": "*", "fixed": "", "emptyFallback": "",
        })
    return doc


def proxies_doc(outbounds: Mapping[str, object], cfg: Config,
                history: History = no_history) -> dict[str, dict[str, Any]]:
    """GET /proxies: every outbound by name, and GLOBAL (mihomo's
    selector over everything; in rule mode it routes nothing)."""
    out = {name: proxy_doc(name, o, cfg, history) for name, o in outbounds.items()}
    if "GLOBAL" not in out:
        names = list(out)
        out["GLOBAL"] = {**proxy_doc("GLOBAL", None, cfg), "type": "Selector",
                         "now": names[0] if names else "DIRECT", "all": names,
                         "hidden": True, "icon": "", "testUrl": "", "expectedStatus": "*",
                         "fixed": "", "emptyFallback": ""}
    return out


def connection_doc(row: Mapping[str, Any]) -> dict[str, Any]:
    """One live flow (FlowRecord / UDP session fields) in mihomo's
    TrackerInfo shape."""
    src_ip, dst_ip = str(row.get("src_ip", "")), str(row.get("dst_ip", ""))
    domain = row.get("domain") or ""
    network = str(row.get("network", "tcp"))
    chains = list(row.get("chains") or ([row["outbound"]] if row.get("outbound") else []))
    return {
        "id": str(row["id"]),
        "metadata": {
            "network": network,
            "type": INBOUND_TYPES.get(str(row.get("in_type", "TPROXY")), "TProxy"),
            "sourceIP": src_ip, "destinationIP": "" if domain else dst_ip,
            "sourceGeoIP": None, "destinationGeoIP": None,
            "sourceIPASN": "", "destinationIPASN": "",
            "sourcePort": str(row.get("src_port", 0)),
            "destinationPort": str(row.get("dst_port", 0)),
            "inboundIP": "", "inboundPort": str(row.get("in_port", 0)),
            "inboundName": str(row.get("in_name", "")),
            "inboundUser": str(row.get("in_user", "")), "host": domain,
            "dnsMode": "fake-ip" if domain else "normal",
            "uid": 0, "process": "", "processPath": "", "specialProxy": "",
            "specialRules": "", "remoteDestination": dst_ip, "dscp": 0, "sniffHost": "",
            "rematchName": "",
        },
        "upload": int(row.get("up", 0)),
        "download": int(row.get("down", 0)),
        "start": rfc3339(float(row.get("started", time.time()))),
        "chains": chains,
        "providerChains": ["" for _ in chains],
        "rule": "" if row.get("by_mode") else rule_type(
            str(row.get("rule", "") or ("MATCH" if chains else ""))),
        "rulePayload": str(row.get("rule_payload", "")),
    }


def connections_doc(rows: Iterable[Mapping[str, Any]], upload_total: int,
                    download_total: int) -> dict[str, Any]:
    """GET /connections (tunnel/statistic/manager.go Snapshot): totals are
    every byte since start, closed flows included."""
    return {
        "downloadTotal": download_total,
        "uploadTotal": upload_total,
        "connections": [connection_doc(r) for r in rows],
        "memory": memory_in_use(),
    }


def memory_in_use() -> int:
    """Resident bytes of this process (mihomo's /memory `inuse`)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def configs_doc(cfg: Config, mode: str) -> dict[str, Any]:
    """GET /configs (config.General as mihomo marshals it), from the
    running configuration."""
    return {
        "port": cfg.http_port or 0,
        "socks-port": cfg.socks_port or 0,
        "redir-port": 0,
        "tproxy-port": cfg.tproxy_port or 0,
        "mixed-port": cfg.mixed_port or 0,
        "tun": {"enable": False, "device": "", "stack": "", "dns-hijack": [],
                "auto-route": False, "auto-detect-interface": False},
        "tuic-server": {"enable": False, "listen": "", "certificate": "", "private-key": ""},
        "ss-config": "", "vmess-config": "",
        "authentication": None,
        "skip-auth-prefixes": [],
        "lan-allowed-ips": ["0.0.0.0/0", "::/0"],
        "lan-disallowed-ips": [],
        "allow-lan": cfg.allow_lan,
        "bind-address": cfg.bind_address,
        "inbound-tfo": False, "inbound-mptcp": False,
        "mode": mode,
        "unified-delay": False,
        "log-level": cfg.log_level,
        "ipv6": cfg.ipv6,
        "interface-name": "",
        "routing-mark": cfg.routing_mark or 0,
        "geox-url": {}, "geo-auto-update": False, "geo-update-interval": 0,
        "geodata-mode": False, "geodata-loader": "", "geosite-matcher": "",
        "tcp-concurrent": False, "find-process-mode": "off", "sniffing": False,
        "global-client-fingerprint": "", "global-ua": "", "etag-support": False,
        "keep-alive-idle": 0, "keep-alive-interval": 0, "disable-keep-alive": False,
    }


def rules_doc(cfg: Config) -> dict[str, Any]:
    """GET /rules (hub/route/rules.go)."""
    return {"rules": [
        {"index": i, "type": rule_type(r.type), "payload": rule_payload(r), "proxy": r.target,
         "size": -1,
         "extra": {"disabled": False, "hitCount": 0, "hitAt": "", "missCount": 0,
                   "missAt": ""}}
        for i, r in enumerate(cfg.rules)
    ]}


def dns_doc(reply: DNSRecord) -> dict[str, Any]:
    """GET /dns/query (hub/route/dns.go): miekg/dns field names."""
    def rr(record: Any) -> dict[str, Any]:
        return {"name": str(record.rname), "type": int(record.rtype), "TTL": int(record.ttl),
                "data": str(record.rdata)}

    h = reply.header
    doc: dict[str, Any] = {
        "Status": int(h.rcode),
        "Question": [{"Name": str(q.qname), "Qtype": int(q.qtype), "Qclass": int(q.qclass)}
                     for q in reply.questions],
        "TC": bool(h.tc), "RD": bool(h.rd), "RA": bool(h.ra), "AD": bool(h.ad),
        "CD": bool(h.cd),
    }
    if reply.rr:
        doc["Answer"] = [rr(r) for r in reply.rr]
    if reply.auth:
        doc["Authority"] = [rr(r) for r in reply.auth]
    if reply.ar:
        doc["Additional"] = [rr(r) for r in reply.ar]
    return doc


def qtype_valid(name: str) -> bool:
    return name in QTYPE.reverse
