"""The real resolver: DoH (RFC 8484, HTTP/2), plain UDP and TCP nameservers.

`Resolver` implements `upstream_api.Upstream` for the DNS service and
`resolve_ips` for the DIRECT outbound. Per query:

1. cache (cache.py; TTL-honouring, LRU-bounded, negative answers per RFC 2308);
2. join an identical query already in flight (one upstream request, many
   waiters), else lead one;
3. choose nameservers: the first `nameserver-policy` entry whose pattern
   matches the name (config order, as mihomo), else `nameserver`;
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
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import certifi
import httpcore
import httpx
import trio
from dnslib import QTYPE, RCODE, DNSError, DNSRecord
from httpcore._backends import base as httpcore_base

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
from appliance.dns.upstream_api import UpstreamError
from appliance.names import DomainTrie
from appliance.sockopt import SO_MARK, set_mark

log = logging.getLogger(__name__)

# Head start each nameserver gets before the next one is asked too.
STAGGER = 0.25
_BOOTSTRAP_CACHE_SIZE = 256
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
    """GET when the nameserver's config text carries `#method=GET`, else POST."""
    _, _, fragment = ns.text.partition("#")
    for param in fragment.split("&"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "method" and value.strip().upper() == "GET":
            return "GET"
    return "POST"


def make_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """Client TLS context for DoH servers (see the module docstring for what
    it trusts). Raises OSError/ssl.SSLError if `ca_file` is unreadable."""
    # create_default_context() loads OpenSSL's default paths, which are
    # SSL_CERT_FILE / SSL_CERT_DIR when those are set.
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=certifi.where())
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


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


class _Transport(httpx.AsyncHTTPTransport):
    """httpx's HTTP/1.1+HTTP/2 transport on `_Backend`.

    httpx takes no network backend argument, so the connection pool it built
    is replaced by an identical one that has ours (`_pool` is the attribute
    all of AsyncHTTPTransport's methods use, since httpx 0.18).
    """

    def __init__(
        self, ssl_context: ssl.SSLContext, socket_options: list[tuple[int, int, int]] | None
    ) -> None:
        super().__init__(verify=ssl_context, http2=True, socket_options=socket_options)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            http1=True,
            http2=True,
            retries=0,
            socket_options=socket_options,
            network_backend=_Backend(),
        )


@dataclass
class _Flight:
    """A query in flight that identical queries wait for."""

    done: trio.Event
    wire: bytes | None = None
    error: UpstreamError | None = None


