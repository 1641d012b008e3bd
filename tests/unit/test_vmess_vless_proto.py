"""VMess and VLESS cores (appliance/proto/vmess.py, vless.py) and their
config: vectors captured against sing-box's inbounds (a request Mirage's
encoder made with fixed randomness, and what sing-box answered through a
TCP or UDP echo), round trips of the chunk coding, and the load-time
refusals."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import itertools
import struct
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config.loader import parse_config
from appliance.config.protocols.vless import VlessOptions
from appliance.config.protocols.vmess import VmessOptions
from appliance.config.render import effective_config
from appliance.proto import vless
from appliance.proto.vmess import (
    COMMAND_MUX,
    COMMAND_UDP,
    ChunkOpener,
    VmessClient,
    VmessError,
    _Direction,
    _Shake,
    auth_id,
    cmd_key,
    encode_address,
    fnv1a32,
    kdf,
    user_id,
)
from appliance.proto.xudp import XudpCodec

UUID = "b831381d-6324-4d53-ad4f-8cda48b30811"
USER = user_id(UUID)


def fixed_random(seed: bytes) -> Callable[[int], bytes]:
    """Deterministic stand-in for os.urandom (SHA-256 in counter mode)."""
    key = hashlib.sha256(seed).digest()
    counter = itertools.count(1)

    def rnd(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(key + next(counter).to_bytes(4, "big")).digest()
        return out[:n]

    return rnd


# Captured with sing-box 1.14 (vmess inbound, this uuid, alterId 0): the
# request + first chunk ("hello vmess") Mirage sent at NOW with
# fixed_random(name), and the raw bytes sing-box answered (the echo).
NOW = 1796409405
VECTORS = [
    ("aes", {'security': 'aes-128-gcm'}, 23460,
     "0255f2972fa5dfe6bc4d043cbff11d31ea3dc0bc84ae6a79e92ca545577fe101883fb15c83b7c2f2"
     "fc9bcb0db94c05c0b6f3d054ebdd5f539a5e156d11280106b1078e053feb0fbe3257a2e68962c64b"
     "27219f793142baa504bd8f0ee1168d8e3d341d0ae75e2e7a418e4c80c4585292aa3ea578ef8eb718"
     "15158803470527aae6cbf2d395d369944234882ad86b36b1",
     "ff2cd457e0f43a4d7719267c1835c2dd15c214fe11a067caac7a7ef9c16c1c30b0afcfbcf05ce266"
     "c154333da8b43cbbc94ee0d7c800f61737f42894502c2c0b2750a3"),
    ("chacha_pad", {'security': 'chacha20-poly1305', 'global_padding': True}, 23460,
     "55f3b9e1cb848a149f41824c430eea2cccfd055a27ea8e160258ee30f51bd3577dccf26ae78bb8ca"
     "cb0a2df745d4b7caa3ce1783a382fd3ee2c5b8b607ce07e48fd301ff986d7174075001406ad1e8d5"
     "ffea600a405a996d197f28d1dabfbe2823a4422784d1ef078d105f92081511b33189fdcff2d1ac3b"
     "010e005162310d4da84d0105a3d6331a4deacf7d498df95aca55db5f89",
     "3f4f8328f58f6daa74e0f30def1c8940f345f0311eb44c625091fdb7f8bcd0fcaf279714b70a2801"
     "ffb1d7a4e209f591f1e97ef570ec66c111788fc8dacb71856250f0f662787e8a17a2188a5ebc91a2"
     "03677ed0290fecd61e55b8a97d579040840ba8f90acc61a4"),
    ("authlen",
     {'security': 'aes-128-gcm', 'authenticated_length': True, 'global_padding': True}, 23460,
     "dc961984c84f49c2c628bf363558a5d3b1fe8141829d7cd6395bb379f1a53f82b8bc14dfdbe9deac"
     "3b0e1f205f7ba769986da13c08a95ec6a3cdc12fbebd9d16e0d2baf8fac31996e96b6bea06a28ff6"
     "14a4395f6a51d22c96a2536dc5115c0159da964cb146ae03fd872445492e495506b49362061c68ae"
     "fa8376e78ce928f947c7c375e009861e4ca729c83c0b8f0a991d06e0ce67ac097235a870717a44d1"
     "23212b930a81ce289140124bd6542f2aebf9ab9b644381a77ad9c55b06a6a6e61b6aa0c9094d7616"
     "110fccbe468f9af8ad1c5d31",
     "51e46a3840b5da6b27599cffbe16bc2b85ae30fc11eda48388ac516264dc461b40afcac2663f062c"
     "7909b3c96293cfc30bef9dbba1e917d29d7307a0b421bce0658287f98668dc748f7eb15da87c55f5"
     "73cd063498ae"),
    ("none", {'security': 'none'}, 23460,
     "95c32b9e09dba2b7bddacd50ffbd36420e9ee6ec83ae360519570a3a4ff24d02b4a2262a5a270ac8"
     "5e3c369959a647ba70a9703d1c8d6119fe325d5170cc0799842113bf4fb9010fe7e357261f25dfa5"
     "60fa8f92ee5e8f01c25a5e601ecd114d5c1a1a79917d234df9b52accecc5196a2d3968656c6c6f20"
     "766d657373",
     "ea2edfb82708fabfca41dd71b51200024d5a08f7f2fc1132325a344a936056f724debeeef0b56865"
     "6c6c6f20766d657373"),
    ("udp", {'security': 'aes-128-gcm', 'command': 2}, 23459,
     "bf7425ab0d0c75a9ddc2f6850cd8298101ad9c8a0847776724529d3a0e19a20bdb4ab56b03a36954"
     "cb385ba113685570fa86874d8bb4954bd0016f2e93303ea5be3d96549dd0ffdd65784c9c614e3cac"
     "5efc90d70b8ccfda6201b201124624fdd9344e54f250b015b5951bbe8d7d9fc7a0026ca954ca83e2"
     "37952cc5c16f65141efd4edf154a343e9634a9ad7b3e085b98ed7690",
     "d1c27df85bb007c5c6cd4a8b4b2b3dd29a243a786803368830a9c175c142d12f6a11ac46ab9f7a15"
     "e2d310c32620db64145134e1f8c485953e7eef193232c995f50e79131b6f1623"),
]


@pytest.mark.parametrize(("name", "kw", "port", "sent", "answer"), VECTORS,
                         ids=[v[0] for v in VECTORS])
def test_vmess_vectors_from_sing_box(name: str, kw: dict[str, Any], port: int, sent: str,
                                     answer: str) -> None:
    c = VmessClient(USER, "127.0.0.1", port, now=NOW, random=fixed_random(name.encode()), **kw)
    udp = kw.get("command") == COMMAND_UDP
    body = c.seal_packet(b"hello vmess") if udp else c.seal(b"hello vmess")
    assert (c.request + body).hex() == sent
    raw = bytes.fromhex(answer)
    want = [b"echo:hello vmess"] if udp else [b"hello vmess"]
    assert c.receive_data(raw) == want
    # The same bytes one at a time: the header and chunk parsers resume.
    c2 = VmessClient(USER, "127.0.0.1", port, now=NOW, random=fixed_random(name.encode()), **kw)
    got: list[bytes] = []
    for i in range(len(raw)):
        got += c2.receive_data(raw[i:i + 1])
    assert b"".join(got) == want[0]


def test_kdf_is_nested_hmac_sha256() -> None:
    key = b"k" * 16
    assert kdf(key) == hmac.new(b"VMess AEAD KDF", key, hashlib.sha256).digest()
    assert len(kdf(key, b"a", b"b")) == 32 and kdf(key, b"a") != kdf(key, b"b")


def test_cmd_key_and_user_id() -> None:
    assert cmd_key(USER) == hashlib.md5(
        USER + b"c48619fe-8f02-49e0-b9e9-edf763e17e21").digest()
    # Not a uuid: its UUIDv5 under the nil namespace (Xray's rule).
    assert user_id("my-password") == uuid.uuid5(uuid.UUID(int=0), "my-password").bytes


def test_auth_id_decrypts_to_time_and_crc() -> None:
    key = cmd_key(USER)
    aid = auth_id(key, 1_700_000_000, b"abcd")
    dec = Cipher(algorithms.AES(kdf(key, b"AES Auth ID Encryption")[:16]), modes.ECB()).decryptor()
    plain = dec.update(aid) + dec.finalize()
    assert struct.unpack(">Q", plain[:8])[0] == 1_700_000_000 and plain[8:12] == b"abcd"
    assert struct.unpack(">I", plain[12:])[0] == zlib.crc32(plain[:12])


def test_address_and_fnv() -> None:
    assert encode_address("1.2.3.4", 80) == bytes.fromhex("0050010102 0304".replace(" ", ""))
    assert encode_address("example.com", 443) == b"\x01\xbb\x02\x0bexample.com"
    assert encode_address("::1", 53) == b"\x00\x35\x03" + ipaddress.ip_address("::1").packed
    assert fnv1a32(b"") == 0x811C9DC5 and fnv1a32(b"a") == 0xE40C292C


def reference_kdf(key: bytes, *path: bytes) -> bytes:
    """The KDF as v2ray defines it, one HMAC closure per level, nothing
    precomputed: what the unrolled chains in vmess.py must equal."""

    def hmac_over(inner: Callable[[bytes], bytes], k: bytes) -> Callable[[bytes], bytes]:
        if len(k) > 64:
            k = inner(k)
        k = k.ljust(64, b"\0")
        ipad = bytes(b ^ 0x36 for b in k)
        opad = bytes(b ^ 0x5C for b in k)
        return lambda m: inner(opad + inner(ipad + m))

    def fn(m: bytes) -> bytes:
        return hmac.new(b"VMess AEAD KDF", m, hashlib.sha256).digest()

    for value in path:
        fn = hmac_over(fn, value)
    return fn(key)


@pytest.mark.parametrize("path", [
    (),
    (b"AES Auth ID Encryption",),
    (b"AEAD Resp Header Len Key",),
    (b"auth_len",),
    (b"VMess Header AEAD Key", bytes(range(16))),
    (b"VMess Header AEAD Key_Length", bytes(range(16)), b"\xff" * 8),
    (b"VMess Header AEAD Nonce", b"\x00" * 16, b"nonce!!!"),
    (b"", b"", b""),
    (b"L" * 64, b"a" * 65, b"n" * 200),  # keys of a block and longer (hashed first)
    (b"one", b"two", b"three", b"four"),
])
def test_kdf_equals_the_nested_hmac_definition(path: tuple[bytes, ...]) -> None:
    for key in (cmd_key(USER), b"", b"k" * 32, b"long" * 40):
        assert kdf(key, *path) == reference_kdf(key, *path)
        assert kdf(key, *path) == reference_kdf(key, *path)  # the label's cached level again


# Requests (and the first sealed body) computed by the code before the
# KDF, auth id and address fast paths (a name, an IPv6 address, a mux
# request), with fixed_random(name) at NOW: the fast paths send the same
# bytes.
PINNED = [
    ("name", "www.alpha.test", 443,
     {"security": "aes-128-gcm", "authenticated_length": True, "global_padding": True},
     "b1907251e84d9f51f47ef0b2835f9e8830fc837165852ab261e49f9ad3e8dd490c639e0eeca869f3"
     "2829c0f85d0bfd4cfa79673f135f8544803edba420b83e8a9b56d1c68c12c56a8b11eea7cdb49fb1"
     "4e3a664e3c0b8ba1910887442d2e3e89091edfa2b04141953dd8d941f93519fadab7d99984d05b27"
     "5c557a8d162004c1c0e39775",
     "c5b2e84ad20d2b3eb6a7bc0f4d368d93432f784eec1b6d4e70b04ab57f0c497a053737c6639587d6"
     "9e61f157332e0948096160777ac8de1aedc398e0bdfd1a4b989222aaa7c35b"),
    ("v6", "[2001:db8::1]", 53, {"security": "chacha20-poly1305", "command": COMMAND_UDP},
     "9edc23a93aef94afe89ec697a634c74c2e3a3980526269656e4d499c692f847c6716386eac9a65d2"
     "5619198e2a0957e8fe5a1eb365186496cad52ca08709641715826e37f13f14db04ae61522782bfe5"
     "f8b5d8bd1d27b97a840025172b17064317ad657161a5050491637ffe09bd10ad46ecbf93bc5e89ca"
     "3c8d52a0b774077b9a3aa5cec44c",
     "3aa4e5af895a9012bfa99772a80dcc7b8d4ed67a346bdc21"),
    ("mux", "example.com", 80, {"security": "aes-128-gcm", "command": COMMAND_MUX},
     "91d6693bd77e0d84ae9951a93ecc82ce8e20189571910d6b0936995788cf0c247927a9ee5354212f"
     "172111ac85146cf286b706f7064fc19c104de149b197bfcabbeeec4514c6404467912f9984f2f64f"
     "097b4c3cabdcdffc241a363c6c6149310dc1ff5bb9ea69a2e93e5341031e19e9",
     "e404786bdae0f63742f732600f140924724c048fc982101e"),
]


@pytest.mark.parametrize(("name", "host", "port", "kw", "request_hex", "body_hex"), PINNED,
                         ids=[v[0] for v in PINNED])
def test_requests_are_the_bytes_the_old_code_sent(name: str, host: str, port: int,
                                                  kw: dict[str, Any], request_hex: str,
                                                  body_hex: str) -> None:
    for _ in range(2):  # the second connection reuses the user's cached keys
        c = VmessClient(USER, host, port, now=NOW, random=fixed_random(name.encode()), **kw)
        assert c.request.hex() == request_hex
        assert c.seal(b"pinned").hex() == body_hex


def test_response_header_sealed_by_the_reference_kdf_opens() -> None:
    c = VmessClient(USER, "www.alpha.test", 443, security="aes-128-gcm")
    head = bytes((c.response_v, 0, 0, 0))
    length_key = reference_kdf(c.response_key, b"AEAD Resp Header Len Key")[:16]
    length_iv = reference_kdf(c.response_iv, b"AEAD Resp Header Len IV")[:12]
    header_key = reference_kdf(c.response_key, b"AEAD Resp Header Key")[:16]
    header_iv = reference_kdf(c.response_iv, b"AEAD Resp Header IV")[:12]
    answer = (AESGCM(length_key).encrypt(length_iv, len(head).to_bytes(2, "big"), None)
              + AESGCM(header_key).encrypt(header_iv, head, None))
    assert c.receive_data(answer) == [] and c.established


def test_auth_ids_share_one_encryptor_and_still_decrypt() -> None:
    key = cmd_key(USER)
    dec = Cipher(algorithms.AES(reference_kdf(key, b"AES Auth ID Encryption")[:16]),
                 modes.ECB()).decryptor()
    for now, rand4 in ((1, b"abcd"), (2, b"efgh"), (1, b"abcd")):
        plain = dec.update(auth_id(key, now, rand4))
        assert plain[:12] == struct.pack(">Q", now) + rand4
        with pytest.raises(ValueError, match="4 bytes"):
            auth_id(key, now, rand4[:3])  # refused, and leaves nothing behind
    assert auth_id(key, 5, b"wxyz") == auth_id(key, 5, b"wxyz")


def _reference_address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.encode("idna")
        return struct.pack(">HBB", port, 2, len(name)) + name
    return struct.pack(">HB", port, 1 if ip.version == 4 else 3) + ip.packed


@pytest.mark.parametrize("host", ["www.alpha.test", "1.2.3.4", "[::1]", "fe80::1%eth0",
                                  "01.2.3.4", "1.2.3", "1.2.3.4.5", "123", "1e100.net",
                                  "\u0661.\u0662.\u0663.\u0664", "b\u00fccher.example", " 1.2.3.4"])
def test_address_fast_path_agrees_with_parsing_every_host(host: str) -> None:
    assert encode_address(host, 443) == _reference_address(host, 443)


def test_shake_masks_continue_past_the_first_squeeze() -> None:
    seed = bytes(range(16))
    stream = _Shake(seed)
    out = hashlib.shake_128(seed).digest(4000)
    assert [stream.next16() for _ in range(2000)] == [
        int.from_bytes(out[i:i + 2], "big") for i in range(0, 4000, 2)]


def _server_side(c: VmessClient) -> ChunkOpener:
    """An opener for what `c` sends (what the server would decode)."""
    return ChunkOpener(_Direction(c.security, c.option, c.body_key, c.body_iv,
                                  c.body_key, c.body_iv))


OPTIONS = [
    {"security": "aes-128-gcm"},
    {"security": "chacha20-poly1305", "global_padding": True},
    {"security": "aes-128-gcm", "authenticated_length": True},
    {"security": "chacha20-poly1305", "authenticated_length": True, "global_padding": True},
    {"security": "none"},
    {"security": "none", "command": COMMAND_UDP},
]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(OPTIONS), st.binary(max_size=40000), st.integers(1, 9000))
def test_chunks_round_trip_in_any_split(kw: dict[str, Any], data: bytes, step: int) -> None:
    c = VmessClient(USER, "example.com", 443, **kw)
    wire = c.seal(data)
    opener = _server_side(c)
    got: list[bytes] = []
    for i in range(0, len(wire), step):
        got += opener.feed(wire[i:i + step])
    assert b"".join(got) == data
    assert opener.buffered == 0


def test_large_writes_are_cut_into_chunks_the_server_reads() -> None:
    c = VmessClient(USER, "example.com", 443, security="aes-128-gcm")
    opener = _server_side(c)
    chunks = opener.feed(c.seal(b"x" * 100_000))
    assert [len(x) for x in chunks] == [15000] * 6 + [10000]


def test_a_tampered_chunk_or_header_fails() -> None:
    c = VmessClient(USER, "example.com", 443, security="aes-128-gcm")
    wire = bytearray(c.seal(b"payload"))
    wire[5] ^= 1
    with pytest.raises(VmessError, match="did not authenticate"):
        _server_side(c).feed(bytes(wire))
    with pytest.raises(VmessError, match="response header"):
        c.receive_data(bytes(40))


def test_vless_request_and_response() -> None:
    head = vless.request_header(USER, "example.com", 443)
    assert head == b"\x00" + USER + b"\x00\x01\x01\xbb\x02\x0bexample.com"
    head = vless.request_header(USER, "10.0.0.1", 53, command=vless.COMMAND_UDP,
                                flow="xtls-rprx-vision")
    assert head == (b"\x00" + USER + b"\x12\x0a\x10xtls-rprx-vision\x02\x00\x35\x01"
                    + bytes([10, 0, 0, 1]))
    r = vless.ResponseReader()
    assert r.feed(b"\x00") == b"" and not r.established
    assert r.feed(b"\x03ab") == b"" and not r.established
    assert r.feed(b"cbody") == b"body" and r.established
    with pytest.raises(vless.VlessError):
        vless.ResponseReader().feed(b"\x01\x00")


def test_vless_packets_split_and_join() -> None:
    wire = vless.encode_packet(b"one") + vless.encode_packet(b"") + vless.encode_packet(b"three")
    reader = vless.PacketReader()
    got = []
    for i in range(len(wire)):
        got += reader.feed(wire[i:i + 1])
    assert got == [b"one", b"", b"three"]


def test_xudp_frames() -> None:
    codec = XudpCodec("example.com", 53)
    addr = b"\x00\x35\x02\x0bexample.com"
    meta = len(addr) + 5
    assert codec.encode(b"q1") == (bytes([0, meta, 0, 0, 1, 1, 2]) + addr + b"\x00\x02q1")
    assert codec.encode(b"q2") == (bytes([0, meta, 0, 0, 2, 1, 2]) + addr + b"\x00\x02q2")
    keep_with_address = bytes([0, meta, 0, 0, 2, 1, 2]) + addr + b"\x00\x02a1"
    keep_bare = bytes([0, 4, 0, 0, 2, 1]) + b"\x00\x02a2"
    keepalive = bytes([0, 4, 0, 0, 4, 0])
    end = bytes([0, 4, 0, 0, 3, 0])
    wire = keep_with_address + keepalive + keep_bare + end + b"trailing"
    got: list[bytes] = []
    for i in range(len(wire)):
        got += codec.decode(wire[i:i + 1])
    assert got == [b"a1", b"a2"] and codec.ended
    with pytest.raises(VmessError):
        XudpCodec("example.com", 53).decode(bytes([0, 4, 0, 0, 1, 1]))


def test_mux_requests_carry_no_address() -> None:
    assert vless.request_header(USER, "example.com", 53, command=vless.COMMAND_MUX) == (
        b"\x00" + USER + b"\x00\x03")
    c = VmessClient(USER, "example.com", 53, command=COMMAND_MUX)
    plain = _open_request(c)
    assert plain[37] == COMMAND_MUX and len(plain) == 38 + (plain[35] >> 4) + 4


def _open_request(c: VmessClient) -> bytes:
    """The request header as the server decrypts it (AEAD, alterId 0)."""
    key = cmd_key(USER)
    aid, nonce = c.request[:16], c.request[34:42]
    length_key = kdf(key, b"VMess Header AEAD Key_Length", aid, nonce)[:16]
    length_iv = kdf(key, b"VMess Header AEAD Nonce_Length", aid, nonce)[:12]
    n = int.from_bytes(AESGCM(length_key).decrypt(length_iv, c.request[16:34], aid), "big")
    header_key = kdf(key, b"VMess Header AEAD Key", aid, nonce)[:16]
    header_iv = kdf(key, b"VMess Header AEAD Nonce", aid, nonce)[:12]
    plain = AESGCM(header_key).decrypt(header_iv, c.request[42:42 + n + 16], aid)
    assert fnv1a32(plain[:-4]) == int.from_bytes(plain[-4:], "big")
    return plain


def _profile(*proxies: dict[str, Any]) -> dict[str, Any]:
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]},
            "proxies": list(proxies), "rules": ["MATCH,DIRECT"]}


def test_vmess_and_vless_load_with_mihomo_keys_and_render_back() -> None:
    cfg = parse_config(_profile(
        {"name": "vm", "type": "vmess", "server": "vm.example", "port": 443, "uuid": UUID,
         "alterId": 0, "cipher": "chacha20-poly1305", "udp": True, "tls": True,
         "servername": "front.example", "network": "ws", "ws-opts": {"path": "/ray"},
         "global-padding": True, "packet-encoding": "xudp"},
        {"name": "vl", "type": "vless", "server": "vl.example", "port": 443, "uuid": UUID,
         "flow": "", "encryption": "none", "tls": False, "servername": "ignored.example",
         "skip-cert-verify": True, "client-fingerprint": "chrome"},
        {"name": "vision", "type": "vless", "server": "vl.example", "port": 443, "uuid": UUID,
         "tls": True, "flow": "xtls-rprx-vision-udp443"},
        {"name": "vl-ws", "type": "vless", "server": "vl.example", "port": 443, "uuid": UUID,
         "network": "ws", "flow": "xtls-rprx-vision"},
    ))
    vm, vl, vision, vl_ws = cfg.proxies
    # mihomo keeps the first 16 characters of `flow`, and ignores it over ws.
    assert vision.options == VlessOptions(uuid=UUID, flow="xtls-rprx-vision")
    assert vl_ws.options == VlessOptions(uuid=UUID)
    assert vm.options == VmessOptions(uuid=UUID, cipher="chacha20-poly1305",
                                      global_padding=True, packet_encoding="xudp")
    assert vm.tls_options is not None and vm.tls_options.sni == "front.example"
    assert vl.options == VlessOptions(uuid=UUID) and vl.tls_options is None
    assert parse_config(effective_config(cfg)) == dataclasses.replace(cfg, ignored_keys=())


@pytest.mark.parametrize(("proxy", "reason"), [
    ({"type": "vmess", "alterId": 64}, "alterId 64 (the legacy VMess header"),
    ({"type": "vless", "flow": "xtls-rprx-vision"}, "without tls over network tcp"),
    ({"type": "vless", "flow": "xtls-rprx-vision", "tls": True, "network": "grpc"},
     "without tls over network tcp"),
    ({"type": "vless", "flow": "xtls-rprx-direct", "tls": True}, "only xtls-rprx-vision"),
    ({"type": "vless", "encryption": "mlkem768x25519plus"}, "encryption"),
])
def test_what_mirage_cannot_speak_is_skipped_with_the_reason(proxy: dict[str, Any],
                                                             reason: str) -> None:
    p = {"name": "x", "server": "x.example", "port": 443, "uuid": UUID, **proxy}
    cfg = parse_config({**_profile(p), "proxy-groups": [
        {"name": "g", "type": "select", "proxies": ["x", "DIRECT"]}]})
    assert cfg.proxies == ()
    assert any(reason in k for k in cfg.ignored_keys), cfg.ignored_keys


def _server_hello(cipher: int = 0x1301, tls13: bool = True) -> bytes:
    ext = b"\x00\x2b\x00\x02\x03\x04" if tls13 else b"\xff\x01\x00\x01\x00"
    body = (b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + cipher.to_bytes(2, "big") + b"\x00"
            + len(ext).to_bytes(2, "big") + ext)
    hs = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + len(hs).to_bytes(2, "big") + hs


CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01" + bytes(506)
APP_DATA = b"\x17\x03\x03\x00\x20" + bytes(32)


def test_vision_pads_the_inner_handshake_then_goes_direct() -> None:
    client = vless.Vision(USER)
    server = vless.Vision(USER)  # unpadding is the same on both ends
    wire, raw = client.encode(CLIENT_HELLO)
    assert raw == b"" and wire[:16] == USER and wire[16] == vless.CMD_CONTINUE
    assert len(wire) >= 16 + 5 + 900  # short records grow to 900-1399 bytes
    assert server.decode(wire) == CLIENT_HELLO
    # The server's hello (TLS 1.3, AES-128-GCM), padded, then "direct".
    hello = _server_hello()
    reply, _ = server.encode(hello)
    assert client.decode(reply) == hello and not client.direct_read
    direct_block = bytes((vless.CMD_DIRECT, 0, 5, 0, 3)) + b"inner" + bytes(3)
    assert client.decode(direct_block) == b"inner" and client.direct_read
    # Our first application-data record: the last padded block, command 2;
    # everything after goes raw.
    wire, raw = client.encode(APP_DATA)
    assert raw == b"" and wire[0] == vless.CMD_DIRECT and client.direct_write
    assert client.encode(b"later") == (b"", b"later")


def test_vision_ends_padding_without_direct_for_tls12() -> None:
    client = vless.Vision(USER)
    client.encode(CLIENT_HELLO)
    hello = _server_hello(tls13=False)
    reply, _ = vless.Vision(USER).encode(hello)
    assert client.decode(reply) == hello
    wire, raw = client.encode(APP_DATA)
    assert raw == b"" and wire[0] == vless.CMD_END and not client.direct_write
    assert client.encode(b"later") == (b"later", b"")
    # The server ends its padding too: the rest of that read is plain.
    assert client.decode(bytes((vless.CMD_END, 0, 2, 0, 1)) + b"ab" + b"\0" + b"plain") == (
        b"abplain")
    assert client.decode(b"more") == b"more"


def test_vision_block_headers_split_across_reads() -> None:
    server = vless.Vision(USER)
    client = vless.Vision(USER)
    wire, _ = client.encode(CLIENT_HELLO)
    # The first read holds the uuid and a block header (a whole TLS record
    # does); after that a header may be cut anywhere.
    got = server.decode(wire[:30])
    for i in range(30, len(wire), 7):
        got += server.decode(wire[i:i + 7])
    assert got == CLIENT_HELLO


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_decoders_take_any_bytes_or_fail_with_their_error(reads: list[bytes]) -> None:
    client = VmessClient(USER, "example.com", 443)
    opener = _server_side(VmessClient(USER, "example.com", 443, global_padding=True))
    decoders: list[Callable[[bytes], object]] = [
        client.receive_data, opener.feed, XudpCodec("example.com", 53).decode,
        vless.ResponseReader().feed, vless.PacketReader().feed, vless.Vision(USER).decode,
    ]
    for decode in decoders:
        try:
            for data in reads:
                decode(data)
        except (VmessError, vless.VlessError):
            pass  # XudpError is a VmessError
