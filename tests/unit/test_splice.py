"""splice(): both relay paths (os.splice between sockets, copy loop otherwise),
half-close both ways, idle timeout, errors, accounting.

Socket tests run over loopback TCP (no privileges); the copy path is also run
on trio's in-memory streams with the autojump clock, where time is exact.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from appliance.gateway.splice import FlowRegistry, SpliceResult, abort, can_zero_copy, splice

PAYLOAD = os.urandom(8 * 1024 * 1024 + 12345)  # not a multiple of any chunk size


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected loopback TCP streams."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        a = await trio.open_tcp_stream("127.0.0.1", port)
        b = await listener.accept()
    return a, b


class Rig:
    """client_app <-> [gw_client | splice | gw_server] <-> server_app"""

    def __init__(self) -> None:
        self.client: trio.SocketStream
        self.server: trio.SocketStream
        self.gw_client: trio.SocketStream
        self.gw_server: trio.SocketStream

    async def __aenter__(self) -> Rig:
        self.client, self.gw_client = await tcp_pair()
        self.gw_server, self.server = await tcp_pair()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in (self.client, self.gw_client, self.gw_server, self.server):
            await s.aclose()


async def read_all(stream: trio.abc.ReceiveStream, limit: int = 64 * 1024 * 1024) -> bytes:
    buf = bytearray()
    while len(buf) <= limit:
        data = await stream.receive_some(1 << 20)
        if not data:
            return bytes(buf)
        buf += data
    raise AssertionError("more data than expected")


async def send_and_eof(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    await stream.send_all(data)
    await stream.send_eof()


@pytest.fixture(params=[True, False], ids=["zero-copy", "copy"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Rig, bool]]:
    async with Rig() as r:
        yield r, request.param


async def test_big_payload_both_ways_with_half_close(rig: tuple[Rig, bool]) -> None:
    r, zero_copy = rig
    registry = FlowRegistry()
    flow = registry.open("tcp", ("10.0.0.2", 40000), ("198.18.0.5", 80), "example.com")
    result = SpliceResult()
    reply = PAYLOAD[::-1]
    got: dict[str, bytes] = {}

    async def run_splice() -> None:
        nonlocal result
        result = await splice(
            r.gw_client, r.gw_server, idle_timeout=10, meter=flow, zero_copy=zero_copy
        )

    async def client() -> None:
        # Send everything and half-close; the reply still arrives after.
        async with trio.open_nursery() as n:
            n.start_soon(send_and_eof, r.client, PAYLOAD)
            got["client"] = await read_all(r.client)

    async def server() -> None:
        # The server sees EOF only after the full request (half-close relayed)...
        got["server"] = await read_all(r.server)
        # ...and can still answer on its own half.
        await send_and_eof(r.server, reply)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(run_splice)
            n.start_soon(client)
            n.start_soon(server)

    assert hashlib.sha256(got["server"]).digest() == hashlib.sha256(PAYLOAD).digest()
    assert got["client"] == reply
    assert result.reason == "done", result.detail
    assert result.zero_copy is zero_copy
    assert (result.up, result.down) == (len(PAYLOAD), len(reply))
    assert (flow.up, flow.down) == (len(PAYLOAD), len(reply))
    assert (registry.bytes_up, registry.bytes_down) == (len(PAYLOAD), len(reply))


async def test_server_half_closes_first(rig: tuple[Rig, bool]) -> None:
    r, zero_copy = rig
    results: list[SpliceResult] = []

    async def run_splice() -> None:
        results.append(await splice(r.gw_client, r.gw_server, zero_copy=zero_copy))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(run_splice)
            # Server speaks first and closes its sending half (a banner).
            await send_and_eof(r.server, b"220 banner\r\n")
            assert await read_all(r.client) == b"220 banner\r\n"
            # The client's half is still open: its bytes still reach the server.
            await send_and_eof(r.client, b"QUIT\r\n")
            assert await read_all(r.server) == b"QUIT\r\n"
    assert results[0].reason == "done"
    assert (results[0].up, results[0].down) == (6, 12)


async def test_idle_timeout_on_sockets(rig: tuple[Rig, bool]) -> None:
    r, zero_copy = rig
    results: list[SpliceResult] = []
    idle = 0.3

    async def run_splice() -> None:
        results.append(await splice(r.gw_client, r.gw_server, idle_timeout=idle,
                                    zero_copy=zero_copy))

    start = trio.current_time()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(run_splice)
            # Traffic more often than the timeout keeps the flow alive past it.
            for _ in range(4):
                await r.client.send_all(b"x")
                assert await r.server.receive_some(10) == b"x"
                await trio.sleep(idle / 2)
            # Then silence: the flow ends on its own.
    elapsed = trio.current_time() - start
    assert results[0].reason == "idle"
    assert results[0].up == 4
    assert idle * 2 <= elapsed < idle * 2 + 2


async def test_idle_timeout_exact_on_memory_streams(autojump_clock: trio.abc.Clock) -> None:
    a_user, a_gw = trio.testing.memory_stream_pair()
    b_gw, b_user = trio.testing.memory_stream_pair()
    assert not can_zero_copy(a_gw, b_gw)
    results: list[SpliceResult] = []

    async def run_splice() -> None:
        results.append(await splice(a_gw, b_gw, idle_timeout=300))

    async with trio.open_nursery() as n:
        n.start_soon(run_splice)
        await trio.sleep(299)
        await a_user.send_all(b"ping")  # resets the timer at t=299
        assert await b_user.receive_some(10) == b"ping"
        t0 = trio.current_time()
    assert results[0].reason == "idle"
    assert trio.current_time() - t0 == pytest.approx(300)


async def test_half_closed_flow_ends_after_the_half_close_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The client has sent its request and EOF; the server (a blackholed
    # proxy) never answers: the flow ends 30 s after the last byte, not 300.
    a_user, a_gw = trio.testing.memory_stream_pair()
    b_gw, b_user = trio.testing.memory_stream_pair()
    results: list[SpliceResult] = []

    async def run_splice() -> None:
        results.append(await splice(a_gw, b_gw, idle_timeout=300, half_close_timeout=30))

    async with trio.open_nursery() as n:
        n.start_soon(run_splice)
        await trio.sleep(10)
        await a_user.send_all(b"GET")
        await a_user.send_eof()
        t0 = trio.current_time()
        assert await b_user.receive_some(10) == b"GET"
        assert await b_user.receive_some(10) == b""  # the EOF went through
    assert results[0].reason == "idle" and results[0].detail == "no bytes for 30s"
    assert trio.current_time() - t0 == pytest.approx(30)


async def test_half_closed_flow_that_moves_is_untouched(autojump_clock: trio.abc.Clock) -> None:
    # A long download after the request's EOF: bytes every 20 s (under the
    # 30 s half-close bound) keep it going until the server ends it.
    a_user, a_gw = trio.testing.memory_stream_pair()
    b_gw, b_user = trio.testing.memory_stream_pair()
    results: list[SpliceResult] = []

    async def run_splice() -> None:
        results.append(await splice(a_gw, b_gw, idle_timeout=300, half_close_timeout=30))

    async def download() -> bytes:
        got = b""
        while data := await a_user.receive_some(100):
            got += data
        return got

    async with trio.open_nursery() as n:
        n.start_soon(run_splice)
        await a_user.send_eof()
        for _ in range(20):
            await trio.sleep(20)
            await b_user.send_all(b"x")
        await b_user.send_eof()
        assert await download() == b"x" * 20
    assert results[0].reason == "done" and results[0].down == 20


async def test_relayed_sockets_get_tcp_keepalive() -> None:
    async with Rig() as r, trio.open_nursery() as n:
        n.start_soon(splice, r.gw_client, r.gw_server)
        await trio.sleep(0.1)
        for s in (r.gw_client, r.gw_server):
            assert s.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert s.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
        n.cancel_scope.cancel()


async def test_idle_timeouts_of_different_lengths_end_each_flow_on_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    # One sweeper serves every flow: a short timeout added after a long one
    # must still fire on time (the sweeper wakes earlier), and each flow ends
    # exactly `idle` after its start.
    ended: dict[float, float] = {}

    async def one(idle: float) -> None:
        _user_a, a_gw = trio.testing.memory_stream_pair()
        b_gw, _user_b = trio.testing.memory_stream_pair()
        t0 = trio.current_time()
        result = await splice(a_gw, b_gw, idle_timeout=idle)
        assert result.reason == "idle"
        assert result.detail == f"no bytes for {idle:g}s"
        ended[idle] = trio.current_time() - t0

    async with trio.open_nursery() as n:
        for idle in (300.0, 5.0, 60.0, 1.0):
            n.start_soon(one, idle)
            await trio.sleep(0.5)  # the sweeper is asleep when the next one comes
    assert ended == {idle: pytest.approx(idle) for idle in (300.0, 5.0, 60.0, 1.0)}


async def test_finished_flows_do_not_accumulate_in_the_idle_sweeper() -> None:
    from appliance.gateway import splice as splice_module

    for _ in range(2000):
        a_user, a_gw = trio.testing.memory_stream_pair()
        b_gw, b_user = trio.testing.memory_stream_pair()
        await a_user.send_eof()
        await b_user.send_eof()
        result = await splice(a_gw, b_gw, idle_timeout=300)
        assert result.reason == "done"
    sweeper = splice_module._SWEEPER.get()
    assert len(sweeper._heap) <= 2 * sweeper.PRUNE_MIN + 2


async def test_memory_streams_half_close() -> None:
    a_user, a_gw = trio.testing.memory_stream_pair()
    b_gw, b_user = trio.testing.memory_stream_pair()
    results: list[SpliceResult] = []

    async def run_splice() -> None:
        results.append(await splice(a_gw, b_gw, idle_timeout=5))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(run_splice)
            await send_and_eof(a_user, b"request")
            assert await read_all(b_user) == b"request"
            await send_and_eof(b_user, b"response")
            assert await read_all(a_user) == b"response"
    assert results[0] == SpliceResult("done", "", 7, 8, False)


async def test_reset_on_one_side_ends_the_flow_with_error(rig: tuple[Rig, bool]) -> None:
    r, zero_copy = rig
    results: list[SpliceResult] = []

    async def run_splice() -> None:
        results.append(await splice(r.gw_client, r.gw_server, idle_timeout=10,
                                    zero_copy=zero_copy))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(run_splice)
            await r.client.send_all(b"hello")
            assert await r.server.receive_some(10) == b"hello"
            await abort(r.server)  # RST towards the gateway
    assert results[0].reason == "error"
    assert results[0].detail == "down: ECONNRESET (Connection reset by peer)"


async def test_abort_resets_the_peer() -> None:
    a, b = await tcp_pair()
    await abort(a)
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
        await b.receive_some(10)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    await b.aclose()


def test_registry_counts_and_lists_flows() -> None:
    reg = FlowRegistry()
    f1 = reg.open("tcp", ("10.0.0.2", 1), ("198.18.0.1", 443), "a.example")
    f2 = reg.open("tcp", ("10.0.0.3", 2), ("203.0.113.9", 80), None)
    f1.outbound = "proxy"
    f1.add_up(100)
    f2.add_down(7)
    assert [f["id"] for f in reg.snapshot()] == [f1.id, f2.id]
    assert reg.snapshot()[0]["domain"] == "a.example"
    assert reg.snapshot()[0]["outbound"] == "proxy"
    reg.close(f1, SpliceResult("idle", "", 100, 0, True))
    reg.close(f1)  # twice is harmless
    reg.close(f2, SpliceResult("error", "down: x", 0, 7, False))
    s = reg.stats()
    assert s == {
        "opened": 2, "closed": 2, "bytes_up": 100, "bytes_down": 7, "dial_failures": 0,
        "unmapped": 0, "idle_timeouts": 1, "errors": 1, "zero_copy": 1, "active": 0,
    }
    assert len(reg) == 0 and reg.get(f1.id) is None
