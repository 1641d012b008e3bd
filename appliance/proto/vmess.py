"""VMess (AEAD header, alterId 0) client: the request header, the response
header and the body chunks, as bytes in and bytes out; no I/O.

The wire format is v2ray's as sing-vmess (the client mihomo uses) sends it:

- The request: `auth id` (16: AES-128-ECB of time, 4 random bytes and their
  CRC32, under a key derived from the user's `cmd key`), the header length
  sealed with AES-128-GCM (18), an 8-byte connection nonce, the header
  sealed (its length + 16). Keys and nonces come from `kdf` (nested
  HMAC-SHA256 keyed by "VMess AEAD KDF" and a path), bound to the auth id
  and connection nonce.
- The header: version 1, body IV (16) and key (16), a response check byte
  V, options, padding length << 4 | security, 0, command, port, address,
  up to 15 random bytes, FNV-1a 32 of all that.
- The response (server -> client) body key and IV are SHA-256 of the
  request's, truncated to 16; the server's response header (length sealed,
  then header sealed, both under keys derived from those) echoes V.
- The body, when the options say chunk stream: chunks of `size (2) +
  sealed data + padding`. With chunk masking the size is XORed with the
  next two bytes of a SHAKE128 stream seeded with the direction's IV; with
  global padding a further two bytes (drawn first) give `padding % 64`
  random bytes after the data; with authenticated length the size is
  itself sealed (18 bytes) under a key derived from the request key.
  AES-128-GCM and ChaCha20-Poly1305 nonces are a 2-byte chunk counter and
  IV[2:12]. Security `none` and `zero` on TCP send the body raw (no chunks);
  UDP always uses chunks: one datagram per chunk.

Failures raise `VmessError` with a short reason ("response header did not
authenticate", ...); a server that closes before answering (what a wrong
uuid gets) is the caller's to name.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from appliance.proto.socks5 import ip_literal

VERSION = 1
COMMAND_TCP = 1
COMMAND_UDP = 2
COMMAND_MUX = 3  # XUDP (appliance/proto/xudp.py): no address in the header

SECURITY_AES_128_GCM = 3
SECURITY_CHACHA20_POLY1305 = 4
SECURITY_NONE = 5
# mihomo `cipher` -> the security byte. `auto` is AES-128-GCM, as sing-vmess
# picks on amd64/arm64 (AES instructions); `zero` is `none` on the wire.
SECURITIES = {
    "auto": SECURITY_AES_128_GCM,
    "aes-128-gcm": SECURITY_AES_128_GCM,
    "chacha20-poly1305": SECURITY_CHACHA20_POLY1305,
    "none": SECURITY_NONE,
    "zero": SECURITY_NONE,
}

OPTION_CHUNK_STREAM = 0x01
OPTION_CHUNK_MASKING = 0x04
OPTION_GLOBAL_PADDING = 0x08
OPTION_AUTHENTICATED_LENGTH = 0x10

TAG = 16
# Plaintext per chunk: sing-vmess writes 15000 and reads chunks into 16 KiB
# buffers (sealed data + padding must fit).
MAX_CHUNK = 15000
MAX_PADDING = 64

_CMD_KEY_SALT = b"c48619fe-8f02-49e0-b9e9-edf763e17e21"


class VmessError(ValueError):
    """The server's bytes do not decode (bad response header, a chunk that
    does not authenticate, an impossible size)."""


def user_id(text: str) -> bytes:
    """The 16 bytes of a uuid; any other string maps to its UUIDv5 under the
    nil namespace, as Xray/sing-vmess do."""
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        return uuidlib.uuid5(uuidlib.UUID(int=0), text).bytes


@functools.lru_cache(maxsize=64)
def cmd_key(user: bytes) -> bytes:
    """The user's key: MD5(uuid bytes + a fixed salt). Kept per user: every
    connection of a proxy asks for the same one."""
    return hashlib.md5(user + _CMD_KEY_SALT).digest()


# HMAC's pads (RFC 2104) as translation tables: key.translate(...) is the
# key XOR 0x36 / 0x5C byte by byte, in C.
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class _KdfChain:
    """One level of the KDF as the chain of SHA-256 calls it unrolls into.

    HMAC over a hash H keyed with k is H(opad || H(ipad || m)). When H is
    itself such a nesting, evaluating it is still one chain: each SHA-256
    call hashes some 64-byte pad blocks and then the previous call's digest
    (the first: the message). So a level is `entry` (SHA-256 after the pads
    its first call starts with) and `tail` (SHA-256 after the pads of each
    following call); keying a level with k gives `entry + ipad(k)` then
    `tail`, then `entry + opad(k)` then `tail`. The pads are hashed once
    per level instead of on every call, and a call is a state copy, a
    32-byte update and a digest in C: a header key (four levels, 16 calls)
    took ~5 instead of ~9 us."""

    __slots__ = ("_entry", "_tail")

    def __init__(self, entry: hashlib._Hash, tail: tuple[hashlib._Hash, ...]) -> None:
        self._entry = entry
        self._tail = tail

    def keyed(self, key: bytes) -> _KdfChain:
        """HMAC keyed with `key` (block 64) over this level's function."""
        if len(key) > 64:
            key = self(key)
        key = key.ljust(64, b"\0")
        inner = self._entry.copy()
        inner.update(key.translate(_IPAD))
        outer = self._entry.copy()
        outer.update(key.translate(_OPAD))
        return _KdfChain(inner, (*self._tail, outer, *self._tail))

    def __call__(self, message: bytes) -> bytes:
        h = self._entry.copy()
        h.update(message)
        digest = h.digest()
        for prefix in self._tail:
            h = prefix.copy()
            h.update(digest)
            digest = h.digest()
        return digest


