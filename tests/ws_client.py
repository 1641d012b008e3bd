"""A websocket client for the API tests, on wsproto over a trio stream
(the dashboards' side of /traffic, /logs, /connections)."""

from __future__ import annotations

import json
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class WsRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"websocket refused with HTTP {status}")
        self.status = status


class WsClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.texts: list[str] = []
        self._partial = ""

    @classmethod
    async def connect(cls, host: str, port: int, target: str,
                      headers: list[tuple[str, str]] | None = None) -> WsClient:
        client = cls(await trio.open_tcp_stream(host, port))
        extra = [(k.encode(), v.encode()) for k, v in headers or []]
        await client.stream.send_all(client.ws.send(
            Request(host=f"{host}:{port}", target=target, extra_headers=extra)))
        while True:
            for event in await client._events():
                if isinstance(event, AcceptConnection):
                    return client
                if isinstance(event, RejectConnection):
                    await client.stream.aclose()
                    raise WsRefused(event.status_code)
                if isinstance(event, RejectData) and event.body_finished:
                    await client.stream.aclose()
                    raise WsRefused(0)

    async def _events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("websocket closed by the server")
        self.ws.receive_data(data)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, TextMessage):
                self._partial += event.data
                if event.message_finished:
                    self.texts.append(self._partial)
                    self._partial = ""
        return events

    async def receive_json(self) -> Any:
        """The next whole text message, decoded."""
        while True:
            if self.texts:
                return json.loads(self.texts.pop(0))
            events = await self._events()
            if any(isinstance(e, CloseConnection) for e in events) and not self.texts:
                raise EOFError("websocket closed by the server")

    async def aclose(self) -> None:
        try:
            await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, Exception):
            pass
        await self.stream.aclose()
