"""DIRECT offload: the kernel forwards fake-IP flows whose route is DIRECT by name alone.

Why: every captured flow costs Mirage an accept, a connect and a splice (the
CPU per new connection that bench/gateway.py measures). For a name whose
every flow goes DIRECT to the same address anyway, nftables can do the
work: translate the fake IP to that address (DNAT; conntrack translates the
replies back) and forward at kernel speed.

How (`appliance.offload-direct`, nftables backend only): after a flow to
fake IP F (name D) was dialled through the DIRECT outbound, when the rules
chose DIRECT by D alone (`RuleSet.decided_by_domain`: no port, client or
transport rule before the match) and the address R it reached is of F's
family, Mirage adds `F : R` to the map offload4/offload6 of its table, with
timeout = what is left of the TTL of the answer R came from (DIRECT keeps
that address for the TTL anyway). The flow that triggered it stays on the
userspace path; new flows to F then never reach Mirage until the element
times out, and the next flow after that resolves again and offers again.
nft/mirage.nft has the rules: the prerouting chain lets new flows to
offloaded fake IPs pass (a UDP session Mirage already relays stays with
it), chain direct_nat translates them, chain fake_guard drops a fake IP
that would be forwarded untranslated (an element that timed out between
the two hooks).

Safety:
- F stays pinned in the fake-IP pool while its element may exist (its
  timeout plus a grace second), so the pool can never give F to another
  name while the kernel still translates it.
- A reload (rules or filter may have changed) flushes both maps and unpins.
- At most `limit` elements per family (the maps' size); past that, flows
  simply stay on the userspace path.
- Never to an address routed out of a LAN interface (a public name that
  resolves to a LAN host): the host would answer the client directly, from
  its own address, not the fake one the client is talking to. Such names
  stay on the userspace path, which relays them.

What an offloaded flow does not get (docs/operations.md): it is not in the
connection list or its byte counters, has no idle timeout of Mirage's,
leaves with the client's own source address (the gateway's NAT, if any,
applies) and without routing-mark, and a dead far end answers the client
itself (RST or ICMP) instead of Mirage's RST.

`OffloadBook` is the bookkeeping (sans-I/O); `DirectOffload` is the trio
service that applies it with nftables JSON commands from a worker thread.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from appliance.capture.nftables import (
    DEFAULT_TABLE,
    FAMILY,
    OFFLOAD_MAPS,
    OFFLOAD_SIZE,
    run_commands,
)
from appliance.capture.spec import CaptureError
from appliance.config.model import IPAddress

log = logging.getLogger(__name__)

# Seconds an entry is kept (and its fake IP pinned) past its kernel timeout:
# the kernel's timeout and ours run on different clocks.
GRACE = 1.0
# No element for an answer with less TTL left than this: not worth a netlink
# round trip, and a 0-second nft timeout means "never expire".
MIN_TIMEOUT = 2
# nft's timeout is a 32-bit millisecond count; a day is plenty.
MAX_TIMEOUT = 86400


@dataclass(frozen=True, slots=True)
class Element:
    """One `fake : real` element to add, `timeout` whole seconds."""

    fake: IPAddress
    real: IPAddress
    timeout: int


class OffloadBook:
    """Which fake IPs are offloaded, until when, and which wait to be added.

    `offer` accepts a candidate (returns False for one already known, of a
    mismatched family, with too little TTL, or past `limit`); the service
    takes `pending()` elements to the kernel and reports those it `added`
    (the others are simply forgotten); `expired(now)` hands back the fake
    IPs whose elements have timed out; `clear()` forgets everything. Times
    are the caller's clock.
    """

    def __init__(self, limit: int = OFFLOAD_SIZE) -> None:
        self.limit = limit
        self._until: dict[IPAddress, float] = {}  # offloaded -> unpin time
        self._live = {4: 0, 6: 0}  # len(_until) by family
        self._heap: list[tuple[float, int, IPAddress]] = []
        self._pending: dict[IPAddress, Element] = {}  # drained every batch: small
        self._seq = 0

    def __contains__(self, fake: IPAddress) -> bool:
        return fake in self._until or fake in self._pending

    def __len__(self) -> int:
        return len(self._until)

    def count(self, version: int) -> int:
        """Offloaded and pending fake IPs of one family."""
        return self._live[version] + sum(1 for f in self._pending if f.version == version)

    def offer(self, fake: IPAddress, real: IPAddress, ttl: float) -> bool:
        if fake in self or fake.version != real.version:
            return False
        if not ttl >= MIN_TIMEOUT or self.count(fake.version) >= self.limit:
            return False
        self._pending[fake] = Element(fake, real, int(min(ttl, MAX_TIMEOUT)))
        return True

    def pending(self) -> list[Element]:
        out = list(self._pending.values())
        self._pending.clear()
        return out

    def added(self, batch: list[Element], now: float) -> None:
        for e in batch:
            until = now + e.timeout + GRACE
            self._until[e.fake] = until
            self._live[e.fake.version] += 1
            self._seq += 1
            heapq.heappush(self._heap, (until, self._seq, e.fake))

    def next_expiry(self) -> float:
        """When `expired` next has something (math.inf: nothing offloaded)."""
        while self._heap and self._until.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # cleared since
        return self._heap[0][0] if self._heap else math.inf

    def expired(self, now: float) -> list[IPAddress]:
        out: list[IPAddress] = []
        while self.next_expiry() <= now:
            _, _, fake = heapq.heappop(self._heap)
            del self._until[fake]
            self._live[fake.version] -= 1
            out.append(fake)
        return out

    def clear(self) -> list[IPAddress]:
        """Forget every entry, pending or added; return their fake IPs."""
        out = [*self._until, *self._pending]
        self._until.clear()
        self._live = {4: 0, 6: 0}
        self._pending.clear()
        self._heap.clear()
        return out


def _routed_via(lan: tuple[str, ...], addresses: set[IPAddress]) -> dict[IPAddress, str]:
    """Those of `addresses` whose route leaves through one of the `lan`
    interfaces, with that interface (a route lookup each, in this network
    namespace). An address with no route is not in the result."""
    if not lan or not addresses:
        return {}
    out: dict[IPAddress, str] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in addresses:
            try:
                routes = ipr.route("get", dst=str(addr))
            except NetlinkError:
                continue
            for route in routes:
                name = names.get(route.get_attr("RTA_OIF"))
                if name in lan:
                    out[addr] = name
    return out


def element_commands(table: str, batch: list[Element]) -> list[dict[str, Any]]:
    """nftables JSON: add each element to its family's map."""
    out: list[dict[str, Any]] = []
    for version, name in OFFLOAD_MAPS.items():
        elems = [[{"elem": {"val": str(e.fake), "timeout": e.timeout}}, str(e.real)]
                 for e in batch if e.fake.version == version]
        if elems:
            out.append({"add": {"element": {"family": FAMILY, "table": table, "name": name,
                                            "elem": elems}}})
    return out


