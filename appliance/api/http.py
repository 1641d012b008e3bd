"""A minimal HTTP/1.1 server core for the control API, on h11 and trio.

It owns one listening socket and the connections accepted on it; requests are
handed to a `Handler` that returns a `Response`. Bodies are small JSON or
text documents, so no streaming: a request body over `MAX_BODY` gets 413, a
request that h11 cannot parse gets 400, a handler crash 500 (logged), and the
connection is closed after any error. Idle keep-alive connections close after
`IDLE_TIMEOUT` seconds so a dashboard that forgets a socket costs nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio

log = logging.getLogger("mirage.api")

MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 64


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, data: object, status: int = 200) -> Response:
        return cls(status, json.dumps(data, default=str).encode() + b"\n")

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.json({"message": message}, status)


Handler = Callable[[Request], Awaitable[Response]]


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on host:port until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def connection(stream: trio.SocketStream) -> None:
        async with limiter:
            try:
                await _serve_connection(stream, handler)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, connection, [listener])


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    while True:
        request = None
        with trio.move_on_after(IDLE_TIMEOUT):
            request = await _read_request(stream, conn)
        if request is None:
            return
        if isinstance(request, Response):  # a protocol error, already decided
            await _send(stream, conn, request, close=True)
            return
        try:
            response = await handler(request)
        except Exception:
            log.exception("control API handler failed for %s %s", request.method, request.path)
            response = Response.error(500, "internal error")
        await _send(stream, conn, response, close=False)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _read_request(
    stream: trio.SocketStream, conn: h11.Connection
) -> Request | Response | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as err:
            return Response.error(err.error_status_hint, f"bad request: {err}")
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            if not data and head is None:
                return None
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                return Response.error(413, "request body too large")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = head.target.decode("latin-1")
            parts = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            return Request(head.method.decode(), parts.path, query, headers, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(stream: trio.SocketStream, conn: h11.Connection, response: Response,
                *, close: bool) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        # Clash dashboards are web pages served from elsewhere: allow CORS
        # (the bearer secret, not the origin, is the access control).
        ("Access-Control-Allow-Origin", "*"),
        ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
        ("Access-Control-Allow-Methods", "GET, PUT, PATCH, DELETE, OPTIONS"),
        *response.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    try:
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return
    await stream.send_all(data)
