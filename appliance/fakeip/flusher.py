"""The service that writes the pool's pending changes to its store.

Every `interval` seconds it takes the pending batch on the trio thread (cheap:
a dict swap) and writes it in a worker thread as one transaction, so queries
never wait for the disk. On cancellation (shutdown) it makes a final flush
inside a shielded scope bounded by `final_timeout`. A failed write is logged
and its rows are put back for the next attempt: the store keeps the state of
the last successful flush, and nothing in memory is lost.

With a ledger (ledger.py) the last thing it does is write the ledger's clean
state, and only if the final flush succeeded (or there is no store): the next
run then knows nothing was lost.
"""

from __future__ import annotations

import logging

import trio

from appliance.fakeip.pool import FakeIPPool

log = logging.getLogger(__name__)


async def flush_once(pool: FakeIPPool, *, abandon_on_cancel: bool = False) -> int:
    """Write the pending batch (if any) off the event loop; return its rows.

    Raises whatever the store raised, after requeueing the batch.
    """
    store = pool.store
    if store is None:
        return 0
    batch = pool.take_pending()
    if not batch:
        return 0
    try:
        await trio.to_thread.run_sync(store.write, batch, abandon_on_cancel=abandon_on_cancel)
    except BaseException:
        pool.requeue(batch)
        raise
    pool.flushed()
    return len(batch)


async def serve(
    pool: FakeIPPool,
    interval: float,
    *,
    final_timeout: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Flush `pool` to its store every `interval` seconds until cancelled.

    Returns at once (after `started`) if the pool has neither a store nor a
    ledger. A shutdown waits at most `final_timeout` for the last writes; if
    the disk does not answer by then the write is abandoned (its transaction
    commits or not, atomically), the store keeps the previous flush and the
    ledger stays unclean.
    """
    if interval <= 0:
        raise ValueError("flush interval must be positive")
    task_status.started()
    if pool.store is None and pool.ledger is None:
        return
    if pool.store is None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.move_on_after(final_timeout) as scope:
                scope.shield = True
                await _close_ledger(pool)
        return
    failures = 0
    try:
        while True:
            await trio.sleep(interval)
            try:
                await flush_once(pool)
            except Exception as exc:
                failures += 1
                # Log the first failure and then every 60th, so a full disk
                # does not flood the log once a second.
                if failures == 1 or failures % 60 == 0:
                    log.warning("fake-IP store write failed (%d in a row): %s", failures, exc)
            else:
                if failures:
                    log.info("fake-IP store writes recovered after %d failures", failures)
                failures = 0
    finally:
        with trio.move_on_after(final_timeout) as scope:
            scope.shield = True
            try:
                await flush_once(pool, abandon_on_cancel=True)
            except Exception as exc:
                log.warning("final fake-IP store write failed: %s", exc)
            else:
                await _close_ledger(pool)
        if scope.cancelled_caught:
            log.warning("final fake-IP store write did not finish in %.1f s", final_timeout)


async def _close_ledger(pool: FakeIPPool) -> None:
    """Mark the ledger clean: everything this run handed out is accounted for."""
    ledger = pool.ledger
    if ledger is None:
        return
    state = pool.ledger_state(clean=True)
    try:
        await trio.to_thread.run_sync(ledger.write, state, abandon_on_cancel=True)
    except OSError as exc:
        log.warning("final fake-IP ledger write failed: %s", exc)