class Resolver:
    """Upstream resolver over DoH/UDP/TCP with cache, policy and racing.

    Use as `async with Resolver(dns, routing_mark) as resolver:`; `query`
    and `resolve_ips` are valid only inside. See the module docstring.
    """

    def __init__(self, dns: DnsConfig, routing_mark: int | None = None) -> None:
        self._dns = dns
        self._mark = routing_mark
        self._timeout = dns.upstream_timeout
        self._cache = DnsCache(dns.cache_size)
        self._bootstrap_cache = DnsCache(_BOOTSTRAP_CACHE_SIZE)
        self._policy: DomainTrie[tuple[Nameserver, ...]] = DomainTrie(
            (p.pattern, p.nameservers) for p in dns.nameserver_policy
        )
        self._hosts = dict(dns.hosts)
        self._inflight: dict[CacheKey, _Flight] = {}
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Resolver:
        options = None
        if self._mark is not None:
            options = [(socket.SOL_SOCKET, SO_MARK, self._mark)]
        transport = _Transport(make_ssl_context(self._dns.ca_file), options)
        # trust_env=False: proxy variables must never route DNS through a
        # proxy (TLS trust from the environment is handled above).
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(self._timeout),
            trust_env=False,
            follow_redirects=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await client.aclose()

    @property
    def cache(self) -> DnsCache:
        return self._cache

    def nameservers_for(self, name: str) -> tuple[Nameserver, ...]:
        """The nameservers asked for `name`: first matching policy, else the default list."""
        chosen = self._policy.first(name)
        return chosen if chosen is not None else self._dns.nameserver

    # -- the Upstream protocol ------------------------------------------------

    async def query(self, request: DNSRecord) -> DNSRecord:
        """Resolve `request` (exactly one question); UpstreamError on failure
        or after `dns.upstream_timeout` seconds."""
        key = cache_key(request)
        if key is None or len(request.questions) != 1:
            raise UpstreamError("a query must carry exactly one question")
        deadline = trio.current_time() + self._timeout
        # Bounded: each round either answers, raises, or follows a leader that
        # was cancelled from outside; the deadline ends that too.
        while True:
            cached = self._cache.get(request, trio.current_time())
            if cached is not None:
                return cached
            flight = self._inflight.get(key)
            if flight is None:
                return await self._lead(request, key, deadline)
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

    async def _lead(self, request: DNSRecord, key: CacheKey, deadline: float) -> DNSRecord:
        flight = _Flight(trio.Event())
        self._inflight[key] = flight
        try:
            reply = await self._resolve(request, self.nameservers_for(key[0]), deadline)
            self._cache.put(reply, trio.current_time())
            flight.wire = reply.pack()
            return _for_request(flight.wire, request)
        except UpstreamError as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[key]
            flight.done.set()

    async def _resolve(
        self, request: DNSRecord, servers: Sequence[Nameserver], deadline: float
    ) -> DNSRecord:
        q = request.q
        what = f"{str(q.qname).rstrip('.') or '.'} {QTYPE.get(q.qtype)}"
        if not servers:
            raise UpstreamError(f"{what}: no nameserver configured")
        if self._client is None:
            raise UpstreamError("resolver used outside `async with`")
        errors: list[str] = []
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
            except (_AttemptFailed, UpstreamError, DohError, httpx.HTTPError, OSError) as exc:
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

    # -- transports -------------------------------------------------------------

    async def _exchange(self, ns: Nameserver, request: DNSRecord) -> DNSRecord:
        wire = request.pack()
        if ns.scheme == "https":
            return _parse(await self._doh(ns, wire))
        ip = _ip(ns.host)
        if ip is None:
            raise _AttemptFailed("plain nameservers need an IP address")
        qid = secrets.randbits(16)
        if ns.scheme == "udp":
            reply = await self._udp(ip, ns.port, _with_id(wire, qid), request)
            if not reply.header.tc:
                return reply
            # RFC 7766 section 5: a truncated UDP answer is retried over TCP.
        return await self._tcp(ip, ns.port, _with_id(wire, qid))

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
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
            buf = bytearray()
            need = 2
            while len(buf) < need:
                chunk = await stream.receive_some(MAX_MESSAGE)
                if not chunk:
                    raise _AttemptFailed("TCP connection closed before the reply")
                buf += chunk
                if need == 2 and len(buf) >= 2:
                    need = 2 + struct.unpack_from("!H", buf)[0]
            reply = _parse(bytes(buf[2:need]))
        (qid,) = struct.unpack_from("!H", wire)
        if reply.header.id != qid:
            raise _AttemptFailed("TCP reply with another ID")
        return reply

    async def _doh(self, ns: Nameserver, wire: bytes) -> bytes:
        assert self._client is not None
        req = encode_request(with_zero_id(wire), ns.path.partition("#")[0], doh_method(ns))
        name = None if _ip(ns.host) is not None else ns.host
        addresses = [ns.host] if name is None else await self._bootstrap(name)
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
                response = await self._send(request)
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

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """Send on a pooled connection; once more on a fresh one if the pooled
        connection turns out dead. httpcore cannot always tell an idle HTTP/2
        connection whose server restarted from a live one until a request on
        it fails (EPIPE, GOAWAY); that must not fail the query while the
        server is up. The failed connection has left the pool by then."""
        assert self._client is not None
        try:
            return await self._client.send(request, stream=True)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            log.debug("DoH connection to %s failed (%s); retrying once", request.url, exc)
            return await self._client.send(request, stream=True)

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

    async def resolve_ips(self, name: str, family: int = 4) -> tuple[list[IPAddress], int]:
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
        reply = await self.query(DNSRecord.question(key, QTYPE.get(qtype)))
        records = [rr for rr in reply.rr if rr.rtype == qtype]
        if records:
            ips = [ipaddress.ip_address(str(rr.rdata)) for rr in records]
            return ips, min(rr.ttl for rr in records)
        return [], cache_ttl(reply) or 0
