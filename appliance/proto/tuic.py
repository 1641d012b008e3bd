"""TUIC v5's commands, without I/O.

What this is for: the TUIC outbound (appliance/outbound/tuic.py) builds and
parses these byte strings; the QUIC connection, the TLS exporter that makes
the token and the sockets are its business. Nothing here imports trio or
aioquic (tests/unit/test_quic_framing.py).

The wire format (TUIC v5's SPEC.md, as sing-box and mihomo speak it): every
command is `VER(0x05) TYPE` and a body, big-endian:

- Authenticate (0x00), on a unidirectional stream: `UUID(16) TOKEN(32)`,
  the token being the TLS exporter's 32 bytes with label = the raw UUID and
  context = the password.
- Connect (0x01), at the start of a bidirectional stream: `ADDR`; there is
  no answer: the stream is the tunnel (the server resets it on failure).
- Packet (0x02), as a datagram (`udp-relay-mode: native`) or on a
  unidirectional stream (`quic`): `ASSOC_ID(2) PKT_ID(2) FRAG_TOTAL(1)
  FRAG_ID(1) SIZE(2) ADDR payload`; the server answers with Packets of the
  same association.
- Dissociate (0x03), on a unidirectional stream: `ASSOC_ID(2)`.
- Heartbeat (0x04), as a datagram: keeps the connection alive while it
  carries flows.

`ADDR` is `TYPE(1)` (0xff none, 0x00 name with a length byte, 0x01 IPv4,
0x02 IPv6) then the address and `PORT(2)`; none has no port. How it fails:
malformed input raises `TuicError` (the hypothesis tests hold the parsers to
that).
"""

from __future__ import annotations

import ipaddress
import struct
import uuid as uuid_module
from dataclasses import dataclass

from appliance.proto.socks5 import ip_literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

VERSION = 0x05
CMD_AUTHENTICATE = 0x00
CMD_CONNECT = 0x01
CMD_PACKET = 0x02
CMD_DISSOCIATE = 0x03
CMD_HEARTBEAT = 0x04

ADDR_NONE = 0xFF
ADDR_DOMAIN = 0x00
ADDR_IPV4 = 0x01
ADDR_IPV6 = 0x02

TOKEN_LENGTH = 32
_PACKET_HEAD = struct.Struct("!HHBBH")


class TuicError(Exception):
    """Malformed TUIC command."""


def encode_address(host: str | IPAddress | None, port: int = 0) -> bytes:
    """`ADDR` for host:port (a name goes as a name); None: the none address."""
    if host is None:
        return bytes((ADDR_NONE,))
    if not 0 <= port <= 0xFFFF:
        raise TuicError(f"bad port {port}")
    ip = host if isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address) else None
    if ip is None:
        assert isinstance(host, str)
        ip = ip_literal(host)
        if ip is None:
            name = host.encode("idna") if not host.isascii() else host.encode()
            if not 0 < len(name) < 256:
                raise TuicError(f"bad name {host!r}") from None
            return bytes((ADDR_DOMAIN, len(name))) + name + port.to_bytes(2, "big")
    kind = ADDR_IPV4 if ip.version == 4 else ADDR_IPV6
    return bytes((kind,)) + ip.packed + port.to_bytes(2, "big")


def parse_address(data: bytes | bytearray | memoryview, at: int = 0
                  ) -> tuple[str | None, int, int]:
    """(host or None, port, next offset) of the `ADDR` at `at`."""
    if at >= len(data):
        raise TuicError("address missing")
    kind = data[at]
    at += 1
    if kind == ADDR_NONE:
        return None, 0, at
    if kind == ADDR_DOMAIN:
        if at >= len(data):
            raise TuicError("name length missing")
        n = data[at]
        end = at + 1 + n
        raw = bytes(data[at + 1:end])
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise TuicError("name is not ASCII") from None
    elif kind == ADDR_IPV4:
        end = at + 4
        host = str(ipaddress.IPv4Address(bytes(data[at:end]))) if end <= len(data) else ""
    elif kind == ADDR_IPV6:
        end = at + 16
        host = str(ipaddress.IPv6Address(bytes(data[at:end]))) if end <= len(data) else ""
    else:
        raise TuicError(f"unknown address type {kind:#x}")
    if end + 2 > len(data):
        raise TuicError("address truncated")
    return host, int.from_bytes(data[end:end + 2], "big"), end + 2


def encode_authenticate(user: uuid_module.UUID, token: bytes) -> bytes:
    if len(token) != TOKEN_LENGTH:
        raise TuicError(f"token of {len(token)} bytes, not {TOKEN_LENGTH}")
    return bytes((VERSION, CMD_AUTHENTICATE)) + user.bytes + token


