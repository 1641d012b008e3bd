"""A proxy port's handshake, without I/O: bytes in, events out.

One `Handshake` per client connection. The service feeds it what the
client sends (`receive_data`, empty bytes for EOF), sends what
`data_to_send()` holds after every event, and acts on the event:

- `NeedMore`: read more bytes;
- `Ask`: the client asks for a target (SOCKS5 CONNECT, HTTP CONNECT, or an
  absolute-URI HTTP request to forward); the service dials it, then sends
  `accept(bound)` or the reply of `refuse(refusal, why)`;
- `UdpAssociate`: a SOCKS5 UDP ASSOCIATE; the service binds a relay socket
  and sends `accept(relay address)` (or refuses);
- `Refuse`: send `reply` (the protocol's error answer, possibly empty) and
  close; `linger` says the client may still be sending and the connection
  must half-close and drain first, or a reset would destroy the reply.

Protocols are told apart by the first byte (RFC 1928 starts with the
version byte; no HTTP method starts with 0x04 or 0x05): 0x05 is SOCKS5
(RFC 1928, username/password per RFC 1929 when `Authenticator.required`;
BIND is refused "command not supported"), 0x04 is SOCKS4/4a, refused with
its own reject reply (91) so the client reports "request rejected" instead
of hanging; anything else is an HTTP/1.x proxy request (Basic
Proxy-Authorization when required). A port that serves one of the two
refuses the other: an HTTP port answers 400, a SOCKS port closes.

The protocol cores are appliance/proto/socks5.py (`Socks5Server`) and
appliance/proto/http_connect.py (`parse_request`); this adds sniffing,
authentication and one vocabulary of refusals (`Refusal`) that maps to
SOCKS5 reply codes and HTTP statuses alike. Nothing here imports trio.

How it fails: never by raising for the client's bytes (the fuzz tests in
tests/unit/test_proxyport_handshake.py hold it to that): every malformed,
unauthenticated or unsupported request becomes a `Refuse` event. Bounded:
an HTTP head longer than `max_head` is refused (431); SOCKS5 messages are
bounded by their format.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from appliance.proto import socks5 as s5
from appliance.proto.http_connect import (
    DEFAULT_MAX_HEAD,
    HttpConnectError,
    ProxyRequest,
    parse_request,
)
from appliance.proto.http_proxy import CONNECT_OK, PROXY_AUTH_REQUIRED, http_error

Sniffed = Literal["socks5", "socks4", "http"]


def sniff(first: int) -> Sniffed:
    """Which protocol a connection speaks, from its first byte."""
    if first == s5.VERSION:
        return "socks5"
    if first == 0x04:
        return "socks4"
    return "http"


# SOCKS4 reply: VN=0, CD=91 "request rejected or failed", port and IP zero.
SOCKS4_REJECT = bytes([0x00, 0x5B, 0, 0, 0, 0, 0, 0])
# RFC 1928: "X'FF' NO ACCEPTABLE METHODS"; RFC 1929: status != 0 is failure.
SOCKS_NO_METHOD = s5.encode_method_selection(s5.METHOD_NO_ACCEPTABLE)
SOCKS_AUTH_FAILED = s5.encode_userpass_status(False)


class Authenticator:
    """The users of `authentication: ["user:pass"]`. Empty: no auth asked.

    Every configured user is compared in constant time, so the answer's
    timing does not tell which names exist."""

    def __init__(self, users: Iterable[tuple[str, str]] = ()) -> None:
        self._users = tuple((u.encode(), p.encode()) for u, p in users)

    @property
    def required(self) -> bool:
        return bool(self._users)

    def check(self, username: str, password: str) -> bool:
        u, p = username.encode(), password.encode()
        ok = False
        for user, pw in self._users:
            ok |= hmac.compare_digest(u, user) & hmac.compare_digest(p, pw)
        return ok


# -- refusals: one vocabulary for SOCKS replies and HTTP statuses ----------------

Refusal = Literal[
    "unmapped", "rejected", "refused", "timeout", "unreachable", "bad-target", "unsupported"
]

SOCKS_REPLY: dict[Refusal, int] = {
    "unmapped": s5.REP_HOST_UNREACHABLE,
    "rejected": s5.REP_NOT_ALLOWED,
    "refused": s5.REP_CONNECTION_REFUSED,
    "timeout": s5.REP_HOST_UNREACHABLE,
    "unreachable": s5.REP_HOST_UNREACHABLE,
    "bad-target": s5.REP_GENERAL_FAILURE,
    "unsupported": s5.REP_COMMAND_NOT_SUPPORTED,
}
HTTP_STATUS: dict[Refusal, int] = {
    "unmapped": 502,
    "rejected": 403,
    "refused": 502,
    "timeout": 504,
    "unreachable": 502,
    "bad-target": 400,
    "unsupported": 501,
}


def classify_dial_error(reason: str) -> Refusal:
    """Map an outbound's failure text (OutboundError.reason) to a refusal."""
    text = reason.lower()
    if text == "rejected":  # RejectOutbound's exact reason
        return "rejected"
    if "timed out" in text or "no connection within" in text:
        return "timeout"
    if "refused" in text:
        return "refused"
    return "unreachable"


