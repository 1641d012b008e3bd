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
destination; each destination gets its own peer from `open_udp` (the rules
pick the outbound: DIRECT, a SOCKS5 proxy with `udp: true`, REJECT), with
fake IPs mapped back to their names and pinned (`Targets`). Replies carry,
in their SOCKS5 header, the address the client sent to (its fake IP or
name), so a client that matches replies by address sees the one it used.
Fragments (FRAG != 0) and malformed headers are dropped (reassembly is
optional in the RFC; neither dante nor mihomo does it).

Bounds: at most `max_targets` destinations per association (the oldest is
closed to make room); a destination whose outbound failed or rejected
drops its datagrams for `FAILED_HOLD` seconds, then the next one tries
again; a full socket buffer drops, as UDP may.

What it owns: the peers it opened (closed when `run` returns, also when
cancelled). Not the relay socket (the service's), nor the pins (the
connection's). How it fails: never for the client's datagrams or a peer's
replies; a destination that cannot be opened is logged and held off.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from appliance.config.model import IPAddress
from appliance.flow import Flow, Inbound
from appliance.gateway.proxyport.handshake import Refused
from appliance.gateway.proxyport.target import Pins, Targets
from appliance.gateway.splice import FlowRecord
from appliance.gateway.tcp import ip_port
from appliance.gateway.udp_sessions import SessionTable
from appliance.outbound.base import UdpPeer, as_ip
from appliance.proto import socks5 as s5
from appliance.proto.http_connect import format_authority

log = logging.getLogger(__name__)

RECV_SIZE = 65535
# Bytes read at a time from the control connection, which RFC 1928 gives
# no further use: read and dropped until it ends.
_CONTROL_READ = 64 * 1024


# Route a UDP flow and open its outbound (`Dispatcher.open_udp`); None: REJECT.
OpenUdp = Callable[[Flow], Awaitable[UdpPeer | None]]


@dataclass(eq=False)
class _Destination:
    """One destination of an association, as the client named it."""

    host: str | IPAddress
    port: int
    peer: UdpPeer | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    retry_at: float = 0.0  # after a failed open: drop until then


class UdpAssociation:
    """One UDP association: client <-> relay socket <-> one peer per
    destination. See the module doc."""

    FAILED_HOLD = 5.0

    def __init__(
        self,
        sock: trio.socket.SocketType,
        client: tuple[str, int],
        hint: tuple[str | IPAddress, int],
        *,
        open_udp: OpenUdp,
        targets: Targets,
        pins: Pins,
        flow: FlowRecord,
        inbound: Inbound,
        connect_timeout: float,
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
        self.open_udp = open_udp
        self.targets = targets
        self.pins = pins
        self.flow = flow
        self.inbound: Inbound = inbound
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.dests: SessionTable[tuple[str, int], _Destination] = SessionTable(max_targets)
        self.last = trio.current_time()
        self._nursery: trio.Nursery | None = None

    async def run(self, control: trio.abc.ReceiveStream) -> None:
        """Relay until `control` ends or the association idles out; then
        close every peer (shielded, so also when cancelled)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._from_client)
                nursery.start_soon(_cancel_at_eof, control, nursery.cancel_scope)
                # Datagrams move `self.last`; the deadline is checked again
                # when it fires instead of being reset per datagram.
                while trio.current_time() < self.last + self.idle_timeout:
                    with trio.move_on_at(self.last + self.idle_timeout):
                        await trio.sleep_forever()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close every destination's peer."""
        dests = list(self.dests)
        self.dests = SessionTable(self.dests.capacity)
        for d in dests:
            d.scope.cancel()
            if d.peer is not None:
                await d.peer.aclose()

    # -- client -> destinations -----------------------------------------------------

    async def _from_client(self) -> None:
        while True:
            data, sender = await self.sock.recvfrom(RECV_SIZE)
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
        """The open peer for a destination, opening it on first use (or
        after its hold); None while it cannot be used."""
        key = (str(host).lower(), port)
        dest = self.dests.get(key)
        if dest is not None:
            if dest.peer is not None or trio.current_time() < dest.retry_at:
                return dest.peer
        else:
            dest = _Destination(host, port)
            oldest = self.dests.add(key, dest)
            if oldest is not None:  # at most max_targets: the oldest makes room
                oldest.scope.cancel()
                if oldest.peer is not None:
                    await oldest.peer.aclose()
        src = (self.client_ip, self.client_port)
        where = f"{src[0]}:{src[1]} -> {format_authority(host, port)}"
        try:
            target = self.targets.resolve(host, port, src, self.pins, self.inbound, "udp")
            with trio.fail_after(self.connect_timeout):
                dest.peer = await self.open_udp(target)
        except Refused as refusal:
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
            assert self._nursery is not None
            self._nursery.start_soon(self._from_peer, key, dest, dest.peer)
            log.debug("udp relay %s: via %s", where, dest.peer.outbound)
            return dest.peer
        dest.retry_at = trio.current_time() + self.FAILED_HOLD
        log.warning("udp relay %s: %s; dropping for %gs", where, why, self.FAILED_HOLD)
        return None

    # -- one destination -> client ------------------------------------------------------

    async def _from_peer(self, key: tuple[str, int], dest: _Destination, peer: UdpPeer) -> None:
        with dest.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_gone, peer, nursery.cancel_scope)
                await self._replies(dest, peer)
        if self.dests.get(key) is dest and dest.peer is peer:
            # The peer went away (proxy closed its control connection):
            # open a new one for the next datagram.
            dest.peer = None
            await peer.aclose()

    async def _replies(self, dest: _Destination, peer: UdpPeer) -> None:
        sock = peer.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(RECV_SIZE)
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


async def _cancel_when_gone(peer: UdpPeer, scope: trio.CancelScope) -> None:
    await peer.watch()
    scope.cancel()


async def _cancel_at_eof(stream: trio.abc.ReceiveStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(_CONTROL_READ):
            pass
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()
