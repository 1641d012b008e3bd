"""TransparentTcp's relay around a dial that fails, hangs or is closed by the
API, on loopback: a failed or timed-out dial resets the client and is
counted and listed as failed; a flow the API closes while it dials is just
closed (the client sees an orderly end, nothing is listed)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from appliance.config import parse_config
from appliance.flow import Flow
from appliance.gateway.splice import FlowRegistry
from appliance.gateway.tcp import TransparentTcp, accept_loop
from appliance.outbound.base import OutboundError

TIMEOUT = 0.3


class Pool:
    """Every destination is a fake IP of slow.test."""

    def is_fake(self, ip: Any) -> bool:
        return True

    def pin(self, ip: Any) -> str | None:
        return "slow.test"

    def unpin(self, ip: Any) -> None:
        pass


@contextlib.asynccontextmanager
async def relayed_client(dial: Callable[[Flow], Awaitable[trio.abc.Stream]]
                         ) -> AsyncIterator[tuple[FlowRegistry, trio.socket.SocketType]]:
    """A TransparentTcp whose dial is `dial` on a loopback listener, and a
    client connected to it."""
    cfg = parse_config({"tproxy-port": 7893, "appliance": {"connect-timeout": TIMEOUT}})
    registry = FlowRegistry()
    tcp = TransparentTcp(cfg, Pool(), dial, registry)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, listener, tcp.handle, nursery, "tcp")
        client = trio.socket.socket()
        try:
            await client.connect(("127.0.0.1", port))
            yield registry, client
        finally:
            client.close()
            nursery.cancel_scope.cancel()


async def relay_one(dial: Callable[[Flow], Awaitable[trio.abc.Stream]],
                    during: Callable[[FlowRegistry], None] | None = None
                    ) -> tuple[FlowRegistry, str]:
    """One client connection through a TransparentTcp whose dial is `dial`
    (`during`: called once the dial started); what the client saw."""
    dialling = trio.Event()

    async def dial_and_say(flow: Flow) -> trio.abc.Stream:
        dialling.set()
        return await dial(flow)

    async with relayed_client(dial_and_say) as (registry, client):
        if during is not None:
            await dialling.wait()
            during(registry)
        with trio.fail_after(5):
            try:
                seen = "eof" if await client.recv(16) == b"" else "data"
            except ConnectionResetError:
                seen = "reset"
    return registry, seen


async def hang(flow: Flow) -> trio.abc.Stream:
    flow.outbound = "slow"
    await trio.sleep_forever()
    raise AssertionError


async def test_a_dial_past_the_connect_timeout_resets_the_client() -> None:
    start = trio.current_time()
    registry, seen = await relay_one(hang)
    assert seen == "reset"
    assert trio.current_time() - start >= TIMEOUT
    assert (registry.dial_failures, registry.opened, registry.closed, len(registry)) == (1, 1, 1, 0)
    (row,) = registry.failures.snapshot()
    assert row["reason"] == f"no connection within {TIMEOUT:g}s"
    assert row["outbound"] == "slow"


async def test_a_failed_dial_resets_the_client_and_says_why() -> None:
    async def refused(flow: Flow) -> trio.abc.Stream:
        flow.outbound = "slow"
        await trio.lowlevel.checkpoint()
        raise OutboundError("connect to 192.0.2.1 port 80 failed: Connection refused")

    registry, seen = await relay_one(refused)
    assert seen == "reset"
    assert (registry.dial_failures, registry.closed, len(registry)) == (1, 1, 0)
    (row,) = registry.failures.snapshot()
    assert row["reason"] == "connect to 192.0.2.1 port 80 failed: Connection refused"


async def test_a_flow_closed_by_the_api_while_it_dials_just_ends() -> None:
    def close_it(registry: FlowRegistry) -> None:
        (record,) = list(registry)
        assert registry.close_flow(record.id)

    registry, seen = await relay_one(hang, close_it)
    assert seen == "eof"
    assert (registry.dial_failures, registry.closed, len(registry)) == (0, 1, 0)
    assert registry.failures.snapshot() == []


async def test_a_dialled_flow_relays_past_the_connect_timeout() -> None:
    # The connect timeout bounds the dial only: a flow that idles longer
    # once connected goes on.
    server_side: list[trio.SocketStream] = []
    dialled = trio.Event()

    async def pair(flow: Flow) -> trio.abc.Stream:
        flow.outbound = "DIRECT"
        a, b = socket.socketpair()
        server_side.append(trio.SocketStream(trio.socket.from_stdlib_socket(b)))
        dialled.set()
        await trio.lowlevel.checkpoint()
        return trio.SocketStream(trio.socket.from_stdlib_socket(a))

    async def late_answer(registry: FlowRegistry) -> None:
        await trio.sleep(TIMEOUT * 2)
        await server_side[0].send_all(b"late")
        await server_side[0].aclose()

    async with relayed_client(pair) as (registry, client):
        await dialled.wait()
        with trio.fail_after(5):
            await late_answer(registry)
            assert await client.recv(16) == b"late"
            assert await client.recv(16) == b""
    assert (registry.dial_failures, registry.errors, registry.failures.snapshot()) == (0, 0, [])
