"""SOCKS5 (RFC 1928) with username/password auth (RFC 1929), without I/O.

What this is for: the SOCKS5 outbound (client side) and, later, the mixed
port (server side). Bytes go in through `receive_data`, bytes to send come out
of `data_to_send`; nothing here imports trio, so every state and every parser
is testable with plain byte strings (tests/unit/test_socks5*.py).

Addresses: a target given as a *name* is sent as ATYP=3 (domain) so that the
proxy resolves it -- the whole point of fake IPs (RFC 3089, step 5: the
gateway never resolves). IP literals, given as `ipaddress` objects or as
strings that parse as one, go out as ATYP=1 (IPv4) or ATYP=4 (IPv6).

How it fails: every malformed or refused input raises `Socks5Error`, which
carries the RFC 1928 reply code a server would answer with (`reply`). No parser
raises IndexError, UnicodeError, struct.error or ValueError for bad bytes; the
fuzz tests hold them to that. Incremental parsers return None while the input
is an incomplete prefix of a valid message.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum, auto

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Host = str | IPAddress

VERSION = 5
AUTH_VERSION = 1  # RFC 1929 sub-negotiation version

# Methods (RFC 1928 section 3).
METHOD_NO_AUTH = 0x00
METHOD_GSSAPI = 0x01
METHOD_USERPASS = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

# Commands (section 4).
CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

# Address types.
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# Reply codes (section 6).
REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

REPLY_TEXT = {
    REP_SUCCEEDED: "succeeded",
    REP_GENERAL_FAILURE: "general SOCKS server failure",
    REP_NOT_ALLOWED: "connection not allowed by ruleset",
    REP_NETWORK_UNREACHABLE: "network unreachable",
    REP_HOST_UNREACHABLE: "host unreachable",
    REP_CONNECTION_REFUSED: "connection refused",
    REP_TTL_EXPIRED: "TTL expired",
    REP_COMMAND_NOT_SUPPORTED: "command not supported",
    REP_ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


class Socks5Error(Exception):
    """A SOCKS5 exchange failed: malformed bytes, refused auth, or an error
    reply. `reply` is the RFC 1928 reply code that describes it (the one the
    proxy sent, or the one a server should send back for a bad request)."""

    def __init__(self, message: str, reply: int = REP_GENERAL_FAILURE) -> None:
        super().__init__(message)
        self.reply = reply


# ---------------------------------------------------------------------------
# Addresses


def ip_literal(host: str) -> IPAddress | None:
    """The address if `host` is an IP literal (brackets allowed), else None.
    For the address encoders of the proxy protocols, called once per flow,
    usually with a name."""
    text = host.strip("[]")
    if ":" not in text and not text[-1:].isdigit():
        # A name (an IPv4 literal ends in a digit, an IPv6 one has a colon):
        # skip the parser, which fails by raising three exceptions.
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _as_host(host: Host) -> Host:
    """An IP literal string becomes an address object; a name stays a str."""
    if isinstance(host, str):
        ip = ip_literal(host)
        return host if ip is None else ip
    return host


def encode_address(host: Host, port: int) -> bytes:
    """ATYP + address + port. Raises Socks5Error for a name that does not fit
    (empty, longer than 255 bytes, not encodable) or a bad port."""
    if not 0 <= port <= 0xFFFF:
        raise Socks5Error(f"port out of range: {port}")
    h = _as_host(host)
    if isinstance(h, ipaddress.IPv4Address):
        return bytes([ATYP_IPV4]) + h.packed + port.to_bytes(2, "big")
    if isinstance(h, ipaddress.IPv6Address):
        return bytes([ATYP_IPV6]) + h.packed + port.to_bytes(2, "big")
    try:
        raw = h.encode("ascii")
    except UnicodeEncodeError:
        try:
            raw = h.encode("idna")
        except UnicodeError as e:
            raise Socks5Error(f"cannot encode host name {h!r}: {e}") from None
    if not 1 <= len(raw) <= 255:
        raise Socks5Error(f"host name length {len(raw)} not in 1..255")
    return bytes([ATYP_DOMAIN, len(raw)]) + raw + port.to_bytes(2, "big")


def decode_address(buf: bytes | bytearray, offset: int) -> tuple[Host, int, int] | None:
    """Parse ATYP + address + port at `offset`.

    Returns (host, port, end offset), or None if `buf` ends before the address
    does. A domain comes back as str (ASCII only: a non-ASCII name is refused,
    proxies must not guess an encoding).
    """
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    if atyp == ATYP_IPV4:
        end = offset + 1 + 4 + 2
        if len(buf) < end:
            return None
        host: Host = ipaddress.IPv4Address(bytes(buf[offset + 1 : offset + 5]))
    elif atyp == ATYP_IPV6:
        end = offset + 1 + 16 + 2
        if len(buf) < end:
            return None
        host = ipaddress.IPv6Address(bytes(buf[offset + 1 : offset + 17]))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < offset + 2:
            return None
        n = buf[offset + 1]
        if n == 0:
            raise Socks5Error("empty domain name", REP_GENERAL_FAILURE)
        end = offset + 2 + n + 2
        if len(buf) < end:
            return None
        raw = bytes(buf[offset + 2 : offset + 2 + n])
        host = raw.decode("latin-1")
        if not raw.isascii() or not host.isprintable():
            raise Socks5Error("domain name is not printable ASCII", REP_GENERAL_FAILURE)
    else:
        raise Socks5Error(f"unknown address type {atyp}", REP_ADDRESS_TYPE_NOT_SUPPORTED)
    port = int.from_bytes(buf[end - 2 : end], "big")
    return host, port, end


# ---------------------------------------------------------------------------
# Message encoders and incremental parsers (shared by client and server)


@dataclass(frozen=True)
class Request:
    """A client request: CONNECT / BIND / UDP ASSOCIATE to host:port."""

    command: int
    host: Host
    port: int


@dataclass(frozen=True)
class Reply:
    """A server reply: `reply` code and the bound address."""

    reply: int
    host: Host
    port: int


def encode_greeting(methods: bytes) -> bytes:
    if not 1 <= len(methods) <= 255:
        raise Socks5Error("a greeting offers 1..255 methods")
    return bytes([VERSION, len(methods)]) + methods


def parse_greeting(buf: bytes | bytearray) -> tuple[bytes, int] | None:
    """VER NMETHODS METHODS -> (methods, consumed) or None if incomplete."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(f"not SOCKS5 (version byte {buf[0]})")
    n = buf[1]
    if n == 0:
        raise Socks5Error("greeting offers no methods")
    if len(buf) < 2 + n:
        return None
    return bytes(buf[2 : 2 + n]), 2 + n


