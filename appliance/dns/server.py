"""The DNS service: UDP and TCP sockets around the sans-I/O `DnsHandler`.

Owns two sockets bound to `dns.listen` and the tasks that wait on upstream
answers. All DNS logic is in handler.py; this module only moves bytes.

UDP is the hot path. A plain non-blocking socket is drained with `recvmsg`
after each `trio.lowlevel.wait_readable` (at most `UDP_BATCH` datagrams per
wakeup, so TCP and upstream tasks get their turn), and a reply the handler
makes locally is sent before the next datagram is read: no task, no channel,
no await per query. An `UpstreamQuery` becomes a task, bounded in number
(`max_inflight`, shared with TCP); beyond the bound the client gets SERVFAIL
at once instead of queueing behind a slow upstream.

Every UDP reply leaves from the address the query was sent to: the socket
asks for IP_PKTINFO / IPV6_RECVPKTINFO and `sendmsg` hands the destination
back as the source. That is what makes a gateway with several addresses
answer correctly from a wildcard bind, and, with `transparent=True`
(IP_TRANSPARENT / IPV6_TRANSPARENT), what lets a TPROXY-captured query to
another resolver (dns-hijack) be answered from that resolver's address; when
TPROXY also changed the port (the listener is not on 53), the reply goes
through a socket bound to the original address and port (`_UdpReplies`).
Replies bigger than the client accepts (512, or its EDNS payload size) are
truncated with TC=1 (wire.truncate) so the client retries over TCP.

TCP follows RFC 7766: 2-byte length framing, several queries per connection,
pipelined answers sent as they complete (in any order), an idle timeout,
a bounded number of connections (extra ones are closed at once).

Fair shares (appliance/limits.py; None: no per-client limit): each query
is handed to the handler with its client (IPv4 address or IPv6 /64, which
the handler's fake-IP rate counts against); `upstream_share` bounds one
client's queries waiting on the upstream (over it: SERVFAIL at once, as
over the global bound, so a flooding client cannot take the slots every
other client's upstream queries need); `tcp_share` bounds one client's TCP
connections (over it: closed at once, so held-open connections cannot lock
the others out of DNS over TCP).

Failure: bind errors (OSError) propagate before `started()`. After that,
nothing a client sends ends the service: bad input is the handler's business
(FORMERR/SERVFAIL), socket errors end one connection or drop one datagram.
Nothing is logged per packet above debug level: malformed queries and
crashes are counted by the handler's `ProblemLog`, which this service asks
to report once per interval.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import trio

from appliance.config.model import Listen
from appliance.dns import wire
from appliance.dns.handler import DnsHandler, UpstreamQuery
from appliance.dns.upstream_api import Upstream, UpstreamError
from appliance.limits import ConcurrencyLimit, client_key
from appliance.metrics import DNS_UPSTREAM_SECONDS
from appliance.sockopt import (
    IP_ORIGDSTADDR,
    IP_PKTINFO,
    IP_TRANSPARENT,
    IPV6_ORIGDSTADDR,
    IPV6_RECVPKTINFO,
    IPV6_TRANSPARENT,
    Ancillary,
    Destination,
    open_transparent_sender,
    original_destination,
    reply_pktinfo,
)

log = logging.getLogger("mirage.dns")

UDP_BATCH = 64  # datagrams handled per wakeup before yielding
MAX_INFLIGHT = 1024  # upstream queries waiting at once (UDP + TCP)
MAX_TCP_CONNECTIONS = 256
TCP_IDLE_TIMEOUT = 10.0  # seconds without a complete query (RFC 7766 6.2.3)
TCP_PIPELINE = 32  # upstream queries in flight per TCP connection
# Extra time past the handler's upstream timeout before we give up ourselves:
# the Upstream contract bounds its own time; this is the safety net.
DEADLINE_GRACE = 0.5

# Sockets kept for answering TPROXY'd queries from their original address
# and port (one per resolver address the LAN uses: a handful).
MAX_SPOOF_SOCKETS = 64

_RECV_SIZE = 65535
# Room for in_pktinfo/in6_pktinfo and, when transparent, the original
# destination (sockaddr_in/sockaddr_in6).
_ANC_SIZE = socket.CMSG_SPACE(20) * 2 + socket.CMSG_SPACE(28) * 2


@dataclass
class _Limits:
    """Counters shared by the UDP loop and every TCP connection, and the
    per-client shares (None: none)."""

    max_inflight: int
    max_connections: int
    inflight: int = 0
    connections: int = 0
    upstream_share: ConcurrencyLimit | None = None
    tcp_share: ConcurrencyLimit | None = None

    def take_upstream(self, client: str) -> bool:
        """One upstream slot for `client`: under the global bound and its
        share. `give_upstream(client)` when the query is over."""
        if self.inflight >= self.max_inflight:
            return False
        share = self.upstream_share
        if share is not None and not share.acquire(client):
            return False
        self.inflight += 1
        return True

    def give_upstream(self, client: str) -> None:
        self.inflight -= 1
        if self.upstream_share is not None:
            self.upstream_share.release(client)


def _bind_socket(family: int, kind: int, listen: Listen, transparent: bool) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" serves IPv4 too (as v4-mapped); an explicit v6 address only v6.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if transparent:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        if transparent:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        if kind == socket.SOCK_DGRAM:
            # IPv4 datagrams (also v4-mapped ones on a dual-stack socket)
            # report their destination with IP_PKTINFO, IPv6 ones with
            # IPV6_PKTINFO.
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            if transparent:
                # TPROXY keeps the query's destination port too (53) while
                # our socket has its own: report both (see _UdpReplies).
                sock.setsockopt(socket.IPPROTO_IP, IP_ORIGDSTADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, 1)
        sock.setblocking(False)
        sock.bind((listen.host, listen.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    listen: Listen,
    handler: DnsHandler,
    upstream: Upstream,
    *,
    transparent: bool = False,
    max_inflight: int = MAX_INFLIGHT,
    max_tcp_connections: int = MAX_TCP_CONNECTIONS,
    tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
    upstream_share: ConcurrencyLimit | None = None,
    tcp_share: ConcurrencyLimit | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DNS on `listen` (UDP and TCP) until cancelled; per-client
    `upstream_share` and `tcp_share` as the module doc says.

    Calls `task_status.started()` once both sockets are bound. Raises OSError
    if either cannot be bound; closes both sockets on the way out.
    """
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    limits = _Limits(max_inflight, max_tcp_connections,
                     upstream_share=upstream_share, tcp_share=tcp_share)
    deadline = handler.upstream_timeout + DEADLINE_GRACE
    udp = _bind_socket(family, socket.SOCK_DGRAM, listen, transparent)
    replies = _UdpReplies(udp, transparent)
    try:
        tcp = trio.socket.from_stdlib_socket(
            _bind_socket(family, socket.SOCK_STREAM, listen, transparent)
        )
        with tcp:
            tcp.listen(128)
            listener = trio.SocketListener(tcp)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_udp_loop, udp, replies, handler, upstream, limits, deadline,
                                   nursery)
                nursery.start_soon(
                    _tcp_accept_loop, listener, handler, upstream, limits, deadline,
                    tcp_idle_timeout, nursery,
                )
                nursery.start_soon(_report_problems, handler)
                log.info("DNS service on %s (udp, tcp)%s", listen,
                         " transparent" if transparent else "")
                task_status.started()
    finally:
        replies.close()
        udp.close()


