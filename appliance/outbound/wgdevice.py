"""The WireGuard interfaces Mirage creates, one per `type: wireguard` proxy.

What it owns, in the namespace `mirage run` runs in (all found again by
name, so a later run or `mirage cleanup` removes a crashed run's):

- the interface `mwg-...` (appliance/proto/wireguard.py `interface_name`),
  with the proxy's keys, peers, addresses and MTU: the kernel's WireGuard
  (`ip link add ... type wireguard`, configured over generic netlink with
  pyroute2) where the kernel has it, else a TUN interface run by
  wireguard-go (Debian's `wireguard-go`, its child process, configured over
  its UAPI socket /var/run/wireguard/<name>.sock). Both are the same to the
  flows: sockets bound to the interface;
- its routing table (`route_table`) with default routes through it, and the
  rules that send there the bound sockets' packets (`oif <interface> lookup
  <table>`) and those from the interface's addresses (`from <address>
  lookup <table>`, which is also where the reverse-path filter finds the
  route of what comes back): the gateway's own routes are never changed.
  Rules are found again by their table (TABLE_BASE .. +0xffff).

The interface's own UDP (the encrypted tunnel) carries SO_MARK
`routing-mark`, like every outbound socket, so the capture never takes it.

Lifetime: `WireguardDevices.ensure(plan)` makes the interface what the plan
says (creating it, or making it anew when the plan changed; an unchanged
one is left alone, so a reload keeps its flows); `retain` removes those no
proxy names any more; `close` removes them all (`mirage run` stopping).
wireguard-go is started with PR_SET_PDEATHSIG, so it (and its TUN
interface) ends with a `mirage run` that was killed; a kernel interface and
the rules stay until `remove_leftovers` (the next run's start, or `mirage
cleanup`).

Synchronous pyroute2 calls run in worker threads (`trio.to_thread`), never
on a flow's path once the interface is up. Failures raise WireguardError
naming the step and the kernel's reason.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.proto.wireguard import (
    RULE_PRIORITY,
    TABLE_BASE,
    UAPI_GET,
    DevicePlan,
    handshake_times,
    is_ours,
    kernel_peer,
    parse_uapi,
    route_table,
    uapi_set,
)

log = logging.getLogger(__name__)

# wireguard-go's control sockets (fixed in wireguard-go; one directory for
# every network namespace, so two namespaces cannot both run a wireguard-go
# interface of the same name).
UAPI_DIR = Path("/var/run/wireguard")
# How long a new wireguard-go may take to open its control socket.
USERSPACE_START_TIMEOUT = 5.0
# Bound on the leftovers removed in one pass (more means something else keeps
# making them).
_MAX_LEFTOVERS = 256
_PR_SET_PDEATHSIG = 1


class WireguardError(Exception):
    """An interface could not be made or configured; says which and why."""


def _families(plan: DevicePlan) -> list[tuple[socket.AddressFamily, str]]:
    out = []
    if 4 in plan.families:
        out.append((socket.AF_INET, "0.0.0.0/0"))
    if 6 in plan.families:
        out.append((socket.AF_INET6, "::/0"))
    return out


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent thread (trio's main
    thread, which lives as long as Mirage) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def uapi_request(ifname: str, request: bytes, timeout: float = 2.0) -> list[tuple[str, str]]:
    """One UAPI exchange with wireguard-go's interface `ifname` (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(UAPI_DIR / f"{ifname}.sock"))
        s.sendall(request)
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return parse_uapi(reply)


@dataclass
class Device:
    """One interface that is up: its plan, and the wireguard-go process
    running it (None: the kernel's)."""

    plan: DevicePlan
    process: subprocess.Popen[bytes] | None = None

    @property
    def kind(self) -> str:
        return "kernel" if self.process is None else "wireguard-go"


