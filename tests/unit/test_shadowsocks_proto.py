"""Shadowsocks framing without sockets: known vectors, round trips through a
test-side server, and the failures (wrong key, replay, stale timestamp).

Known vectors: HChaCha20 and XChaCha20-Poly1305 from
draft-irtf-cfrg-xchacha-03 (2.2.1, A.3.1); EVP_BytesToKey against
`openssl enc -md md5 -P`; one request each captured from shadowsocks-libev's
ss-local (aes-128-gcm) and sing-box's client (2022-blake3-aes-128-gcm),
opened here with the module's primitives. The server side used for round
trips is written here from SIP004/SIP022, not taken from the module.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config.loader import parse_config
from appliance.config.protocols.shadowsocks import ShadowsocksOptions, V2rayPluginOptions
from appliance.config.render import effective_config
from appliance.outbound.plugins.obfs import ObfsError, ObfsHttp, ObfsTls
from appliance.outbound.plugins.v2ray import MuxCool
from appliance.proto import shadowsocks as ss
from tests.config_problem import reported

PSK16 = bytes(range(16))
PSK32 = bytes(range(32))


# -- known vectors ----------------------------------------------------------------


def test_hchacha20_draft_vector() -> None:
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert ss.hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")


def test_xchacha20_poly1305_draft_vector() -> None:
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one "
                 b"tip for the future, sunscreen would be it.")
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    sealed = ss.XChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)
    assert sealed[:16].hex() == "bd6d179d3e83d43b9576579493c0e939"
    assert sealed[-16:].hex() == "c0875924c1c7987947deafd8780acf49"
    assert ss.XChaCha20Poly1305(key).decrypt(nonce, sealed, aad) == plaintext


def test_evp_bytes_to_key_matches_openssl() -> None:
    # openssl enc -aes-256-cbc -k password -nosalt -P -md md5
    assert ss.evp_bytes_to_key(b"password", 32).hex() == (
        "5f4dcc3b5aa765d61d8327deb882cf992b95990a9151374abd8ff8c5a7a0fe08")
    assert ss.evp_bytes_to_key(b"password", 16).hex() == "5f4dcc3b5aa765d61d8327deb882cf99"


# ss-local -m aes-128-gcm -k vector-pw, SOCKS5 CONNECT example.com:80, then
# "GET / HTTP/1.0\r\n\r\n".
LIBEV_REQUEST = bytes.fromhex(
    "a1a9b065b2f3fafa4100a1e65043d3eb19fb648f8131aed37ff43030b188373f1eb0780a83f66c6abf874d"
    "01b71e1e44fe115ac7d5d99918bf669081a1d7efcad52ff369a9e0b0d77d27e0a55dd39221f88bee6006"
    "0c162440d0b82a75565af3b4390539f77a60c549713bb59a9f9e7df7c495c945")


def test_libev_request_opens() -> None:
    server = Server(ss.METHODS["aes-128-gcm"], ss.evp_bytes_to_key(b"vector-pw", 16))
    address, payload = server.open_request(LIBEV_REQUEST)
    assert address == b"\x03\x0bexample.com\x00\x50"
    assert payload == b"GET / HTTP/1.0\r\n\r\n"


def test_singbox_2022_request_opens() -> None:
    # sing-box's client, 2022-blake3-aes-128-gcm, PSK = bytes 0..15.
    server = Server(ss.METHODS["2022-blake3-aes-128-gcm"], PSK16)
    address, payload = server.open_request(bytes.fromhex(SINGBOX_2022_REQUEST), check_time=False)
    assert address == b"\x03\x0bexample.com\x00\x50"
    assert payload == b"GET / HTTP/1.0\r\n\r\n"


# -- a server written from the specs, for round trips ------------------------------


class Server:
    """SIP004/SIP022 server side, enough to open a client's request and
    seal a response (`psk` for 2022 is the user PSK; `identities` the number
    of identity headers to skip)."""

    def __init__(self, method: ss.Method, key: bytes, identities: int = 0) -> None:
        self.m = method
        self.key = key
        self.identities = identities
        self.request_salt = b""

    def _subkey(self, salt: bytes) -> bytes:
        if self.m.is_2022:
            return ss.blake3_subkey(self.key, salt)
        return ss.aead_subkey(self.key, salt)

    def open_request(self, data: bytes, check_time: bool = True) -> tuple[bytes, bytes]:
        m = self.m
        salt = data[:m.salt_size]
        self.request_salt = salt
        aead = ss.new_aead(m.family, self._subkey(salt))
        pos = m.salt_size + 16 * self.identities
        n = 0

        def take(length: int) -> bytes:
            nonlocal pos, n
            out = aead.decrypt(n.to_bytes(m.nonce_size, "little"),
                               data[pos:pos + length + 16], None)
            pos += length + 16
            n += 1
            return out

        if m.is_2022:
            kind, stamp, length = struct.unpack(">BQH", take(11))
            assert kind == 0 and (not check_time or abs(stamp - time.time()) < 30)
            variable = take(length)
            alen = ss.address_length(variable)
            pad = int.from_bytes(variable[alen:alen + 2], "big")
            address, payload = variable[:alen], variable[alen + 2 + pad:]
        else:
            first = take(int.from_bytes(take(2), "big"))
            alen = ss.address_length(first)
            address, payload = first[:alen], first[alen:]
        while pos < len(data):
            payload += take(int.from_bytes(take(2), "big"))
        return address, payload

    def response(self, payload: bytes, *, salt: bytes | None = None,
                 stamp: float | None = None, request_salt: bytes | None = None) -> bytes:
        m = self.m
        salt = salt or bytes([7]) * m.salt_size
        aead = ss.new_aead(m.family, self._subkey(salt))
        n = 0

        def seal(piece: bytes) -> bytes:
            nonlocal n
            out = aead.encrypt(n.to_bytes(m.nonce_size, "little"), piece, None)
            n += 1
            return out

        size = ss.SS2022_MAX_CHUNK if m.is_2022 else ss.AEAD_MAX_CHUNK
        out = [salt]
        if m.is_2022:
            first, payload = payload[:size], payload[size:]
            out.append(seal(struct.pack(">BQ", 1, int(stamp if stamp is not None else time.time()))
                            + (request_salt or self.request_salt)
                            + len(first).to_bytes(2, "big")))
            if first:
                out.append(seal(first))
        for i in range(0, len(payload), size):
            piece = payload[i:i + size]
            out += [seal(len(piece).to_bytes(2, "big")), seal(piece)]
        return b"".join(out)


def key_for(method: ss.Method) -> bytes | list[bytes]:
    if method.is_2022:
        return [PSK16 if method.key_size == 16 else PSK32]
    return ss.evp_bytes_to_key(b"round-trip", method.key_size)


def server_for(method: ss.Method) -> Server:
    key = key_for(method)
    return Server(method, key[-1] if isinstance(key, list) else key)


def feed(client: ss.TcpClient, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    pos = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += client.receive_data(data[pos:cut])
        pos = cut
    return out


@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(sorted(ss.METHODS)),
       initial=st.binary(max_size=40000), later=st.binary(max_size=3000),
       answer=st.binary(min_size=1, max_size=70000), cuts=st.lists(st.integers(0, 1 << 20),
                                                                   max_size=6))
def test_tcp_round_trip(method: str, initial: bytes, later: bytes, answer: bytes,
                        cuts: list[int]) -> None:
    m = ss.METHODS[method]
    client = ss.TcpClient(m, key_for(m), "www.example.test", 443, salt_filter=ss.SaltFilter())
    server = server_for(m)
    request = client.request(initial) + (client.seal(later) if later else b"")
    address, payload = server.open_request(request)
    assert address == b"\x03\x10www.example.test\x01\xbb"
    assert payload == initial + later
    assert feed(client, server.response(answer), cuts) == answer
    assert client.pending == 0


def test_2022_request_without_payload_is_padded() -> None:
    m = ss.METHODS["2022-blake3-aes-256-gcm"]
    client = ss.TcpClient(m, [PSK32], "10.0.0.1", 80)
    server = Server(m, PSK32)
    request = client.request()
    address, payload = server.open_request(request)
    assert address == b"\x01\x0a\x00\x00\x01\x00\x50" and payload == b""
    # salt, fixed header + tag, address + padding length + 1..900 + tag
    assert len(request) > 32 + 27 + 7 + 2 + 16


def test_2022_identity_headers() -> None:
    m = ss.METHODS["2022-blake3-aes-128-gcm"]
    ipsk, upsk = PSK16, bytes(range(100, 116))
    client = ss.TcpClient(m, [ipsk, upsk], "a.test", 80)
    request = client.request(b"x")
    # The identity header: AES(identity subkey)(BLAKE3(user PSK)[:16]).
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    sub = ss.blake3_subkey(ipsk, client.salt, "shadowsocks 2022 identity subkey")
    dec = Cipher(algorithms.AES(sub), modes.ECB()).decryptor()
    import blake3

    assert dec.update(request[16:32]) + dec.finalize() == blake3.blake3(upsk).digest(length=16)
    assert Server(m, upsk, identities=1).open_request(request) == (b"\x03\x06a.test\x00\x50", b"x")


# -- failures ---------------------------------------------------------------------


def test_wrong_key_is_an_authentication_error() -> None:
    m = ss.METHODS["aes-256-gcm"]
    client = ss.TcpClient(m, ss.evp_bytes_to_key(b"ours", 32), "a.test", 80)
    client.request(b"hi")
    answer = Server(m, ss.evp_bytes_to_key(b"theirs", 32)).response(b"hello")
    with pytest.raises(ss.AuthenticationError, match="wrong cipher/password"):
        client.receive_data(answer)


def test_2022_response_checks() -> None:
    m = ss.METHODS["2022-blake3-aes-128-gcm"]
    salts = ss.SaltFilter()

    def exchange(**kw: object) -> bytes:
        client = ss.TcpClient(m, [PSK16], "a.test", 80, salt_filter=salts)
        server = Server(m, PSK16)
        server.open_request(client.request(b"q"))
        return client.receive_data(server.response(b"answer", **kw))  # type: ignore[arg-type]

    assert exchange(salt=b"\1" * 16) == b"answer"
    with pytest.raises(ss.ReplayError):
        exchange(salt=b"\1" * 16)  # the same server salt again
    with pytest.raises(ss.AuthenticationError, match="off our clock"):
        exchange(salt=b"\2" * 16, stamp=time.time() - 60)
    with pytest.raises(ss.AuthenticationError, match="another request"):
        exchange(salt=b"\3" * 16, request_salt=b"\0" * 16)


def test_salt_filter_forgets_after_two_generations() -> None:
    now = [0.0]
    salts = ss.SaltFilter(clock=lambda: now[0])
    salts.check_and_add(b"a")
    now[0] = ss.SALT_MEMORY + 1
    with pytest.raises(ss.ReplayError):
        salts.check_and_add(b"a")  # still within the previous generation
    now[0] = 3 * ss.SALT_MEMORY + 2
    salts.check_and_add(b"a")


def test_replay_window() -> None:
    w = ss.ReplayWindow(size=64)
    for i in (0, 1, 5, 3):
        w.check_and_add(i)
    for i in (3, 5):
        with pytest.raises(ss.ReplayError):
            w.check_and_add(i)
    w.check_and_add(200)
    with pytest.raises(ss.ReplayError):
        w.check_and_add(100)  # fell out of the window
    w.check_and_add(199)


def test_bad_passwords() -> None:
    m = ss.METHODS["2022-blake3-aes-256-gcm"]
    with pytest.raises(ValueError, match="base64"):
        ss.parse_psks(m, "not base64!")
    with pytest.raises(ValueError, match="16 bytes; 2022-blake3-aes-256-gcm takes 32"):
        ss.parse_psks(m, "AAECAwQFBgcICQoLDA0ODw==")
    with pytest.raises(ValueError, match="AES"):
        ss.parse_psks(ss.METHODS["2022-blake3-chacha20-poly1305"],
                      "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=:"
                      "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")


# -- UDP --------------------------------------------------------------------------


def udp_server_reply(m: ss.Method, key: bytes, client_packet: bytes, body: bytes,
                     packet_id: int = 0, server_session: bytes = b"S" * 8) -> bytes:
    """Open the client's packet as a server would and seal `body` back."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if not m.is_2022:
        salt = client_packet[:m.salt_size]
        aead = ss.new_aead(m.family, ss.aead_subkey(key, salt))
        aead.decrypt(bytes(m.nonce_size), client_packet[m.salt_size:], None)
        salt = b"\5" * m.salt_size
        return salt + ss.new_aead(m.family, ss.aead_subkey(key, salt)).encrypt(
            bytes(m.nonce_size), body, None)
    if m.family == "aes":
        block = Cipher(algorithms.AES(key), modes.ECB())
        d = block.decryptor()
        header = d.update(client_packet[:16]) + d.finalize()
        client_session = header[:8]
        ss.new_aead("aes", ss.blake3_subkey(key, client_session)).decrypt(
            header[4:], client_packet[16:], None)
        out_header = server_session + packet_id.to_bytes(8, "big")
        main = struct.pack(">BQ", 1, int(time.time())) + client_session + b"\0\0" + body
        e = block.encryptor()
        return (e.update(out_header) + e.finalize()
                + ss.new_aead("aes", ss.blake3_subkey(key, server_session)).encrypt(
                    out_header[4:], main, None))
    x = ss.XChaCha20Poly1305(key)
    plain = x.decrypt(client_packet[:24], client_packet[24:], None)
    client_session = plain[:8]
    nonce = b"\6" * 24
    main = (server_session + packet_id.to_bytes(8, "big") + struct.pack(">BQ", 1, int(time.time()))
            + client_session + b"\0\0" + body)
    return nonce + x.encrypt(nonce, main, None)


