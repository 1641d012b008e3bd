"""The AnyTLS protocol, client side, without I/O (anytls-go's protocol
document; mihomo transport/anytls, sing-anytls).

A session is one TLS connection. The client opens it with

    SHA256(password)  padding0 length (u16 BE)  padding0 (zeros)

then speaks frames, `cmd (u8)  stream id (u32 BE)  length (u16 BE)  data`:
SETTINGS (4) first ("v=2", "client=...", "padding-md5=..."), then per
stream SYN (1), PSH (2) whose first data is the destination as a SOCKS
address, PSH with the stream's bytes, FIN (3) to end it. The server may
answer SERVER_SETTINGS (10; protocol v2: the proof it took the password),
SYNACK (7; empty: the destination is connected, else the error text),
UPDATE_PADDING_SCHEME (6), ALERT (5; the session ends), HEART_REQUEST (8;
answered with HEART_RESPONSE, 9), WASTE (0; padding). There is no
half-close: FIN ends the stream both ways.

Padding: the scheme ("stop=N", then per write number "a-b,c,a-b,...")
shapes the client's first N-1 writes after the auth: write k is cut into
records of the listed sizes, a record that the data does not fill is
filled with a WASTE frame, and "c" stops when the data has run out.
`ClientSession` returns each write as a list of byte strings: each is to
be one TLS write (one record), which is what the sizes are about.

A wrong password shows only as a server that closes the connection (or
serves something else) without a frame: `ClientSession.answered` tells
whether the server has said anything yet.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

CMD_WASTE = 0
CMD_SYN = 1
CMD_PSH = 2
CMD_FIN = 3
CMD_SETTINGS = 4
CMD_ALERT = 5
CMD_UPDATE_PADDING_SCHEME = 6
CMD_SYNACK = 7
CMD_HEART_REQUEST = 8
CMD_HEART_RESPONSE = 9
CMD_SERVER_SETTINGS = 10

HEADER = struct.Struct(">BIH")
HEADER_SIZE = HEADER.size
MAX_FRAME_DATA = 0xFFFF
PROTOCOL_VERSION = 2
CHECK = -1  # "c" in a padding scheme

# mihomo's default scheme (transport/anytls/padding).
DEFAULT_PADDING_SCHEME = b"""stop=8
0=34-120
1=100-400
2=400-500,c,500-1000,c,400-500,c,500-1000,c,500-1000,c,400-500
3=500-1000
4=500-1000
5=500-1000
6=500-1000
7=500-1000"""

# UDP rides on a stream to this name (sing's UDP-over-TCP v2).
UOT_MAGIC_ADDRESS = "sp.v2.udp-over-tcp.arpa"


class AnytlsError(ValueError):
    """Bytes from the server that are not AnyTLS, or a scheme that does not
    parse."""


class PaddingScheme:
    """A parsed padding scheme (see the module doc); `md5` is the hex MD5
    of its text, which the client announces and the server compares."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.md5 = hashlib.md5(raw).hexdigest()  # the protocol's checksum, not security
        lines: dict[str, str] = {}
        for line in raw.decode("utf-8", "replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                lines[key.strip()] = value.strip()
        try:
            self.stop = int(lines.pop("stop"))
        except (KeyError, ValueError):
            raise AnytlsError("padding scheme without a valid stop=") from None
        self.sizes: dict[int, list[tuple[int, int]]] = {}
        for key, value in lines.items():
            if not key.isdigit():
                continue
            ranges: list[tuple[int, int]] = []
            for item in value.split(","):
                item = item.strip()
                if item == "c":
                    ranges.append((CHECK, CHECK))
                    continue
                lo, sep, hi = item.partition("-")
                try:
                    a, b = int(lo), int(hi if sep else lo)
                except ValueError:
                    continue
                a, b = min(a, b), max(a, b)
                if a > 0:
                    ranges.append((a, b))
            self.sizes[int(key)] = ranges

    def record_sizes(self, write: int) -> list[int]:
        """The record sizes for write number `write` (CHECK for "c")."""
        out = []
        for a, b in self.sizes.get(write, ()):
            out.append(CHECK if a == CHECK else a + _below(b - a + 1))
        return out


def _below(n: int) -> int:
    """A random integer in [0, n)."""
    return int.from_bytes(os.urandom(4), "big") % n if n > 1 else 0


def frame(cmd: int, stream_id: int, data: bytes = b"") -> bytes:
    return HEADER.pack(cmd, stream_id, len(data)) + data


def auth_head(password: str, scheme: PaddingScheme) -> bytes:
    """What opens a session: the password's hash and padding0."""
    sizes = scheme.record_sizes(0)
    pad = sizes[0] if sizes and sizes[0] > 0 else 0
    return hashlib.sha256(password.encode()).digest() + struct.pack(">H", pad) + bytes(pad)


def settings_text(values: dict[str, str]) -> bytes:
    return "\n".join(f"{k}={v}" for k, v in values.items()).encode()


def parse_settings(data: bytes) -> dict[str, str]:
    out = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


@dataclass(frozen=True)
class Data:
    stream_id: int
    data: bytes


@dataclass(frozen=True)
class Fin:
    stream_id: int


@dataclass(frozen=True)
class SynAck:
    """The server's word on a stream's destination: `error` None = opened."""

    stream_id: int
    error: str | None


@dataclass(frozen=True)
class Alert:
    text: str


Event = Data | Fin | SynAck | Alert


class ClientSession:
    """One AnyTLS session's protocol state (see the module doc).

    `start()` gives the first write (auth); the settings frame waits to go
    out with the first stream's SYN, as the reference clients send it.
    Each method that sends returns a list of byte strings, each to be sent
    as one TLS write, in order. `receive(data)` takes the server's bytes
    and returns events (AnytlsError for bytes that are not AnyTLS)."""

    def __init__(self, password: str, scheme: PaddingScheme, *,
                 client: str = "mirage") -> None:
        self.password = password
        self.scheme = scheme
        self.client = client
        self.answered = False
        self.server_version = 0
        self._next_id = 0
        self._writes = 0
        self._padding = True
        self._buffer = b""
        self._in = b""
        self._replies: list[bytes] = []

    def start(self) -> list[bytes]:
        self._buffer = frame(CMD_SETTINGS, 0, settings_text({
            "v": str(PROTOCOL_VERSION), "client": self.client, "padding-md5": self.scheme.md5}))
        return [auth_head(self.password, self.scheme)]

    def open_stream(self, address: bytes) -> tuple[int, list[bytes]]:
        """A new stream to `address` (a SOCKS address: ATYP, host, port)."""
        self._next_id += 1
        sid = self._next_id
        return sid, self._write(frame(CMD_SYN, sid) + self._psh(sid, address))

    def send(self, stream_id: int, data: bytes) -> list[bytes]:
        return self._write(self._psh(stream_id, data))

    def fin(self, stream_id: int) -> list[bytes]:
        return self._write(frame(CMD_FIN, stream_id))

    def replies(self) -> list[bytes]:
        """Frames the session owes the server (heartbeat answers)."""
        out, self._replies = self._replies, []
        return [w for r in out for w in self._write(r)]

    @staticmethod
    def _psh(stream_id: int, data: bytes) -> bytes:
        if len(data) <= MAX_FRAME_DATA:
            return frame(CMD_PSH, stream_id, data)
        return b"".join(frame(CMD_PSH, stream_id, data[i:i + MAX_FRAME_DATA])
                        for i in range(0, len(data), MAX_FRAME_DATA))

    def _write(self, data: bytes) -> list[bytes]:
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        if not self._padding:
            return [data]
        self._writes += 1
        if self._writes >= self.scheme.stop:
            self._padding = False
            return [data]
        out: list[bytes] = []
        for size in self.scheme.record_sizes(self._writes):
            if size == CHECK:
                if not data:
                    break
                continue
            if len(data) > size:
                out.append(data[:size])
                data = data[size:]
            elif data:
                waste = size - len(data) - HEADER_SIZE
                out.append(data + (frame(CMD_WASTE, 0, bytes(waste)) if waste > 0 else b""))
                data = b""
            else:
                out.append(frame(CMD_WASTE, 0, bytes(min(size, MAX_FRAME_DATA))))
        if data:
            out.append(data)
        return out

    def receive(self, data: bytes) -> list[Event]:
        # One pass over (leftover + data) by offset: each frame's body is one
        # slice, and only an incomplete tail is kept for the next call.
        buf = self._in + data if self._in else data
        end = len(buf)
        off = 0
        events: list[Event] = []
        while end - off >= HEADER_SIZE:
            cmd, sid, length = HEADER.unpack_from(buf, off)
            start = off + HEADER_SIZE
            if end - start < length:
                break
            off = start + length
            self.answered = True
            if cmd == CMD_PSH:
                if length:
                    events.append(Data(sid, buf[start:off]))
            elif cmd == CMD_WASTE:
                pass
            else:
                self._control(cmd, sid, buf[start:off], events)
        self._in = buf[off:]
        return events

    def _control(self, cmd: int, sid: int, body: bytes, events: list[Event]) -> None:
        if cmd == CMD_FIN:
            events.append(Fin(sid))
        elif cmd == CMD_SYNACK:
            events.append(SynAck(sid, body.decode("utf-8", "replace") if body else None))
        elif cmd == CMD_SERVER_SETTINGS:
            version = parse_settings(body).get("v", "")
            self.server_version = int(version) if version.isdigit() else 0
        elif cmd == CMD_UPDATE_PADDING_SCHEME:
            try:
                self.scheme = PaddingScheme(body)
            except AnytlsError:
                pass  # keep the scheme we have, as the reference clients do
        elif cmd == CMD_ALERT:
            events.append(Alert(body.decode("utf-8", "replace")))
        elif cmd == CMD_HEART_REQUEST:
            self._replies.append(frame(CMD_HEART_RESPONSE, sid))
        elif cmd in (CMD_HEART_RESPONSE, CMD_SETTINGS, CMD_SYN):
            pass
        else:
            raise AnytlsError(f"unknown AnyTLS command {cmd} from the server")


def uot_request(address: bytes) -> bytes:
    """UDP-over-TCP v2 request in connect mode: every datagram of the
    stream goes to `address` (a SOCKS address; a name stays a name)."""
    return b"\x01" + address


def uot_packet(payload: bytes) -> bytes:
    if len(payload) > 0xFFFF:
        raise AnytlsError(f"UDP payload of {len(payload)} bytes does not fit")
    return struct.pack(">H", len(payload)) + payload


class UotDecoder:
    """Connect-mode UDP-over-TCP datagrams from stream bytes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= 2:
            n = int.from_bytes(self._buf[:2], "big")
            if len(self._buf) < 2 + n:
                break
            out.append(bytes(self._buf[2:2 + n]))
            del self._buf[:2 + n]
        return out

