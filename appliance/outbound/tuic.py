"""TUIC v5 outbound: TCP as QUIC streams, UDP as datagrams or streams.

One QUIC connection per proxy (`SharedTunnel`). Right after QUIC's
handshake the tunnel sends Authenticate on a unidirectional stream (the
UUID and the TLS exporter's token for label = UUID, context = password);
TUIC has no answer to it, so flows start at once and a refused UUID or
password shows as the server closing the connection (its error code and
reason are logged at WARNING and fail every flow on it). Each TCP flow is a
bidirectional stream that starts with Connect (the target as a *name*); a
UDP flow is an association id whose Packets go as DATAGRAM frames
(`udp-relay-mode: native`, fragmented when one does not fit) or one
unidirectional stream each (`quic`); the flow's end sends Dissociate.
While flows are open, a Heartbeat datagram every `heartbeat-interval`
keeps the connection alive.

`congestion-controller: bbr` has no implementation in aioquic (cubic is
used, said at INFO); `reduce-rtt` (0-RTT) is accepted without effect.

How it fails (OutboundError): handshake timeout (`request-timeout` or the
connect timeout, the sooner: server down, UDP blocked), certificate
refused, connection closed by the server.
"""

from __future__ import annotations

import itertools
import logging
import socket
from typing import Any

import trio
from aioquic.quic import events

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.tuic import TuicOptions
from appliance.outbound.base import Dialer, OutboundEnv, OutboundError, UdpPeer
from appliance.outbound.quic import (
    DATAGRAM_ROOM,
    QuicOutbound,
    QuicTls,
    QuicTunnel,
    open_request_stream,
)
from appliance.proto.tuic import (
    CMD_PACKET,
    HEARTBEAT,
    TOKEN_LENGTH,
    Packet,
    Reassembler,
    TuicError,
    encode_authenticate,
    encode_connect,
    encode_dissociate,
    encode_packet,
    parse_command,
)

log = logging.getLogger(__name__)

# aioquic's names for the congestion controllers mihomo names.
_CONGESTION = {"cubic": "cubic", "new_reno": "reno", "bbr": "cubic"}
# A server-opened stream carrying one Packet (quic relay mode) is at most
# this long.
_MAX_PACKET_STREAM = 1 << 17


class TuicTunnel(QuicTunnel):
    """A QUIC connection to a TUIC v5 server: Authenticate after QUIC's
    handshake, the associations' Packets (`sessions`, by association id),
    Heartbeats while flows are open."""

    def __init__(self, *args: Any, options: TuicOptions, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options = options
        self.keepalive_interval = options.heartbeat_interval
        self._incoming: dict[int, bytearray] = {}

    async def handshake(self) -> None:
        token = self.export_keying_material(self.options.uuid.bytes,
                                            self.options.password.encode(), TOKEN_LENGTH)
        self.send_uni(encode_authenticate(self.options.uuid, token))
        await trio.lowlevel.checkpoint()

    def send_uni(self, data: bytes) -> None:
        """One command on a unidirectional stream of its own."""
        if self.closed_reason is not None:
            return
        stream_id = self.quic.get_next_available_stream_id(is_unidirectional=True)
        self.quic.send_stream_data(stream_id, data, end_stream=True)

    def keepalive(self) -> None:
        self.quic.send_datagram_frame(HEARTBEAT)

    def close_hint(self) -> str:
        # TUIC never answers Authenticate: a server that closes before it
        # served a byte most likely refused the uuid or password.
        return "" if self.received else " before serving any stream (wrong uuid or password?)"

    def on_datagram(self, data: bytes) -> None:
        self._command(data)

    def on_other_stream(self, event: events.StreamDataReceived | events.StreamReset) -> None:
        # Packets in quic relay mode arrive on server-opened uni streams.
        if isinstance(event, events.StreamReset):
            self._incoming.pop(event.stream_id, None)
            return
        buf = self._incoming.setdefault(event.stream_id, bytearray())
        buf += event.data
        if len(buf) > _MAX_PACKET_STREAM:
            self._incoming.pop(event.stream_id, None)
            return
        if event.end_stream:
            self._command(bytes(self._incoming.pop(event.stream_id)))

    def _command(self, data: bytes) -> None:
        try:
            cmd, body = parse_command(data)
        except TuicError:
            return
        if cmd == CMD_PACKET and isinstance(body, Packet):
            self.deliver_fragment(body.assoc_id, body)

    def on_end(self, reason: str) -> None:
        self._incoming.clear()


class TuicOutbound(QuicOutbound):
    """Flows through a TUIC v5 server (see the module doc)."""

    type = "Tuic"

    def __init__(self, name: str, server: str, port: int, options: TuicOptions, *,
                 tls: QuicTls, dialer: Dialer, connect_timeout: float) -> None:
        super().__init__(name, server, port, tls=tls, dialer=dialer,
                         connect_timeout=min(connect_timeout, options.request_timeout),
                         ca=options.ca, ca_str=options.ca_str,
                         congestion=_CONGESTION[options.congestion_controller])
        self.options = options

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> TuicOutbound:
        options = p.options
        assert isinstance(options, TuicOptions)
        if options.congestion_controller == "bbr":
            log.info("%s: congestion-controller bbr is not implemented: cubic is used", p.name)
        return cls(
            p.name, options.ip or p.server, p.port, options,
            tls=QuicTls.of(p),
            dialer=env.server_dialer(),
            connect_timeout=env.connect_timeout,
        )  # fmt: skip

    def make_tunnel(self, sock: socket.socket, address: tuple[Any, ...]) -> QuicTunnel:
        return TuicTunnel(self.name, self.configuration, sock, address, options=self.options)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        try:
            request = encode_connect(host, port)
        except TuicError as e:
            raise OutboundError(f"{self.name}: {e}") from None
        return await open_request_stream(await self.shared.get(), request, self.name)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        tunnel = await self.shared.get()
        assert isinstance(tunnel, TuicTunnel)
        assoc = tunnel.new_session(0xFFFF)
        packet_ids = itertools.count()
        native = self.options.udp_relay_mode == "native"
        # A Packet on a stream of its own is not bound by the datagram size.
        room = DATAGRAM_ROOM if native else 0xFFFF + 64
        send_frame = tunnel.quic.send_datagram_frame if native else tunnel.send_uni

        def send(payload: bytes) -> None:
            try:
                frames = encode_packet(assoc, next(packet_ids) & 0xFFFF, host, port, payload,
                                       room)
            except TuicError:
                return  # too large even in 255 fragments: dropped, as UDP may
            for frame in frames:
                send_frame(frame)

        def dissociate() -> None:
            tunnel.send_uni(encode_dissociate(assoc))
            tunnel.transmit()

        return await self.open_session(tunnel, assoc, Reassembler(), send=send,
                                       on_close=dissociate)