@pytest.mark.parametrize("method", sorted(ss.METHODS))
def test_udp_round_trip_and_replay(method: str) -> None:
    m = ss.METHODS[method]
    key = key_for(m)
    raw = key[0] if isinstance(key, list) else key
    client = ss.UdpClient(m, key)
    body = ss.encode_address("dns.example.test", 53) + b"query"
    packet = client.seal(body)
    reply = udp_server_reply(m, raw, packet, ss.encode_address("1.2.3.4", 53) + b"answer")
    assert client.open(reply) == b"\x01\x01\x02\x03\x04\x00\x35answer"
    if m.is_2022:
        with pytest.raises(ss.ReplayError):
            client.open(reply)
    with pytest.raises(ss.ShadowsocksError):
        client.open(reply[:-1] + bytes([reply[-1] ^ 1]))


# -- plugins ----------------------------------------------------------------------


def test_obfs_http() -> None:
    core = ObfsHttp("cdn.example", 8388)
    first = core.wrap(b"SALTED")
    head, body = first.split(b"\r\n\r\n", 1)
    assert head.startswith(b"GET / HTTP/1.1\r\nHost: cdn.example:8388\r\n")
    assert b"Upgrade: websocket" in head and b"Content-Length: 6" in head and body == b"SALTED"
    assert core.wrap(b"more") == b"more"
    answer = b"HTTP/1.1 101 Switching Protocols\r\nServer: nginx/1.2.3\r\n\r\nDATA"
    assert core.unwrap(answer[:20]) == b""
    assert core.unwrap(answer[20:]) == b"DATA"
    assert core.unwrap(b"rest") == b"rest"
    with pytest.raises(ObfsError):
        ObfsHttp("x", 80).unwrap(b"HTTP/1.1 400 Bad\r\n\r\n")


