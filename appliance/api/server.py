"""The control API: Clash-compatible REST, Mirage's own endpoints, /metrics.

Clash dashboards and TUIs speak to `external-controller` with the bearer
`secret`; the subset served here is what they need to show state read-only:
`/`, `/version`, `/configs`, `/proxies`, `/rules`, `/connections`. Mirage's
own endpoints live under `/mirage/` (status, mappings, resolve) and feed the
`mirage status | mappings | resolve` commands. `/metrics` is Prometheus text.

The API reads the appliance through the `ApplianceView` protocol, so it never
holds a reference to internals it could mutate by accident.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import trio
from dnslib import QTYPE, RCODE, DNSRecord

from appliance import __version__
from appliance.api.http import Request, Response, serve_http
from appliance.config.model import Config


class ApplianceView(Protocol):
    """What the control API reads. Implemented by `appliance.app.Appliance`."""

    cfg: Config
    started_at: float

    def status(self) -> dict[str, Any]: ...

    def counters(self) -> Mapping[str, Mapping[str, int | float]]: ...

    def series(self) -> Iterable[tuple[str, Mapping[str, str], int | float]]: ...

    def mappings(self) -> Iterable[tuple[str, Any, int]]: ...

    def connections(self) -> list[dict[str, Any]]: ...

    async def resolve(self, name: str, qtype: str) -> dict[str, Any]: ...


class ControlApi:
    """Routes requests to handlers; owns nothing but the view it reads."""

    def __init__(self, view: ApplianceView) -> None:
        self.view = view

    def authorized(self, request: Request) -> bool:
        secret = self.view.cfg.secret
        if not secret:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else request.query.get("token", "")
        return hmac.compare_digest(token.encode(), secret.encode())

    async def handle(self, request: Request) -> Response:
        if request.method == "OPTIONS":  # CORS preflight from a dashboard
            return Response(204)
        if not self.authorized(request):
            return Response.error(401, "Unauthorized")
        if request.method != "GET":
            return Response.error(405, "read-only API: only GET is served")
        route = _ROUTES.get(request.path.rstrip("/") or "/")
        if route is None:
            return Response.error(404, f"no such endpoint: {request.path}")
        return await route(self, request)

    async def root(self, request: Request) -> Response:
        return Response.json({"hello": "mirage"})

    async def version(self, request: Request) -> Response:
        return Response.json({"version": f"mirage-{__version__}", "meta": False, "premium": False})

    async def configs(self, request: Request) -> Response:
        cfg = self.view.cfg
        return Response.json({
            "port": 0, "socks-port": 0, "redir-port": 0,
            "mixed-port": cfg.mixed_port or 0,
            "tproxy-port": cfg.tproxy_port or 0,
            "allow-lan": True, "mode": "rule",
            "log-level": cfg.log_level, "ipv6": cfg.ipv6,
        })

    async def proxies(self, request: Request) -> Response:
        cfg = self.view.cfg
        out: dict[str, Any] = {
            "DIRECT": {"name": "DIRECT", "type": "Direct", "udp": True, "history": []},
            "REJECT": {"name": "REJECT", "type": "Reject", "udp": True, "history": []},
        }
        for p in cfg.proxies:
            out[p.name] = {"name": p.name, "type": _CLASH_TYPE.get(p.type, p.type), "udp": p.udp,
                           "history": []}
        for g in cfg.proxy_groups:
            out[g.name] = {"name": g.name, "type": g.type.title(), "all": list(g.proxies),
                           "now": g.proxies[0] if g.proxies else "", "history": []}
        return Response.json({"proxies": out})

    async def rules(self, request: Request) -> Response:
        return Response.json({"rules": [
            {"type": r.type, "payload": r.value, "proxy": r.target} for r in self.view.cfg.rules
        ]})

    async def connections(self, request: Request) -> Response:
        conns = self.view.connections()
        return Response.json({
            "downloadTotal": sum(c.get("download", 0) for c in conns),
            "uploadTotal": sum(c.get("upload", 0) for c in conns),
            "connections": conns,
        })

    async def status(self, request: Request) -> Response:
        return Response.json(self.view.status())

    async def mappings_endpoint(self, request: Request) -> Response:
        rows = [{"domain": d, "ip": str(ip), "pins": pins} for d, ip, pins in self.view.mappings()]
        return Response.json({"mappings": rows})

    async def resolve(self, request: Request) -> Response:
        name = request.query.get("name", "").strip()
        qtype = request.query.get("type", "A").upper()
        if not name or len(name) > 253:
            return Response.error(400, "query parameter `name` is required (a domain name)")
        if qtype not in QTYPE.reverse:
            return Response.error(400, f"unknown query type: {qtype}")
        return Response.json(await self.view.resolve(name, qtype))

    async def metrics(self, request: Request) -> Response:
        return Response(200, render_metrics(self.view).encode(),
                        "text/plain; version=0.0.4; charset=utf-8")


_CLASH_TYPE = {"socks5": "Socks5", "http": "Http", "ss": "Shadowsocks", "trojan": "Trojan"}

_ROUTES = {
    "/": ControlApi.root,
    "/version": ControlApi.version,
    "/configs": ControlApi.configs,
    "/proxies": ControlApi.proxies,
    "/rules": ControlApi.rules,
    "/connections": ControlApi.connections,
    "/mirage/status": ControlApi.status,
    "/mirage/mappings": ControlApi.mappings_endpoint,
    "/mirage/resolve": ControlApi.resolve,
    "/metrics": ControlApi.metrics,
}


def render_metrics(view: ApplianceView) -> str:
    """Prometheus text exposition: one gauge/counter per component counter,
    then the labelled series (per-client counters of the eBPF capture).

    Names are `mirage_<component>_<counter>`; counters whose name ends in
    `_total` are typed counter, the rest gauge.
    """
    lines = []
    uptime = time.monotonic() - view.started_at
    lines += ["# TYPE mirage_uptime_seconds gauge", f"mirage_uptime_seconds {uptime:.3f}"]
    for component, values in sorted(view.counters().items()):
        for key, value in sorted(values.items()):
            metric = f"mirage_{component}_{key}".replace("-", "_").replace(".", "_")
            kind = "counter" if key.endswith("_total") else "gauge"
            lines.append(f"# TYPE {metric} {kind}")
            lines.append(f"{metric} {value}")
    typed: set[str] = set()
    for metric, labels, value in view.series():
        if metric not in typed:
            typed.add(metric)
            kind = "counter" if metric.endswith("_total") else "gauge"
            lines.append(f"# TYPE {metric} {kind}")
        text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{metric}{{{text}}} {value}")
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def answer_rows(reply: DNSRecord) -> list[dict[str, Any]]:
    """Resource records of a reply's answer section as plain dicts."""
    return [
        {"name": str(rr.rname).rstrip("."), "type": QTYPE.get(rr.rtype), "ttl": rr.ttl,
         "data": str(rr.rdata)}
        for rr in reply.rr
    ]


def rcode_name(reply: DNSRecord) -> str:
    return str(RCODE.get(reply.header.rcode))


async def serve(view: ApplianceView, host: str, port: int, *,
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Serve the control API for `view` on host:port until cancelled; started
    with the bound listeners."""
    await serve_http(host, port, ControlApi(view).handle, task_status=task_status)
