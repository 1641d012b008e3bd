"""The eBPF capture: program + tc filters + policy routing, applied and removed as one.

`EbpfCapture.apply` compiles and loads the program (`Program`), links its
sk_lookup half to the network namespace when given the transparent TCP
listener, deletes a crashed nftables run's table (two captures never run
side by side), applies the policy routing and attaches to each LAN
interface; on any failure it undoes what it did and raises CaptureError.
`remove` detaches exactly its filters, deletes the clsact qdiscs it created
(only while empty), removes the routing, closes the program, and is safe to
call twice. Synchronous (bcc and pyroute2 block): call at setup and
teardown, or through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.capture.ebpf import tc
from appliance.capture.ebpf.plan import FILTER_PREF, plan
from appliance.capture.ebpf.program import Program
from appliance.capture.nftables import DEFAULT_TABLE, delete_table
from appliance.capture.routing import apply_routing
from appliance.capture.spec import CaptureError
from appliance.config.model import Config

log = logging.getLogger(__name__)


class EbpfCapture:
    """Applies and removes the eBPF capture (program on tc + policy routing)."""

    def __init__(self, cfg: Config, *, table: str = DEFAULT_TABLE,
                 tcp_listener: int | None = None) -> None:
        self.cfg = cfg
        self.tcp_listener = tcp_listener  # fd of the transparent TCP listener
        self.plan = plan(cfg)
        self.routing = self.plan.routing
        self.nft_table = table
        self.program: Program | None = None
        self.attached: list[str] = []
        self._marker = cfg.appliance.state_dir / tc.QDISC_MARKER

    # -- counters (control API, metrics) ----------------------------------------

    def stats(self) -> dict[str, int]:
        return self.program.stats() if self.program is not None else {}

    def clients(self) -> list[dict[str, Any]]:
        return self.program.clients() if self.program is not None else []

    # -- lifecycle ------------------------------------------------------------------

    def apply(self) -> None:
        ifaces = tc.interfaces(self.plan.interfaces)
        self.program = Program(self.plan)
        try:
            if self.tcp_listener is not None:
                try:
                    self.program.link_sk_lookup(self.tcp_listener)
                except OSError as exc:
                    raise CaptureError(f"sk_lookup program: {exc}") from exc
            _remove_nft_leftover(self.nft_table)
            apply_routing(self.routing)
            tc.attach(self.program.fd, ifaces, self._marker, self.attached)
        except BaseException:
            self.remove()
            raise
        log.info("capture: eBPF tc ingress on %s (pref %#x), fwmark %#x -> table %d, "
                 "%sno nftables rules", ", ".join(self.attached), FILTER_PREF,
                 self.cfg.appliance.capture_mark, self.routing.table,
                 "sk_lookup for the TCP listener, " if self.tcp_listener is not None else "")

    def remove(self) -> None:
        try:
            tc.detach(self.plan.interfaces, self._marker)
        finally:
            self.attached.clear()
            self.routing.remove()
            if self.program is not None:
                self.program.close()
                self.program = None
        log.info("capture: eBPF filters and policy routing removed")


def _remove_nft_leftover(table: str) -> None:
    """A crashed `redirect: nftables` run may have left its table (TPROXY
    rules that would capture alongside the program): delete it. Best effort:
    without nftables bindings there is nothing nft could have left."""
    try:
        delete_table(table)
    except ImportError:
        return
    except CaptureError as exc:
        log.warning("ebpf: could not remove a leftover nftables table %s: %s", table, exc)


def remove_leftovers(cfg: Config) -> None:
    """Detach a crashed eBPF run's filters (and the clsact it created) from
    the LAN interfaces, without compiling anything: the nftables backend
    calls this so the two never capture side by side. Best effort."""
    tc.remove_leftovers(tuple(cfg.appliance.lan), cfg.appliance.state_dir / tc.QDISC_MARKER)
