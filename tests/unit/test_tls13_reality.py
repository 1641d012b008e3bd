"""The TLS 1.3 client core (appliance/proto/tls13.py) and REALITY's client
side (appliance/proto/reality.py), without sockets.

- Known answers from a real handshake: tests/unit/data/
  reality_mihomo_handshake.json holds one REALITY handshake with mihomo
  1.19.32 as the server (the client's randomness fixed, the server's bytes
  as received, recorded once in the lab). Replayed here, the client must
  build the same ClientHello session id, accept the server's flight
  (REALITY's certificate proved, CertificateVerify and Finished checked)
  and decrypt the VLESS response and the HTTP answer behind it.
- The server's side of the session id, computed independently with
  cryptography's HKDF: it opens to version, time and short id.
- Against OpenSSL (Python's ssl, in memory): a full handshake and data
  both ways; REALITY's check refusing OpenSSL's ordinary certificate.
"""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.x509.oid import NameOID

from appliance.config.loader import parse_config
from appliance.config.loader.errors import ConfigError
from appliance.proto.reality import (
    RealityError,
    parse_public_key,
    parse_short_id,
    reality_client,
)
from appliance.proto.tls13 import (
    SESSION_ID_OFFSET,
    KeyShare,
    Tls13Client,
    Tls13Error,
    hkdf_expand_label,
)
from appliance.proto.vless import request_header
from appliance.proto.vmess import user_id

RECORDED = Path(__file__).parent / "data" / "reality_mihomo_handshake.json"


def _recorded() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(RECORDED.read_text())
    return data


def _recorded_client(rec: dict[str, Any]) -> Tls13Client:
    private = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(rec["x25519"]))
    tls = Tls13Client("www.alpha.test", random=bytes.fromhex(rec["random"]),
                      shares=KeyShare(private, None), grease=tuple(rec["grease"]))
    return reality_client("www.alpha.test", parse_public_key(rec["public_key"]),
                          parse_short_id(rec["short_id"]), now=rec["now"], tls=tls)


def _drain(client: Tls13Client) -> bytes:
    out = b""
    while (record := client.next_record()):
        out += record
    return out


def test_recorded_mihomo_handshake_replays() -> None:
    rec = _recorded()
    client = _recorded_client(rec)
    hello = client.start()
    assert client.session_id.hex() == rec["session_id"]
    assert hello[:3] == b"\x16\x03\x01"
    client.receive_data(bytes.fromhex(rec["server"]))
    first = client.next_record()  # the handshake, then the first data record
    assert client.handshake_complete and first
    assert client.suite is not None and client.suite.name == "TLS_AES_256_GCM_SHA384"
    # What the client answered: a compatibility CCS, then its Finished.
    assert client.data_to_send().startswith(b"\x14\x03\x03\x00\x01\x01\x17\x03\x03")
    request = request_header(user_id(rec["uuid"]), "www.alpha.test", rec["far_port"],
                             command=1, flow="")
    assert client.encrypt(request)[:3] == b"\x17\x03\x03"
    body = first + _drain(client)
    # The VLESS response header (version 0, no addons), then the far end's answer.
    assert body.startswith(b"\x00\x00HTTP/1.0 200")
    assert body.endswith(b"REALITY-MARKER 23001")


def test_recorded_server_flight_tampered_fails_with_bad_mac() -> None:
    rec = _recorded()
    client = _recorded_client(rec)
    client.start()
    server = bytearray(bytes.fromhex(rec["server"]))
    server[-1] ^= 1  # the last application record
    client.receive_data(bytes(server))
    with pytest.raises(Tls13Error, match="bad record MAC"):
        _drain(client)


def test_the_server_opens_the_session_id() -> None:
    """What a REALITY server does with the recorded ClientHello, computed
    with cryptography's HKDF rather than the client's own code."""
    rec = _recorded()
    client = _recorded_client(rec)
    hello = bytes(client.hello)
    server_key = x25519.X25519PrivateKey.from_private_bytes(
        base64.urlsafe_b64decode(rec["server_private_key"] + "="))
    shared = server_key.exchange(client.shares.x25519.public_key())
    random = bytes.fromhex(rec["random"])
    key = HKDF(hashes.SHA256(), 32, random[:20], b"REALITY").derive(shared)
    zeroed = hello[:SESSION_ID_OFFSET] + bytes(32) + hello[SESSION_ID_OFFSET + 32:]
    plain = AESGCM(key).decrypt(random[20:], client.session_id, zeroed)
    assert plain[:4] == b"\x01\x08\x02\x00"
    assert struct.unpack("!I", plain[4:8])[0] == rec["now"]
    assert plain[8:] == bytes.fromhex(rec["short_id"]).ljust(8, b"\x00")


def test_hkdf_expand_label_matches_cryptography() -> None:
    secret = bytes(range(32))
    label = b"tls13 key"
    info = struct.pack("!HB", 16, len(label)) + label + b"\x00"
    want = HKDFExpand(hashes.SHA256(), 16, info).derive(secret)
    assert hkdf_expand_label("sha256", secret, b"key", b"", 16) == want


