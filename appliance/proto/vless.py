"""VLESS client: request header, response header and UDP packet framing, as
bytes in and bytes out; no I/O. VLESS itself has no encryption: it runs
inside TLS or a transport that carries it.

Request (Xray's, as sing-vmess/mihomo send it): version 0, the user's uuid
(16), addons length and addons (protobuf field 1: the `flow`, when set),
command (1 TCP, 2 UDP), port (2), address (1 IPv4, 2 name, 3 IPv6: the
VMess order and numbering), then the first payload. Response: version 0,
addons length, addons (skipped), then the body. UDP (command 2): every
datagram in either direction is a 2-byte big-endian length and the
payload, over the one stream of the flow.

A server that closes without a response header is what a wrong uuid gets;
the caller names that. `VlessError` for bytes that do not decode.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from appliance.proto.vmess import VmessError, encode_address

VERSION = 0
COMMAND_TCP = 1
COMMAND_UDP = 2
COMMAND_MUX = 3  # XUDP (appliance/proto/xudp.py): no address
MAX_PACKET = 0xFFFF


class VlessError(ValueError):
    """The server's bytes are not a VLESS response (wrong version, ...)."""


def request_header(user: bytes, host: str, port: int, *, command: int = COMMAND_TCP,
                   flow: str = "") -> bytes:
    """The request header for `host:port` (a name stays a name)."""
    addons = b""
    if flow:
        raw = flow.encode()
        addons = b"\x0a" + _uvarint(len(raw)) + raw
    try:
        address = encode_address(host, port) if command != COMMAND_MUX else b""
    except VmessError as e:
        raise VlessError(str(e)) from None
    return bytes((VERSION,)) + user + bytes((len(addons),)) + addons + bytes((command,)) + address


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class ResponseReader:
    """Strips the response header from the first bytes the server sends:
    `feed(data)` -> the body bytes that follow it (b"" until it is in)."""

    def __init__(self) -> None:
        self._head = bytearray()
        self.established = False

    def feed(self, data: bytes | bytearray) -> bytes:
        if self.established:
            return bytes(data)
        self._head += data
        if len(self._head) < 2:
            return b""
        if self._head[0] != VERSION:
            raise VlessError(f"response version {self._head[0]}, not {VERSION}")
        end = 2 + self._head[1]
        if len(self._head) < end:
            return b""
        self.established = True
        rest = bytes(self._head[end:])
        self._head = bytearray()
        return rest


def encode_packet(payload: bytes) -> bytes:
    """One UDP datagram on the stream: length (2) + payload."""
    if len(payload) > MAX_PACKET:
        raise VlessError(f"datagram of {len(payload)} bytes does not fit")
    return len(payload).to_bytes(2, "big") + payload