def test_obfs_tls() -> None:
    core = ObfsTls("cdn.example")
    hello = core.wrap(b"P" * 100)
    # simple-obfs's server checks these bytes (check_tls_request), then
    # takes the payload from the session ticket right after the fixed hello.
    assert hello[0] == 0x16 and hello[1:3] == b"\x03\x01" and hello[5] == 1
    assert hello[9:11] == b"\x03\x03"
    assert int.from_bytes(hello[3:5], "big") == len(hello) - 5
    assert hello[138:142] == b"\x00\x23\x00\x64" and hello[142:242] == b"P" * 100
    assert b"cdn.example" in hello[242:]
    later = core.wrap(b"Q" * 20000)
    assert later[:5] == b"\x17\x03\x03\x40\x00" and later[16389:16394] == b"\x17\x03\x03\x0e\x20"
    server = (b"\x16\x03\x01\x00\x5b" + bytes(91) + b"\x14\x03\x03\x00\x01\x01"
              + b"\x16\x03\x03\x00\x03abc" + b"\x17\x03\x03\x00\x02de")
    got = b"".join(core.unwrap(server[i:i + 7]) for i in range(0, len(server), 7))
    assert got == b"abcde"


def test_mux_cool_single_session() -> None:
    mux = MuxCool()
    first = mux.wrap(b"hello")
    meta_len = int.from_bytes(first[:2], "big")
    assert first[2:6] == b"\0\0\x01\0" and first[2 + meta_len:2 + meta_len + 6] == (
        b"\0\x04\0\0\x02\x01")
    assert first.endswith(b"\0\x05hello")
    assert not mux.wrap(b"x").startswith(first[:2 + meta_len])
    frames = (b"\0\x04\0\0\x02\x01\0\x03abc" + b"\0\x04\0\0\x04\0"  # data, keepalive
              + b"\0\x04\0\0\x02\x01\0\x02de" + b"\0\x04\0\0\x03\0")  # data, end
    out, ended = b"", False
    for i in range(0, len(frames), 5):
        data, end = mux.unwrap(frames[i:i + 5])
        out += data
        ended = ended or end
    assert out == b"abcde" and ended