def encode_connect(host: str | IPAddress, port: int) -> bytes:
    return bytes((VERSION, CMD_CONNECT)) + encode_address(host, port)


def encode_dissociate(assoc_id: int) -> bytes:
    return bytes((VERSION, CMD_DISSOCIATE)) + assoc_id.to_bytes(2, "big")


HEARTBEAT = bytes((VERSION, CMD_HEARTBEAT))


@dataclass(frozen=True)
class Packet:
    """A Packet command (or one fragment of a UDP packet). `host` is None
    on fragments after the first, which carry no address."""

    assoc_id: int
    packet_id: int
    frag_total: int
    frag_id: int
    host: str | None
    port: int
    payload: bytes

    def encode(self) -> bytes:
        head = _PACKET_HEAD.pack(self.assoc_id, self.packet_id, self.frag_total, self.frag_id,
                                 len(self.payload))
        return (bytes((VERSION, CMD_PACKET)) + head + encode_address(self.host, self.port)
                + self.payload)


def encode_packet(assoc_id: int, packet_id: int, host: str | IPAddress, port: int,
                  payload: bytes, max_size: int) -> list[bytes]:
    """One UDP packet as Packet commands of at most `max_size` bytes (only
    the first fragment carries the address), at most 255 fragments."""
    whole = Packet(assoc_id, packet_id, 1, 0, str(host), port, payload).encode()
    if len(whole) <= max_size:
        return [whole]
    first_room = max_size - (len(whole) - len(payload))
    rest_room = max_size - (2 + _PACKET_HEAD.size + 1)
    if first_room <= 0:
        raise TuicError(f"datagram size {max_size} leaves no room for payload")
    parts = [payload[:first_room]]
    parts += [payload[i:i + rest_room] for i in range(first_room, len(payload), rest_room)]
    if len(parts) > 255:
        raise TuicError(f"UDP packet of {len(payload)} bytes needs {len(parts)} fragments")
    return [Packet(assoc_id, packet_id, len(parts), i, str(host) if i == 0 else None,
                   port if i == 0 else 0, part).encode() for i, part in enumerate(parts)]


def parse_command(data: bytes | bytearray | memoryview) -> tuple[int, Packet | int | None]:
    """(command type, body) of a whole command: a Packet, a Dissociate's
    association id, or None (Heartbeat; Authenticate and Connect are the
    client's and are not expected here)."""
    if len(data) < 2:
        raise TuicError("command shorter than its header")
    if data[0] != VERSION:
        raise TuicError(f"version {data[0]:#x}, not 5")
    cmd = data[1]
    if cmd == CMD_HEARTBEAT:
        return cmd, None
    if cmd == CMD_DISSOCIATE:
        if len(data) < 4:
            raise TuicError("dissociate truncated")
        return cmd, int.from_bytes(data[2:4], "big")
    if cmd != CMD_PACKET:
        raise TuicError(f"unexpected command {cmd:#x}")
    if len(data) < 2 + _PACKET_HEAD.size:
        raise TuicError("packet header truncated")
    assoc, pkt, total, frag, size = _PACKET_HEAD.unpack_from(data, 2)
    host, port, at = parse_address(data, 2 + _PACKET_HEAD.size)
    if total == 0 or frag >= total:
        raise TuicError(f"fragment {frag} of {total}")
    if at + size > len(data):
        raise TuicError("packet payload truncated")
    return cmd, Packet(assoc, pkt, total, frag, host, port, bytes(data[at:at + size]))


class Reassembler:
    """Reassembles fragmented Packets of one association (one packet in
    progress at a time: a fragment of a newer packet drops the older one)."""

    def __init__(self) -> None:
        self._packet_id: int | None = None
        self._parts: list[bytes | None] = []
        self._left = 0
        self._host: str | None = None
        self._port = 0

    def feed(self, p: Packet) -> Packet | None:
        if p.frag_total == 1:
            return p
        if p.packet_id != self._packet_id or len(self._parts) != p.frag_total:
            self._packet_id = p.packet_id
            self._parts = [None] * p.frag_total
            self._left = p.frag_total
            self._host, self._port = None, 0
        if p.host is not None:
            self._host, self._port = p.host, p.port
        if self._parts[p.frag_id] is None:
            self._parts[p.frag_id] = p.payload
            self._left -= 1
        if self._left:
            return None
        payload = b"".join(x for x in self._parts if x is not None)
        self._packet_id, self._parts = None, []
        return Packet(p.assoc_id, p.packet_id, 1, 0, self._host, self._port, payload)
