"""SSH outbound (mihomo `type: ssh`): each TCP flow is a `direct-tcpip`
channel over one SSH connection per proxy (appliance/proto/ssh.py has the
protocol).

Why our own client instead of asyncssh: asyncssh runs on asyncio, and a
bridge (trio-asyncio) would put a second event loop under every SSH flow
for the sake of the handful of SSH messages a port-forwarding client
needs; the sans-I/O core over `cryptography` is a few hundred lines, runs
in trio's own loop and is tested byte for byte against OpenSSH's sshd.

What this owns: `SshConnection` is one authenticated connection (the
stream to the server, marked or through `dialer-proxy`, and its
`SshClient`), read by a driver task of its own; flows get `SshChannel`
streams on it. As in mihomo, the proxy keeps one connection and opens a
new one when it dropped (the next flow after the drop reconnects; flows
that waited for the same attempt share its outcome). A connection without
channels for `IDLE_TIMEOUT` seconds is closed (an outbound replaced by a
reload thus lets go of its server).

How it fails: the handshake (version, key exchange, host key, auth) runs
in the first flow's task under the outbound's connect deadline: a wrong
password, a host key that is not one of `host-key`, a refused channel
("connect failed: ...", the server's words) are OutboundErrors with that
reason. When the connection drops, every channel on it raises
trio.BrokenResourceError with the reason. A server that goes silent
without closing (a host that vanished, a path that drops everything) shows
as a channel open that the flow gives up on: the connection then sends a
keepalive request, and if nothing comes back within `PROBE_TIMEOUT` it is
closed (WARNING "the SSH server stopped answering"), so the next flow
connects anew instead of meeting the same silence. UDP: mihomo's ssh carries none,
and neither does this (`carries_udp` False).
"""

from __future__ import annotations

import logging
import math
import random

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.ssh import SshOptions
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
from appliance.proto.ssh import (
    ChannelClosed,
    ChannelData,
    ChannelEof,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelWritable,
    PrivateKey,
    Ready,
    SshClient,
    SshError,
    algorithms_for,
    load_private_key,
    public_key_blob,
)

log = logging.getLogger(__name__)

# A connection with no channel for this long is closed.
IDLE_TIMEOUT = 60.0
# A channel open the server did not answer before the flow gave up: the
# server gets this long to answer a keepalive, or the connection is closed.
PROBE_TIMEOUT = 3.0
# A writer waits while this much of its data is queued beyond the peer's window.
SEND_HIGH_WATER = 1 << 20


def client_version() -> str:
    """An OpenSSH-looking version line, as mihomo sends (7.x or 8.x)."""
    major = random.choice((7, 8))
    return f"SSH-2.0-OpenSSH_{major}.{random.randrange(10 if major == 7 else 9)}"


class SshChannel(trio.abc.HalfCloseableStream):
    """One flow: a direct-tcpip channel. Data arrives from the connection's
    driver (into its `Inbox`); reading it re-opens the server's window.
    Owns the channel (aclose closes it), not the connection."""

    def __init__(self, conn: SshConnection, channel: int) -> None:
        self.conn = conn
        self.channel = channel
        self.inbox = Inbox()
        self._closed = False
        self.opened = trio.Event()
        self.open_error: str | None = None

    def _fail(self, reason: str) -> None:
        if not self.opened.is_set():
            self.open_error = reason
            self.opened.set()
        self.inbox.fail(reason)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("channel closed")
        out = await self.inbox.take(max_bytes)
        if out:
            client = self.conn.client
            client.consumed(self.channel, len(out))
            if client.has_output:
                await self.conn.flush()
        return out

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("channel closed")
        if self.inbox.error is not None:
            raise trio.BrokenResourceError(self.inbox.error)
        if data:
            try:
                self.conn.client.send_data(self.channel, bytes(data))
            except SshError as e:
                raise trio.BrokenResourceError(e.reason) from None
        await self.conn.flush()
        await self.wait_send_all_might_not_block()

    async def wait_send_all_might_not_block(self) -> None:
        while self.conn.client.pending_bytes(self.channel) > SEND_HIGH_WATER:
            if self.inbox.error is not None:
                raise trio.BrokenResourceError(self.inbox.error)
            await self.inbox.changed()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        if self.inbox.error is not None or self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            self.conn.client.send_eof(self.channel)
        except SshError as e:
            raise trio.BrokenResourceError(e.reason) from None
        await self.conn.flush()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self.conn.release(self)
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self.conn.flush(quiet=True)


