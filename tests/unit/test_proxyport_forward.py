"""The forward proxy's one-request relay (appliance/gateway/proxyport/
forward.py) over trio memory streams: no sockets, a virtual clock."""

from __future__ import annotations

import trio
import trio.testing

from appliance.gateway.proxyport.forward import relay_request
from appliance.gateway.splice import FlowRegistry
from appliance.proto.http_proxy import BodyFramer


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    while data := await stream.receive_some(65536):
        out += data
    return out


async def test_body_up_and_response_down_then_nothing_more(autojump_clock: object) -> None:
    client, proxy_client = trio.testing.memory_stream_pair()
    proxy_server, origin = trio.testing.memory_stream_pair()
    flow = FlowRegistry().open("tcp", ("10.0.0.2", 5000), ("198.18.0.1", 80), "a.test")
    got: dict[str, bytes] = {}

    async def play_origin() -> None:
        body = b""
        while len(body) < 5:
            body += await origin.receive_some(65536)
        got["body"] = body
        await origin.send_all(b"HTTP/1.1 200 OK\r\n\r\nhi")
        await origin.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(play_origin)
        # The body, then a pipelined next request that must not go up.
        await client.send_all(b"hel")
        await client.send_all(b"loGET http://b.test/ HTTP/1.1\r\n\r\n")
        result = await relay_request(
            proxy_client, proxy_server, BodyFramer(length=5), flow, idle_timeout=30
        )
        await proxy_client.aclose()
        assert await read_until_eof(client) == b"HTTP/1.1 200 OK\r\n\r\nhi"
    assert got["body"] == b"hello"
    assert (result.reason, result.up, result.down) == ("done", 5, 21)
    assert (flow.up, flow.down) == (5, 21)


async def test_bad_chunked_framing_is_an_error(autojump_clock: object) -> None:
    client, proxy_client = trio.testing.memory_stream_pair()
    proxy_server, _origin = trio.testing.memory_stream_pair()
    flow = FlowRegistry().open("tcp", ("10.0.0.2", 5000), ("198.18.0.1", 80), "a.test")
    await client.send_all(b"zz\r\n")
    result = await relay_request(
        proxy_client, proxy_server, BodyFramer(chunked=True), flow, idle_timeout=30
    )
    assert result.reason == "error" and result.detail.startswith("up: bad chunk size")


async def test_a_silent_origin_ends_idle(autojump_clock: object) -> None:
    _client, proxy_client = trio.testing.memory_stream_pair()
    proxy_server, _origin = trio.testing.memory_stream_pair()
    flow = FlowRegistry().open("tcp", ("10.0.0.2", 5000), ("198.18.0.1", 80), "a.test")
    t0 = trio.current_time()
    result = await relay_request(proxy_client, proxy_server, BodyFramer(), flow, idle_timeout=30)
    assert result.reason == "idle" and trio.current_time() - t0 == 30