# The KDF's innermost level: HMAC-SHA256 keyed with "VMess AEAD KDF".
_KDF_ROOT = _KdfChain(hashlib.sha256(), ()).keyed(b"VMess AEAD KDF")


@functools.lru_cache(maxsize=64)
def _kdf_label(label: bytes) -> _KdfChain:
    """The level keyed with a path's first value: always one of the fixed
    labels ("VMess Header AEAD Key", ...), so keyed once per label."""
    return _KDF_ROOT.keyed(label)


def kdf(key: bytes, *path: bytes) -> bytes:
    """v2ray's VMess AEAD KDF: HMAC(HMAC(...HMAC(SHA-256, "VMess AEAD KDF"),
    path[0]), ..., path[-1]) over `key` (32 bytes)."""
    if not path:
        return _KDF_ROOT(key)
    chain = _kdf_label(path[0])
    for value in path[1:]:
        chain = chain.keyed(value)
    return chain(key)


@functools.lru_cache(maxsize=64)
def _auth_id_encryptor(key: bytes) -> CipherContext:
    """The user's auth id cipher, made once per cmd key and never finalized:
    ECB carries nothing from one block to the next, so one encryptor serves
    every connection."""
    aes_key = kdf(key, b"AES Auth ID Encryption")[:16]
    return Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()


def auth_id(key: bytes, now: int, rand4: bytes) -> bytes:
    """The 16-byte auth id: AES-128-ECB(time (8) + random (4) + CRC32)."""
    plain = struct.pack(">Q", now) + rand4
    plain += struct.pack(">I", zlib.crc32(plain))
    if len(plain) != 16:
        # A part block would stay in the shared encryptor and shift every
        # later auth id of this user.
        raise ValueError(f"auth id random must be 4 bytes, not {len(rand4)}")
    return _auth_id_encryptor(key).update(plain)


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def encode_address(host: str, port: int) -> bytes:
    """Port then address: 1 IPv4, 2 name (length-prefixed), 3 IPv6 (the
    VMess/VLESS order and numbering, not SOCKS5's)."""
    ip = ip_literal(host)
    if ip is None:
        name = host.encode("idna")
        if not 0 < len(name) < 256:
            raise VmessError(f"bad target name {host!r}") from None
        return struct.pack(">HBB", port, 2, len(name)) + name
    if ip.version == 4:
        return struct.pack(">HB", port, 1) + ip.packed
    return struct.pack(">HB", port, 3) + ip.packed


