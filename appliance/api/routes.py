"""The control API's routes: mihomo's (hub/route/) as the Clash dashboards
and clients call them, Mirage's own under /mirage/, /metrics, and the
dashboard files at /ui.

`build_app(sources)` makes the Starlette app; appliance/api/server.py serves
it. Every route but /ui goes through appliance/api/security.py (Host
check, CORS, secret). What a document contains is decided in
appliance/api/clash.py (mihomo's shapes) and views.py (Mirage's own); this
module reads the request, calls the services through `Sources`, and maps
failures to mihomo's status codes: 400 bad request, 404 no such proxy or
provider, 503 a delay test failed, 504 it timed out, 500 the DNS section is
off or the resolver failed. The routes that stream (/traffic, /memory,
/logs, /connections) are websockets when asked to upgrade, else chunked
JSON lines (one document per line), as in mihomo.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import trio
from dnslib import QTYPE, DNSRecord
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from appliance import __version__, metrics
from appliance.api import clash, views
from appliance.api.logbus import LEVELS, LogBus, level_name
from appliance.api.security import Guard
from appliance.api.ui import ui_directory
from appliance.api.views import Controlled as Sources
from appliance.config.model import TUNNEL_MODES
from appliance.dns.upstream_api import UpstreamError
from appliance.outbound.groups import GroupError
from appliance.outbound.health import ProbeError, url_delay

log = logging.getLogger("mirage.api")

DEFAULT_TEST_URL = "https://www.gstatic.com/generate_204"
# The keys PATCH /configs applies live (mihomo's patchConfigs allows more:
# the listeners' ports need a restart here). `mode` switches the live
# router (rule, global, direct), as mihomo's tunnel.SetMode.
PATCHABLE = ("log-level", "allow-lan", "bind-address", "mode")

# An HTTP endpoint: the request in, the response out.
Handler = Callable[[Request], Awaitable[Response]]


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status)


def no_content() -> Response:
    return Response(status_code=204)


class Api:
    """The handlers, over `sources` and the log bus."""

    def __init__(self, sources: Sources, bus: LogBus) -> None:
        self.src = sources
        self.bus = bus

    # -- what the routes read --------------------------------------------------

    def outbounds(self) -> dict[str, Any]:
        dispatcher = getattr(self.src, "dispatcher", None)
        if dispatcher is None:
            return {}
        return dict(dispatcher.router.outbounds)

    def find(self, name: str) -> Any:
        return self.outbounds().get(name)

    def history(self) -> clash.History:
        return clash.history_of(getattr(self.src, "delays", None))

    def totals(self) -> tuple[int, int]:
        up = down = 0
        if self.src.flows is not None:
            stats = self.src.flows.stats()
            up, down = int(stats.get("bytes_up", 0)), int(stats.get("bytes_down", 0))
        if self.src.udp is not None:
            stats = self.src.udp.stats()
            up += int(stats.get("bytes_up", 0))
            down += int(stats.get("bytes_down", 0))
        return up, down

    def connections(self) -> dict[str, Any]:
        rows = self.src.flows.snapshot() if self.src.flows is not None else []
        if self.src.udp is not None:
            # UDP sessions take their ids from the flow registry's sequence
            # (gateway/udp.py): an id names one entry, which DELETE ends.
            rows += self.src.udp.snapshot()
        up, down = self.totals()
        return clash.connections_doc(rows, up, down)

    # -- mihomo's routes ------------------------------------------------------

    async def hello(self, request: Request) -> Response:
        return JSONResponse({"hello": "mihomo"})

    async def version(self, request: Request) -> Response:
        # `meta: true`: dashboards then use mihomo's (Meta) API, which this is.
        return JSONResponse({"meta": True, "version": f"mirage-{__version__}"})

    async def get_configs(self, request: Request) -> Response:
        return JSONResponse(clash.configs_doc(self.src.cfg, self.src.cfg.mode))

    async def patch_configs(self, request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            return error(400, "Body invalid")
        unknown = [k for k in body if k not in PATCHABLE]
        if unknown:
            return error(400, f"cannot change {', '.join(unknown)} without a restart "
                              f"(live: {', '.join(PATCHABLE)})")
        cfg = self.src.cfg
        changes: dict[str, Any] = {}
        if "mode" in body:
            mode = str(body["mode"]).lower()
            if mode not in TUNNEL_MODES:
                return error(400, "mode: rule, global or direct")
            changes["mode"] = mode
        if "log-level" in body:
            level = str(body["log-level"])
            if level not in LEVELS:
                return error(400, f"log-level: one of {', '.join(LEVELS)}")
            changes["log_level"] = level
        if "allow-lan" in body:
            if not isinstance(body["allow-lan"], bool):
                return error(400, "allow-lan: true or false")
            changes["allow_lan"] = body["allow-lan"]
        if "bind-address" in body:
            changes["bind_address"] = str(body["bind-address"])
        await self.src.apply_config(replace(cfg, **changes))
        return no_content()

    async def put_configs(self, request: Request) -> Response:
        # mihomo takes {"path": ..., "payload": ...}; loading another file
        # or a posted profile would let the API rewrite the gateway, so
        # only the configured file is read again (a reload).
        body = await _json_body(request)
        if isinstance(body, dict) and (body.get("payload") or body.get("path")):
            source = self.src.cfg.source
            if body.get("payload") or str(body.get("path")) != str(source):
                return error(400, "only the configured file is reloaded: send an empty "
                                  "path and payload")
        if not await self.src.reload():
            return error(400, "the configuration file did not load (see the log); "
                              "still running the previous one")
        return no_content()

    async def proxies(self, request: Request) -> Response:
        return JSONResponse({"proxies": clash.proxies_doc(self.outbounds(), self.src.cfg,
                                                          self.history())})

    async def proxy(self, request: Request) -> Response:
        name = request.path_params["name"]
        docs = clash.proxies_doc(self.outbounds(), self.src.cfg, self.history())
        if name not in docs:
            return error(404, "resource not found")
        return JSONResponse(docs[name])

    async def select(self, request: Request) -> Response:
        name = request.path_params["name"]
        outbound = self.find(name)
        if outbound is None and name != "GLOBAL":
            return error(404, "resource not found")
        body = await _json_body(request)
        member = body.get("name") if isinstance(body, dict) else None
        if not isinstance(member, str):
            return error(400, "Body invalid")
        if outbound is None:  # no GLOBAL group: rule mode routes nothing through it
            return no_content() if member in self.outbounds() else error(
                400, f"Selector update error: {member} not found")
        if not getattr(outbound, "selectable", hasattr(outbound, "select")):
            return error(400, "Must be a Selector")
        try:
            # The group tells the remembered selections (store-selected).
            outbound.select(member)
        except KeyError:
            return error(400, f"Selector update error: proxy not exist {member}")
        except GroupError as err:
            return error(400, f"Selector update error: {err}")
        log.info("group %s: %s selected through the API", name, member)
        return no_content()

    async def proxy_delay(self, request: Request) -> Response:
        name = request.path_params["name"]
        outbound = self.find(name)
        if outbound is None:
            return error(404, "resource not found")
        test = _delay_args(request)
        if test is None:
            return error(400, "Body invalid")
        url, limit, expected = test
        started = trio.current_time()
        try:
            delay = await url_delay(outbound, url, limit, expected)
        except ProbeError as err:
            self._record(name, url, 0)
            if trio.current_time() - started >= limit * 0.95:
                return error(504, "Timeout")
            return error(503, f"An error occurred in the delay test: {err}")
        self._record(name, url, delay)
        return JSONResponse({"delay": delay})

    def _record(self, name: str, url: str, delay: int) -> None:
        delays = getattr(self.src, "delays", None)
        if delays is not None:
            delays.record(name, url, delay)

    async def groups(self, request: Request) -> Response:
        docs = clash.proxies_doc(self.outbounds(), self.src.cfg, self.history())
        return JSONResponse({"proxies": [d for n, d in docs.items()
                                         if "all" in d and n != "GLOBAL"]})

    async def group(self, request: Request) -> Response:
        name = request.path_params["name"]
        outbound = self.find(name)
        if outbound is None or not clash.is_group(outbound):
            return error(404, "resource not found")
        return JSONResponse(clash.proxy_doc(name, outbound, self.src.cfg, self.history()))

    async def group_delay(self, request: Request) -> Response:
        name = request.path_params["name"]
        outbound = self.find(name)
        if outbound is None or not clash.is_group(outbound):
            return error(404, "resource not found")
        test = _delay_args(request)
        if test is None:
            return error(400, "Body invalid")
        url, limit, expected = test
        delays: dict[str, int] = {}

        async def one(member: Any) -> None:
            try:
                delays[member.name] = await url_delay(member, url, limit, expected)
            except ProbeError:  # a failed member is left out, as in mihomo
                self._record(member.name, url, 0)
            else:
                self._record(member.name, url, delays[member.name])

        async with trio.open_nursery() as nursery:
            for member in getattr(outbound, "members", ()):
                if member.name not in ("COMPATIBLE", "PASS", "PASS-RULE", "REJECT", "REJECT-DROP"):
                    nursery.start_soon(one, member)
        return JSONResponse(delays)

    async def proxy_providers(self, request: Request) -> Response:
        return JSONResponse({"providers": self.src.api_providers.proxy_docs(self.src.cfg)})

    async def proxy_provider(self, request: Request) -> Response:
        doc = self.src.api_providers.proxy_docs(self.src.cfg).get(request.path_params["name"])
        return JSONResponse(doc) if doc is not None else error(404, "resource not found")

    async def update_proxy_provider(self, request: Request) -> Response:
        return await self._provider_action(request, "update_proxy")

    async def healthcheck_proxy_provider(self, request: Request) -> Response:
        return await self._provider_action(request, "healthcheck")

    async def rule_providers(self, request: Request) -> Response:
        return JSONResponse({"providers": self.src.api_providers.rule_docs()})

    async def update_rule_provider(self, request: Request) -> Response:
        return await self._provider_action(request, "update_rule")

    async def _provider_action(self, request: Request, action: str) -> Response:
        act: Callable[[str], Awaitable[bool]] = getattr(self.src.api_providers, action)
        try:
            found = await act(request.path_params["name"])
        except Exception as err:  # the provider's own failure (download, parse)
            return error(503, str(err))
        return no_content() if found else error(404, "resource not found")

    async def rules(self, request: Request) -> Response:
        return JSONResponse(clash.rules_doc(self.src.cfg))

    async def get_connections(self, request: Request) -> Response:
        return JSONResponse(self.connections())

    async def close_all(self, request: Request) -> Response:
        for flows in (self.src.flows, self.src.udp):
            if flows is not None:
                for row in flows.snapshot():
                    flows.close_flow(int(row["id"]))
        return no_content()

    async def close_one(self, request: Request) -> Response:
        flow_id = request.path_params["id"]
        if flow_id.isdigit():
            # TCP flows and UDP sessions share one id sequence: one has it.
            for flows in (self.src.flows, self.src.udp):
                if flows is not None and flows.close_flow(int(flow_id)):
                    break
        return no_content()  # mihomo answers 204 for an unknown id too

    async def dns_query(self, request: Request) -> Response:
        resolver = self.src.resolver
        if resolver is None:
            return error(500, "DNS section is disabled")
        name = request.query_params.get("name", "")
        qtype = request.query_params.get("type") or "A"
        if not clash.qtype_valid(qtype):
            return error(400, "invalid query type")
        if not name or len(name) > 253:
            return error(400, "invalid name")
        try:
            with trio.fail_after(5):
                reply = await resolver.query(DNSRecord.question(name, qtype))
        except (UpstreamError, trio.TooSlowError) as err:
            return error(500, str(err) or "timeout")
        return JSONResponse(clash.dns_doc(reply))

    async def flush_fakeip(self, request: Request) -> Response:
        pool = self.src.pool
        drop = getattr(pool, "drop", None)
        if drop is not None:
            # Pinned mappings (live flows) stay: their flows still need them.
            dropped = drop(lambda domain: True)
            log.info("fake-IP pool flushed through the API: %d mappings dropped", dropped)
        return no_content()

    async def restart(self, request: Request) -> Response:
        # A full reload, not a re-exec: see docs/operations.md ("/restart").
        ok = await self.src.reload()
        if not ok:
            return error(500, "the configuration file did not load (see the log)")
        return JSONResponse({"status": "ok"})

    # -- streams ----------------------------------------------------------------

    def traffic_lines(self) -> AsyncIterator[dict[str, Any]]:
        async def gen() -> AsyncIterator[dict[str, Any]]:
            last = self.totals()
            while True:
                await trio.sleep(1)
                now = self.totals()
                yield {"up": now[0] - last[0], "down": now[1] - last[1],
                       "upTotal": now[0], "downTotal": now[1]}
                last = now
        return gen()

    def memory_lines(self) -> AsyncIterator[dict[str, Any]]:
        async def gen() -> AsyncIterator[dict[str, Any]]:
            first = True
            while True:
                await trio.sleep(1)
                # mihomo sends 0 first so a chart starts at zero.
                yield {"inuse": 0 if first else clash.memory_in_use(), "oslimit": 0}
                first = False
        return gen()

    def connection_lines(self, interval: float) -> AsyncIterator[dict[str, Any]]:
        async def gen() -> AsyncIterator[dict[str, Any]]:
            while True:
                yield self.connections()
                await trio.sleep(interval)
        return gen()

    def log_lines(self, level: int) -> AsyncIterator[dict[str, Any]]:
        async def gen() -> AsyncIterator[dict[str, Any]]:
            with self.bus.subscribe() as lines:
                async for levelno, text in lines:
                    if levelno >= level:
                        yield {"type": level_name(levelno), "payload": text}
        return gen()

    def stream_route(self, make: Callable[[Request | WebSocket],
                                          AsyncIterator[dict[str, Any]] | Response]
                     ) -> tuple[Callable[[Request], Awaitable[Response]],
                                Callable[[WebSocket], Awaitable[None]]]:
        """The HTTP (chunked JSON lines) and websocket handlers of a stream."""
        async def http(request: Request) -> Response:
            lines = make(request)
            if isinstance(lines, Response):
                return lines

            async def body() -> AsyncIterator[bytes]:
                async for doc in lines:
                    yield json.dumps(doc).encode() + b"\n"
            return StreamingResponse(body(), media_type="application/json")

        async def ws(socket: WebSocket) -> None:
            lines = make(socket)
            if isinstance(lines, Response):
                await socket.close(code=1008)
                return
            await socket.accept()
            try:
                async with trio.open_nursery() as nursery:
                    async def until_closed() -> None:
                        # Reading notices the close; dashboards send nothing.
                        try:
                            while True:
                                await socket.receive_text()
                        except (WebSocketDisconnect, RuntimeError):
                            pass
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(until_closed)
                    async for doc in lines:
                        await socket.send_text(json.dumps(doc))
                    nursery.cancel_scope.cancel()
            except (WebSocketDisconnect, OSError, trio.BrokenResourceError):
                pass
        return http, ws

    # -- Mirage's own -------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        return JSONResponse(views.status(self.src))

    async def mappings(self, request: Request) -> Response:
        return JSONResponse({"mappings": views.mappings(self.src)})

    async def failures(self, request: Request) -> Response:
        return JSONResponse(views.failures(self.src))

    async def resolve(self, request: Request) -> Response:
        name = request.query_params.get("name", "").strip()
        qtype = request.query_params.get("type", "A").upper()
        if not name or len(name) > 253:
            return error(400, "query parameter `name` is required (a domain name)")
        if qtype not in QTYPE.reverse:
            return error(400, f"unknown query type: {qtype}")
        return JSONResponse(await views.resolve(self.src, name, qtype))

    async def metrics(self, request: Request) -> Response:
        return Response(metrics.render(views.collector(self.src)),
                        media_type=metrics.CONTENT_TYPE)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > 64 * 1024:
        return None
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _delay_args(request: Request) -> tuple[str, float, tuple[tuple[int, int], ...]] | None:
    """(url, limit in seconds, expected status ranges) from mihomo's
    `url`, `timeout` (ms) and `expected` ("204", "200-299/302", empty:
    any); None when malformed (mihomo answers 400)."""
    q = request.query_params
    try:
        timeout = int(q.get("timeout", "5000"))
    except ValueError:
        return None
    if not 0 < timeout <= 60_000:
        return None
    url = q.get("url") or DEFAULT_TEST_URL
    if urlsplit(url).scheme not in ("http", "https"):
        return None
    expected: list[tuple[int, int]] = []
    for part in filter(None, q.get("expected", "").split("/")):
        lo, _, hi = part.partition("-")
        if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
            return None
        expected.append((int(lo), int(hi or lo)))
    return url, timeout / 1000, tuple(expected)


def build_app(sources: Sources, bus: LogBus | None = None) -> Starlette:
    """The ASGI app over `sources` (the log bus: `sources.log_bus` if it has
    one, else a new one the caller installs)."""
    bus = bus if bus is not None else getattr(sources, "log_bus", None) or LogBus()
    api = Api(sources, bus)

    def traffic(r: Request | WebSocket) -> AsyncIterator[dict[str, Any]]:
        return api.traffic_lines()

    def memory(r: Request | WebSocket) -> AsyncIterator[dict[str, Any]]:
        return api.memory_lines()

    def logs(r: Request | WebSocket) -> AsyncIterator[dict[str, Any]] | Response:
        level = LEVELS.get(r.query_params.get("level") or "info")
        if level is None:
            return error(400, "Body invalid")
        return api.log_lines(level)

    def conns(r: Request | WebSocket) -> AsyncIterator[dict[str, Any]] | Response:
        try:
            interval = int(r.query_params.get("interval") or 1000) / 1000
        except ValueError:
            return error(400, "Body invalid")
        return api.connection_lines(max(0.1, interval))

    # Each path with its handler (GET, and HEAD), or its handlers by method.
    endpoints: dict[str, Handler | dict[str, Handler]] = {
        "/": api.hello,
        "/version": api.version,
        "/configs": {"GET": api.get_configs, "PATCH": api.patch_configs,
                     "PUT": api.put_configs},
        "/proxies": api.proxies,
        "/proxies/{name}": {"GET": api.proxy, "PUT": api.select},
        "/proxies/{name}/delay": api.proxy_delay,
        "/group": api.groups,
        "/group/{name}": api.group,
        "/group/{name}/delay": api.group_delay,
        "/providers/proxies": api.proxy_providers,
        "/providers/proxies/{name}": {"GET": api.proxy_provider,
                                      "PUT": api.update_proxy_provider},
        "/providers/proxies/{name}/healthcheck": api.healthcheck_proxy_provider,
        "/providers/rules": api.rule_providers,
        "/providers/rules/{name}": {"PUT": api.update_rule_provider},
        "/rules": api.rules,
        "/connections": {"DELETE": api.close_all},
        "/connections/{id}": {"DELETE": api.close_one},
        "/dns/query": api.dns_query,
        "/cache/fakeip/flush": {"POST": api.flush_fakeip},
        "/restart": {"POST": api.restart},
        "/mirage/status": api.status,
        "/mirage/mappings": api.mappings,
        "/mirage/resolve": api.resolve,
        "/mirage/failures": api.failures,
        "/metrics": api.metrics,
    }
    routes: list[BaseRoute] = []
    for path, handlers in endpoints.items():
        if isinstance(handlers, dict):
            routes += [Route(path, h, methods=[m]) for m, h in handlers.items()]
        else:
            routes.append(Route(path, handlers))
    for path, make in (("/traffic", traffic), ("/memory", memory), ("/logs", logs)):
        http, ws = api.stream_route(make)
        routes += [Route(path, http), WebSocketRoute(path, ws)]
    # A plain GET /connections is one snapshot, as in mihomo (clients parse
    # one document); the websocket streams snapshots.
    routes += [Route("/connections", api.get_connections, methods=["GET"]),
               WebSocketRoute("/connections", api.stream_route(conns)[1])]
    ui = ui_directory(sources.cfg)
    if ui is not None:
        routes += [Route("/ui", lambda r: RedirectResponse("/ui/", 307)),
                   Mount("/ui", StaticFiles(directory=ui, html=True))]
    return Starlette(routes=routes, middleware=Guard.middleware(sources))