class Refused(Exception):
    """A request the service answers with an error and closes: `refusal`
    picks the reply (Handshake.refuse), `why` is for the log and the HTTP
    error body."""

    def __init__(self, refusal: Refusal, why: str) -> None:
        super().__init__(why)
        self.refusal = refusal
        self.why = why


# -- events -------------------------------------------------------------------------


@dataclass(frozen=True)
class NeedMore:
    """Nothing to act on yet: send `data_to_send()`, then read more."""


NEED_MORE = NeedMore()


@dataclass(frozen=True)
class Ask:
    """The client asks for `host`:`port`. `command` "connect" is a tunnel
    (SOCKS5 or HTTP CONNECT); "forward" is an absolute-URI HTTP request,
    `request` (see appliance.proto.http_proxy.forwarding). `rest` are the
    client's bytes after the request: tunnel data or the request body."""

    host: s5.Host
    port: int
    command: Literal["connect", "forward"]
    request: ProxyRequest | None = None
    rest: bytes = b""


@dataclass(frozen=True)
class UdpAssociate:
    """A SOCKS5 UDP ASSOCIATE. `host`:`port` is where the client says it
    will send from (RFC 1928: zeros when it does not know yet)."""

    host: s5.Host
    port: int


@dataclass(frozen=True)
class Refuse:
    """Send `reply` (may be empty) and close, after draining the client
    for a moment when `linger`. `why` and `level` are for the log."""

    reply: bytes
    why: str
    linger: bool = False
    level: int = logging.INFO


Event = NeedMore | Ask | UdpAssociate | Refuse

_State = Literal["sniff", "socks5", "http", "asked", "done"]


