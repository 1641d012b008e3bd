"""Chooses the capture backend from `appliance.redirect`.

- `nftables`: nft/mirage.nft (TPROXY) + policy routing (capture/nftables.py);
- `ebpf`: bpf/mirage_tc.c on tc ingress + policy routing (capture/ebpf.py);
  if it cannot load, `run` fails with the reason and the fix;
- `auto`: eBPF, and nftables with a warning when eBPF cannot load (no bcc,
  no kernel headers, verifier refusal).

Owns nothing itself: each backend owns what it applies. Before the nftables
backend starts, a crashed eBPF run's tc filters are detached, and the eBPF
backend deletes a crashed nftables run's table, so two captures never run
side by side.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from appliance.capture.spec import CaptureError
from appliance.config.model import Config

log = logging.getLogger(__name__)

__all__ = ["CaptureError", "hold", "remove_all", "render_plan", "serve"]


class Removable(Protocol):
    """An applied capture: `remove()` undoes it (synchronous, safe twice)."""

    def remove(self) -> None: ...


def render_plan(cfg: Config) -> str:
    """What `mirage rules -c FILE` prints: the nftables ruleset, or the eBPF
    plan (for `auto`: the eBPF plan, then the nftables fallback)."""
    from appliance.capture import ebpf, nftables

    mode = cfg.appliance.redirect
    if mode == "nftables":
        return nftables.render_text(cfg)
    if mode == "ebpf":
        return ebpf.render_text(cfg)
    return (
        ebpf.render_text(cfg)
        + "\n# Fallback when the eBPF program cannot load (redirect: auto):\n\n"
        + nftables.render_text(cfg)
    )


async def serve(
    cfg: Config,
    *,
    tcp_listener: int | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Apply the capture `cfg.appliance.redirect` names, report started with
    the capture object (an `EbpfCapture` has `stats()`/`clients()`), hold it
    until cancelled, remove it. Raises CaptureError when it cannot apply.
    `tcp_listener` (the transparent TCP listener's fd) lets the eBPF backend
    hand it SYNs that meet TIME-WAIT sockets (EbpfCapture)."""
    from appliance.capture import ebpf, nftables

    mode = cfg.appliance.redirect
    # A shutdown already under way may have closed the listener whose number
    # `tcp_listener` is: stop here rather than take a copy of a closed fd.
    await trio.lowlevel.checkpoint_if_cancelled()
    if mode in ("ebpf", "auto"):
        # It takes its own copy of the listener's descriptor now, on the
        # event loop: a SIGTERM does not stop the compile's worker thread
        # (it is waited for, then the capture is removed), while the TCP
        # service closes its listener meanwhile.
        capture: Any = ebpf.EbpfCapture(cfg, tcp_listener=tcp_listener)
        try:
            try:
                await trio.to_thread.run_sync(capture.apply)
            finally:
                # `apply` closes it once linked or on failure; still open only
                # if cancelled before the thread started.
                capture.release_listener()
        except CaptureError as err:
            if mode == "ebpf":
                raise
            log.warning("capture: eBPF unavailable (%s); redirect: auto falls back to "
                        "nftables", err)
        else:
            await hold(capture, task_status, capture)
            return
    await trio.to_thread.run_sync(ebpf.remove_leftovers, cfg)
    capture = nftables.NftablesCapture(cfg)
    await trio.to_thread.run_sync(capture.apply)
    await hold(capture, task_status, capture)


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



def remove_all(cfg: Config) -> list[str]:
    """Remove whatever any earlier run of either backend may have left for
    `cfg` (after kill -9, a watchdog abort): the nftables table, Mirage's tc
    filters (and the clsact qdiscs it created), the policy-routing rules and
    routes. Synchronous and best effort (a failure is logged, the rest still
    runs); returns what it removed, for a log line. Never touches anything
    that is not Mirage's (`mirage cleanup -c FILE`)."""
    from appliance.capture import ebpf, nftables
    from appliance.capture.routing import PolicyRouting

    removed: list[str] = []
    if nftables.table_exists():
        try:
            nftables.delete_table()
            removed.append(f"nftables table {nftables.FAMILY} {nftables.DEFAULT_TABLE}")
        except CaptureError as err:
            log.warning("cleanup: %s", err)
    removed += [f"tc filter on {name}" for name in ebpf.remove_leftovers(cfg)]
    try:
        routing = PolicyRouting.from_config(cfg)
    except CaptureError:
        # A DNS target no capture accepts: no run could have applied one.
        return removed
    # Both families: an earlier run may have had IPv6 on.
    routing = PolicyRouting(routing.mark, routing.table, ipv6=True)
    if n := routing.remove():
        removed.append(f"policy routing fwmark {routing.mark:#x} table {routing.table} "
                       f"({n} rules and routes)")
    return removed
