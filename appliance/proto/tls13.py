"""A TLS 1.3 client without I/O (RFC 8446), on `cryptography`: enough of
TLS to be REALITY's client (appliance/proto/reality.py), which needs what
Python's ssl cannot give: a ClientHello whose session id it writes itself,
the X25519 private key of the key share, and the server's certificate
before anything is trusted.

What it speaks:
- one ClientHello shaped like Chrome's (`client_hello`: GREASE, Chrome's
  cipher suites, extension set and order, ALPN h2 + http/1.1 by default);
  key shares X25519, and X25519MLKEM768 first when asked (`pq=True`);
- the server's flight: ServerHello (a HelloRetryRequest is refused),
  EncryptedExtensions (the chosen ALPN), Certificate, CertificateVerify
  (checked with the leaf's key: Ed25519, ECDSA P-256/P-384, RSA-PSS),
  Finished (checked); then the client's Finished (after a compatibility
  ChangeCipherSpec, as Chrome sends one);
- records with TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384 and
  TLS_CHACHA20_POLY1305_SHA256; NewSessionTicket is dropped (no
  resumption); KeyUpdate is honoured (and answered when asked);
  close_notify is the end of the stream.

Trust is the caller's: `Tls13Client(check_certificate=...)` is called with
the DER chain when it arrives, and raises Tls13Error to refuse it. No
client certificates, no resumption or 0-RTT, no TLS 1.2.

Use: build, optionally `set_session_id`, `start()` -> bytes for the
server; `receive_data(bytes)` and `next_record()` until
`handshake_complete`, sending `data_to_send()` after each; then
`encrypt(data)` and `next_record()`. Every failure is a Tls13Error whose
text is the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import load_der_public_key

# Record content types.
CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
# Handshake message types.
CLIENT_HELLO = 1
SERVER_HELLO = 2
NEW_SESSION_TICKET = 4
ENCRYPTED_EXTENSIONS = 8
CERTIFICATE = 11
CERTIFICATE_REQUEST = 13
CERTIFICATE_VERIFY = 15
FINISHED = 20
KEY_UPDATE = 24
COMPRESSED_CERTIFICATE = 25
# Groups.
X25519 = 0x001D
SECP256R1 = 0x0017
SECP384R1 = 0x0018
X25519MLKEM768 = 0x11EC
# The ServerHello random that marks a HelloRetryRequest (RFC 8446 4.1.3).
HRR_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()
# Where the session id sits in the ClientHello message: type (1), length
# (3), legacy_version (2), random (32), session id length (1).
SESSION_ID_OFFSET = 39
MAX_PLAINTEXT = 1 << 14
ALERTS = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac",
          40: "handshake_failure", 42: "bad_certificate", 47: "illegal_parameter",
          48: "unknown_ca", 50: "decode_error", 51: "decrypt_error",
          70: "protocol_version", 80: "internal_error", 86: "inappropriate_fallback",
          109: "missing_extension", 110: "unsupported_extension", 112: "unrecognized_name",
          116: "certificate_required", 120: "no_application_protocol"}


class Tls13Error(Exception):
    """The handshake or a record failed; the text says why."""


@dataclass(frozen=True)
class CipherSuite:
    code: int
    name: str
    hash_name: str
    key_len: int
    aead: type[AESGCM] | type[ChaCha20Poly1305]

    @property
    def hash_len(self) -> int:
        return hashlib.new(self.hash_name).digest_size


SUITES = {
    0x1301: CipherSuite(0x1301, "TLS_AES_128_GCM_SHA256", "sha256", 16, AESGCM),
    0x1302: CipherSuite(0x1302, "TLS_AES_256_GCM_SHA384", "sha384", 32, AESGCM),
    0x1303: CipherSuite(0x1303, "TLS_CHACHA20_POLY1305_SHA256", "sha256", 32, ChaCha20Poly1305),
}
# Chrome's list: TLS 1.3 suites, then the TLS 1.2 ones it still offers.
CHROME_SUITES = (0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
                 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035)
CHROME_SIGNATURE_ALGORITHMS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)


# --- HKDF (RFC 5869) and the TLS 1.3 key schedule (RFC 8446 7.1) ---------

def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(hashlib.new(hash_name).digest_size), ikm, hash_name).digest()


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes((i,)), hash_name).digest()
        out += block
        i += 1
    return out[:length]


def hkdf_expand_label(hash_name: str, secret: bytes, label: bytes, context: bytes,
                      length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + bytes((len(context),)) + context
    return hkdf_expand(hash_name, secret, info, length)


class RecordProtection:
    """One direction's AEAD key and sequence number (RFC 8446 5.2-5.3)."""

    def __init__(self, suite: CipherSuite, secret: bytes) -> None:
        self.suite = suite
        self.secret = secret
        h = suite.hash_name
        self.aead = suite.aead(hkdf_expand_label(h, secret, b"key", b"", suite.key_len))
        self.iv = int.from_bytes(hkdf_expand_label(h, secret, b"iv", b"", 12), "big")
        self.seq = 0

    def _nonce(self) -> bytes:
        nonce = (self.iv ^ self.seq).to_bytes(12, "big")
        self.seq += 1
        return nonce

    def seal(self, content_type: int, data: bytes) -> bytes:
        header = struct.pack("!BHH", APPLICATION_DATA, 0x0303, len(data) + 17)
        return header + self.aead.encrypt(self._nonce(), data + bytes((content_type,)), header)

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        try:
            inner = self.aead.decrypt(self._nonce(), body, header)
        except InvalidTag:
            raise Tls13Error("bad record MAC (the server's keys are not ours)") from None
        end = len(inner)
        while end and inner[end - 1] == 0:
            end -= 1
        if not end:
            raise Tls13Error("a record of only padding")
        return inner[end - 1], inner[:end - 1]

    def updated(self) -> RecordProtection:
        h = self.suite.hash_name
        return RecordProtection(self.suite, hkdf_expand_label(
            h, self.secret, b"traffic upd", b"", self.suite.hash_len))


