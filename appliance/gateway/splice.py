"""Relaying a flow's bytes both ways, and counting them.

`splice(client, server)` moves bytes client->server ("up") and
server->client ("down") until both directions have ended, one fails, or the
flow has been idle too long. Half-close is modelled per direction, as
mitmproxy's TCP layer does: when one side sends EOF, the other side gets
`shutdown(SHUT_WR)` (`send_eof`) and the opposite direction goes on, so
request/response protocols that close their sending half early keep working.
Once one direction has ended, the flow is half-closed: with
`half_close_timeout` it then ends when nothing moved for that long (shorter
than the idle timeout: a peer that went silent after its half-close, a
proxy blackholed mid-flow, is not waited for 300 s).

Dead peers: both ends, when they are sockets, get TCP keepalive
(`sockopt.set_keepalive`, the dialer defaults mihomo uses), so a peer that
vanished without a FIN or RST is noticed by the kernel while the flow idles.
The transparent listener's sockets have it from their listener
(`client_keepalive=False`: Linux copies it to accepted sockets).

When both ends are plain `trio.SocketStream`s, a direction starts with the
copy loop and, once one read fills a whole buffer (bulk data is queued),
moves the rest socket -> pipe -> socket with `os.splice`, never entering
Python. Short and idle flows so never hold a pipe (2 fds each, and pipe
pages the kernel charges to the user: past fs.pipe-user-pages-soft, without
CAP_SYS_RESOURCE, new pipes are 8 KiB and cannot grow); bulk flows get a
1 MiB pipe (bench/gateway.py: 0.6x -> 0.9x kernel forwarding with iperf3).
Other streams (TLS to a Trojan server, Shadowsocks cipher streams) use the
copy loop throughout.

Accounting: each direction reports the bytes it moved to a `Meter`;
`FlowRecord` is one (a relayed flow's entry in the `FlowRegistry`: per-flow
counters that also feed the registry's totals the metrics read; the flow
itself, what routing saw and decided, is appliance/flow.py's `Flow`). The
registry of live flows is what the control API lists.

Failure model: an `OSError` or a broken/closed stream in one direction ends
the flow (the result says which and why); the caller decides how to close the
ends (`abort` sends RST, so a reset on one side is mirrored on the other).
Other exceptions are bugs and propagate.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import math
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import trio

from appliance import streamio
from appliance.failures import FailedFlows
from appliance.sockopt import set_keepalive

if TYPE_CHECKING:
    from appliance.flow import Entry, Flow

# Copy-path read size: below glibc's mmap threshold (128 KiB), so a read
# buffer is not an mmap/munmap pair. A flow starts on the copy path and
# switches to splice once one read fills it (bulk data is queued).
CHUNK = 64 * 1024
# How much one splice(2) call asks to move; the pipe is grown to match
# (bounded by /proc/sys/fs/pipe-max-size, 1 MiB by default). If that fails
# (EPERM past fs.pipe-user-pages-soft without CAP_SYS_RESOURCE) the smaller
# pipe still works.
SPLICE_CHUNK = 1024 * 1024
# Reads the copy loop makes without waiting before it yields anyway.
_COPY_BURST = 8
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0

Direction = Literal["up", "down"]
EndReason = Literal["done", "idle", "error"]


class Meter(Protocol):
    """Receives byte counts as they move (called once per chunk)."""

    def add_up(self, n: int) -> None: ...

    def add_down(self, n: int) -> None: ...


class _NullMeter:
    def add_up(self, n: int) -> None:
        pass

    def add_down(self, n: int) -> None:
        pass


@dataclass
class SpliceResult:
    """How a flow ended: both directions done, idle timeout, or an error."""

    reason: EndReason = "done"
    # For "error": which direction failed and the exception text.
    detail: str = ""
    up: int = 0
    down: int = 0
    # Whether the zero-copy path was chosen (both ends plain sockets): bulk
    # data then moves by splice, after the copy loop's first full read.
    zero_copy: bool = False


@dataclass(eq=False)
class _State:
    result: SpliceResult
    last: float
    # For the idle sweeper: the flow's timeout, the scope it cancels, and
    # whether the flow has ended (its heap entry is then stale).
    idle: float = math.inf
    scope: trio.CancelScope | None = None
    finished: bool = False
    # Heap entries the sweeper holds for it (one more when the timeout is
    # shortened at half-close), so that stale entries are counted right.
    entries: int = 1


def can_zero_copy(a: trio.abc.Stream, b: trio.abc.Stream) -> bool:
    return hasattr(os, "splice") and isinstance(a, trio.SocketStream) and isinstance(
        b, trio.SocketStream
    )


async def splice(
    client: trio.abc.Stream,
    server: trio.abc.Stream,
    *,
    idle_timeout: float | None = None,
    half_close_timeout: float | None = None,
    meter: Meter | None = None,
    zero_copy: bool = True,
    client_keepalive: bool = True,
) -> SpliceResult:
    """Relay until both directions end, one fails, or nothing moved for
    `idle_timeout` seconds (`half_close_timeout` once one direction has
    ended, if shorter). Does not close either stream (the caller owns them:
    see `abort`). `zero_copy=False` forces the copy loop (tests);
    `client_keepalive=False`: the client's socket has keepalive already."""
    m: Meter = meter if meter is not None else _NullMeter()
    use_splice = zero_copy and can_zero_copy(client, server)
    if client_keepalive and isinstance(client, trio.SocketStream):
        set_keepalive(client.socket)
    if isinstance(server, trio.SocketStream):
        set_keepalive(server.socket)
    state = _State(SpliceResult(zero_copy=use_splice), trio.current_time())
    timed = idle_timeout is not None or half_close_timeout is not None
    sweeper = _idle_sweeper() if timed else None
    try:
        async with trio.open_nursery() as nursery:

            async def direction(src: trio.abc.Stream, dst: trio.abc.Stream, d: Direction) -> None:
                add = m.add_up if d == "up" else m.add_down

                def count(n: int) -> None:
                    add(n)
                    state.last = trio.current_time()
                    if d == "up":
                        state.result.up += n
                    else:
                        state.result.down += n

                try:
                    if use_splice:
                        assert isinstance(src, trio.SocketStream)
                        assert isinstance(dst, trio.SocketStream)
                        await _pump_splice(src, dst, count)
                    else:
                        await _pump_copy(src, dst, count)
                    # EOF from src: tell dst we are done sending, keep the other
                    # direction going. Streams without half-close (TLS) cannot
                    # say it; the other direction then ends on its own.
                    if isinstance(dst, trio.SocketStream):
                        # What send_eof does, minus its scheduler turn.
                        dst.socket.shutdown(socket.SHUT_WR)
                    elif isinstance(dst, trio.abc.HalfCloseableStream):
                        await dst.send_eof()
                    if (sweeper is not None and half_close_timeout is not None
                            and half_close_timeout < state.idle and not state.finished):
                        sweeper.tighten(state, half_close_timeout)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    if state.result.reason == "done":
                        state.result.reason = "error"
                        state.result.detail = f"{d}: {_describe(exc)}"
                    nursery.cancel_scope.cancel()

            if sweeper is not None:
                state.idle = idle_timeout if idle_timeout is not None else math.inf
                state.scope = nursery.cancel_scope
                sweeper.add(state)
            # "up" runs in this task: one task spawn per flow, not two.
            nursery.start_soon(direction, server, client, "down")
            await direction(client, server, "up")
    finally:
        if sweeper is not None:
            sweeper.remove(state)
    return state.result


