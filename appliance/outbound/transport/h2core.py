"""A lean HTTP/2 client without I/O, for the streams of transport/h2.py:
bytes in, events out; bytes to send queued in `data_to_send`.

Why not the `h2` package: a gun flow is one request on a shared
connection, and h2's general machinery per stream (HPACK encoding of the
same request headers, a state machine, event objects, window managers)
cost ~500 us of Python per flow, more than everything else the flow costs.
What a client of these transports needs is small (RFC 9113):

- a request is one HEADERS frame whose block is built once per outbound
  (`header_block`: literals without indexing, so the block never depends
  on the encoder's state and only the stream id changes per request);
- response headers and trailers are decoded by `hpack.Decoder` (one per
  connection, every block in order, as the dynamic table needs), except
  a repeat of an all-indexed block (see `_indexed_blocks`);
- flow control: large windows announced at the start, received DATA
  acknowledged as the reader consumes it (`acknowledge`, WINDOW_UPDATEs
  once a quarter of a window is owed), the peer's windows tracked for
  sending (`send_window`);
- SETTINGS (acknowledged; INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE and
  MAX_CONCURRENT_STREAMS taken), PING (answered), RST_STREAM, GOAWAY.

Events are tuples, the first item says which (`DATA`, `HEADERS`, `RESET`,
`GOAWAY`): `(DATA, stream_id, payload, flow_controlled_length,
end_stream)`, `(HEADERS, stream_id, [(name, value), ...], end_stream)`,
`(RESET, stream_id, error_code)`, `(GOAWAY, last_stream_id, error_code)`.
A frame that breaks the protocol raises H2ProtocolError (the connection
is then unusable). Server push is refused in our SETTINGS; PRIORITY and
unknown frame types are ignored, as the RFC asks.
"""

from __future__ import annotations

from typing import Any

from hpack import Decoder
from hpack.exceptions import HPACKError
from hpack.hpack import encode_integer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = (1 << 31) - 1

# Frame types and flags (RFC 9113 section 6).
FRAME_DATA, FRAME_HEADERS, FRAME_PRIORITY, FRAME_RST_STREAM = 0, 1, 2, 3
FRAME_SETTINGS, FRAME_PUSH_PROMISE, FRAME_PING, FRAME_GOAWAY = 4, 5, 6, 7
FRAME_WINDOW_UPDATE, FRAME_CONTINUATION = 8, 9
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS, FLAG_PADDED, FLAG_PRIORITY = 1, 1, 4, 8, 0x20

SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 2, 3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 4, 5

# Error codes we send.
NO_ERROR, PROTOCOL_ERROR, CANCEL = 0, 1, 8

DATA, HEADERS, RESET, GOAWAY = "data", "headers", "reset", "goaway"

Event = tuple[Any, ...]


class H2ProtocolError(ValueError):
    """Bytes from the server that break HTTP/2; the connection is done."""


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + stream_id.to_bytes(4, "big") + payload)


