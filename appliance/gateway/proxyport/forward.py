"""The forward proxy's relay: one absolute-URI request's body up, its
response down until the origin closes.

Why not `splice`: the client's bytes after the body belong to a next
request, which this proxy does not serve (appliance/proto/http_proxy.py,
one request per connection), so the up direction stops where the body's
framing (`BodyFramer`) says it ends; the down direction needs no parsing,
because the origin was asked for `Connection: close`.

Owns nothing: the caller closes both streams. How it fails: never by
raising for I/O errors or bad framing; the result says "error" (with the
direction and the cause) or "idle" (no response byte within
`idle_timeout`).
"""

from __future__ import annotations

import trio

from appliance.gateway.splice import FlowRecord, SpliceResult
from appliance.proto.http_connect import HttpConnectError
from appliance.proto.http_proxy import BodyFramer

RECV = 64 * 1024


async def relay_request(
    client: trio.abc.Stream,
    server: trio.abc.Stream,
    framer: BodyFramer,
    flow: FlowRecord,
    idle_timeout: float,
) -> SpliceResult:
    """Relay the rest of one request's body up (no more than its framing
    says) and the response down until the origin closes."""
    result = SpliceResult()
    async with trio.open_nursery() as nursery:

        async def up() -> None:
            try:
                while not framer.done:
                    data = await client.receive_some(RECV)
                    if not data:
                        return
                    n = framer.feed(data)
                    await server.send_all(data[:n])
                    flow.add_up(n)
                    result.up += n
            except HttpConnectError as err:
                result.reason, result.detail = "error", f"up: {err}"
                nursery.cancel_scope.cancel()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
                result.reason, result.detail = "error", f"up: {err!r}"
                nursery.cancel_scope.cancel()

        nursery.start_soon(up)
        try:
            while True:
                with trio.move_on_after(idle_timeout) as idle:
                    data = await server.receive_some(RECV)
                if idle.cancelled_caught:
                    result.reason = "idle"
                    break
                if not data:
                    break
                await client.send_all(data)
                flow.add_down(len(data))
                result.down += len(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            result.reason, result.detail = "error", f"down: {err!r}"
        nursery.cancel_scope.cancel()
    return result