@dataclass
class WireguardDevices:
    """The interfaces this process made, by name. One per process (`DEVICES`):
    interfaces are the namespace's, whatever router uses them."""

    devices: dict[str, Device] = field(default_factory=dict)
    _locks: dict[str, trio.Lock] = field(default_factory=dict)
    # ifname -> (when it last failed, why): a failing interface is retried
    # at most every RETRY_AFTER seconds, not on every flow.
    _failed: dict[str, tuple[float, str]] = field(default_factory=dict)
    retry_after: float = 5.0
    # False: never try the kernel (wireguard-go only; tests, and kernels
    # known to lack WireGuard).
    kernel: bool = True
    # Held by `prepare_all` (appliance/outbound/wireguard.py): one reload's
    # bring-up and removal at a time.
    sync_lock: trio.Lock = field(default_factory=trio.Lock)

    async def ensure(self, plan: DevicePlan) -> Device:
        """The interface of `plan`, made (or made anew) if needed."""
        lock = self._locks.setdefault(plan.ifname, trio.Lock())
        async with lock:
            dev = self.devices.get(plan.ifname)
            if dev is not None and dev.plan == plan and _alive(dev):
                return dev
            failed = self._failed.get(plan.ifname)
            if failed is not None and dev is None and \
                    time.monotonic() - failed[0] < self.retry_after:
                raise WireguardError(failed[1])
            if dev is not None:
                del self.devices[plan.ifname]
                await trio.to_thread.run_sync(self._remove, dev)
            try:
                dev = await self._create(plan)
            except WireguardError as err:
                self._failed[plan.ifname] = (time.monotonic(), str(err))
                raise
            self._failed.pop(plan.ifname, None)
            self.devices[plan.ifname] = dev
            peers = ", ".join(p.endpoint_text for p in plan.peers)
            log.info("wireguard: %s up (%s; %s; peer %s)", plan.ifname, dev.kind,
                     " ".join(plan.addresses), peers)
            return dev

    async def retain(self, ifnames: Iterable[str]) -> list[str]:
        """Remove the interfaces not in `ifnames`; returns their names."""
        keep = set(ifnames)
        gone = [name for name in self.devices if name not in keep]
        for name in gone:
            dev = self.devices.pop(name)
            await trio.to_thread.run_sync(self._remove, dev)
            log.info("wireguard: %s removed (no proxy uses it any more)", name)
        return gone

    def close(self) -> None:
        """Remove every interface (synchronous: `mirage run` stopping)."""
        while self.devices:
            _, dev = self.devices.popitem()
            self._remove(dev)

    def handshakes(self, ifname: str) -> dict[str, int]:
        """Each peer's last completed handshake (Unix seconds, 0: never), by
        public key; empty when the interface cannot tell (blocking)."""
        dev = self.devices.get(ifname)
        if dev is None:
            return {}
        try:
            if dev.process is not None:
                return handshake_times(uapi_request(ifname, UAPI_GET))
            return _kernel_handshakes(ifname)
        except Exception as err:  # a diagnostic only: never fail the caller for it
            log.debug("wireguard: %s: reading handshakes failed: %s", ifname, err)
            return {}

    # -- making and removing ---------------------------------------------------

    async def _create(self, plan: DevicePlan) -> Device:
        await trio.to_thread.run_sync(remove_interface, plan.ifname)
        kernel = self.kernel and await trio.to_thread.run_sync(_add_kernel_link, plan.ifname)
        dev = Device(plan) if kernel else Device(plan, await _start_userspace(plan.ifname))
        try:
            await trio.to_thread.run_sync(_configure, dev)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._remove, dev)
            raise
        return dev

    def _remove(self, dev: Device) -> None:
        if dev.process is not None:
            dev.process.terminate()
            try:
                dev.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                dev.process.kill()
                dev.process.wait(timeout=5)
        remove_interface(dev.plan.ifname)


DEVICES = WireguardDevices()


def _alive(dev: Device) -> bool:
    return dev.process is None or dev.process.poll() is None


def _add_kernel_link(ifname: str) -> bool:
    """`ip link add IFNAME type wireguard`: True if the kernel made it,
    False if the kernel has no WireGuard (then wireguard-go runs it)."""
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=ifname, kind="wireguard")
    except NetlinkError as err:
        if err.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
            return False
        raise WireguardError(f"{ifname}: creating the interface failed: {err}") from None
    return True


