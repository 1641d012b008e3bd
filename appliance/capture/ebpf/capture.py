"""The eBPF capture: program + tc filters + policy routing, applied and removed as one.

`EbpfCapture.apply` compiles and loads the program (`Program`), links its
sk_lookup half to the network namespace when given the transparent TCP
listener, applies Mirage's nftables table without capture interfaces (its
input chain is the WAN wall that keeps Mirage's ports off the upstream
side; the same transaction replaces a crashed nftables run's table, so two
captures never run side by side), applies the policy routing and attaches
to each LAN interface; on any failure it undoes what it did and raises CaptureError.
The transparent listener is used through the capture's own duplicate of its
descriptor (taken when the capture is made, on the event loop, closed once
linked or by `release_listener`): `apply` runs in a worker thread that a
SIGTERM does not stop, and meanwhile the TCP service closes its listener,
whose number may then name another file (it once failed the run with
"Socket operation on non-socket").
`remove` detaches exactly its filters, deletes the clsact qdiscs it created
(only while empty), deletes the table, removes the routing, closes the program, and is safe to
call twice. Synchronous (bcc and pyroute2 block): call at setup and
teardown, or through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from appliance.capture.ebpf import tc
from appliance.capture.ebpf.plan import FILTER_PREF, plan
from appliance.capture.ebpf.program import Program
from appliance.capture.nftables import DEFAULT_TABLE, delete_table, render_nft, run_text
from appliance.capture.routing import apply_routing
from appliance.capture.spec import CaptureError
from appliance.config.model import Config

log = logging.getLogger(__name__)


class EbpfCapture:
    """Applies and removes the eBPF capture (program on tc + policy routing)."""

    def __init__(self, cfg: Config, *, table: str = DEFAULT_TABLE,
                 tcp_listener: int | None = None) -> None:
        self.cfg = cfg
        self.plan = plan(cfg)
        self.routing = self.plan.routing
        self.nft_table = table
        self.program: Program | None = None
        self.attached: list[str] = []
        self._marker = cfg.appliance.state_dir / tc.QDISC_MARKER
        # Rendered before touching anything: a bad config fails here.
        self._wall = render_nft(cfg, table, capture=False)
        # Our duplicate of the transparent TCP listener's descriptor (see the
        # module doc); OSError if `tcp_listener` is not open.
        self.links_listener = tcp_listener is not None
        self._listener: int | None = None if tcp_listener is None else os.dup(tcp_listener)

    def release_listener(self) -> None:
        """Close our duplicate of the listener (idempotent; the event loop
        calls it when `apply` never ran, `apply` once the socket is linked)."""
        fd, self._listener = self._listener, None
        if fd is not None:
            os.close(fd)

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
            if self._listener is not None:
                try:
                    self.program.link_sk_lookup(self._listener)
                except OSError as exc:
                    raise CaptureError(f"sk_lookup program: {exc}") from exc
                finally:
                    # The sockmap holds the socket itself from here on.
                    self.release_listener()
            try:
                run_text(self._wall, f"apply the WAN wall (table inet {self.nft_table})")
            except ImportError as exc:
                raise CaptureError(f"the WAN wall needs the nftables bindings ({exc}): "
                                   "apt-get install python3-nftables") from None
            apply_routing(self.routing)
            tc.attach(self.program.fd, ifaces, self._marker, self.attached)
        except BaseException:
            self.remove()
            raise
        log.info("capture: eBPF tc ingress on %s (pref %#x), fwmark %#x -> table %d, "
                 "%snftables table %s for the WAN wall only", ", ".join(self.attached), FILTER_PREF,
                 self.cfg.appliance.capture_mark, self.routing.table,
                 "sk_lookup for the TCP listener, " if self.links_listener else "",
                 self.nft_table)

    def remove(self) -> None:
        self.release_listener()
        try:
            tc.detach(self.plan.interfaces, self._marker)
        finally:
            self.attached.clear()
            _delete_table(self.nft_table)
            self.routing.remove()
            if self.program is not None:
                self.program.close()
                self.program = None
        log.info("capture: eBPF filters, WAN wall and policy routing removed")


def _delete_table(table: str) -> None:
    """Delete the WAN wall's table. Best effort: without nftables bindings
    there is nothing nft could have applied."""
    try:
        delete_table(table)
    except ImportError:
        return
    except CaptureError as exc:
        log.warning("ebpf: could not remove the nftables table %s: %s", table, exc)


def remove_leftovers(cfg: Config) -> list[str]:
    """Detach a crashed eBPF run's filters (and the clsact it created) from
    the LAN interfaces, without compiling anything: the nftables backend
    calls this so the two never capture side by side. Best effort; the
    interfaces it found a filter on."""
    return tc.remove_leftovers(tuple(cfg.appliance.lan),
                               cfg.appliance.state_dir / tc.QDISC_MARKER)
