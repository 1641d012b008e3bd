"""UDP ASSOCIATE (RFC 1928 section 7) on the proxy ports: one association's relay.

The service binds one UDP socket on the address the client reached the
proxy port at (LAN or loopback), answers the request with that address and
hands the socket here. `UdpAssociation.run` relays until the association
ends: when its TCP control connection closes (RFC 1928: "a UDP association
terminates when the TCP connection that the UDP ASSOCIATE request arrived
on terminates") or after `idle_timeout` without a datagram either way.

Datagrams: only the client that asked may use the relay (its address, and
its port once known: the request's DST.ADDR/PORT when given, else the
first datagram's). Each carries a SOCKS5 UDP header naming its
destination; fake IPs are mapped back to their names and pinned
(`Targets`). Fragments (FRAG != 0) and malformed headers are dropped
(reassembly is optional in the RFC; neither dante nor mihomo does it).

Each destination is a session on the same path as the transparent
gateway's (appliance/gateway/udp.py `UdpSessions`): its `Flow` (inbound
`mixed` or `socks`, network udp) is routed and opened by `open_udp` (the
dispatcher's: DIRECT, a SOCKS5 proxy with `udp: true`, REJECT), datagrams
wait while it opens, replies are relayed in batches, it ends when idle
(`idle_timeout`, 10 s for port 53, as there) or when the proxy drops it.
Replies carry, in their SOCKS5 header, the address the client sent to (its
fake IP or name), so a client that matches replies by address sees the one
it used. What this module adds is the SOCKS5 side: the client's header,
the client filter, the association's own end.

Bounds: at most `max_targets` destinations per association (the least
recently active is closed to make room); a destination whose outbound
failed drops its datagrams for `FAILED_HOLD` seconds, a REJECTed one until
idle, an unmapped or bad one for `FAILED_HOLD`; a full socket buffer
drops, as UDP may.

What it owns: its sessions and their peers (closed when `run` returns, also
when cancelled). Not the relay socket (the service's), nor the pins (the
connection's). How it fails: never for the client's datagrams or a peer's
replies; a destination that cannot be opened is logged and held off.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from appliance.config.model import IPAddress
from appliance.flow import Entry, Flow
from appliance.gateway.proxyport.handshake import Refused
from appliance.gateway.proxyport.target import Pins, Targets
from appliance.gateway.splice import FlowRecord
from appliance.gateway.tcp import ip_port
from appliance.gateway.udp import BATCH, RECV_SIZE, Session, UdpSessions
from appliance.gateway.udp_sessions import UdpStats, idle_timeout
from appliance.outbound.base import UdpPeer, as_ip
from appliance.proto import socks5 as s5
from appliance.proto.http_connect import format_authority

log = logging.getLogger(__name__)

# Bytes read at a time from the control connection, which RFC 1928 gives
# no further use: read and dropped until it ends.
_CONTROL_READ = 64 * 1024

# Route a UDP flow and open its outbound (`Dispatcher.open_udp`); None: REJECT.
OpenUdp = Callable[[Flow], Awaitable[UdpPeer | None]]


class UdpAssociation:
    """One UDP association: client <-> relay socket <-> one session per
    destination (`UdpSessions`). See the module doc."""

    FAILED_HOLD = 5.0

    def __init__(
        self,
        sock: socket.socket,
        client: tuple[str, int],
        hint: tuple[str | IPAddress, int],
        *,
        open_udp: OpenUdp,
        targets: Targets,
        pins: Pins,
        flow: FlowRecord,
        entry: Entry,
        idle_timeout: float,
        max_targets: int,
    ) -> None:
        self.sock = sock
        self.client_ip = client[0]
        hinted = as_ip(hint[0])
        # RFC 1928: DST.ADDR/PORT of the request is where the client will
        # send from, if it knows; zeros mean "not known yet".
        known = hint[1] and hinted is not None and not hinted.is_unspecified
        self.client_port = hint[1] if known else 0
        self.client_addr: Any = None
        self.targets = targets
        self.pins = pins
        self.flow = flow
        self.entry = entry
        self.idle_timeout = idle_timeout
        self.open_udp = open_udp
        self.sessions = UdpSessions(self._open, max_targets, hold=self.FAILED_HOLD)
        # Destinations refused before routing (unmapped fake IP, bad name):
        # dropped until then, so a client cannot make us log per datagram.
        self._refused: dict[tuple[str, int], float] = {}
        self.last = trio.current_time()

    @property
    def stats(self) -> UdpStats:
        return self.sessions.counters

    async def run(self, control: trio.abc.ReceiveStream) -> None:
        """Relay until `control` ends or the association idles out; every
        session's peer is closed when this returns (also when cancelled)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._from_client, nursery)
            nursery.start_soon(_cancel_at_eof, control, nursery.cancel_scope)
            # Datagrams move `self.last` (client) and each session's `last`
            # (replies too); the deadline is checked again when it fires
            # instead of being reset per datagram.
            while trio.current_time() < self._last() + self.idle_timeout:
                with trio.move_on_at(self._last() + self.idle_timeout):
                    await trio.sleep_forever()
            nursery.cancel_scope.cancel()

    def _last(self) -> float:
        return max([self.last, *(s.last for s in self.sessions.table)])

    async def _from_client(self, nursery: trio.Nursery) -> None:
        sock = self.sock
        recvfrom = sock.recvfrom
        table = self.sessions.table
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(BATCH):
                try:
                    data, sender = recvfrom(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # a queued ICMP error: not fatal
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
                self.last = now
                key = (str(dgram.host).lower(), dgram.port)
                s = table.get(key)
                if s is None:
                    s = self._new_session(key, dgram.host, dgram.port, now, nursery)
                    if s is None:
                        continue
                self.sessions.send_up(s, dgram.payload, now)

    async def _open(self, flow: Flow) -> UdpPeer | None:
        """`open_udp`, and the association's registry entry shows the
        outbound the latest destination took."""
        try:
            return await self.open_udp(flow)
        finally:
            if flow.outbound:
                self.flow.outbound = flow.outbound

    def _new_session(
        self,
        key: tuple[str, int],
        host: str | IPAddress,
        port: int,
        now: float,
        nursery: trio.Nursery,
    ) -> Session | None:
        """A destination's session, started; None while it is refused."""
        if now < self._refused.get(key, 0.0):
            return None
        src = (self.client_ip, self.client_port)
        try:
            flow = self.targets.resolve(host, port, src, self.pins, self.entry, "udp")
            header = s5.encode_udp(host, port, b"")
        except (Refused, s5.Socks5Error) as err:
            why = err.why if isinstance(err, Refused) else str(err)
            if len(self._refused) >= self.sessions.table.capacity:
                self._refused.clear()
            self._refused[key] = now + self.FAILED_HOLD
            log.warning("udp relay %s:%d -> %s: %s; dropping for %gs", *src,
                        format_authority(host, port), why, self.FAILED_HOLD)
            return None
        dst = (self.sock.family, str(flow.dst if flow.dst is not None else host), port)
        session = Session(key, src, dst, flow, now, idle_timeout(port, self.idle_timeout),
                          reply_to=self.client_addr, reply_header=header, meter=self.flow)
        self.sessions.add(session)
        nursery.start_soon(self.sessions.run, session, self.sock)
        return session


async def _cancel_at_eof(stream: trio.abc.ReceiveStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(_CONTROL_READ):
            pass
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()
