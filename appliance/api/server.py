"""The control API: Clash-compatible REST, Mirage's own endpoints, /metrics.

Clash dashboards and TUIs speak to `external-controller` with the bearer
`secret`; the subset served here is what they need to show state read-only:
`/`, `/version`, `/configs`, `/proxies`, `/rules`, `/connections`. Mirage's
own endpoints live under `/mirage/` (status, mappings, resolve) and feed the
`mirage status | mappings | resolve` commands. `/metrics` is Prometheus text.

The API reads the running services through the `Sources` it is started
with (appliance/api/views.py, which makes every document about them); it
never changes them.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from dnslib import QTYPE

from appliance import __version__
from appliance.api import views
from appliance.api.http import Request, Response, serve_http
from appliance.api.views import Sources


class ControlApi:
    """Routes requests to handlers; owns nothing, reads `sources`."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def authorized(self, request: Request) -> bool:
        secret = self.sources.cfg.secret
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
        cfg = self.sources.cfg
        return Response.json({
            "port": 0, "socks-port": 0, "redir-port": 0,
            "mixed-port": cfg.mixed_port or 0,
            "tproxy-port": cfg.tproxy_port or 0,
            "allow-lan": True, "mode": "rule",
            "log-level": cfg.log_level, "ipv6": cfg.ipv6,
        })

    async def proxies(self, request: Request) -> Response:
        cfg = self.sources.cfg
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
            {"type": r.type, "payload": r.value, "proxy": r.target} for r in self.sources.cfg.rules
        ]})

    async def connections(self, request: Request) -> Response:
        conns = views.connections(self.sources)
        return Response.json({
            "downloadTotal": sum(c.get("download", 0) for c in conns),
            "uploadTotal": sum(c.get("upload", 0) for c in conns),
            "connections": conns,
        })

    async def status(self, request: Request) -> Response:
        return Response.json(views.status(self.sources))

    async def mappings_endpoint(self, request: Request) -> Response:
        return Response.json({"mappings": views.mappings(self.sources)})

    async def resolve(self, request: Request) -> Response:
        name = request.query.get("name", "").strip()
        qtype = request.query.get("type", "A").upper()
        if not name or len(name) > 253:
            return Response.error(400, "query parameter `name` is required (a domain name)")
        if qtype not in QTYPE.reverse:
            return Response.error(400, f"unknown query type: {qtype}")
        return Response.json(await views.resolve(self.sources, name, qtype))

    async def metrics(self, request: Request) -> Response:
        return Response(200, render_metrics(self.sources).encode(),
                        "text/plain; version=0.0.4; charset=utf-8")


_CLASH_TYPE = {"socks5": "Socks5", "http": "Http", "ss": "Shadowsocks", "trojan": "Trojan"}

_ROUTES: dict[str, Callable[[ControlApi, Request], Awaitable[Response]]] = {
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


def render_metrics(sources: Sources) -> str:
    """Prometheus text exposition: one gauge/counter per component counter,
    then the labelled series (per-client counters of the eBPF capture).

    Names are `mirage_<component>_<counter>`; counters whose name ends in
    `_total` are typed counter, the rest gauge.
    """
    lines = []
    uptime = time.monotonic() - sources.started_at
    lines += ["# TYPE mirage_uptime_seconds gauge", f"mirage_uptime_seconds {uptime:.3f}"]
    for component, values in sorted(views.counters(sources).items()):
        for key, value in sorted(values.items()):
            metric = f"mirage_{component}_{key}".replace("-", "_").replace(".", "_")
            kind = "counter" if key.endswith("_total") else "gauge"
            lines.append(f"# TYPE {metric} {kind}")
            lines.append(f"{metric} {value}")
    typed: set[str] = set()
    for metric, labels, value in views.series(sources):
        if metric not in typed:
            typed.add(metric)
            kind = "counter" if metric.endswith("_total") else "gauge"
            lines.append(f"# TYPE {metric} {kind}")
        text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{metric}{{{text}}} {value}")
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


async def serve(sources: Sources, host: str, port: int, *,
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Serve the control API over `sources` on host:port until cancelled;
    started with the bound listeners."""
    await serve_http(host, port, ControlApi(sources).handle, task_status=task_status)
