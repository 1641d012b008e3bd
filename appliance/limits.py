"""Fair shares: per-client limits that keep one LAN client from starving the rest.

What this is for: every service that spends a shared resource on behalf of
a LAN client (descriptors for flows, proxy-port connections, upstream DNS
queries in flight, DNS-over-TCP connections, new fake IPs) asks here first.
A client over its share is refused, and counted, while every other client
goes on as before. Sans-I/O: no sockets, no clock of its own (callers pass
`now`), no trio; the services own the refusing.

Who is a client: an IPv4 address, or an IPv6 /64. A device moves between
addresses of its /64 at will (RFC 8981 temporary addresses), so counting
per address would hand one device as many shares as it cares to make up.
IPv4-mapped IPv6 addresses count as their IPv4 address.

Two shapes:

- `ConcurrencyLimit`: how many of a thing a client may hold at once (open
  flows, connections, queries in flight), and how many all clients may
  hold together. `acquire` -> bool, `release` when the thing ends. Memory:
  one dict entry per client that holds something (entries at zero go).
- `RateLimit`: how many of a thing a client may start per second (new fake
  IPs), a token bucket with a burst. Memory: at most `max_clients` buckets;
  the least recently seen client's bucket is forgotten first (a forgotten
  client starts again with a full burst, which errs on the side of serving).

How it fails: it does not; a refusal is an answer, not an error. Counters
(`stats()`) say how often and for whom (the top refused clients), for the
control API and metrics.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused clients listed by `stats()`: the worst few, for an operator.
TOP_REFUSED: Final = 5


def client_key(ip: IPAddress | str) -> str:
    """The client an address belongs to: the IPv4 address itself, or the
    IPv6 /64 (see the module doc)."""
    if isinstance(ip, str):
        # Hot path (a DNS query, a new flow): a socket's IPv4 text is its
        # own key, a v4-mapped one is that text after the prefix.
        if ":" not in ip:
            return ip
        if ip.startswith("::ffff:") and "." in ip:
            return ip[7:]
        addr: IPAddress = ipaddress.ip_address(ip.split("%", 1)[0])
    else:
        addr = ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return f"{ipaddress.IPv6Address(int(addr) >> 64 << 64)}/64"
    return str(addr)


class ConcurrencyLimit:
    """At most `per_client` held at once by one client and `total` by all.

    `acquire(client)` takes one if both limits allow it (True) and counts a
    refusal otherwise (False); `release(client)` gives one back. A release
    without a matching acquire is ignored (counted as `unbalanced`), so a
    caller's double release cannot open room for someone else.
    """

    def __init__(self, per_client: int, total: int) -> None:
        if per_client < 1 or total < 1:
            raise ValueError("limits must be at least 1")
        self.per_client = per_client
        self.total = total
        self._held: dict[str, int] = {}
        self._in_use = 0
        self._refused: Counter[str] = Counter()
        self._refused_total = 0
        self._unbalanced = 0

    def acquire(self, client: str) -> bool:
        held = self._held.get(client, 0)
        if held >= self.per_client or self._in_use >= self.total:
            self._refused[client] += 1
            self._refused_total += 1
            if len(self._refused) > 4 * TOP_REFUSED * 64:
                # Bounded: keep the worst offenders' counts only.
                self._refused = Counter(dict(self._refused.most_common(TOP_REFUSED * 64)))
            return False
        self._held[client] = held + 1
        self._in_use += 1
        return True

    def release(self, client: str) -> None:
        held = self._held.get(client, 0)
        if held <= 0:
            self._unbalanced += 1
            return
        if held == 1:
            del self._held[client]
        else:
            self._held[client] = held - 1
        self._in_use -= 1

    def held(self, client: str) -> int:
        return self._held.get(client, 0)

    def stats(self) -> dict[str, object]:
        return {
            "in_use": self._in_use,
            "clients": len(self._held),
            "per_client": self.per_client,
            "total": self.total,
            "refused": self._refused_total,
            "unbalanced": self._unbalanced,
            "top_refused": [{"client": c, "refused": n}
                            for c, n in self._refused.most_common(TOP_REFUSED)],
        }


class RateLimit:
    """At most `rate` starts per second per client, with bursts of `burst`.

    Token buckets by client, refilled lazily from the `now` the caller
    passes (trio.current_time() in the services, a plain number in tests).
    """

    def __init__(self, rate: float, burst: float, max_clients: int = 65536) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate > 0, burst >= 1 and max_clients >= 1 are required")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        # client -> (tokens, time of the last refill); oldest-seen first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._refused: Counter[str] = Counter()
        self._refused_total = 0

    def allow(self, client: str, now: float) -> bool:
        tokens, then = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self._refused[client] += 1
            self._refused_total += 1
            if len(self._refused) > 4 * TOP_REFUSED * 64:
                self._refused = Counter(dict(self._refused.most_common(TOP_REFUSED * 64)))
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed

    def stats(self) -> dict[str, object]:
        return {
            "rate": self.rate,
            "burst": self.burst,
            "clients": len(self._buckets),
            "refused": self._refused_total,
            "top_refused": [{"client": c, "refused": n}
                            for c, n in self._refused.most_common(TOP_REFUSED)],
        }


# Rough memory one relayed flow costs Mirage (two sockets, kernel buffers at
# rest, the splice's tasks and bookkeeping), measured by bench/gateway.py's
# idle-flow row: 10,000 idle flows took about 203 MB, i.e. ~20 KB each.
FLOW_BYTES: Final = 20_000


def total_flows(memory_bytes: int, fd_limit: int, *, share: float = 0.5,
                reserve_fds: int = 256) -> int:
    """How many flows all clients may hold together: what half of the
    machine's memory pays for (FLOW_BYTES each), and what the descriptor
    limit allows (two per flow: client side and outbound side, after a
    reserve for listeners, the store and the API). At least 64."""
    by_memory = int(memory_bytes * share) // FLOW_BYTES
    by_fds = max(0, fd_limit - reserve_fds) // 2
    return max(64, min(by_memory, by_fds))


@dataclass(frozen=True)
class FairShares:
    """Every per-client limit of one running appliance, each named after the
    refusal it counts (`REASONS`). Built once by the composition root from
    `appliance.limits` (see docs/config.md); the services hold the ones
    they enforce:

    - `flows`: transparent TCP flows and UDP sessions (each costs Mirage a
      descriptor or two), per client and in total (`total_flows`);
    - `proxy`: connections to the proxy ports (mixed/socks/http);
    - `dns_upstream`: DNS queries waiting on the upstream resolver;
    - `dns_tcp`: DNS-over-TCP connections;
    - `fake_ip`: new fake-IP mappings per second (a name already mapped is
      always answered).
    """

    flows: ConcurrencyLimit
    proxy: ConcurrencyLimit
    dns_upstream: ConcurrencyLimit
    dns_tcp: ConcurrencyLimit
    fake_ip: RateLimit

    REASONS: ClassVar[tuple[str, ...]] = ("flows", "proxy", "dns_upstream", "dns_tcp", "fake_ip")

    def stats(self) -> dict[str, int | float]:
        """Flat counters (metrics, `mirage status`): `<reason>_refused` for
        each limit, and what the concurrency limits hold now (`<reason>_in_use`,
        `<reason>_clients`) and allow (`<reason>_per_client`, `_total`)."""
        out: dict[str, int | float] = {}
        for reason in self.REASONS:
            limit: ConcurrencyLimit | RateLimit = getattr(self, reason)
            for key, value in limit.stats().items():
                if isinstance(value, int | float):
                    out[f"{reason}_{key}"] = value
        return out

    def top_refused(self) -> dict[str, list[dict[str, object]]]:
        """The clients refused most often, by limit (at most TOP_REFUSED each;
        limits that refused nobody are left out)."""
        out: dict[str, list[dict[str, object]]] = {}
        for reason in self.REASONS:
            limit: ConcurrencyLimit | RateLimit = getattr(self, reason)
            rows = limit.stats()["top_refused"]
            assert isinstance(rows, list)
            if rows:
                out[reason] = rows
        return out
