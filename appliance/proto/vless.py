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

from appliance.proto.vmess import VmessError, encode_address

VERSION = 0
COMMAND_TCP = 1
COMMAND_UDP = 2
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
        address = encode_address(host, port)
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
