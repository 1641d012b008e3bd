"""HTTP/2 stream transports: `grpc` (gun: `POST /<service>/Tun`, each
chunk a gun message, appliance/outbound/transport/gun.py) and `h2`
(v2ray's http transport: `PUT <path>` with a raw byte body both ways),
one HTTP/2 connection and one stream per flow, as v2ray and mihomo do.

The `h2` package is the sans-I/O core (frames, HPACK, flow control);
`H2Stream` is the adapter. It has no task of its own, so reading the
connection is shared: `receive_some` reads when it needs data, and a
`send_all` blocked on the peer's flow-control window reads too when no
receive is under way (otherwise it waits for the reader's progress), so a
WINDOW_UPDATE is never left unread. Writes to the connection go out under
one lock, in the order h2 produced them.

Large windows (16 MiB for the stream and the connection) so that a bulk
download is not paced by WINDOW_UPDATE round trips; received data is
acknowledged as it is consumed, and h2 sends the updates.

How it fails: a response status other than 200, a gRPC status other than
0 in the trailers, a reset stream, a GOAWAY, or bytes that are not gun
messages raise trio.BrokenResourceError with the reason. Owns the stream
it wraps.
"""

from __future__ import annotations

import random

import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes

from appliance.config.protocols.common import GrpcOptions, H2Options
from appliance.outbound.transport import gun

READ_SIZE = 1 << 16
WINDOW = 1 << 24
# What grpc-go says; some servers check for a gRPC client.
GRPC_USER_AGENT = "grpc-go/1.56.0"


def grpc_path(service_name: str) -> str:
    """`/<service>/Tun` (gun's method name); mihomo's default service is
    "GunService"."""
    return f"/{service_name or 'GunService'}/Tun"


class H2Stream(trio.abc.Stream):
    """One HTTP/2 request's bodies as a byte stream (see the module doc);
    with `grpc`, each direction is gun framed."""

    def __init__(self, stream: trio.abc.Stream, conn: H2Connection, stream_id: int, *,
                 grpc: bool) -> None:
        self.transport_stream = stream
        self._conn = conn
        self._id = stream_id
        self._grpc = grpc
        self._decoder = gun.GunDecoder() if grpc else None
        self._received: list[bytes] = []
        self._eof = False
        self._error: str | None = None
        self._reading = False
        self._progress = trio.Event()
        self._send_lock = trio.Lock()

    # --- the connection ------------------------------------------------------

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._conn.data_to_send()
            if data:
                await self.transport_stream.send_all(data)

    async def _pump(self) -> None:
        """One read of the connection, its events applied; wakes whoever
        waits for progress. Only one task at a time (`_reading`)."""
        self._reading = True
        try:
            data = await self.transport_stream.receive_some(READ_SIZE)
        finally:
            self._reading = False
            progress, self._progress = self._progress, trio.Event()
            progress.set()
        if not data:
            self._eof = True
            return
        try:
            events = self._conn.receive_data(bytes(data))
        except H2Error as e:
            self._fail(f"HTTP/2: {e}")
            return
        for event in events:
            self._apply(event)
        await self._flush()

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._eof = True

    def _apply(self, event: Event) -> None:
        if isinstance(event, DataReceived) and event.stream_id == self._id:
            self._conn.acknowledge_received_data(event.flow_controlled_length, self._id)
            if not event.data:
                return
            if self._decoder is not None:
                try:
                    self._received.extend(self._decoder.feed(event.data))
                except gun.GunError as e:
                    self._fail(f"grpc: {e}")
            else:
                self._received.append(bytes(event.data))
        elif isinstance(event, ResponseReceived) and event.stream_id == self._id:
            headers = dict(event.headers or [])
            status = headers.get(b":status", b"")
            if status != b"200":
                self._fail(f"HTTP/2: the server answered {status.decode(errors='replace')}")
            elif self._grpc and headers.get(b"grpc-status", b"0") != b"0":
                self._fail(_grpc_error(headers))
        elif isinstance(event, TrailersReceived) and event.stream_id == self._id:
            headers = dict(event.headers or [])
            if headers.get(b"grpc-status", b"0") != b"0":
                self._fail(_grpc_error(headers))
            self._eof = True
        elif isinstance(event, StreamEnded) and event.stream_id == self._id:
            self._eof = True
        elif isinstance(event, StreamReset) and event.stream_id == self._id:
            if event.error_code == 0:
                # NO_ERROR: a Go server whose handler returned before the
                # request body ended (the far end closed): an end, not a fault.
                self._eof = True
            else:
                self._fail(f"HTTP/2: the server reset the stream (error {event.error_code})")
        elif isinstance(event, ConnectionTerminated):
            self._fail(f"HTTP/2: the server closed the connection (GOAWAY, error "
                       f"{event.error_code})")
        elif isinstance(event, WindowUpdated):
            pass  # senders wake on progress and look at the window again

    async def _wait_progress(self) -> None:
        if self._reading:
            await self._progress.wait()
        else:
            await self._pump()

    # --- trio.abc.Stream ----------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._received:
            if self._eof:
                if self._error is not None:
                    raise trio.BrokenResourceError(self._error)
                return b""
            await self._wait_progress()
        chunk = self._received[0]
        if max_bytes is None or len(chunk) <= max_bytes:
            self._received.pop(0)
            return chunk
        self._received[0] = chunk[max_bytes:]
        return chunk[:max_bytes]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise trio.BrokenResourceError(self._error)
        payload = memoryview(gun.encode(data) if self._grpc else data)
        conn, sid = self._conn, self._id
        try:
            while payload:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    await self._flush()
                    await self._wait_progress()
                    if self._error is not None:
                        raise trio.BrokenResourceError(self._error)
                    if self._eof and conn.local_flow_control_window(sid) <= 0:
                        raise trio.BrokenResourceError("HTTP/2: the connection ended")
                    continue
                conn.send_data(sid, bytes(payload[:window]))
                payload = payload[window:]
        except H2Error as e:
            raise trio.BrokenResourceError(f"HTTP/2: {e}") from None
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


