"""REALITY (`reality-opts`) as the TLS layer of a VLESS, Trojan or VMess
outbound: the thin trio side of appliance/proto/reality.py and
appliance/proto/tls13.py.

`RealityTls` is built once per outbound (TlsClient delegates to it when
the options carry `reality-opts`); `wrap` runs one handshake over a
stream to the server and returns a `RealityStream`. The SNI is `sni` /
`servername` (it must be one of the server's `server_names`), else the
server name; an IP literal sends no SNI, which a REALITY server refuses.

Failures are OutboundError with the reason, and the flow fails at once
(no browser-like fallback traffic as mihomo sends): "REALITY: not
authenticated by the REALITY server (...): it answered with a certificate
for CN=..." when the server did not take our authentication (wrong
public-key or short-id: REALITY then relays us to its cover site, whose
real certificate arrives), "REALITY: the server sent alert ...", "server
closed the connection during the TLS handshake". No deadline of its own:
the outbound's connect deadline bounds it.
"""

from __future__ import annotations

import trio

from appliance import streamio
from appliance.config.protocols.common import RealityOptions
from appliance.outbound.tlslayer import (
    DEFAULT_RECEIVE,
    TRANSPORT_READ,
    TlsLayer,
    handshake_or_close,
)
from appliance.proto.reality import parse_public_key, parse_short_id, reality_client
from appliance.proto.tls13 import Tls13Client, Tls13Error


class RealityTls:
    """The REALITY side of one outbound: the server's key, the short id,
    the name to send, the ALPN to offer."""

    def __init__(self, options: RealityOptions, server_name: str | None,
                 alpn: tuple[str, ...]) -> None:
        self.public_key = parse_public_key(options.public_key)
        self.short_id = parse_short_id(options.short_id)
        self.pq = options.support_x25519mlkem768
        self.server_name = server_name
        # Chrome offers h2 and http/1.1; a transport's own need wins.
        self.alpn = alpn or ("h2", "http/1.1")

    async def wrap(self, stream: trio.abc.Stream, what: str) -> RealityStream:
        """The handshake over `stream`; returns the stream (which owns
        `stream`). Closes `stream` and raises OutboundError on failure."""
        client = reality_client(self.server_name, self.public_key, self.short_id,
                                pq=self.pq, alpn=self.alpn)
        tls = RealityStream(stream, client)

        def describe(e: BaseException) -> str | None:
            if isinstance(e, Tls13Error):
                return f"{what}: REALITY: {e}"
            if isinstance(e, trio.BrokenResourceError | OSError):
                return f"{what}: REALITY handshake failed: {e}"
            return None

        await handshake_or_close(tls, describe)
        return tls


class RealityStream(TlsLayer):
    """TLS 1.3 (appliance/proto/tls13.py) over `transport_stream`; owns it.
    One receive returns every record the last transport read completed;
    a receive and a send may run at once (bytes for the transport go out
    under one lock, in the order the client produced them)."""

    def __init__(self, transport_stream: trio.abc.Stream, client: Tls13Client) -> None:
        super().__init__(transport_stream)
        self.client = client
        self._ready: list[bytes] = []

    def selected_alpn_protocol(self) -> str | None:
        return self.client.alpn

    async def _flush(self, extra: bytes = b"") -> None:
        async with self._send_lock:
            data = self.client.data_to_send() + extra
            if data:
                await streamio.send_all(self.transport_stream, data)

    async def _fill(self) -> None:
        data = await streamio.receive_some(self.transport_stream, TRANSPORT_READ)
        if not data:
            if not self.client.handshake_complete:
                raise trio.BrokenResourceError(
                    "server closed the connection during the TLS handshake")
            self._eof = True  # a ragged EOF is an EOF, as Go's TLS treats it
        self.client.receive_data(data)

    async def do_handshake(self) -> None:
        """The client handshake; Tls13Error, OSError or BrokenResourceError."""
        await streamio.send_all(self.transport_stream, self.client.start())
        while not self.client.handshake_complete:
            await self._fill()
            while (record := self.client.next_record()) is not None:
                if record:
                    self._ready.append(record)
                if not record or self.client.handshake_complete:
                    break
        # The Finished waits for the first send (or a receive), as in
        # TlsStream.do_handshake.

    async def receive_record(self) -> bytes:
        """The plaintext of the next application-data record (b"" at the
        end): Vision reads record by record (outbound/vless.py)."""
        if self._ready:
            return self._ready.pop(0)
        while True:
            try:
                record = self.client.next_record()
            except Tls13Error as e:
                raise trio.BrokenResourceError(f"TLS: {e}") from e
            if self.client.has_data_to_send:
                await self._flush()
            if record is not None:
                return record
            if self._eof:
                return b""
            await self._fill()

    def take_buffered(self) -> bytes:
        """What was read from the transport but is not TLS records yet
        (Vision's switch to the raw connection)."""
        data = b"".join(self._ready) + self.client.take_unprocessed()
        self._ready.clear()
        return data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        want = DEFAULT_RECEIVE if max_bytes is None else max_bytes
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            chunks, got = self._ready, sum(map(len, self._ready))
            self._ready = []
            try:
                while got < want:
                    record = self.client.next_record()
                    if not record:
                        break
                    chunks.append(record)
                    got += len(record)
            except Tls13Error as e:
                raise trio.BrokenResourceError(f"TLS: {e}") from e
            if self.client.has_data_to_send:
                await self._flush()
            if chunks:
                data = b"".join(chunks)
                if len(data) > want:
                    self._ready.append(data[want:])
                    data = data[:want]
                return data
            if self._eof or self.client.closed:
                return b""
            await self._fill()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        async with self._send_lock:
            out = self.client.data_to_send() + self.client.encrypt(data)
            await streamio.send_all(self.transport_stream, out)

    def _close_notify(self) -> bytes:
        return self.client.close_notify() if self.client.handshake_complete else b""
