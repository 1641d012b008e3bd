"""Shadowsocks AEAD (SIP004) and 2022 (SIP022) framing, client side, no I/O.

What this is for: the Shadowsocks outbound (appliance/outbound/shadowsocks.py)
seals what the client sends and opens what the server answers; nothing here
imports trio, so every frame is testable with plain byte strings
(tests/unit/test_shadowsocks.py).

Ciphers (`METHODS`):
- AEAD-2017: aes-128/192/256-gcm, chacha20-ietf-poly1305 and
  xchacha20-ietf-poly1305. Key = EVP_BytesToKey(MD5, password); each
  direction has a random salt and a subkey HKDF-SHA1(key, salt,
  "ss-subkey"); nonces are a little-endian counter from 0.
  TCP: salt, then chunks [sealed u16 length][sealed payload], payload at
  most 0x3FFF bytes; the first payload starts with the target as a SOCKS
  address. UDP: salt + one sealed (address + payload) per packet, nonce 0.
- 2022 (2022-blake3-aes-128-gcm, -aes-256-gcm, -chacha20-poly1305): the
  password is a base64 PSK of the key size (`psk1:psk2` for the identity
  headers of a multi-user server, AES only, TCP); subkey = BLAKE3
  derive_key("shadowsocks 2022 session subkey", psk + salt). TCP request:
  salt, [identity headers], sealed fixed header (type 0, timestamp, length
  of the variable header), sealed variable header (address, padding,
  initial payload), then chunks of up to 0xFFFF bytes. The response starts
  with the server's salt and a sealed fixed header (type 1, timestamp, our
  request salt, first chunk length). UDP: a separate header (session id,
  packet id), AES-encrypted with the PSK, and a body sealed with the
  session's subkey (AES); or XChaCha20-Poly1305 with the PSK and a random
  nonce (chacha20).
  Replay protection as SIP022 asks of a client: the response must carry
  our request salt and a timestamp within 30 s, a server salt seen in the
  last 60 s is refused (`SaltFilter`), and each server UDP session has a
  sliding window of packet ids (`ReplayWindow`).

How it fails: `AuthenticationError` when something does not open (the
server's key differs: wrong cipher or password) or a 2022 header does not
check out, `ReplayError` for a replayed salt or packet, `ShadowsocksError`
for everything else malformed. No parser raises IndexError or
struct.error for bad bytes.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.proto.socks5 import ip_literal

TAG = 16
AEAD_MAX_CHUNK = 0x3FFF
SS2022_MAX_CHUNK = 0xFFFF
# SIP022: a header's timestamp may differ from ours by this much.
MAX_TIME_DIFF = 30
# SIP022: salts are remembered this long (twice the timestamp window).
SALT_MEMORY = 60.0
# SIP022: a request without initial payload carries 1..900 bytes of padding.
MAX_PADDING = 900
HEADER_TYPE_CLIENT = 0
HEADER_TYPE_SERVER = 1
# The SOCKS address types (the target's encoding, as in SOCKS5).
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

Family = Literal["aes", "chacha", "xchacha"]


class ShadowsocksError(Exception):
    """A Shadowsocks frame could not be made or read."""


class AuthenticationError(ShadowsocksError):
    """What the server sent does not open with our key, or its 2022 header
    does not check out: a wrong cipher or password, or not a Shadowsocks
    server of this method."""


class ReplayError(ShadowsocksError):
    """A salt or UDP packet id seen before (SIP022 replay protection)."""


@dataclass(frozen=True)
class Method:
    """One cipher: its key and salt sizes, AEAD family, and whether it is
    a 2022 (SIP022) method."""

    name: str
    key_size: int
    family: Family
    is_2022: bool = False

    @property
    def salt_size(self) -> int:
        return self.key_size

    @property
    def nonce_size(self) -> int:
        return 24 if self.family == "xchacha" else 12


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("aes-128-gcm", 16, "aes"),
    Method("aes-192-gcm", 24, "aes"),
    Method("aes-256-gcm", 32, "aes"),
    Method("chacha20-ietf-poly1305", 32, "chacha"),
    Method("xchacha20-ietf-poly1305", 32, "xchacha"),
    Method("2022-blake3-aes-128-gcm", 16, "aes", True),
    Method("2022-blake3-aes-256-gcm", 32, "aes", True),
    Method("2022-blake3-chacha20-poly1305", 32, "chacha", True),
)}  # fmt: skip


# ---------------------------------------------------------------------------
# Primitives


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha section 2.2): the ChaCha20 state
    after its 20 rounds, words 0-3 and 12-15, without the final addition.

    Taken from one ChaCha20 keystream block (rounds(S) + S, with the 16
    bytes in words 12-15 as OpenSSL's counter||nonce) by subtracting the
    known input words: one C call instead of 80 quarter rounds in Python."""
    block = Cipher(algorithms.ChaCha20(key, nonce16), None).encryptor().update(bytes(64))
    out = struct.unpack("<16I", block)
    sigma = struct.unpack("<4I", b"expand 32-byte k")
    n = struct.unpack("<4I", nonce16)
    words = [(out[i] - sigma[i]) & 0xFFFFFFFF for i in range(4)]
    words += [(out[12 + i] - n[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *words)


class XChaCha20Poly1305:
    """XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha section 2.3) on
    cryptography's ChaCha20Poly1305: subkey = HChaCha20(key, nonce[:16]),
    inner nonce = 4 zero bytes + nonce[16:]."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("XChaCha20-Poly1305 takes a 32-byte key")
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        sub = ChaCha20Poly1305(hchacha20(self._key, nonce[:16]))
        return sub.encrypt(b"\0\0\0\0" + nonce[16:], data, aad)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        sub = ChaCha20Poly1305(hchacha20(self._key, nonce[:16]))
        return sub.decrypt(b"\0\0\0\0" + nonce[16:], data, aad)


class Aead(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes: ...


def new_aead(family: Family, key: bytes) -> Aead:
    if family == "aes":
        return AESGCM(key)
    if family == "chacha":
        return ChaCha20Poly1305(key)
    return XChaCha20Poly1305(key)


def evp_bytes_to_key(password: bytes, key_size: int) -> bytes:
    """OpenSSL's EVP_BytesToKey with MD5, one iteration, no salt: the
    AEAD-2017 master key from the password (as every implementation does)."""
    out = b""
    prev = b""
    while len(out) < key_size:
        prev = hashlib.md5(prev + password).digest()
        out += prev
    return out[:key_size]


def aead_subkey(key: bytes, salt: bytes) -> bytes:
    """AEAD-2017 session subkey: HKDF-SHA1(key, salt, info "ss-subkey")."""
    return HKDF(hashes.SHA1(), len(key), salt, b"ss-subkey").derive(key)


def blake3_subkey(psk: bytes, salt: bytes, context: str = "shadowsocks 2022 session subkey"
                  ) -> bytes:
    """SIP022 key derivation: BLAKE3 derive_key(context, psk + salt)."""
    return blake3.blake3(psk + salt, derive_key_context=context).digest(length=len(psk))


def parse_psks(method: Method, password: str) -> list[bytes]:
    """A 2022 password: base64 PSKs separated by ':' (identity PSKs first,
    the user's last), each of the method's key size. ValueError says why."""
    psks: list[bytes] = []
    for i, part in enumerate(password.split(":")):
        try:
            psk = base64.b64decode(part, validate=True)
        except ValueError:
            raise ValueError(f"PSK {i + 1} is not base64") from None
        if len(psk) != method.key_size:
            raise ValueError(f"PSK {i + 1} is {len(psk)} bytes; {method.name} takes "
                             f"{method.key_size} (base64 of random bytes, e.g. "
                             f"`openssl rand -base64 {method.key_size}`)")
        psks.append(psk)
    if len(psks) > 1 and method.family != "aes":
        raise ValueError(f"multiple PSKs (identity headers) need an AES method, not {method.name}")
    return psks


def encode_address(host: str | ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
                   ) -> bytes:
    """The target as a SOCKS address (ATYP, address, port): a name stays a
    name, so the server resolves it (RFC 3089's point)."""
    if not 0 <= port <= 0xFFFF:
        raise ShadowsocksError(f"port out of range: {port}")
    if isinstance(host, str):
        literal = ip_literal(host)
        if literal is None:
            return _encode_name(host, port)
        ip = literal
    else:
        ip = host
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([atyp]) + ip.packed + port.to_bytes(2, "big")


def _encode_name(host: str, port: int) -> bytes:
    try:
        raw = host.encode("idna") if not host.isascii() else host.encode()
    except UnicodeError as e:
        raise ShadowsocksError(f"cannot encode host name {host!r}: {e}") from None
    if not 1 <= len(raw) <= 255:
        raise ShadowsocksError(f"host name length {len(raw)} not in 1..255")
    return bytes([ATYP_DOMAIN, len(raw)]) + raw + port.to_bytes(2, "big")


def address_length(buf: bytes | bytearray | memoryview, offset: int = 0) -> int:
    """The length of the SOCKS address at `offset` (ShadowsocksError if it
    is not one or does not fit in `buf`)."""
    if len(buf) <= offset:
        raise ShadowsocksError("truncated address")
    atyp = buf[offset]
    if atyp == ATYP_IPV4:
        n = 1 + 4 + 2
    elif atyp == ATYP_IPV6:
        n = 1 + 16 + 2
    elif atyp == ATYP_DOMAIN:
        if len(buf) < offset + 2:
            raise ShadowsocksError("truncated address")
        n = 2 + buf[offset + 1] + 2
    else:
        raise ShadowsocksError(f"unknown address type {atyp}")
    if len(buf) < offset + n:
        raise ShadowsocksError("truncated address")
    return n


class SaltFilter:
    """Salts seen in the last `SALT_MEMORY` seconds (SIP022): `check_and_add`
    raises ReplayError for one seen before. Two generations swapped every
    `SALT_MEMORY` seconds keep it bounded without a per-salt timer. Shared
    by the connections of one outbound; `clock` is for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._current: set[bytes] = set()
        self._previous: set[bytes] = set()
        self._since = clock()

    def check_and_add(self, salt: bytes) -> None:
        now = self._clock()
        if now - self._since >= SALT_MEMORY:
            self._previous = self._current if now - self._since < 2 * SALT_MEMORY else set()
            self._current = set()
            self._since = now
        if salt in self._current or salt in self._previous:
            raise ReplayError("the server's salt was seen before (a replayed response)")
        self._current.add(salt)


class ReplayWindow:
    """A sliding window over packet ids (SIP022 UDP, as in RFC 6479): ids
    more than `size` below the highest seen, or seen before, are refused."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._top = -1
        self._seen = 0  # bit i: packet id (top - i) was seen

    def check_and_add(self, packet_id: int) -> None:
        if packet_id > self._top:
            shift = packet_id - self._top
            self._seen = ((self._seen << shift) | 1) & ((1 << self.size) - 1)
            self._top = packet_id
            return
        back = self._top - packet_id
        if back >= self.size or self._seen >> back & 1:
            raise ReplayError(f"UDP packet id {packet_id} replayed or too old")
        self._seen |= 1 << back


def _check_time(stamp: int, now: float) -> None:
    if abs(stamp - now) > MAX_TIME_DIFF:
        raise AuthenticationError(
            f"server timestamp {stamp} is {stamp - now:+.0f}s off our clock "
            f"(SIP022 allows {MAX_TIME_DIFF}s)")


# ---------------------------------------------------------------------------
# TCP


class _Sealer:
    """Seals chunks of one direction with one AEAD object and a counter."""

    __slots__ = ("_encrypt", "_n", "_size")

    def __init__(self, aead: Aead, nonce_size: int) -> None:
        self._encrypt = aead.encrypt
        self._n = 0
        self._size = nonce_size

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        out = self._encrypt(self._n.to_bytes(self._size, "little"), bytes(data), None)
        self._n += 1
        return out


class _Opener:
    __slots__ = ("_decrypt", "_n", "_size")

    def __init__(self, aead: Aead, nonce_size: int) -> None:
        self._decrypt = aead.decrypt
        self._n = 0
        self._size = nonce_size

    def open(self, data: bytes) -> bytes:
        try:
            out = self._decrypt(self._n.to_bytes(self._size, "little"), data, None)
        except InvalidTag:
            raise AuthenticationError(
                "authentication failed or wrong cipher/password") from None
        self._n += 1
        return out


class TcpClient:
    """One TCP connection's client side: `request(initial)` once (salt and
    header, with the first payload if there is one), `seal(data)` for what
    follows, and `receive_data(data)` for what the server sends, which
    returns the plaintext opened so far (b"" while a chunk is incomplete).

    `key` is the AEAD-2017 master key or, for 2022, the PSK list (identity
    PSKs first, the user's last). `salt`, `clock` and `padding` are for
    tests; `salt_filter` is the outbound's (2022). Raises the module's
    errors (see the module doc). Owns no resources.
    """

    def __init__(
        self,
        method: Method,
        key: bytes | list[bytes],
        host: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        *,
        salt: bytes | None = None,
        clock: Callable[[], float] = time.time,
        padding: int | None = None,
        salt_filter: SaltFilter | None = None,
    ) -> None:
        self.method = method
        self._address = encode_address(host, port)
        self._clock = clock
        self._padding = padding
        self._filter = salt_filter
        self.salt = salt if salt is not None else os.urandom(method.salt_size)
        if method.is_2022:
            assert isinstance(key, list)
            self._psks = key
            self._key = key[-1]
            self._max = SS2022_MAX_CHUNK
        else:
            assert isinstance(key, bytes)
            self._psks = []
            self._key = key
            self._max = AEAD_MAX_CHUNK
        self._sealer = _Sealer(new_aead(method.family, self._subkey(self.salt)),
                               method.nonce_size)
        self._opener: _Opener | None = None
        self._in = b""
        # What the next read needs: the response header, a length, a payload.
        self._stage: Literal["salt", "header", "length", "payload"] = "salt"
        self._need = method.salt_size
        self.request_sent = False
        # Bytes of response seen: 0 while the server has said nothing.
        self.received = 0

    def _subkey(self, salt: bytes) -> bytes:
        if self.method.is_2022:
            return blake3_subkey(self._key, salt)
        return aead_subkey(self._key, salt)

    # -- sending -----------------------------------------------------------

    def request(self, initial: bytes = b"") -> bytes:
        """The salt, the header carrying the target, and `initial`."""
        if self.request_sent:
            raise ShadowsocksError("request() twice")
        self.request_sent = True
        if not self.method.is_2022:
            first = self._address + initial[: self._max - len(self._address)]
            rest = initial[len(first) - len(self._address):]
            return self.salt + self._chunks(first) + (self._chunks(rest) if rest else b"")
        if initial:
            pad = 0 if self._padding is None else self._padding
        else:
            pad = self._padding or int.from_bytes(os.urandom(2)) % MAX_PADDING + 1
        head = self._address + pad.to_bytes(2, "big") + bytes(pad)
        room = self._max - len(head)
        variable = head + initial[:room]
        fixed = struct.pack(">BQH", HEADER_TYPE_CLIENT, int(self._clock()), len(variable))
        out = [self.salt, self._identity_headers(), self._sealer.seal(fixed),
               self._sealer.seal(variable)]
        if len(initial) > room:
            out.append(self._chunks(initial[room:]))
        return b"".join(out)

    def _identity_headers(self) -> bytes:
        """SIP022 extensible identity headers: for each identity PSK, the
        BLAKE3 hash of the next PSK, AES-encrypted with a subkey of it."""
        out = []
        for ipsk, nxt in zip(self._psks, self._psks[1:], strict=False):
            sub = blake3_subkey(ipsk, self.salt, "shadowsocks 2022 identity subkey")
            plain = blake3.blake3(nxt).digest(length=16)
            enc = Cipher(algorithms.AES(sub), modes.ECB()).encryptor()
            out.append(enc.update(plain) + enc.finalize())
        return b"".join(out)

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """Payload after the request, as chunks."""
        return self._chunks(data)

    def _chunks(self, data: bytes | bytearray | memoryview) -> bytes:
        seal, size = self._sealer.seal, self._max
        n = len(data)
        if n <= size:
            return seal(n.to_bytes(2, "big")) + seal(data)
        view = memoryview(data)
        parts = []
        for i in range(0, n, size):
            piece = view[i:i + size]
            parts.append(seal(len(piece).to_bytes(2, "big")))
            parts.append(seal(piece))
        return b"".join(parts)

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> bytes:
        """Feed what the server sent; returns the plaintext it completes."""
        self.received += len(data)
        # Slices of one bytes object: each chunk is copied once, into the
        # AEAD's input; only a partial chunk is carried to the next call.
        src = self._in + data if self._in else bytes(data)
        out: list[bytes] = []
        pos = 0
        end = len(src)
        while end - pos >= self._need:
            piece = src[pos:pos + self._need]
            pos += self._need
            if self._stage == "payload":
                assert self._opener is not None
                out.append(self._opener.open(piece))
                self._stage, self._need = "length", 2 + TAG
            elif self._stage == "length":
                assert self._opener is not None
                n = int.from_bytes(self._opener.open(piece), "big")
                if n == 0 or n > self._max:
                    raise ShadowsocksError(f"chunk length {n} out of range")
                self._stage, self._need = "payload", n + TAG
            elif self._stage == "salt":
                self._response_salt(piece)
            else:
                self._response_header(piece)
        self._in = src[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete chunk held (not 0 at EOF: truncated)."""
        return len(self._in)

    def _response_salt(self, salt: bytes) -> None:
        if self.method.is_2022 and self._filter is not None:
            self._filter.check_and_add(salt)
        self._opener = _Opener(new_aead(self.method.family, self._subkey(salt)),
                               self.method.nonce_size)
        if self.method.is_2022:
            self._stage = "header"
            self._need = 1 + 8 + self.method.salt_size + 2 + TAG
        else:
            self._stage, self._need = "length", 2 + TAG

    def _response_header(self, piece: bytes) -> None:
        assert self._opener is not None
        head = self._opener.open(piece)
        kind, stamp = struct.unpack_from(">BQ", head)
        if kind != HEADER_TYPE_SERVER:
            raise AuthenticationError(f"response header type {kind}, not a server's")
        _check_time(stamp, self._clock())
        salt_end = 9 + self.method.salt_size
        if head[9:salt_end] != self.salt:
            raise AuthenticationError("the response names another request's salt")
        n = int.from_bytes(head[salt_end:salt_end + 2], "big")
        if n == 0:
            self._stage, self._need = "length", 2 + TAG
        else:
            self._stage, self._need = "payload", n + TAG


# ---------------------------------------------------------------------------
# UDP


class UdpClient:
    """The client side of one UDP flow: `seal(address + payload)` -> one
    packet for the server, `open(packet)` -> (address + payload) of a
    reply. AEAD-2017: a fresh salt per packet. 2022: one client session id
    for the flow, packet ids counting up, the server's packets checked
    against a replay window per server session and the timestamp window.

    `key` as for TcpClient (2022 UDP takes one PSK: identity headers are
    TCP only here). Raises the module's errors for a packet that does not
    open; the caller drops that packet. Owns no resources.
    """

    def __init__(self, method: Method, key: bytes | list[bytes], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.method = method
        self._clock = clock
        if method.is_2022:
            assert isinstance(key, list)
            if len(key) != 1:
                raise ShadowsocksError("2022 UDP with identity PSKs is not supported")
            self._psk = key[0]
            self.session_id = os.urandom(8)
            self._packet_id = 0
            self._windows: dict[bytes, ReplayWindow] = {}
            if method.family == "aes":
                self._block = Cipher(algorithms.AES(self._psk), modes.ECB())
                self._aead = new_aead("aes", blake3_subkey(self._psk, self.session_id))
                self._server_aeads: dict[bytes, Aead] = {}
            else:
                self._xaead = XChaCha20Poly1305(self._psk)
        else:
            assert isinstance(key, bytes)
            self._key = key

    def seal(self, body: bytes) -> bytes:
        """`body` = SOCKS address + payload."""
        m = self.method
        if not m.is_2022:
            salt = os.urandom(m.salt_size)
            aead = new_aead(m.family, aead_subkey(self._key, salt))
            return salt + aead.encrypt(bytes(m.nonce_size), body, None)
        packet_id = self._packet_id
        self._packet_id += 1
        header = self.session_id + packet_id.to_bytes(8, "big")
        # SIP022 main header: type, timestamp, padding length (0), padding.
        main = struct.pack(">BQH", HEADER_TYPE_CLIENT, int(self._clock()), 0) + body
        if m.family == "aes":
            enc = self._block.encryptor()
            return (enc.update(header) + enc.finalize()
                    + self._aead.encrypt(header[4:], main, None))
        nonce = os.urandom(24)
        return nonce + self._xaead.encrypt(nonce, header + main, None)

    def open(self, packet: bytes) -> bytes:
        """A server packet -> SOCKS address + payload."""
        m = self.method
        try:
            if not m.is_2022:
                salt = packet[: m.salt_size]
                if len(packet) < m.salt_size + TAG:
                    raise ShadowsocksError("UDP packet shorter than salt and tag")
                aead = new_aead(m.family, aead_subkey(self._key, salt))
                body = aead.decrypt(bytes(m.nonce_size), packet[m.salt_size:], None)
                address_length(body)
                return body
            if m.family == "aes":
                if len(packet) < 16 + TAG:
                    raise ShadowsocksError("UDP packet shorter than its headers")
                dec = self._block.decryptor()
                header = dec.update(packet[:16]) + dec.finalize()
                server_session = header[:8]
                known = self._server_aeads.get(server_session)
                aead = known if known is not None else new_aead(
                    "aes", blake3_subkey(self._psk, server_session))
                plain = aead.decrypt(header[4:], packet[16:], None)
                if server_session not in self._server_aeads:
                    if len(self._server_aeads) >= 8:
                        self._server_aeads.clear()
                    self._server_aeads[server_session] = aead
            else:
                if len(packet) < 24 + 16 + TAG:
                    raise ShadowsocksError("UDP packet shorter than its headers")
                full = self._xaead.decrypt(packet[:24], packet[24:], None)
                header, plain = full[:16], full[16:]
                server_session = header[:8]
        except InvalidTag:
            raise AuthenticationError(
                "authentication failed or wrong cipher/password") from None
        return self._server_body(server_session, int.from_bytes(header[8:16], "big"), plain)

    def _server_body(self, server_session: bytes, packet_id: int, plain: bytes) -> bytes:
        if len(plain) < 1 + 8 + 8 + 2:
            raise ShadowsocksError("UDP packet shorter than its main header")
        kind, stamp = struct.unpack_from(">BQ", plain)
        if kind != HEADER_TYPE_SERVER:
            raise AuthenticationError(f"UDP header type {kind}, not a server's")
        _check_time(stamp, self._clock())
        if plain[9:17] != self.session_id:
            raise AuthenticationError("UDP reply for another session")
        pad = int.from_bytes(plain[17:19], "big")
        body = plain[19 + pad:]
        address_length(body)
        window = self._windows.get(server_session)
        if window is None:
            if len(self._windows) >= 8:
                self._windows.clear()
            window = self._windows[server_session] = ReplayWindow()
        window.check_and_add(packet_id)
        return body
