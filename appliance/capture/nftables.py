"""The nftables capture backend: nft/mirage.nft, filled from the config and applied.

What it owns: exactly one nftables table (`inet mirage` unless told
otherwise) and, through `PolicyRouting`, the fwmark rule and local route that
deliver the captured packets to local sockets. It never lists, changes or
flushes any other table: deleting its table is its flush.

One source of truth, the template. nft/mirage.nft is a plain nft file that a
person who knows nft reads as is; `render_nft(spec)` fills its `${...}`
placeholders with values (Python's `string.Template`: no conditionals, no
loops: what a config leaves out is an empty set, which matches nothing), and
that text is both what `mirage rules -c FILE` prints and what `apply` hands
to libnftables' text interface (`Nftables.cmd`, the library behind `nft
-f`). libnftables applies one buffer as ONE transaction: the leftover of a
crashed run is deleted and the new table built atomically, or nothing
changes. Why not the JSON builder that used to sit next to the template: two
renderings of one ruleset agree only as long as a test compares them, and
the text is the one a person reviews. Runtime changes stay small JSON
commands (`run_commands`): the DIRECT offload's map elements
(capture/offload.py) and the table's removal.

Failures: `CaptureError` for a config the capture cannot express (from
`CaptureSpec`), for a placeholder the template names that the renderer does
not fill, and for a transaction the kernel refuses (nothing is then applied).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from appliance.capture.backend import hold
from appliance.capture.routing import PolicyRouting, apply_routing
from appliance.capture.spec import DNS_PORT, CaptureError, CaptureSpec
from appliance.config.model import Config

log = logging.getLogger(__name__)

DEFAULT_TABLE = "mirage"
FAMILY = "inet"
TEMPLATE = Path(__file__).resolve().parents[2] / "nft" / "mirage.nft"

# Elements the DIRECT offload maps may hold (per family); past it new fake
# IPs simply stay on the userspace path (appliance/capture/offload.py).
OFFLOAD_SIZE = 65536
# Their names, by IP version (appliance/capture/offload.py adds the elements).
OFFLOAD_MAPS = {4: "offload4", 6: "offload6"}

Json = dict[str, Any]


# --- rendering ---------------------------------------------------------------


def _elements(items: Iterable[object]) -> str:
    """A set's `elements = { ... }` line; a comment for an empty set (nft
    refuses an empty element list)."""
    listed = [str(i) for i in items]
    return f"elements = {{ {', '.join(listed)} }}" if listed else "# no elements"


def template_values(spec: CaptureSpec, table: str = DEFAULT_TABLE,
                    capture: bool = True) -> dict[str, str]:
    """The placeholder values nft/mirage.nft is filled with; `capture=False`
    leaves the capture interfaces empty (the eBPF backend's table: the WAN
    wall only)."""
    dns = spec.dns
    lan = [f'"{i}"' for i in spec.lan]
    return {
        "table": table,
        "lan_elements": _elements(lan),
        "capture_lan_elements": _elements(lan if capture else []),
        "served_ports_elements": _elements(spec.served_ports),
        "own_marks_elements": _elements(
            [] if spec.routing_mark is None else [f"{spec.routing_mark:#x}"]),
        "fake4_elements": _elements([spec.fake4]),
        "fake6_elements": _elements([] if spec.fake6 is None else [spec.fake6]),
        "bypass4_elements": _elements(spec.bypass4_collapsed),
        "bypass6_elements": _elements(spec.bypass6_collapsed),
        "hijack4_elements": _elements([DNS_PORT] if dns and dns.addr4 is not None else []),
        "hijack6_elements": _elements([DNS_PORT] if dns and dns.addr6 is not None else []),
        # A family left out keeps a valid (never used) target address.
        "dns4": str(dns.addr4 if dns and dns.addr4 is not None else "0.0.0.0"),
        "dns6": str(dns.addr6 if dns and dns.addr6 is not None else "::"),
        "dns_port": str(dns.port if dns else DNS_PORT),
        "capture_mark": f"{spec.capture_mark:#x}",
        "tproxy_port": str(spec.tproxy_port),
        "offload_size": str(OFFLOAD_SIZE),
        "encrypted_dns_ports_elements": _elements(spec.encrypted_dns_ports),
        "doh_ports_elements": _elements(spec.doh_ports),
        "doh4_elements": _elements(spec.doh4),
        "doh6_elements": _elements(spec.doh6),
    }


def render_nft(cfg: Config | CaptureSpec, table: str = DEFAULT_TABLE,
               template: Path = TEMPLATE, *, capture: bool = True) -> str:
    """The ruleset in nft syntax, from nft/mirage.nft: what `apply` applies
    (loadable with `nft -f`). `capture=False`: the eBPF backend's table."""
    spec = cfg if isinstance(cfg, CaptureSpec) else CaptureSpec.from_config(cfg)
    values = template_values(spec, table, capture)
    try:
        return string.Template(template.read_text()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise CaptureError(f"{template.name}: bad placeholder: {exc}") from exc


def render_text(cfg: Config, table: str = DEFAULT_TABLE) -> str:
    """What `mirage rules -c FILE` prints: the nft ruleset `run` applies,
    then the policy routing as the equivalent `ip` commands (comments, so
    the whole text still loads with `nft -f`)."""
    routing = PolicyRouting.from_config(cfg)
    lines = ["", "# Policy routing (applied with pyroute2; equivalent ip commands):"]
    lines += [f"#   {c}" for c in routing.describe()]
    return render_nft(cfg, table) + "\n".join(lines) + "\n"


def render_remove(table: str = DEFAULT_TABLE) -> list[Json]:
    """The JSON commands that remove Mirage's table, present or not: `add`
    first makes the `delete` valid either way."""
    t = {"table": {"family": FAMILY, "name": table}}
    return [{"add": t}, {"delete": t}]


# --- talking to libnftables -----------------------------------------------------


def _nft() -> Any:
    # Imported here: Debian's bindings load libnftables through ctypes, which
    # `mirage rules` and the unit tests do not need.
    import nftables

    return nftables.Nftables()


def run_text(text: str, what: str) -> None:
    """Apply an nft script (one transaction); CaptureError if refused,
    ImportError without the nftables bindings."""
    rc, _out, err = _nft().cmd(text)
    if rc != 0:
        raise CaptureError(f"nftables refused to {what}: {str(err).strip() or f'rc={rc}'}")


def run_commands(commands: list[Json], what: str) -> None:
    """Apply nftables JSON commands (one transaction); CaptureError if
    refused, ImportError without the nftables bindings."""
    rc, _out, err = _nft().json_cmd({"nftables": commands})
    if rc != 0:
        raise CaptureError(f"nftables refused to {what}: {str(err).strip() or f'rc={rc}'}")


def table_exists(table: str = DEFAULT_TABLE) -> bool:
    """Whether the table is in the kernel (False without nftables bindings)."""
    try:
        rc, _out, _err = _nft().cmd(f"list table {FAMILY} {table}")
    except ImportError:
        return False
    return bool(rc == 0)


def delete_table(table: str = DEFAULT_TABLE) -> None:
    """Delete Mirage's table, present or not (CaptureError if nft refuses;
    ImportError without the nftables bindings)."""
    run_commands(render_remove(table), f"delete table {FAMILY} {table}")


# --- the backend ---------------------------------------------------------------


class NftablesCapture:
    """Applies and removes Mirage's capture (nft table + policy routing).

    Synchronous (netlink calls; pyroute2 runs a private loop): call at setup
    and teardown, or through `trio.to_thread.run_sync`. `apply` replaces any
    leftover of a crashed run; `remove` deletes exactly what `apply` added and
    is safe to call twice. On failure `apply` raises `CaptureError` (the
    kernel refused the transaction, or the policy routing) and leaves nothing
    applied.
    """

    def __init__(self, cfg: Config, table: str = DEFAULT_TABLE) -> None:
        self.cfg = cfg
        self.table = table
        self.routing = PolicyRouting.from_config(cfg)
        # Render before touching anything: a bad config fails here.
        self.ruleset = render_nft(cfg, table)
        self.applied = False

    def apply(self) -> None:
        # Routing first: a packet the rules mark must find the local route.
        apply_routing(self.routing)
        try:
            run_text(self.ruleset, f"apply table {FAMILY} {self.table}")
        except BaseException:
            self.routing.remove()
            raise
        self.applied = True
        log.info(
            "capture: nftables table %s %s applied, fwmark %#x -> table %d",
            FAMILY,
            self.table,
            self.cfg.appliance.capture_mark,
            self.routing.table,
        )

    def remove(self) -> None:
        try:
            delete_table(self.table)
        finally:
            self.routing.remove()
        self.applied = False
        log.info("capture: nftables table %s %s and policy routing removed", FAMILY, self.table)


async def serve(
    cfg: Config,
    table: str = DEFAULT_TABLE,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Apply the capture, report started, hold it until cancelled, remove it.

    Start this last: once it has started, LAN traffic reaches the listeners.
    """
    capture = NftablesCapture(cfg, table)
    await trio.to_thread.run_sync(capture.apply)
    await hold(capture, task_status)