def _hpack_string(s: bytes) -> bytes:
    # Not Huffman coded: length with a 7-bit prefix, high bit clear.
    return bytes(encode_integer(len(s), 7)) + s


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """An HPACK block for `headers`, each a literal without indexing with
    a literal name (RFC 7541 6.2.2): it leaves the server's dynamic table
    alone, so the same block serves every request of the connection."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _hpack_string(name.lower().encode()) + _hpack_string(value.encode())
    return bytes(out)


class H2Client:
    """The client end of one HTTP/2 connection (see the module doc).
    `window` and `max_frame` are what we announce: the receive window of
    each stream and of the connection, and the largest frame we take."""

    def __init__(self, *, window: int = DEFAULT_WINDOW,
                 max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.window = window
        self.max_frame = max_frame
        self.next_stream_id = 1
        # The server's settings as they stand.
        self.max_outbound_frame = DEFAULT_MAX_FRAME
        self.max_concurrent_streams = 1 << 31
        self._initial_send_window = DEFAULT_WINDOW
        self._conn_send_window = DEFAULT_WINDOW
        # Streams we opened and have not reset, nor seen reset: their send
        # windows, and the received bytes not yet acknowledged.
        self._send_windows: dict[int, int] = {}
        self._owed: dict[int, int] = {}
        self._conn_owed = 0
        self._ack_after = max(window // 4, 1)
        self._decoder = Decoder()
        self._decoder.max_header_list_size = 1 << 16
        # Blocks made only of indexed fields (each byte's high bit set),
        # decoded: a server with a dynamic table (Go's) answers every
        # request after the first with the same few bytes, and such a block
        # reads the table without changing it, so its headers stay what
        # they were until a block that is not all indexed comes.
        self._indexed_blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._buf = bytearray()
        # A header block spread over CONTINUATION frames: stream, flags, parts.
        self._continued: tuple[int, int, list[bytes]] | None = None
        settings = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in (
            (SETTINGS_ENABLE_PUSH, 0), (SETTINGS_INITIAL_WINDOW_SIZE, window),
            (SETTINGS_MAX_FRAME_SIZE, max_frame)))
        out = [PREFACE, frame(FRAME_SETTINGS, 0, 0, settings)]
        if window > DEFAULT_WINDOW:
            out.append(frame(FRAME_WINDOW_UPDATE, 0, 0,
                             (window - DEFAULT_WINDOW).to_bytes(4, "big")))
        self._out = bytearray(b"".join(out))

    # --- sending --------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def pending(self) -> bool:
        """Whether there are bytes to send."""
        return bool(self._out)

    @property
    def pending_bytes(self) -> int:
        """How many bytes wait to be sent."""
        return len(self._out)

    @property
    def open_streams(self) -> int:
        return len(self._send_windows)

    def open_stream(self, block: bytes) -> int:
        """A new request with the header block `block` (`header_block`);
        its stream id."""
        sid = self.next_stream_id
        if sid > MAX_WINDOW:
            raise H2ProtocolError("stream ids exhausted")
        if len(block) > self.max_outbound_frame:
            raise H2ProtocolError("request headers larger than a frame")
        self.next_stream_id = sid + 2
        self._send_windows[sid] = self._initial_send_window
        self._owed[sid] = 0
        self._out += frame(FRAME_HEADERS, FLAG_END_HEADERS, sid, block)
        return sid

    def send_window(self, sid: int) -> int:
        """How many bytes of DATA `sid` may send now (0: wait for a
        WINDOW_UPDATE; also 0 for a stream that is gone)."""
        return min(self._send_windows.get(sid, 0), self._conn_send_window)

    def send_data(self, sid: int, data: bytes | memoryview) -> None:
        """DATA on `sid`, at most `send_window(sid)` bytes (split into
        frames as large as the server takes)."""
        n = len(data)
        window = self._send_windows.get(sid)
        if window is None:
            raise H2ProtocolError(f"stream {sid} is closed")
        if n > window or n > self._conn_send_window:
            raise H2ProtocolError("DATA beyond the flow-control window")
        self._send_windows[sid] = window - n
        self._conn_send_window -= n
        size = self.max_outbound_frame
        out = self._out
        head = bytes((FRAME_DATA, 0)) + sid.to_bytes(4, "big")
        for pos in range(0, n, size):
            chunk = data[pos:pos + size]
            out += len(chunk).to_bytes(3, "big")
            out += head
            out += chunk

    def reset_stream(self, sid: int, error_code: int = CANCEL) -> None:
        """RST_STREAM for `sid`, unless the server reset it already; the
        stream is forgotten either way."""
        self._owed.pop(sid, None)
        if self._send_windows.pop(sid, None) is not None:
            self._out += frame(FRAME_RST_STREAM, 0, sid, error_code.to_bytes(4, "big"))

    def acknowledge(self, sid: int, n: int) -> None:
        """`n` received bytes of `sid` were consumed: the windows open
        again (WINDOW_UPDATEs once a quarter window is owed). A stream
        that is gone only gives the connection its window back."""
        self._conn_owed += n
        owed = self._owed.get(sid)
        if owed is not None:
            owed += n
            if owed >= self._ack_after:
                self._out += frame(FRAME_WINDOW_UPDATE, 0, sid, owed.to_bytes(4, "big"))
                owed = 0
            self._owed[sid] = owed
        if self._conn_owed >= self._ack_after:
            self._out += frame(FRAME_WINDOW_UPDATE, 0, 0, self._conn_owed.to_bytes(4, "big"))
            self._conn_owed = 0

    # --- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """The events of the frames `data` completes (see the module doc)."""
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos, end = 0, len(buf)
        try:
            while end - pos >= 9:
                length = int.from_bytes(buf[pos:pos + 3], "big")
                if length > self.max_frame:
                    raise H2ProtocolError(f"a frame of {length} bytes (we take {self.max_frame})")
                stop = pos + 9 + length
                if stop > end:
                    break
                kind, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9:stop])
                pos = stop
                if self._continued is not None and kind != FRAME_CONTINUATION:
                    raise H2ProtocolError("a header block was interrupted")
                if kind == FRAME_DATA:
                    if sid == 0:
                        raise H2ProtocolError("DATA on stream 0")
                    if flags & FLAG_PADDED:
                        payload = _unpad(payload)
                    events.append((DATA, sid, payload, length, bool(flags & FLAG_END_STREAM)))
                elif kind in (FRAME_HEADERS, FRAME_CONTINUATION):
                    self._header_frame(kind, flags, sid, payload, events)
                else:
                    self._control_frame(kind, flags, sid, payload, events)
        finally:
            if pos:
                del buf[:pos]
        return events

    def _header_frame(self, kind: int, flags: int, sid: int, payload: bytes,
                      events: list[Event]) -> None:
        if kind == FRAME_HEADERS:
            if sid == 0:
                raise H2ProtocolError("HEADERS on stream 0")
            if flags & FLAG_PADDED:
                payload = _unpad(payload)
            if flags & FLAG_PRIORITY:
                payload = payload[5:]
            self._continued = (sid, flags, [payload])
        else:
            if self._continued is None or self._continued[0] != sid:
                raise H2ProtocolError("CONTINUATION without its HEADERS")
            self._continued[2].append(payload)
        if not flags & FLAG_END_HEADERS:
            return
        sid, first_flags, parts = self._continued
        self._continued = None
        block = b"".join(parts)
        headers = self._indexed_blocks.get(block)
        if headers is None:
            try:
                headers = [(bytes(k), bytes(v))
                           for k, v in self._decoder.decode(block, raw=True)]
            except HPACKError as e:
                raise H2ProtocolError(f"bad header block: {e}") from None
            if all(b & 0x80 for b in block):
                self._indexed_blocks[block] = headers
            else:
                # It may have changed the dynamic table.
                self._indexed_blocks.clear()
        events.append((HEADERS, sid, headers, bool(first_flags & FLAG_END_STREAM)))

    def _control_frame(self, kind: int, flags: int, sid: int, payload: bytes,
                       events: list[Event]) -> None:
        if kind == FRAME_WINDOW_UPDATE:
            if len(payload) != 4:
                raise H2ProtocolError("WINDOW_UPDATE of the wrong size")
            n = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if sid == 0:
                self._conn_send_window += n
                if self._conn_send_window > MAX_WINDOW:
                    raise H2ProtocolError("connection window overflow")
            elif sid in self._send_windows:
                self._send_windows[sid] += n
        elif kind == FRAME_SETTINGS:
            if sid != 0 or len(payload) % 6:
                raise H2ProtocolError("malformed SETTINGS")
            if flags & FLAG_ACK:
                return
            for i in range(0, len(payload), 6):
                key = int.from_bytes(payload[i:i + 2], "big")
                value = int.from_bytes(payload[i + 2:i + 6], "big")
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    if value > MAX_WINDOW:
                        raise H2ProtocolError("SETTINGS_INITIAL_WINDOW_SIZE too large")
                    delta = value - self._initial_send_window
                    self._initial_send_window = value
                    for s in self._send_windows:
                        self._send_windows[s] += delta
                elif key == SETTINGS_MAX_FRAME_SIZE:
                    if not DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                        raise H2ProtocolError("bad SETTINGS_MAX_FRAME_SIZE")
                    self.max_outbound_frame = value
                elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                    self.max_concurrent_streams = value
            self._out += frame(FRAME_SETTINGS, FLAG_ACK, 0)
        elif kind == FRAME_PING:
            if len(payload) != 8:
                raise H2ProtocolError("PING of the wrong size")
            if not flags & FLAG_ACK:
                self._out += frame(FRAME_PING, FLAG_ACK, 0, payload)
        elif kind == FRAME_RST_STREAM:
            if len(payload) != 4 or sid == 0:
                raise H2ProtocolError("malformed RST_STREAM")
            self._send_windows.pop(sid, None)
            self._owed.pop(sid, None)
            events.append((RESET, sid, int.from_bytes(payload, "big")))
        elif kind == FRAME_GOAWAY:
            if len(payload) < 8:
                raise H2ProtocolError("GOAWAY too short")
            events.append((GOAWAY, int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                           int.from_bytes(payload[4:8], "big")))
        elif kind == FRAME_PUSH_PROMISE:
            raise H2ProtocolError("PUSH_PROMISE, push is disabled")
        # PRIORITY and unknown types: ignored (RFC 9113 5.5).


def _unpad(payload: bytes) -> bytes:
    if not payload:
        raise H2ProtocolError("padded frame without its pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2ProtocolError("padding longer than the frame")
    return payload[1:len(payload) - pad]