class Handshake:
    """One client connection's handshake on a port that speaks SOCKS5
    (`socks`), HTTP (`http`) or both. See the module doc for the events.

    After `Ask` or `UdpAssociate`, answer once with `accept` or `refuse`;
    after `Refuse` the handshake is over. Feeding bytes after the last event
    raises RuntimeError (a bug in the caller, not the client's doing).
    Owns no resources.
    """

    def __init__(
        self,
        *,
        socks: bool = True,
        http: bool = True,
        auth: Authenticator | None = None,
        max_head: int = DEFAULT_MAX_HEAD,
    ) -> None:
        self.socks = socks
        self.http = http
        self.auth = auth if auth is not None else Authenticator()
        self.max_head = max_head
        self.state: _State = "sniff"
        self._socks: s5.Socks5Server | None = None
        self._buf = bytearray()
        self._out = bytearray()
        self._ask: Ask | UdpAssociate | None = None
        # The user who authenticated (mihomo's IN-USER); empty without auth.
        self.user = ""

    @property
    def speaks_socks5(self) -> bool:
        """The client spoke SOCKS5 (else HTTP, once sniffed)."""
        return self._socks is not None

    def data_to_send(self) -> bytes:
        """Bytes to send to the client now (SOCKS5 method selection, auth
        status); a `Refuse` carries its own."""
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive_data(self, data: bytes | bytearray) -> Event:
        """Feed the client's bytes (empty: the client closed)."""
        if self.state in ("asked", "done"):
            raise RuntimeError(f"receive_data() after the handshake ({self.state})")
        if not data:
            return self._refuse(b"", "client closed before a complete request", logging.DEBUG)
        if self.state == "sniff":
            return self._sniff(bytes(data))
        if self.state == "socks5":
            return self._socks_data(bytes(data))
        self._buf += data
        return self._http_head()

    # -- answers --------------------------------------------------------------------

    @property
    def reply_names_address(self) -> bool:
        """Whether `accept` sends the bound address (SOCKS5 does; HTTP has
        no place for it), so the caller looks it up only then."""
        return self._socks is not None

    def accept(self, host: s5.Host = "0.0.0.0", port: int = 0) -> bytes:
        """The success answer to `Ask`/`UdpAssociate`: the SOCKS5 reply with
        the bound address (`host`, `port`), "200 Connection established"
        for HTTP CONNECT, nothing for a forwarded request (the origin's
        response is the answer)."""
        ask = self._answering()
        self.state = "done"
        if self._socks is not None:
            self._socks.reply(s5.REP_SUCCEEDED, host, port)
            return self._socks.data_to_send()
        if isinstance(ask, Ask) and ask.command == "connect":
            return CONNECT_OK
        return b""

    def refuse(self, refusal: Refusal, why: str) -> Refuse:
        """The error answer to `Ask`/`UdpAssociate`: the SOCKS5 reply code
        or the HTTP status (`why` as its body) that `refusal` maps to."""
        self._answering()
        if self._socks is not None:
            self._socks.reply(SOCKS_REPLY[refusal])
            return self._refuse(self._socks.data_to_send(), why, logging.WARNING)
        return self._refuse(
            http_error(HTTP_STATUS[refusal], why), why, logging.WARNING, linger=True
        )

    def _answering(self) -> Ask | UdpAssociate:
        if self.state != "asked" or self._ask is None:
            raise RuntimeError("accept()/refuse() without a request to answer")
        return self._ask

    # -- the protocols ------------------------------------------------------------------

    def _refuse(self, reply: bytes, why: str, level: int, *, linger: bool = False) -> Refuse:
        self.state = "done"
        self._out.clear()
        return Refuse(reply, why, linger, level)

    def _sniff(self, data: bytes) -> Event:
        kind = sniff(data[0])
        if kind == "socks4" and self.socks:
            return self._refuse(SOCKS4_REJECT, "SOCKS4 request refused (only SOCKS5 is served)",
                                logging.INFO)
        if kind == "socks5" and self.socks:
            self.state = "socks5"
            self._socks = s5.Socks5Server(require_auth=self.auth.required)
            return self._socks_data(data)
        if self.http:
            if kind != "http":
                why = f"{kind} on an HTTP-only proxy port"
                return self._refuse(http_error(400, why), why, logging.INFO, linger=True)
            self.state = "http"
            self._buf += data
            return self._http_head()
        return self._refuse(b"", f"not SOCKS5 (first byte {data[0]:#04x}); closing", logging.INFO)

    def _socks_data(self, data: bytes) -> Event:
        server = self._socks
        assert server is not None
        try:
            event = server.receive_data(data)
            while isinstance(event, s5.AuthRequest):
                self._out += server.data_to_send()
                if not self.auth.check(event.username, event.password):
                    server.auth_result(False)
                    return self._refuse(self.data_to_send() + server.data_to_send(),
                                        "SOCKS5 username/password refused", logging.WARNING)
                self.user = event.username
                event = server.auth_result(True)
        except s5.Socks5Error as err:
            reply = self.data_to_send() + server.data_to_send() + _socks_error_bytes(server, err)
            return self._refuse(reply, f"bad SOCKS5 request: {err}", logging.INFO, linger=True)
        self._out += server.data_to_send()
        if event is None:
            return NEED_MORE
        if event.command == s5.CMD_CONNECT:
            self._ask = Ask(event.host, event.port, "connect", rest=server.trailing_data)
        elif event.command == s5.CMD_UDP_ASSOCIATE:
            self._ask = UdpAssociate(event.host, event.port)
        else:
            server.reply(s5.REP_COMMAND_NOT_SUPPORTED)
            return self._refuse(self.data_to_send() + server.data_to_send(),
                                "SOCKS5 BIND is not supported", logging.INFO)
        self.state = "asked"
        return self._ask

    def _http_head(self) -> Event:
        try:
            parsed = parse_request(self._buf, self.max_head)
        except HttpConnectError as err:
            why = str(err)
            return self._refuse(http_error(err.status, why), f"bad HTTP proxy request: {why}",
                                logging.INFO, linger=True)
        if parsed is None:
            return NEED_MORE
        req, end = parsed
        if self.auth.required:
            creds = req.credentials()
            if creds is None or not self.auth.check(*creds):
                user = "" if creds is None else f" (user {creds[0]!r})"
                return self._refuse(PROXY_AUTH_REQUIRED,
                                    f"HTTP proxy request without valid credentials{user}",
                                    logging.WARNING, linger=True)
            self.user = creds[0]
        command: Literal["connect", "forward"] = "connect" if req.method == "CONNECT" else "forward"
        self._ask = Ask(req.host, req.port, command, request=req, rest=bytes(self._buf[end:]))
        self._buf.clear()
        self.state = "asked"
        return self._ask


def _socks_error_bytes(server: s5.Socks5Server, err: s5.Socks5Error) -> bytes:
    """The reply that fits the stage the SOCKS5 handshake failed in."""
    state = server.state
    if state is s5.ServerState.GREETING:
        return SOCKS_NO_METHOD
    if state is s5.ServerState.CLOSED:
        return b""  # the state machine already queued its answer (0xFF)
    if state is s5.ServerState.AUTH:
        return SOCKS_AUTH_FAILED
    return s5.encode_reply(err.reply)