async def _report_problems(handler: DnsHandler) -> None:
    """Write the handler's counts of malformed queries once per interval: the
    handler only reports when a query arrives, so a burst's tail would
    otherwise wait for the next bad packet."""
    while True:
        await trio.sleep(handler.problems.interval)
        handler.report_problems()


# -- upstream ---------------------------------------------------------------------


async def _resolve(uq: UpstreamQuery, upstream: Upstream, deadline: float) -> bytes:
    """The client's reply to `uq`: the upstream's answer, or SERVFAIL when it
    fails or does not answer within `deadline` seconds."""
    reply = None
    started = time.perf_counter()
    with trio.move_on_after(deadline):
        try:
            reply = await upstream.query(uq.request)
        except UpstreamError as err:
            log.debug("upstream failed for %s: %s", uq.request.q.qname, err)
        except Exception:
            # A bug in the resolver must cost one query, not the service (nor
            # a traceback per query: the problem log keeps one per interval).
            uq.problems.crash("upstream raised", uq.data)
    DNS_UPSTREAM_SECONDS.observe(time.perf_counter() - started)
    return uq.finish(reply)


# -- UDP ----------------------------------------------------------------------------


class _UdpReplies:
    """Sends each UDP reply from the address and port its query was sent to.

    Normally the listening socket sends it, with the query's destination as
    source (IP_PKTINFO / IPV6_PKTINFO control message). A TPROXY'd query
    (dns-hijack: the client asked 8.8.8.8:53, the kernel handed the datagram to
    us on our own port) also needs the source *port* 53, which no control
    message can set: that reply goes through a transparent socket bound to the
    original destination. Those sockets are never connected, so TPROXY's
    socket lookup (which only prefers connected UDP sockets) keeps steering
    queries to the listener; they are kept in a small LRU and closed with it.
    """

    def __init__(self, sock: socket.socket, transparent: bool) -> None:
        self._sock = sock
        self._port = sock.getsockname()[1]
        self._transparent = transparent
        self._spoof: OrderedDict[Destination, socket.socket] = OrderedDict()

    def send(self, reply: bytes, query: bytes, ancdata: Ancillary, addr: Any) -> None:
        if len(reply) > wire.CLASSIC_UDP_SIZE:
            reply = wire.truncate(reply, wire.udp_limit(query))
        try:
            if self._transparent:
                orig = original_destination(ancdata)
                if orig is not None and orig[2] != self._port:
                    if orig[0] == socket.AF_INET and ":" in addr[0]:
                        addr = (addr[0].removeprefix("::ffff:"), addr[1])
                    self._spoof_socket(orig).sendto(reply, addr)
                    return
            self._sock.sendmsg([reply], reply_pktinfo(ancdata), 0, addr)
        except OSError as err:
            # EAGAIN (full socket buffer) and unroutable clients: UDP may drop.
            log.debug("UDP reply to %s dropped: %s", addr, err)

    def _spoof_socket(self, dst: Destination) -> socket.socket:
        sock = self._spoof.get(dst)
        if sock is not None:
            self._spoof.move_to_end(dst)
            return sock
        sock = open_transparent_sender(dst)
        self._spoof[dst] = sock
        if len(self._spoof) > MAX_SPOOF_SOCKETS:
            self._spoof.popitem(last=False)[1].close()
        return sock

    def close(self) -> None:
        for sock in self._spoof.values():
            sock.close()
        self._spoof.clear()


