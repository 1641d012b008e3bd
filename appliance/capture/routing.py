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
`OSError`-like with the errno) from `apply` (`apply_routing` turns it into
a `CaptureError` naming the rule); `remove` logs and goes on.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.capture.spec import CaptureError, dns_hijack
from appliance.config.model import Config

log = logging.getLogger(__name__)

# Bound on deleting duplicate leftover rules (a crashed run leaves one per
# family; more than this means something else keeps adding them).
_MAX_LEFTOVERS = 64


@dataclass(frozen=True)
class PolicyRouting:
    mark: int
    table: int
    ipv6: bool
    # Before `main` (32766), like iproute2's first automatic priority would be.
    priority: int = 32000

    @classmethod
    def from_config(cls, cfg: Config) -> PolicyRouting:
        """IPv6 too while the gateway carries it, or while IPv6 DNS queries
        are hijacked (CaptureError for a DNS target no capture can use)."""
        dns = dns_hijack(cfg)
        ipv6 = cfg.ipv6 or (dns is not None and dns.addr6 is not None)
        return cls(cfg.appliance.capture_mark, cfg.appliance.route_table, ipv6)

    @property
    def families(self) -> tuple[tuple[socket.AddressFamily, str], ...]:
        v4 = (socket.AF_INET, "0.0.0.0/0")
        return (v4, (socket.AF_INET6, "::/0")) if self.ipv6 else (v4,)

    def describe(self) -> list[str]:
        """The equivalent `ip` commands, for `mirage rules`."""
        out = []
        for family, dst in self.families:
            ip = "ip -6" if family == socket.AF_INET6 else "ip"
            out.append(
                f"{ip} rule add fwmark {self.mark:#x} lookup {self.table} priority {self.priority}"
            )
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
            ipr.rule(
                "add", family=family, priority=self.priority, fwmark=self.mark, table=self.table
            )
            ipr.route("replace", **self._route(family, dst, lo), proto="static")

    def _route(self, family: socket.AddressFamily, dst: str, lo: int) -> dict[str, Any]:
        # IPv4 wants scope host on a local route, for adding (EINVAL) and for
        # deleting (ESRCH) alike; iproute2 sets it implicitly, pyroute2 does not.
        return {
            "family": family,
            "dst": dst,
            "type": "local",
            "scope": "host" if family == socket.AF_INET else "universe",
            "oif": lo,
            "table": self.table,
        }

    def remove(self) -> int:
        """Delete the rules and routes; how many there were (0 when the
        kernel refused: logged)."""
        try:
            with IPRoute() as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                return self._clear(ipr, lo)
        except (OSError, NetlinkError) as exc:
            log.warning(
                "routing: removing fwmark %#x table %d failed: %s", self.mark, self.table, exc
            )
            return 0

    def _clear(self, ipr: IPRoute, lo: int) -> int:
        removed = 0
        for family, dst in self.families:
            # By exact priority: a delete without one matches only pyroute2's
            # default priority, and a leftover added by hand (`ip rule add`)
            # has another.
            ours = [
                r.get("priority")
                for r in ipr.get_rules(family=family)
                if r.get("fwmark") == self.mark and r.get("table") == self.table
            ]
            for priority in ours[:_MAX_LEFTOVERS]:
                try:
                    ipr.rule(
                        "del", family=family, priority=priority, fwmark=self.mark, table=self.table
                    )
                    removed += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:
                        raise
            try:
                ipr.route("del", **self._route(family, dst, lo))
                removed += 1
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ESRCH):
                    raise
        return removed


def apply_routing(routing: PolicyRouting) -> None:
    """Apply `routing`; the kernel's refusal as CaptureError naming the rule.
    Both capture backends apply their policy routing this way."""
    try:
        routing.apply()
    except (OSError, NetlinkError) as exc:
        raise CaptureError(
            f"policy routing (fwmark {routing.mark:#x} table {routing.table}): {exc}"
        ) from exc
