"""tc attach and detach of the program on the LAN interfaces, with pyroute2.

What it owns: one tc filter per interface (clsact ingress, direct-action,
preference `FILTER_PREF`, handle `FILTER_HANDLE`, name `FILTER_NAME`) and the
clsact qdisc on an interface only where Mirage created it, remembered in a
marker file (`<state-dir>/ebpf-clsact.json`, per network namespace) so that
a run after a crash still knows which qdiscs are its own.

`attach` raises CaptureError (a missing or non-Ethernet interface, a netlink
refusal); `detach` and `remove_leftovers` log and go on. Synchronous:
pyroute2 runs its own loop.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.capture.ebpf.plan import FILTER_HANDLE, FILTER_NAME, FILTER_PREF
from appliance.capture.spec import CaptureError

log = logging.getLogger(__name__)

CLSACT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
CLSACT_EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003
ARPHRD_ETHER = 1
QDISC_MARKER = "ebpf-clsact.json"
# The capture and the kernel DNS answerer attach and detach from worker
# threads that may run at once (a stop cancels both): one at a time, so the
# last one out sees the qdisc empty and removes it.
_LOCK = threading.Lock()


# The kernel DNS answerer's filter (capture/ebpf/answer.py ANSWER_PREF), one
# preference before the capture's: a crashed run may have left either.
ANSWER_PREF = FILTER_PREF - 1
OUR_PREFS = (FILTER_PREF, ANSWER_PREF)


def _is_ours(f: Any, prefs: tuple[int, ...] = OUR_PREFS) -> bool:
    return bool(f.get_attr("TCA_KIND") == "bpf" and (f.get("info", 0) >> 16) in prefs)


def _filters(ipr: IPRoute, idx: int, parent: int) -> list[Any]:
    return list(ipr.get_filters(idx, parent=parent))


def _has_clsact(ipr: IPRoute, idx: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(idx))


def _netns_key() -> str:
    # Several runs (lab namespaces) may share a state dir: the marker keeps
    # each namespace's interfaces apart, keyed by the namespace's inode.
    return str(os.stat("/proc/thread-self/ns/net").st_ino)


def _read_marker(marker: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(marker.read_text())
        return {str(k): [str(n) for n in v] for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _read_created(marker: Path) -> set[str]:
    """Interfaces of this namespace whose clsact qdisc Mirage created (also
    in a crashed run)."""
    return set(_read_marker(marker).get(_netns_key(), []))


def _save_created(marker: Path, names: set[str]) -> None:
    data = _read_marker(marker)
    data.pop(_netns_key(), None)
    if names:
        data[_netns_key()] = sorted(names)
    try:
        if data:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(data) + "\n")
        else:
            marker.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("ebpf: cannot record the clsact qdiscs Mirage created in %s: %s",
                    marker, exc)


def _delete_filter(ipr: IPRoute, idx: int, pref: int = FILTER_PREF) -> bool:
    """Delete Mirage's filter preference `pref` on `idx`'s clsact ingress;
    False if there was none."""
    try:
        ipr.tc("del-filter", "bpf", idx, parent=CLSACT_INGRESS, prio=pref,
               protocol=ETH_P_ALL)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EINVAL):
            return False
        raise
    return True


def interfaces(names: tuple[str, ...]) -> dict[str, int]:
    """name -> ifindex of the LAN interfaces; CaptureError for one that is
    missing or not Ethernet (the program parses Ethernet frames)."""
    out: dict[str, int] = {}
    with IPRoute() as ipr:
        for name in names:
            links = ipr.get_links(ifname=name)
            if not links:
                raise CaptureError(f"appliance.lan: no interface {name!r} here")
            link = links[0]
            if link.get("ifi_type") != ARPHRD_ETHER:
                raise CaptureError(
                    f"appliance.lan: {name} is not an Ethernet interface (link type "
                    f"{link.get('ifi_type')}); the eBPF capture parses Ethernet frames: "
                    "set appliance.redirect: nftables"
                )
            out[name] = int(link["index"])
    return out


def attach(prog_fd: int, ifaces: dict[str, int], marker: Path, attached: list[str], *,
           pref: int = FILTER_PREF, name: str = FILTER_NAME) -> None:
    """Attach `prog_fd` to each interface's clsact ingress (adding the qdisc
    where missing, recorded in `marker`), replacing a leftover filter of a
    crashed run; appends each name to `attached` as it succeeds, so the
    caller can detach after a failure half-way. CaptureError on refusal."""
    with _LOCK:
        _attach(prog_fd, ifaces, marker, attached, pref, name)


def _attach(prog_fd: int, ifaces: dict[str, int], marker: Path, attached: list[str],
            pref: int, name: str) -> None:
    created = _read_created(marker)
    with IPRoute() as ipr:
        for ifname, idx in ifaces.items():
            try:
                if not _has_clsact(ipr, idx):
                    ipr.tc("add", "clsact", idx)
                    created.add(ifname)
                    _save_created(marker, created)
                if _delete_filter(ipr, idx, pref):
                    log.info("ebpf: replaced a leftover Mirage filter on %s", ifname)
                ipr.tc("add-filter", "bpf", idx, FILTER_HANDLE, fd=prog_fd,
                       name=name, parent=CLSACT_INGRESS, classid=1,
                       direct_action=True, prio=pref, protocol=ETH_P_ALL)
            except NetlinkError as exc:
                raise CaptureError(f"tc on {ifname}: {exc}") from exc
            attached.append(ifname)


def detach(names: tuple[str, ...], marker: Path, *, prefs: tuple[int, ...] = (FILTER_PREF,),
           pref: int | None = None) -> None:
    """Delete Mirage's filters (preferences `prefs`, or just `pref`) from each
    interface, and the clsact qdisc where Mirage created it (per `marker`)
    and nothing else uses it. Logs and goes on where the kernel refuses."""
    if pref is not None:
        prefs = (pref,)
    with _LOCK:
        _detach(names, marker, prefs)


def _detach(names: tuple[str, ...], marker: Path, prefs: tuple[int, ...]) -> None:
    created = _read_created(marker)
    try:
        with IPRoute() as ipr:
            for name in names:
                idxs = ipr.link_lookup(ifname=name)
                if not idxs:
                    created.discard(name)
                    continue
                idx = idxs[0]
                try:
                    for p in prefs:
                        _delete_filter(ipr, idx, p)
                    if name in created and _has_clsact(ipr, idx):
                        rest = _filters(ipr, idx, CLSACT_INGRESS) + \
                            _filters(ipr, idx, CLSACT_EGRESS)
                        if not rest:
                            ipr.tc("del", "clsact", idx)
                        elif all(_is_ours(f) for f in rest if f.get_attr("TCA_KIND")):
                            # Mirage's other filter (capture or kernel DNS
                            # answers) is still there: its detach removes
                            # the qdisc, so the marker keeps the name.
                            continue
                        else:
                            log.info("ebpf: keeping the clsact qdisc on %s: %d other "
                                     "filter(s) use it", name, len(rest))
                    created.discard(name)
                except NetlinkError as exc:
                    log.warning("ebpf: detaching from %s failed: %s", name, exc)
    finally:
        _save_created(marker, created)


def remove_leftovers(lan: tuple[str, ...], marker: Path) -> list[str]:
    """Detach a crashed run's filters (and the clsact it created) from the
    `lan` interfaces, without compiling anything; the interfaces it found
    one on. Best effort."""
    try:
        with IPRoute() as ipr:
            found = [n for n in lan for idx in ipr.link_lookup(ifname=n)[:1]
                     if any(_is_ours(f) for f in _filters(ipr, idx, CLSACT_INGRESS))]
    except (OSError, NetlinkError) as exc:
        log.debug("ebpf: leftover check failed: %s", exc)
        return []
    if found:
        log.info("ebpf: removing a leftover Mirage tc filter from %s", ", ".join(found))
        detach(lan, marker, prefs=OUR_PREFS)
    return found