class SshConnection(SharedConnection):
    """One SSH connection of a proxy (see the module doc) on `transport`
    (the stream to the server, which it owns); the driver task it starts
    after the handshake reads it until the connection ends."""

    def __init__(self, name: str, stream: trio.abc.Stream, client: SshClient) -> None:
        super().__init__(stream)
        self.name = name
        self.client = client
        self.channels: dict[int, SshChannel] = {}
        self._idle_since = trio.current_time()
        self._probe_deadline = math.inf
        self._timer: trio.CancelScope | None = None

    @property
    def usable(self) -> bool:
        return self.closed_reason is None

    async def flush(self, *, quiet: bool = False) -> None:
        """Send what the client has queued. The lock keeps one writer on the
        stream; whoever holds it sends everything queued so far. Nothing
        queued: no lock, no scheduler turn (the driver asks after every read)."""
        if not self.client.has_output:
            return
        async with self._send_lock:
            data = self.client.data_to_send()
            if not data or self.closed_reason is not None:
                return
            try:
                await self._send((data,))
            except trio.BrokenResourceError:
                if not quiet:
                    raise

    async def handshake(self) -> None:
        """Version exchange, keys, auth; in the caller's task and deadline.
        OutboundError with the reason if it fails (the stream is closed)."""
        try:
            await self.flush()
            while not self.client.ready:
                data = await self.transport.receive_some(READ_SIZE)
                self.client.receive_data(bytes(data))
                await self.flush()
            while self.client.next_event() is not None:
                pass
        except SshError as e:
            await trio.aclose_forcefully(self.transport)
            raise OutboundError(f"{self.name}: {e.reason}") from None
        except BaseException:
            await trio.aclose_forcefully(self.transport)
            raise
        log.debug("%s: SSH connected (%s, %s)", self.name, self.client.negotiated.get("c2s"),
                  self.client.negotiated.get("host_key"))
        trio.lowlevel.spawn_system_task(self.drive, name=f"ssh {self.name}")

    async def open_channel(self, host: str | IPAddress, port: int) -> SshChannel:
        """A direct-tcpip channel to host:port (OutboundError if refused)."""
        local = self.client.open_direct_tcpip(str(host), port)
        channel = self.channels[local] = SshChannel(self, local)
        try:
            await self.flush()
            await channel.opened.wait()
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                if not channel.opened.is_set():
                    await self.probe()
            await channel.aclose()
            raise
        if channel.open_error is not None:
            self.channels.pop(local, None)
            raise OutboundError(f"{self.name} {host}:{port}: {channel.open_error}")
        return channel

    def release(self, channel: SshChannel) -> None:
        self.client.close_channel(channel.channel)
        if self.channels.get(channel.channel) is channel and not channel.opened.is_set():
            return  # the open answer is still to come; it closes the channel
        self.channels.pop(channel.channel, None)
        if not self.channels:
            self._idle_since = trio.current_time()

    def _ended(self, reason: str) -> None:
        for channel in list(self.channels.values()):
            channel._fail(f"{self.name}: SSH connection lost: {reason}")
        self.channels.clear()

    async def _read(self) -> None:
        try:
            while self.closed_reason is None:
                deadline = min(self._idle_since + IDLE_TIMEOUT, self._probe_deadline)
                with trio.move_on_at(deadline) as timer:
                    self._timer = timer
                    data = await self.transport.receive_some(READ_SIZE)
                self._timer = None
                if timer.cancelled_caught:
                    if trio.current_time() >= self._probe_deadline:
                        log.warning("%s: the SSH server stopped answering (no reply to a "
                                    "keepalive in %gs): connection closed", self.name,
                                    PROBE_TIMEOUT)
                        self.end("the server stopped answering")
                        return
                    if self.channels:
                        self._idle_since = trio.current_time()
                        continue
                    self.client.disconnect()
                    await self.flush(quiet=True)
                    self.end("idle")
                    log.debug("%s: SSH connection idle for %gs, closed", self.name,
                              IDLE_TIMEOUT)
                    return
                self._probe_deadline = math.inf  # it answered
                self.client.receive_data(bytes(data))
                self._handle_events()
                await self.flush(quiet=True)
        except SshError as e:
            self.end(e.reason)
            log.info("%s: SSH connection ended: %s", self.name, e.reason)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self.end(f"read failed: {e}")
            log.info("%s: SSH connection ended: %s", self.name, e)
        except Exception:
            # A bug here must end this connection, not the appliance (this is
            # a system task: what it raises would crash the whole run).
            log.exception("%s: SSH connection failed", self.name)
            self.end("internal error")

    async def probe(self) -> None:
        """A channel open went unanswered (the flow gave up): ask the server
        for any reply; none within PROBE_TIMEOUT ends the connection, so the
        flows after it get a new one instead of the same silence."""
        if self.closed_reason is not None or self._probe_deadline != math.inf:
            return
        self.client.send_keepalive()
        self._probe_deadline = trio.current_time() + PROBE_TIMEOUT
        if self._timer is not None:
            self._timer.deadline = min(self._timer.deadline, self._probe_deadline)
        await self.flush(quiet=True)

    def _handle_events(self) -> None:
        while (event := self.client.next_event()) is not None:
            if isinstance(event, Ready):
                continue
            channel = self.channels.get(event.channel)
            if channel is None:
                continue
            if isinstance(event, ChannelData):
                channel.inbox.put(event.data)
            elif isinstance(event, ChannelOpened):
                channel.opened.set()
                if channel._closed:  # given up on while it opened
                    self.client.close_channel(event.channel)
                    self.channels.pop(event.channel, None)
            elif isinstance(event, ChannelOpenFailed):
                channel._fail(event.reason)
                self.channels.pop(event.channel, None)
            elif isinstance(event, ChannelEof):
                channel.inbox.end()
            elif isinstance(event, ChannelClosed):
                channel.inbox.end()
                self.channels.pop(event.channel, None)
                if not self.channels:
                    self._idle_since = trio.current_time()
            elif isinstance(event, ChannelWritable):
                channel.inbox.wake()


