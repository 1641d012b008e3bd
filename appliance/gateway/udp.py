"""The transparent UDP gateway: captured LAN datagrams -> domain -> outbound.

The capture (nft TPROXY, nft/mirage.nft) hands datagrams sent to fake IPs to
one transparent UDP socket on `tproxy-port` (IP_TRANSPARENT, and
IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR so that each datagram comes with
the address and port the client sent it to). Each (client address, original
destination) is a *session*: the fake IP is turned back into its name (and
pinned while the session lives, so recycling never remaps it), the session's
`Flow` is routed and its outbound opened (`open_peer`, normally the
dispatcher's `open_udp`, appliance/routing.py), and datagrams flow both ways
until the session is idle for `udp-timeout`.

Replies go back to the client *from the original destination* (the fake IP
and port): a client's connected UDP socket accepts nothing else. They leave
through a transparent socket bound to that address and port, one per
destination, shared by every session to it, closed with its last session.
It is never connected, so TPROXY's socket lookup (which prefers connected
UDP sockets) keeps steering the client's datagrams to the listener.

Speed (bench/udp.py): the listener is a plain non-blocking socket drained with
`recvmsg` after each `trio.lowlevel.wait_readable`, up to `BATCH` datagrams
per wakeup; a datagram for a live session costs one dict lookup and one
`send`: no task, channel or await per datagram. The session key uses the raw
control-message bytes, so only a session's first datagram is decoded. Each
session has one task (open the outbound, then relay replies the same way:
drain after each wakeup); idle expiry is a deadline checked when it fires,
not a timer reset per datagram.

Bounds and failures: at most `udp-max-sessions` sessions (the least recently
active is evicted, counted in `evicted`); at most `MAX_PENDING` datagrams wait
while an outbound opens. Datagrams to an unmapped fake IP, too big for the
outbound, or refused by the kernel are dropped and counted (`UdpStats`);
nothing a client or a proxy sends ends the service. With a `flows` limit
(appliance/limits.py, shared with the TCP gateway) a client holding its
share of flows, or any client once all are taken, gets no new session: the
datagram is dropped and counted (`dropped_limit`, and the limit's refusal);
its live sessions go on. A session whose outbound
failed to open drops its datagrams for `FAILED_HOLD` seconds, then the next
datagram tries again; a REJECT session drops until idle. Bind errors
(OSError) propagate before `started()`.

The session path (`UdpSessions`: table, opening through the dispatcher,
pending datagrams, REJECT and failure holds, replies, idle expiry,
eviction, counters) is shared with the proxy ports' UDP ASSOCIATE
(appliance/gateway/proxyport/udp_relay.py); this listener adds what is its
own: TPROXY's original destinations, fake IP -> name pins, and reply
sockets bound to the original destination.

Owns: the listening socket, the reply sockets, every session's peer (socket
and SOCKS5 control connection) and pool pins; all released in `finally`.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from appliance.config.model import Config
from appliance.flow import Flow, tproxy_entry
from appliance.gateway.tcp import FakeIPs
from appliance.gateway.udp_sessions import (
    MAX_UDP_PAYLOAD,
    SessionTable,
    UdpStats,
    client_address,
    idle_timeout,
)
from appliance.limits import ConcurrencyLimit, client_key
from appliance.outbound.base import OutboundError, UdpPeer
from appliance.privileges import raise_descriptor_limit
from appliance.proto.socks5 import Socks5Error, parse_udp
from appliance.sockopt import (
    IP_ORIGDSTADDR,
    IP_TRANSPARENT,
    IPV6_ORIGDSTADDR,
    IPV6_TRANSPARENT,
    SO_RCVBUFFORCE,
    Ancillary,
    Destination,
    open_transparent_sender,
    original_destination,
)

log = logging.getLogger(__name__)

BATCH = 128  # datagrams handled per wakeup before yielding to other tasks
MAX_PENDING = 32  # datagrams queued per session while its outbound opens
FAILED_HOLD = 2.0  # seconds a failed session drops before the next try
RECV_SIZE = 65535
# One sockaddr_in6 (the largest original-destination message) with room.
ANC_SIZE = socket.CMSG_SPACE(28) * 2
# Socket buffer for the listener: absorbs a burst while the loop is busy.
RCVBUF = 4 << 20
# Warn about unmapped fake IPs at most this often (then debug).
WARN_INTERVAL = 1.0

# Route a flow and open its outbound (`Dispatcher.open_udp`): sets
# `flow.outbound` and `flow.skipped`; None means REJECT; raises on failure.
OpenPeer = Callable[[Flow], Awaitable[UdpPeer | None]]


class Meter(Protocol):
    """Where a session's bytes are also counted (splice.FlowRecord)."""

    def add_up(self, n: int) -> None: ...

    def add_down(self, n: int) -> None: ...


