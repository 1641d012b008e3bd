"""TLS to a proxy server, the layer every TLS protocol rides on.

`TlsClient` is built once per outbound from its `TlsOptions`
(appliance/config/protocols/common.py) and wraps any trio stream to the
server (a marked TCP connection, or another outbound's tunnel for
`dialer-proxy`) in one `TlsStream` (stdlib ssl):

- `sni`: the name sent and verified; default the server name. For a server
  given as an IP literal no SNI is sent (as Go's TLS, and so mihomo, does)
  and the certificate is checked against the address's IP SAN.
- `alpn`: offered as given; a transport that needs one protocol (HTTP/2
  for grpc and h2, HTTP/1.1 for ws) says so and that wins, as mihomo does.
- `skip-cert-verify`: no chain or name check at all.
- `fingerprint`: the SHA-256 of the leaf certificate (DER) must match. As
  in mihomo (component/ca: a fingerprint sets InsecureSkipVerify and checks
  the pin), the pin replaces the chain check: a self-signed server can be
  pinned without trusting anything else.
- `client-fingerprint` (uTLS ClientHello imitation) has no effect: stdlib
  ssl sends OpenSSL's ClientHello (REALITY's client sends a Chrome-shaped
  one). The loader says so once at load.
- REALITY (`reality-opts`) needs a TLS stack that sets the session ID and
  verifies the server's temporary certificate; stdlib ssl does neither, so
  `TlsClient` hands such a proxy to appliance/outbound/reality.py (its own
  TLS 1.3 client), whose `RealityStream` stands in for the `TlsStream`.
  `unsupported_tls` names options no layer can carry out, so the loader
  refuses the proxy at load instead of at flow time (none today).

`TlsStream` is stdlib ssl's SSLObject between two memory BIOs, as
trio.SSLStream is, minus what costs a tunnel its throughput there: each
SSLStream.receive_some returns at most one TLS record (16 KiB) and is a
turn of the scheduler, so a bulk download spent most of its time in trio
(bench: ~100 MB/s through the gateway). Here one receive returns every
record the last read of the transport completed (up to `max_bytes`), a
transport read asks for 256 KiB, and a send is one write of all its
records. One TLS layer per flow; a ragged EOF (no close_notify) is an EOF,
as Go's TLS (the servers) treats it.

Trust: the system store (`ssl.create_default_context`), which honours
`SSL_CERT_FILE` / `SSL_CERT_DIR` (how the lab trusts its CA).

Failures become OutboundError with the reason: "certificate verify failed:
<OpenSSL's reason>", "fingerprint mismatch: ...", "TLS handshake failed:
...", "server closed the connection during the TLS handshake". The wrapped
stream is closed on any failure; no deadline of its own (the outbound's
connect deadline bounds it). After the handshake, TLS errors are
trio.BrokenResourceError (the flow ends).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import ipaddress
import math
import ssl
from collections.abc import Callable

import trio

from appliance import streamio
from appliance.config.protocols.common import TlsOptions
from appliance.outbound.base import OutboundError
from appliance.outbound.reality import RealityStream, RealityTls
from appliance.outbound.tlslayer import (
    DEFAULT_RECEIVE,
    TRANSPORT_READ,
    TlsLayer,
    handshake_or_close,
)

# What TLS can be carrying: plain TCP-like streams, HTTP/1.1 (ws, http) or
# HTTP/2 (grpc, h2). The transport's need overrides the configured `alpn`.
ALPN_HTTP1 = ("http/1.1",)
ALPN_H2 = ("h2",)
# How long a kept session is offered before a resumed connection's newer
# ticket replaces it. Reading a connection's session costs a copy of it
# (CPython serialises and parses it again, the server's certificate
# included: about a fifth of a resumed flow's CPU), so a resumed flow does
# not take its ticket while the kept one is younger than this. Well inside
# the lifetimes servers give their tickets (Go: 7 days; nginx: 5 minutes);
# an expired ticket is not offered (OpenSSL checks its lifetime), and a
# full handshake always hands its session.
SESSION_REFRESH = 60.0


def unsupported_tls(tls: TlsOptions | None) -> str | None:
    """Why these TLS options cannot be carried out by this layer (None: they
    can). The loader skips such a proxy with this reason."""
    return None


def _describe_ssl_error(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed: {e.reason or e}"
    return f"TLS handshake failed: {e}"


@functools.lru_cache(maxsize=32)
def client_context(verify: bool, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """The SSLContext for these settings, shared by every outbound that
    asks for the same: loading the system trust store costs ~0.1 s, paid
    once per process instead of once per proxy (a profile lists dozens).
    Per-connection state (the name, the session) lives in each SSLObject,
    so sharing is safe; a changed trust store is read at the next start."""
    if verify:
        ctx = ssl.create_default_context()
    else:
        # No trust store to load: nothing is verified.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _sni_name(server: str) -> str | None:
    """The SNI for a server given without `sni`: none for an IP literal."""
    try:
        ipaddress.ip_address(server.strip("[]"))
    except ValueError:
        return server
    return None


class TlsClient:
    """The TLS side of one outbound: its SSLContext (`client_context`), the
    name to send and verify, the pin, and the session to resume. `wrap` is
    per connection.

    Resumption: the newest session ticket the server sent (TLS 1.3 sends
    them after the handshake; a stream hands the session here once it has
    read the first data after them) is offered by the next handshakes, as
    mihomo's client session cache does (one entry per server name); a
    resumed connection replaces it only once it is SESSION_REFRESH old. A
    resumed handshake skips the server's certificate and its signature: on
    the 2-core VM, 360 against 460 us of client CPU (OpenSSL 3.0, memory
    BIOs). The session is one this client's own context made (same trust,
    same ALPN); a pinned session still carries the certificate it was made
    with, so the pin is checked on every connection. A server that does
    not take the ticket does a full handshake and sends a new one.
    """

    def __init__(self, tls: TlsOptions, server: str, *,
                 alpn: tuple[str, ...] | None = None) -> None:
        """`server` is the proxy's `server` (name or IP literal); `alpn`
        overrides `tls.alpn` when the transport needs a protocol."""
        reason = unsupported_tls(tls)
        if reason is not None:
            raise ValueError(reason)
        self.options = tls
        # An IP literal as server_hostname: Python sends no SNI and checks
        # the IP SAN, which is what mihomo does for an IP server.
        self.server_hostname = tls.sni or server.strip("[]")
        self.pin = bytes.fromhex(tls.fingerprint) if tls.fingerprint else None
        verify = not tls.skip_cert_verify and self.pin is None
        self.context = client_context(verify, alpn if alpn is not None else tls.alpn)
        # The session to offer, with the context that made it (only that
        # context may resume it; a test swaps `context`), and when it was
        # kept (trio.current_time()).
        self._session: tuple[ssl.SSLContext, ssl.SSLSession] | None = None
        self._session_kept = -math.inf
        self.reality = (RealityTls(tls.reality, tls.sni or _sni_name(server),
                                   alpn if alpn is not None else tls.alpn)
                        if tls.reality is not None else None)

    def _keep_session(self, context: ssl.SSLContext, session: ssl.SSLSession) -> None:
        """A stream's session with a ticket: the next handshakes offer it."""
        self._session = (context, session)
        self._session_kept = trio.current_time()

    async def wrap(self, stream: trio.abc.Stream, what: str) -> TlsStream | RealityStream:
        """The handshake over `stream`; returns the TLS stream (which owns
        `stream`). `what` starts the error text (the outbound's name).
        Closes `stream` and raises OutboundError on any failure."""
        if self.reality is not None:
            return await self.reality.wrap(stream, what)
        context = self.context
        kept = self._session
        session = kept[1] if kept is not None and kept[0] is context else None
        tls = TlsStream(stream, context, self.server_hostname, session=session,
                        on_session=functools.partial(self._keep_session, context))

        def describe(e: BaseException) -> str | None:
            if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError):
                return f"{what}: server closed the connection during the TLS handshake"
            if isinstance(e, ssl.SSLError):
                return f"{what}: {_describe_ssl_error(e)}"
            return None

        await handshake_or_close(tls, describe)
        if (session is not None and tls.session_reused
                and trio.current_time() - self._session_kept < SESSION_REFRESH):
            # Resumed with a young ticket: keep offering it (see SESSION_REFRESH).
            tls.keep_no_session()
        if self.pin is not None:
            try:
                self._check_pin(tls, what)
            except OutboundError:
                await trio.aclose_forcefully(tls)
                raise
        return tls

    def _check_pin(self, tls: TlsStream, what: str) -> None:
        assert self.pin is not None
        der = tls.getpeercert()
        got = hashlib.sha256(der).digest() if der else b""
        if not hmac.compare_digest(got, self.pin):
            raise OutboundError(
                f"{what}: fingerprint mismatch: the server's certificate has SHA-256 "
                f"{got.hex() or 'none'}, the profile pins {self.pin.hex()}")


