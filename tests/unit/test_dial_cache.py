"""The dial cache's TTL floor: an upstream answer of TTL 0 still pins the
address that worked for `DIAL_TTL_FLOOR` seconds, so a second DIRECT flow to
the name skips the resolver; past the floor, or once the address stops
answering, the name is resolved again. Real sockets on loopback (a listener
of the test's own), trio's autojump clock for the floor."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import pytest
import trio

from appliance.config.model import IPAddress
from appliance.outbound.base import DIAL_TTL_FLOOR, Dialer

LOOPBACK = ipaddress.ip_address("127.0.0.1")


class TtlZeroResolver:
    """Answers every name with 127.0.0.1 and TTL 0; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, name: str, family: int) -> tuple[list[IPAddress], int]:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        return [LOOPBACK], 0


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


async def test_ttl_zero_resolves_once_for_two_dials(listener: socket.socket) -> None:
    resolve = TtlZeroResolver()
    dialer = Dialer(resolve, None)
    port = listener.getsockname()[1]
    for _ in range(2):
        await (await dialer.dial("www.example.test", port)).aclose()
    assert resolve.calls == 1
    kept = dialer.sticky("www.example.test")
    assert kept is not None and kept[0] == LOOPBACK


async def test_the_floor_ends(listener: socket.socket, autojump_clock: trio.abc.Clock) -> None:
    resolve = TtlZeroResolver()
    dialer = Dialer(resolve, None)
    port = listener.getsockname()[1]
    await (await dialer.dial("www.example.test", port)).aclose()
    await trio.sleep(DIAL_TTL_FLOOR + 1)
    assert dialer.sticky("www.example.test") is None
    await (await dialer.dial("www.example.test", port)).aclose()
    assert resolve.calls == 2
