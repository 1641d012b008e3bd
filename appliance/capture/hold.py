"""How every capture service ends: hold what was applied, remove it on the way out.

Its own module so that the backends (capture/nftables.py, capture/ebpf/) and
the backend choice (capture/backend.py) all use it without importing each
other in a circle. No state; trio only.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio


class Removable(Protocol):
    """An applied capture: `remove()` undoes it (synchronous, safe twice)."""

    def remove(self) -> None: ...


async def hold(capture: Removable, task_status: trio.TaskStatus[Any],
               started: object = None) -> None:
    """Report started (with `started`), hold an applied `capture` until
    cancelled, then remove it (`capture.remove()` in a worker thread). Every
    capture service ends this way: nftables, eBPF and the backend choice."""
    try:
        task_status.started(started)
        await trio.sleep_forever()
    finally:
        # Shielded: removal must run even while the nursery is being cancelled.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(capture.remove)
