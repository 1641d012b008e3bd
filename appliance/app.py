"""The composition root: one nursery owns every service, in start order.

Start order (each `await nursery.start(...)` returns once that service is
bound, so a later step can rely on an earlier one):

1. fake-IP store loaded into the pool (saved mappings outside the range or now
   covered by the filter are dropped), the store flusher;
2. the upstream resolver (DoH client; owns its HTTP/2 connections), the
   signal handler, the router (outbounds + rules);
3. the DNS service (UDP + TCP on `dns.listen`);
4. the transparent TCP listener and UDP socket on `tproxy-port`, the proxy
   ports (`mixed-port`, `socks-port`, `port`);
5. the control API on `external-controller`;
6. the capture last (nftables table or tc/eBPF program, policy routing), so
   no packet is ever steered to a socket that is not listening yet.

Shutdown (SIGINT/SIGTERM) cancels the nursery; services unwind in reverse
order: the capture rules go first (their `finally`), the store's final flush
last. SIGHUP reloads the configuration (see `Appliance.reload`).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

import trio
from dnslib import DNSRecord

from appliance import __version__
from appliance.config import ConfigError, load_config
from appliance.config.model import Config, DnsConfig
from appliance.dns.handler import wants_fake_ip
from appliance.names import DomainMatcher
from appliance.outbound.direct import DirectOutbound
from appliance.outbound.preconnect import MAX_IDLE as PRECONNECT_MAX_IDLE
from appliance.outbound.preconnect import STATS as PRECONNECT_STATS
from appliance.rules.engine import FlowContext

log = logging.getLogger("mirage")


class AppError(Exception):
    """The appliance cannot start or keep running; the message says why and
    what to do about it."""


class Appliance:
    """Owns the services of one `mirage run` and the state the API reads."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started_at = time.monotonic()
        self.reloads = 0
        self.pool: Any = None
        self.store: Any = None
        self.resolver: Any = None
        self.dns_handler: Any = None
        self.router: Any = None
        self.gateway: Any = None
        self.udp: Any = None
        self.capture: Any = None
        self.offload: Any = None  # DirectOffload, with appliance.offload-direct
        self.tcp: Any = None  # the TransparentTcp gateway

    # -- composition ---------------------------------------------------------

    def open_pool(self) -> None:
        from appliance.fakeip.pool import FakeIPPool
        from appliance.fakeip.store import SQLiteStore, store_path

        cfg = self.cfg
        if cfg.store_fake_ip:
            state_dir = cfg.appliance.state_dir
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
                self.store = SQLiteStore(store_path(state_dir))
            except OSError as err:
                raise AppError(f"appliance.state-dir {state_dir}: {err}") from None
        range6 = answer_dns(cfg).fake_ip_range6
        self.pool = FakeIPPool(
            cfg.dns.fake_ip_range, range6, store=self.store, keep=fake_ip_filter(cfg.dns),
        )
        where = f"from {store_path(cfg.appliance.state_dir)}" if cfg.store_fake_ip else "(memory)"
        log.info("fake-IP pool %s%s: %d mappings loaded %s", cfg.dns.fake_ip_range,
                 f" + {range6}" if range6 else "", len(self.pool), where)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from appliance.dns import server as dns_server
        from appliance.dns.handler import DnsHandler
        from appliance.dns.upstream import Resolver
        from appliance.fakeip import flusher

        cfg = self.cfg
        self.open_pool()
        try:
            async with Resolver(cfg.dns, routing_mark=cfg.routing_mark) as resolver, \
                    trio.open_nursery() as nursery:
                self.resolver = resolver
                # Signals first: a SIGTERM during startup still unwinds cleanly.
                await nursery.start(self._handle_signals, nursery.cancel_scope)
                self.build_router(cfg)
                await nursery.start(self._sweep_preconnect)
                await nursery.start(flusher.serve, self.pool, cfg.appliance.store_flush_interval)
                if cfg.dns.enable:
                    self.dns_handler = DnsHandler(answer_dns(cfg), self.pool)
                    await nursery.start(self._serve_dns, dns_server)
                if cfg.tproxy_port:
                    await nursery.start(self._serve_gateway)
                    await nursery.start(self._serve_udp)
                if cfg.mixed_port or cfg.socks_port or cfg.http_port:
                    await nursery.start(self._serve_proxy_ports)
                if cfg.external_controller is not None:
                    from appliance.api import server as api_server

                    ctl = cfg.external_controller
                    await nursery.start(api_server.serve, self, ctl.host, ctl.port)
                    log.info("control API on http://%s", ctl)
                if cfg.appliance.lan:
                    self.capture = await nursery.start(self._serve_capture)
                    if cfg.appliance.offload_direct:
                        await nursery.start(self._serve_offload)
                log.info("mirage %s running (pid %d)", __version__, os.getpid())
                task_status.started()
        finally:
            # After the flusher's final flush (the nursery has exited).
            if self.store is not None:
                self.store.close()

    async def _serve_dns(self, dns_server: Any, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        # With dns-hijack under the eBPF backend, captured queries to other
        # resolvers arrive unrewritten (sk_assign): the socket must be
        # transparent to answer from their address. (Under nftables they are
        # redirected through conntrack, and transparency is harmless.)
        transparent = bool(cfg.appliance.lan and cfg.appliance.dns_hijack)
        try:
            await dns_server.serve(cfg.dns.listen, self.dns_handler, self.resolver,
                                   transparent=transparent, task_status=task_status)
        except OSError as err:
            raise AppError(f"dns.listen {cfg.dns.listen}: cannot bind: {err}") from None

    def build_router(self, cfg: Config) -> None:
        """Outbounds and rules for `cfg`; replaces the router atomically
        (flows already dialled keep their outbound)."""
        from appliance.outbound.build import BuildError, Router, build_outbounds

        try:
            router = Router(cfg, build_outbounds(cfg, self.resolver.resolve_ips))
        except (BuildError, ValueError) as err:
            raise AppError(f"proxies/rules: {err}") from None
        old, self.router = self.router, router
        if old is not None:
            old.close()

    async def _sweep_preconnect(self, *,
                                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                ) -> None:
        """Close proxy connections kept longer than they may wait
        (appliance/outbound/preconnect.py), whatever the traffic; and all of
        them when Mirage stops."""
        task_status.started()
        try:
            while True:
                await trio.sleep(PRECONNECT_MAX_IDLE / 2)
                for pool in self.router.preconnects().values():
                    pool.sweep()
        finally:
            self.router.close()

    async def _serve_gateway(self, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from appliance.gateway.splice import FlowRegistry
        from appliance.gateway.tcp import TransparentTcp

        self.gateway = FlowRegistry()
        self.tcp = TransparentTcp(self.cfg, self.pool, self.dial, self.gateway)
        try:
            await self.tcp.serve(task_status=task_status)
        except OSError as err:
            raise AppError(f"tproxy-port {self.cfg.tproxy_port}: cannot listen: {err}") from None

    async def _serve_udp(self, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The transparent UDP gateway on tproxy-port; `self.udp.stats()` are
        its counters. Sessions read the live router and config (reloads apply
        to new sessions)."""
        from appliance.gateway.udp import UdpGateway
        from appliance.outbound.udp import UdpDialer

        dialer = UdpDialer(lambda: (self.router, self.cfg))
        self.udp = UdpGateway(self.cfg, self.pool, dialer.open)
        try:
            await self.udp.serve(task_status=task_status)
        except OSError as err:
            raise AppError(
                f"tproxy-port {self.cfg.tproxy_port} (udp): cannot bind: {err}") from None

    async def _serve_proxy_ports(self, *,
                                 task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
                                 ) -> None:
        """mixed-port / socks-port / port: SOCKS5 and HTTP proxy for clients
        set up to use one, on LAN and loopback addresses only. TCP flows go
        through `dial` (the live router) and share the gateway's registry
        (/connections); UDP ASSOCIATE uses the shared UDP outbounds."""
        from appliance.gateway import proxyport
        from appliance.gateway.splice import FlowRegistry
        from appliance.outbound.udp import UdpDialer

        if self.gateway is None:
            self.gateway = FlowRegistry()
        udp = UdpDialer(lambda: (self.router, self.cfg))
        try:
            await proxyport.serve(self.cfg, self.pool, self.dial, self.gateway, open_udp=udp.open,
                                  task_status=task_status)
        except (OSError, proxyport.ProxyPortError) as err:
            raise AppError(f"proxy ports (mixed-port/socks-port/port): {err}") from None

    async def dial(self, target: Any) -> Any:
        """Route a captured flow by its rules and connect its outbound."""
        # The transparent listener hands the addresses parsed (dst_addr/src_addr).
        dst = getattr(target, "dst_addr", None)
        src = getattr(target, "src_addr", None)
        ctx = FlowContext(
            domain=target.domain,
            dst_ip=None if target.domain is not None else dst or ip_address(target.dst_ip),
            dst_port=target.dst_port, src_ip=src or ip_address(target.src_ip), network="tcp")
        outbound, by_name = self.router.decide(ctx)
        target.outbound = outbound.name
        stream = await outbound.connect_tcp(target.host, target.dst_port)
        if by_name and self.offload is not None and dst is not None and target.domain:
            self._offer_offload(outbound, target.domain, dst, stream)
        return stream

    def _offer_offload(self, outbound: Any, domain: str, fake: Any, stream: Any) -> None:
        """A DIRECT flow to a fake IP, routed by its name alone: the kernel
        can take the next ones (appliance/capture/offload.py)."""
        if not isinstance(outbound, DirectOutbound) or not self.pool.is_fake(fake):
            return
        kept = outbound.dialer.sticky(domain)
        if kept is None:
            return  # TTL 0: every flow resolves again, nothing to pin down
        real, until = kept
        self.offload.offer(fake, domain, real, until - trio.current_time())

    async def _serve_offload(self, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        from appliance.capture.nftables import NftablesCapture
        from appliance.capture.offload import DirectOffload

        if not isinstance(self.capture, NftablesCapture):
            # redirect: auto chose eBPF (the loader refuses offload with ebpf).
            log.warning("appliance.offload-direct: needs the nftables capture; the eBPF "
                        "backend is running, so every flow stays on the userspace path")
            task_status.started()
            return
        cfg = self.cfg
        self.offload = DirectOffload(
            self.pool, table=self.capture.table, lan=cfg.appliance.lan,
            map6=cfg.ipv6 and cfg.dns.fake_ip_range6 is not None)
        await self.offload.serve(task_status=task_status)

    async def _serve_capture(self, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from appliance.capture import backend

        listeners = self.tcp.listeners if self.tcp is not None else []
        try:
            await backend.serve(self.cfg, task_status=task_status,
                                tcp_listener=listeners[0].socket.fileno() if listeners else None)
        except (OSError, backend.CaptureError) as err:
            raise AppError(f"capture rules: {err}") from None

    # -- signals and reload --------------------------------------------------

    async def _handle_signals(self, scope: trio.CancelScope, *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    scope.cancel()
                    return

    async def reload(self) -> None:
        """Re-read the config file; apply what can change without dropping
        established flows (rules, proxies, fake-IP filter, log level). Keys
        that need a restart are named in the log. A bad file changes nothing."""
        path = self.cfg.source
        if path is None:
            log.warning("SIGHUP: configuration has no file to reload from")
            return
        try:
            new = load_config(path)
        except ConfigError as err:
            log.error("SIGHUP: %s: %s; keeping the running configuration", path, err)
            return
        old = self.cfg
        restart_keys = [
            key for key, a, b in [
                ("dns.listen", old.dns.listen, new.dns.listen),
                ("dns.fake-ip-range", old.dns.fake_ip_range, new.dns.fake_ip_range),
                ("dns.fake-ip-range6", old.dns.fake_ip_range6, new.dns.fake_ip_range6),
                ("dns.nameserver", old.dns.nameserver, new.dns.nameserver),
                ("tproxy-port", old.tproxy_port, new.tproxy_port),
                ("mixed-port", old.mixed_port, new.mixed_port),
                ("socks-port", old.socks_port, new.socks_port),
                ("port", old.http_port, new.http_port),
                ("authentication", old.authentication, new.authentication),
                ("allow-lan", old.allow_lan, new.allow_lan),
                ("bind-address", old.bind_address, new.bind_address),
                ("ipv6", old.ipv6, new.ipv6),
                ("routing-mark", old.routing_mark, new.routing_mark),
                ("external-controller", old.external_controller, new.external_controller),
                ("appliance", old.appliance, new.appliance),
                ("profile.store-fake-ip", old.store_fake_ip, new.store_fake_ip),
            ] if a != b
        ]
        try:
            self.build_router(new)
        except AppError as err:
            log.error("SIGHUP: %s; keeping the running configuration", err)
            return
        if self.dns_handler is not None:
            self.dns_handler.reconfigure(answer_dns(new))
        if self.offload is not None:
            # The new rules may send an offloaded name elsewhere: the kernel
            # forgets them all; the next flow to each offers again.
            await self.offload.clear()
        wanted = fake_ip_filter(new.dns)
        dropped = self.pool.drop(lambda d: not wanted(d))
        logging.getLogger().setLevel(new.log_level.upper() if new.log_level != "silent"
                                     else logging.CRITICAL + 1)
        self.cfg = new
        self.reloads += 1
        log.info("SIGHUP: reloaded %s (rules, proxies, filter; %d mappings dropped by the "
                 "filter)%s", path, dropped,
                 f"; restart needed for: {', '.join(restart_keys)}" if restart_keys else "")

    # -- what the control API reads -------------------------------------------

    def status(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
            "config": str(cfg.source) if cfg.source else None,
            "reloads": self.reloads,
            "redirect": cfg.appliance.redirect,
            "lan": list(cfg.appliance.lan),
            "dns_listen": str(cfg.dns.listen),
            "tproxy_port": cfg.tproxy_port,
            "mixed_port": cfg.mixed_port,
            "socks_port": cfg.socks_port,
            "http_port": cfg.http_port,
            "counters": {k: dict(v) for k, v in self.counters().items()},
            "clients": self.capture_clients(),
        }

    def counters(self) -> Mapping[str, Mapping[str, int | float]]:
        out: dict[str, Mapping[str, int | float]] = {}
        if self.pool is not None:
            out["fakeip"] = self.pool.stats()
        if self.dns_handler is not None:
            out["dns"] = self.dns_handler.stats()
        if self.gateway is not None:
            out["gateway"] = self.gateway.stats()
        if self.udp is not None:
            out["udp"] = self.udp.stats()
        if self.capture is not None and hasattr(self.capture, "stats"):
            out["capture"] = self.capture.stats()
        if self.offload is not None:
            out["offload"] = self.offload.stats()
        return out

    def series(self) -> Iterable[tuple[str, Mapping[str, str], int | float]]:
        """Labelled metrics: per-client counters where the capture keeps
        them (the eBPF backend counts LAN -> gateway traffic by source), and
        each proxy's kept connections (preconnect)."""
        for row in self.capture_clients():
            labels = {"client": row["address"]}
            for key in ("packets", "bytes", "captured_packets", "captured_bytes"):
                yield f"mirage_capture_client_{key}_total", labels, row[key]
        if self.router is not None:
            # One family at a time: the exposition format wants each
            # metric's samples together.
            stats = {name: pool.stats() for name, pool in self.router.preconnects().items()}
            for key in PRECONNECT_STATS:
                for name, values in stats.items():
                    yield f"mirage_preconnect_{key}", {"proxy": name}, values[key]

    def capture_clients(self) -> list[dict[str, Any]]:
        if self.capture is not None and hasattr(self.capture, "clients"):
            rows: list[dict[str, Any]] = self.capture.clients()
            return rows
        return []

    def mappings(self) -> Iterable[tuple[str, Any, int]]:
        return list(self.pool.mappings()) if self.pool is not None else []

    def connections(self) -> list[dict[str, Any]]:
        flows = self.gateway.snapshot() if self.gateway is not None else []
        if self.udp is not None:
            flows += self.udp.snapshot()
        return flows

    async def resolve(self, name: str, qtype: str) -> dict[str, Any]:
        """The real upstream answer for `name`, next to its fake-IP mapping."""
        from appliance.api.server import answer_rows, rcode_name
        from appliance.dns.upstream_api import UpstreamError

        name = name.rstrip(".").lower()
        result: dict[str, Any] = {
            "name": name, "type": qtype,
            "fake_ip": fake_ip_filter(self.cfg.dns)(name),
            "mapping": {},
        }
        if self.pool is not None:
            for family in (4, 6):
                try:
                    ip = self.pool.lookup(name, family)
                except ValueError:
                    ip = None
                if ip is not None:
                    result["mapping"][f"ipv{family}"] = str(ip)
        try:
            reply = await self.resolver.query(DNSRecord.question(name, qtype))
        except UpstreamError as err:
            result["upstream"] = {"error": str(err)}
        else:
            result["upstream"] = {"rcode": rcode_name(reply), "answers": answer_rows(reply)}
        return result


def fake_ip_filter(dns: DnsConfig) -> Callable[[str], bool]:
    """Would a name get a fake IP under `dns.fake-ip-filter` and its mode?
    (Keeps saved mappings only for names the filter still lets through.)"""
    matcher, mode = DomainMatcher(dns.fake_ip_filter), dns.fake_ip_filter_mode
    return lambda name: wants_fake_ip(matcher, mode, name)


def answer_dns(cfg: Config) -> DnsConfig:
    """The DNS settings the handler and pool use: IPv6 fake IPs only when the
    gateway carries IPv6 (`ipv6`, which also turns on the v6 capture rules)
    *and* the DNS answers AAAA (`dns.ipv6`); otherwise a fake AAAA would point
    at an address no rule captures."""
    if cfg.ipv6 and cfg.dns.ipv6:
        return cfg.dns
    return replace(cfg.dns, fake_ip_range6=None)


# The cyclic GC's generation thresholds once running (CPython's default:
# 700, 10, 10). Flows allocate many short-lived objects and leave almost no
# cycles (about one collected object per five connections in a lab run),
# so frequent young collections only cost time: with the default, ~12 us
# per connection went to collections in bench/gateway.py's conn/s run.
GC_THRESHOLDS = (10_000, 20, 10)


def _tune_gc() -> None:
    """Once started: move everything alive (modules, config, rules, the
    loaded fake-IP pool) out of the collector's sight, so full collections
    scan only what came after (gc.freeze, for long-running servers), and
    collect the young generation less often (GC_THRESHOLDS). Reference
    counting still frees everything that is not a cycle, at once."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run_appliance(cfg: Config) -> None:
    """Entry point for `mirage run`: serve until SIGINT/SIGTERM. The
    collector is tuned once every service is up (`_tune_gc`): this process
    is Mirage's alone (tests that run an Appliance in theirs leave it be)."""
    app = Appliance(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        _tune_gc()

