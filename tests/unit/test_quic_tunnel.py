"""The QUIC driver's pieces that need no server: `SharedTunnel` (one live
tunnel per proxy, a lock-free fast path, one connection attempt per wave
of flows) and the TLS exporter's derivation (RFC 8446 7.5) against a
straight transcription of the RFC's formulas."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
import trio
import trio.testing

from appliance.outbound.base import OutboundError
from appliance.outbound.quic import QuicTunnel, SharedTunnel


class FakeTunnel:
    def __init__(self) -> None:
        self.usable = True


def shared(connect: Any) -> SharedTunnel:
    return SharedTunnel(connect)


async def test_the_fast_path_returns_at_once() -> None:
    tunnel = FakeTunnel()

    async def connect() -> Any:
        await trio.lowlevel.checkpoint()
        return tunnel

    s = shared(connect)
    assert await s.get() is tunnel
    coro = s.get()
    with trio.testing.assert_no_checkpoints(), pytest.raises(StopIteration) as done:
        coro.send(None)
    assert done.value.value is tunnel


async def test_one_attempt_serves_every_waiting_flow_and_a_dead_tunnel_is_replaced(
        autojump_clock: trio.abc.Clock) -> None:
    made: list[FakeTunnel] = []

    async def connect() -> Any:
        await trio.sleep(1)
        made.append(FakeTunnel())
        return made[-1]

    s = shared(connect)
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(lambda: _append(got, s.get()))
    assert len(made) == 1 and all(t is made[0] for t in got)
    made[0].usable = False
    assert await s.get() is made[1]


async def _append(out: list[Any], coro: Any) -> None:
    out.append(await coro)


async def test_a_failed_attempt_fails_its_waiters_at_once_then_is_retried(
        autojump_clock: trio.abc.Clock) -> None:
    attempts = 0

    async def connect() -> Any:
        nonlocal attempts
        attempts += 1
        await trio.sleep(5)
        raise OutboundError("hy: QUIC handshake timed out")

    s = shared(connect)
    errors: list[str] = []

    async def one() -> None:
        try:
            await s.get()
        except OutboundError as e:
            errors.append(e.reason)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    assert attempts == 1 and len(errors) == 4
    assert trio.current_time() - start == pytest.approx(5)
    await one()
    assert attempts == 2


def _expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) with SHA-256, from the RFC."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def test_the_exporter_follows_rfc8446() -> None:
    class Schedule:
        from cryptography.hazmat.primitives import hashes
        algorithm = hashes.SHA256()

    class Tls:
        key_schedule = Schedule()

    class Quic:
        tls = Tls()

    tunnel = QuicTunnel.__new__(QuicTunnel)
    tunnel.name = "t"
    tunnel.quic = Quic()  # type: ignore[assignment]
    secret = bytes(range(32))
    tunnel._exporter_secret = secret
    label, context = bytes(range(16)), b"password"
    derived = _expand_label(secret, label, hashlib.sha256(b"").digest(), 32)
    expected = _expand_label(derived, b"exporter", hashlib.sha256(context).digest(), 32)
    assert tunnel.export_keying_material(label, context, 32) == expected