# --- The ClientHello ----------------------------------------------------

def _u8(b: bytes) -> bytes:
    return bytes((len(b),)) + b


def _u16(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _u24(b: bytes) -> bytes:
    return len(b).to_bytes(3, "big") + b


def _ext(code: int, body: bytes) -> bytes:
    return struct.pack("!H", code) + _u16(body)


def _grease() -> int:
    v = os.urandom(1)[0] & 0xF0 | 0x0A
    return v << 8 | v


@dataclass
class KeyShare:
    """The client's key-share secrets (what REALITY derives its key from)."""

    x25519: x25519.X25519PrivateKey
    mlkem: mlkem.MLKEM768PrivateKey | None


def grease_values() -> tuple[int, int, int, int]:
    """Four distinct GREASE values (RFC 8701), as BoringSSL picks per hello."""
    while True:
        g = tuple(_grease() for _ in range(4))
        if len(set(g)) == 4:
            return g  # type: ignore[return-value]


def client_hello(server_name: str | None, alpn: tuple[str, ...], random: bytes,
                 shares: KeyShare, grease: tuple[int, int, int, int] | None = None) -> bytes:
    """The ClientHello handshake message, session id zero (32 bytes).

    Shaped like Chrome's (BoringSSL): GREASE in suites, groups, key shares,
    versions and first and last extension; Chrome's extensions in its
    pre-shuffle order (Chrome shuffles them per connection since 110; here
    the order is fixed). Not mimicked: the padding extension, the
    encrypted_client_hello GREASE, and Chrome's per-connection shuffle."""
    g = grease or grease_values()
    x_pub = shares.x25519.public_key().public_bytes_raw()
    groups = [g[1], X25519, SECP256R1, SECP384R1]
    key_shares = struct.pack("!HH", g[1], 1) + b"\x00"
    if shares.mlkem is not None:
        groups.insert(1, X25519MLKEM768)
        key_shares += struct.pack("!H", X25519MLKEM768) + _u16(
            shares.mlkem.public_key().public_bytes_raw() + x_pub)
    key_shares += struct.pack("!H", X25519) + _u16(x_pub)
    exts = [
        _ext(g[0], b""),
        _ext(0, _u16(b"\x00" + _u16(server_name.encode()))) if server_name else b"",
        _ext(23, b""),                                           # extended_master_secret
        _ext(0xFF01, b"\x00"),                                   # renegotiation_info
        _ext(10, _u16(b"".join(struct.pack("!H", x) for x in groups))),
        _ext(11, b"\x01\x00"),                                   # ec_point_formats
        _ext(35, b""),                                           # session_ticket
        _ext(16, _u16(b"".join(_u8(p.encode()) for p in alpn))) if alpn else b"",
        _ext(5, b"\x01\x00\x00\x00\x00"),                        # status_request
        _ext(13, _u16(b"".join(struct.pack("!H", a) for a in CHROME_SIGNATURE_ALGORITHMS))),
        _ext(18, b""),                                           # signed_certificate_timestamp
        _ext(51, _u16(key_shares)),
        _ext(45, b"\x01\x01"),                                   # psk_dhe_ke
        _ext(43, _u8(struct.pack("!HHH", g[2], 0x0304, 0x0303))),
        _ext(27, b"\x02\x00\x02"),                               # compress_certificate: brotli
        _ext(17513, _u16(_u8(b"h2"))),                           # application_settings
        _ext(g[3], b"\x00"),
    ]
    body = (b"\x03\x03" + random + _u8(bytes(32))
            + _u16(b"".join(struct.pack("!H", s) for s in (g[0], *CHROME_SUITES)))
            + b"\x01\x00" + _u16(b"".join(exts)))
    return bytes((CLIENT_HELLO,)) + _u24(body)


# --- Parsing helpers ----------------------------------------------------

class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Tls13Error(f"truncated {self.what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec8(self) -> bytes:
        return self.take(self.u8())

    def vec16(self) -> bytes:
        return self.take(self.u16())

    def vec24(self) -> bytes:
        return self.take(int.from_bytes(self.take(3), "big"))

    def extensions(self) -> dict[int, bytes]:
        r = _Reader(self.vec16(), self.what)
        out: dict[int, bytes] = {}
        while r.pos < len(r.data):
            code = r.u16()
            out[code] = r.vec16()
        return out


def _der_element(data: bytes, pos: int) -> tuple[int, int, int]:
    """The DER element at `pos`: (tag, start of its content, end)."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 0 < n <= 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def certificate_fields(der: bytes) -> tuple[bytes, bytes]:
    """(subjectPublicKeyInfo DER, signatureValue bits) of an X.509
    certificate, read from the DER directly: REALITY's temporary
    certificate has serial number 0, which cryptography's certificate
    loader warns about (and is to refuse); the key and the signature are
    all either side needs. ValueError if it is not a certificate."""
    tag, start, _ = _der_element(der, 0)
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, tbs, tbs_end = _der_element(der, start)
    _, _, alg_end = _der_element(der, tbs_end)
    tag, sig, sig_end = _der_element(der, alg_end)
    if tag != 0x03 or sig == sig_end:
        raise ValueError("no signature")
    pos = tbs
    fields = []
    while pos < tbs_end:
        t, _, e = _der_element(der, pos)
        fields.append((t, pos, e))
        pos = e
    if fields and fields[0][0] == 0xA0:
        fields = fields[1:]  # [0] version
    if len(fields) < 6 or fields[5][0] != 0x30:
        raise ValueError("no subjectPublicKeyInfo")
    _, spki_start, spki_end = fields[5]
    return der[spki_start:spki_end], der[sig + 1:sig_end]


def _verify_signature(leaf: bytes, scheme: int, signature: bytes, content: bytes) -> None:
    try:
        key = load_der_public_key(certificate_fields(leaf)[0])
    except (ValueError, UnsupportedAlgorithm) as e:
        raise Tls13Error(f"the server's certificate key does not load: {e}") from None
    try:
        if scheme == 0x0807 and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, content)
        elif scheme in (0x0403, 0x0503) and isinstance(key, ec.EllipticCurvePublicKey):
            ec_algo: hashes.HashAlgorithm = hashes.SHA256() if scheme == 0x0403 else hashes.SHA384()
            key.verify(signature, content, ec.ECDSA(ec_algo))
        elif scheme in (0x0804, 0x0805, 0x0806) and isinstance(key, rsa.RSAPublicKey):
            algo = {0x0804: hashes.SHA256(), 0x0805: hashes.SHA384(),
                    0x0806: hashes.SHA512()}[scheme]
            key.verify(signature, content,
                       padding.PSS(mgf=padding.MGF1(algo), salt_length=algo.digest_size), algo)
        else:
            raise Tls13Error(f"CertificateVerify with signature scheme {scheme:#06x} that the "
                             f"certificate's key cannot make")
    except InvalidSignature:
        raise Tls13Error("CertificateVerify signature does not match the certificate") from None


# --- The client ---------------------------------------------------------

class Tls13Client:
    """One TLS 1.3 client connection without I/O (module doc)."""

    def __init__(self, server_name: str | None, *, alpn: tuple[str, ...] = ("h2", "http/1.1"),
                 pq: bool = False,
                 check_certificate: Callable[[list[bytes]], None] | None = None,
                 random: bytes | None = None, shares: KeyShare | None = None,
                 grease: tuple[int, int, int, int] | None = None) -> None:
        """`check_certificate(chain)` judges the server's DER chain (leaf
        first) and raises Tls13Error to refuse it; None trusts anything.
        `random`, `shares` and `grease` fix what is otherwise random (tests)."""
        self.random = random if random is not None else os.urandom(32)
        self.shares = shares or KeyShare(
            x25519.X25519PrivateKey.generate(),
            mlkem.MLKEM768PrivateKey.generate() if pq else None)
        self.hello = bytearray(client_hello(server_name, alpn, self.random, self.shares, grease))
        self.check_certificate = check_certificate
        self._started = False
        self._in = bytearray()
        self._out = bytearray()
        self._hs_buffer = bytearray()
        self._transcript = b""
        self._state = "server_hello"
        self.suite: CipherSuite | None = None
        self.group: int | None = None  # the key exchange the server chose
        self._read: RecordProtection | None = None
        self._write: RecordProtection | None = None
        self._app_read_secret = b""
        self._app_write: RecordProtection | None = None
        self.peer_certificates: list[bytes] = []
        self.alpn: str | None = None
        self.handshake_complete = False
        self.closed = False  # the server's close_notify arrived

    @property
    def session_id(self) -> bytes:
        return bytes(self.hello[SESSION_ID_OFFSET:SESSION_ID_OFFSET + 32])

    def set_session_id(self, session_id: bytes) -> None:
        """Write the 32-byte session id into the ClientHello (before start)."""
        if self._started or len(session_id) != 32:
            raise ValueError("a 32-byte session id, before start()")
        self.hello[SESSION_ID_OFFSET:SESSION_ID_OFFSET + 32] = session_id

    def start(self) -> bytes:
        """The ClientHello record."""
        self._started = True
        hello = bytes(self.hello)
        self._transcript = hello
        return struct.pack("!BHH", HANDSHAKE, 0x0301, len(hello)) + hello

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray) -> None:
        self._in += data

    def take_unprocessed(self) -> bytes:
        """The received bytes no record has consumed yet (they are handed
        over when the peer stops speaking TLS on this connection)."""
        out = bytes(self._in)
        self._in.clear()
        return out

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        """`data` as application-data records."""
        w = self._app_write
        if w is None:
            raise Tls13Error("application data before the handshake completed")
        view = memoryview(data)
        return b"".join(w.seal(APPLICATION_DATA, bytes(view[i:i + MAX_PLAINTEXT]))
                        for i in range(0, len(view), MAX_PLAINTEXT))

    def close_notify(self) -> bytes:
        w = self._app_write or self._write
        return w.seal(ALERT, b"\x01\x00") if w is not None else b"\x15\x03\x03\x00\x02\x01\x00"

    def next_record(self) -> bytes | None:
        """Process buffered records until one carries application data:
        its plaintext; b"" after close_notify; None when more bytes are
        needed. Handshake progress on the way puts bytes in
        `data_to_send()`."""
        while not self.closed:
            if len(self._in) < 5:
                return None
            ctype = self._in[0]
            length = int.from_bytes(self._in[3:5], "big")
            if length > MAX_PLAINTEXT + 256:
                raise Tls13Error(f"record of {length} bytes: the server does not speak TLS")
            if len(self._in) < 5 + length:
                return None
            header = bytes(self._in[:5])
            body = bytes(self._in[5:5 + length])
            del self._in[:5 + length]
            if ctype == CHANGE_CIPHER_SPEC and not self.handshake_complete:
                continue
            if ctype == APPLICATION_DATA and self._read is not None:
                ctype, body = self._read.open(header, body)
            elif self._read is not None or ctype not in (HANDSHAKE, ALERT):
                raise Tls13Error(f"unexpected record type {ctype} from the server")
            if ctype == ALERT:
                self._alert(body)
                continue
            if ctype == HANDSHAKE:
                self._hs_buffer += body
                self._handshake_messages()
                continue
            if ctype == APPLICATION_DATA:
                if not self.handshake_complete:
                    raise Tls13Error("application data before the server's Finished")
                if body:
                    return body
                continue
            raise Tls13Error(f"unexpected record type {ctype} from the server")
        return b""

    def _alert(self, body: bytes) -> None:
        if len(body) != 2:
            raise Tls13Error("malformed alert")
        if body[1] == 0:
            self.closed = True
            return
        name = ALERTS.get(body[1], str(body[1]))
        raise Tls13Error(f"the server sent alert {name}")

    def _handshake_messages(self) -> None:
        while len(self._hs_buffer) >= 4:
            length = int.from_bytes(self._hs_buffer[1:4], "big")
            if len(self._hs_buffer) < 4 + length:
                return
            msg = bytes(self._hs_buffer[:4 + length])
            del self._hs_buffer[:4 + length]
            self._handshake(msg[0], msg[4:], msg)

    def _hash(self, data: bytes) -> bytes:
        assert self.suite is not None
        return hashlib.new(self.suite.hash_name, data).digest()

    def _handshake(self, kind: int, body: bytes, raw: bytes) -> None:
        state = self._state
        if self.handshake_complete:
            if kind == NEW_SESSION_TICKET:
                return  # no resumption
            if kind == KEY_UPDATE:
                self._key_update(body)
                return
            raise Tls13Error(f"unexpected handshake message {kind} after the handshake")
        if kind == SERVER_HELLO and state == "server_hello":
            self._server_hello(body)
            self._transcript += raw
            self._handshake_keys()
            self._state = "encrypted_extensions"
        elif kind == ENCRYPTED_EXTENSIONS and state == "encrypted_extensions":
            exts = _Reader(body, "EncryptedExtensions").extensions()
            if 16 in exts:
                r = _Reader(exts[16], "ALPN")
                self.alpn = _Reader(r.vec16(), "ALPN").vec8().decode("ascii", "replace")
            self._transcript += raw
            self._state = "certificate"
        elif kind == CERTIFICATE and state == "certificate":
            self._certificate(body)
            self._transcript += raw
            self._state = "certificate_verify"
        elif kind == CERTIFICATE_VERIFY and state == "certificate_verify":
            r = _Reader(body, "CertificateVerify")
            scheme, signature = r.u16(), r.vec16()
            content = (b" " * 64 + b"TLS 1.3, server CertificateVerify\x00"
                       + self._hash(self._transcript))
            _verify_signature(self.peer_certificates[0], scheme, signature, content)
            self._transcript += raw
            self._state = "finished"
        elif kind == FINISHED and state == "finished":
            self._server_finished(body, raw)
        elif kind == CERTIFICATE_REQUEST:
            raise Tls13Error("the server asks for a client certificate")
        elif kind == COMPRESSED_CERTIFICATE:
            raise Tls13Error("the server sent a compressed certificate")
        else:
            raise Tls13Error(f"unexpected handshake message {kind} (waiting for {state})")

    def _server_hello(self, body: bytes) -> None:
        r = _Reader(body, "ServerHello")
        r.take(2)
        random = r.take(32)
        if random == HRR_RANDOM:
            raise Tls13Error("the server asked for another key share (HelloRetryRequest)")
        session_id = r.vec8()
        suite = r.u16()
        r.u8()
        exts = r.extensions()
        if exts.get(43) != b"\x03\x04":
            raise Tls13Error("the server does not speak TLS 1.3")
        if session_id != self.session_id:
            raise Tls13Error("the server did not echo the session id")
        if suite not in SUITES:
            raise Tls13Error(f"the server chose cipher suite {suite:#06x}, not offered")
        self.suite = SUITES[suite]
        if 51 not in exts:
            raise Tls13Error("the server sent no key share")
        ks = _Reader(exts[51], "key_share")
        group, key = ks.u16(), ks.vec16()
        self.group = group
        self._shared = self._key_agreement(group, key)

    def _key_agreement(self, group: int, key: bytes) -> bytes:
        try:
            if group == X25519 and len(key) == 32:
                return self.shares.x25519.exchange(x25519.X25519PublicKey.from_public_bytes(key))
            if group == X25519MLKEM768 and self.shares.mlkem is not None and len(key) == 1120:
                x = self.shares.x25519.exchange(
                    x25519.X25519PublicKey.from_public_bytes(key[1088:]))
                return self.shares.mlkem.decapsulate(key[:1088]) + x
        except ValueError as e:
            raise Tls13Error(f"bad key share from the server: {e}") from None
        raise Tls13Error(f"the server chose key share group {group:#06x}, not offered")

    def _handshake_keys(self) -> None:
        suite = self.suite
        assert suite is not None
        h, n = suite.hash_name, suite.hash_len
        early = hkdf_extract(h, b"", bytes(n))
        derived = hkdf_expand_label(h, early, b"derived", self._hash(b""), n)
        hs = hkdf_extract(h, derived, self._shared)
        th = self._hash(self._transcript)
        self._c_hs = hkdf_expand_label(h, hs, b"c hs traffic", th, n)
        s_hs = hkdf_expand_label(h, hs, b"s hs traffic", th, n)
        self._s_hs = s_hs
        self._read = RecordProtection(suite, s_hs)
        self._write = RecordProtection(suite, self._c_hs)
        self._master = hkdf_extract(
            h, hkdf_expand_label(h, hs, b"derived", self._hash(b""), n), bytes(n))

    def _certificate(self, body: bytes) -> None:
        r = _Reader(body, "Certificate")
        r.vec8()  # request context
        entries = _Reader(r.vec24(), "Certificate")
        chain = []
        while entries.pos < len(entries.data):
            chain.append(entries.vec24())
            entries.vec16()  # per-certificate extensions (OCSP, SCT)
        if not chain:
            raise Tls13Error("the server sent no certificate")
        try:
            certificate_fields(chain[0])
        except ValueError as e:
            raise Tls13Error(f"the server's certificate does not parse: {e}") from None
        self.peer_certificates = chain
        if self.check_certificate is not None:
            self.check_certificate(chain)

    def _finished_mac(self, base: bytes) -> bytes:
        assert self.suite is not None
        h, n = self.suite.hash_name, self.suite.hash_len
        key = hkdf_expand_label(h, base, b"finished", b"", n)
        return hmac.new(key, self._hash(self._transcript), h).digest()

    def _server_finished(self, body: bytes, raw: bytes) -> None:
        assert self.suite is not None and self._write is not None
        if not hmac.compare_digest(body, self._finished_mac(self._s_hs)):
            raise Tls13Error("the server's Finished does not match the handshake")
        self._transcript += raw
        h, n = self.suite.hash_name, self.suite.hash_len
        th = self._hash(self._transcript)
        c_ap = hkdf_expand_label(h, self._master, b"c ap traffic", th, n)
        s_ap = hkdf_expand_label(h, self._master, b"s ap traffic", th, n)
        finished = bytes((FINISHED,)) + _u24(self._finished_mac(self._c_hs))
        # Middlebox compatibility (RFC 8446 D.4): Chrome sends one CCS.
        self._out += b"\x14\x03\x03\x00\x01\x01" + self._write.seal(HANDSHAKE, finished)
        self._transcript += finished
        self._read = RecordProtection(self.suite, s_ap)
        self._write = RecordProtection(self.suite, c_ap)
        self._app_write = self._write
        self._state = "done"
        self.handshake_complete = True

    def _key_update(self, body: bytes) -> None:
        assert self._read is not None and self._app_write is not None
        if body not in (b"\x00", b"\x01"):
            raise Tls13Error("malformed KeyUpdate")
        self._read = self._read.updated()
        if body == b"\x01":
            # update_requested: ours goes out with the old key, then we switch.
            self._out += self._app_write.seal(HANDSHAKE, b"\x18\x00\x00\x01\x00")
            self._app_write = self._write = self._app_write.updated()