async def _udp_loop(
    sock: socket.socket, replies: _UdpReplies, handler: DnsHandler, upstream: Upstream,
    limits: _Limits, deadline: float, nursery: trio.Nursery,
) -> None:
    recvmsg, handle, send = sock.recvmsg, handler.handle, replies.send
    while True:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(UDP_BATCH):
            try:
                data, ancdata, _flags, addr = recvmsg(_RECV_SIZE, _ANC_SIZE)
            except BlockingIOError:
                break
            except OSError as err:  # e.g. a queued ICMP error: not fatal
                log.debug("UDP receive: %s", err)
                continue
            client = client_key(addr[0])
            result = handle(data, client)
            if isinstance(result, bytes):
                if result:
                    send(result, data, ancdata, addr)
            elif not limits.take_upstream(client):
                send(result.finish(None), data, ancdata, addr)
            else:
                nursery.start_soon(
                    _udp_upstream, replies, result, data, ancdata, addr, upstream, deadline,
                    limits, client,
                )


async def _udp_upstream(
    replies: _UdpReplies, uq: UpstreamQuery, query: bytes, ancdata: Ancillary, addr: Any,
    upstream: Upstream, deadline: float, limits: _Limits, client: str,
) -> None:
    try:
        reply = await _resolve(uq, upstream, deadline)
    finally:
        limits.give_upstream(client)
    if reply:
        replies.send(reply, query, ancdata, addr)


