"""The proxy ports: `mixed-port` (SOCKS5 and HTTP proxy on one port),
`socks-port` (SOCKS5 only) and `port` (HTTP proxy only), as in Clash.

What this is for: clients that are configured to use a proxy (browsers,
`curl -x`, apps with a SOCKS setting) instead of being captured
transparently. Their flows take the same path as captured ones: the target
(a name, a real IP, or a fake IP that the client resolved through Mirage and
that the pool maps back to its name, the `curl -x socks5://` case) becomes a
`Flow` that goes through `dial` (the dispatcher's `connect_tcp`: rules ->
outbound), then `splice`, and shows up in the same `FlowRegistry` (so in the
control API's /connections).

Protocols, told apart by the first byte a client sends (RFC 1928 starts
with the version byte; no HTTP method starts with 0x04 or 0x05):

- 0x05: SOCKS5 (RFC 1928), optional username/password (RFC 1929) from the
  top-level `authentication: ["user:pass", ...]` list. CONNECT and UDP
  ASSOCIATE; BIND is answered "command not supported".
- 0x04: SOCKS4/4a is refused with its own reject reply (91), so the client
  reports "request rejected" instead of hanging.
- anything else: HTTP/1.x proxy request. CONNECT opens a tunnel; an
  absolute-URI request (`GET http://host/path`) is forwarded to the origin
  in origin-form, with hop-by-hop and Proxy-* headers removed and
  `Connection: close` added: one request per client connection (the
  response ends when the origin closes, so no response parsing is needed and
  a pipelined second request can never reach the wrong origin). Requests
  that carry `Upgrade` (WebSocket) keep it and become a two-way tunnel.

UDP ASSOCIATE: one UDP socket on the address the client reached us at (LAN
or loopback); each destination named in the client's datagrams gets its own
peer from `open_udp` (the dispatcher's `open_udp`, appliance/routing.py:
the rules pick DIRECT, a SOCKS5 proxy with `udp: true`, or REJECT). Fake
IPs map back to names as for TCP. The association ends
with its TCP control connection (RFC 1928 section 7) or after idle-timeout
without datagrams.

Where it listens (the appliance never serves the WAN side): the addresses of
the `appliance.lan` interfaces, read at start, plus 127.0.0.1 and ::1; with
no LAN interfaces (a plain host) or `allow-lan: false`, loopback only. A
`bind-address` other than `*` narrows the LAN side to that one address and
must be one of the LAN interfaces' addresses.

What it owns: the listening sockets, each accepted connection, the outbound
stream `dial` returned, UDP relay sockets, and one pool pin per fake IP a
live flow uses; all are released in `finally`.

How it fails: per connection, never for the port. A malformed request gets
the protocol's error reply (a SOCKS reply code, HTTP 400/407/431/502/...)
and the connection is closed; a dial failure is answered the same way
(SOCKS 0x02/0x04/0x05, HTTP 403/502/504). Bounded: a handshake must finish
within `Limits.handshake_timeout`, an HTTP head within `max_head` bytes, and
at most `max_connections` client connections are served at once (more are
reset at accept). Binding fails the service (OSError or ProxyPortError) so
the app can say which key is wrong.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import trio

from appliance.config.model import Config, IPAddress
from appliance.flow import Flow, Inbound, Network
from appliance.gateway.splice import FlowRecord, FlowRegistry, SpliceResult, abort, close, splice
from appliance.gateway.tcp import Dial, FakeIPs, accept_loop, ip_port
from appliance.outbound.base import UdpPeer, as_ip
from appliance.proto import socks5 as s5
from appliance.proto.http_connect import (
    DEFAULT_MAX_HEAD,
    Headers,
    HttpConnectError,
    ProxyRequest,
    encode_response,
    format_authority,
    parse_request,
)
from appliance.sockopt import IP_FREEBIND, IPV6_FREEBIND

log = logging.getLogger(__name__)

BACKLOG = 512
RECV = 64 * 1024

Sniffed = Literal["socks5", "socks4", "http"]


class ProxyPortError(Exception):
    """The proxy ports cannot start: bad bind-address, missing LAN interface."""


# =============================================================================
# Protocol logic without I/O (tests/unit/test_mixed_sniff.py)


def sniff(first: int) -> Sniffed:
    """Which protocol a connection speaks, from its first byte."""
    if first == s5.VERSION:
        return "socks5"
    if first == 0x04:
        return "socks4"
    return "http"


# SOCKS4 reply: VN=0, CD=91 "request rejected or failed", port and IP zero.
SOCKS4_REJECT = bytes([0x00, 0x5B, 0, 0, 0, 0, 0, 0])
# RFC 1928: "X'FF' NO ACCEPTABLE METHODS"; RFC 1929: status != 0 is failure.
SOCKS_NO_METHOD = s5.encode_method_selection(s5.METHOD_NO_ACCEPTABLE)
SOCKS_AUTH_FAILED = s5.encode_userpass_status(False)


class Authenticator:
    """The users of `authentication: ["user:pass"]`. Empty: no auth asked.

    Every configured user is compared in constant time, so the answer's
    timing does not tell which names exist."""

    def __init__(self, users: Iterable[tuple[str, str]] = ()) -> None:
        self._users = tuple((u.encode(), p.encode()) for u, p in users)

    @property
    def required(self) -> bool:
        return bool(self._users)

    def check(self, username: str, password: str) -> bool:
        u, p = username.encode(), password.encode()
        ok = False
        for user, pw in self._users:
            ok |= hmac.compare_digest(u, user) & hmac.compare_digest(p, pw)
        return ok


# -- refusals: one vocabulary for SOCKS replies and HTTP statuses --------------

Refusal = Literal["unmapped", "rejected", "refused", "timeout", "unreachable", "bad-target"]

SOCKS_REPLY: dict[Refusal, int] = {
    "unmapped": s5.REP_HOST_UNREACHABLE,
    "rejected": s5.REP_NOT_ALLOWED,
    "refused": s5.REP_CONNECTION_REFUSED,
    "timeout": s5.REP_HOST_UNREACHABLE,
    "unreachable": s5.REP_HOST_UNREACHABLE,
    "bad-target": s5.REP_GENERAL_FAILURE,
}
HTTP_STATUS: dict[Refusal, int] = {
    "unmapped": 502,
    "rejected": 403,
    "refused": 502,
    "timeout": 504,
    "unreachable": 502,
    "bad-target": 400,
}
REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def classify_dial_error(reason: str) -> Refusal:
    """Map an outbound's failure text (OutboundError.reason) to a refusal."""
    text = reason.lower()
    if text == "rejected":  # RejectOutbound's exact reason
        return "rejected"
    if "timed out" in text or "no connection within" in text:
        return "timeout"
    if "refused" in text:
        return "refused"
    return "unreachable"


