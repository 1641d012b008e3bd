"""Trojan's wire format, without I/O (trojan-gfw's protocol document).

A Trojan connection is TLS to the server; the client's first bytes are

    hex(SHA224(password)) CRLF  CMD  ATYP DST.ADDR DST.PORT  CRLF  payload...

with CMD 1 (CONNECT) or 3 (UDP ASSOCIATE) and the address in SOCKS5 form
(RFC 1928), a name passed on as a name. The server never answers: a wrong
password is served as whatever the server falls back to (often a web page,
or a closed connection), so the client learns of it only from what comes
back. After CONNECT the stream is the tunnel. After UDP ASSOCIATE each
datagram is framed both ways as

    ATYP DST.ADDR DST.PORT  Length(2, big endian)  CRLF  Payload

`UdpDecoder` takes the stream's bytes as they come and returns whole
packets. Errors: `TrojanError` (a name that does not fit, a malformed
packet from the server).
"""

from __future__ import annotations

import hashlib

from appliance.proto.socks5 import Host, Socks5Error, decode_address, encode_address

CMD_CONNECT = 0x01
CMD_UDP_ASSOCIATE = 0x03
CRLF = b"\r\n"
# A packet's payload length is 16 bits; the largest datagram we frame.
MAX_UDP_PAYLOAD = 0xFFFF


class TrojanError(ValueError):
    """A Trojan request could not be made or a packet could not be read
    (a ValueError: what a PacketCodec raises for bytes that do not decode)."""


def password_key(password: str) -> bytes:
    """The 56 hex digits that stand for `password` in every request."""
    return hashlib.sha224(password.encode()).hexdigest().encode("ascii")


def encode_request(key: bytes, command: int, host: Host, port: int) -> bytes:
    """The request head (`key` from `password_key`); the payload follows it
    on the same stream. TrojanError for an address that does not encode."""
    try:
        address = encode_address(host, port)
    except Socks5Error as e:
        raise TrojanError(str(e)) from None
    return b"".join((key, CRLF, bytes((command,)), address, CRLF))


def encode_udp(address: bytes, payload: bytes | bytearray | memoryview) -> bytes:
    """One UDP packet; `address` is `encode_address(host, port)` of its
    destination, made once per flow."""
    n = len(payload)
    if n > MAX_UDP_PAYLOAD:
        raise TrojanError(f"UDP payload of {n} bytes does not fit a Trojan packet")
    return b"".join((address, n.to_bytes(2, "big"), CRLF, payload))


class UdpDecoder:
    """Whole UDP packets out of the server's byte stream.

    `feed(data)` returns the (host, port, payload) of every packet that is
    complete so far and keeps the rest. Raises TrojanError on a malformed
    packet (bad address type, missing CRLF): the stream is then unusable.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[tuple[Host, int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[Host, int, bytes]] = []
        pos = 0
        while True:
            try:
                parsed = decode_address(buf, pos)
            except Socks5Error as e:
                raise TrojanError(f"bad UDP packet from the server: {e}") from None
            if parsed is None:
                break
            host, port, end = parsed
            if len(buf) < end + 4:
                break
            n = int.from_bytes(buf[end:end + 2], "big")
            if buf[end + 2:end + 4] != CRLF:
                raise TrojanError("bad UDP packet from the server: no CRLF after the length")
            if len(buf) < end + 4 + n:
                break
            out.append((host, port, bytes(buf[end + 4:end + 4 + n])))
            pos = end + 4 + n
        if pos:
            del buf[:pos]
        return out
