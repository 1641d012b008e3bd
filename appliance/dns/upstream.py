"""The real resolver: DoH (RFC 8484, HTTP/2), DoT (RFC 7858), plain UDP and
TCP nameservers, straight from the gateway or through an outbound.

`Resolver` implements `upstream_api.Upstream` for the DNS service and
`resolve_ips` for the DIRECT outbound. Per query:

1. cache (cache.py; TTL-honouring, LRU-bounded, negative answers per RFC 2308);
2. join an identical query already in flight (one upstream request, many
   waiters), else lead one;
3. choose nameservers (appliance/dns/policy.py, mihomo's semantics): the
   first `nameserver-policy` entry holding the name, else `nameserver`;
   for A/AAAA with `fallback`, `fallback` alone for fallback-filter's
   domains, else `nameserver` first and `fallback` when its answer failed,
   held no address or a filtered one. `nameserver` gets at most half the
   time left when a fallback may follow, so a dead `nameserver` still
   leaves `fallback` time to answer;
4. race them: the first starts at once, each next one after `STAGGER`
   seconds or as soon as the previous attempt fails; the first usable answer
   (NOERROR/NXDOMAIN for the asked question) wins and the others are
   cancelled. Racing rather than plain fail-over because one dead nameserver
   would otherwise eat the whole deadline (a blackholed DoH server fails only
   by timing out), and staggered rather than all at once so a healthy
   first nameserver costs one request, not N (the shape of trio's
   `open_tcp_stream` happy eyeballs);
5. one absolute deadline (`dns.upstream_timeout`) bounds all of it: on expiry
   or when every nameserver failed, `UpstreamError`.

DoH specifics: POST by default; a nameserver whose config text ends in
`#method=GET` (mihomo-style URL fragment parameter) uses GET with `?dns=`.
Queries carry DNS ID 0 (RFC 8484 section 4.1); the reply gets the caller's
ID back. A DoH host given by name is resolved through `default-nameserver`
only (never the system resolver, never /etc/hosts), the connection goes to
that address (`_Backend`), while the URL keeps the name: TLS SNI, the
certificate check, the Host header and httpx's connection pool all go by the
name, so each DoH name gets its own verified connection.

DoT (RFC 7858: DNS-over-TCP framing inside TLS): SNI and certificate check
by the host as written (name or IP); up to 4 connections per server, kept
for the next queries (`_dot`).

Through an outbound (`#Name` on the entry, or `respect-rules` / `#RULES`:
what the rules pick for the server's address): TCP, DoT and DoH
connections are the outbound's `connect_tcp` (a server known by name is
handed to the proxy unresolved), UDP queries its `open_udp` when it
carries UDP, else DNS over TCP through it. `attach` hands the resolver
the running outbounds (they are built after it, and a reload replaces
them); before that, or for a name the outbounds no longer have, such a
server fails the attempt (the race goes on with the others). `#DIRECT`
is the gateway's own marked socket.

Three resolvers in one (mihomo's `Resolvers`): `query` / `resolve_ips`
use `nameserver` with the policy and fallback; `resolve_proxy_server_ips`
(the proxies' own server names) uses `proxy-server-nameserver` when set;
`resolve_direct_ips` (DIRECT's destinations) uses `direct-nameserver`
when set (with nameserver-policy first under
`direct-nameserver-follow-policy`). Each has its own cache.

Trust: the system store (or `SSL_CERT_FILE`/`SSL_CERT_DIR` when set, which
OpenSSL reads in place of it), certifi's bundle, and `dns.ca_file`.

Owns: one httpx.AsyncClient (its HTTP/2 connections) for the lifetime of the
`async with`, and a UDP/TCP socket per plain query, closed on every path.
Every socket carries SO_MARK = `routing_mark` when set, so the gateway's
capture rules never take its own traffic.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import ssl
import struct
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import certifi
import httpcore
import httpx
import trio
from dnslib import QTYPE, RCODE, DNSError, DNSRecord
from httpcore._backends import base as httpcore_base
from httpcore._backends.trio import TrioStream

from appliance.config.model import DnsConfig, IPAddress, Nameserver
from appliance.dns.cache import CacheKey, DnsCache, cache_key, cache_ttl
from appliance.dns.doh import (
    MAX_MESSAGE,
    DohError,
    Method,
    decode_response,
    encode_request,
    with_zero_id,
)
from appliance.dns.policy import Plan, Policy
from appliance.dns.upstream_api import UpstreamError
from appliance.outbound.base import Outbound, OutboundError, open_marked_tcp
from appliance.proto.socks5 import Socks5Error, parse_udp
from appliance.rules.engine import EMPTY_ENV, RuleEnv
from appliance.sockopt import SO_MARK, set_mark

log = logging.getLogger(__name__)

# Head start each nameserver gets before the next one is asked too.
STAGGER = 0.25
_BOOTSTRAP_CACHE_SIZE = 256
# DoT connections per server (and outbound) at once, and kept idle: one
# query at a time on each (no pipelining), so this bounds both.
_DOT_CONNECTIONS = 4
_DOT_IDLE_MAX = _DOT_CONNECTIONS
# TTL reported by resolve_ips for IP literals and `hosts` entries.
_STATIC_TTL = 3600


class _AttemptFailed(Exception):
    """One nameserver gave no usable answer (reason in the message)."""


def reply_problem(request: DNSRecord, reply: DNSRecord) -> str | None:
    """Why `reply` is no usable answer to `request`, or None if it is.

    Usable: a response to the same question with NOERROR or NXDOMAIN. Other
    rcodes (SERVFAIL, REFUSED, ...) mean that nameserver failed, so the race
    goes on with the others.
    """
    if not reply.header.qr:
        return "not a response"
    if cache_key(reply) != cache_key(request):
        return "reply is for another question"
    rcode = reply.header.rcode
    if rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
        return f"rcode {RCODE.get(rcode)}"
    return None


def doh_method(ns: Nameserver) -> Method:
    """GET when the nameserver carries `#method=GET`, else POST."""
    method = ns.param("method")
    if method is None:  # a Nameserver built without the loader
        _, _, fragment = ns.text.partition("#")
        for param in fragment.split("&"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "method":
                method = value
    return "GET" if (method or "").strip().upper() == "GET" else "POST"


def make_ssl_context(ca_file: Path | None, *, verify: bool = True) -> ssl.SSLContext:
    """Client TLS context for DoH and DoT servers (see the module docstring
    for what it trusts); `verify` False for `skip-cert-verify=true`.
    Raises OSError/ssl.SSLError if `ca_file` is unreadable."""
    # create_default_context() loads OpenSSL's default paths, which are
    # SSL_CERT_FILE / SSL_CERT_DIR when those are set.
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=certifi.where())
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


Purpose = Literal["main", "proxy-server", "direct"]
# An outbound for a nameserver, looked up when a query needs it.
OutboundLookup = Callable[[str], Outbound | None]
# respect-rules: the outbound the rules pick for (host, port); None: DIRECT.
RouteLookup = Callable[[str, int], Outbound | None]


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    """A failure's most telling message. httpx/httpcore/trio wrap the real
    cause (an SSLError saying why a certificate was refused) in exceptions
    whose own text is often empty, so follow the chain."""
    seen: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(seen) < 8:
        text = str(cause)
        if text and text not in seen:
            seen.append(text)
        cause = cause.__cause__ or cause.__context__
    return ": ".join(seen) or type(exc).__name__


def _with_id(wire: bytes, qid: int) -> bytes:
    return struct.pack("!H", qid) + wire[2:]


def _parse(wire: bytes) -> DNSRecord:
    try:
        return DNSRecord.parse(wire)
    except (DNSError, ValueError, IndexError, struct.error) as exc:
        raise _AttemptFailed(f"malformed reply: {exc}") from exc


def _addresses(reply: DNSRecord) -> list[IPAddress]:
    """The A/AAAA addresses of a successful reply (mihomo's msgToIP);
    none for an error rcode."""
    if reply.header.rcode != RCODE.NOERROR:
        return []
    return [ipaddress.ip_address(str(rr.rdata)) for rr in reply.rr
            if rr.rtype in (QTYPE.A, QTYPE.AAAA)]


async def _stream_exchange(stream: trio.abc.Stream, wire: bytes) -> DNSRecord:
    """One query over a DNS-over-TCP stream (RFC 1035 4.2.2 / RFC 7766:
    2-byte length prefix), plain TCP or TLS; the reply must carry the
    query's ID."""
    await stream.send_all(struct.pack("!H", len(wire)) + wire)
    buf = bytearray()
    need = 2
    while len(buf) < need:
        chunk = await stream.receive_some(MAX_MESSAGE)
        if not chunk:
            raise _AttemptFailed("connection closed before the reply")
        buf += chunk
        if need == 2 and len(buf) >= 2:
            need = 2 + struct.unpack_from("!H", buf)[0]
    reply = _parse(bytes(buf[2:need]))
    (qid,) = struct.unpack_from("!H", wire)
    if reply.header.id != qid:
        raise _AttemptFailed("TCP reply with another ID")
    return reply


def _for_request(wire: bytes, request: DNSRecord) -> DNSRecord:
    reply = DNSRecord.parse(wire)
    reply.header.id = request.header.id
    reply.questions = list(request.questions)
    return reply


class _Body(httpx.AsyncByteStream):
    """A request body that is not an async generator.

    httpx wraps `content=bytes` in one; when sending fails (dead connection,
    cancelled race) the generator is dropped half-iterated and trio reports
    it with a ResourceWarning. An iterator object has nothing to finalize.
    Re-iterable, so a request can be sent again.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> _OneChunk:
        return _OneChunk(self._data)


class _OneChunk:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _OneChunk:
        return self

    async def __anext__(self) -> bytes:
        data, self._data = self._data, None
        if data is None:
            raise StopAsyncIteration
        return data


class _CancelSafeStream(httpcore.AsyncNetworkStream):
    """httpcore's trio stream, except that a TLS handshake ended by
    cancellation closes the socket. httpcore 1.0 closes it only on Exception,
    and trio.Cancelled is a BaseException: every race a DoH attempt loses
    during its handshake (or a deadline hitting a silent server) would leak
    one socket until garbage collection."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    # The `timeout` parameters below are httpcore's interface, not our design
    # (ruff ASYNC109); our deadlines are trio cancel scopes around all of it.
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        try:
            return await self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._inner.aclose()
            raise

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


# The address a DoH request to a host *name* connects to, chosen by the
# bootstrap for this request. httpcore opens a connection in the task that
# sends the request, so a context variable reaches _Backend.connect_tcp.
_CONNECT_TO: ContextVar[str | None] = ContextVar("mirage_doh_connect_to", default=None)


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend with two changes: a name is connected to the
    bootstrapped address in `_CONNECT_TO` (never resolved by the system: a
    name without one fails to connect), and streams are `_CancelSafeStream`."""

    def __init__(self) -> None:
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore_base.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if _ip(host) is None:
            address = _CONNECT_TO.get()
            if address is None:
                raise httpcore.ConnectError(f"{host}: no bootstrapped address")
            host = address
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return _CancelSafeStream(stream)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class _ViaStream(TrioStream):
    """httpcore's trio stream over an outbound's stream, which need not be
    a socket (a Shadowsocks or TLS tunnel): socket questions get None
    instead of httpcore's assertion."""

    def get_extra_info(self, info: str) -> Any:
        try:
            return super().get_extra_info(info)
        except AssertionError:
            return None


class _ViaBackend(httpcore.AsyncNetworkBackend):
    """Connections through the outbound `outbound()` returns (DoH `#Name`):
    the host goes to it as written (a name unresolved)."""

    def __init__(self, outbound: Callable[[], Outbound | None]) -> None:
        self._outbound = outbound

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore_base.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        outbound = self._outbound()
        if outbound is None:
            raise httpcore.ConnectError(f"{host}: its outbound is not running")
        try:
            stream = await outbound.connect_tcp(_ip(host) or host, port)
        except OutboundError as exc:
            raise httpcore.ConnectError(f"via {outbound.name}: {exc}") from exc
        return _CancelSafeStream(_ViaStream(stream))

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's HTTP/1.1+HTTP/2 transport on `_Backend` (or a `_ViaBackend`).

    httpx takes no network backend argument, so the connection pool it built
    is replaced by an identical one that has ours (`_pool` is the attribute
    all of AsyncHTTPTransport's methods use, since httpx 0.18).
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        socket_options: list[tuple[int, int, int]] | None,
        backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        super().__init__(verify=ssl_context, http2=True, socket_options=socket_options)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            http1=True,
            http2=True,
            retries=0,
            socket_options=socket_options,
            network_backend=backend if backend is not None else _Backend(),
        )


@dataclass
class _Flight:
    """A query in flight that identical queries wait for."""

    done: trio.Event
    wire: bytes | None = None
    error: UpstreamError | None = None


class Resolver:
    """Upstream resolver over DoH/DoT/UDP/TCP with cache, policy, fallback
    and racing.

    Use as `async with Resolver(dns, routing_mark) as resolver:`; `query`
    and `resolve_ips` are valid only inside. `env` is what geosite: and
    rule-set: entries refer to (`set_env` when it changes); `attach` gives
    it the outbounds `#Name` servers go through. See the module docstring.
    """

    def __init__(
        self, dns: DnsConfig, routing_mark: int | None = None, env: RuleEnv = EMPTY_ENV
    ) -> None:
        self._dns = dns
        self._mark = routing_mark
        self._timeout = dns.upstream_timeout
        self._bootstrap_cache = DnsCache(_BOOTSTRAP_CACHE_SIZE)
        self._hosts = dict(dns.hosts)
        self._inflight: dict[tuple[str, CacheKey], _Flight] = {}
        # Connections by (outbound name or None, verify certificates).
        self._clients: dict[tuple[str | None, bool], httpx.AsyncClient] = {}
        self._open = False
        self._tls_contexts: dict[bool, ssl.SSLContext] = {}
        # DoT connections that answered, kept for the next queries.
        self._dot_idle: dict[tuple[Nameserver, str | None], list[trio.SSLStream[Any]]] = {}
        self._dot_slots: dict[tuple[Nameserver, str | None], trio.Semaphore] = {}
        # New DoT connections made (handshakes): what reuse saves.
        self.dot_connects = 0
        self._outbound: OutboundLookup | None = None
        self._route: RouteLookup | None = None
        main_cache = DnsCache(dns.cache_size)
        self._caches: dict[Purpose, DnsCache] = {
            "main": main_cache,
            "proxy-server": DnsCache(dns.cache_size) if dns.proxy_server_nameserver
            else main_cache,
            "direct": DnsCache(dns.cache_size) if dns.direct_nameserver else main_cache,
        }
        self._policies: dict[Purpose, Policy] = {}
        self._by_rules: set[Nameserver] = set()
        self.set_env(env)

    def set_env(self, env: RuleEnv) -> None:
        """Take new geodata / rule-provider content for the policy's sets."""
        dns = self._dns
        main = Policy(dns, env)
        self._policies = {
            "main": main,
            "proxy-server": Policy(dns, env, main=dns.proxy_server_nameserver,
                                   use_policy=False, use_fallback=False)
            if dns.proxy_server_nameserver else main,
            "direct": Policy(dns, env, main=dns.direct_nameserver,
                             use_policy=dns.direct_follow_policy, use_fallback=False)
            if dns.direct_nameserver else main,
        }
        # respect-rules: mihomo gives every nameserver, fallback and policy
        # server without a `#Name` the rules as its proxy.
        self._by_rules = main.servers() if dns.respect_rules else set()

    def attach(self, outbound: OutboundLookup | None, route: RouteLookup | None = None) -> None:
        """The running outbounds by name (`#Name` servers) and, for
        `respect-rules` / `#RULES`, what the rules pick for a server."""
        self._outbound = outbound
        self._route = route

    async def __aenter__(self) -> Resolver:
        self._open = True
        self._clients[(None, True)] = self._make_client(None, verify=True)
        return self

    def _make_client(self, via: str | None, *, verify: bool) -> httpx.AsyncClient:
        options = None
        backend: httpcore.AsyncNetworkBackend | None = None
        if via is None:
            if self._mark is not None:
                options = [(socket.SOL_SOCKET, SO_MARK, self._mark)]
        else:
            backend = _ViaBackend(lambda: self._outbound_named(via))
        transport = _Transport(make_ssl_context(self._dns.ca_file, verify=verify), options,
                               backend)
        # trust_env=False: proxy variables must never route DNS through a
        # proxy (TLS trust from the environment is handled above).
        return httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(self._timeout),
            trust_env=False,
            follow_redirects=False,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        clients = list(self._clients.values())
        self._clients.clear()
        streams = [tls for idle in self._dot_idle.values() for tls in idle]
        self._dot_idle.clear()
        with trio.CancelScope(shield=True):
            for tls in streams:
                await trio.aclose_forcefully(tls)
            with trio.move_on_after(1):
                for client in clients:
                    await client.aclose()

    @property
    def _client(self) -> httpx.AsyncClient | None:
        return self._clients.get((None, True))

    @property
    def cache(self) -> DnsCache:
        return self._caches["main"]

    def nameservers_for(self, name: str) -> tuple[Nameserver, ...]:
        """The nameservers asked first for `name`'s addresses."""
        return self._policies["main"].plan(name, QTYPE.A).first

    def plan(self, name: str, qtype: int, purpose: Purpose = "main") -> Plan:
        return self._policies[purpose].plan(name, qtype)

    # -- the Upstream protocol ------------------------------------------------

    async def query(self, request: DNSRecord, purpose: Purpose = "main") -> DNSRecord:
        """Resolve `request` (exactly one question); UpstreamError on failure
        or after `dns.upstream_timeout` seconds. `purpose` picks the
        resolver (module docstring)."""
        key = cache_key(request)
        if key is None or len(request.questions) != 1:
            raise UpstreamError("a query must carry exactly one question")
        if self._policies[purpose] is self._policies["main"]:
            purpose = "main"
        cache = self._caches[purpose]
        deadline = trio.current_time() + self._timeout
        # Bounded: each round either answers, raises, or follows a leader that
        # was cancelled from outside; the deadline ends that too.
        while True:
            cached = cache.get(request, trio.current_time())
            if cached is not None:
                return cached
            flight = self._inflight.get((purpose, key))
            if flight is None:
                return await self._lead(request, key, deadline, purpose)
            with trio.move_on_at(deadline):
                await flight.done.wait()
            if not flight.done.is_set():
                raise UpstreamError(f"{key[0]} {QTYPE.get(key[1])}: no answer in {self._timeout}s")
            if flight.wire is not None:
                return _for_request(flight.wire, request)
            if flight.error is not None:
                # A fresh exception per waiter: one instance raised in many
                # tasks would collect all their tracebacks.
                raise UpstreamError(str(flight.error))

    async def _lead(
        self, request: DNSRecord, key: CacheKey, deadline: float, purpose: Purpose
    ) -> DNSRecord:
        flight = _Flight(trio.Event())
        self._inflight[(purpose, key)] = flight
        try:
            policy = self._policies[purpose]
            plan = policy.plan(key[0], key[1])
            reply = await self._resolve(request, plan, policy, deadline)
            self._caches[purpose].put(reply, trio.current_time())
            flight.wire = reply.pack()
            return _for_request(flight.wire, request)
        except UpstreamError as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[(purpose, key)]
            flight.done.set()

    async def _resolve(
        self, request: DNSRecord, plan: Plan, policy: Policy, deadline: float
    ) -> DNSRecord:
        q = request.q
        what = f"{str(q.qname).rstrip('.') or '.'} {QTYPE.get(q.qtype)}"
        if not plan.first:
            raise UpstreamError(f"{what}: no nameserver configured")
        if not self._open:
            raise UpstreamError("resolver used outside `async with`")
        errors: list[str] = []
        if plan.fallback:
            # nameserver first, with half the time left; its answer stands
            # only if the fallback filter keeps it (policy.py).
            first_until = trio.current_time() + (deadline - trio.current_time()) / 2
            reply: DNSRecord | None = None
            with trio.move_on_at(first_until):
                try:
                    reply = await self._race(plan.first, request, what, errors)
                except UpstreamError:
                    reply = None
            if reply is not None and policy.keeps(_addresses(reply)):
                return reply
            log.debug("%s: fallback (%s)", what,
                      "nameserver failed" if reply is None else "answer filtered")
            servers: Sequence[Nameserver] = plan.fallback
        else:
            servers = plan.first
        with trio.move_on_at(deadline):
            return await self._race(servers, request, what, errors)
        raise UpstreamError(
            f"{what}: no answer from {', '.join(ns.url for ns in servers)} "
            f"within {self._timeout}s" + "".join(f"; {e}" for e in errors)
        )

    async def _race(
        self,
        servers: Sequence[Nameserver],
        request: DNSRecord,
        what: str,
        errors: list[str] | None = None,
    ) -> DNSRecord:
        """First usable answer from `servers`, tried with a stagger (module
        docstring); UpstreamError when all fail. Failures are appended to
        `errors` as they happen, so a caller whose deadline ends the race
        can still say what went wrong. No deadline of its own."""
        winner: list[DNSRecord] = []
        errors = [] if errors is None else errors

        async def attempt(ns: Nameserver, failed: trio.Event, race: trio.CancelScope) -> None:
            try:
                reply = await self._exchange(ns, request)
                problem = reply_problem(request, reply)
                if problem is not None:
                    raise _AttemptFailed(problem)
            except (_AttemptFailed, UpstreamError, DohError, httpx.HTTPError, OSError,
                    OutboundError, trio.BrokenResourceError, ssl.SSLError) as exc:
                reason = _reason(exc)
                log.debug("%s via %s failed: %s", what, ns.url, reason)
                errors.append(f"{ns.url}: {reason}")
                failed.set()
                return
            if not winner:
                winner.append(reply)
            race.cancel()

        async with trio.open_nursery() as nursery:
            for ns in servers:
                failed = trio.Event()
                nursery.start_soon(attempt, ns, failed, nursery.cancel_scope)
                with trio.move_on_after(STAGGER):
                    await failed.wait()
        if winner:
            return winner[0]
        raise UpstreamError(f"{what}: " + "; ".join(errors))

    # -- which way a nameserver is reached -------------------------------------

    def _outbound_named(self, name: str) -> Outbound | None:
        return self._outbound(name) if self._outbound is not None else None

    def _via(self, ns: Nameserver) -> Outbound | None:
        """The outbound `ns`'s queries go through; None: the gateway's own
        marked sockets. _AttemptFailed when it is not available."""
        proxy = ns.proxy
        if proxy is None and ns in self._by_rules:
            proxy = "RULES"
        if proxy is None or proxy == "DIRECT":
            return None
        if proxy == "RULES":
            if self._route is None:
                raise _AttemptFailed("the rules are not running yet")
            return self._route(ns.host, ns.port)
        outbound = self._outbound_named(proxy)
        if outbound is None:
            raise _AttemptFailed(f"outbound {proxy!r} is not running")
        return outbound

    # -- transports -------------------------------------------------------------

    async def _exchange(self, ns: Nameserver, request: DNSRecord) -> DNSRecord:
        wire = request.pack()
        via = self._via(ns)
        if ns.scheme == "https":
            return _parse(await self._doh(ns, wire, via))
        qid = secrets.randbits(16)
        wire = _with_id(wire, qid)
        if ns.scheme == "tls":
            return await self._dot(ns, wire, via)
        ip = _ip(ns.host)
        if ip is None:
            raise _AttemptFailed("plain nameservers need an IP address")
        if ns.scheme == "udp":
            if via is None:
                reply = await self._udp(ip, ns.port, wire, request)
            elif via.carries_udp:
                reply = await self._udp_via(via, ip, ns.port, wire, request)
            else:
                # The outbound carries TCP only: the same query over TCP.
                return await self._tcp_via(via, ip, ns.port, wire)
            if not reply.header.tc:
                return reply
            # RFC 7766 section 5: a truncated UDP answer is retried over TCP.
        if via is not None:
            return await self._tcp_via(via, ip, ns.port, wire)
        return await self._tcp(ip, ns.port, wire)

    def _socket(self, ip: IPAddress, kind: socket.SocketKind) -> trio.socket.SocketType:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = trio.socket.socket(family, kind)
        try:
            set_mark(sock, self._mark)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _udp(self, ip: IPAddress, port: int, wire: bytes, request: DNSRecord) -> DNSRecord:
        (qid,) = struct.unpack_from("!H", wire)
        with self._socket(ip, socket.SOCK_DGRAM) as sock:
            await sock.connect((str(ip), port))
            await sock.send(wire)
            # Skip datagrams that do not answer this query (wrong ID or
            # question: late replies or spoofing attempts); the deadline
            # bounds the loop.
            while True:
                data = await sock.recv(MAX_MESSAGE)
                try:
                    reply = DNSRecord.parse(data)
                except (DNSError, ValueError, IndexError, struct.error):
                    continue
                if reply.header.id == qid and cache_key(reply) == cache_key(request):
                    return reply

    async def _tcp(self, ip: IPAddress, port: int, wire: bytes) -> DNSRecord:
        sock = self._socket(ip, socket.SOCK_STREAM)
        try:
            await sock.connect((str(ip), port))
        except BaseException:
            sock.close()
            raise
        async with trio.SocketStream(sock) as stream:
            return await _stream_exchange(stream, wire)

    async def _tcp_via(self, via: Outbound, host: str | IPAddress, port: int,
                       wire: bytes) -> DNSRecord:
        stream = await via.connect_tcp(host, port)
        async with stream:
            return await _stream_exchange(stream, wire)

    async def _udp_via(self, via: Outbound, ip: IPAddress, port: int, wire: bytes,
                       request: DNSRecord) -> DNSRecord:
        """One UDP query through an outbound that carries UDP (a SOCKS5
        association: replies come with its UDP header)."""
        (qid,) = struct.unpack_from("!H", wire)
        peer = await via.open_udp(ip, port)
        if peer is None:
            raise _AttemptFailed(f"{via.name} drops UDP")
        try:
            await trio.lowlevel.wait_writable(peer.sock)
            peer.sock.send(peer.header + wire)
            while True:
                await trio.lowlevel.wait_readable(peer.sock)
                try:
                    data = peer.sock.recv(MAX_MESSAGE + 512)
                except BlockingIOError:
                    continue
                try:
                    payload = parse_udp(data).payload if peer.socks else data
                    reply = DNSRecord.parse(payload)
                except (Socks5Error, DNSError, ValueError, IndexError, struct.error):
                    continue
                if reply.header.id == qid and cache_key(reply) == cache_key(request):
                    return reply
        finally:
            with trio.CancelScope(shield=True):
                await peer.aclose()

    async def _dot(self, ns: Nameserver, wire: bytes, via: Outbound | None) -> DNSRecord:
        """DNS over TLS (RFC 7858): TCP framing inside TLS to port 853,
        SNI and certificate check by `ns.host`. Connections are kept for
        the next queries (RFC 7858 section 3.4: a handshake per query would
        cost two round trips each): one that answered goes back to the
        idle set; one the server has closed meanwhile fails its exchange
        and the query goes on with the next idle one or a new one. A
        connection whose exchange was cancelled (a lost race, the deadline)
        is closed, its state unknown. At most `_DOT_CONNECTIONS` queries
        (so connections) per server at once; more wait their turn within
        their deadline (servers cap TCP clients: unbound's default is 10,
        past which it resets new connections)."""
        key = (ns, None if via is None else via.name)
        slots = self._dot_slots.get(key)
        if slots is None:
            slots = self._dot_slots[key] = trio.Semaphore(_DOT_CONNECTIONS)
        async with slots:
            return await self._dot_exchange(key, ns, wire, via)

    async def _dot_exchange(self, key: tuple[Nameserver, str | None], ns: Nameserver,
                            wire: bytes, via: Outbound | None) -> DNSRecord:
        idle = self._dot_idle.setdefault(key, [])
        while idle:
            tls = idle.pop()
            try:
                reply = await _stream_exchange(tls, wire)
            except (_AttemptFailed, trio.BrokenResourceError, trio.ClosedResourceError,
                    OSError, ssl.SSLError):
                await trio.aclose_forcefully(tls)
                continue
            except BaseException:
                await trio.aclose_forcefully(tls)
                raise
            await self._dot_keep(key, tls)
            return reply
        tls = await self._dot_connect(ns, via)
        try:
            reply = await _stream_exchange(tls, wire)
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        await self._dot_keep(key, tls)
        return reply

    async def _dot_keep(self, key: tuple[Nameserver, str | None],
                        tls: trio.SSLStream[Any]) -> None:
        idle = self._dot_idle.setdefault(key, [])
        if self._open and len(idle) < _DOT_IDLE_MAX:
            idle.append(tls)
        else:
            await trio.aclose_forcefully(tls)

    async def _dot_connect(self, ns: Nameserver, via: Outbound | None) -> trio.SSLStream[Any]:
        if via is not None:
            transport: trio.abc.Stream = await via.connect_tcp(_ip(ns.host) or ns.host, ns.port)
        else:
            ip = _ip(ns.host)
            addresses = [ip] if ip is not None else [
                ipaddress.ip_address(a) for a in await self._bootstrap(ns.host)]
            try:
                transport = await open_marked_tcp(addresses, ns.port, mark=self._mark)
            except OutboundError as exc:
                raise _AttemptFailed(f"cannot connect: {exc}") from exc
        tls = trio.SSLStream(transport, self._tls_context(not ns.skip_cert_verify),
                             server_hostname=ns.host)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        self.dot_connects += 1
        return tls

    def _tls_context(self, verify: bool) -> ssl.SSLContext:
        ctx = self._tls_contexts.get(verify)
        if ctx is None:
            ctx = self._tls_contexts[verify] = make_ssl_context(self._dns.ca_file, verify=verify)
        return ctx

    def _doh_client(self, via: Outbound | None, verify: bool) -> httpx.AsyncClient:
        key = (None if via is None else via.name, verify)
        client = self._clients.get(key)
        if client is None:
            if not self._open:
                raise _AttemptFailed("resolver used outside `async with`")
            client = self._clients[key] = self._make_client(key[0], verify=verify)
        return client

    async def _doh(self, ns: Nameserver, wire: bytes, via: Outbound | None = None) -> bytes:
        client = self._doh_client(via, not ns.skip_cert_verify)
        req = encode_request(with_zero_id(wire), ns.path.partition("#")[0], doh_method(ns))
        name = None if _ip(ns.host) is not None else ns.host
        # Through an outbound the name goes to the proxy; else bootstrapped.
        addresses = [ns.host] if name is None or via is not None else await self._bootstrap(name)
        # The URL keeps the name, so SNI, the certificate check, :authority and
        # httpx's connection pool all go by the name; _Backend connects to
        # the bootstrapped address set in _CONNECT_TO.
        host = f"[{ns.host}]" if ":" in ns.host else ns.host
        authority = host if ns.port == 443 else f"{host}:{ns.port}"
        headers = dict(req.headers)
        # httpx adds no Host header to a request built with its own stream.
        headers["host"] = authority
        if req.method == "POST":
            headers["content-length"] = str(len(req.body))
        failure: Exception | None = None
        for address in addresses:
            request = httpx.Request(
                req.method,
                f"https://{host}:{ns.port}{req.target}",
                headers=headers,
                stream=_Body(req.body) if req.method == "POST" else None,
            )
            token = _CONNECT_TO.set(address)
            try:
                response = await self._send(client, request)
            except httpx.ConnectError as exc:
                # Try the bootstrapped name's next address.
                failure = exc
                continue
            finally:
                _CONNECT_TO.reset(token)
            try:
                # A DNS message fits 65535 octets; refuse more before reading.
                length = response.headers.get("content-length")
                if length is not None and (not length.isdigit() or int(length) > MAX_MESSAGE):
                    raise DohError(f"content-length {length} is no DNS message")
                body = await response.aread()
            finally:
                await response.aclose()
            return decode_response(
                response.status_code, response.headers.get("content-type"), body
            )
        raise _AttemptFailed(
            f"cannot connect to {', '.join(addresses)}: "
            + (_reason(failure) if failure is not None else "")
        )

    async def _send(self, client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        """Send on a pooled connection; once more on a fresh one if the pooled
        connection turns out dead. httpcore cannot always tell an idle HTTP/2
        connection whose server restarted from a live one until a request on
        it fails (EPIPE, GOAWAY); that must not fail the query while the
        server is up. The failed connection has left the pool by then."""
        try:
            return await client.send(request, stream=True)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            log.debug("DoH connection to %s failed (%s); retrying once", request.url, exc)
            return await client.send(request, stream=True)

    async def _bootstrap(self, name: str) -> list[str]:
        """Addresses of a DoH host name, from `default-nameserver` only."""
        servers = [ns for ns in self._dns.default_nameserver if _ip(ns.host) is not None]
        if not servers:
            raise _AttemptFailed(f"no default-nameserver (IP) to resolve DoH host {name}")
        qtypes = [QTYPE.A, QTYPE.AAAA] if self._dns.ipv6 else [QTYPE.A]
        addresses: list[str] = []
        for qtype in qtypes:
            request = DNSRecord.question(name, QTYPE.get(qtype))
            reply = self._bootstrap_cache.get(request, trio.current_time())
            if reply is None:
                reply = await self._race(servers, request, f"bootstrap {name} {QTYPE.get(qtype)}")
                self._bootstrap_cache.put(reply, trio.current_time())
            addresses += [str(rr.rdata) for rr in reply.rr if rr.rtype == qtype]
            if addresses:
                break
        if not addresses:
            raise _AttemptFailed(f"default-nameserver has no address for DoH host {name}")
        return addresses

    # -- for the DIRECT outbound ----------------------------------------------

    async def resolve_proxy_server_ips(
        self, name: str, family: int = 4
    ) -> tuple[list[IPAddress], int]:
        """`resolve_ips` for a proxy's own server name (proxy-server-nameserver)."""
        return await self.resolve_ips(name, family, purpose="proxy-server")

    async def resolve_direct_ips(self, name: str, family: int = 4) -> tuple[list[IPAddress], int]:
        """`resolve_ips` for DIRECT's destinations (direct-nameserver)."""
        return await self.resolve_ips(name, family, purpose="direct")

    async def resolve_ips(
        self, name: str, family: int = 4, purpose: Purpose = "main"
    ) -> tuple[list[IPAddress], int]:
        """Addresses of `name` (A for family 4, AAAA for 6) and the seconds they
        stay valid. An IP literal or a `hosts` entry answers locally; an
        NXDOMAIN/NODATA answer gives `([], negative TTL)`; UpstreamError as
        for `query`. Never asks the system resolver.
        """
        if family not in (4, 6):
            raise ValueError("family must be 4 or 6")
        literal = _ip(name)
        if literal is not None:
            return ([literal] if literal.version == family else []), _STATIC_TTL
        key = name.rstrip(".").lower()
        if key in self._hosts:
            found = [ip for ip in self._hosts[key] if ip.version == family]
            return found, _STATIC_TTL
        qtype = QTYPE.A if family == 4 else QTYPE.AAAA
        reply = await self.query(DNSRecord.question(key, QTYPE.get(qtype)), purpose)
        records = [rr for rr in reply.rr if rr.rtype == qtype]
        if records:
            ips = [ipaddress.ip_address(str(rr.rdata)) for rr in records]
            return ips, min(rr.ttl for rr in records)
        return [], cache_ttl(reply) or 0