class _IdleSweeper:
    """Ends idle flows for every `splice` of one trio run, from one task.

    A flow costs a heap entry (its earliest possible expiry) instead of a
    watchdog task of its own: spawning, sleeping and cancelling a task per
    flow was a tenth of the gateway's CPU per short connection
    (bench/gateway.py). An entry is re-checked when it comes due: if bytes
    moved since, it goes back with `last + idle`, so a flow ends exactly
    `idle` seconds after its last byte, as the per-flow timer did. Ended
    flows leave stale entries that are dropped when popped, or all at once
    when they outnumber the live ones (memory stays O(live flows)).

    Runs as a trio system task (started by the first flow with an idle
    timeout, cancelled when the run ends); it only cancels flows' scopes and
    never raises.
    """

    PRUNE_MIN = 256

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _State]] = []
        self._seq = itertools.count()
        self._stale = 0
        self._wake = trio.CancelScope()

    def add(self, state: _State) -> None:
        due = state.last + state.idle
        heapq.heappush(self._heap, (due, next(self._seq), state))
        if due < self._wake.deadline:
            self._wake.deadline = due

    def tighten(self, state: _State, idle: float) -> None:
        """Shorten a live flow's timeout to `idle` (half-close): a new entry
        at its new expiry; the old one is re-checked when it comes due."""
        state.idle = idle
        state.entries += 1
        self.add(state)

    def remove(self, state: _State) -> None:
        if state.finished or state.scope is None:
            return
        state.finished = True
        self._stale += state.entries
        if self._stale > self.PRUNE_MIN and self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if not e[2].finished]
            heapq.heapify(self._heap)
            self._stale = 0

    def _sweep(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, state = heapq.heappop(heap)
            if state.finished:
                self._stale -= 1
                continue
            due = state.last + state.idle
            if due > now:
                heapq.heappush(heap, (due, next(self._seq), state))
                continue
            state.finished = True
            self._stale += state.entries - 1  # its other entries
            if state.result.reason == "done":
                state.result.reason = "idle"
                state.result.detail = f"no bytes for {state.idle:g}s"
            assert state.scope is not None
            state.scope.cancel()

    async def run(self) -> None:
        while True:
            self._sweep(trio.current_time())
            self._wake = trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf)
            with self._wake:
                await trio.sleep_forever()