SINGBOX_2022_REQUEST = (
    "920c247469d4339f68ff81e578db445b0342994e6126dd2c5a51496edb51327b49f6af1b0ba1f57570dedf"
    "d3b431c31abc9dc2e43c57f2d79a0c5c46ee8a58da3fc90b5a3d2d1dc91af954869899f009a1d3362ba67c"
    "415422464b096ffec4060cc569acb0a7e1370422f7fa4b87c0ec40078a49010f6bf7d89571bdf00f0dbc69"
    "05f333e5c898f814baa029def1833b3e8d689efa5f48dfc508a1f83a853df071521c74a7bc90c9fd568cc3"
    "9b2d01a755a5de8896d26d0d4984efd8bc04f0af91a78da12edb15911b920b69dd63550c93b63ac6a22ad7"
    "3645aed802fcda16de66af6f0caf9cc504e9b136ee41cef47b97006758de7ddd78c743fcf36a81af3825b7"
    "f7268d2a8110a2ba5d2fff701916459ab35721e52bc8348e9addf2b5ac8e526581d897d914fbc1a0d3bc16"
    "99a856b18a7673f5e9305e7df69336a31acafc712e14c407a8b47d814a922c0fe9f249dedb75ad08ff9309"
    "ddcb419d798f7668df91f9cf7821bd47d687bf086bddcf56fb9f9d290d5e1c84cf02fd2000af4b90132bae"
    "2ba840438f3c3a021ed349dfe38437e085642ff488a142483740f0a78b05f4696ea5e338d7b5ca44d67aba"
    "450f3d0797104a48fc58022d0039a2922ba7d5f3a9773a738d74cdd6a1931ed47ee6f4f6150818addd749a"
    "3934bf7c447d07d0d14527baf2978682bfcfec3c7da892e71a2d83663e4809bf059a6bde32ab0d3f7befe2"
    "a65af071063a80373eb9840f7e76405226e83d3cd03f023f902b6a6dba4d95e40dae8eb182f3989790dd90"
    "baf95169135114e81ee4e63e80d424c1f7b214dd149980fe78dfcfb401e742ae691d4e53cef86cbd20688f"
    "f32f938443dd9ceab609bef63f35570113aa600833fdbb63809f375463188bba5b5397651c71c0d09ab409"
    "9f2a7bdd7b4b0aa87e8894d70021e5ef162e1fabb3f2f3c9e1de0c6337bf1a27b2b2c3ef04d1201862ad56"
    "2e60656d2cb161b4538b7cd8b1d8c4b25f8c991d26b177afec94e2ee0e29dd78daa6f966acee18a0510b52"
    "66929654f950317ec53f3a378e76f49da15aae67a0d01ec642c47fc74a868a0eb50054627fd42711c3363c"
    "42536702a92de5919346f5b21b29e6ff686540a13c7f78e1b3686e047d331f0342d472246be980adc92f2b"
    "4ba9006e32d1b94732ac8bdee102389cb768728aa7b2bab351abe27ffaf39aab52f51e0b86233bd3596133"
    "0a7691a1fd8654b6695d698fd62db20d6ee8fdc3fbe5daca274e7a1dbbeea6f02d9bc3c48106d1fcd88e70"
    "37d31d61b23060bc659cf880e64fc86dce9cf23b8e1f2067e58eaa2e2b53e5a8d02eee0d5c7533b39d86f7"
    "68a995ec9eb25f27576ec88541926c423352936619eaca6bed1231e5b4400ddd7c29c311fc6db1e7b58a38"
    "abd77ea56e312e65c71baf8e")


