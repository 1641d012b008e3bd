"""Policy routing for captured packets: `fwmark MARK lookup TABLE` + a local default route.

TPROXY (nft) and `bpf_sk_assign` (tc) hand a packet to a local socket, but the
routing decision still has to deliver it locally although its destination is
not a local address. The kernel's tproxy recipe:

    ip rule add fwmark MARK lookup TABLE
    ip route add local 0.0.0.0/0 dev lo table TABLE
    (and the same for IPv6 with ::/0)

What it owns: the rules with exactly (fwmark MARK, table TABLE) and the local
default route(s) in TABLE. `apply` first removes leftovers of a crashed run
(every rule with that fwmark and table, the routes), then adds one of each;
`remove` deletes them and tolerates their absence. Nothing else is touched.
Shared by both capture backends (nftables, eBPF).

Synchronous: pyroute2 runs its own loop; call at setup/teardown or through
`trio.to_thread.run_sync`. Failures raise pyroute2's `NetlinkError` (an
`OSError`-like with the errno) from `apply`; `remove` logs and goes on.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.config.model import Config

log = logging.getLogger(__name__)

# Bound on deleting duplicate leftover rules (each crashed run could have left
# one per family; more than this means something else keeps adding them).
_MAX_LEFTOVERS = 64


@dataclass(frozen=True)
class PolicyRouting:
    mark: int
    table: int
    ipv6: bool

    @classmethod
    def from_config(cls, cfg: Config) -> PolicyRouting:
        return cls(cfg.appliance.capture_mark, cfg.appliance.route_table, cfg.ipv6)

    @property
    def families(self) -> tuple[tuple[socket.AddressFamily, str], ...]:
        v4 = (socket.AF_INET, "0.0.0.0/0")
        return (v4, (socket.AF_INET6, "::/0")) if self.ipv6 else (v4,)

    def describe(self) -> list[str]:
        """The equivalent `ip` commands, for `mirage rules`."""
        out = []
        for family, dst in self.families:
            ip = "ip -6" if family == socket.AF_INET6 else "ip"
            out.append(f"{ip} rule add fwmark {self.mark:#x} lookup {self.table}")
            out.append(f"{ip} route add local {dst} dev lo table {self.table}")
        return out

    def apply(self) -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            self._clear(ipr, lo)
            try:
                self._add(ipr, lo)
            except BaseException:
                self._clear(ipr, lo)
                raise
        log.info("routing: fwmark %#x -> table %d (local default via lo)", self.mark, self.table)

    def _add(self, ipr: IPRoute, lo: int) -> None:
        for family, dst in self.families:
            ipr.rule("add", family=family, fwmark=self.mark, table=self.table)
            # IPv4 refuses a local route without scope host (EINVAL);
            # iproute2 sets it implicitly, pyroute2 does not.
            ipr.route(
                "replace",
                family=family,
                dst=dst,
                type="local",
                scope="host" if family == socket.AF_INET else "universe",
                oif=lo,
                table=self.table,
                proto="static",
            )

    def remove(self) -> None:
        try:
            with IPRoute() as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                self._clear(ipr, lo)
        except (OSError, NetlinkError) as exc:
            log.warning(
                "routing: removing fwmark %#x table %d failed: %s", self.mark, self.table, exc
            )

    def _clear(self, ipr: IPRoute, lo: int) -> None:
        for family, dst in self.families:
            for _ in range(_MAX_LEFTOVERS):
                try:
                    ipr.rule("del", family=family, fwmark=self.mark, table=self.table)
                except NetlinkError as exc:
                    if exc.code == errno.ENOENT:
                        break
                    raise
            try:
                ipr.route(
                    "del", family=family, dst=dst, type="local", oif=lo, table=self.table
                )
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ESRCH):
                    raise