_SWEEPER: trio.lowlevel.RunVar[_IdleSweeper] = trio.lowlevel.RunVar("mirage_idle_sweeper")


def _idle_sweeper() -> _IdleSweeper:
    try:
        return _SWEEPER.get()
    except LookupError:
        sweeper = _IdleSweeper()
        _SWEEPER.set(sweeper)
        trio.lowlevel.spawn_system_task(sweeper.run, name="splice idle sweeper")
        return sweeper


async def _pump_copy(src: trio.abc.Stream, dst: trio.abc.Stream, count: Any) -> None:
    """The copy loop for ends that are not both plain sockets (TLS, ws,
    cipher streams). `streamio` reads and writes the socket ends (and the
    sockets under TLS and ws) without a scheduler turn per call, so this
    loop yields every _COPY_BURST chunks itself: a busy flow cannot starve
    the rest."""
    unyielded = 0
    while True:
        data = await streamio.receive_some(src, CHUNK)
        if not data:
            return
        await streamio.send_all(dst, data)
        count(len(data))
        unyielded += 1
        if unyielded >= _COPY_BURST:
            await trio.lowlevel.checkpoint()
            unyielded = 0


async def _pump_splice(src: trio.SocketStream, dst: trio.SocketStream, count: Any) -> None:
    """Copy until a read fills CHUNK, then socket -> pipe -> socket with
    splice(2); returns at EOF of src.

    Both sockets are non-blocking (trio made them so) and so is the pipe;
    EAGAIN means "wait": readable for src, writable for dst. The pipe is
    drained completely before reading again, so an EAGAIN on the read side
    always means src has nothing, never that the pipe is full.
    """
    # Copy first: most flows are short (a request and a small response, a
    # TLS handshake) or idle and never need a pipe (see the module docstring).
    if not await _copy_sockets(src, dst, count):
        return
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, SPLICE_CHUNK)
        except OSError:
            pass
        sfd, dfd = src.socket.fileno(), dst.socket.fileno()
        while True:
            # Yield once per chunk so a fast flow cannot starve the others.
            await trio.lowlevel.checkpoint()
            try:
                n = os.splice(sfd, w, SPLICE_CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src.socket)
                continue
            if n == 0:
                return
            pending = n
            while pending:
                try:
                    pending -= os.splice(r, dfd, pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst.socket)
            count(n)
    finally:
        os.close(r)
        os.close(w)


async def _copy_sockets(src: trio.SocketStream, dst: trio.SocketStream, count: Any) -> bool:
    """The copy loop on the sockets' fds: False at EOF of src, True once a
    read filled CHUNK (bulk data is queued: time to splice).

    What `receive_some`/`send_all` do, minus their cost: trio yields to the
    scheduler after every successful socket call, several times per short
    flow (bench/gateway.py). Here a task waits only when a socket would
    block, plus a checkpoint every few reads that did not, so one busy flow
    cannot starve the rest. Errors are the OSErrors trio would have wrapped.
    """
    sfd, dfd = src.socket.fileno(), dst.socket.fileno()
    unwaited = 0
    while True:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = os.read(sfd, CHUNK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src.socket)
            unwaited = 0
            continue
        if not data:
            return False
        n = len(data)
        sent = 0
        while sent < n:
            try:
                sent += os.write(dfd, memoryview(data)[sent:] if sent else data)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst.socket)
                unwaited = 0
        count(n)
        if n >= CHUNK:
            return True
        unwaited += 1
        if unwaited >= _COPY_BURST:
            await trio.lowlevel.checkpoint()
            unwaited = 0


