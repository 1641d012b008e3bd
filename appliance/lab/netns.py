"""Network namespaces, veth links, addresses and routes for the lab (pyroute2).

Owns: the namespaces it is told to create (by name), their links, and the
`/etc/netns/<ns>/` directories that give each namespace its own resolv.conf
(and, for the upstream node, its own user database). Everything here runs at
setup or teardown only, never in a data path.

pyroute2's `IPRoute(netns=...)` forks a helper process per namespace and leaks
its socket pair as a ResourceWarning; instead each namespace's work runs in a
short-lived thread that `setns()`s into it, so one plain `IPRoute()` there
talks to that namespace's kernel tables (network namespaces are per thread).
Failures raise `NetnsError` (or pyroute2's `NetlinkError`) with the namespace
named; callers tear down by name afterwards, so a half-built lab is removable.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from appliance.lab.topology import Node, Topology

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")
IFA_F_NODAD = 0x02

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace operation failed; the message names the namespace."""


def ns_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def create_ns(name: str) -> None:
    """Create the named namespace (`ip netns add`); it must not exist yet."""
    if ns_exists(name):
        raise NetnsError(f"namespace {name} already exists")
    pr_netns.create(name)


def delete_ns(name: str) -> None:
    """Remove the namespace's name (`ip netns del`); a missing one is fine.

    The kernel frees the namespace (and its veth ends, which takes the peers
    with them) once no process is left inside: callers stop processes first.
    """
    if ns_exists(name):
        pr_netns.remove(name)


def in_ns(name: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run `fn()` in a fresh thread that has entered namespace `name`."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
            try:
                pr_netns.setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise NetnsError(f"namespace {name}: operation did not finish in {timeout} s")
    if error:
        raise error[0]
    return result[0]


def pids_in_ns(name: str) -> list[int]:
    """PIDs of processes whose network namespace is `name` (like `ip netns pids`)."""
    try:
        st = os.stat(NETNS_RUN_DIR / name)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            s = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def write_sysctl(key: str, value: str | int) -> None:
    """Write a sysctl of the calling thread's network namespace (call in_ns)."""
    Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")


def read_sysctl(key: str) -> str:
    return Path("/proc/sys", *key.split(".")).read_text().strip()


def write_etc(ns: str, files: dict[str, str], modes: dict[str, int] | None = None) -> Path:
    """Write files into /etc/netns/<ns>/, which `ip netns exec` bind-mounts
    over /etc/<file> for every process it starts in that namespace."""
    d = NETNS_ETC_DIR / ns
    d.mkdir(parents=True, exist_ok=True)
    for fname, text in files.items():
        p = d / fname
        p.write_text(text)
        p.chmod((modes or {}).get(fname, 0o644))
    return d


def remove_etc(ns: str) -> None:
    shutil.rmtree(NETNS_ETC_DIR / ns, ignore_errors=True)


def build(topology: Topology, ns_of: Callable[[str], str]) -> None:
    """Create every node's namespace and wire the topology inside them.

    `ns_of(node_key)` gives a node's namespace name. Nothing is created in the
    root namespace: each veth is created inside one end's namespace with its
    peer placed directly in the other's, so the lab has no link to the host.
    """
    for key in topology.nodes:
        create_ns(ns_of(key))
    # in_ns runs each call to completion before the next: binding the loop
    # variables through partial keeps each call's own values explicit.
    for key, node in topology.nodes.items():
        in_ns(ns_of(key), partial(_prepare_sysctls, node.forwarding, node.rp_filter))
    for link in topology.links:
        peer = partial(_add_veth, link.a.interface, link.b.interface, ns_of(link.b.node))
        in_ns(ns_of(link.a.node), peer)
    for key, node in topology.nodes.items():
        in_ns(ns_of(key), partial(_configure_node, node))


def _prepare_sysctls(forwarding: bool, rp_filter: int | None) -> None:
    # Set before any interface exists: `default` values are copied to new
    # interfaces. DAD off so IPv6 addresses are usable at once (no tentative
    # period in a lab where duplicates cannot happen).
    for scope in ("all", "default"):
        write_sysctl(f"net.ipv6.conf.{scope}.accept_dad", 0)
        write_sysctl(f"net.ipv6.conf.{scope}.dad_transmits", 0)
        if rp_filter is not None:
            write_sysctl(f"net.ipv4.conf.{scope}.rp_filter", rp_filter)
    write_sysctl("net.ipv4.ip_forward", 1 if forwarding else 0)
    write_sysctl("net.ipv6.conf.all.forwarding", 1 if forwarding else 0)


def _add_veth(ifname: str, peer_ifname: str, peer_ns: str) -> None:
    with IPRoute() as ip:
        ip.link(
            "add",
            ifname=ifname,
            kind="veth",
            peer={"ifname": peer_ifname, "net_ns_fd": peer_ns},
        )


def _configure_node(node: Node) -> None:
    with IPRoute() as ip:
        (lo,) = ip.link_lookup(ifname="lo")
        ip.link("set", index=lo, state="up")
        for iface in node.interfaces:
            found = ip.link_lookup(ifname=iface.name)
            if not found:
                raise NetnsError(f"node {node.key}: interface {iface.name} was not created")
            idx = found[0]
            if node.rp_filter is not None:
                write_sysctl(f"net.ipv4.conf.{iface.name}.rp_filter", node.rp_filter)
            for a in iface.addresses:
                kw: dict[str, object] = {}
                if a.version == 6:
                    kw["flags"] = IFA_F_NODAD
                ip.addr(
                    "add",
                    index=idx,
                    address=str(a.ip),
                    prefixlen=a.network.prefixlen,
                    **kw,
                )
            ip.link("set", index=idx, state="up")
        if node.gateway4 is not None:
            ip.route("add", dst="0.0.0.0/0", gateway=str(node.gateway4))
        if node.gateway6 is not None:
            ip.route("add", dst="::/0", gateway=str(node.gateway6), family=10)


def addresses_in(ns: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Addresses configured in namespace `ns` (read back from the kernel)."""

    def read() -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        with IPRoute() as ip:
            return [
                ipaddress.ip_interface(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}")
                for m in ip.get_addr()
            ]

    return in_ns(ns, read)


def delete_all(names: Iterable[str]) -> None:
    """Remove each named namespace and its /etc/netns dir; keeps going past errors."""
    errors = []
    for name in names:
        try:
            delete_ns(name)
        except Exception as e:
            errors.append(f"{name}: {e}")
        with contextlib.suppress(OSError):
            remove_etc(name)
    if errors:
        raise NetnsError("; ".join(errors))
