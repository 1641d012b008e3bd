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
import ssl

import trio

from appliance.config.protocols.common import TlsOptions
from appliance.outbound.base import OutboundError
from appliance.outbound.reality import RealityStream, RealityTls

# What TLS can be carrying: plain TCP-like streams, HTTP/1.1 (ws, http) or
# HTTP/2 (grpc, h2). The transport's need overrides the configured `alpn`.
ALPN_HTTP1 = ("http/1.1",)
ALPN_H2 = ("h2",)
# One read of the transport: several records per wakeup.
TRANSPORT_READ = 1 << 18
# receive_some(None): what one call returns at most.
DEFAULT_RECEIVE = 1 << 16


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
    name to send and verify, and the pin. `wrap` is per connection."""

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
        self.reality = (RealityTls(tls.reality, tls.sni or _sni_name(server),
                                   alpn if alpn is not None else tls.alpn)
                        if tls.reality is not None else None)

    async def wrap(self, stream: trio.abc.Stream, what: str) -> TlsStream | RealityStream:
        """The handshake over `stream`; returns the TLS stream (which owns
        `stream`). `what` starts the error text (the outbound's name).
        Closes `stream` and raises OutboundError on any failure."""
        if self.reality is not None:
            return await self.reality.wrap(stream, what)
        tls = TlsStream(stream, self.context, self.server_hostname)
        try:
            await tls.do_handshake()
            if self.pin is not None:
                self._check_pin(tls, what)
        except ssl.SSLError as e:
            await trio.aclose_forcefully(tls)
            if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError):
                raise OutboundError(
                    f"{what}: server closed the connection during the TLS handshake") from None
            raise OutboundError(f"{what}: {_describe_ssl_error(e)}") from None
        except BaseException:
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


class TlsStream(trio.abc.Stream):
    """A TLS client over `transport_stream` (see the module doc). Owns it.

    A receive and a send may run at once (the gateway's two directions):
    OpenSSL calls never await, and bytes for the transport go out under
    one lock in the order OpenSSL produced them (a receive that made
    OpenSSL answer the server, e.g. a KeyUpdate, sends under it too).
    """

    def __init__(self, transport_stream: trio.abc.Stream, context: ssl.SSLContext,
                 server_hostname: str) -> None:
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing,
                                     server_hostname=server_hostname)
        self._send_lock = trio.Lock()
        self._eof = False
        self._closed = False

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                await self.transport_stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.transport_stream.receive_some(TRANSPORT_READ)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        """The client handshake; ssl.SSLError (a verify failure is an
        SSLCertVerificationError), OSError or BrokenResourceError if not."""
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            await self._flush()
            return

    def getpeercert(self) -> bytes | None:
        """The server's certificate, DER."""
        return self._ssl.getpeercert(binary_form=True)

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
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
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._eof:
                return b""
            await self._fill()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        async with self._send_lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[self._ssl.write(view):]
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS: {e.reason or e}") from e
            out = self._outgoing.read()
            if out:
                await self.transport_stream.send_all(out)
            else:
                await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """close_notify if it can go out at once (best effort), then the
        transport closes."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if not self._send_lock.locked():
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()
                with trio.move_on_after(1):
                    await self._flush()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport_stream.aclose()