# -- configuration ----------------------------------------------------------------


def _ss_profile(**proxy: Any) -> dict[str, Any]:
    entry = {"name": "s", "type": "ss", "server": "ss.example", "port": 8388,
             "cipher": "aes-128-gcm", "password": "pw", **proxy}
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]},
            "proxies": [entry], "proxy-groups": [{"name": "g", "type": "select",
                                                  "proxies": ["s", "DIRECT"]}],
            "rules": ["MATCH,g"]}


def test_config_plugins_and_render() -> None:
    cfg = parse_config(_ss_profile(
        cipher="2022-blake3-aes-128-gcm", password="AAECAwQFBgcICQoLDA0ODw==", udp=True,
        plugin="v2ray-plugin", **{"plugin-opts": {"mode": "websocket", "path": "/ws",
                                                  "tls": True, "mux": False}}))
    options = cfg.proxies[0].options
    assert isinstance(options, ShadowsocksOptions)
    assert options.v2ray_plugin == V2rayPluginOptions(host="bing.com", path="/ws", tls=True,
                                                      mux=False)
    rendered = effective_config(cfg, redact=True)["proxies"][0]
    assert rendered["password"] == "<redacted>" and rendered["plugin"] == "v2ray-plugin"
    again = parse_config(_ss_profile(**{k: v for k, v in effective_config(cfg)["proxies"][0]
                                        .items() if k not in ("name", "type")}))
    assert again.proxies == cfg.proxies


