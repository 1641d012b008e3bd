"""What the control API shows, made from the running services.

The composition root hands the API one `Sources` at start (appliance/app.py's
`Appliance` is one): the live config and typed handles on the services the
API reads, None while a service is not running (not configured, or not
started yet: the capture comes up after the API). Every JSON document the
API serves about the running appliance is made here, from those handles:
`status`, `counters`, `series`, `mappings`, `connections`, `resolve`.
Nothing here changes a service; nothing here imports the composition root.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

from dnslib import QTYPE, RCODE, DNSRecord

from appliance import __version__
from appliance.api.clash import connection_doc, rfc3339
from appliance.config.model import Config, IPAddress
from appliance.dns.upstream_api import Upstream, UpstreamError
from appliance.metrics import ServiceCollector
from appliance.outbound.preconnect import STATS as PRECONNECT_STATS

Counters = Mapping[str, int | float]


class Counted(Protocol):
    """A service with counters (`stats()`): the DNS handler, the offload."""

    def stats(self) -> Counters: ...


class Listed(Counted, Protocol):
    """A service with live flows: the TCP flow registry, the UDP gateway."""

    def snapshot(self) -> list[dict[str, Any]]: ...


class Closable(Listed, Protocol):
    """The TCP flow registry and the UDP gateway: their flows can be ended
    by id (DELETE /connections)."""

    def close_flow(self, flow_id: int) -> bool: ...


class Failures(Protocol):
    """The recent failed flows (appliance/failures.py `FailedFlows`)."""

    def snapshot(self) -> list[dict[str, Any]]: ...

    def series(self) -> Iterator[tuple[str, dict[str, str], int]]: ...


class Mappings(Counted, Protocol):
    """The fake-IP pool, as the API reads it."""

    def mappings(self) -> Iterable[tuple[str, IPAddress, int]]: ...

    def lookup(self, domain: str, family: int = 4) -> IPAddress | None: ...


class Limits(Counted, Protocol):
    """The per-client limits (appliance.limits.FairShares)."""

    def top_refused(self) -> Mapping[str, list[dict[str, object]]]: ...


@runtime_checkable
class CaptureCounters(Protocol):
    """A capture that counts (the eBPF backend: totals and per LAN client)."""

    def stats(self) -> Counters: ...

    def clients(self) -> list[dict[str, Any]]: ...


class Sources(Protocol):
    """What the control API reads: the live config, when Mirage started
    (monotonic clock), how often it reloaded, and the services."""

    @property
    def cfg(self) -> Config: ...

    @property
    def started_at(self) -> float: ...

    @property
    def reloads(self) -> int: ...

    @property
    def pool(self) -> Mappings | None: ...

    @property
    def resolver(self) -> Upstream | None: ...

    @property
    def dns_handler(self) -> Counted | None: ...

    @property
    def flows(self) -> Closable | None: ...

    @property
    def udp(self) -> Closable | None: ...

    @property
    def failures(self) -> Failures | None: ...

    @property
    def capture(self) -> object | None: ...

    @property
    def offload(self) -> Counted | None: ...

    @property
    def limits(self) -> Limits | None: ...

    def preconnects(self) -> Mapping[str, Counted]:
        """Each proxy's pool of kept connections, by proxy name."""
        ...

    def wants_fake_ip(self, name: str) -> bool:
        """Would `name` get a fake IP under the live fake-IP filter?"""
        ...


class Controlled(Sources, Protocol):
    """What the control API changes besides reading: the live router's
    outbounds (select groups), the selections it remembers, the providers,
    the configuration (reload, PATCH), and the log records it streams."""

    @property
    def dispatcher(self) -> Any: ...

    @property
    def selections(self) -> Any: ...

    @property
    def api_providers(self) -> Any: ...

    @property
    def log_bus(self) -> Any: ...

    async def reload(self) -> bool:
        """Re-read the configured file; False if it did not load."""
        ...

    async def apply_config(self, new: Config) -> None:
        """Run with `new` (the keys PATCH /configs changes) from now on."""
        ...


def status(src: Sources) -> dict[str, Any]:
    """`/mirage/status`: what runs, where it listens, every counter."""
    cfg = src.cfg
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(time.monotonic() - src.started_at, 3),
        "config": str(cfg.source) if cfg.source else None,
        "reloads": src.reloads,
        "redirect": cfg.appliance.redirect,
        "lan": list(cfg.appliance.lan),
        "dns_listen": str(cfg.dns.listen),
        "tproxy_port": cfg.tproxy_port,
        "mixed_port": cfg.mixed_port,
        "socks_port": cfg.socks_port,
        "http_port": cfg.http_port,
        "counters": {k: dict(v) for k, v in counters(src).items()},
        "clients": capture_clients(src),
        # Queries the kernel answered per client (dns.kernel-answers).
        "kernel_dns_clients": kernel_dns_clients(src),
        # The clients each per-client limit refused most (appliance/limits.py).
        "refused_clients": dict(src.limits.top_refused()) if src.limits is not None else {},
    }


def counters(src: Sources) -> dict[str, Counters]:
    """Each running service's counters, by component name."""
    out: dict[str, Counters] = {}
    if src.pool is not None:
        out["fakeip"] = src.pool.stats()
    if src.dns_handler is not None:
        out["dns"] = src.dns_handler.stats()
    if src.flows is not None:
        out["gateway"] = src.flows.stats()
    if src.udp is not None:
        out["udp"] = src.udp.stats()
    if isinstance(src.capture, CaptureCounters):
        out["capture"] = src.capture.stats()
    # Kernel DNS answers (answered, passed on and why): read through getattr,
    # since only the appliance (not every Sources) runs the answerer.
    kernel_dns = getattr(src, "kernel_dns", None)
    if isinstance(kernel_dns, CaptureCounters):
        out["kernel_dns"] = kernel_dns.stats()
    if src.offload is not None:
        out["offload"] = src.offload.stats()
    if src.limits is not None:
        out["limits"] = src.limits.stats()
    return out


