"""Hysteria2's framing over QUIC, without I/O.

What this is for: the Hysteria2 outbound (appliance/outbound/hysteria2.py)
builds and parses these byte strings; the QUIC connection, the HTTP/3 auth
request and the sockets are its business. Nothing here imports trio or
aioquic, so every parser is testable with plain bytes
(tests/unit/test_quic_framing.py).

The wire format (the Hysteria 2 protocol document, as sing-box and mihomo
speak it):

- Auth: an HTTP/3 `POST https://hysteria/auth` with `Hysteria-Auth` (the
  password), `Hysteria-CC-RX` (the client's receive rate in bytes/s, 0 for
  unknown) and `Hysteria-Padding`; status 233 means accepted, anything else
  (a masquerade page, 404) refused.
- TCP: one bidirectional stream per connection, opened by
  `varint 0x401, varint len, "host:port", varint len, padding`; the server
  answers `u8 status (0 ok), varint len, message, varint len, padding`, then
  the stream is the tunnel.
- UDP: QUIC datagrams `u32 session, u16 packet id, u8 fragment id,
  u8 fragment count, varint len, "host:port", payload`; a packet larger
  than one datagram is sent as fragments with the same packet id.
- Salamander obfuscation: every UDP packet of the QUIC connection becomes
  `salt(8) || packet XOR BLAKE2b-256(password || salt)` (the 32-byte hash
  repeated).

Varints are QUIC's (RFC 9000 section 16). Addresses are `host:port` text,
IPv6 in brackets. How it fails: malformed input raises `Hysteria2Error`
(never IndexError, UnicodeError or struct.error: the hypothesis tests hold
the parsers to that); incremental parsers return None while the input is an
incomplete prefix.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import struct
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

AUTH_PATH = "/auth"
AUTH_AUTHORITY = "hysteria"
AUTH_OK_STATUS = 233
TCP_REQUEST_FRAME = 0x401
MAX_VARINT = (1 << 62) - 1
# Bounds the server must respect; anything larger is an attack or a bug.
MAX_ADDRESS_LENGTH = 2048
MAX_MESSAGE_LENGTH = 2048
MAX_PADDING_LENGTH = 4096
# Padding sizes the reference client uses (random in [lo, hi)).
TCP_REQUEST_PADDING = (64, 512)
AUTH_PADDING = (256, 2048)
SALAMANDER_SALT_LENGTH = 8
SALAMANDER_MIN_PASSWORD = 4


class Hysteria2Error(Exception):
    """Malformed Hysteria2 framing or a refused request."""


# -- varints (RFC 9000 section 16) ------------------------------------------------


def encode_varint(value: int) -> bytes:
    if value < 0 or value > MAX_VARINT:
        raise Hysteria2Error(f"varint out of range: {value}")
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return struct.pack("!H", value | 0x4000)
    if value < 0x4000_0000:
        return struct.pack("!I", value | 0x8000_0000)
    return struct.pack("!Q", value | 0xC000_0000_0000_0000)


def decode_varint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """(value, next offset), or None when `data` ends inside the varint."""
    if offset >= len(data):
        return None
    first = data[offset]
    size = 1 << (first >> 6)
    if offset + size > len(data):
        return None
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | data[offset + i]
    return value, offset + size


# -- addresses ---------------------------------------------------------------------


def format_address(host: str | IPAddress, port: int) -> str:
    """`host:port`, an IPv6 literal in brackets."""
    if not 0 <= port <= 0xFFFF:
        raise Hysteria2Error(f"bad port {port}")
    text = str(host)
    if ":" in text and not text.startswith("["):
        text = f"[{text}]"
    return f"{text}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` -> (host without brackets, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or len(port_text) > 5:
        raise Hysteria2Error(f"bad address {text!r}")
    port = int(port_text)
    if port > 0xFFFF:
        raise Hysteria2Error(f"bad port in {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _padding(bounds: tuple[int, int]) -> bytes:
    lo, hi = bounds
    return os.urandom(lo + int.from_bytes(os.urandom(2), "big") % (hi - lo))


def auth_padding() -> str:
    """A `Hysteria-Padding` header value: random printable filler."""
    return _padding(AUTH_PADDING).hex()[: AUTH_PADDING[0]]


_RATE = re.compile(r"(\d+)\s*([KMGT]?)([Bb])ps")
_RATE_UNIT = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def rate_bps(text: str | None) -> int:
    """Bytes per second of an `up`/`down` option as mihomo reads it: a bare
    integer is Mbit/s, else `N [K|M|G|T](bps|Bps)` (`b` bits, `B` bytes,
    decimal units); empty or anything else is 0 (unknown)."""
    if not text:
        return 0
    if text.isdigit():
        return int(text) * 10**6 // 8
    m = _RATE.fullmatch(text)
    if m is None:
        return 0
    n = int(m.group(1)) * _RATE_UNIT[m.group(2)]
    return n // 8 if m.group(3) == "b" else n


# -- TCP ------------------------------------------------------------------------------


def encode_tcp_request(host: str | IPAddress, port: int, padding: bytes | None = None) -> bytes:
    """The first bytes of a TCP proxy stream."""
    address = format_address(host, port).encode()
    if len(address) > MAX_ADDRESS_LENGTH:
        raise Hysteria2Error("address too long")
    pad = _padding(TCP_REQUEST_PADDING) if padding is None else padding
    return b"".join((encode_varint(TCP_REQUEST_FRAME), encode_varint(len(address)), address,
                     encode_varint(len(pad)), pad))


def parse_tcp_request(data: bytes | bytearray) -> tuple[str, int, int] | None:
    """(host, port, bytes consumed) of a TCP request, None while incomplete
    (the server's side; the tests use it as the oracle of the encoder)."""
    got = decode_varint(data)
    if got is None:
        return None
    frame, at = got
    if frame != TCP_REQUEST_FRAME:
        raise Hysteria2Error(f"unexpected frame type {frame:#x}")
    address, at_or_none = _length_prefixed(data, at, MAX_ADDRESS_LENGTH, "address")
    if address is None or at_or_none is None:
        return None
    _pad, end = _length_prefixed(data, at_or_none, MAX_PADDING_LENGTH, "padding")
    if end is None:
        return None
    host, port = parse_address(_text(address, "address"))
    return host, port, end


def encode_tcp_response(ok: bool, message: str = "", padding: bytes = b"") -> bytes:
    """The server's answer (for tests and the oracle)."""
    msg = message.encode()
    return b"".join((bytes((0 if ok else 1,)), encode_varint(len(msg)), msg,
                     encode_varint(len(padding)), padding))


@dataclass(frozen=True)
class TcpResponse:
    """The server's answer to a TCP request: `ok`, its `message` (why not)
    and how many bytes of the stream it took (`length`)."""

    ok: bool
    message: str
    length: int


def parse_tcp_response(data: bytes | bytearray) -> TcpResponse | None:
    """The TCP response at the start of `data`, None while incomplete."""
    if not data:
        return None
    status = data[0]
    message, at = _length_prefixed(data, 1, MAX_MESSAGE_LENGTH, "message")
    if message is None or at is None:
        return None
    _pad, end = _length_prefixed(data, at, MAX_PADDING_LENGTH, "padding")
    if end is None:
        return None
    return TcpResponse(status == 0, _text(message, "message"), end)


def _length_prefixed(data: bytes | bytearray, at: int, limit: int, what: str
                     ) -> tuple[bytes | None, int | None]:
    got = decode_varint(data, at)
    if got is None:
        return None, None
    n, at = got
    if n > limit:
        raise Hysteria2Error(f"{what} length {n} over {limit}")
    if at + n > len(data):
        return None, None
    return bytes(data[at:at + n]), at + n


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise Hysteria2Error(f"{what} is not UTF-8") from None


# -- UDP --------------------------------------------------------------------------------

_UDP_HEAD = struct.Struct("!IHBB")


@dataclass(frozen=True)
class UdpMessage:
    """One UDP message (or fragment of one) of session `session_id`."""

    session_id: int
    packet_id: int
    fragment_id: int
    fragment_count: int
    address: str
    payload: bytes

    def encode(self) -> bytes:
        address = self.address.encode()
        return b"".join((_UDP_HEAD.pack(self.session_id, self.packet_id, self.fragment_id,
                                        self.fragment_count),
                         encode_varint(len(address)), address, self.payload))


def parse_udp_message(data: bytes | bytearray | memoryview) -> UdpMessage:
    if len(data) < _UDP_HEAD.size:
        raise Hysteria2Error("UDP message shorter than its header")
    session_id, packet_id, frag_id, frag_count = _UDP_HEAD.unpack_from(data)
    got = decode_varint(data, _UDP_HEAD.size)
    if got is None:
        raise Hysteria2Error("UDP message ends in its address length")
    n, at = got
    if n > MAX_ADDRESS_LENGTH or at + n > len(data):
        raise Hysteria2Error("UDP message address overruns it")
    if frag_count == 0 or frag_id >= frag_count:
        raise Hysteria2Error(f"fragment {frag_id} of {frag_count}")
    address = _text(bytes(data[at:at + n]), "address")
    return UdpMessage(session_id, packet_id, frag_id, frag_count, address,
                      bytes(data[at + n:]))


def encode_udp(session_id: int, packet_id: int, address: str, payload: bytes,
               max_size: int) -> list[bytes]:
    """One UDP packet as datagrams of at most `max_size` bytes: one message,
    or fragments (at most 255) when it does not fit."""
    whole = UdpMessage(session_id, packet_id, 0, 1, address, payload).encode()
    if len(whole) <= max_size:
        return [whole]
    room = max_size - (len(whole) - len(payload))
    if room <= 0:
        raise Hysteria2Error(f"datagram size {max_size} leaves no room for payload")
    count = -(-len(payload) // room)
    if count > 255:
        raise Hysteria2Error(f"UDP packet of {len(payload)} bytes needs {count} fragments")
    return [UdpMessage(session_id, packet_id, i, count, address,
                       payload[i * room:(i + 1) * room]).encode() for i in range(count)]


class Defragmenter:
    """Reassembles fragmented UDP messages of one session. Keeps one packet
    in progress (the reference does the same): a fragment of a newer packet
    drops the older one's fragments."""

    def __init__(self) -> None:
        self._packet_id: int | None = None
        self._parts: list[bytes | None] = []
        self._left = 0

    def feed(self, msg: UdpMessage) -> UdpMessage | None:
        """The whole message once its last fragment is in, else None."""
        if msg.fragment_count == 1:
            return msg
        if msg.packet_id != self._packet_id or len(self._parts) != msg.fragment_count:
            self._packet_id = msg.packet_id
            self._parts = [None] * msg.fragment_count
            self._left = msg.fragment_count
        if self._parts[msg.fragment_id] is None:
            self._parts[msg.fragment_id] = msg.payload
            self._left -= 1
        if self._left:
            return None
        payload = b"".join(p for p in self._parts if p is not None)
        self._packet_id, self._parts = None, []
        return UdpMessage(msg.session_id, msg.packet_id, 0, 1, msg.address, payload)


# -- Salamander -------------------------------------------------------------------------


class Salamander:
    """The Salamander obfuscator for every UDP packet of the connection."""

    def __init__(self, password: str) -> None:
        if len(password.encode()) < SALAMANDER_MIN_PASSWORD:
            raise Hysteria2Error(
                f"salamander password shorter than {SALAMANDER_MIN_PASSWORD} bytes")
        self._password = password.encode()

    def _mask(self, salt: bytes, n: int) -> bytes:
        key = hashlib.blake2b(self._password + salt, digest_size=32).digest()
        return (key * (n // 32 + 1))[:n]

    def obfuscate(self, packet: bytes, salt: bytes | None = None) -> bytes:
        salt = os.urandom(SALAMANDER_SALT_LENGTH) if salt is None else salt
        return salt + _xor(packet, self._mask(salt, len(packet)))

    def deobfuscate(self, data: bytes) -> bytes | None:
        """The packet, None if `data` is too short to carry one."""
        if len(data) <= SALAMANDER_SALT_LENGTH:
            return None
        salt = data[:SALAMANDER_SALT_LENGTH]
        body = data[SALAMANDER_SALT_LENGTH:]
        return _xor(body, self._mask(salt, len(body)))


def _xor(a: bytes, b: bytes) -> bytes:
    # Whole-buffer integer XOR: one C-level operation instead of a Python
    # loop per byte (a 1200-byte packet costs microseconds, not hundreds).
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")