@pytest.mark.parametrize(("proxy", "why"), [
    ({"cipher": "rc4-md5"}, "not supported: insecure"),
    ({"cipher": "none"}, "not supported: insecure"),
    ({"plugin": "shadow-tls", "plugin-opts": {"host": "x"}}, "plugin 'shadow-tls'"),
    ({"plugin": "kcptun"}, "plugin 'kcptun'"),
])
def test_config_skips_with_the_reason(proxy: dict[str, Any], why: str) -> None:
    cfg = parse_config(_ss_profile(**proxy))
    assert cfg.proxies == ()
    assert any(why in line for line in cfg.ignored_keys), cfg.ignored_keys
    # A rule naming it loads (its flows go to COMPATIBLE); the reason is kept.
    cfg = parse_config({**_ss_profile(**proxy), "proxy-groups": [], "rules": ["MATCH,s"]})
    assert cfg.rules[0].target == "s"
    assert [(x.name, x.kind) for x in cfg.skipped] == [("s", "proxy")]
    assert why in cfg.skipped[0].reason


@pytest.mark.parametrize(("proxy", "path", "why"), [
    ({"cipher": "2022-blake3-aes-256-gcm", "password": "AAECAwQFBgcICQoLDA0ODw=="},
     "proxies[0].password", "takes 32"),
    ({"cipher": "2022-blake3-aes-128-gcm", "password": "pw"}, "proxies[0].password", "base64"),
    ({"cipher": "aes-512-gcm"}, "proxies[0].cipher", "must be one of"),
    ({"plugin": "obfs", "plugin-opts": {"mode": "quic"}}, "proxies[0].plugin-opts.mode",
     "must be one of"),
])
def test_config_errors(proxy: dict[str, Any], path: str, why: str) -> None:
    err = reported(_ss_profile(**proxy))
    assert err.path == path and why in err.reason
    assert "AAECAw" not in str(err)  # a key is never echoed


def test_config_udp_over_tcp_is_reported() -> None:
    cfg = parse_config(_ss_profile(**{"udp-over-tcp": True}))
    assert any("udp-over-tcp" in line and "not supported" in line for line in cfg.ignored_keys)
