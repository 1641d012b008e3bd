"""AnyTLS outbound (mihomo `type: anytls`): TCP flows as streams of pooled
AnyTLS sessions, UDP flows as UDP-over-TCP v2 streams (appliance/proto/
anytls.py has the protocol).

What this owns: `AnytlsPool` keeps the proxy's sessions. As in mihomo
(transport/anytls/session/client.go) a flow takes the newest idle session
or opens a new one, so a session carries one flow at a time and goes back
to the pool when its stream ends; a checker task closes sessions idle for
longer than `idle-session-timeout`, every `idle-session-check-interval`,
keeping the `min-idle-session` newest. `AnytlsSession` is one TLS
connection (`TlsClient`, dialed marked or through `dialer-proxy`) read by a
driver task of its own, which hands each stream's bytes to its
`AnytlsStream`.

How it fails: dial and TLS failures (bad certificate, fingerprint) are
OutboundErrors of `connect_tcp`. The server checks the password silently:
a session that ends before the server sent a single frame is logged once
at WARNING as "closed the session without answering (wrong password?)",
and its stream then ends. A destination the server cannot reach comes
back (protocol v2) as SYNACK with the server's reason: the stream raises
trio.BrokenResourceError with it, logged at WARNING. A v2 server answers
every stream's SYN: one that says nothing for `OPEN_TIMEOUT` after a new
stream (a host that vanished while its session sat idle) has its session
closed, so the flows after it do not pick the same dead session. AnyTLS has no
half-close (FIN ends a stream both ways), so streams are not
HalfCloseableStream: the gateway keeps the flow open until both sides are
done.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.anytls import AnytlsOptions
from appliance.config.protocols.common import TlsOptions
from appliance.outbound.base import (
    OutboundEnv,
    OutboundError,
    ServerDial,
    UdpPeer,
    no_udp,
    outbound_deadline,
)
from appliance.outbound.inbox import Inbox
from appliance.outbound.shared_connection import READ_SIZE, SharedConnection
from appliance.outbound.stream_udp import StreamUdpPeer
from appliance.outbound.tls import TlsClient
from appliance.proto.anytls import (
    DEFAULT_PADDING_SCHEME,
    UOT_MAGIC_ADDRESS,
    Alert,
    AnytlsError,
    ClientSession,
    Data,
    Fin,
    PaddingScheme,
    SynAck,
    UotDecoder,
    uot_packet,
    uot_request,
)
from appliance.proto.socks5 import Socks5Error, encode_address

log = logging.getLogger(__name__)

# AnyTLS has no flow control of its own: past this much unread by a flow,
# the session's driver stops reading (TCP then holds the server back), as
# mihomo's stream pipe does.
INBOX_HIGH_WATER = 1 << 20
# A stream opened on a session whose (v2) server then says nothing for this
# long: the session is closed and its streams fail.
OPEN_TIMEOUT = 5.0


class AnytlsStream(trio.abc.Stream):
    """One flow on a session. Bytes arrive from the session's driver (into
    its `Inbox`); writes become PSH frames. Owns the stream (aclose sends
    FIN and gives the session back to the pool), not the session."""

    def __init__(self, session: AnytlsSession, stream_id: int, what: str) -> None:
        self.session = session
        self.stream_id = stream_id
        self.what = what
        self.inbox = Inbox()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        return await self.inbox.take(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self.inbox.error is not None:
            raise trio.BrokenResourceError(self.inbox.error)
        if self.inbox.eof:
            # The server ended the stream (FIN ends both directions).
            raise trio.BrokenResourceError(f"{self.what}: the server ended the stream")
        if data:
            await self.session.write(self.session.core.send(self.stream_id, bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await self.session.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self.inbox.wake()  # a driver waiting for this stream to be read
        await self.session.close_stream(self)


class AnytlsSession(SharedConnection):
    """One AnyTLS session (see the module doc) on `transport` (its TLS
    connection, which it owns); its driver task reads it until the session
    ends."""

    def __init__(self, pool: AnytlsPool, tls: trio.abc.Stream, core: ClientSession) -> None:
        super().__init__(tls)
        self.pool = pool
        self.core = core
        self.streams: dict[int, AnytlsStream] = {}
        self.idle_since = trio.current_time()
        self.seq = 0
        self._watchdog = math.inf  # when a silent server is given up
        self._timer: trio.CancelScope | None = None

    async def write(self, writes: list[bytes]) -> None:
        """Each item one TLS write, in order (the padding is about records)."""
        async with self._send_lock:
            if self.closed_reason is not None:
                raise trio.BrokenResourceError(f"{self.pool.name}: session closed: "
                                               f"{self.closed_reason}")
            try:
                await self._send(writes)
            except trio.BrokenResourceError as e:
                raise trio.BrokenResourceError(f"{self.pool.name}: {e}") from None

    async def open_stream(self, address: bytes, what: str) -> AnytlsStream:
        sid, writes = self.core.open_stream(address)
        stream = self.streams[sid] = AnytlsStream(self, sid, what)
        if self.core.server_version >= 2:
            # A v2 server answers every SYN (SYNACK): silence means it is
            # gone (sing-anytls' stream-open watchdog).
            self._watchdog = min(self._watchdog, trio.current_time() + OPEN_TIMEOUT)
            if self._timer is not None:
                self._timer.deadline = self._watchdog
        await self.write(writes)
        return stream

    async def close_stream(self, stream: AnytlsStream) -> None:
        if self.streams.pop(stream.stream_id, None) is None:
            await trio.lowlevel.checkpoint()
            return  # the server ended it: no FIN back (as the reference clients)
        if self.closed_reason is None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.write(self.core.fin(stream.stream_id))
                except trio.BrokenResourceError:
                    pass
        self.pool.release(self)

    def _ended(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            stream.inbox.fail(f"{stream.what}: AnyTLS session ended: {reason}")
        self.streams.clear()
        self.pool.forget(self)

    async def _read(self) -> None:
        try:
            while self.closed_reason is None:
                with trio.move_on_at(self._watchdog) as timer:
                    self._timer = timer
                    data = await self.transport.receive_some(READ_SIZE)
                self._timer = None
                if timer.cancelled_caught:
                    log.warning("%s: the server stopped answering (no SYNACK in %gs): "
                                "session closed", self.pool.name, OPEN_TIMEOUT)
                    self.end("the server stopped answering")
                    break
                self._watchdog = math.inf
                if not data:
                    if not self.core.answered:
                        log.warning("%s: the server closed the session without answering "
                                    "(wrong password?)", self.pool.name)
                        self.end("the server closed the session without answering "
                                 "(wrong password?)")
                    else:
                        self.end("the server closed the session")
                    break
                self._handle(self.core.receive(bytes(data)))
                self.pool.scheme = self.core.scheme
                replies = self.core.replies()
                if replies:
                    await self.write(replies)
                for stream in list(self.streams.values()):
                    while stream.inbox.size > INBOX_HIGH_WATER and not stream.closed \
                            and self.closed_reason is None:
                        await stream.inbox.changed()
        except (AnytlsError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as e:
            self.end(str(e) or type(e).__name__)
        except Exception:
            # A bug here must end this session, not the appliance (a system
            # task's exception would crash the whole run).
            log.exception("%s: AnyTLS session failed", self.pool.name)
            self.end("internal error")

    def _handle(self, events: list[Data | Fin | SynAck | Alert]) -> None:
        for event in events:
            if isinstance(event, Alert):
                log.warning("%s: alert from the server: %s", self.pool.name, event.text)
                self.end(f"alert from the server: {event.text}")
                return
            stream = self.streams.get(event.stream_id)
            if stream is None:
                continue
            if isinstance(event, Data):
                stream.inbox.put(event.data)
            elif isinstance(event, Fin):
                self.streams.pop(event.stream_id, None)
                stream.inbox.end()
                self.pool.release(self)
            elif event.error is not None:
                log.warning("%s: the server could not open it: %s", stream.what, event.error)
                stream.inbox.fail(f"{stream.what}: the server could not open it: {event.error}")
                self.streams.pop(event.stream_id, None)
                self.pool.release(self)


class AnytlsPool:
    """A proxy's sessions: idle ones by age, and the checker that closes
    those idle too long (see the module doc)."""

    def __init__(self, name: str, options: AnytlsOptions) -> None:
        self.name = name
        self.options = options
        # The outbound this pool serves. Once it is gone (a reload replaced
        # it), the next check closes every idle session.
        self.owner: Callable[[], object | None] = lambda: None
        # The server may send another scheme; later sessions use it (as mihomo).
        self.scheme = PaddingScheme(DEFAULT_PADDING_SCHEME)
        self.idle: list[AnytlsSession] = []  # oldest first
        self.sessions: set[AnytlsSession] = set()
        self._seq = 0
        self._checking = False

    def take(self) -> AnytlsSession | None:
        while self.idle:
            session = self.idle.pop()
            if session.closed_reason is None:
                return session
        return None

    def add(self, session: AnytlsSession) -> None:
        self._seq += 1
        session.seq = self._seq
        self.sessions.add(session)
        if not self._checking:
            self._checking = True
            trio.lowlevel.spawn_system_task(self._check, name=f"anytls {self.name} idle check")

    def release(self, session: AnytlsSession) -> None:
        """A session whose stream ended goes back to the pool."""
        if session.closed_reason is not None or session.streams or session in self.idle:
            return
        session.idle_since = trio.current_time()
        self.idle.append(session)
        self.idle.sort(key=lambda s: s.seq)

    def forget(self, session: AnytlsSession) -> None:
        self.sessions.discard(session)
        if session in self.idle:
            self.idle.remove(session)

    def cleanup(self, now: float) -> None:
        """mihomo's idleCleanup: newest first, keep sessions idle for less
        than the timeout, and up to `min-idle-session` of the others."""
        expired_before = now - self.options.idle_session_timeout
        keep = self.options.min_idle_session
        if self.owner() is None:
            # The outbound is gone (replaced by a reload): no flow will take
            # these sessions any more.
            expired_before, keep = math.inf, 0
        kept = 0
        for session in sorted(self.idle, key=lambda s: s.seq, reverse=True):
            if session.idle_since >= expired_before:
                kept += 1
                continue
            if kept < keep:
                session.idle_since = now
                kept += 1
                continue
            self.idle.remove(session)
            session.end("idle")  # its driver stops and closes the connection

    async def _check(self) -> None:
        try:
            while self.sessions:
                await trio.sleep(self.options.idle_session_check_interval)
                self.cleanup(trio.current_time())
        finally:
            self._checking = False


class AnytlsOutbound:
    """One `type: anytls` proxy (see the module doc). Owns its pool and its
    `TlsClient`."""

    type = "AnyTLS"

    def __init__(self, name: str, server: str, port: int, options: AnytlsOptions, *,
                 tls: TlsOptions, udp: bool, dial: ServerDial, connect_timeout: float) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.options = options
        self.carries_udp = udp
        self.connect_timeout = connect_timeout
        self._dial = dial
        self.tls = TlsClient(tls, server)
        self.pool = AnytlsPool(name, options)
        self.pool.owner = weakref.ref(self)

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> AnytlsOutbound:
        assert isinstance(p.options, AnytlsOptions)
        dialer = env.server_dialer()
        return cls(p.name, p.server, p.port, p.options, tls=p.tls_options or TlsOptions(),
                   udp=p.udp, dial=env.server_dial(dialer), connect_timeout=env.connect_timeout)

    async def _new_session(self) -> AnytlsSession:
        stream = await self._dial(self.server, self.port)
        tls = await self.tls.wrap(stream, self.name)
        core = ClientSession(self.options.password, self.pool.scheme)
        session = AnytlsSession(self.pool, tls, core)
        try:
            await session.write(core.start())
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        self.pool.add(session)
        # The driver holds the session and its pool, never the outbound (the
        # pool's idle check learns from `owner` when a reload dropped it).
        trio.lowlevel.spawn_system_task(session.drive, name=f"anytls {self.name}")
        return session

    async def _stream(self, host: str | IPAddress, port: int, what: str) -> AnytlsStream:
        try:
            address = encode_address(host, port)
        except Socks5Error as e:
            raise OutboundError(f"{what}: {e}") from None
        # An idle session the server closed meanwhile fails at once: try the
        # next one (mihomo tries three times).
        for _ in range(3):
            session = self.pool.take()
            if session is None:
                break
            try:
                return await session.open_stream(address, what)
            except trio.BrokenResourceError:
                continue
        session = await self._new_session()
        try:
            return await session.open_stream(address, what)
        except trio.BrokenResourceError as e:
            raise OutboundError(f"{what}: {e}") from None

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        what = f"{self.name} {host}:{port}"
        with outbound_deadline(self.connect_timeout, what):
            return await self._stream(host, port, what)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        if not self.carries_udp:
            return await no_udp(self.name)
        what = f"{self.name} UDP {host}:{port}"
        try:
            request = uot_request(encode_address(host, port))
        except Socks5Error as e:
            raise OutboundError(f"{what}: {e}") from None
        with outbound_deadline(self.connect_timeout, what):
            stream = await self._stream(UOT_MAGIC_ADDRESS, 0, what)
            try:
                await stream.send_all(request)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return StreamUdpPeer(stream, UotCodec(), self.name, f"{self.server}:{self.port}")


class UotCodec:
    """Datagrams of one UDP flow on its UDP-over-TCP stream (connect mode:
    a length before each)."""

    def __init__(self) -> None:
        self._decoder = UotDecoder()

    def encode(self, payload: bytes) -> bytes:
        return uot_packet(payload)

    def decode(self, data: bytes) -> list[bytes]:
        return self._decoder.feed(data)