def series(src: Sources) -> Iterator[tuple[str, Mapping[str, str], int | float]]:
    """Labelled metrics: per-client counters where the capture keeps them
    (the eBPF backend counts LAN -> gateway traffic by source), the clients
    each per-client limit refused most (a gauge: a client may leave the top
    list), and each proxy's kept connections (preconnect)."""
    for row in capture_clients(src):
        labels = {"client": row["address"]}
        for key in ("packets", "bytes", "captured_packets", "captured_bytes"):
            yield f"mirage_capture_client_{key}_total", labels, row[key]
    for row in kernel_dns_clients(src):
        yield ("mirage_kernel_dns_client_answered_total", {"client": row["address"]},
               row["answered"])
    if src.limits is not None:
        for limit, rows in src.limits.top_refused().items():
            for refused in rows:
                count = refused["refused"]
                assert isinstance(count, int)
                yield ("mirage_limits_client_refused",
                       {"limit": limit, "client": str(refused["client"])}, count)
    if src.failures is not None:
        yield from src.failures.series()
    # One family at a time: the exposition format wants each metric's
    # samples together.
    stats = {name: pool.stats() for name, pool in src.preconnects().items()}
    for key in PRECONNECT_STATS:
        for name, values in stats.items():
            yield f"mirage_preconnect_{key}", {"proxy": name}, values[key]


def collector(src: Sources) -> ServiceCollector:
    """The Prometheus collector over `src` (appliance/metrics.py)."""
    return ServiceCollector(lambda: time.monotonic() - src.started_at,
                            lambda: counters(src), lambda: series(src))


def kernel_dns_clients(src: Sources) -> list[dict[str, Any]]:
    kernel_dns = getattr(src, "kernel_dns", None)
    return kernel_dns.clients() if isinstance(kernel_dns, CaptureCounters) else []


def capture_clients(src: Sources) -> list[dict[str, Any]]:
    capture = src.capture
    return capture.clients() if isinstance(capture, CaptureCounters) else []


def mappings(src: Sources) -> list[dict[str, Any]]:
    """`/mirage/mappings`: every fake-IP mapping and its pins."""
    pool = src.pool
    if pool is None:
        return []
    return [{"domain": d, "ip": str(ip), "pins": pins} for d, ip, pins in pool.mappings()]


def connections(src: Sources) -> list[dict[str, Any]]:
    """The live TCP flows and UDP sessions."""
    flows = src.flows.snapshot() if src.flows is not None else []
    if src.udp is not None:
        flows += src.udp.snapshot()
    return flows


def failures(src: Sources) -> dict[str, Any]:
    """`/mirage/failures`: the recent flows that failed to connect (or got
    nothing back), newest first, each in mihomo's connection shape (as
    /connections) plus `reason` (the outbound's text, as logged), `kind`
    (its class: appliance/failures.py KINDS) and `failed` (RFC 3339)."""
    rows = src.failures.snapshot() if src.failures is not None else []
    out = []
    for row in reversed(rows):
        doc = connection_doc(row)
        doc.update(reason=row["reason"], kind=row["kind"], failed=rfc3339(row["failed"]))
        out.append(doc)
    return {"failures": out}


async def resolve(src: Sources, name: str, qtype: str) -> dict[str, Any]:
    """`/mirage/resolve`: the real upstream answer for `name`, next to its
    fake-IP mapping. An upstream failure is part of the answer."""
    name = name.rstrip(".").lower()
    mapping: dict[str, str] = {}
    result: dict[str, Any] = {
        "name": name, "type": qtype, "fake_ip": src.wants_fake_ip(name), "mapping": mapping,
    }
    if src.pool is not None:
        for family in (4, 6):
            try:
                ip = src.pool.lookup(name, family)
            except ValueError:
                ip = None
            if ip is not None:
                mapping[f"ipv{family}"] = str(ip)
    if src.resolver is None:
        result["upstream"] = {"error": "no upstream resolver is running"}
        return result
    asked: dict[str, Any] = {}
    plan = getattr(src.resolver, "plan", None)  # the DNS policy's choice (dns/policy.py)
    if plan is not None and qtype in QTYPE.reverse:
        chosen = plan(name, QTYPE.reverse[qtype])
        asked = {"why": chosen.why, "servers": [ns.text or ns.url for ns in chosen.first],
                 "fallback": [ns.text or ns.url for ns in chosen.fallback]}
    try:
        reply = await src.resolver.query(DNSRecord.question(name, qtype))
    except UpstreamError as err:
        result["upstream"] = {"error": str(err)}
    else:
        result["upstream"] = {"rcode": rcode_name(reply), "answers": answer_rows(reply)}
    if asked:
        result["upstream"]["asked"] = asked
    return result


def answer_rows(reply: DNSRecord) -> list[dict[str, Any]]:
    """Resource records of a reply's answer section as plain dicts."""
    return [
        {"name": str(rr.rname).rstrip("."), "type": QTYPE.get(rr.rtype), "ttl": rr.ttl,
         "data": str(rr.rdata)}
        for rr in reply.rr
    ]


def rcode_name(reply: DNSRecord) -> str:
    return str(RCODE.get(reply.header.rcode))