class PacketReader:
    """Splits the stream of a UDP flow back into datagrams."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 2:
            n = (buf[pos] << 8) | buf[pos + 1]
            if len(buf) - pos - 2 < n:
                break
            out.append(bytes(buf[pos + 2:pos + 2 + n]))
            pos += 2 + n
        del buf[:pos]
        return out


# XTLS Vision (`flow: xtls-rprx-vision`), client side. The VLESS stream runs
# inside TLS; Vision pads the first records of the flow's own TLS (its
# handshake) so that their sizes do not show through the outer TLS, and once
# the inner TLS 1.3 handshake is done both ends stop wrapping: the inner
# records go straight onto the TCP connection ("direct"). Each padded block:
# [uuid (16), first block only] command (1), content length (2), padding
# length (2), content, padding. Commands: 0 continue padding, 1 end of
# padding (the rest is plain, still inside the outer TLS), 2 direct (the rest
# goes on the raw connection). Ported from sing-vmess vless/vision.go (what
# sing-box and mihomo run), state for state.

VISION_FLOW = "xtls-rprx-vision"
CMD_CONTINUE = 0
CMD_END = 1
CMD_DIRECT = 2
_TLS_APPLICATION_DATA = b"\x17\x03\x03"
_TLS13_SUPPORTED_VERSIONS = b"\x00\x2b\x00\x02\x03\x04"
# TLS 1.3 suites under which the inner records may go direct (not CCM_8).
_TLS13_DIRECT_SUITES = (0x1301, 0x1302, 0x1303, 0x1304)
_RESHAPE_LIMIT = 8192 - 21


def _reshape(data: bytes) -> list[bytes]:
    """Pieces small enough for one padded block each, cut before the last
    application-data record header when there is one (as Xray does)."""
    if len(data) < _RESHAPE_LIMIT:
        return [data]
    index = data.rfind(_TLS_APPLICATION_DATA)
    if index <= 0:
        index = 8192 // 2
    return [data[:index], data[index:]]


class Vision:
    """The Vision state of one flow: `encode(data)` -> (bytes for the outer
    TLS, bytes for the raw connection), and `decode(data)` -> the plain
    bytes in what the outer TLS delivered; `direct_read` once the server
    switched to the raw connection (the caller reads there from then on),
    `direct_write` once we did. `random(n)` draws padding lengths."""

    def __init__(self, user: bytes, random: Callable[[int], bytes] = os.urandom) -> None:
        self._user = user
        self._random = random
        self._packets_to_filter = 8
        self._is_tls = False
        self._is_tls12_or_above = False
        self._remaining_server_hello = -1
        self._cipher = 0
        self._enable_xtls = False
        self._is_padding = True
        self._write_uuid = True
        self.direct_write = False
        # Reading.
        self._within_padding = True
        self._remaining_content = -1
        self._remaining_padding = -1
        self._command = 0
        self._head = b""  # a block header split across reads
        self.direct_read = False

    def _randint(self, bound: int) -> int:
        return int.from_bytes(self._random(4), "big") % bound

    def _pad(self, content: bytes, command: int) -> bytes:
        n = len(content)
        # Short records (handshake messages) grow to 900-1399 bytes.
        padding = self._randint(500) + 900 - n if n < 900 and self._is_tls else self._randint(256)
        head = self._user if self._write_uuid else b""
        self._write_uuid = False
        return b"".join((head, bytes((command, n >> 8, n & 0xFF, padding >> 8, padding & 0xFF)),
                         content, bytes(padding)))

    def encode(self, data: bytes) -> tuple[bytes, bytes]:
        if self._packets_to_filter > 0:
            self._filter(data)
        if not self._is_padding:
            return (b"", data) if self.direct_write else (data, b"")
        pieces = _reshape(data)
        out: list[bytes] = []
        rest: list[bytes] = []
        for i, piece in enumerate(pieces):
            if self._is_tls and len(piece) > 6 and piece[:3] == _TLS_APPLICATION_DATA:
                command = CMD_END
                if self._enable_xtls:
                    self.direct_write = True
                    command = CMD_DIRECT
                self._is_padding = False
                out.append(self._pad(piece, command))
                rest = pieces[i + 1:]
                break
            if not self._is_tls12_or_above and self._packets_to_filter <= 1:
                self._is_padding = False
                out.append(self._pad(piece, CMD_END))
                rest = pieces[i + 1:]
                break
            out.append(self._pad(piece, CMD_CONTINUE))
        if self.direct_write:
            return b"".join(out), b"".join(rest)
        return b"".join(out + rest), b""

    def decode(self, data: bytes) -> bytes:
        if not (self._within_padding or self._packets_to_filter > 0):
            return data
        plain = self._unpad(data)
        if self._remaining_content == 0 and self._remaining_padding == 0:
            if self._command == CMD_END:
                self._within_padding = False
                self._remaining_content = self._remaining_padding = -1
            elif self._command == CMD_DIRECT:
                self._within_padding = False
                self.direct_read = True
            elif self._command == CMD_CONTINUE:
                self._within_padding = True
            else:
                raise VlessError(f"vision: unknown command {self._command}")
        elif self._remaining_content > 0 or self._remaining_padding > 0:
            self._within_padding = True
        else:
            self._within_padding = False
        if self._packets_to_filter > 0:
            self._filter(plain)
        return plain

    def _unpad(self, data: bytes) -> bytes:
        if self._head:
            data, self._head = self._head + data, b""
        i = 0
        if self._remaining_content == -1 and self._remaining_padding == -1:
            if len(data) >= 21 and data[:16] == self._user:
                i = 16
                self._remaining_content = self._remaining_padding = 0
                self._command = 0
            else:
                return data
        out: list[bytes] = []
        end = len(data)
        while i < end:
            if self._remaining_content <= 0 and self._remaining_padding <= 0:
                if self._command == CMD_END:
                    out.append(data[i:])
                    break
                if end - i < 5:
                    self._head = data[i:]
                    break
                self._command = data[i]
                self._remaining_content = (data[i + 1] << 8) | data[i + 2]
                self._remaining_padding = (data[i + 3] << 8) | data[i + 4]
                i += 5
            elif self._remaining_content > 0:
                n = min(self._remaining_content, end - i)
                out.append(data[i:i + n])
                self._remaining_content -= n
                i += n
            else:
                n = min(self._remaining_padding, end - i)
                self._remaining_padding -= n
                i += n
        return b"".join(out)

    def _filter(self, data: bytes) -> None:
        """Learn from the flow's first packets whether it is TLS, which
        version, and whether its records may go direct."""
        self._packets_to_filter -= 1
        if len(data) > 6:
            if data[0] == 22 and data[1] == 3 and data[2] == 3:
                self._is_tls = True
                if data[5] == 2:
                    self._is_tls12_or_above = True
                    self._remaining_server_hello = ((data[3] << 8) | data[4]) + 5
                    if len(data) >= 79 and self._remaining_server_hello >= 79:
                        sid = data[43]
                        if len(data) >= 43 + sid + 3:
                            self._cipher = (data[43 + sid + 1] << 8) | data[43 + sid + 2]
            elif data[:2] == b"\x16\x03" and data[5] == 1:
                self._is_tls = True
        if self._remaining_server_hello > 0:
            end = min(self._remaining_server_hello, len(data))
            self._remaining_server_hello -= end
            if _TLS13_SUPPORTED_VERSIONS in data[:end]:
                self._enable_xtls = self._cipher in _TLS13_DIRECT_SUITES
                self._packets_to_filter = 0
            elif self._remaining_server_hello == 0:
                self._packets_to_filter = 0