# -- TCP ------------------------------------------------------------------------------

_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def _tcp_accept_loop(
    listener: trio.SocketListener, handler: DnsHandler, upstream: Upstream, limits: _Limits,
    deadline: float, idle: float, nursery: trio.Nursery,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as err:
            if err.errno not in _ACCEPT_RETRY:
                raise
            log.warning("DNS TCP accept: %s; pausing accepts for 100 ms", err)
            await trio.sleep(0.1)
            continue
        if limits.connections >= limits.max_connections:
            await trio.aclose_forcefully(stream)
            continue
        try:
            client = client_key(stream.socket.getpeername()[0])
        except OSError:  # reset before we looked
            await trio.aclose_forcefully(stream)
            continue
        if limits.tcp_share is not None and not limits.tcp_share.acquire(client):
            await trio.aclose_forcefully(stream)
            continue
        limits.connections += 1
        nursery.start_soon(_tcp_connection, stream, handler, upstream, limits, deadline, idle,
                           client)


async def _tcp_connection(
    stream: trio.SocketStream, handler: DnsHandler, upstream: Upstream, limits: _Limits,
    deadline: float, idle: float, client: str,
) -> None:
    """One client connection: read frames, answer each, close when the client
    does, when it idles for `idle` seconds, or when a send fails. Gives back
    the connection's place (and `client`'s share) when it ends."""
    send_lock = trio.Lock()
    pipeline = trio.Semaphore(TCP_PIPELINE)

    async def send(reply: bytes, query: bytes) -> None:
        if len(reply) > 0xFFFF:
            reply = wire.error_reply(query, wire.RCODE_SERVFAIL)
        async with send_lock:
            await stream.send_all(len(reply).to_bytes(2, "big") + reply)

    async def answer_later(uq: UpstreamQuery, query: bytes) -> None:
        try:
            reply = await _resolve(uq, upstream, deadline)
        finally:
            limits.give_upstream(client)
            pipeline.release()
        if reply:
            await send(reply, query)

    try:
        async with trio.open_nursery() as nursery:
            buf = bytearray()
            # A client must complete a query every `idle` seconds: dribbling
            # one byte at a time does not keep a connection.
            give_up_at = trio.current_time() + idle
            while True:
                chunk = b""
                with trio.move_on_at(give_up_at):
                    chunk = await stream.receive_some(_RECV_SIZE)
                if not chunk:  # closed by the client, or idle
                    break
                buf += chunk
                while len(buf) >= 2:
                    size = int.from_bytes(buf[:2], "big")
                    if len(buf) < 2 + size:
                        break
                    query = bytes(buf[2 : 2 + size])
                    del buf[: 2 + size]
                    give_up_at = trio.current_time() + idle
                    result = handler.handle(query, client)
                    if isinstance(result, bytes):
                        if result:
                            await send(result, query)
                    elif not limits.take_upstream(client):
                        await send(result.finish(None), query)
                    else:
                        try:
                            # Waits (stops reading) when this connection
                            # already has TCP_PIPELINE queries upstream:
                            # back-pressure.
                            await pipeline.acquire()
                        except BaseException:
                            limits.give_upstream(client)
                            raise
                        nursery.start_soon(answer_later, result, query)
            # Reading is over; the nursery waits for the answers in flight.
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except* Exception:
        log.exception("DNS TCP connection failed")
    finally:
        limits.connections -= 1
        if limits.tcp_share is not None:
            limits.tcp_share.release(client)
        await trio.aclose_forcefully(stream)
