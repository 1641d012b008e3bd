"""outbound_deadline: a connect's one deadline, and what escapes it becomes
an OutboundError (timeouts, socket errors); a sooner deadline of the
caller's is left to fire and be reported by the caller."""

from __future__ import annotations

import pytest
import trio

from appliance.outbound.base import OutboundError, outbound_deadline


async def test_its_timeout_is_an_outbound_error() -> None:
    with pytest.raises(OutboundError, match=r"x: timed out after 0\.05s") as caught, \
            outbound_deadline(0.05, "x"):
        await trio.sleep(1)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_socket_errors_are_outbound_errors() -> None:
    with pytest.raises(OutboundError, match=r"x: \[Errno 104\] reset"), \
            outbound_deadline(5, "x"):
        await trio.lowlevel.checkpoint()
        raise ConnectionResetError(104, "reset")
    with pytest.raises(OutboundError, match="x: broken"), outbound_deadline(5, "x"):
        raise trio.BrokenResourceError("broken")


async def test_an_inner_timeout_is_one_and_other_errors_pass() -> None:
    with pytest.raises(OutboundError, match="x: timed out after 5s"), outbound_deadline(5, "x"):
        raise trio.TooSlowError
    with pytest.raises(ValueError, match="v"), outbound_deadline(5, "x"):
        raise ValueError("v")


async def test_a_sooner_or_outer_cancel_is_the_callers() -> None:
    with trio.move_on_after(0.05) as sooner, outbound_deadline(5, "x"):
        await trio.sleep(1)
    assert sooner.cancelled_caught
    with trio.CancelScope() as outer, outbound_deadline(5, "x"):
        outer.cancel()
        await trio.sleep(1)
    assert outer.cancelled_caught
    with outbound_deadline(5, "x"):
        await trio.lowlevel.checkpoint()