def encode_method_selection(method: int) -> bytes:
    return bytes([VERSION, method])


def parse_method_selection(buf: bytes | bytearray) -> tuple[int, int] | None:
    """VER METHOD -> (method, consumed)."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(f"not SOCKS5 (version byte {buf[0]})")
    return buf[1], 2


def encode_userpass(username: str, password: str) -> bytes:
    u = username.encode("utf-8")
    p = password.encode("utf-8")
    if not 1 <= len(u) <= 255 or not 1 <= len(p) <= 255:
        raise Socks5Error("username and password must each be 1..255 bytes (RFC 1929)")
    return bytes([AUTH_VERSION, len(u)]) + u + bytes([len(p)]) + p


def parse_userpass(buf: bytes | bytearray) -> tuple[str, str, int] | None:
    """RFC 1929 request -> (username, password, consumed). Undecodable UTF-8
    is replaced, not refused: the credentials then simply do not match."""
    if len(buf) < 2:
        return None
    if buf[0] != AUTH_VERSION:
        raise Socks5Error(f"bad auth sub-negotiation version {buf[0]}")
    ulen = buf[1]
    if len(buf) < 2 + ulen + 1:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    user = bytes(buf[2 : 2 + ulen]).decode("utf-8", "replace")
    pw = bytes(buf[3 + ulen : end]).decode("utf-8", "replace")
    return user, pw, end


def encode_userpass_status(ok: bool) -> bytes:
    return bytes([AUTH_VERSION, 0 if ok else 1])


def parse_userpass_status(buf: bytes | bytearray) -> tuple[bool, int] | None:
    """VER STATUS -> (ok, consumed). RFC 1929 says VER is 1, but several
    servers answer 5 here; accept both, as curl does."""
    if len(buf) < 2:
        return None
    if buf[0] not in (AUTH_VERSION, VERSION):
        raise Socks5Error(f"bad auth status version {buf[0]}")
    return buf[1] == 0, 2


def encode_request(command: int, host: Host, port: int) -> bytes:
    return bytes([VERSION, command, 0]) + encode_address(host, port)


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """VER CMD RSV ATYP ADDR PORT -> (Request, consumed). An unknown command
    raises with REP_COMMAND_NOT_SUPPORTED so a server can answer it."""
    if len(buf) < 3:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(f"not SOCKS5 (version byte {buf[0]})")
    cmd = buf[1]
    if cmd not in (CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE):
        raise Socks5Error(f"unknown command {cmd}", REP_COMMAND_NOT_SUPPORTED)
    # RSV must be 0 per RFC 1928, but real clients are not strict; ignore it.
    addr = decode_address(buf, 3)
    if addr is None:
        return None
    host, port, end = addr
    return Request(cmd, host, port), end


def encode_reply(reply: int, host: Host = "0.0.0.0", port: int = 0) -> bytes:
    return bytes([VERSION, reply, 0]) + encode_address(host, port)


def parse_reply(buf: bytes | bytearray) -> tuple[Reply, int] | None:
    """VER REP RSV ATYP BND.ADDR BND.PORT -> (Reply, consumed). The reply
    code is returned, not raised: the client decides (see Socks5Client)."""
    if len(buf) < 3:
        return None
    if buf[0] != VERSION:
        raise Socks5Error(f"not SOCKS5 (version byte {buf[0]})")
    addr = decode_address(buf, 3)
    if addr is None:
        return None
    host, port, end = addr
    return Reply(buf[1], host, port), end


def reply_size_hint(buf: bytes | bytearray) -> int:
    """How many more bytes the reply at the start of `buf` needs at least.

    Reading no more than this keeps the client from consuming tunnel bytes
    that follow the reply, so the stream can stay a plain socket (splice).
    Returns 0 when the reply is complete.
    """
    # VER REP RSV ATYP [LEN]
    if len(buf) < 5:
        return 5 - len(buf)
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        total = 4 + 4 + 2
    elif atyp == ATYP_IPV6:
        total = 4 + 16 + 2
    else:  # domain, or garbage the parser will refuse
        total = 5 + buf[4] + 2
    return max(total - len(buf), 0)


# ---------------------------------------------------------------------------
# UDP ASSOCIATE datagram header (RFC 1928 section 7)


@dataclass(frozen=True)
class UdpDatagram:
    host: Host
    port: int
    payload: bytes
    frag: int = 0


def encode_udp(host: Host, port: int, payload: bytes, frag: int = 0) -> bytes:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA."""
    if not 0 <= frag <= 0xFF:
        raise Socks5Error(f"bad fragment number {frag}")
    return b"\x00\x00" + bytes([frag]) + encode_address(host, port) + payload