class Session:
    """One (client address, original destination) pair and its state.

    `flow` is what routing sees and decides (appliance/flow.py); `client`
    and `dst` are the addresses as the sockets use them (text). `state` is
    "opening", "open", "rejected" (REJECT: drop until idle) or "failed" (the
    outbound did not open: drop for FAILED_HOLD). `sock` is the peer's
    socket while open, else None; `pending` holds datagrams that arrived
    while opening. `last` is the trio time of the last datagram either way.

    Replies go to `reply_to` (the client's socket address; `client` by
    default) with `reply_header` before each (a SOCKS5 UDP header on a proxy
    port's association; empty for the transparent gateway), and are counted
    in `meter` too when one is given (the association's registry entry).
    """

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client",
        "client_key",
        "dst",
        "flow",
        "header",
        "id",
        "key",
        "last",
        "limit",
        "meter",
        "peer",
        "pending",
        "reply_header",
        "reply_to",
        "scope",
        "sock",
        "started",
        "state",
        "timeout",
    )

    _ids = itertools.count(1)

    def __init__(self, key: Any, client: tuple[str, int], dst: Destination, flow: Flow,
                 now: float, timeout: float, *, reply_to: Any = None,
                 reply_header: bytes = b"", meter: Meter | None = None,
                 session_id: int | None = None) -> None:
        self.id = session_id if session_id is not None else next(Session._ids)
        self.started = time.time()
        self.bytes_up = 0
        self.bytes_down = 0
        self.key = key
        self.client = client
        self.client_key: str | None = None  # set while it holds a share of flows
        self.dst = dst
        self.flow = flow
        self.state = "opening"
        self.last = now
        self.timeout = timeout
        self.peer: UdpPeer | None = None
        self.sock: socket.socket | None = None
        self.header = b""
        self.limit = MAX_UDP_PAYLOAD
        self.pending: list[bytes] = []
        self.scope = trio.CancelScope()
        self.reply_to: Any = reply_to if reply_to is not None else client
        self.reply_header = reply_header
        self.meter = meter

    def describe(self) -> str:
        return self.flow.describe()


class ReplySockets:
    """Transparent sockets bound to original destinations, shared by the
    sessions to each, closed with the last one. Owns the sockets."""

    def __init__(self) -> None:
        self._socks: dict[Destination, list[Any]] = {}  # dst -> [socket, users]

    def acquire(self, dst: Destination) -> socket.socket:
        """The socket that sends from `dst`. Raises OSError (EPERM without
        CAP_NET_ADMIN, EADDRNOTAVAIL for an address family mismatch)."""
        entry = self._socks.get(dst)
        if entry is not None:
            entry[1] += 1
            sock: socket.socket = entry[0]
            return sock
        sock = open_transparent_sender(dst)
        self._socks[dst] = [sock, 1]
        return sock

    def release(self, dst: Destination) -> None:
        entry = self._socks.get(dst)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._socks[dst]
            entry[0].close()

    def __len__(self) -> int:
        return len(self._socks)

    def close(self) -> None:
        for sock, _users in self._socks.values():
            sock.close()
        self._socks.clear()


