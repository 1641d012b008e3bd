"""REALITY's client side without I/O: the authentication a REALITY server
reads from the ClientHello's session id, and the certificate by which it
proves it is the server whose public key the profile holds.

The protocol (XTLS REALITY; mihomo's component/tls/reality.go and
sing-box's common/tls/reality_client.go are its clients):

- The client builds a TLS 1.3 ClientHello with a zero session id and an
  X25519 key share (appliance/proto/tls13.py).
- auth_key = HKDF-SHA256(ikm=X25519(key share's private key, server's
  public key), salt=random[:20], info="REALITY") (32 bytes). With the
  X25519MLKEM768 hybrid the X25519 half is used.
- The session id's first 16 bytes: client version (3 bytes), 0, the Unix
  time (4 bytes, big endian), the short id (8 bytes, zero padded). They
  are sealed with AES-256-GCM (ChaCha20-Poly1305 when the first offered
  suite is not AES-GCM) under auth_key, nonce random[20:], additional
  data the whole ClientHello message with the zero session id: 16 bytes of
  ciphertext + 16 of tag = the 32-byte session id.
- A server that opens it answers as itself, with a temporary Ed25519
  certificate whose signature field is HMAC-SHA512(auth_key, the
  certificate's public key). Any other server (or REALITY forwarding a
  client it could not authenticate to its cover site) sends a real
  certificate: the client refuses it at once with the reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time
import warnings

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from appliance.proto.tls13 import (
    SESSION_ID_OFFSET,
    Tls13Client,
    Tls13Error,
    certificate_fields,
    hkdf_expand,
)

# The client version REALITY servers may bound (min/max-client-ver);
# mihomo sends 1.8.2.
CLIENT_VERSION = (1, 8, 2)
SHORT_ID_LEN = 8


class RealityError(Tls13Error):
    """The server is not the REALITY server the options describe."""


def parse_public_key(text: str) -> bytes:
    """`public-key`: 32 bytes in unpadded URL-safe base64 (as mihomo and
    `xray x25519` write it). ValueError with the reason."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64 (URL-safe, unpadded)") from None
    if len(raw) != 32:
        raise ValueError(f"an X25519 public key is 32 bytes, this is {len(raw)}")
    return raw


def parse_short_id(text: str) -> bytes:
    """`short-id`: up to 16 hex digits (an even count), zero padded to 8 bytes."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError("not hex (an even count of hex digits)") from None
    if len(raw) > SHORT_ID_LEN:
        raise ValueError(f"at most {SHORT_ID_LEN * 2} hex digits")
    return raw.ljust(SHORT_ID_LEN, b"\x00")


def auth_key(private: x25519.X25519PrivateKey, server_public: bytes, random: bytes) -> bytes:
    shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(server_public))
    prk = hmac.new(random[:20], shared, "sha256").digest()
    return hkdf_expand("sha256", prk, b"REALITY", 32)


def seal_session_id(key: bytes, random: bytes, hello: bytes, short_id: bytes,
                    now: int, version: tuple[int, int, int] = CLIENT_VERSION) -> bytes:
    """The 32-byte session id for `hello` (its session id zero)."""
    if hello[SESSION_ID_OFFSET:SESSION_ID_OFFSET + 32] != bytes(32):
        raise ValueError("the ClientHello's session id must be zero when sealed")
    plain = bytes((*version, 0)) + struct.pack("!I", now & 0xFFFFFFFF) + short_id
    return AESGCM(key).encrypt(random[20:], plain, hello)


def certificate_proves(der: bytes, key: bytes) -> bool:
    """Whether `der` is REALITY's temporary certificate for `key`."""
    try:
        spki, signature = certificate_fields(der)
        public = load_der_public_key(spki)
    except (ValueError, UnsupportedAlgorithm):
        return False
    if not isinstance(public, ed25519.Ed25519PublicKey):
        return False
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hmac.compare_digest(hmac.new(key, raw, hashlib.sha512).digest(), signature)


def _describe(der: bytes) -> str:
    try:
        with warnings.catch_warnings():
            # Whatever answered: a serial number out of RFC 5280 is not our concern.
            warnings.simplefilter("ignore")
            cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "a certificate that does not parse"
    return f"a certificate for {cert.subject.rfc4514_string() or 'no subject'}"


def reality_client(server_name: str | None, public_key: bytes, short_id: bytes, *, pq: bool = False,
                   now: int | None = None, alpn: tuple[str, ...] = ("h2", "http/1.1"),
                   tls: Tls13Client | None = None) -> Tls13Client:
    """A Tls13Client whose ClientHello carries REALITY's authentication and
    which refuses, when its Certificate arrives, a server that does not
    prove the same key (RealityError saying what it sent instead).
    `tls` (tests) is a client built with fixed randomness."""
    client = tls or Tls13Client(server_name, alpn=alpn, pq=pq)
    key = auth_key(client.shares.x25519, public_key, client.random)
    stamp = int(time.time()) if now is None else now
    client.set_session_id(seal_session_id(key, client.random, bytes(client.hello), short_id,
                                          stamp))

    def check(chain: list[bytes]) -> None:
        if not certificate_proves(chain[0], key):
            raise RealityError(
                f"not authenticated by the REALITY server (wrong public-key or short-id, a "
                f"clock off by more than the server allows, or not a REALITY server): it "
                f"answered with {_describe(chain[0])}")

    client.check_certificate = check
    return client