def _chrome_extensions(hello: bytes) -> list[int]:
    pos = SESSION_ID_OFFSET + 32
    suites_len = int.from_bytes(hello[pos:pos + 2], "big")
    pos += 2 + suites_len
    pos += 1 + hello[pos]
    end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
    pos += 2
    codes = []
    while pos < end:
        code, length = struct.unpack("!HH", hello[pos:pos + 4])
        codes.append(code)
        pos += 4 + length
    return codes


@pytest.mark.parametrize("pq", [False, True])
def test_client_hello_has_chromes_extensions_in_order(pq: bool) -> None:
    client = Tls13Client("www.example.test", pq=pq)
    codes = _chrome_extensions(bytes(client.hello))
    grease = [c for c in codes if c & 0x0F0F == 0x0A0A]
    assert codes[0] in grease and codes[-1] in grease and len(grease) == 2
    assert [c for c in codes if c not in grease] == [
        0, 23, 0xFF01, 10, 11, 35, 16, 5, 13, 18, 51, 45, 43, 27, 17513]
    hello = bytes(client.hello)
    assert (b"\x11\xec\x04\xc0" in hello) is pq  # the hybrid share: 1184 + 32 bytes


def _openssl_server(tmp_path: Path) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """OpenSSL as a TLS 1.3 server in memory: (it, its incoming, its outgoing)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    ctx.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing


def test_handshake_and_data_with_openssl(tmp_path: Path) -> None:
    server, incoming, outgoing = _openssl_server(tmp_path)
    client = Tls13Client("t.test")
    incoming.write(client.start())
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    client.receive_data(outgoing.read())
    assert client.next_record() is None and client.handshake_complete
    assert client.alpn == "http/1.1"
    incoming.write(client.data_to_send() + client.encrypt(b"ping" * 10000))
    server.do_handshake()
    got = b""
    while len(got) < 40000:
        got += server.read(1 << 16)
    assert got == b"ping" * 10000
    server.write(b"pong" * 9000)
    client.receive_data(outgoing.read())
    assert _drain(client) == b"pong" * 9000
    with pytest.raises(ssl.SSLWantReadError):
        server.unwrap()  # close_notify out; waits for ours
    client.receive_data(outgoing.read())
    assert client.next_record() == b"" and client.closed


def test_reality_refuses_an_ordinary_server(tmp_path: Path) -> None:
    server, incoming, outgoing = _openssl_server(tmp_path)
    key = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    client = reality_client("t.test", key, parse_short_id("ab"))
    incoming.write(client.start())
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    client.receive_data(outgoing.read())
    with pytest.raises(RealityError, match=r"it answered with a certificate for CN=t\.test"):
        client.next_record()


@pytest.mark.parametrize(("text", "reason"), [
    ("not base64!", "not base64"),
    ("AAAA", "32 bytes, this is 3"),
])
def test_bad_public_key(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_public_key(text)


def test_short_id() -> None:
    assert parse_short_id("") == bytes(8)
    assert parse_short_id("0123abcd") == bytes.fromhex("0123abcd00000000")
    for bad in ("abc", "zz", "00" * 9):
        with pytest.raises(ValueError):
            parse_short_id(bad)


def _vless(reality: dict[str, Any]) -> dict[str, Any]:
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]}, "rules": ["MATCH,DIRECT"],
            "proxies": [{"name": "r", "type": "vless", "server": "vl.example", "port": 443,
                         "uuid": "0f8c3a9e-52d4-4c1b-a7e6-3b9d1e2f4a56", "tls": True,
                         "client-fingerprint": "chrome", "reality-opts": reality}]}


def test_reality_opts_load_and_bad_values_name_the_key() -> None:
    good = {"public-key": "A" * 43, "short-id": "0123abcd", "support-x25519mlkem768": True}
    tls = parse_config(_vless(good)).proxies[0].tls_options
    assert tls is not None and tls.reality is not None
    assert tls.reality.support_x25519mlkem768 and tls.reality.short_id == "0123abcd"
    for key, value, reason in (("public-key", "AAAA", "REALITY public key"),
                               ("short-id", "xyz", "REALITY short id")):
        with pytest.raises(ConfigError) as info:
            parse_config(_vless({**good, key: value}))
        assert info.value.path == f"proxies[0].reality-opts.{key}"
        assert reason in info.value.reason


def test_hybrid_key_share_is_mlkem_secret_then_x25519() -> None:
    """X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem): the server's share is
    the ML-KEM ciphertext then its X25519 key; the secret the ML-KEM one
    then the X25519 one. (The lab's REALITY cover server has no ML-KEM, and
    REALITY answers with the cover's group, so end to end it is X25519.)"""
    client = Tls13Client("t.test", pq=True)
    assert client.shares.mlkem is not None
    secret, ciphertext = client.shares.mlkem.public_key().encapsulate()
    server = x25519.X25519PrivateKey.generate()
    share = ciphertext + server.public_key().public_bytes_raw()
    got = client._key_agreement(0x11EC, share)
    assert got == secret + server.exchange(client.shares.x25519.public_key())
    with pytest.raises(Tls13Error, match="not offered"):
        Tls13Client("t.test")._key_agreement(0x11EC, share)