def open_listener(port: int, ipv6: bool) -> socket.socket:
    """The transparent UDP socket on `port` (dual-stack [::] with ipv6, else
    0.0.0.0). Raises OSError (EADDRINUSE, EPERM without CAP_NET_ADMIN)."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, 1)
        # Also on a dual-stack socket: IPv4 datagrams report their original
        # destination at the IPPROTO_IP level.
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_ORIGDSTADDR, 1)
        try:
            # Root may exceed net.core.rmem_max; fall back to what is allowed.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setblocking(False)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _raise_fd_limit(sessions: int) -> None:
    """Each session holds a socket (two for SOCKS5): make room for them up to
    the hard limit, which an operator or systemd (LimitNOFILE) sets."""
    want = 2 * sessions + 1024
    have = raise_descriptor_limit()
    if have < want:
        log.warning("udp: open-file limit %d allows fewer than %d sessions", have, sessions)


class UdpSessions:
    """The UDP session path, shared by every UDP listener: sessions of
    `Flow`s, each opened through `open_peer` (the dispatcher's `open_udp`),
    relaying replies until idle, bounded, counted.

    One serves the transparent gateway (`UdpGateway`, below); each UDP
    ASSOCIATE on a proxy port has its own (appliance/gateway/proxyport/
    udp_relay.py). The caller receives the client's datagrams (its socket,
    its key), makes a session's `Flow` and the `Session`, hands it to
    `start`, and passes each later datagram to `send_up` (or does the same
    inline, as `UdpGateway` does for speed). Everything after that is here:
    opening (datagrams wait in `pending`, at most `MAX_PENDING`), REJECT
    (drop until idle), a failed open (drop for `hold` seconds, then the
    session ends and the next datagram tries again), replies (batched, from
    the `reply` socket the caller gives, to `Session.reply_to`), idle expiry
    (a deadline checked when it fires), eviction of the least recently
    active session when the table is full.

    Owns: the table and every session's peer (closed when its session
    ends, also when cancelled). Not the reply sockets nor pool pins: the
    caller's `run` wrapper releases them.
    """

    def __init__(self, open_peer: OpenPeer, capacity: int, *, hold: float = FAILED_HOLD) -> None:
        self.open_peer = open_peer
        self.hold = hold
        self.table: SessionTable[Any, Session] = SessionTable(capacity)
        self.counters = UdpStats()

    def add(self, session: Session) -> None:
        """Put `session` in the table, ending the least recently active one
        if it was full (counted in `evicted`)."""
        evicted = self.table.add(session.key, session)
        if evicted is not None:
            self.counters.evicted += 1
            evicted.scope.cancel()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("udp %s: evicted (at most %d sessions)", evicted.describe(),
                          self.table.capacity)
        self.counters.sessions_opened += 1

    def send_up(self, s: Session, data: bytes, now: float) -> None:
        """One datagram from the client of a live session: sent, queued
        while opening, or dropped (counted)."""
        st = self.counters
        s.last = now
        self.table.touch(s.key)
        out = s.sock
        if out is not None:
            n = len(data)
            if n > s.limit:
                st.dropped_oversize += 1
                return
            try:
                out.send(s.header + data if s.header else data)
            except OSError as err:
                self.send_failed(err)
                return
            st.packets_up += 1
            st.bytes_up += n
            s.bytes_up += n
            if s.meter is not None:
                s.meter.add_up(n)
        else:
            self.not_open(s, data)

    def not_open(self, s: Session, data: bytes) -> None:
        """A datagram for a session with no open peer: queued while it
        opens, else dropped and counted."""
        st = self.counters
        if s.state == "opening":
            if len(s.pending) < MAX_PENDING:
                s.pending.append(data)
            else:
                st.dropped_queue += 1
        elif s.state == "rejected":
            st.dropped_rejected += 1
        else:
            st.dropped_dial_failed += 1

    def send_failed(self, err: OSError) -> None:
        if err.errno == errno.EMSGSIZE:
            self.counters.dropped_oversize += 1
        else:
            self.counters.dropped_send += 1

    async def run(self, s: Session, reply: socket.socket | None) -> None:
        """The session's life: open its outbound, relay replies through
        `reply` until it idles out (or, SOCKS5, the proxy drops the
        association), then `end` it. `reply` None: the caller could not get
        a reply socket; the session just ends."""
        try:
            with s.scope:
                if reply is None or not await self._open(s):
                    return
                assert s.peer is not None
                if s.peer.control is None:
                    await self._relay_down(s, s.peer, reply)
                    return
                # SOCKS5: the association ends when the proxy closes its
                # control connection; a peer that carries its datagrams
                # over a stream (VMess, VLESS) relays them in `watch`.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, s.peer, nursery.cancel_scope)
                    await self._relay_down(s, s.peer, reply)
                    nursery.cancel_scope.cancel()
        finally:
            await self.end(s)

    async def end(self, s: Session) -> None:
        """Take `s` out of the table and close its peer (shielded: also
        when the caller is cancelled)."""
        self.table.remove(s.key, s)
        s.sock = None
        s.pending = []
        if s.state == "opening" or s.state == "open":
            s.state = "closed"
        if s.peer is not None:
            with trio.CancelScope(shield=True):
                await s.peer.aclose()

    async def _open(self, s: Session) -> bool:
        """Open the session's outbound and send what waited; False when the
        session has nothing more to do (REJECT or failure, after holding)."""
        st = self.counters
        flow = s.flow
        try:
            try:
                peer = await self.open_peer(flow)
            finally:
                st.skipped_no_udp += flow.skipped
        except Exception as exc:  # open_peer is pluggable: any failure ends this session only
            why = exc.reason if isinstance(exc, OutboundError) else (
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            st.dial_failures += 1
            st.dropped_dial_failed += len(s.pending)
            s.pending = []
            s.state = "failed"
            log.warning("udp %s: outbound%s failed: %s; dropping for %gs", s.describe(),
                        f" {flow.outbound}" if flow.outbound else "", why, self.hold)
            await trio.sleep(self.hold)
            return False
        if peer is None:
            st.dropped_rejected += len(s.pending)
            s.pending = []
            s.state = "rejected"
            flow.outbound = flow.outbound or "REJECT"
            if log.isEnabledFor(logging.DEBUG):
                log.debug("udp %s: rejected by %s", s.describe(), flow.outbound)
            await self._wait_idle(s)
            return False
        s.peer = peer
        # A group's member, which the flow list shows for UDP.
        flow.outbound = peer.outbound
        s.header = peer.header
        s.limit = MAX_UDP_PAYLOAD - len(peer.header)
        pending, s.pending = s.pending, []
        for data in pending:
            if len(data) > s.limit:
                st.dropped_oversize += 1
                continue
            try:
                peer.sock.send(s.header + data)
            except OSError as err:
                self.send_failed(err)
                continue
            st.packets_up += 1
            st.bytes_up += len(data)
            s.bytes_up += len(data)
            if s.meter is not None:
                s.meter.add_up(len(data))
        # From here on the receive loop sends directly.
        s.sock = peer.sock
        s.state = "open"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("udp %s: via %s (%s)", s.describe(), peer.outbound, peer.remote)
        return True

    async def _wait_idle(self, s: Session) -> None:
        while True:
            deadline = s.last + s.timeout
            if trio.current_time() >= deadline:
                self.counters.idle_expired += 1
                return
            await trio.sleep_until(deadline)

    @staticmethod
    async def _watch(peer: UdpPeer, scope: trio.CancelScope) -> None:
        await peer.watch()
        scope.cancel()

    async def _relay_down(self, s: Session, peer: UdpPeer, reply: socket.socket) -> None:
        """Replies from the peer to the client until the session idles out,
        from `reply` (the transparent gateway's is bound to the original
        destination; an association's is its relay socket)."""
        st = self.counters
        sock = peer.sock
        recv = sock.recv
        sendto = reply.sendto
        client = s.reply_to
        prefix = s.reply_header
        meter = s.meter
        socks = peer.socks
        touch = self.table.touch
        while True:
            deadline = s.last + s.timeout
            if trio.current_time() >= deadline:
                st.idle_expired += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("udp %s: idle for %gs, closed", s.describe(), s.timeout)
                return
            # Activity moves `s.last`; the deadline is checked again when it
            # fires instead of being reset for every datagram.
            with trio.move_on_at(deadline):
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    got = False
                    for _ in range(BATCH):
                        try:
                            data = recv(RECV_SIZE)
                        except BlockingIOError:
                            break
                        except OSError:
                            # ICMP errors (port unreachable) surface on a
                            # connected socket: the peer may come back.
                            continue
                        if socks:
                            payload = self._unwrap(data)
                            if payload is None:
                                continue
                            data = payload
                        try:
                            sendto(prefix + data if prefix else data, client)
                        except OSError as err:
                            self.send_failed(err)
                            continue
                        got = True
                        n = len(data)
                        st.packets_down += 1
                        st.bytes_down += n
                        s.bytes_down += n
                        if meter is not None:
                            meter.add_down(n)
                    if got:
                        s.last = trio.current_time()
                        try:
                            touch(s.key)
                        except KeyError:
                            return  # evicted: our scope is cancelled already

    def _unwrap(self, datagram: bytes) -> bytes | None:
        """The payload of a SOCKS5 UDP reply; None (counted) if it is a
        fragment or malformed."""
        try:
            d = parse_udp(datagram)
        except Socks5Error:
            self.counters.dropped_malformed += 1
            return None
        if d.frag:
            self.counters.dropped_fragment += 1
            return None
        return d.payload


class UdpGateway:
    """The UDP gateway service: listener, reply sockets, and its sessions
    (`UdpSessions`: table, counters), listed (`snapshot`) and ended by id
    (`close_flow`) for the control API's /connections."""

    def __init__(
        self,
        cfg: Config,
        pool: FakeIPs,
        open_peer: OpenPeer,
        *,
        timeout: float | None = None,
        max_sessions: int | None = None,
        flows: ConcurrencyLimit | None = None,
        new_id: Callable[[], int] | None = None,
    ) -> None:
        if cfg.tproxy_port is None:
            raise ValueError("tproxy-port is not set")
        a = cfg.appliance
        self.cfg = cfg
        self.port = cfg.tproxy_port
        self.entry = tproxy_entry(self.port)
        self.pool = pool
        # Per-client share of flows (None: unlimited, for tests and tools).
        self.flows = flows
        self.timeout = timeout if timeout is not None else a.udp_timeout
        self.sessions = UdpSessions(
            open_peer, max_sessions if max_sessions is not None else a.udp_max_sessions)
        self.table = self.sessions.table
        self.counters = self.sessions.counters
        self.replies = ReplySockets()
        self._warned_at = -WARN_INTERVAL
        # Session ids from the TCP flow registry's sequence (`new_id`), so
        # that an id in /connections names one flow or session.
        self.new_id = new_id

    def stats(self) -> dict[str, int]:
        self.counters.sessions = len(self.table)
        return self.counters.as_dict()

    def snapshot(self) -> list[dict[str, Any]]:
        """Live sessions for the API's connection list, in the TCP flows'
        shape (appliance.gateway.splice.FlowRecord.as_dict) plus `state` and
        `idle` seconds. Ids come from `new_id` (the TCP flow registry's
        sequence) when given, so `close_flow` and the registry's never
        mistake one for the other."""
        now = trio.current_time()
        return [
            {"id": s.id, "network": "udp",
             "src": f"{s.client[0]}:{s.client[1]}", "dst": f"{s.dst[1]}:{s.dst[2]}",
             "src_ip": s.client[0], "src_port": s.client[1],
             "dst_ip": s.dst[1], "dst_port": s.dst[2],
             "domain": s.flow.domain, "outbound": s.flow.outbound, "started": s.started,
             "up": s.bytes_up, "down": s.bytes_down,
             "rule": rule, "rule_payload": payload, "chains": list(s.flow.chains),
             "by_mode": s.flow.by_mode,
             **(s.flow.entry.as_dict() if s.flow.entry is not None else {}),
             "state": s.state, "idle": round(now - s.last, 3)}
            for s in self.table for rule, payload in (s.flow.rule_shown(),)
        ]

    def close_flow(self, flow_id: int) -> bool:
        """End the live session `flow_id` (the control API's DELETE
        /connections/{id}): its scope is cancelled, which closes its peer
        (socket, proxy association) and takes it out of the table, so the
        client's next datagram to that destination opens a new session,
        routed anew. False if no such session is live."""
        for s in self.table:
            if s.id == flow_id:
                s.scope.cancel()
                return True
        return False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        sock = open_listener(self.port, self.cfg.ipv6)
        try:
            _raise_fd_limit(self.table.capacity)
            async with trio.open_nursery() as nursery:
                log.info("udp: transparent listener on port %d (timeout %gs, at most %d sessions)",
                         self.port, self.timeout, self.table.capacity)
                task_status.started()
                await self._receive_loop(sock, nursery)
        finally:
            sock.close()
            self.replies.close()

    # -- client -> outbound ------------------------------------------------------

    async def _receive_loop(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        recvmsg = sock.recvmsg
        get = self.table.get
        touch = self.table.touch
        st = self.counters
        send_failed = self.sessions.send_failed
        not_open = self.sessions.not_open
        trunc = int(socket.MSG_TRUNC)  # a plain int: IntFlag.__and__ costs per datagram
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(BATCH):
                try:
                    data, anc, flags, addr = recvmsg(RECV_SIZE, ANC_SIZE)
                except BlockingIOError:
                    break
                except OSError as err:  # e.g. a queued ICMP error: not fatal
                    log.debug("udp receive: %s", err)
                    continue
                if flags & trunc:
                    st.dropped_oversize += 1
                    continue
                if not anc:
                    continue  # not from TPROXY (no original destination)
                # The raw original-destination bytes are part of the key: only
                # a session's first datagram needs them decoded.
                key = (addr, anc[0][2])
                s = get(key)
                if s is None:
                    self._new_session(key, addr, anc, data, now, nursery)
                    continue
                # UdpSessions.send_up, inline: this is the per-datagram path.
                s.last = now
                touch(key)
                out = s.sock
                if out is not None:
                    n = len(data)
                    if n > s.limit:
                        st.dropped_oversize += 1
                        continue
                    try:
                        out.send(s.header + data if s.header else data)
                    except OSError as err:
                        send_failed(err)
                        continue
                    st.packets_up += 1
                    st.bytes_up += n
                    s.bytes_up += n
                else:
                    not_open(s, data)

    def _new_session(self, key: Any, addr: Any, anc: Ancillary, data: bytes,
                     now: float, nursery: trio.Nursery) -> None:
        dst = original_destination(anc)
        if dst is None:
            return
        client = client_address(addr)
        flows, share = self.flows, None
        if flows is not None:
            share = client_key(client[0])
            if not flows.acquire(share):
                self.counters.dropped_limit += 1
                return
        session = None
        try:
            session = self._make_session(key, client, dst, data, now)
        finally:
            if session is None and flows is not None and share is not None:
                flows.release(share)
        if session is None:
            return
        session.client_key = share
        self.sessions.add(session)
        nursery.start_soon(self._run, session)

    def _make_session(self, key: Any, client: tuple[str, int], dst: Destination, data: bytes,
                      now: float) -> Session | None:
        """The session for a new (client, destination), its fake IP pinned;
        None (counted) when its datagram is to be dropped."""
        domain: str | None = None
        if self.pool.is_fake(dst[1]):
            domain = self.pool.pin(dst[1])
            if domain is None:
                self.counters.dropped_unmapped += 1
                level = logging.WARNING if now - self._warned_at >= WARN_INTERVAL else logging.DEBUG
                if level == logging.WARNING:
                    self._warned_at = now
                log.log(level, "udp %s:%d -> %s:%d: fake IP not mapped (expired or issued before "
                        "a restart); dropped (%d so far)", *client, dst[1], dst[2],
                        self.counters.dropped_unmapped)
                return None
        elif dst[2] == self.port:
            # Sent to the listener itself, not captured: relaying it DIRECT
            # would come straight back here (the nft input chain refuses
            # these; this holds whatever the capture is).
            self.counters.dropped_loop += 1
            return None
        flow = Flow("udp", "tproxy", ipaddress.ip_address(client[0]), client[1],
                    ipaddress.ip_address(dst[1]), dst[2], domain, entry=self.entry)
        session = Session(key, client, dst, flow, now, idle_timeout(dst[2], self.timeout),
                          session_id=self.new_id() if self.new_id is not None else None)
        session.pending.append(data)
        return session

    # -- one session ---------------------------------------------------------------

    async def _run(self, s: Session) -> None:
        """The shared session path, with this listener's parts around it:
        the reply socket bound to the original destination, and the pin."""
        reply: socket.socket | None = None
        try:
            try:
                reply = self.replies.acquire(s.dst)
            except OSError as err:
                log.warning("udp %s: cannot reply from %s:%d: %s", s.describe(), s.dst[1],
                            s.dst[2], err)
            await self.sessions.run(s, reply)
        finally:
            if s.client_key is not None and self.flows is not None:
                self.flows.release(s.client_key)
                s.client_key = None
            if reply is not None:
                self.replies.release(s.dst)
            if s.flow.domain is not None:
                self.pool.unpin(s.dst[1])