def http_error(status: int, text: str, headers: Headers = ()) -> bytes:
    """A complete error response; the connection closes after it."""
    body = (text.rstrip() + "\n").encode("utf-8", "replace")
    head = encode_response(
        status,
        REASONS.get(status, "Error"),
        (
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *headers,
        ),
    )
    return head + body


PROXY_AUTH_REQUIRED = http_error(
    407, "proxy authentication required", (("Proxy-Authenticate", 'Basic realm="mirage"'),)
)
CONNECT_OK = encode_response(200, "Connection established")


# -- forwarding an absolute-URI request ----------------------------------------

# RFC 9110 section 7.6.1 hop-by-hop fields, plus the Proxy-* ones a proxy
# consumes. Transfer-Encoding stays: the body is relayed as received, so its
# framing must go with it.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)


def _values(headers: Headers, name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def _tokens(values: Iterable[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def origin_request(req: ProxyRequest) -> tuple[bytes, bool]:
    """The head to send to the origin for an absolute-URI request, and
    whether it is an upgrade (then the connection becomes a tunnel).

    Request line in origin-form; Host set to the request-target's authority
    (RFC 9112 section 3.2.2: a proxy replaces Host); hop-by-hop fields and
    the fields that `Connection` names are dropped; `Connection: close` is
    added, or `Connection: upgrade` + `Upgrade` for an upgrade request.
    """
    named = set(_tokens(_values(req.headers, "connection")))
    upgrade_to = _values(req.headers, "upgrade")
    upgrade = "upgrade" in named and bool(upgrade_to)
    drop = HOP_BY_HOP | named | {"host"}
    if req.port != 80:
        host = format_authority(req.host, req.port)
    else:
        host = f"[{req.host}]" if ":" in req.host else req.host
    lines = [f"{req.method} {req.path} HTTP/{req.version}", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in drop]
    if upgrade:
        lines += [f"Upgrade: {upgrade_to[0]}", "Connection: upgrade"]
    else:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), upgrade


class BodyFramer:
    """Which of the client's bytes after a request head are its body.

    RFC 9112 section 6.3 for requests: chunked if Transfer-Encoding ends in
    chunked, else Content-Length, else no body. `feed(data)` returns how many
    leading bytes of `data` belong to the body; once `done`, the rest is a
    next request, which this proxy does not serve (one request per
    connection). Malformed framing raises HttpConnectError(400).
    """

    MAX_LINE = 4096  # a chunk-size line with extensions, or a trailer line
    MAX_TRAILERS = 16 * 1024

    def __init__(self, *, length: int = 0, chunked: bool = False) -> None:
        self.chunked = chunked
        self._remaining = length
        self._line = b""
        self._trailers = 0
        if chunked:
            self._state = "size"
        else:
            self._state = "data" if length > 0 else "done"

    @property
    def done(self) -> bool:
        return self._state == "done"

    @classmethod
    def for_request(cls, req: ProxyRequest) -> BodyFramer:
        te = _tokens(_values(req.headers, "transfer-encoding"))
        cl = _values(req.headers, "content-length")
        if te:
            if cl:
                # Both: the classic request-smuggling shape; refuse it.
                raise HttpConnectError("both Transfer-Encoding and Content-Length", 400)
            if te[-1] != "chunked" or req.version == "1.0":
                raise HttpConnectError(f"unsupported Transfer-Encoding {te!r}", 400)
            return cls(chunked=True)
        if cl:
            values = {v.strip() for v in _tokens(cl)}
            if len(values) != 1:
                raise HttpConnectError("conflicting Content-Length values", 400)
            (text,) = values
            if not text.isascii() or not text.isdigit() or len(text) > 18:
                raise HttpConnectError(f"bad Content-Length {text[:20]!r}", 400)
            return cls(length=int(text))
        return cls()

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        buf = bytes(data)
        i, n = 0, len(buf)
        while i < n and self._state != "done":
            if self._state == "data":
                take = min(self._remaining, n - i)
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "crlf" if self.chunked else "done"
                continue
            j = buf.find(b"\n", i)
            end = n if j < 0 else j + 1
            self._line += buf[i:end]
            i = end
            if len(self._line) > self.MAX_LINE:
                raise HttpConnectError("chunked framing line too long", 400)
            if j >= 0:
                line, self._line = self._line, b""
                self._on_line(line)
        return i

    def _on_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise HttpConnectError("bare CR or LF in chunked framing", 400)
        body = line[:-2]
        if self._state == "size":
            size_text = body.split(b";", 1)[0].rstrip(b" \t")
            if (
                not size_text
                or len(size_text) > 16
                or not all(c in b"0123456789abcdefABCDEF" for c in size_text)
            ):
                raise HttpConnectError(f"bad chunk size {size_text[:20]!r}", 400)
            size = int(size_text, 16)
            if size == 0:
                self._state = "trailers"
            else:
                self._remaining = size
                self._state = "data"
        elif self._state == "crlf":
            if body:
                raise HttpConnectError("chunk data longer than its size", 400)
            self._state = "size"
        else:  # trailers
            if not body:
                self._state = "done"
                return
            self._trailers += len(line)
            if self._trailers > self.MAX_TRAILERS:
                raise HttpConnectError("chunked trailers too long", 400)


# -- where to listen -------------------------------------------------------------


@dataclass(frozen=True)
class BindAddress:
    """One local address to listen on; `scope_id` for IPv6 link-local."""

    host: str
    scope_id: int = 0

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.host).version

    def sockaddr(self, port: int) -> tuple[Any, ...]:
        if self.version == 6:
            return (self.host, port, 0, self.scope_id)
        return (self.host, port)

    def __str__(self) -> str:
        return f"[{self.host}]" if self.version == 6 else self.host


LOOPBACK = (BindAddress("127.0.0.1"), BindAddress("::1"))


def choose_bind_addresses(
    lan: Sequence[BindAddress], *, allow_lan: bool = True, bind_address: str = "*"
) -> list[BindAddress]:
    """Loopback plus the LAN side, never anything else.

    `lan` are the addresses of the `appliance.lan` interfaces. `allow-lan:
    false` keeps to loopback; `bind-address` other than `*` selects one LAN
    address (raises ProxyPortError if it is not one, e.g. a WAN address).
    """
    chosen: list[BindAddress] = list(LOOPBACK)
    if allow_lan:
        if bind_address in ("*", ""):
            chosen += lan
        else:
            try:
                want = ipaddress.ip_address(bind_address.strip("[]"))
            except ValueError:
                raise ProxyPortError(
                    f"bind-address {bind_address!r} is not an IP address"
                ) from None
            if not want.is_loopback:
                match = [a for a in lan if ipaddress.ip_address(a.host) == want]
                if not match:
                    raise ProxyPortError(
                        f"bind-address {bind_address} is not an address of the appliance.lan "
                        "interfaces (proxy ports are served on the LAN side only)"
                    )
                chosen += match
    out: list[BindAddress] = []
    for a in chosen:
        if a not in out:
            out.append(a)
    return out


def lan_addresses(interfaces: Sequence[str]) -> list[BindAddress]:
    """The IPv4 and IPv6 addresses of `interfaces`, read from the kernel.
    Blocking (pyroute2): call through trio.to_thread. Raises ProxyPortError
    for an interface that does not exist."""
    from pyroute2 import IPRoute

    out: list[BindAddress] = []
    with IPRoute() as ipr:
        for name in interfaces:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise ProxyPortError(f"appliance.lan: no interface named {name!r}")
            index = found[0]
            for msg in ipr.get_addr(index=index):
                text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if not text:
                    continue
                ip = ipaddress.ip_address(text)
                link_local = ip.version == 6 and ip.is_link_local
                out.append(BindAddress(str(ip), index if link_local else 0))
    return out


@dataclass(frozen=True)
class ProxyPort:
    """One configured proxy port: its config key and what it speaks."""

    key: str  # "mixed-port" | "socks-port" | "port"
    port: int
    socks: bool
    http: bool

    @property
    def inbound(self) -> Inbound:
        """What a flow taken here names as its inbound."""
        return "mixed" if self.key == "mixed-port" else "socks" if self.key == "socks-port" \
            else "http"


def proxy_ports(cfg: Config) -> list[ProxyPort]:
    """The proxy ports `cfg` asks for (Clash keys mixed-port, socks-port, port)."""
    out = []
    if cfg.mixed_port:
        out.append(ProxyPort("mixed-port", cfg.mixed_port, socks=True, http=True))
    socks_port = cfg.socks_port
    if socks_port:
        out.append(ProxyPort("socks-port", socks_port, socks=True, http=False))
    http_port = cfg.http_port
    if http_port:
        out.append(ProxyPort("port", http_port, socks=False, http=True))
    return out


@dataclass(frozen=True)
class Limits:
    """Bounds per connection and for the service."""

    handshake_timeout: float = 10.0
    max_head: int = DEFAULT_MAX_HEAD
    max_connections: int = 1024
    # UDP ASSOCIATE: open destinations (one peer each) per association.
    udp_max_targets: int = 1024


# =============================================================================
# The trio service


class _Refused(Exception):
    """A request we answer with an error and close (the reply is sent by
    the handler that knows the protocol)."""

    def __init__(self, refusal: Refusal, why: str) -> None:
        super().__init__(why)
        self.refusal = refusal
        self.why = why


@dataclass
class _Ask:
    """A handshake's outcome: what the client wants and how to answer it."""

    host: str | IPAddress
    port: int
    command: Literal["connect", "forward", "udp"]
    socks: s5.Socks5Server | None = None
    http: ProxyRequest | None = None
    rest: bytes = b""  # client bytes after the request (tunnel data or body)


@dataclass(eq=False)
class _Pins:
    """Pool pins one flow holds (released together in `finally`)."""

    pool: FakeIPs
    ips: list[str] = field(default_factory=list)

    def pin(self, ip: str) -> str | None:
        domain = self.pool.pin(ip)
        if domain is not None:
            self.ips.append(ip)
        return domain

    def release(self) -> None:
        while self.ips:
            self.pool.unpin(self.ips.pop())


class ProxyPorts:
    """The proxy-port service: listeners for every configured proxy port,
    the per-connection handshakes, and their flows in `registry`."""

    def __init__(
        self,
        cfg: Config,
        pool: FakeIPs,
        dial: Dial,
        registry: FlowRegistry | None = None,
        *,
        open_udp: OpenUdp | None = None,
        limits: Limits | None = None,
        ports: Sequence[ProxyPort] | None = None,
        addresses: Sequence[BindAddress] | None = None,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.dial = dial
        self.registry = registry if registry is not None else FlowRegistry()
        self.open_udp = open_udp
        self.limits = limits if limits is not None else Limits()
        self.ports = list(ports) if ports is not None else proxy_ports(cfg)
        self.addresses = list(addresses) if addresses is not None else None
        self.auth = Authenticator(cfg.authentication)
        self.active = 0
        self.refused_over_limit = 0
        # (key, address, port) actually bound; filled by serve().
        self.bound: list[tuple[str, str, int]] = []

    # -- listening --------------------------------------------------------------

    async def bind_addresses(self) -> list[BindAddress]:
        if self.addresses is not None:
            return self.addresses
        lan: list[BindAddress] = []
        if self.cfg.appliance.lan:
            lan = await trio.to_thread.run_sync(lan_addresses, self.cfg.appliance.lan)
        return choose_bind_addresses(
            lan,
            allow_lan=self.cfg.allow_lan,
            bind_address=self.cfg.bind_address,
        )

    async def _listen(
        self, spec: ProxyPort, addresses: Sequence[BindAddress]
    ) -> list[trio.SocketListener]:
        """One listening socket per address, all on one port (port 0: the
        first socket's kernel-chosen port for all). ::1 is skipped when the
        host has no IPv6; any other failure raises OSError."""
        port = spec.port
        listeners: list[trio.SocketListener] = []
        try:
            for a in addresses:
                family = socket.AF_INET6 if a.version == 6 else socket.AF_INET
                try:
                    sock = trio.socket.socket(family, socket.SOCK_STREAM)
                except OSError:
                    if a in LOOPBACK:
                        continue  # no IPv6 at all on this host
                    raise
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        # An address still in IPv6 DAD ("tentative") at boot
                        # can be bound all the same.
                        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
                    else:
                        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                    try:
                        await sock.bind(a.sockaddr(port))
                    except OSError as err:
                        if a == LOOPBACK[1] and err.errno != errno.EADDRINUSE:
                            # No ::1 here (IPv6 disabled on lo): loopback v4 suffices.
                            sock.close()
                            continue
                        raise OSError(err.errno, f"{spec.key} {a}:{port}: {err.strerror}") from None
                    sock.listen(BACKLOG)
                except BaseException:
                    sock.close()
                    raise
                if port == 0:
                    port = sock.getsockname()[1]
                listeners.append(trio.SocketListener(sock))
                self.bound.append((spec.key, a.host, port))
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        return listeners

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        addresses = await self.bind_addresses()
        async with trio.open_nursery() as nursery:
            for spec in self.ports:
                listeners = await self._listen(spec, addresses)
                log.info(
                    "%s: %s proxy on %s port %d",
                    spec.key,
                    "+".join(k for k, on in (("socks5", spec.socks), ("http", spec.http)) if on),
                    ", ".join(str(a) for a in addresses),
                    listeners[0].socket.getsockname()[1] if listeners else spec.port,
                )
                handler = partial(self.handle, spec)
                for listener in listeners:
                    nursery.start_soon(accept_loop, listener, handler, nursery, spec.key)
            task_status.started(list(self.bound))

    # -- one client connection ----------------------------------------------------

    async def handle(self, spec: ProxyPort, stream: trio.SocketStream) -> None:
        """One client connection, from accept to close (always closed when
        this returns or raises: `accept_loop` leaves that to us)."""
        if self.active >= self.limits.max_connections:
            self.refused_over_limit += 1
            log.warning("proxy ports: %d connections already; resetting a new one", self.active)
            await abort(stream)
            return
        self.active += 1
        pins = _Pins(self.pool)
        try:
            try:
                src = ip_port(stream.socket.getpeername())
                local = stream.socket.getsockname()
            except OSError:
                return
            with trio.move_on_after(self.limits.handshake_timeout) as handshake:
                ask = await self._handshake(spec, stream, src)
            if handshake.cancelled_caught:
                log.info(
                    "%s %s:%d: no complete request within %gs; closing",
                    spec.key,
                    *src,
                    self.limits.handshake_timeout,
                )
                return
            if ask is not None:
                await self._serve(stream, ask, src, local, pins, spec.inbound)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("%s: client connection ended: %r", spec.key, exc)
        finally:
            pins.release()
            self.active -= 1
            await stream.aclose()

    async def _handshake(
        self, spec: ProxyPort, stream: trio.SocketStream, src: tuple[str, int]
    ) -> _Ask | None:
        first = await stream.receive_some(RECV)
        if not first:
            return None
        kind = sniff(first[0])
        if kind == "socks4" and spec.socks:
            log.info("%s %s:%d: SOCKS4 request refused (only SOCKS5 is served)", spec.key, *src)
            await stream.send_all(SOCKS4_REJECT)
            return None
        if kind == "socks5" and spec.socks:
            return await self._socks_handshake(spec, stream, src, first)
        if spec.http:
            if kind != "http":
                await self._http_refuse(stream, 400, f"{kind} on an HTTP-only proxy port")
                log.info("%s %s:%d: %s on the HTTP proxy port; refused", spec.key, *src, kind)
                return None
            return await self._http_handshake(spec, stream, src, bytearray(first))
        log.info("%s %s:%d: not SOCKS5 (first byte %#04x); closing", spec.key, *src, first[0])
        return None

    async def _socks_handshake(
        self, spec: ProxyPort, stream: trio.SocketStream, src: tuple[str, int], data: bytes
    ) -> _Ask | None:
        server = s5.Socks5Server(require_auth=self.auth.required)
        try:
            event = server.receive_data(data)
            while True:
                out = server.data_to_send()
                if out:
                    await stream.send_all(out)
                if isinstance(event, s5.AuthRequest):
                    ok = self.auth.check(event.username, event.password)
                    if not ok:
                        server.auth_result(False)
                        await stream.send_all(server.data_to_send())
                        log.warning("%s %s:%d: SOCKS5 username/password refused", spec.key, *src)
                        return None
                    event = server.auth_result(True)
                    continue
                if isinstance(event, s5.Request):
                    break
                data = await stream.receive_some(RECV)
                if not data:
                    return None
                event = server.receive_data(data)
        except s5.Socks5Error as err:
            await stream.send_all(server.data_to_send() + self._socks_error_bytes(server, err))
            log.info("%s %s:%d: bad SOCKS5 request: %s", spec.key, *src, err)
            await _linger_close(stream)
            return None
        assert isinstance(event, s5.Request)
        if event.command == s5.CMD_CONNECT:
            command: Literal["connect", "udp"] = "connect"
        elif event.command == s5.CMD_UDP_ASSOCIATE:
            command = "udp"
        else:
            server.reply(s5.REP_COMMAND_NOT_SUPPORTED)
            await stream.send_all(server.data_to_send())
            log.info("%s %s:%d: SOCKS5 BIND is not supported", spec.key, *src)
            return None
        return _Ask(event.host, event.port, command, socks=server, rest=server.trailing_data)

    @staticmethod
    def _socks_error_bytes(server: s5.Socks5Server, err: s5.Socks5Error) -> bytes:
        """The reply that fits the stage the handshake failed in."""
        state = server.state
        if state is s5.ServerState.GREETING:
            return SOCKS_NO_METHOD
        if state is s5.ServerState.CLOSED:
            return b""  # the state machine already queued its answer (0xFF)
        if state is s5.ServerState.AUTH:
            return SOCKS_AUTH_FAILED
        return s5.encode_reply(err.reply)

    async def _http_handshake(
        self, spec: ProxyPort, stream: trio.SocketStream, src: tuple[str, int], buf: bytearray
    ) -> _Ask | None:
        while True:
            try:
                parsed = parse_request(buf, self.limits.max_head)
            except HttpConnectError as err:
                await self._http_refuse(stream, err.status, str(err))
                log.info("%s %s:%d: bad HTTP proxy request: %s", spec.key, *src, err)
                return None
            if parsed is not None:
                break
            data = await stream.receive_some(RECV)
            if not data:
                return None
            buf += data
        req, end = parsed
        if self.auth.required:
            creds = req.credentials()
            if creds is None or not self.auth.check(*creds):
                await stream.send_all(PROXY_AUTH_REQUIRED)
                log.warning(
                    "%s %s:%d: HTTP proxy request without valid credentials%s",
                    spec.key,
                    *src,
                    "" if creds is None else f" (user {creds[0]!r})",
                )
                await _linger_close(stream)
                return None
        command: Literal["connect", "forward"] = "connect" if req.method == "CONNECT" else "forward"
        return _Ask(req.host, req.port, command, http=req, rest=bytes(buf[end:]))

    async def _http_refuse(self, stream: trio.SocketStream, status: int, why: str) -> None:
        await stream.send_all(http_error(status, why))
        await _linger_close(stream)

    async def _refuse(self, stream: trio.SocketStream, ask: _Ask, refusal: _Refused) -> None:
        if ask.socks is not None:
            ask.socks.reply(SOCKS_REPLY[refusal.refusal])
            await stream.send_all(ask.socks.data_to_send())
        else:
            await self._http_refuse(stream, HTTP_STATUS[refusal.refusal], refusal.why)

    # -- after the handshake --------------------------------------------------------

    def _target(
        self, host: str | IPAddress, port: int, src: tuple[str, int], pins: _Pins,
        inbound: Inbound, network: Network = "tcp",
    ) -> Flow:
        """The Flow for a requested host: a name as is, a fake IP as its
        name (pinned), a real IP as the destination. Raises _Refused."""
        client = ipaddress.ip_address(src[0])
        ip = as_ip(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip is None:
            name = str(host).rstrip(".").lower()
            if not name:
                raise _Refused("bad-target", f"bad host name {host!r}")
            return Flow(network, inbound, client, src[1], None, port, name)
        if self.pool.is_fake(ip):
            domain = pins.pin(str(ip))
            if domain is None:
                self.registry.unmapped += 1
                raise _Refused(
                    "unmapped",
                    f"fake IP {ip} is not mapped (expired, or issued before a restart)",
                )
            return Flow(network, inbound, client, src[1], ip, port, domain)
        return Flow(network, inbound, client, src[1], ip, port, None)

    async def _serve(
        self,
        stream: trio.SocketStream,
        ask: _Ask,
        src: tuple[str, int],
        local: Any,
        pins: _Pins,
        inbound: Inbound,
    ) -> None:
        where = f"{src[0]}:{src[1]} -> {format_authority(ask.host, ask.port)}"
        if ask.command == "udp":
            await self._udp_associate(stream, ask, src, local, pins, inbound)
            return
        try:
            target = self._target(ask.host, ask.port, src, pins, inbound)
            framer: BodyFramer | None = None
            head = b""
            upgrade = False
            if ask.command == "forward":
                assert ask.http is not None
                try:
                    framer = BodyFramer.for_request(ask.http)
                except HttpConnectError as err:
                    raise _Refused("bad-target", str(err)) from None
                head, upgrade = origin_request(ask.http)
            server = await self._dial(target, where)
        except _Refused as refusal:
            log.warning("proxy %s: %s", where, refusal.why)
            await self._refuse(stream, ask, refusal)
            return
        dst = str(target.dst) if target.dst is not None else ""
        flow = self.registry.open("tcp", src, (dst, target.dst_port), target.domain)
        flow.outbound = target.outbound
        log.debug("proxy %s: via %s", where, target.outbound or "?")
        result: SpliceResult | None = None
        try:
            if ask.socks is not None:
                bound = (
                    ip_port(server.socket.getsockname())
                    if isinstance(server, trio.SocketStream)
                    else ("0.0.0.0", 0)
                )
                ask.socks.reply(s5.REP_SUCCEEDED, *bound)
                await stream.send_all(ask.socks.data_to_send())
            elif ask.command == "connect":
                await stream.send_all(CONNECT_OK)
            rest = ask.rest
            if framer is not None and not upgrade:
                body = framer.feed(rest)
                rest = rest[:body]
            if head or rest:
                await server.send_all(head + rest)
                flow.add_up(len(head) + len(rest))
            if framer is not None and not upgrade:
                result = await _forward(
                    stream, server, framer, flow, self.cfg.appliance.idle_timeout
                )
                if result.reason != "error":
                    # One request per connection: end ours once the response is through.
                    await _linger_close(stream)
            else:
                result = await splice(
                    stream, server, idle_timeout=self.cfg.appliance.idle_timeout, meter=flow
                )
        finally:
            self.registry.close(flow, result)
            # Shielded: a cancelled first close must not skip the second.
            with trio.CancelScope(shield=True):
                if result is None or result.reason == "error":
                    await abort(stream)
                    await abort(server)
                else:
                    await close(server)
        log.debug(
            "proxy %s: %s%s (up %d, down %d bytes)",
            where,
            result.reason,
            f": {result.detail}" if result.detail else "",
            result.up,
            result.down,
        )

    async def _dial(self, target: Flow, where: str) -> trio.abc.Stream:
        timeout = self.cfg.appliance.connect_timeout
        try:
            with trio.fail_after(timeout):
                return await self.dial(target)
        except trio.TooSlowError:
            why = f"no connection within {timeout:g}s"
        except Exception as exc:  # dial is pluggable: any failure ends this flow only
            why = str(exc) or type(exc).__name__
            log.debug("proxy %s: dial failed", where, exc_info=True)
        self.registry.dial_failures += 1
        via = f" via {target.outbound}" if target.outbound else ""
        raise _Refused(classify_dial_error(why), f"dial{via} failed: {why}")

    # -- UDP ASSOCIATE ------------------------------------------------------------------

    async def _udp_associate(
        self, stream: trio.SocketStream, ask: _Ask, src: tuple[str, int], local: Any, pins: _Pins,
        inbound: Inbound,
    ) -> None:
        assert ask.socks is not None
        if self.open_udp is None:
            ask.socks.reply(s5.REP_COMMAND_NOT_SUPPORTED)
            await stream.send_all(ask.socks.data_to_send())
            log.info("proxy %s:%d: UDP ASSOCIATE refused: no UDP outbound given", *src)
            return
        family = stream.socket.family
        relay_sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            # On the address the client reached us at: a LAN or loopback one.
            if family == socket.AF_INET6:
                relay_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await relay_sock.bind((local[0], 0, 0, local[3]))
            else:
                await relay_sock.bind((local[0], 0))
            bound = ip_port(relay_sock.getsockname())
            ask.socks.reply(s5.REP_SUCCEEDED, *bound)
            await stream.send_all(ask.socks.data_to_send())
            flow = self.registry.open("udp", src, bound, None)
            relay = _UdpRelay(self, self.open_udp, relay_sock, src, ask, pins, flow, inbound)
            log.debug("proxy %s:%d: UDP ASSOCIATE relaying at %s:%d", *src, *bound)
            idle_timeout = self.cfg.appliance.idle_timeout
            try:
                async with trio.open_nursery() as nursery:
                    relay.nursery = nursery
                    nursery.start_soon(relay.from_client)
                    # RFC 1928 section 7: the association lives as long as
                    # its TCP connection, here also no longer than it idles.
                    nursery.start_soon(_cancel_at_eof, stream, nursery.cancel_scope)
                    # Datagrams move `relay.last`; the deadline is checked
                    # again when it fires instead of reset per datagram.
                    while trio.current_time() < relay.last + idle_timeout:
                        with trio.move_on_at(relay.last + idle_timeout):
                            await trio.sleep_forever()
                    nursery.cancel_scope.cancel()
            finally:
                self.registry.close(flow)
                with trio.CancelScope(shield=True):
                    await relay.aclose()
        finally:
            relay_sock.close()


# Route a UDP flow and open its outbound (`Dispatcher.open_udp`); None: REJECT.
OpenUdp = Callable[[Flow], Awaitable[UdpPeer | None]]


@dataclass(eq=False)
class _UdpDest:
    """One destination of an association, as the client named it."""

    host: str | IPAddress
    port: int
    peer: UdpPeer | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    retry_at: float = 0.0  # after a failed open: drop until then


class _UdpRelay:
    """One UDP association: client <-> relay socket <-> one peer per
    destination (opened through `open_udp`: the rules pick the outbound).

    Replies carry, in the SOCKS header, the address the client sent to (its
    fake IP or name), so a client that matches replies by address sees the
    one it used. Owns the peers it opened (closed by `aclose`).
    """

    FAILED_HOLD = 5.0

    def __init__(
        self,
        service: ProxyPorts,
        open_udp: OpenUdp,
        sock: trio.socket.SocketType,
        src: tuple[str, int],
        ask: _Ask,
        pins: _Pins,
        flow: FlowRecord,
        inbound: Inbound,
    ) -> None:
        self.service = service
        self.inbound: Inbound = inbound
        self.open_udp = open_udp
        self.sock = sock
        self.client_ip = src[0]
        hinted = as_ip(ask.host)
        # RFC 1928: DST.ADDR/PORT of the request is where the client will
        # send from, if it knows; zeros mean "not known yet".
        known = ask.port and hinted is not None and not hinted.is_unspecified
        self.client_port = ask.port if known else 0
        self.client_addr: Any = None
        self.pins = pins
        self.flow = flow
        self.nursery: trio.Nursery | None = None
        self.dests: dict[tuple[str, int], _UdpDest] = {}
        self.last = trio.current_time()

    async def aclose(self) -> None:
        dests, self.dests = list(self.dests.values()), {}
        for d in dests:
            d.scope.cancel()
            if d.peer is not None:
                await d.peer.aclose()

    async def from_client(self) -> None:
        while True:
            data, sender = await self.sock.recvfrom(65535)
            ip, port = ip_port(sender)
            if ip != self.client_ip or (self.client_port and port != self.client_port):
                continue  # only the client that asked may use the relay
            if self.client_addr is None:
                self.client_port = port
                self.client_addr = sender
            try:
                dgram = s5.parse_udp(data)
            except s5.Socks5Error:
                continue
            if dgram.frag:
                continue  # no reassembly (RFC 1928 makes it optional)
            self.last = trio.current_time()
            peer = await self._peer(dgram.host, dgram.port)
            if peer is None:
                continue
            try:
                peer.sock.send(peer.header + dgram.payload)
            except OSError as err:  # EAGAIN: a full buffer drops, as UDP may
                log.debug("udp relay: send via %s failed: %s", peer.outbound, err)
                continue
            self.flow.add_up(len(dgram.payload))

    async def _peer(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        key = (str(host).lower(), port)
        dest = self.dests.get(key)
        if dest is not None:
            if dest.peer is not None or trio.current_time() < dest.retry_at:
                return dest.peer
        else:
            limit = self.service.limits.udp_max_targets
            if len(self.dests) >= limit:
                # Close the oldest destination to make room.
                oldest = self.dests.pop(next(iter(self.dests)))
                oldest.scope.cancel()
                if oldest.peer is not None:
                    await oldest.peer.aclose()
            dest = self.dests[key] = _UdpDest(host, port)
        svc = self.service
        src = (self.client_ip, self.client_port)
        where = f"{src[0]}:{src[1]} -> {format_authority(host, port)}"
        try:
            target = svc._target(host, port, src, self.pins, self.inbound, "udp")
            with trio.fail_after(svc.cfg.appliance.connect_timeout):
                dest.peer = await self.open_udp(target)
        except _Refused as refusal:
            why = refusal.why
        except trio.TooSlowError:
            why = "timed out"
        except Exception as exc:  # the opener is pluggable: one destination fails
            why = str(exc) or type(exc).__name__
        else:
            self.flow.outbound = target.outbound
            if dest.peer is None:
                log.debug("udp relay %s: rejected by %s", where, target.outbound)
                dest.retry_at = trio.current_time() + self.FAILED_HOLD
                return None
            assert self.nursery is not None
            self.nursery.start_soon(self._from_peer, dest, dest.peer)
            log.debug("udp relay %s: via %s", where, dest.peer.outbound)
            return dest.peer
        dest.retry_at = trio.current_time() + self.FAILED_HOLD
        log.warning("udp relay %s: %s; dropping for %gs", where, why, self.FAILED_HOLD)
        return None

    async def _from_peer(self, dest: _UdpDest, peer: UdpPeer) -> None:
        with dest.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, peer, nursery.cancel_scope)
                await self._replies(dest, peer)
        if self.dests.get((str(dest.host).lower(), dest.port)) is dest and dest.peer is peer:
            # The peer went away (proxy closed its control connection):
            # open a new one for the next datagram.
            dest.peer = None
            await peer.aclose()

    @staticmethod
    async def _watch(peer: UdpPeer, scope: trio.CancelScope) -> None:
        await peer.watch()
        scope.cancel()

    async def _replies(self, dest: _UdpDest, peer: UdpPeer) -> None:
        sock = peer.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                continue  # ICMP error on the connected socket; the peer may come back
            if peer.socks:
                try:
                    d = s5.parse_udp(data)
                except s5.Socks5Error:
                    continue
                if d.frag:
                    continue
                data = d.payload
            if self.client_addr is None:
                continue
            try:
                wrapped = s5.encode_udp(dest.host, dest.port, data)
                await self.sock.sendto(wrapped, self.client_addr)
            except (OSError, s5.Socks5Error):
                continue
            self.last = trio.current_time()
            self.flow.add_down(len(data))


async def _forward(
    client: trio.SocketStream,
    server: trio.abc.Stream,
    framer: BodyFramer,
    flow: FlowRecord,
    idle_timeout: float,
) -> SpliceResult:
    """Relay the rest of one request's body up (no more than its framing
    says) and the response down until the origin closes."""
    result = SpliceResult()
    async with trio.open_nursery() as nursery:

        async def up() -> None:
            try:
                while not framer.done:
                    data = await client.receive_some(RECV)
                    if not data:
                        return
                    n = framer.feed(data)
                    await server.send_all(data[:n])
                    flow.add_up(n)
                    result.up += n
            except HttpConnectError as err:
                result.reason, result.detail = "error", f"up: {err}"
                nursery.cancel_scope.cancel()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
                result.reason, result.detail = "error", f"up: {err!r}"
                nursery.cancel_scope.cancel()

        nursery.start_soon(up)
        try:
            while True:
                with trio.move_on_after(idle_timeout) as idle:
                    data = await server.receive_some(RECV)
                if idle.cancelled_caught:
                    result.reason = "idle"
                    break
                if not data:
                    break
                await client.send_all(data)
                flow.add_down(len(data))
                result.down += len(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            result.reason, result.detail = "error", f"down: {err!r}"
        nursery.cancel_scope.cancel()
    return result


async def _cancel_at_eof(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(RECV):
            pass
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _linger_close(stream: trio.SocketStream, seconds: float = 1.0) -> None:
    """After an error reply: stop sending, then read (and discard) what the
    client still sends for a moment, so closing does not reset the
    connection and destroy the reply before the client has read it."""
    try:
        await stream.send_eof()
        with trio.move_on_after(seconds):
            total = 0
            while total < 1 << 20:
                data = await stream.receive_some(RECV)
                if not data:
                    break
                total += len(data)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve(
    cfg: Config,
    pool: FakeIPs,
    dial: Dial,
    registry: FlowRegistry | None = None,
    *,
    open_udp: OpenUdp | None = None,
    task_status: trio.TaskStatus[list[tuple[str, str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy ports `cfg` configures (mixed-port, socks-port, port)
    until cancelled; `started()` once all are bound, with (key, address,
    port) for each listening socket.

    `dial` routes and connects a TCP flow (the app's); `open_udp` opens one
    UDP destination of a UDP ASSOCIATE (rules -> outbound; None: UDP
    ASSOCIATE is answered "command not supported"). Raises OSError or
    ProxyPortError if a port cannot be bound.
    """
    service = ProxyPorts(cfg, pool, dial, registry, open_udp=open_udp)
    await service.serve(task_status=task_status)


__all__ = [
    "Authenticator",
    "BindAddress",
    "BodyFramer",
    "Limits",
    "ProxyPort",
    "ProxyPortError",
    "ProxyPorts",
    "choose_bind_addresses",
    "classify_dial_error",
    "lan_addresses",
    "origin_request",
    "proxy_ports",
    "serve",
    "sniff",
]