async def _start_userspace(ifname: str) -> subprocess.Popen[bytes]:
    """wireguard-go running interface `ifname`, its control socket open.
    Started from trio's own thread (PR_SET_PDEATHSIG follows the thread
    that forked, and worker threads come and go)."""
    binary = shutil.which("wireguard-go")
    if binary is None:
        raise WireguardError(f"{ifname}: the kernel has no WireGuard (CONFIG_WIREGUARD) and "
                             "wireguard-go is not installed (Debian: apt-get install "
                             "wireguard-go)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LOG_LEVEL": "error",
           "WG_PROCESS_FOREGROUND": "1"}
    # Its messages go to an unlinked file, read only if it fails to start: a
    # pipe nobody reads would stall it, and a closed one would kill it
    # (SIGPIPE on a Go program's stdout/stderr).
    with tempfile.TemporaryFile() as out:
        try:
            proc = _spawn([binary, "-f", ifname], env, out)
        except OSError as err:
            raise WireguardError(f"{ifname}: starting wireguard-go failed: {err}") from None
        path = UAPI_DIR / f"{ifname}.sock"
        deadline = trio.current_time() + USERSPACE_START_TIMEOUT
        while trio.current_time() < deadline:
            if proc.poll() is not None:
                out.seek(0)
                why = out.read().decode(errors="replace").strip()
                raise WireguardError(f"{ifname}: wireguard-go exited ({proc.returncode}): "
                                     f"{why[-300:] or 'no message'}")
            if path.exists() and await trio.to_thread.run_sync(_answers, ifname):
                return proc
            await trio.sleep(0.02)
        proc.kill()
        proc.wait()
    raise WireguardError(f"{ifname}: wireguard-go did not open {path} within "
                         f"{USERSPACE_START_TIMEOUT:g}s")


def _spawn(argv: list[str], env: dict[str, str], out: Any) -> subprocess.Popen[bytes]:
    """Popen on the calling thread: trio's open_process forks from a worker
    thread, whose exit would fire PR_SET_PDEATHSIG and end the child."""
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                            preexec_fn=_die_with_parent, close_fds=True)


def _answers(ifname: str) -> bool:
    try:
        uapi_request(ifname, UAPI_GET, timeout=0.5)
    except (OSError, ValueError):
        return False
    return True


def _configure(dev: Device) -> None:
    """Keys and peers, addresses, MTU, up, then the table and its rules."""
    plan = dev.plan
    step = "keys and peers"
    try:
        if dev.process is not None:
            uapi_request(plan.ifname, uapi_set(plan))
        else:
            _configure_kernel(plan)
        with IPRoute() as ipr:
            step = "the interface"
            links = ipr.link_lookup(ifname=plan.ifname)
            if not links:
                raise WireguardError(f"{plan.ifname}: the interface vanished while being set up")
            index = links[0]
            for address in plan.addresses:
                addr, prefix = address.split("/")
                ipr.addr("add", index=index, address=addr, prefixlen=int(prefix))
            ipr.link("set", index=index, mtu=plan.mtu, state="up")
            step = f"routing table {plan.table}"
            for family, dst in _families(plan):
                route: dict[str, Any] = {"family": family, "dst": dst, "oif": index,
                                         "table": plan.table}
                if family == socket.AF_INET:
                    route["scope"] = "link"
                ipr.route("replace", **route)
                ipr.rule("add", family=family, priority=RULE_PRIORITY, oifname=plan.ifname,
                         table=plan.table)
            # Traffic from the interface's addresses uses its table too: the
            # reverse-path check of what comes back through the tunnel
            # (rp_filter) finds its route there. After the `oif` rules, so
            # that proxies sharing an address (WARP profiles all say
            # 172.16.0.2) still each use their own interface; strict
            # rp_filter then accepts replies only on the first such one.
            for address in plan.addresses:
                addr = address.split("/")[0]
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                ipr.rule("add", family=family, priority=RULE_PRIORITY + 1, src=addr,
                         src_len=128 if family == socket.AF_INET6 else 32, table=plan.table)
    except (OSError, NetlinkError, ValueError) as err:
        raise WireguardError(f"{plan.ifname}: configuring {step} failed: {err}") from None


def _configure_kernel(plan: DevicePlan) -> None:
    from pyroute2 import WireGuard

    with WireGuard() as wg:
        wg.set(plan.ifname, private_key=plan.private_key, fwmark=plan.fwmark)
        for peer in plan.peers:
            wg.set(plan.ifname, peer=kernel_peer(peer))


def _kernel_handshakes(ifname: str) -> dict[str, int]:
    import base64

    from pyroute2 import WireGuard

    out: dict[str, int] = {}
    with WireGuard() as wg:
        for msg in wg.info(ifname):
            for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
                key = peer.get_attr("WGPEER_A_PUBLIC_KEY")
                when = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                if key is not None:
                    text = key.decode() if isinstance(key, bytes) else str(key)
                    if len(text) != 44:  # raw bytes rather than base64
                        text = base64.b64encode(key).decode()
                    out[text] = int(when.get("tv_sec", 0))
    return out


