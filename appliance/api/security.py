"""Who may call the control API, checked before any route runs (an ASGI
middleware around the whole app).

In order, for HTTP and websocket requests alike:

1. Host header (DNS rebinding): a page on evil.example whose name later
   resolves to the gateway must not reach the API with the victim's
   browser. Allowed: IP literals (a rebinding needs a name), `localhost`,
   this machine's hostname, and `appliance.controller-hosts`. Else 403.
2. CORS, only when a secret is set (without one, any page a LAN browser
   opens could drive the API; with one, the page still needs the secret):
   `external-controller-cors` allow-origins ("*" or exact origins) and
   allow-private-network, as mihomo's go-chi/cors options. A preflight
   (OPTIONS with Access-Control-Request-Method) is answered here, 204.
3. The secret: `Authorization: Bearer <secret>`; a websocket may instead
   carry `?token=<secret>` (browsers cannot set headers on one), as in
   mihomo. Compared in constant time. Else 401 {"message": "Unauthorized"}.

/ui (the dashboard's static files) needs no secret, as in mihomo: the
page asks the user for it. Rejections are logged at DEBUG without the
offered token.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from starlette.middleware import Middleware

from appliance.api.views import Controlled as Sources

log = logging.getLogger("mirage.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

METHODS = "GET, POST, PUT, PATCH, DELETE"
HEADERS = "Content-Type, Authorization"


def host_allowed(host_header: str, names: frozenset[str]) -> bool:
    """Is the Host header's host an IP literal or one of `names`?"""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in names


def token_ok(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode(), secret.encode())


class Guard:
    """The checks of the module doc, over the live `sources.cfg` (a reload
    that changes the secret applies to the next request)."""

    def __init__(self, app: ASGIApp, sources: Sources) -> None:
        self.app = app
        self.sources = sources
        me = socket.gethostname().lower()
        self.own_names = frozenset({"localhost", me, me.partition(".")[0]})

    @classmethod
    def middleware(cls, sources: Sources) -> list[Middleware]:
        return [Middleware(cls, sources=sources)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        cfg = self.sources.cfg
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        names = self.own_names | frozenset(cfg.appliance.controller_hosts)
        if not host_allowed(headers.get("host", ""), names):
            log.debug("control API: Host %r refused (not an address or a configured name)",
                      headers.get("host", "")[:100])
            await _reply(scope, receive, send, 403, "Host not allowed")
            return
        secret = cfg.secret
        origin = headers.get("origin")
        cors: list[tuple[str, str]] = []
        if secret and origin is not None:
            allowed = cfg.controller.cors.allow_origins
            if "*" in allowed or origin in allowed:
                cors = [("access-control-allow-origin", "*" if "*" in allowed else origin),
                        ("vary", "Origin")]
        if scope["type"] == "http" and scope["method"] == "OPTIONS" \
                and "access-control-request-method" in headers:
            if cors:
                cors += [("access-control-allow-methods", METHODS),
                         ("access-control-allow-headers", HEADERS),
                         ("access-control-max-age", "300")]
                if headers.get("access-control-request-private-network") == "true" \
                        and cfg.controller.cors.allow_private_network:
                    cors.append(("access-control-allow-private-network", "true"))
            await _reply(scope, receive, send, 204, None, cors)
            return
        path = scope.get("path", "")
        if secret and not (path == "/ui" or path.startswith("/ui/")) \
                and not self._authorized(scope, headers, secret):
            log.debug("control API: %s %s refused: no or wrong secret",
                      scope.get("method", "WEBSOCKET"), path[:100])
            await _reply(scope, receive, send, 401, "Unauthorized", cors)
            return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      *((k.encode(), v.encode()) for k, v in cors)]
            await send(message)
        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _authorized(scope: Scope, headers: dict[str, str], secret: str) -> bool:
        if scope["type"] == "websocket":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            tokens = query.get("token")
            if tokens:
                return token_ok(tokens[-1], secret)
        bearer, _, token = headers.get("authorization", "").partition(" ")
        return bearer == "Bearer" and token_ok(token, secret)


async def _reply(scope: Scope, receive: Receive, send: Send, status: int,
                 message: str | None, extra: list[tuple[str, str]] | None = None) -> None:
    if scope["type"] == "websocket":
        # Refused before the handshake: hypercorn answers the upgrade with 403.
        await send({"type": "websocket.close", "code": 1008})
        return
    body = b"" if message is None else json.dumps({"message": message}).encode() + b"\n"
    headers = [(k.encode(), v.encode()) for k, v in extra or []]
    if message is not None:
        headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