class TlsStream(TlsLayer):
    """A TLS client over `transport_stream` (see the module doc). Owns it.

    A receive and a send may run at once (the gateway's two directions):
    OpenSSL calls never await, and bytes for the transport go out under
    one lock in the order OpenSSL produced them (a receive that made
    OpenSSL answer the server, e.g. a KeyUpdate, sends under it too).
    `session` is offered for resumption; `on_session` gets this
    connection's session once data came after the handshake (by then a
    TLS 1.3 server's tickets have been read) if it carries a ticket.
    """

    def __init__(self, transport_stream: trio.abc.Stream, context: ssl.SSLContext,
                 server_hostname: str, *, session: ssl.SSLSession | None = None,
                 on_session: Callable[[ssl.SSLSession], None] | None = None) -> None:
        super().__init__(transport_stream)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing,
                                     server_hostname=server_hostname, session=session)
        self._on_session = on_session

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                await streamio.send_all(self.transport_stream, data)

    async def _fill(self) -> None:
        data = await streamio.receive_some(self.transport_stream, TRANSPORT_READ)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        """The client handshake; ssl.SSLError (a verify failure is an
        SSLCertVerificationError), OSError or BrokenResourceError if not.

        The client's last flight (TLS 1.3: its Finished) is left in the
        outgoing buffer: the first send carries it with the protocol's
        request (one system call and one segment instead of two, and one
        wakeup of the server), and a receive sends it before it waits."""
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            return

    def getpeercert(self) -> bytes | None:
        """The server's certificate, DER."""
        return self._ssl.getpeercert(binary_form=True)

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    @property
    def session_reused(self) -> bool:
        return self._ssl.session_reused

    def keep_no_session(self) -> None:
        """Do not hand this connection's session to `on_session`."""
        self._on_session = None

    def _hand_session(self) -> None:
        """Once: this connection's session to `on_session`, if resumable."""
        on_session, self._on_session = self._on_session, None
        session = self._ssl.session
        if on_session is not None and session is not None and session.has_ticket:
            on_session(session)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        want = DEFAULT_RECEIVE if max_bytes is None else max_bytes
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            chunks: list[bytes] = []
            got = 0
            try:
                while got < want:
                    piece = self._ssl.read(want - got)
                    if not piece:
                        # The server's close_notify (CPython returns b"").
                        self._eof = True
                        break
                    chunks.append(piece)
                    got += len(piece)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS: {e.reason or e}") from e
            if self._outgoing.pending:
                await self._flush()
            if chunks:
                if self._on_session is not None:
                    self._hand_session()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._eof:
                return b""
            await self._fill()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        async with self._send_lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[self._ssl.write(view):]
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS: {e.reason or e}") from e
            out = self._outgoing.read()
            if out:
                await streamio.send_all(self.transport_stream, out)
            else:
                await trio.lowlevel.checkpoint()

    def _close_notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()
        return self._outgoing.read()