# SHAKE128's rate: the output one Keccak permutation gives. A short flow
# reads a few masks; 1024 bytes up front cost ~3 us per direction.
_SHAKE_FIRST = 168


class _Shake:
    """A SHAKE128 output stream read two bytes at a time. hashlib has no
    incremental squeeze, so the output is computed ahead, doubling when it
    runs out (amortised O(bytes read); one per direction per connection)."""

    def __init__(self, seed: bytes) -> None:
        self._hash = hashlib.shake_128(seed)
        self._out = self._hash.digest(_SHAKE_FIRST)
        self._pos = 0

    def next16(self) -> int:
        if self._pos + 2 > len(self._out):
            self._out = self._hash.digest(2 * len(self._out))
        v = (self._out[self._pos] << 8) | self._out[self._pos + 1]
        self._pos += 2
        return v


def _body_aead(security: int, key: bytes) -> AESGCM | ChaCha20Poly1305 | None:
    if security == SECURITY_AES_128_GCM:
        return AESGCM(key)
    if security == SECURITY_CHACHA20_POLY1305:
        k = hashlib.md5(key).digest()
        return ChaCha20Poly1305(k + hashlib.md5(k).digest())
    return None


class _Nonces:
    """Chunk nonces: a 2-byte big-endian counter, then IV[2:12]."""

    def __init__(self, iv: bytes) -> None:
        self._tail = iv[2:12]
        self._count = 0

    def next(self) -> bytes:
        n = self._count.to_bytes(2, "big") + self._tail
        self._count = (self._count + 1) & 0xFFFF
        return n


class _Direction:
    """One direction's chunk coding: data AEAD, size masking or sealing,
    padding."""

    def __init__(self, security: int, option: int, key: bytes, iv: bytes,
                 request_key: bytes, request_iv: bytes) -> None:
        self.chunked = bool(option & OPTION_CHUNK_STREAM)
        self.aead = _body_aead(security, key)
        self.nonces = _Nonces(iv)
        self.tag = TAG if self.aead is not None else 0
        shake = _Shake(iv) if option & (OPTION_CHUNK_MASKING | OPTION_GLOBAL_PADDING) else None
        self.padding = shake if option & OPTION_GLOBAL_PADDING else None
        self.length_aead: AESGCM | ChaCha20Poly1305 | None = None
        self.mask: _Shake | None = None
        if option & OPTION_AUTHENTICATED_LENGTH:
            length_key = kdf(request_key, b"auth_len")[:16]
            self.length_aead = (_body_aead(SECURITY_CHACHA20_POLY1305, length_key)
                                if security == SECURITY_CHACHA20_POLY1305
                                else AESGCM(length_key))
            self.length_nonces = _Nonces(request_iv)
        elif option & OPTION_CHUNK_MASKING:
            self.mask = shake
        self.size_bytes = 2 + TAG if self.length_aead is not None else 2