def _describe(exc: BaseException) -> str:
    # trio wraps socket errors in BrokenResourceError; the errno is the news.
    if isinstance(exc, trio.BrokenResourceError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


async def close(stream: trio.abc.Stream) -> None:
    """Close a finished flow's end: a socket stream at once (what its
    aclose() does, minus the scheduler turn that buys nothing at the end of
    a flow: a per-connection cost, bench/gateway.py), anything else (TLS)
    through aclose()."""
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
    else:
        await stream.aclose()


async def abort(stream: trio.abc.Stream) -> None:
    """Close `stream`; a socket is reset (SO_LINGER 0 -> RST), not FIN'd.

    For refusing a flow (unmapped fake IP, dial failure) and for mirroring a
    reset: the peer learns at once that the connection failed, instead of
    seeing an orderly end of data it might take for a complete response.
    """
    reset_on_close(stream)
    await stream.aclose()


def reset_on_close(stream: trio.abc.Stream) -> None:
    """Make closing `stream` reset its socket (SO_LINGER 0), if it has one:
    `abort` for a caller that closes it itself."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


# --- accounting: live flows and totals ---------------------------------------


@dataclass(eq=False)
class FlowRecord:
    """One live relayed flow, as the control API lists it. Also a `Meter`."""

    id: int
    network: str
    src: tuple[str, int]
    dst: tuple[str, int]
    domain: str | None
    outbound: str = ""
    started: float = field(default_factory=time.time)
    up: int = 0
    down: int = 0
    registry: FlowRegistry | None = field(default=None, repr=False)
    # What routing decided (`routed`), for the control API's connections.
    entry: Entry | None = None
    rule: str = ""
    rule_payload: str = ""
    chains: tuple[str, ...] = ()
    by_mode: bool = False  # routed by mode global/direct: no rule shown (Flow.by_mode)
    # The flow's task runs inside this scope: `close_flow` (the API's
    # DELETE /connections) cancels it, which ends the relay and closes both
    # sockets the way any cancellation does.
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope, repr=False)

    def routed(self, flow: Flow) -> None:
        """Copy the routing decision of `flow` (outbound, rule, chains)."""
        self.entry = flow.entry
        self.outbound = flow.outbound
        self.chains = flow.chains
        self.by_mode = flow.by_mode
        self.rule, self.rule_payload = flow.rule_shown()

    def add_up(self, n: int) -> None:
        self.up += n
        if self.registry is not None:
            self.registry.bytes_up += n

    def add_down(self, n: int) -> None:
        self.down += n
        if self.registry is not None:
            self.registry.bytes_down += n

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "network": self.network,
            "src": f"{self.src[0]}:{self.src[1]}",
            "dst": f"{self.dst[0]}:{self.dst[1]}",
            "src_ip": self.src[0],
            "src_port": self.src[1],
            "dst_ip": self.dst[0],
            "dst_port": self.dst[1],
            "domain": self.domain,
            "outbound": self.outbound,
            "started": self.started,
            "up": self.up,
            "down": self.down,
            **(self.entry.as_dict() if self.entry is not None else {}),
            "rule": self.rule,
            "rule_payload": self.rule_payload,
            "chains": list(self.chains),
            "by_mode": self.by_mode,
        }


class FlowRegistry:
    """The live flows (by id) and the gateway's counters since start.

    Owns nothing but memory; used from the trio thread only. `stats()` is the
    metrics view (monotonic counters plus the live count), `snapshot()` the
    connections view.
    """

    COUNTERS = (
        "opened",
        "closed",
        "bytes_up",
        "bytes_down",
        "dial_failures",
        "unmapped",
        "idle_timeouts",
        "errors",
        "zero_copy",
    )

    def __init__(self, failures: FailedFlows | None = None) -> None:
        self._flows: dict[int, FlowRecord] = {}
        # Flows that failed before (or instead of) relaying: the listeners
        # sharing this registry record them here (GET /mirage/failures).
        self.failures = failures if failures is not None else FailedFlows()
        self._ids = itertools.count(1)
        self.opened = 0
        self.closed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.dial_failures = 0
        self.unmapped = 0
        self.idle_timeouts = 0
        self.errors = 0
        self.zero_copy = 0

    def new_id(self) -> int:
        """A flow id not used before: also what the UDP gateway numbers its
        sessions with, so that one id names one entry of /connections."""
        return next(self._ids)

    def open(
        self,
        network: str,
        src: tuple[str, int],
        dst: tuple[str, int],
        domain: str | None,
    ) -> FlowRecord:
        flow = FlowRecord(self.new_id(), network, src, dst, domain, registry=self)
        self._flows[flow.id] = flow
        self.opened += 1
        return flow

    def close(self, flow: FlowRecord, result: SpliceResult | None = None) -> None:
        if self._flows.pop(flow.id, None) is None:
            return
        self.closed += 1
        if result is not None:
            if result.reason == "idle":
                self.idle_timeouts += 1
            elif result.reason == "error":
                self.errors += 1
            if result.zero_copy:
                self.zero_copy += 1

    def get(self, flow_id: int) -> FlowRecord | None:
        return self._flows.get(flow_id)

    def close_flow(self, flow_id: int) -> bool:
        """End a live flow (the control API's DELETE /connections/{id}):
        its task's scope is cancelled, which closes both of its sockets.
        False if no such flow is live."""
        flow = self._flows.get(flow_id)
        if flow is None:
            return False
        flow.cancel_scope.cancel()
        return True

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[FlowRecord]:
        return iter(list(self._flows.values()))

    def snapshot(self) -> list[dict[str, Any]]:
        return [f.as_dict() for f in self._flows.values()]

    def stats(self) -> dict[str, int]:
        out = {name: getattr(self, name) for name in self.COUNTERS}
        out["active"] = len(self._flows)
        return out
