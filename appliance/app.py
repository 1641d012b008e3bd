"""The composition root: one nursery owns every service, in start order.

Start order (each `await nursery.start(...)` returns once that service is
bound, so a later step can rely on an earlier one):

1. fake-IP store loaded into the pool (saved mappings outside the range or now
   covered by the filter are dropped), the store flusher;
2. the upstream resolver (DoH client; owns its HTTP/2 connections), the
   signal handler, the dispatcher (appliance/routing.py: the live router,
   outbounds + rules; it sweeps the proxies' kept connections);
3. the DNS service (UDP + TCP on `dns.listen`);
4. the transparent TCP listener and UDP socket on `tproxy-port`, the proxy
   ports (`mixed-port`, `socks-port`, `port`);
5. the control API on `external-controller`;
6. the capture last (nftables table or tc/eBPF program, policy routing), so
   no packet is ever steered to a socket that is not listening yet.

Shutdown (SIGINT/SIGTERM) cancels the nursery; services unwind in reverse
order: the capture rules go first (their `finally`), the store's final flush
last. SIGHUP reloads the configuration (see `Appliance.reload`).

This module only composes: flows go from the listeners to the dispatcher
and never back up here, and what the control API shows is made in
appliance/api/views.py from the services held here.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import fields, replace
from itertools import chain
from typing import Any

import trio

from appliance import __version__, privileges, systemd
from appliance.api import server as api_server
from appliance.api.logbus import LogBus
from appliance.api.providers import Providers
from appliance.capture import backend as capture_backend
from appliance.capture.ebpf.answer import KernelAnswers
from appliance.capture.nftables import NftablesCapture
from appliance.capture.offload import DirectOffload
from appliance.capture.spec import CaptureError, dns_bind
from appliance.config import ConfigError, load_config
from appliance.config.model import Config, DnsConfig, Listen
from appliance.dns import server as dns_server
from appliance.dns.handler import DnsHandler
from appliance.dns.policy import FakeIpFilter, geodata_rules
from appliance.dns.upstream import Resolver
from appliance.failures import FailedFlows
from appliance.fakeip import flusher
from appliance.fakeip.ledger import FileLedger, ledger_path
from appliance.fakeip.pool import FakeIPPool
from appliance.fakeip.store import SQLiteStore, store_path
from appliance.gateway import proxyport
from appliance.gateway.splice import FlowRegistry
from appliance.gateway.tcp import TransparentTcp
from appliance.gateway.udp import UdpGateway
from appliance.geodata import Geodata
from appliance.geodata.update import GeodataFiles, needed
from appliance.limits import ConcurrencyLimit, FairShares, RateLimit, total_flows
from appliance.outbound import wgdevice, wireguard
from appliance.outbound.base import Outbound, Resolve, as_ip
from appliance.outbound.groups import groups_in
from appliance.outbound.health import DelayHistory, HealthChecks
from appliance.outbound.preconnect import Preconnect
from appliance.outbound.selections import Selections, selected_path
from appliance.providers.proxies import ProxyProviders
from appliance.providers.rules import RuleProviders
from appliance.providers.source import Dial
from appliance.routing import Dispatcher, Router
from appliance.rules.engine import FlowContext, RuleEnv

log = logging.getLogger("mirage")


class AppError(Exception):
    """The appliance cannot start or keep running; the message says why and
    what to do about it."""


class Appliance:
    """Owns the services of one `mirage run`: starts them in order, handles
    signals and reloads. Each service field is None until it runs (and stays
    None when not configured); the control API reads them
    (appliance/api/views.py `Sources`)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started_at = time.monotonic()
        self.reloads = 0
        self._fake_ip_wanted = fake_ip_filter(cfg.dns)
        self.store: SQLiteStore | None = None
        self.pool: FakeIPPool | None = None
        self.resolver: Resolver | None = None
        self.dns_handler: DnsHandler | None = None
        self.dispatcher: Dispatcher | None = None
        self.flows: FlowRegistry | None = None  # TCP flows: tproxy-port and proxy ports
        # Recent failed flows of every listener (GET /mirage/failures).
        self.failures = FailedFlows()
        self.tcp: TransparentTcp | None = None
        self.udp: UdpGateway | None = None
        self.proxy_ports: proxyport.ProxyPorts | None = None
        self.capture: object | None = None  # what capture/backend.py started
        self.kernel_dns: KernelAnswers | None = None  # kernel DNS answers, when running
        self.offload: DirectOffload | None = None  # with appliance.offload-direct
        # What rules refer to: rule-providers (the control API's hook) and geodata.
        self.rule_providers: RuleProviders | None = None
        self.geodata = Geodata(cfg.geodata.dir or cfg.appliance.state_dir, mode=cfg.geodata.mode)
        # Per-client limits, held by the services that enforce them.
        self.limits: FairShares = build_fair_shares(cfg)
        # What outlives a router (reloads): the probe results of every proxy
        # (the API's `history`), the choices made in groups (kept in the
        # state dir with profile.store-selected), the service that probes.
        self.delays = DelayHistory()
        self.selections = Selections(
            selected_path(cfg.appliance.state_dir) if cfg.store_selected else None)
        self.health = HealthChecks()
        # proxy-providers: their sources and refresh tasks (None: none yet).
        self.providers: ProxyProviders | None = None
        self._providers_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.stopping = False  # SIGINT/SIGTERM received
        # The control API's: the providers it lists and the log records its
        # /logs streams.
        self.api_providers = Providers(self._outbounds, lambda: self.providers,
                                       lambda: self.rule_providers)
        self.log_bus = LogBus()

    # -- what the control API reads besides the services -------------------------

    def wants_fake_ip(self, name: str) -> bool:
        return self._fake_ip_wanted(name)

    def preconnects(self) -> dict[str, Preconnect]:
        return self.dispatcher.router.preconnects() if self.dispatcher is not None else {}

    def _outbounds(self) -> dict[str, object]:
        return dict(self.dispatcher.router.outbounds) if self.dispatcher is not None else {}

    async def apply_config(self, new: Config) -> None:
        """The API's PATCH /configs: mode, log-level, allow-lan and
        bind-address from now on (the same paths a reload takes for those
        keys; the mode is the live router's, see `Router.set_mode`)."""
        old, self.cfg = self.cfg, new
        if self.dispatcher is not None and new.mode != old.mode:
            self.dispatcher.router.set_mode(new.mode)
            log.info("mode: %s (was %s)", new.mode, old.mode)
        _set_log_level(new.log_level)
        await self._reload_proxy_ports(old, new)

    # -- composition ---------------------------------------------------------

    def build_router(self, cfg: Config, resolve: Resolve | None) -> Router:
        """The router of `cfg` with the groups' shared state and the proxy
        providers' proxies in use, its groups handed to the health checks
        (replacing the previous router's); its rules over the rule-providers'
        content and the geodata."""
        providers = self.providers
        provided_out: dict[str, list[Outbound]] = {}
        shared: dict[str, Any] = {"delays": self.delays, "selections": self.selections,
                                  "provided_out": provided_out}
        if self.resolver is not None:
            # proxy-server-nameserver / direct-nameserver (each the main
            # resolver when not configured).
            shared["proxy_resolve"] = self.resolver.resolve_proxy_server_ips
            shared["direct_resolve"] = self.resolver.resolve_direct_ips
        provided = providers.provided() if providers is not None else {}
        try:
            router = build_router(cfg, resolve, self._rule_env(), provided=provided, **shared)
        except AppError as err:
            if not any(provided.values()):
                raise
            # What a provider's content asks cannot be built (a dialer-proxy
            # loop through the groups that use it): run without providers'
            # proxies rather than not at all.
            log.error("proxy-providers: %s; their proxies are left out", err)
            router = build_router(cfg, resolve, self._rule_env(),
                                  provided=dict.fromkeys(provided, ()), **shared)
        if providers is not None:
            providers.attach(router.outbounds, provided_out)
        self.health.watch(groups_in(router.outbounds).values())
        if self._nursery is not None:
            # WireGuard proxies' interfaces up now rather than on their first
            # flow; those no proxy names any more go.
            self._nursery.start_soon(wireguard.prepare_all, [
                *router.outbounds.values(), *chain.from_iterable(provided_out.values())])
        return router

    def open_providers(self, cfg: Config) -> ProxyProviders:
        """The proxy providers of `cfg` with their cached content loaded (no
        network: a boot without it runs on the cache files)."""
        providers = ProxyProviders(cfg.proxy_providers, cfg.appliance.state_dir,
                                   on_change=self._providers_changed, delays=self.delays)
        providers.load_cached()
        return providers

    def _start_providers(self, providers: ProxyProviders) -> None:
        """Run `providers`' refresh tasks in the app's nursery, stopping the
        previous set's."""
        if self._providers_scope is not None:
            self._providers_scope.cancel()
        self._providers_scope = None
        if self._nursery is None or not providers.sources:
            return
        scope = self._providers_scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await providers.serve()

        self._nursery.start_soon(run)

    def _providers_changed(self) -> None:
        """A provider's content changed: rebuild the router so the groups
        that use it get the new members in one swap."""
        if self.dispatcher is None or self.resolver is None:
            return
        try:
            router = self.build_router(self.cfg, self.resolver.resolve_ips)
        except AppError as err:
            log.error("proxy-provider update: %s; keeping the running proxies", err)
            return
        self.dispatcher.replace(router)

    def open_pool(self) -> FakeIPPool:
        cfg = self.cfg
        state_dir = cfg.appliance.state_dir
        if cfg.store_fake_ip:
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
                self.store = SQLiteStore(store_path(state_dir))
            except OSError as err:
                raise AppError(f"appliance.state-dir {state_dir}: {err}") from None
        range6 = cfg.fake_range6
        # The ledger (even without store-fake-ip) keeps a restart from giving
        # an address clients may still hold to another name.
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            pool = FakeIPPool(cfg.dns.fake_ip_range, range6, store=self.store,
                              keep=self._fake_ip_wanted,
                              ledger=FileLedger(ledger_path(state_dir)))
        except OSError as err:
            raise AppError(f"appliance.state-dir {state_dir}: {err}") from None
        where = f"from {store_path(cfg.appliance.state_dir)}" if cfg.store_fake_ip else "(memory)"
        log.info("fake-IP pool %s%s: %d mappings loaded %s", cfg.dns.fake_ip_range,
                 f" + {range6}" if range6 else "", len(pool), where)
        return pool

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        pool = self.pool = self.open_pool()
        ready = False
        try:
            async with Resolver(cfg.dns, routing_mark=cfg.routing_mark) as resolver, \
                    trio.open_nursery() as nursery:
                self.resolver = resolver
                resolver.attach(self._dns_outbound, self._dns_route)
                # Signals first: a SIGTERM during startup still unwinds cleanly.
                await nursery.start(self._handle_signals, nursery.cancel_scope)
                self._nursery = nursery
                # Before any proxy's interface is made: a killed run's go.
                await trio.to_thread.run_sync(wgdevice.remove_leftovers)
                await nursery.start(self.health.serve)
                self.providers = self.open_providers(cfg)
                dispatcher = self.dispatcher = Dispatcher(
                    self.build_router(cfg, resolver.resolve_ips),
                    connect_timeout=cfg.appliance.connect_timeout)
                await nursery.start(dispatcher.serve)
                self._start_providers(self.providers)
                await self._start_rule_sources(nursery)
                resolver.set_env(self._rule_env())
                await nursery.start(flusher.serve, pool, cfg.appliance.store_flush_interval)
                if cfg.dns.enable:
                    self.dns_handler = DnsHandler(
                        dns_in_effect(cfg), pool,
                        block_canary=cfg.appliance.block_encrypted_dns,
                        fake_ip_rate=self.limits.fake_ip, env=self._rule_env())
                    await nursery.start(self._serve_dns, self.dns_handler, resolver)
                if cfg.tproxy_port or cfg.proxy_ports:
                    self.flows = FlowRegistry(self.failures)
                if cfg.tproxy_port:
                    await nursery.start(self._serve_tcp, pool, dispatcher)
                    await nursery.start(self._serve_udp, pool, dispatcher)
                if cfg.proxy_ports:
                    await nursery.start(self._serve_proxy_ports, pool, dispatcher)
                if cfg.external_controller is not None:
                    ctl = cfg.external_controller
                    await nursery.start(self._serve_api, ctl)
                    log.info("control API on http://%s", ctl)
                if cfg.appliance.lan:
                    self.capture = await nursery.start(self._serve_capture)
                    if self.dns_handler is not None and cfg.dns.kernel_answers \
                            and cfg.dns.enhanced_mode == "fake-ip":
                        await nursery.start(self._serve_kernel_dns, pool, self.dns_handler)
                    if cfg.appliance.offload_direct:
                        await nursery.start(self._serve_offload, pool, dispatcher)
                log.info("mirage %s running (pid %d)", __version__, os.getpid())
                # systemd (Type=notify): started means the LAN is served.
                systemd.notify("READY=1")
                interval = systemd.watchdog_interval()
                if interval is not None:
                    await nursery.start(systemd.serve_watchdog, self._alive, interval)
                task_status.started()
                ready = True
            if not ready and self.stopping:
                # SIGTERM during startup: every service has unwound, a clean stop.
                task_status.started()
        finally:
            # No flow is left to use them (the nursery has exited).
            wgdevice.DEVICES.close()
            # After the flusher's final flush (the nursery has exited).
            if self.store is not None:
                self.store.close()

    async def _start_rule_sources(self, nursery: trio.Nursery) -> None:
        """rule-providers and geodata downloads: loaded (cache first) before
        any listener starts, then refreshed in the background; each change
        recompiles the rules (`_rules_changed`)."""
        cfg = self.cfg
        if cfg.rule_providers:
            self.rule_providers = RuleProviders(cfg, dial_for=self._dial_for,
                                                on_change=self._rules_changed)
            await nursery.start(self.rule_providers.serve)
        rules = list(cfg.rules) + [r for _, sub in cfg.sub_rules for r in sub]
        kinds = needed(rules + geodata_rules(cfg.dns), cfg.geodata.mode)
        if kinds:
            files = GeodataFiles(cfg.geodata, self.geodata, kinds,
                                 dial=self._dial_for(cfg.geodata.proxy),
                                 on_change=self._rules_changed)
            await nursery.start(files.serve)

    def _dial_for(self, proxy: str | None) -> Dial:
        """How a download reaches its server: the `proxy:` outbound, else
        DIRECT (marked sockets, names through the upstream resolver)."""
        async def dial(host: str, port: int) -> trio.abc.Stream:
            assert self.dispatcher is not None
            outbounds = self.dispatcher.router.outbounds
            outbound = outbounds.get(proxy or "DIRECT") or outbounds["DIRECT"]
            return await outbound.connect_tcp(host, port)
        return dial

    def _dns_outbound(self, name: str) -> Outbound | None:
        """A `#Name` nameserver's outbound, from the running router."""
        if self.dispatcher is None:
            return None
        return self.dispatcher.router.outbounds.get(name)

    def _dns_route(self, host: str, port: int) -> Outbound | None:
        """respect-rules: the outbound the rules pick for a nameserver
        (None: DIRECT, the resolver's own marked socket)."""
        if self.dispatcher is None:
            return None
        ip = as_ip(host)
        ctx = FlowContext(domain=None if ip is not None else host, dst_ip=ip, dst_port=port)
        outbound, _ = self.dispatcher.router.pick(ctx)
        return None if outbound.name == "DIRECT" else outbound

    def _rule_env(self) -> RuleEnv:
        providers = self.rule_providers.contents() if self.rule_providers is not None else {}
        return RuleEnv(providers=providers, geo=self.geodata)

    async def _rules_changed(self) -> None:
        """A rule-provider or geodata file changed: compile the rules again
        (in a thread: large sets take a while) and route new flows by them."""
        if self.dispatcher is None:
            return
        router = await trio.to_thread.run_sync(self.dispatcher.router.with_env,
                                               self._rule_env())
        self.dispatcher.swap_rules(router)
        if self.offload is not None:
            await self.offload.clear()
        # The DNS policy's geosite: / rule-set: sets read the same content.
        env = self._rule_env()
        if self.resolver is not None:
            self.resolver.set_env(env)
        if self.dns_handler is not None:
            self.dns_handler.set_env(env)
        log.info("rules recompiled (%d rules)", len(router.rules.rules))

    async def _serve_api(
        self, ctl: Listen, *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The control API (appliance/api/), its /logs fed from the root logger."""
        with self.log_bus.installed(logging.getLogger()):
            try:
                await api_server.serve(self, ctl.host, ctl.port, task_status=task_status)
            except OSError as err:
                raise AppError(f"external-controller {ctl}: cannot listen: {err}") from None

    async def _alive(self) -> bool:
        """The watchdog's check: the DNS service answers (appliance/systemd.py);
        without DNS, a running event loop is all there is to prove."""
        if not self.cfg.dns.enable:
            await trio.lowlevel.checkpoint()
            return True
        return await systemd.dns_answers(self.cfg.dns.listen)

    async def _serve_dns(self, handler: DnsHandler, resolver: Resolver, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        # With dns-hijack, captured queries to other resolvers arrive
        # unrewritten (TPROXY, sk_assign): the socket must be transparent to
        # answer from their address; it binds where the capture looks for it
        # (dual-stack for 0.0.0.0, so IPv6 resolvers are hijacked too).
        transparent = bool(cfg.appliance.lan) and cfg.hijacks_dns
        try:
            await dns_server.serve(dns_bind(cfg), handler, resolver,
                                   transparent=transparent,
                                   upstream_share=self.limits.dns_upstream,
                                   tcp_share=self.limits.dns_tcp, task_status=task_status)
        except OSError as err:
            raise AppError(f"dns.listen {cfg.dns.listen}: cannot bind: {err}") from None

    async def _serve_tcp(self, pool: FakeIPPool, dispatcher: Dispatcher, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The transparent TCP listener on tproxy-port: flows go to the
        dispatcher and into the shared flow registry."""
        self.tcp = TransparentTcp(self.cfg, pool, dispatcher.connect_tcp, self.flows,
                                  flows=self.limits.flows)
        try:
            await self.tcp.serve(task_status=task_status)
        except OSError as err:
            raise AppError(f"tproxy-port {self.cfg.tproxy_port}: cannot listen: {err}") from None

    async def _serve_udp(self, pool: FakeIPPool, dispatcher: Dispatcher, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The transparent UDP gateway on tproxy-port; sessions are routed by
        the live router (reloads apply to new sessions)."""
        self.udp = UdpGateway(self.cfg, pool, dispatcher.open_udp, flows=self.limits.flows,
                              new_id=self.flows.new_id if self.flows is not None else None,
                              failures=self.failures)
        try:
            await self.udp.serve(task_status=task_status)
        except OSError as err:
            raise AppError(
                f"tproxy-port {self.cfg.tproxy_port} (udp): cannot bind: {err}") from None

    async def _serve_proxy_ports(
        self, pool: FakeIPPool, dispatcher: Dispatcher, *,
        task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """mixed-port / socks-port / port: SOCKS5 and HTTP proxy for clients
        set up to use one, on LAN and loopback addresses only. Flows go to
        the dispatcher, TCP ones into the shared flow registry
        (/connections)."""
        self.proxy_ports = proxyport.ProxyPorts(
            self.cfg, pool, dispatcher.connect_tcp, self.flows, open_udp=dispatcher.open_udp,
            clients=self.limits.proxy)
        try:
            await self.proxy_ports.serve(task_status=task_status)
        except (OSError, proxyport.ProxyPortError) as err:
            raise AppError(f"proxy ports (mixed-port/socks-port/port): {err}") from None

    async def _serve_offload(self, pool: FakeIPPool, dispatcher: Dispatcher, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        if not isinstance(self.capture, NftablesCapture):
            # redirect: auto chose eBPF (the loader refuses offload with ebpf).
            log.warning("appliance.offload-direct: needs the nftables capture; the eBPF "
                        "backend is running, so every flow stays on the userspace path")
            task_status.started()
            return
        cfg = self.cfg
        offload = self.offload = DirectOffload(
            pool, table=self.capture.table, lan=cfg.appliance.lan,
            map6=cfg.fake_range6 is not None)
        dispatcher.offload = offload
        await offload.serve(task_status=task_status)

    async def _serve_kernel_dns(self, pool: FakeIPPool, handler: DnsHandler, *,
                                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                ) -> None:
        """Kernel DNS answers (capture/ebpf/answer.py), after the capture: the
        nftables backend's start removes every leftover Mirage tc filter,
        and with the eBPF backend its filter is already there to fall back
        to. Where the program does not load, userspace answers everything
        (a warning says why). The pool writes the map from here on; the
        filter is detached and the map emptied with the service."""
        cfg = self.cfg
        try:
            kernel = await trio.to_thread.run_sync(
                lambda: KernelAnswers(cfg, handler.answers_from_pool))
        except CaptureError as err:
            log.warning("dns.kernel-answers: off, every query reaches the DNS service (%s)", err)
            task_status.started()
            return
        try:
            pool.set_mirror(kernel)
            await trio.to_thread.run_sync(kernel.attach, tuple(cfg.appliance.lan))
            self.kernel_dns = kernel
            task_status.started()
            await trio.sleep_forever()
        except CaptureError as err:
            log.warning("dns.kernel-answers: off (%s)", err)
            task_status.started()
        finally:
            self.kernel_dns = None
            pool.set_mirror(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(kernel.close)

    async def _serve_capture(self, *,
                             task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        listeners = self.tcp.listeners if self.tcp is not None else []
        try:
            await capture_backend.serve(
                self.cfg, task_status=task_status,
                tcp_listener=listeners[0].socket.fileno() if listeners else None)
        except (OSError, capture_backend.CaptureError) as err:
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
                    self.stopping = True
                    systemd.notify("STOPPING=1")
                    scope.cancel()
                    return

    async def reload(self) -> bool:
        """Re-read the config file; apply what can change without dropping
        established flows: rules, proxies, fake-IP filter, log level, and on
        the proxy ports `authentication`, `allow-lan` and `bind-address`
        (new connections, listeners moved; `ProxyPorts.reconfigure`). Every
        other changed key needs a restart and is named in a WARNING. A bad
        file changes nothing."""
        path = self.cfg.source
        if path is None:
            log.warning("SIGHUP: configuration has no file to reload from")
            return False
        try:
            new = load_config(path)
        except ConfigError as err:
            log.error("SIGHUP: %s: %s; keeping the running configuration", path, err)
            return False
        old = self.cfg
        if self.dispatcher is not None and self.resolver is not None:
            kept_providers = self.providers
            if new.proxy_providers != old.proxy_providers:
                self.providers = self.open_providers(new)
            try:
                router = self.build_router(new, self.resolver.resolve_ips)
            except AppError as err:
                log.error("SIGHUP: %s; keeping the running configuration", err)
                self.providers = kept_providers
                return False
            self.dispatcher.replace(router)
            if self.providers is not kept_providers and self.providers is not None:
                self._start_providers(self.providers)
        if self.dns_handler is not None:
            self.dns_handler.reconfigure(dns_in_effect(new))
        if self.offload is not None:
            # The new rules may send an offloaded name elsewhere: the kernel
            # forgets them all; the next flow to each offers again.
            await self.offload.clear()
        self._fake_ip_wanted = wanted = fake_ip_filter(new.dns, self._rule_env())
        dropped = self.pool.drop(lambda d: not wanted(d)) if self.pool is not None else 0
        if self.pool is not None:
            # hosts, the IPv6 switch or the filter may have changed which
            # names the kernel may answer.
            self.pool.resync_mirror()
        _set_log_level(new.log_level)
        live = await self._reload_proxy_ports(old, new)
        self.cfg = new
        self.reloads += 1
        log.info("SIGHUP: reloaded %s (rules, proxies, filter%s; %d mappings dropped by the "
                 "filter)", path, "".join(f", {key}" for key in live), dropped)
        for key in restart_keys(old, new, proxy_ports_live=self.proxy_ports is not None):
            log.warning("SIGHUP: %s changed: restart needed, still running with the old "
                        "setting", key)
        return True

    async def _reload_proxy_ports(self, old: Config, new: Config) -> list[str]:
        """authentication, allow-lan and bind-address on the running proxy
        ports; returns the keys that changed (applied, or logged at ERROR
        where a listener could not move)."""
        changed = [key for key, a, b in [
            ("authentication", old.authentication, new.authentication),
            ("allow-lan", old.allow_lan, new.allow_lan),
            ("bind-address", old.bind_address, new.bind_address),
        ] if a != b]
        if self.proxy_ports is None:
            return []
        try:
            # Every reload, changed or not: the LAN addresses may have moved.
            await self.proxy_ports.reconfigure(new)
        except (OSError, proxyport.ProxyPortError) as err:
            log.error("SIGHUP: proxy ports: %s; credentials applied, listeners left as "
                      "they were: %s", err,
                      ", ".join(f"{k} {h}:{p}" for k, h, p in self.proxy_ports.bound))
        return changed


# The keys a reload cannot apply (config key, what it reads in a Config).
# `appliance` is compared field by field, so the warning names the one.
_RESTART_KEYS: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("dns.listen", lambda c: c.dns.listen),
    ("dns.fake-ip-range", lambda c: c.dns.fake_ip_range),
    ("dns.fake-ip-range6", lambda c: c.dns.fake_ip_range6),
    ("dns.nameserver", lambda c: c.dns.nameserver),
    # The resolver is built once at start (its policy, fallback and the
    # proxy-server / direct resolvers with it).
    ("dns.nameserver-policy", lambda c: c.dns.nameserver_policy),
    ("dns.default-nameserver", lambda c: c.dns.default_nameserver),
    ("dns.fallback / fallback-filter", lambda c: (c.dns.fallback, c.dns.fallback_filter)),
    ("dns.proxy-server-nameserver", lambda c: c.dns.proxy_server_nameserver),
    ("dns.direct-nameserver", lambda c: (c.dns.direct_nameserver, c.dns.direct_follow_policy)),
    ("dns.respect-rules", lambda c: c.dns.respect_rules),
    ("tproxy-port", lambda c: c.tproxy_port),
    ("mixed-port", lambda c: c.mixed_port),
    ("socks-port", lambda c: c.socks_port),
    ("port", lambda c: c.http_port),
    ("ipv6", lambda c: c.ipv6),
    ("routing-mark", lambda c: c.routing_mark),
    ("external-controller", lambda c: c.external_controller),
    ("profile.store-fake-ip", lambda c: c.store_fake_ip),
    # The providers and geodata files are loaded and refreshed by tasks
    # started once; a reload compiles the new rules over their content.
    ("rule-providers", lambda c: c.rule_providers),
    ("geox-url / geodata-*", lambda c: c.geodata),
    ("profile.store-selected", lambda c: c.store_selected),
)
# Applied live by the proxy ports; a restart only when none are running
# (then they only matter once a port is configured, which needs one).
_PROXY_PORT_KEYS: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("authentication", lambda c: c.authentication),
    ("allow-lan", lambda c: c.allow_lan),
    ("bind-address", lambda c: c.bind_address),
)


def restart_keys(old: Config, new: Config, *, proxy_ports_live: bool) -> list[str]:
    """The config keys that differ between `old` and `new` and that a
    reload does not apply (each `appliance.*` field by name)."""
    keys = [key for key, get in _RESTART_KEYS if get(old) != get(new)]
    if not proxy_ports_live:
        keys += [key for key, get in _PROXY_PORT_KEYS if get(old) != get(new)]
    keys += [f"appliance.{f.name.replace('_', '-')}" for f in fields(old.appliance)
             if getattr(old.appliance, f.name) != getattr(new.appliance, f.name)]
    return keys


def _set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper() if level != "silent" else logging.CRITICAL + 1)


def build_fair_shares(cfg: Config) -> FairShares:
    """The per-client limits of `cfg.appliance.limits` (appliance/limits.py).

    The flows budget (`flows-total: auto`) is what half the memory and the
    descriptor limit pay for; the soft descriptor limit is first raised to
    the hard one (which an operator or systemd's LimitNOFILE sets), since
    the budget would otherwise be the 1024 of a login shell. One client
    never gets more than half of the flows budget (see docs/config.md).
    """
    lim = cfg.appliance.limits
    total = lim.flows_total
    if total is None:
        total = total_flows(_memory_bytes(), privileges.raise_descriptor_limit())
    flows_per_client = min(lim.flows_per_client, max(1, total // 2))
    if flows_per_client < lim.flows_per_client:
        log.info("appliance.limits: %d flows per client (half of the %d this machine allows "
                 "in all)", flows_per_client, total)
    return FairShares(
        flows=ConcurrencyLimit(flows_per_client, total),
        proxy=ConcurrencyLimit(min(lim.proxy_connections_per_client, max(1, total // 2)), total),
        dns_upstream=ConcurrencyLimit(lim.dns_upstream_per_client, dns_server.MAX_INFLIGHT),
        dns_tcp=ConcurrencyLimit(lim.dns_tcp_per_client, dns_server.MAX_TCP_CONNECTIONS),
        fake_ip=RateLimit(lim.fake_ip_rate_per_client, lim.fake_ip_burst_per_client),
    )


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 256 << 20  # a small router's, if the system will not say


def build_router(cfg: Config, resolve: Resolve | None, env: RuleEnv | None = None,
                 **shared: Any) -> Router:
    """The outbounds and rules of `cfg` (over `env`: rule-providers' content,
    geodata); AppError if they cannot be built."""
    try:
        return Router.from_config(cfg, resolve, env, **shared)
    except ValueError as err:  # BuildError
        raise AppError(f"proxies/rules: {err}") from None


def fake_ip_filter(dns: DnsConfig, env: RuleEnv | None = None) -> Callable[[str], bool]:
    """Would a name get a fake IP under `dns.fake-ip-filter` and its mode?
    (Keeps saved mappings only for names the filter still lets through.)"""
    return FakeIpFilter(dns, env or RuleEnv()).wants_fake_ip


def dns_in_effect(cfg: Config) -> DnsConfig:
    """`cfg.dns` with the IPv6 fake range in effect (`Config.fake_range6`,
    where that is decided), which is the one the DNS handler reads."""
    return replace(cfg.dns, fake_ip_range6=cfg.fake_range6)


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


def _drop_privileges(cfg: Config) -> None:
    """Once set up, keep only the capabilities running needs
    (appliance/privileges.py says which and why)."""
    ebpf = cfg.appliance.redirect in ("ebpf", "auto") and bool(cfg.appliance.lan)
    try:
        dropped = privileges.drop_to_runtime(ebpf=ebpf)
    except OSError as err:
        log.warning("could not drop capabilities (%s); running with those it started with", err)
        return
    if dropped:
        log.info("capabilities dropped now that setup is done: %s", ", ".join(dropped))


async def run_appliance(cfg: Config) -> None:
    """Entry point for `mirage run`: serve until SIGINT/SIGTERM. Once every
    service is up, the collector is tuned (`_tune_gc`) and the capabilities
    only setup needed are dropped (`_drop_privileges`): this process is
    Mirage's alone (tests that run an Appliance in theirs leave it be)."""
    app = Appliance(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        if app.stopping:  # stopped while starting up
            return
        _tune_gc()
        _drop_privileges(cfg)

