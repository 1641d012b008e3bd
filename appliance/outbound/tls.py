"""TLS to a proxy server, the layer every TLS protocol rides on.

`TlsClient` is built once per outbound from its `TlsOptions`
(appliance/config/protocols/common.py) and wraps any trio stream to the
server (a marked TCP connection, or another outbound's tunnel for
`dialer-proxy`) in one `trio.SSLStream` (stdlib ssl):

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
  ssl sends OpenSSL's ClientHello. The loader says so once at load.
- REALITY (`reality-opts`) needs a TLS stack that sets the session ID and
  verifies the server's temporary certificate; stdlib ssl does neither.
  `unsupported_tls` names such options so the loader refuses the proxy at
  load instead of at flow time.

Trust: the system store (`ssl.create_default_context`), which honours
`SSL_CERT_FILE` / `SSL_CERT_DIR` (how the lab trusts its CA).

Failures become OutboundError with the reason: "certificate verify failed:
<OpenSSL's reason>", "fingerprint mismatch: ...", "TLS handshake failed:
...", "server closed the connection during the TLS handshake". The wrapped
stream is closed on any failure; no deadline of its own (the outbound's
connect deadline bounds it).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl

import trio

from appliance.config.protocols.common import TlsOptions
from appliance.outbound.base import OutboundError

# What TLS can be carrying: plain TCP-like streams, HTTP/1.1 (ws, http) or
# HTTP/2 (grpc, h2). The transport's need overrides the configured `alpn`.
ALPN_HTTP1 = ("http/1.1",)
ALPN_H2 = ("h2",)


def unsupported_tls(tls: TlsOptions | None) -> str | None:
    """Why these TLS options cannot be carried out by this layer (None: they
    can). The loader skips such a proxy with this reason."""
    if tls is not None and tls.reality is not None:
        return "reality-opts (REALITY needs a TLS stack that sets the session ID; stdlib ssl "\
            "cannot)"
    return None


def _describe_ssl_error(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed: {e.reason or e}"
    return f"TLS handshake failed: {e}"


class TlsClient:
    """The TLS side of one outbound: one SSLContext (made once: loading the
    trust store costs milliseconds), the name to send and verify, and the
    pin. `wrap` is per connection."""

    def __init__(self, tls: TlsOptions, server: str, *,
                 alpn: tuple[str, ...] | None = None) -> None:
        """`server` is the proxy's `server` (name or IP literal); `alpn`
        overrides `tls.alpn` when the transport needs a protocol."""
        reason = unsupported_tls(tls)
        if reason is not None:
            raise ValueError(reason)
        self.options = tls
        name = tls.sni or server.strip("[]")
        # An IP literal as server_hostname: Python sends no SNI and checks
        # the IP SAN, which is what mihomo does for an IP server.
        self.server_hostname = name
        self.pin = bytes.fromhex(tls.fingerprint) if tls.fingerprint else None
        ctx = ssl.create_default_context()
        if tls.skip_cert_verify or self.pin is not None:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        protocols = alpn if alpn is not None else tls.alpn
        if protocols:
            ctx.set_alpn_protocols(list(protocols))
        self.context = ctx

    async def wrap(self, stream: trio.abc.Stream, what: str) -> trio.SSLStream[trio.abc.Stream]:
        """The handshake over `stream`; returns the TLS stream (which owns
        `stream`). `what` starts the error text (the outbound's name).
        Closes `stream` and raises OutboundError on any failure."""
        tls = trio.SSLStream(stream, self.context, server_hostname=self.server_hostname)
        try:
            await tls.do_handshake()
            if self.pin is not None:
                self._check_pin(tls, what)
        except trio.BrokenResourceError as e:
            await trio.aclose_forcefully(tls)
            cause = e.__cause__
            if isinstance(cause, ssl.SSLError):
                raise OutboundError(f"{what}: {_describe_ssl_error(cause)}") from None
            if cause is None:
                raise OutboundError(
                    f"{what}: server closed the connection during the TLS handshake") from None
            raise OutboundError(f"{what}: TLS handshake failed: {cause}") from None
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls

    def _check_pin(self, tls: trio.SSLStream[trio.abc.Stream], what: str) -> None:
        assert self.pin is not None
        der = tls.getpeercert(binary_form=True)
        got = hashlib.sha256(der).digest() if der else b""
        if not hmac.compare_digest(got, self.pin):
            raise OutboundError(
                f"{what}: fingerprint mismatch: the server's certificate has SHA-256 "
                f"{got.hex() or 'none'}, the profile pins {self.pin.hex()}")
