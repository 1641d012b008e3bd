"""HTTP/2 stream transports: `grpc` (gun: `POST /<service>/Tun`, each
chunk a gun message, appliance/outbound/transport/gun.py) and `h2`
(v2ray's http transport: `PUT <path>` with a raw byte body both ways).

grpc flows of one outbound are streams of one shared HTTP/2 connection
(`GunPool`), as mihomo's gun transport shares its HTTP/2 transport: a new
flow costs a HEADERS frame, not a TCP and TLS handshake (bench/protocols.py:
per-connection CPU about halved). h2 flows get a connection each, as v2ray
and mihomo do.

`h2core.H2Client` is the sans-I/O core (frames, HPACK, flow control),
lean where the `h2` package is general: a request is a header block built
once per outbound and a frame becomes a tuple event, which took a flow's
HTTP/2 cost from ~500 us of CPU to a small part of it. `H2Conn` and
`H2Stream` are the adapter. There is no task of its own, so
reading the connection is shared: a stream's `receive_some` reads when it
needs data, and a `send_all` blocked on the peer's flow-control window
reads too when no read is under way (otherwise it waits for the reader's
progress), so a WINDOW_UPDATE is never left unread; each event goes to the
stream it names. Bytes go out in the order the core produced them. A
connection of its own is written by the flow, under a lock. A shared
connection has one writer task while it has bytes to send or streams
open: a flow queues its frames in the core, wakes the writer and goes on,
so the flows that run in one scheduler pass (requests, RST_STREAMs, window
updates) share one TLS write, and a flow that ends mid-write cannot leave
half a record; a flow waits only while more than `SHARED_BACKLOG` bytes
are queued. bench/protocols.py, grpc rows, wrk's 32 flows at a time:
write(2)s per flow ~2.3 -> ~1.2 (the one left is the reply to the
client), Mirage's CPU per connection ~380 -> ~235 us.

Large windows (16 MiB for the stream and the connection) so that a bulk
download is not paced by WINDOW_UPDATE round trips; received data is
acknowledged as it is consumed (WINDOW_UPDATEs once a quarter window
is owed).

How it fails: a response status other than 200, a gRPC status other than
0 in the trailers, a reset stream, a GOAWAY, or bytes that are not gun
messages raise trio.BrokenResourceError with the reason; a connection
that breaks ends every stream on it. Owns the stream it wraps.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

from appliance.config.protocols.common import GrpcOptions, H2Options
from appliance.outbound.transport import gun
from appliance.outbound.transport.chunks import Chunks
from appliance.outbound.transport.h2core import (
    CANCEL,
    DATA,
    GOAWAY,
    HEADERS,
    RESET,
    Event,
    H2Client,
    H2ProtocolError,
    header_block,
)

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
WINDOW = 1 << 24
# The largest frame we take (SETTINGS_MAX_FRAME_SIZE; the default is
# 16 KiB): a Go server (sing-box, v2ray, Xray) then sends the download in
# frames four times as large, a quarter of the Python steps per MB.
MAX_FRAME = 1 << 16
# Client stream ids are odd and below 2**31; a connection near the end is
# replaced rather than run out mid-open.
MAX_STREAM_ID = (1 << 31) - 1025
# A shared connection with no stream for this long is not reused (nothing
# reads it while idle, so a close by the server would go unseen).
REUSE_IDLE = 30.0
# How long one write to a shared connection may take before the connection
# is given up (its writer is no flow's: a flow's cancellation cannot cut it).
SHARED_SEND_TIMEOUT = 10.0
# Queued bytes of a shared connection above which a flow's send waits for
# the writer (a bulk upload is paced by the socket, not buffered whole).
SHARED_BACKLOG = 1 << 18
# What grpc-go says; some servers check for a gRPC client.
GRPC_USER_AGENT = "grpc-go/1.56.0"


def grpc_path(service_name: str) -> str:
    """`/<service>/Tun` (gun's method name); mihomo's default service is
    "GunService"."""
    return f"/{service_name or 'GunService'}/Tun"


class H2Conn:
    """One HTTP/2 connection to the proxy server and the streams on it.

    No task of its own: whichever stream needs bytes reads the connection
    (`wait_progress`: one reader at a time; the others park until a read
    brings their stream something or it is their turn to read) and hands
    each event to its stream. `shared` (a `GunPool`'s connection) changes
    two things: bytes for the connection go out through its writer task
    (`_write_queued`), never a flow's (half a TLS record written by a flow
    that ends would break every other flow on it), and closing a stream
    resets that stream instead of closing the connection.
    """

    def __init__(self, transport_stream: trio.abc.Stream, *, shared: bool = False) -> None:
        self.transport_stream = transport_stream
        self.shared = shared
        self.conn = H2Client(window=WINDOW, max_frame=MAX_FRAME)
        self.streams: dict[int, H2Stream] = {}
        # Why the connection is unusable (None: it is usable).
        self.error: str | None = None
        self.closed = False
        self.idle_since = trio.current_time()
        self._reading = False
        # Tasks waiting while another reads: (stream, wake-up, whether it
        # waits to send). A read wakes only the streams it brought
        # something, the senders, and one more to take over the reading
        # (not every waiting flow: with 32 flows on the connection that was
        # 31 wake-ups that found nothing, per read).
        self._parked: list[tuple[H2Stream, trio.Event, bool]] = []
        self._send_lock = trio.Lock()
        # A shared connection's writer: whether its task runs, what wakes
        # it, how many bytes it is writing, and the flows waiting for the
        # backlog to fall.
        self._writing = False
        self._kicked = trio.Event()
        self._in_flight = 0
        self._backlogged: list[trio.Event] = []

    def open_stream(self, block: bytes, *, grpc: bool) -> H2Stream:
        """A new request with the header block `block` (queued; `flush`
        sends it)."""
        sid = self.conn.open_stream(block)
        stream = H2Stream(self, sid, grpc=grpc)
        self.streams[sid] = stream
        return stream

    @property
    def reusable(self) -> bool:
        """Whether a new stream may go on it: healthy, ids left, under the
        server's stream limit, and not idle for long (an idle connection
        has no reader, so a server that closed it meanwhile is not seen)."""
        c = self.conn
        if self.error is not None or self.closed:
            return False
        if c.next_stream_id >= MAX_STREAM_ID:
            return False
        if c.open_streams >= c.max_concurrent_streams:
            return False
        return bool(self.streams) or trio.current_time() - self.idle_since < REUSE_IDLE

    async def flush(self) -> None:
        """Send what the core has queued: on a shared connection, hand it
        to the writer (waiting only while the backlog is over
        SHARED_BACKLOG); else write it now."""
        if self.shared:
            if self.error is not None:
                raise trio.BrokenResourceError(self.error)
            if self.conn.pending:
                self._kick()
            if self.conn.pending_bytes + self._in_flight <= SHARED_BACKLOG:
                await trio.lowlevel.checkpoint()
                return
            drained = trio.Event()
            self._backlogged.append(drained)
            await drained.wait()
            if self.error is not None:
                raise trio.BrokenResourceError(self.error)
            return
        async with self._send_lock:
            data = self.conn.data_to_send()
            if data:
                await self.transport_stream.send_all(data)

    def _kick(self) -> None:
        """Bytes are queued: wake the writer, or start it."""
        if self._writing:
            self._kicked.set()
        elif self.error is None and not self.closed:
            self._writing = True
            trio.lowlevel.spawn_system_task(self._write_queued, name="HTTP/2 writer")

    async def _write_queued(self) -> None:
        """A shared connection's writer: sends what the core has queued, in
        one write per wake-up (whatever every flow queued in the pass
        before), until nothing is queued and no stream is open (then a
        new flow starts it again). A write that fails or takes
        SHARED_SEND_TIMEOUT fails the connection. A system task: it
        outlives the flow that started it, and must never raise."""
        try:
            while self.error is None and not self.closed:
                if not self.conn.pending:
                    if not self.streams:
                        break
                    self._kicked = trio.Event()
                    await self._kicked.wait()
                    continue
                data = self.conn.data_to_send()
                self._in_flight = len(data)
                with trio.move_on_after(SHARED_SEND_TIMEOUT) as timer:
                    await self.transport_stream.send_all(data)
                self._in_flight = 0
                if timer.cancelled_caught:
                    self.fail(f"HTTP/2: the server took no data for {SHARED_SEND_TIMEOUT:g} s")
                elif self.conn.pending_bytes <= SHARED_BACKLOG:
                    self._release_backlogged()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.fail(f"HTTP/2: the connection broke: {e}")
        except Exception as e:  # a system task must not take the process down
            log.exception("HTTP/2 writer failed")
            self.fail(f"HTTP/2: the writer failed: {e!r}")
        finally:
            self._writing = False
            self._in_flight = 0
            self._release_backlogged()

    def _release_backlogged(self) -> None:
        waiting, self._backlogged = self._backlogged, []
        for drained in waiting:
            drained.set()

    async def pump(self) -> None:
        """One read of the connection, its events applied; wakes whoever
        waits for progress. Only one task at a time (`_reading`)."""
        self._reading = True
        try:
            data = await self.transport_stream.receive_some(READ_SIZE)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._reading = False
            if not self.shared:
                self._wake(None)
                raise
            self.fail(f"HTTP/2: the connection broke: {e}")
            return
        except BaseException:
            self._reading = False
            self._wake(())  # someone else reads
            raise
        self._reading = False
        if not data:
            self.error = self.error or "HTTP/2: the server closed the connection"
            for stream in self.streams.values():
                stream._eof = True
            self._wake(None)
            return
        try:
            events = self.conn.receive_data(data)
        except H2ProtocolError as e:
            self.fail(f"HTTP/2: {e}")
            return
        streams = self.streams
        self._wake({event[1] for event in events})
        for event in events:
            kind = event[0]
            if kind == GOAWAY:
                self.fail(f"HTTP/2: the server closed the connection (GOAWAY, error "
                          f"{event[2]})")
                continue
            target = streams.get(event[1])
            if target is not None:
                target._apply(event)
            elif kind == DATA:
                # A stream closed already: give the connection its window back.
                self.conn.acknowledge(event[1], event[3])
        # Only what the read made due (SETTINGS and PING answers, window
        # updates): most reads send nothing.
        if self.conn.pending:
            await self.flush()

    def fail(self, reason: str) -> None:
        """The connection is unusable: every stream on it ends with `reason`."""
        if self.error is None:
            self.error = reason
        for stream in self.streams.values():
            stream._fail(reason)
        self._wake(None)
        self._kicked.set()  # the writer stops

    def _wake(self, stream_ids: set[int] | tuple[()] | None) -> None:
        """After a read: wake the parked tasks of `stream_ids` (None: all),
        every sender (a window may have opened) and one more, which reads
        next if nobody does."""
        parked = self._parked
        if not parked:
            return
        if stream_ids is None:
            self._parked = []
            for _, event, _ in parked:
                event.set()
            return
        keep = []
        for entry in parked:
            if entry[2] or entry[0].stream_id in stream_ids:
                entry[1].set()
            else:
                keep.append(entry)
        if keep:
            keep.pop(0)[1].set()
        self._parked = keep

    async def wait_progress(self, stream: H2Stream, *, sending: bool = False) -> None:
        """Returns once the connection was read (by this task or another)
        and may have brought `stream` something."""
        if not self._reading:
            await self.pump()
            return
        entry = (stream, trio.Event(), sending)
        self._parked.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry in self._parked:
                self._parked.remove(entry)
            elif not self._reading:
                self._wake(())  # it was to read next: pass that on
            raise

    async def close_stream(self, stream: H2Stream) -> None:
        """`stream` is done: on a shared connection it is reset (if still
        open) and the connection stays for the next flow; else the
        connection closes."""
        if self.streams.pop(stream.stream_id, None) is None:
            await trio.lowlevel.checkpoint()
            return
        if not self.shared:
            await self.aclose()
            return
        if not self.streams:
            self.idle_since = trio.current_time()
        if self.error is None:
            self.conn.reset_stream(stream.stream_id, CANCEL)
            try:
                await self.flush()
            except trio.BrokenResourceError:
                pass
        if self.error is not None and not self.streams:
            await self.aclose()

    async def aclose(self) -> None:
        if self.closed:
            await trio.lowlevel.checkpoint()
            return
        self.closed = True
        self.error = self.error or "HTTP/2: connection closed"
        self._wake(None)
        self._kicked.set()
        self._release_backlogged()
        await trio.aclose_forcefully(self.transport_stream)


class H2Stream(trio.abc.Stream):
    """One HTTP/2 request's bodies as a byte stream (see the module doc);
    with `grpc`, each direction is gun framed. Its connection (`H2Conn`)
    is its own or a `GunPool`'s."""

    def __init__(self, conn: H2Conn, stream_id: int, *, grpc: bool) -> None:
        self.h2 = conn
        self.stream_id = stream_id
        self._grpc = grpc
        self._decoder = gun.GunDecoder() if grpc else None
        self._received = Chunks()
        self._eof = False
        self._error: str | None = None
        self._responded = False

    @property
    def transport_stream(self) -> trio.abc.Stream:
        return self.h2.transport_stream

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        self._eof = True

    def _apply(self, event: Event) -> None:
        kind = event[0]
        if kind == DATA:
            _, sid, payload, flow_controlled, end_stream = event
            self.h2.conn.acknowledge(sid, flow_controlled)
            if payload:
                if self._decoder is not None:
                    try:
                        self._received.extend(self._decoder.feed(payload))
                    except gun.GunError as e:
                        self._fail(f"grpc: {e}")
                else:
                    self._received.append(payload)
            if end_stream:
                self._eof = True
        elif kind == HEADERS:
            headers = dict(event[2])
            if not self._responded and b":status" in headers:
                self._responded = True
                status = headers[b":status"]
                if status != b"200":
                    self._fail(f"HTTP/2: the server answered {status.decode(errors='replace')}")
                elif self._grpc and headers.get(b"grpc-status", b"0") != b"0":
                    self._fail(_grpc_error(headers))
            elif headers.get(b"grpc-status", b"0") != b"0":
                self._fail(_grpc_error(headers))
            if event[3]:
                self._eof = True
        elif kind == RESET:
            if event[2] == 0:
                # NO_ERROR: a Go server whose handler returned before the
                # request body ended (the far end closed): an end, not a fault.
                self._eof = True
            else:
                self._fail(f"HTTP/2: the server reset the stream (error {event[2]})")

    # --- trio.abc.Stream ----------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._received:
            if self._eof:
                if self._error is not None:
                    raise trio.BrokenResourceError(self._error)
                await trio.lowlevel.checkpoint()
                return b""
            await self.h2.wait_progress(self)
        return self._received.take(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise trio.BrokenResourceError(self._error)
        payload = memoryview(gun.encode(data) if self._grpc else data)
        h2, sid = self.h2, self.stream_id
        conn = h2.conn
        try:
            while payload:
                window = conn.send_window(sid)
                if window <= 0:
                    await h2.flush()
                    await h2.wait_progress(self, sending=True)
                    if self._error is not None:
                        raise trio.BrokenResourceError(self._error)
                    if self._eof and conn.send_window(sid) <= 0:
                        raise trio.BrokenResourceError("HTTP/2: the connection ended")
                    continue
                conn.send_data(sid, payload[:window])
                payload = payload[window:]
        except H2ProtocolError as e:
            raise trio.BrokenResourceError(f"HTTP/2: {e}") from None
        await h2.flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.h2.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.h2.close_stream(self)


class GunPool:
    """The grpc calls of one outbound as streams of one HTTP/2 connection
    at a time, as mihomo's gun transport shares its HTTP/2 transport: a
    flow costs a stream (a HEADERS frame) instead of a TCP and TLS
    handshake. A new connection is dialed when the current one failed, ran
    out of stream ids or concurrent streams, or sat idle past REUSE_IDLE.
    If the connection breaks, every flow on it ends (as in mihomo)."""

    def __init__(self, opts: GrpcOptions, host: str, *, tls: bool) -> None:
        self.headers = header_block(_grpc_headers(opts, host, tls=tls))
        self._conn: H2Conn | None = None
        self._lock = trio.Lock()

    async def open(self, dial: Callable[[], Awaitable[trio.abc.Stream]]) -> H2Stream:
        """A new call (sent with its first `send_all`); `dial` opens a
        connection to the server (TLS on it) when one is needed."""
        conn = self._conn
        if conn is None or not conn.reusable:
            async with self._lock:
                conn = self._conn
                if conn is None or not conn.reusable:
                    if conn is not None and not conn.streams:
                        await conn.aclose()
                    conn = H2Conn(await dial(), shared=True)
                    self._conn = conn
        # Not flushed here: the HEADERS go out with the protocol's request
        # (the flow's first send_all), one TLS record and one send for both.
        return conn.open_stream(self.headers, grpc=True)


def _grpc_error(headers: dict[bytes, bytes]) -> str:
    status = headers.get(b"grpc-status", b"").decode(errors="replace")
    message = headers.get(b"grpc-message", b"").decode(errors="replace")
    return f"grpc: the server answered status {status}" + (f" ({message})" if message else "")


def _grpc_headers(opts: GrpcOptions, host: str, *, tls: bool) -> list[tuple[str, str]]:
    return [
        (":method", "POST"), (":scheme", "https" if tls else "http"),
        (":path", grpc_path(opts.service_name)), (":authority", host),
        ("content-type", "application/grpc"), ("te", "trailers"),
        ("user-agent", GRPC_USER_AGENT),
    ]  # fmt: skip


async def _open(stream: trio.abc.Stream, headers: list[tuple[str, str]], *,
                grpc: bool) -> H2Stream:
    """A connection of its own on `stream` with one request on it."""
    conn = H2Conn(stream)
    out = conn.open_stream(header_block(headers), grpc=grpc)
    await conn.flush()
    return out


async def open_grpc(stream: trio.abc.Stream, opts: GrpcOptions, host: str, *,
                    tls: bool) -> H2Stream:
    """The gun call on `stream`, a connection of its own (requests are
    sent; the response is read with the first receive). Outbounds share
    connections through a `GunPool` instead."""
    return await _open(stream, _grpc_headers(opts, host, tls=tls), grpc=True)


async def open_h2(stream: trio.abc.Stream, opts: H2Options, host: str, *,
                  tls: bool) -> H2Stream:
    """v2ray's http transport: `PUT <path>` to one of `hosts` (chosen at
    random per connection, as v2ray does), raw bytes both ways."""
    authority = random.choice(opts.hosts) if opts.hosts else host
    return await _open(stream, [
        (":method", "PUT"), (":scheme", "https" if tls else "http"),
        (":path", opts.path or "/"), (":authority", authority),
    ], grpc=False)  # fmt: skip