def parse_udp(datagram: bytes) -> UdpDatagram:
    """Parse one whole datagram. Fragments (FRAG != 0) are returned as such;
    the caller drops them (the RFC makes reassembly optional, and neither
    dante nor mihomo implement it)."""
    if len(datagram) < 4:
        raise Socks5Error("UDP datagram shorter than its header")
    if datagram[0] != 0 or datagram[1] != 0:
        raise Socks5Error("UDP datagram reserved bytes are not zero")
    addr = decode_address(datagram, 3)
    if addr is None:
        raise Socks5Error("UDP datagram truncated inside its address")
    host, port, end = addr
    return UdpDatagram(host, port, datagram[end:], datagram[2])


# ---------------------------------------------------------------------------
# Client state machine


class ClientState(Enum):
    GREETING = auto()  # greeting sent, waiting for method selection
    AUTH = auto()  # username/password sent, waiting for status
    REQUEST = auto()  # request sent, waiting for reply
    ESTABLISHED = auto()  # reply 0 received: the stream is the tunnel now


class Socks5Client:
    """One client handshake: greeting, optional RFC 1929 auth, one request.

    Use: send `data_to_send()`; then until `established`, read at most
    `bytes_wanted()` bytes, `receive_data()` them and send `data_to_send()`.
    Reading only what is wanted means no tunnel byte is ever consumed, so
    `trailing_data` stays empty; if a caller reads more, the extra bytes are
    kept in `trailing_data` and belong to the tunnel.

    Without credentials the only method offered is "no auth", so the
    request cannot depend on the server's choice: with `pipeline` (the
    default) it goes out with the greeting, saving a round trip per flow
    (the server's method selection and reply then arrive back to back; a
    server that refuses answers 0xFF and closes, which still raises here).
    Servers that read a stream take it (dante); others read the greeting
    with one recv() and drop what came with it (microsocks 1.0.3 then
    waits for a request that never comes): `pipeline=False` keeps the
    strict lock-step exchange for those. `pipelined` says which it is.

    Raises Socks5Error on malformed replies, no acceptable method, refused
    credentials, or a reply code other than 0 (then `.reply` is that code).
    Owns no resources.
    """

    def __init__(
        self,
        host: Host,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        command: int = CMD_CONNECT,
        pipeline: bool = True,
    ) -> None:
        # The RFC 1929 request, offered only with a username.
        self._auth: bytes | None = None
        if username is not None:
            self._auth = encode_userpass(username, password or "")
            methods = bytes([METHOD_NO_AUTH, METHOD_USERPASS])
        else:
            methods = bytes([METHOD_NO_AUTH])
        # Encode now, so a bad target fails before any byte is sent.
        self._request = encode_request(command, host, port)
        self._out = bytearray(encode_greeting(methods))
        # Sent with the greeting (see the class doc): only when "no auth" is
        # the sole method offered.
        self._pipelined = pipeline and self._auth is None
        if self._pipelined:
            self._out += self._request
        # Whether data_to_send has handed out the request.
        self.request_sent = False
        self._in = bytearray()
        self.state = ClientState.GREETING
        self.reply: Reply | None = None
        self.trailing_data = b""
        # Bytes fed so far: 0 means the proxy has not said anything yet.
        self.received = 0

    @property
    def established(self) -> bool:
        return self.state is ClientState.ESTABLISHED

    @property
    def pipelined(self) -> bool:
        """Whether the request went (or goes) out with the greeting."""
        return self._pipelined

    @property
    def awaiting_reply(self) -> bool:
        """The method selection (and auth) are in, no byte of the reply yet."""
        return self.state is ClientState.REQUEST and not self._in

    def data_to_send(self) -> bytes:
        """What to send now. Once the bytes that held the request are handed
        out, `request_sent` is True (the caller sends what it gets)."""
        out, self._out = bytes(self._out), bytearray()
        if self._pipelined or self.state is ClientState.REQUEST:
            # The request is queued with the greeting, or right when the
            # state becomes REQUEST (after the method selection or auth).
            self.request_sent = True
        return out

    def bytes_wanted(self) -> int:
        """At least 1 byte, and no more than the handshake certainly still
        has to come (so a read of this size never takes a tunnel byte)."""
        if self.state is ClientState.REQUEST:
            return max(reply_size_hint(self._in), 1)
        if self.state is ClientState.GREETING and self._pipelined:
            # The method selection, then at least the reply's fixed head
            # (VER REP RSV ATYP + one byte): all of it handshake, none tunnel.
            return max(2 - len(self._in), 0) + 5
        if self.state in (ClientState.GREETING, ClientState.AUTH):
            return max(2 - len(self._in), 1)
        return 65536

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the proxy. An empty `data` means EOF."""
        self.received += len(data)
        if self.state is ClientState.ESTABLISHED:
            self.trailing_data += data
            return
        if not data:
            raise Socks5Error(f"proxy closed the connection during {self.state.name.lower()}")
        self._in += data
        while self._step():
            pass

    def _step(self) -> bool:
        if self.state is ClientState.GREETING:
            sel = parse_method_selection(self._in)
            if sel is None:
                return False
            method, used = sel
            del self._in[:used]
            if method == METHOD_NO_AUTH:
                if not self._pipelined:
                    self._out += self._request
                self.state = ClientState.REQUEST
            elif method == METHOD_USERPASS and self._auth is not None:
                self._out += self._auth
                self.state = ClientState.AUTH
            elif method == METHOD_NO_ACCEPTABLE:
                raise Socks5Error("proxy accepts none of the offered auth methods")
            else:
                raise Socks5Error(f"proxy chose a method that was not offered ({method})")
            return True
        if self.state is ClientState.AUTH:
            st = parse_userpass_status(self._in)
            if st is None:
                return False
            ok, used = st
            del self._in[:used]
            if not ok:
                raise Socks5Error("proxy refused the username/password", REP_NOT_ALLOWED)
            self._out += self._request
            self.state = ClientState.REQUEST
            return True
        if self.state is ClientState.REQUEST:
            rep = parse_reply(self._in)
            if rep is None:
                return False
            reply, used = rep
            if reply.reply != REP_SUCCEEDED:
                text = REPLY_TEXT.get(reply.reply, f"reply code {reply.reply}")
                raise Socks5Error(f"proxy replied: {text}", reply.reply)
            self.reply = reply
            self.trailing_data = bytes(self._in[used:])
            self._in.clear()
            self.state = ClientState.ESTABLISHED
            return False
        return False


# ---------------------------------------------------------------------------
# Server state machine


class ServerState(Enum):
    GREETING = auto()  # waiting for the client's greeting
    AUTH = auto()  # waiting for RFC 1929 credentials
    REQUEST = auto()  # waiting for the request
    REPLY = auto()  # request parsed, the caller must call reply()
    ESTABLISHED = auto()  # success reply sent: the stream is the tunnel now
    CLOSED = auto()  # failure sent: close the connection after sending


@dataclass(frozen=True)
class AuthRequest:
    """Credentials to check; answer with `Socks5Server.auth_result(ok)`."""

    username: str
    password: str


Event = AuthRequest | Request


class Socks5Server:
    """One server-side handshake, for the mixed port.

    `receive_data(data)` returns the next event, if one is complete:
    `AuthRequest` (when `require_auth`; answer with `auth_result`) or
    `Request` (answer with `reply`). Bytes to send accumulate in
    `data_to_send()`. Malformed input raises Socks5Error whose `.reply` the
    caller may send with `reply()` if the request stage was reached; the
    caller then closes the connection. Bytes after the request belong to the
    tunnel and are kept in `trailing_data`.
    """

    def __init__(self, *, require_auth: bool = False) -> None:
        self.require_auth = require_auth
        self.state = ServerState.GREETING
        self._in = bytearray()
        self._out = bytearray()
        self.trailing_data = b""

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive_data(self, data: bytes | bytearray) -> Event | None:
        if self.state in (ServerState.REPLY, ServerState.ESTABLISHED):
            self.trailing_data += data
            return None
        if self.state is ServerState.CLOSED:
            return None
        if not data:
            raise Socks5Error(f"client closed the connection during {self.state.name.lower()}")
        self._in += data
        return self._next_event()

    def _next_event(self) -> Event | None:
        if self.state is ServerState.GREETING:
            g = parse_greeting(self._in)
            if g is None:
                return None
            methods, used = g
            del self._in[:used]
            wanted = METHOD_USERPASS if self.require_auth else METHOD_NO_AUTH
            if wanted not in methods:
                self._out += encode_method_selection(METHOD_NO_ACCEPTABLE)
                self.state = ServerState.CLOSED
                raise Socks5Error("client offers no acceptable auth method", REP_NOT_ALLOWED)
            self._out += encode_method_selection(wanted)
            self.state = ServerState.AUTH if self.require_auth else ServerState.REQUEST
        if self.state is ServerState.AUTH:
            a = parse_userpass(self._in)
            if a is None:
                return None
            user, pw, used = a
            del self._in[:used]
            return AuthRequest(user, pw)
        if self.state is ServerState.REQUEST:
            r = parse_request(self._in)
            if r is None:
                return None
            req, used = r
            self.trailing_data = bytes(self._in[used:])
            self._in.clear()
            self.state = ServerState.REPLY
            return req
        return None

    def auth_result(self, ok: bool) -> Event | None:
        """Answer an AuthRequest; on success, returns the request if the
        client already pipelined it."""
        if self.state is not ServerState.AUTH:
            raise Socks5Error("auth_result() outside the auth stage")
        self._out += encode_userpass_status(ok)
        if not ok:
            self.state = ServerState.CLOSED
            return None
        self.state = ServerState.REQUEST
        return self._next_event()

    def reply(self, reply: int, host: Host = "0.0.0.0", port: int = 0) -> None:
        """Answer the request (reply 0 = success, the tunnel starts)."""
        if self.state not in (ServerState.REPLY, ServerState.REQUEST):
            raise Socks5Error("reply() before a request")
        self._out += encode_reply(reply, host, port)
        self.state = ServerState.ESTABLISHED if reply == REP_SUCCEEDED else ServerState.CLOSED
