"""Prometheus metrics: the latency histograms the services observe, and the
exposition of every service's counters (prometheus-client).

Histograms (observed where the time is spent, read by /metrics):
- `mirage_dns_upstream_answer_seconds`: a query forwarded upstream, from
  the DNS service asking to the answer (or SERVFAIL at the deadline);
  fake-IP and local answers never wait and are not in it;
- `mirage_connect_seconds{outbound}`: routing and opening a TCP flow's
  outbound (the rule's target: a proxy, a group or DIRECT), failures too.

Counters and gauges come from the services' `stats()` at scrape time
(`ServiceCollector`). A service counter is a Prometheus counter named
`mirage_<component>_<key>_total` unless its key is in `GAUGE_KEYS` (a level
that goes down: live flows, pool size); counters that were already named
`..._total` keep their name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=False)
DNS_UPSTREAM_SECONDS = Histogram(
    "mirage_dns_upstream_answer_seconds",
    "Time from forwarding a DNS query upstream to the answer (or SERVFAIL at the deadline).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
CONNECT_SECONDS = Histogram(
    "mirage_connect_seconds",
    "Time to route a TCP flow and open its outbound (failures included).",
    ["outbound"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
# CONNECT_SECONDS' child per outbound name, looked up once (`connect_seconds`).
_CONNECT_SECONDS_BY_OUTBOUND: dict[str, Histogram] = {}


def connect_seconds(outbound: str) -> Histogram:
    """`CONNECT_SECONDS` of one outbound: its labelled child, kept here.
    `.labels()` builds a tuple and takes a lock on every call, once per TCP
    flow; children are never removed, so a kept one stays the registered
    one."""
    child = _CONNECT_SECONDS_BY_OUTBOUND.get(outbound)
    if child is None:
        child = _CONNECT_SECONDS_BY_OUTBOUND[outbound] = CONNECT_SECONDS.labels(outbound)
    return child


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Service counters that are levels, not counts since start.
GAUGE_KEYS = frozenset({
    "active", "sessions", "size4", "size6", "capacity4", "capacity6", "in_use", "pinned",
    "pins", "ready", "clients", "loaded", "unbalanced", "offloaded", "per_client", "rate",
    "burst",
})  # fmt: skip

HELP = {
    "uptime_seconds": "Seconds since Mirage started.",
}

Sample = tuple[str, Mapping[str, str], int | float]


class ServiceCollector(Collector):
    """Reads `counters()` (component -> {key: value}) and `series()`
    (labelled samples) at each scrape."""

    def __init__(self, uptime: Callable[[], float],
                 counters: Callable[[], dict[str, Any]],
                 series: Callable[[], Iterator[Sample]]) -> None:
        self.uptime = uptime
        self.counters = counters
        self.series = series

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("mirage_uptime_seconds", HELP["uptime_seconds"],
                                value=self.uptime())
        for component, values in sorted(self.counters().items()):
            for key, value in sorted(values.items()):
                base = f"mirage_{component}_{key}".replace("-", "_").replace(".", "_")
                yield _family(base, key, f"{component} {key.replace('_', ' ')}", value)
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name, labels, value in self.series():
            family = families.get(name)
            if family is None:
                key = name.rsplit("_", 1)[-1]
                family = families[name] = _labelled(name, key, sorted(labels))
            family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()


def _family(base: str, key: str, text: str, value: float) -> Metric:
    if key in GAUGE_KEYS:
        return GaugeMetricFamily(base, f"Mirage {text} (now).", value=value)
    name = base[: -len("_total")] if base.endswith("_total") else base
    return CounterMetricFamily(name, f"Mirage {text} since start.", value=value)


def _labelled(name: str, key: str, labels: list[str]
              ) -> CounterMetricFamily | GaugeMetricFamily:
    if name.endswith("_total"):
        return CounterMetricFamily(name[: -len("_total")], f"{name} since start.", labels=labels)
    return GaugeMetricFamily(name, f"{name} (now).", labels=labels)


def render(collector: ServiceCollector) -> bytes:
    """The exposition text: the histograms and the services' counters."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(collector)
    return generate_latest(REGISTRY) + generate_latest(scrape)