def describe(plan: DevicePlan) -> list[str]:
    """The equivalent `ip` / `wg` commands of `plan`, for `mirage rules`
    (keys are not shown)."""
    name = plan.ifname
    out = [f"ip link add {name} type wireguard   # or: wireguard-go {name}",
           f"wg set {name} private-key <private-key> fwmark {plan.fwmark:#x}"]
    for peer in plan.peers:
        psk = " preshared-key <pre-shared-key>" if peer.pre_shared_key else ""
        keepalive = (f" persistent-keepalive {peer.persistent_keepalive}"
                     if peer.persistent_keepalive else "")
        out.append(f"wg set {name} peer {peer.public_key}{psk} endpoint {peer.endpoint_text}"
                   f"{keepalive} allowed-ips {','.join(peer.allowed_ips)}")
    out += [f"ip addr add {address} dev {name}" for address in plan.addresses]
    out.append(f"ip link set {name} mtu {plan.mtu} up")
    for family, dst in _families(plan):
        ip = "ip -6" if family == socket.AF_INET6 else "ip"
        out.append(f"{ip} route add {dst} dev {name} table {plan.table}")
        out.append(f"{ip} rule add oif {name} lookup {plan.table} priority {RULE_PRIORITY}")
    for address in plan.addresses:
        ip = "ip -6" if ":" in address else "ip"
        out.append(f"{ip} rule add from {address.split('/')[0]} lookup {plan.table} "
                   f"priority {RULE_PRIORITY + 1}")
    return out


def _is_our_table(table: object) -> bool:
    return isinstance(table, int) and TABLE_BASE <= table <= TABLE_BASE + 0xFFFF


def _delete_rules(ipr: IPRoute, table: int | None) -> list[str]:
    """Delete the rules that look up `table` (None: any of our tables)."""
    removed = []
    for family in (socket.AF_INET, socket.AF_INET6):
        rules = [r for r in ipr.get_rules(family=family)
                 if (r.get("table") == table if table is not None
                     else _is_our_table(r.get("table")))]
        for rule in rules[:_MAX_LEFTOVERS]:
            selector = {k: rule.get(k) for k in ("oifname", "src") if rule.get(k) is not None}
            if "src" in selector:
                selector["src_len"] = rule["src_len"]
            try:
                ipr.rule("del", family=family, priority=rule.get("priority"),
                         table=rule.get("table"), **selector)
            except NetlinkError as err:
                if err.code != errno.ENOENT:
                    raise
                continue
            what = " ".join(f"{'from' if k == 'src' else 'oif'} {v}"
                            for k, v in selector.items() if k != "src_len")
            removed.append(f"ip{' -6' if family == socket.AF_INET6 else ''} rule {what} "
                           f"lookup {rule.get('table')}")
    return removed


def remove_interface(ifname: str) -> list[str]:
    """Delete interface `ifname`, the rules that use its table and a stale
    control socket of it; what was removed (nothing: none was there)."""
    removed: list[str] = []
    with IPRoute() as ipr:
        # Rules first: an interface that is gone has no rules left either.
        removed += _delete_rules(ipr, route_table(ifname))
        for index in ipr.link_lookup(ifname=ifname):
            try:
                ipr.link("del", index=index)
                removed.append(f"interface {ifname}")
            except NetlinkError as err:
                if err.code != errno.ENODEV:
                    raise
    sock = UAPI_DIR / f"{ifname}.sock"
    if sock.exists() and not _answers(ifname):
        # A wireguard-go that died without removing it (in any namespace: the
        # directory is shared, so a live one is never touched).
        sock.unlink(missing_ok=True)
    return removed


def remove_leftovers() -> list[str]:
    """Every interface named like Mirage's (`mwg-...`) in this namespace and
    every rule that looks up one of their tables: what a killed run left
    (`mirage cleanup`, and each run's start). Best effort: a failure is
    logged."""
    try:
        with IPRoute() as ipr:
            names = [link.get("ifname") for link in ipr.get_links()]
    except (OSError, NetlinkError) as err:
        log.warning("wireguard: listing leftovers failed: %s", err)
        return []
    removed: list[str] = []
    for name in sorted(n for n in names if isinstance(n, str) and is_ours(n)):
        try:
            removed += remove_interface(name)
        except (OSError, NetlinkError) as err:
            log.warning("wireguard: removing %s failed: %s", name, err)
    try:
        with IPRoute() as ipr:
            removed += _delete_rules(ipr, None)
    except (OSError, NetlinkError) as err:
        log.warning("wireguard: removing leftover rules failed: %s", err)
    return removed
