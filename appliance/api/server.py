"""The control API's listener: hypercorn's trio worker serving the Starlette
app of appliance/api/routes.py, HTTP/1.1 and websockets.

Owns the listening sockets and the connections accepted on them. hypercorn
speaks HTTP (h11, wsproto, HEAD, chunked streams); what is added here is
the accept loop, so that one client cannot lock the others out:

- per client address at most `PER_CLIENT` connections at once; one more is
  closed at accept, before hypercorn reads a byte (a dashboard holds about
  ten: four websockets and a browser's six HTTP connections);
- a connection that has not sent a request within `IDLE_TIMEOUT` seconds is
  closed (hypercorn's keep-alive timer runs from accept), and a read that
  stalls for `READ_TIMEOUT` seconds ends the connection.

There is no global cap: with one, idle sockets from a few addresses would
lock everyone out again; the descriptor limit (appliance/app.py raises it)
is the bound. hypercorn's access log is off: a request line can carry a
websocket's `?token=`.

How it fails: an address that cannot be bound raises OSError out of
`serve` before `task_status.started`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from appliance.api.routes import build_app
from appliance.api.views import Controlled as Sources

log = logging.getLogger("mirage.api")

PER_CLIENT = 32
IDLE_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
# A graceful stop waits this long for streams (websockets) to end.
GRACEFUL_TIMEOUT = 1.0


def hypercorn_config() -> HypercornConfig:
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = log
    config.keep_alive_timeout = IDLE_TIMEOUT
    config.read_timeout = int(READ_TIMEOUT)
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.h11_max_incomplete_size = 16 * 1024
    config.websocket_ping_interval = 20.0
    return config


class ClientLimit:
    """Connections held per client address (trio thread only)."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self.held: Counter[str] = Counter()
        self.refused = 0

    def take(self, address: str) -> bool:
        if self.held[address] >= self.per_client:
            self.refused += 1
            return False
        self.held[address] += 1
        return True

    def give_back(self, address: str) -> None:
        self.held[address] -= 1
        if self.held[address] <= 0:
            del self.held[address]


async def serve(sources: Sources, host: str, port: int, *,
                task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Serve the control API over `sources` on host:port until cancelled;
    started with the bound listeners."""
    # "::" is every address of both families, as Go's listener takes it
    # in mihomo; "0.0.0.0" stays IPv4 only.
    listeners = await trio.open_tcp_listeners(port, host=None if host in ("", "::") else host)
    app = ASGIWrapper(build_app(sources))  # type: ignore[arg-type]  # ASGI's two spellings
    config = hypercorn_config()
    context = WorkerContext(None)
    limit = ClientLimit(PER_CLIENT)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            peer: Any = stream.socket.getpeername()
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        address = str(peer[0])
        if not limit.take(address):
            log.debug("control API: %s holds %d connections; closing one more",
                      address, PER_CLIENT)
            await trio.aclose_forcefully(stream)
            return
        try:
            await TCPServer(app, config, context, ConnectionState({}),
                            stream).run()  # type: ignore[arg-type]  # plain TCP is served too
        finally:
            limit.give_back(address)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners)
        try:
            await trio.serve_listeners(connection, listeners, handler_nursery=nursery)
        finally:
            # Websocket streams never end by themselves: tell hypercorn's
            # connections to finish and give them a moment.
            await context.terminated.set()
            nursery.cancel_scope.deadline = trio.current_time() + GRACEFUL_TIMEOUT