class ChunkSealer:
    """The sending side of a body: `seal(data)` -> the bytes to send."""

    def __init__(self, d: _Direction, random: Callable[[int], bytes] = os.urandom) -> None:
        self._d = d
        self._random = random

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        d = self._d
        if not d.chunked:
            return bytes(data)
        out: list[bytes] = []
        view = memoryview(data)
        for off in range(0, len(view), MAX_CHUNK):
            self._chunk(view[off:off + MAX_CHUNK], out)
        return b"".join(out)

    def seal_packet(self, payload: bytes) -> bytes:
        """One datagram as one chunk (UDP). Empty payloads are not sent:
        an empty chunk means end of stream."""
        out: list[bytes] = []
        self._chunk(memoryview(payload), out)
        return b"".join(out)

    def _chunk(self, piece: memoryview, out: list[bytes]) -> None:
        d = self._d
        sealed = (d.aead.encrypt(d.nonces.next(), piece, None) if d.aead is not None
                  else bytes(piece))
        padding = d.padding.next16() % MAX_PADDING if d.padding is not None else 0
        size = len(sealed) + padding
        if d.length_aead is not None:
            out.append(d.length_aead.encrypt(d.length_nonces.next(),
                                             (size - TAG).to_bytes(2, "big"), None))
        else:
            if d.mask is not None:
                size ^= d.mask.next16()
            out.append(size.to_bytes(2, "big"))
        out.append(sealed)
        if padding:
            out.append(self._random(padding))


class ChunkOpener:
    """The receiving side of a body: `feed(data)` -> the chunks' plaintexts
    complete so far (raw bytes when not chunked); `eof` once the peer sent
    the empty chunk that ends the stream."""

    def __init__(self, d: _Direction) -> None:
        self._d = d
        self._buf = bytearray()
        self._want = -1  # bytes of the current chunk (data + padding); -1: size next
        self._padding = 0
        self.eof = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        d = self._d
        if not d.chunked:
            return [bytes(data)] if data else []
        # Work on `data` itself unless a partial chunk waits: most reads
        # start on a chunk boundary, and then nothing is copied but the
        # leftover (sealed data goes to the AEAD as a view).
        if self._buf:
            self._buf += data
            src: bytes | bytearray = self._buf
        else:
            src = data
        out: list[bytes] = []
        pos = 0
        end = len(src)
        with memoryview(src) as view:
            while not self.eof:
                if self._want < 0:
                    if end - pos < d.size_bytes:
                        break
                    self._read_size(bytes(view[pos:pos + d.size_bytes]))
                    pos += d.size_bytes
                if end - pos < self._want:
                    break
                n = self._want - self._padding
                sealed = view[pos:pos + n]
                pos += self._want
                self._want = -1
                if d.aead is not None:
                    try:
                        plain = d.aead.decrypt(d.nonces.next(), sealed, None)
                    except Exception:
                        raise VmessError("a body chunk did not authenticate") from None
                else:
                    plain = bytes(sealed)
                if not plain:
                    self.eof = True
                    break
                out.append(plain)
        self._buf = bytearray(src[pos:]) if pos < end else bytearray()
        return out

    def _read_size(self, raw: bytes) -> None:
        d = self._d
        padding = d.padding.next16() % MAX_PADDING if d.padding is not None else 0
        if d.length_aead is not None:
            try:
                size = int.from_bytes(d.length_aead.decrypt(d.length_nonces.next(), raw, None),
                                      "big") + TAG
            except Exception:
                raise VmessError("a chunk length did not authenticate") from None
        else:
            size = int.from_bytes(raw, "big")
            if d.mask is not None:
                size ^= d.mask.next16()
        if size - padding < d.tag:
            if size - padding == 0 and d.tag == 0:
                self.eof = True  # an empty unsealed chunk ends the stream
                size = padding
            else:
                raise VmessError(f"bad chunk size {size} (padding {padding})")
        self._want = size
        self._padding = padding