def _grpc_error(headers: dict[bytes, bytes]) -> str:
    status = headers.get(b"grpc-status", b"").decode(errors="replace")
    message = headers.get(b"grpc-message", b"").decode(errors="replace")
    return f"grpc: the server answered status {status}" + (f" ({message})" if message else "")


async def _open(stream: trio.abc.Stream, headers: list[tuple[str, str]], *,
                grpc: bool) -> H2Stream:
    conn = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                          SettingCodes.ENABLE_PUSH: 0})
    conn.increment_flow_control_window(WINDOW - 65535)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers)
    out = H2Stream(stream, conn, sid, grpc=grpc)
    await out._flush()
    return out


async def open_grpc(stream: trio.abc.Stream, opts: GrpcOptions, host: str, *,
                    tls: bool) -> H2Stream:
    """The gun call on `stream` (requests are sent; the response is read
    with the first receive)."""
    return await _open(stream, [
        (":method", "POST"), (":scheme", "https" if tls else "http"),
        (":path", grpc_path(opts.service_name)), (":authority", host),
        ("content-type", "application/grpc"), ("te", "trailers"),
        ("user-agent", GRPC_USER_AGENT),
    ], grpc=True)  # fmt: skip


async def open_h2(stream: trio.abc.Stream, opts: H2Options, host: str, *,
                  tls: bool) -> H2Stream:
    """v2ray's http transport: `PUT <path>` to one of `hosts` (chosen at
    random per connection, as v2ray does), raw bytes both ways."""
    authority = random.choice(opts.hosts) if opts.hosts else host
    return await _open(stream, [
        (":method", "PUT"), (":scheme", "https" if tls else "http"),
        (":path", opts.path or "/"), (":authority", authority),
    ], grpc=False)  # fmt: skip
