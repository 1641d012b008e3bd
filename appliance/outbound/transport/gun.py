"""gun, v2ray's gRPC transport, without I/O: the framing of each message.

A gun stream is one gRPC call `POST /<service>/Tun` whose messages are the
protobuf `Hunk { bytes data = 1; }`, each in the gRPC length-prefixed
envelope (grpc/PROTOCOL-HTTP2.md, "Length-Prefixed-Message"):

    0x00 (not compressed)  Length (4, big endian)  0x0A  varint(len(data))  data

`encode` makes one message; `GunDecoder.feed` takes the call's DATA bytes
as they come and returns the payloads of the messages they complete.
Raises GunError for a compressed message or a Hunk that is not field 1
bytes (the call is then unusable).
"""

from __future__ import annotations

# protobuf key of field 1, wire type 2 (length-delimited): (1 << 3) | 2.
FIELD_DATA = 0x0A
# A message larger than this is not a gun server talking.
MAX_MESSAGE = 1 << 24


class GunError(ValueError):
    """Bytes from the server that are not gun messages."""


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode(data: bytes | bytearray | memoryview) -> bytes:
    """One gun message carrying `data`."""
    varint = encode_varint(len(data))
    size = 1 + len(varint) + len(data)
    return b"".join((b"\x00", size.to_bytes(4, "big"), b"\x0a", varint, data))


def _read_varint(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 35:
            break
    raise GunError("bad varint in a gun message")


class GunDecoder:
    """Payloads out of a gun call's DATA bytes (see the module doc)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            if buf[pos] != 0:
                raise GunError("compressed gRPC message (gun never compresses)")
            size = int.from_bytes(buf[pos + 1:pos + 5], "big")
            if size > MAX_MESSAGE:
                raise GunError(f"gun message of {size} bytes")
            end = pos + 5 + size
            if end > n:
                break
            p = pos + 5
            # A Hunk may be empty (size 0) or carry field 1 once.
            while p < end:
                if buf[p] != FIELD_DATA:
                    raise GunError(f"unexpected protobuf key {buf[p]:#x} in a gun message")
                length, p = _read_varint(buf, p + 1, end)
                if p + length > end:
                    raise GunError("gun message shorter than its data")
                out.append(bytes(buf[p:p + length]))
                p += length
            pos = end
        if pos:
            del buf[:pos]
        return out