class VmessClient:
    """One VMess connection, client side.

    `request` is what to send first (the sealed request header); then
    `seal`/`seal_packet` encode the body, and `receive_data` decodes what
    the server sends: first its response header (checked against ours),
    then the body's plaintext, or one datagram per chunk (UDP). `eof` once
    the server ended the body with an empty chunk.
    """

    def __init__(
        self,
        user: bytes,
        host: str,
        port: int,
        *,
        security: str = "auto",
        command: int = COMMAND_TCP,
        global_padding: bool = False,
        authenticated_length: bool = False,
        now: int | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        sec = SECURITIES[security]
        if sec == SECURITY_NONE:
            option = OPTION_CHUNK_STREAM if command == COMMAND_UDP else 0
        else:
            option = OPTION_CHUNK_STREAM | OPTION_CHUNK_MASKING
            if global_padding:
                option |= OPTION_GLOBAL_PADDING
            if authenticated_length:
                option |= OPTION_AUTHENTICATED_LENGTH
        key = cmd_key(user)
        self.body_key = random(16)
        self.body_iv = random(16)
        self.response_v = random(1)[0]
        padding_len = random(1)[0] % 16
        header = bytearray((VERSION,))
        header += self.body_iv + self.body_key
        header += bytes((self.response_v, option, padding_len << 4 | sec, 0, command))
        if command != COMMAND_MUX:
            header += encode_address(host, port)
        header += random(padding_len)
        header += struct.pack(">I", fnv1a32(bytes(header)))
        aid = auth_id(key, int(time.time()) if now is None else now, random(4))
        nonce = random(8)
        length_key = kdf(key, b"VMess Header AEAD Key_Length", aid, nonce)[:16]
        length_iv = kdf(key, b"VMess Header AEAD Nonce_Length", aid, nonce)[:12]
        header_key = kdf(key, b"VMess Header AEAD Key", aid, nonce)[:16]
        header_iv = kdf(key, b"VMess Header AEAD Nonce", aid, nonce)[:12]
        self.request = b"".join((
            aid,
            AESGCM(length_key).encrypt(length_iv, struct.pack(">H", len(header)), aid),
            nonce,
            AESGCM(header_key).encrypt(header_iv, bytes(header), aid),
        ))  # fmt: skip
        self.response_key = hashlib.sha256(self.body_key).digest()[:16]
        self.response_iv = hashlib.sha256(self.body_iv).digest()[:16]
        self.option = option
        self.security = sec
        self._sealer = ChunkSealer(_Direction(sec, option, self.body_key, self.body_iv,
                                              self.body_key, self.body_iv), random)
        self._opener = ChunkOpener(_Direction(sec, option, self.response_key, self.response_iv,
                                              self.body_key, self.body_iv))
        self._head = bytearray()
        self._head_len = -1
        self.established = False  # the response header is in

    @property
    def eof(self) -> bool:
        return self._opener.eof

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._sealer.seal(data)

    def seal_packet(self, payload: bytes) -> bytes:
        return self._sealer.seal_packet(payload)

    def receive_data(self, data: bytes | bytearray) -> list[bytes]:
        """The body plaintexts (or datagrams) that `data` completes."""
        if not self.established:
            self._head += data
            if not self._response_header():
                return []
            data, self._head = bytes(self._head), bytearray()
            if not data:
                return []
        return self._opener.feed(data)

    def _response_header(self) -> bool:
        """Consume the response header from `_head` when complete."""
        head = self._head
        if self._head_len < 0:
            if len(head) < 2 + TAG:
                return False
            key = kdf(self.response_key, b"AEAD Resp Header Len Key")[:16]
            iv = kdf(self.response_iv, b"AEAD Resp Header Len IV")[:12]
            try:
                plain = AESGCM(key).decrypt(iv, bytes(head[:2 + TAG]), None)
            except Exception:
                raise VmessError("response header did not authenticate") from None
            self._head_len = int.from_bytes(plain, "big")
            del head[:2 + TAG]
        if len(head) < self._head_len + TAG:
            return False
        key = kdf(self.response_key, b"AEAD Resp Header Key")[:16]
        iv = kdf(self.response_iv, b"AEAD Resp Header IV")[:12]
        try:
            plain = AESGCM(key).decrypt(iv, bytes(head[:self._head_len + TAG]), None)
        except Exception:
            raise VmessError("response header did not authenticate") from None
        if not plain or plain[0] != self.response_v:
            raise VmessError("response header does not answer our request")
        del head[:self._head_len + TAG]
        self.established = True
        return True