def flush_commands(table: str, map6: bool) -> list[dict[str, Any]]:
    names = [OFFLOAD_MAPS[4], OFFLOAD_MAPS[6]] if map6 else [OFFLOAD_MAPS[4]]
    return [{"flush": {"map": {"family": FAMILY, "table": table, "name": n}}} for n in names]


class DirectOffload:
    """The trio service: `offer` from the dial path (never blocks, never
    raises), `serve` adds pending elements in batches and unpins expired
    ones, `clear` flushes the maps (reload). Owns one pool pin per offered
    fake IP until its entry ends. nft failures are logged and counted; the
    flows concerned stay on the userspace path."""

    def __init__(self, pool: Any, *, table: str = DEFAULT_TABLE, map6: bool = False,
                 lan: tuple[str, ...] = (), limit: int = OFFLOAD_SIZE) -> None:
        self.pool = pool
        self.table = table
        self.map6 = map6  # the table has offload6 (an IPv6 fake range is configured)
        self.lan = lan  # appliance.lan: never offload to an address routed out of one
        # Fake IPs whose address routes out of the LAN -> until when not to
        # ask again (their TTL): a route lookup per flow would be waste.
        self._refused: dict[IPAddress, float] = {}
        self.book = OffloadBook(limit)
        self._wakeup = trio.Event()
        self._lock = trio.Lock()  # one nft batch at a time
        self.offered = 0
        self.failures = 0

    def stats(self) -> dict[str, int]:
        return {"offloaded": len(self.book), "offered": self.offered, "failures": self.failures}

    def offer(self, fake: IPAddress, domain: str, real: IPAddress, ttl: float) -> None:
        """Offload `fake` -> `real` for `ttl` seconds, if the book takes it
        and `fake` still maps to `domain` (pinned from now on)."""
        if fake in self.book:
            return
        refused = self._refused.get(fake)
        if refused is not None:
            if refused > trio.current_time():
                return
            del self._refused[fake]
        mapped = self.pool.pin(fake)  # None: not mapped, and nothing pinned
        if mapped != domain or not self.book.offer(fake, real, ttl):
            # Remapped since the flow started, or the book refused: the pin,
            # if one was taken, belongs to nobody.
            if mapped is not None:
                self.pool.unpin(fake)
            return
        self.offered += 1
        self._wakeup.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        task_status.started()
        try:
            while True:
                with trio.move_on_at(self.book.next_expiry()):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                for fake in self.book.expired(trio.current_time()):
                    self.pool.unpin(fake)
                await self._add_pending()
        finally:
            # The table goes with the capture; only the pins are ours.
            for fake in self.book.clear():
                self.pool.unpin(fake)

    async def _add_pending(self) -> None:
        async with self._lock:
            batch = self.book.pending()
            if not batch:
                return
            via_lan = await trio.to_thread.run_sync(_routed_via, self.lan,
                                                    {e.real for e in batch})
            now = trio.current_time()
            for e in [e for e in batch if e.real in via_lan]:
                log.debug("offload: not %s -> %s: routed out of %s", e.fake, e.real,
                          via_lan[e.real])
                self.pool.unpin(e.fake)
                if len(self._refused) >= self.book.limit:
                    self._refused.clear()
                self._refused[e.fake] = now + e.timeout
            batch = [e for e in batch if e.real not in via_lan]
            if not batch:
                return
            try:
                await trio.to_thread.run_sync(run_commands, element_commands(self.table, batch),
                                              "add DIRECT offload elements")
            except CaptureError as err:
                self.failures += 1
                log.warning("offload: %s; %d fake IP(s) stay on the userspace path",
                            err, len(batch))
                for e in batch:
                    self.pool.unpin(e.fake)
                return
            self.book.added(batch, trio.current_time())
            for e in batch:
                log.debug("offload: %s -> %s for %ds", e.fake, e.real, e.timeout)

    async def clear(self) -> int:
        """Flush the maps and unpin everything (a reload: the rules that
        chose DIRECT may have changed). Returns how many were offloaded."""
        async with self._lock:
            fakes = self.book.clear()
            self._refused.clear()
            try:
                await trio.to_thread.run_sync(run_commands, flush_commands(self.table, self.map6),
                                              "flush the DIRECT offload maps")
            except CaptureError as err:
                self.failures += 1
                log.error("offload: %s", err)
            for fake in fakes:
                self.pool.unpin(fake)
        return len(fakes)
