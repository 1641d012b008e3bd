"""systemd's notify protocol (appliance/systemd.py): datagrams to a real
AF_UNIX socket standing in for systemd, the watchdog's skip-on-failure, and
the DNS STATUS probe against a real loopback UDP responder."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from appliance import systemd
from appliance.config.model import Listen


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_notify_sends_the_state(manager: socket.socket) -> None:
    assert systemd.notify("READY=1")
    assert manager.recv(64) == b"READY=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mirage-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert sock.recv(64) == b"WATCHDOG=1"


def test_no_manager_no_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")


def test_notify_to_a_missing_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not systemd.notify("READY=1")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    assert systemd.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None  # another process's watchdog
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert systemd.watchdog_interval() is None


async def test_watchdog_pings_only_while_alive(manager: socket.socket,
                                               autojump_clock: trio.abc.Clock) -> None:
    answers = iter([True, True, False, False, True])

    async def alive() -> bool:
        await trio.lowlevel.checkpoint()
        return next(answers, True)

    with trio.move_on_after(4.5):
        await systemd.serve_watchdog(alive, 1.0)
    manager.setblocking(False)
    got = []
    while True:
        try:
            got.append(manager.recv(64))
        except BlockingIOError:
            break
    # Rounds at t=0..4: alive, alive, dead, dead, alive.
    assert got == [b"WATCHDOG=1"] * 3


async def test_dns_probe_is_a_status_opcode_and_needs_an_answer() -> None:
    server = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen: list[bytes] = []

    async def answer_once() -> None:
        data, peer = await server.recvfrom(512)
        seen.append(data)
        qid, flags = struct.unpack("!HH", data[:4])
        await server.sendto(struct.pack("!HHHHHH", qid, flags | 0x8004, 0, 0, 0, 0), peer)

    with server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_once)
            assert await systemd.dns_answers(Listen("127.0.0.1", port), wait=2)
        assert (struct.unpack("!H", seen[0][2:4])[0] >> 11) & 0xF == 2  # opcode STATUS
        # Nobody answers now: the probe gives up at its timeout.
        assert not await systemd.dns_answers(Listen("127.0.0.1", port), wait=0.2)


def test_probe_target_of_a_wildcard_listen_is_loopback() -> None:
    assert systemd.probe_target(Listen("0.0.0.0", 53)) == ("127.0.0.1", 53)
    assert systemd.probe_target(Listen("::", 5353)) == ("::1", 5353)
    assert systemd.probe_target(Listen("192.168.56.1", 53)) == ("192.168.56.1", 53)