class SshOutbound:
    """One `type: ssh` proxy (see the module doc). Owns its live
    `SshConnection` (at most one)."""

    type = "Ssh"
    carries_udp = False

    def __init__(self, name: str, server: str, port: int, options: SshOptions, *,
                 dial: ServerDial, connect_timeout: float) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.options = options
        self.connect_timeout = connect_timeout
        self._dial = dial
        self._key: PrivateKey | None = None
        if options.private_key is not None:
            # Checked by the loader; loaded once here (bcrypt rounds are slow).
            self._key = load_private_key(options.private_key.encode(),
                                         options.private_key_passphrase)
        self._host_keys = tuple(public_key_blob(k) for k in options.host_keys)
        # With pinned keys, offer only their algorithms: a server that also
        # has an ed25519 key would otherwise show that one and fail the pin
        # of its RSA key (what OpenSSH's known_hosts ordering avoids too).
        self._algorithms = options.host_key_algorithms or algorithms_for(self._host_keys)
        self._conn: SshConnection | None = None
        self._lock = trio.Lock()
        self._attempts = 0
        self._failure: OutboundError | None = None

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> SshOutbound:
        assert isinstance(p.options, SshOptions)
        dialer = env.server_dialer()
        return cls(p.name, p.server, p.port, p.options, dial=env.server_dial(dialer),
                   connect_timeout=env.connect_timeout)

    async def _connect(self) -> SshConnection:
        stream = await self._dial(self.server, self.port)
        client = SshClient(self.options.username, password=self.options.password,
                           private_key=self._key, host_keys=self._host_keys,
                           host_key_algorithms=self._algorithms,
                           client_version=client_version())
        conn = SshConnection(self.name, stream, client)
        await conn.handshake()
        return conn

    async def connection(self) -> SshConnection:
        """The live connection, or a new one. Flows that waited for an
        attempt that failed get its error instead of trying again each."""
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        seen = self._attempts
        async with self._lock:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            if self._attempts != seen and self._failure is not None:
                raise self._failure
            self._conn = None
            self._attempts += 1
            self._failure = None
            try:
                conn = await self._connect()
            except OutboundError as e:
                self._failure = e
                raise
            self._conn = conn
            return conn

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        with outbound_deadline(self.connect_timeout, f"{self.name} {host}:{port}"):
            conn = await self.connection()
            return await conn.open_channel(host, port)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        return await no_udp(self.name)
