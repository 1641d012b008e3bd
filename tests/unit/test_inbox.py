"""The received-bytes buffer of streams on shared connections (SSH
channels, AnyTLS streams): chunks whole, joined or split to the read size,
EOF after the bytes, failure after the bytes, wake-ups."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from appliance.outbound.inbox import Inbox


async def test_reads_take_whole_chunks_join_and_split() -> None:
    box = Inbox()
    a = b"a" * 10
    box.put(a)
    box.put(b"b" * 5)
    box.put(b"c" * 20)
    assert await box.take(16) == a + b"b" * 5
    assert await box.take(8) == b"c" * 8
    assert box.size == 12
    assert await box.take(None) == b"c" * 12
    box.put(a)
    assert await box.take(100) is a  # one chunk that fits: no copy


async def test_eof_and_failure_come_after_the_bytes() -> None:
    box = Inbox()
    box.put(b"x")
    box.end()
    assert await box.take(10) == b"x"
    assert await box.take(10) == b""
    box = Inbox()
    box.put(b"y")
    box.fail("gone")
    assert await box.take(10) == b"y"
    with pytest.raises(trio.BrokenResourceError, match="gone"):
        await box.take(10)


async def test_a_waiting_reader_wakes_on_data() -> None:
    box = Inbox()
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await box.take(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        box.put(b"late")
    assert got == [b"late"]


async def test_a_read_wakes_a_task_waiting_for_room() -> None:
    box = Inbox()
    box.put(b"z" * 100)
    done = trio.Event()

    async def driver() -> None:
        while box.size > 10:
            await box.changed()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        await box.take(95)
    assert done.is_set()
