"""The SSH client core without sockets: packet protection round trips for
every cipher, and whole conversations with a scripted server (key
exchange, host key pinning, auth, channels and their windows) written
here from RFC 4253/4252/4254. Interop with OpenSSH itself is
tests/integration/test_ssh.py."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.proto import ssh
from appliance.proto.ssh import Reader, SshClient, SshError, ssh_string


def _raw(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize(("cipher", "mac"), [
    ("chacha20-poly1305@openssh.com", ""), ("aes128-gcm@openssh.com", ""),
    ("aes256-gcm@openssh.com", ""), ("aes128-ctr", "hmac-sha2-256"),
    ("aes256-ctr", "hmac-sha2-512-etm@openssh.com"),
    ("aes128-ctr", "hmac-sha2-256-etm@openssh.com"),
])
def test_packets_round_trip_and_tampering_is_caught(cipher: str, mac: str) -> None:
    keys = {"iv": bytes(range(64)), "key": bytes(range(64, 128)), "mac": bytes(range(128, 192))}
    sender, receiver = ssh.make_cipher(cipher, mac, keys), ssh.make_cipher(cipher, mac, keys)
    for seq, payload in enumerate((b"\x5ehello", b"x" * 3000, b"\x02")):
        wire = ssh.seal_packet(sender, seq, payload)
        length = receiver.length(seq, wire[:receiver.head_size])
        assert len(wire) == 4 + length + receiver.tag_size
        covered = length + (4 if not receiver.aead else 0)
        assert covered % receiver.block == 0
        packet = receiver.open(seq, wire)
        assert packet[5:len(packet) - packet[4]] == payload
    bad = bytearray(ssh.seal_packet(sender, 3, b"\x5eabc"))
    bad[-1] ^= 1
    receiver.length(3, bytes(bad[:receiver.head_size]))
    with pytest.raises(SshError, match="authentication failed"):
        receiver.open(3, bytes(bad))


class ScriptedServer:
    """The server side of one conversation, just enough of it: version, a
    curve25519 exchange signed by an ed25519 host key, password auth for
    `user`/`secret`, direct-tcpip opens (refused for "refused.test") with a
    small window."""

    def __init__(self, window: int = 1000) -> None:
        self.host_key = ed25519.Ed25519PrivateKey.generate()
        self.sign = self.host_key.sign
        self.host_blob = ssh_string("ssh-ed25519") + ssh_string(_raw(self.host_key.public_key()))
        self.version = b"SSH-2.0-Scripted_1.0"
        self.kexinit = (bytes((ssh.MSG_KEXINIT,)) + bytes(16)
                        + ssh.name_list(["curve25519-sha256", ssh.STRICT_KEX_SERVER])
                        + ssh.name_list(["ssh-ed25519"])
                        + ssh.name_list(["aes128-gcm@openssh.com"]) * 2
                        + ssh.name_list(["hmac-sha2-256"]) * 2
                        + ssh.name_list(["none"]) * 2 + ssh.name_list([]) * 2 + b"\0" + bytes(4))
        self.send_cipher: ssh.PacketCipher = ssh.PacketCipher()
        self.recv_cipher: ssh.PacketCipher = ssh.PacketCipher()
        self.send_seq = self.recv_seq = 0
        self.window = window
        self.inbox = bytearray()
        self.started = False
        self.client_version = b""
        self.client_kexinit = b""
        self.channel_data: dict[int, bytearray] = {}
        self.adjusted = 0
        self.eofs: list[int] = []

    def packet(self, payload: bytes) -> bytes:
        out = ssh.seal_packet(self.send_cipher, self.send_seq, payload)
        self.send_seq += 1
        return out

    def greet(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return b"a banner line\r\n" + self.version + b"\r\n" + self.packet(self.kexinit)

    def feed(self, data: bytes) -> bytes:
        """The client's bytes -> the server's answer."""
        self.inbox += data
        out = b""
        if not self.client_version:
            end = self.inbox.index(b"\r\n")
            self.client_version = bytes(self.inbox[:end])
            del self.inbox[:end + 2]
        while True:
            c = self.recv_cipher
            if len(self.inbox) < c.head_size:
                return out
            length = c.length(self.recv_seq, bytes(self.inbox[:c.head_size]))
            total = 4 + length + c.tag_size
            if len(self.inbox) < total:
                return out
            packet = c.open(self.recv_seq, bytes(self.inbox[:total]))
            del self.inbox[:total]
            self.recv_seq += 1
            out += self.handle(packet[5:len(packet) - packet[4]])

    def handle(self, payload: bytes) -> bytes:
        msg, r = payload[0], Reader(payload, 1)
        if msg == ssh.MSG_KEXINIT:
            self.client_kexinit = payload
            return b""
        if msg == ssh.MSG_KEX_ECDH_INIT:
            q_c = r.string()
            eph = x25519.X25519PrivateKey.generate()
            q_s = _raw(eph.public_key())
            k = ssh.ssh_mpint(int.from_bytes(
                eph.exchange(x25519.X25519PublicKey.from_public_bytes(q_c)), "big"))
            h = hashlib.sha256(
                ssh_string(self.client_version) + ssh_string(self.version)
                + ssh_string(self.client_kexinit) + ssh_string(self.kexinit)
                + ssh_string(self.host_blob) + ssh_string(q_c) + ssh_string(q_s) + k).digest()
            sig = ssh_string("ssh-ed25519") + ssh_string(self.sign(h))
            out = self.packet(bytes((ssh.MSG_KEX_ECDH_REPLY,)) + ssh_string(self.host_blob)
                              + ssh_string(q_s) + ssh_string(sig))
            out += self.packet(bytes((ssh.MSG_NEWKEYS,)))

            def derive(letter: bytes) -> bytes:
                first = hashlib.sha256(k + h + letter + h).digest()
                return first + hashlib.sha256(k + h + first).digest()

            self.send_cipher = ssh.make_cipher("aes128-gcm@openssh.com", "", {
                "iv": derive(b"B"), "key": derive(b"D"), "mac": b""})
            self.pending_recv = ssh.make_cipher("aes128-gcm@openssh.com", "", {
                "iv": derive(b"A"), "key": derive(b"C"), "mac": b""})
            self.send_seq = 0  # strict KEX
            return out
        if msg == ssh.MSG_NEWKEYS:
            self.recv_cipher = self.pending_recv
            self.recv_seq = -1  # strict KEX: this packet was the last of its numbering
            return b""
        if msg == ssh.MSG_SERVICE_REQUEST:
            return self.packet(bytes((ssh.MSG_SERVICE_ACCEPT,)) + ssh_string(r.string()))
        if msg == ssh.MSG_USERAUTH_REQUEST:
            user, _service, method = r.text(), r.text(), r.text()
            if method == "password":
                r.boolean()
                if (user, r.text()) == ("user", "secret"):
                    return self.packet(bytes((ssh.MSG_USERAUTH_SUCCESS,)))
            return self.packet(bytes((ssh.MSG_USERAUTH_FAILURE,))
                               + ssh.name_list(["publickey", "password"]) + b"\0")
        if msg == ssh.MSG_CHANNEL_OPEN:
            r.string()
            sender, _window, _max = r.uint32(), r.uint32(), r.uint32()
            host, port = r.text(), r.uint32()
            if host == "refused.test":
                return self.packet(struct.pack(">BII", ssh.MSG_CHANNEL_OPEN_FAILURE, sender, 2)
                                   + ssh_string(f"connect to {host} port {port}: refused")
                                   + ssh_string(""))
            self.channel_data[sender] = bytearray()
            return self.packet(struct.pack(">BIIII", ssh.MSG_CHANNEL_OPEN_CONFIRMATION,
                                           sender, 100 + sender, self.window, 16384))
        if msg == ssh.MSG_CHANNEL_DATA:
            remote = r.uint32()
            self.channel_data[remote - 100] += r.string()
            return b""
        if msg == ssh.MSG_CHANNEL_WINDOW_ADJUST:
            r.uint32()
            self.adjusted += r.uint32()
            return b""
        if msg == ssh.MSG_CHANNEL_EOF:
            self.eofs.append(r.uint32() - 100)
            return b""
        return b""

    def send(self, payload: bytes) -> bytes:
        return self.packet(payload)


def _converse(client: SshClient, server: ScriptedServer) -> list[Any]:
    """Run the exchange until neither side has more to say; the events."""
    to_server = client.data_to_send()
    greeting = server.greet()
    if greeting:
        client.receive_data(greeting)
    events = []
    while True:
        to_server += client.data_to_send()
        if not to_server:
            break
        answer = server.feed(to_server)
        to_server = b""
        if answer:
            client.receive_data(answer)
        while (e := client.next_event()) is not None:
            events.append(e)
    return events


def test_password_login_and_a_channel_with_flow_control() -> None:
    server = ScriptedServer(window=1000)
    client = SshClient("user", password="secret")
    assert isinstance(_converse(client, server)[-1], ssh.Ready)
    assert client.negotiated["c2s"] == "aes128-gcm@openssh.com"
    assert client.server_key == server.host_blob
    ch = client.open_direct_tcpip("www.example.test", 80)
    assert ssh.ChannelOpened(ch) in _converse(client, server)
    client.send_data(ch, b"x" * 2500)
    _converse(client, server)
    # Only the peer's window went out; the rest waits for an adjust.
    assert len(server.channel_data[ch]) == 1000
    assert client.pending_bytes(ch) == 1500
    client.receive_data(server.send(struct.pack(">BII", ssh.MSG_CHANNEL_WINDOW_ADJUST,
                                                ch, 5000)))
    client.send_eof(ch)
    _converse(client, server)
    assert bytes(server.channel_data[ch]) == b"x" * 2500 and server.eofs == [ch]
    # Data from the server; our window re-opens only as it is consumed.
    chunk = ssh.MAX_PACKET
    for _ in range(ssh.WINDOW_REFILL // chunk):
        client.receive_data(server.send(struct.pack(">BI", ssh.MSG_CHANNEL_DATA, ch)
                                        + ssh_string(b"y" * chunk)))
        assert client.next_event() == ssh.ChannelData(ch, b"y" * chunk)
    _converse(client, server)
    assert server.adjusted == 0
    client.consumed(ch, ssh.WINDOW_REFILL)
    _converse(client, server)
    assert server.adjusted == ssh.WINDOW_REFILL


def test_a_refused_channel_says_why() -> None:
    server = ScriptedServer()
    client = SshClient("user", password="secret")
    _converse(client, server)
    ch = client.open_direct_tcpip("refused.test", 443)
    assert _converse(client, server) == [ssh.ChannelOpenFailed(
        ch, "connect failed: connect to refused.test port 443: refused")]


def test_wrong_password_fails_with_what_the_server_allows() -> None:
    client = SshClient("user", password="wrong")
    with pytest.raises(SshError, match="authentication failed for user 'user': tried "
                                       "password; the server allows publickey, password"):
        _converse(client, ScriptedServer())


def test_a_pinned_host_key_must_match() -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    pin = ssh_string("ssh-ed25519") + ssh_string(_raw(other))
    client = SshClient("user", password="secret", host_keys=[pin])
    with pytest.raises(SshError, match="host key mismatch: the server sent ssh-ed25519 SHA256:"):
        _converse(client, ScriptedServer())
    server = ScriptedServer()
    client = SshClient("user", password="secret", host_keys=[pin, server.host_blob])
    assert isinstance(_converse(client, server)[-1], ssh.Ready)


def test_a_forged_host_key_signature_is_refused() -> None:
    server = ScriptedServer()
    server.sign = lambda data: server.host_key.sign(data + b"!")
    with pytest.raises(SshError, match="host key signature does not verify"):
        _converse(SshClient("user", password="secret"), server)


def test_no_common_cipher_names_the_servers_offer() -> None:
    client = SshClient("user", password="secret", ciphers=("aes256-ctr",))
    with pytest.raises(SshError, match=r"no common cipher: the server offers "
                                       r"aes128-gcm@openssh\.com"):
        _converse(client, ScriptedServer())


def test_version_lines() -> None:
    client = SshClient("user", password="x")
    assert client.data_to_send().startswith(b"SSH-2.0-OpenSSH_8.9\r\n")
    with pytest.raises(SshError, match=r"speaks SSH-1\.5-old, not SSH 2"):
        client.receive_data(b"hello\r\nSSH-1.5-old\r\n")
    with pytest.raises(SshError, match="closed the connection"):
        SshClient("user", password="x").receive_data(b"")


def test_server_disconnect_reason() -> None:
    client = SshClient("user", password="x")
    client.receive_data(b"SSH-2.0-s\r\n")
    bye = bytes((ssh.MSG_DISCONNECT,)) + struct.pack(">I", 2) + ssh_string("too many") + \
        ssh_string("")
    with pytest.raises(SshError, match="server disconnected: too many"):
        client.receive_data(ssh.seal_packet(ssh.PacketCipher(), 0, bye))


def test_public_key_lines() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    blob = ssh.public_key_blob(key + " comment")
    assert Reader(blob).text() == "ssh-ed25519"
    assert ssh.public_key_blob(key.split()[1]) == blob
    with pytest.raises(ValueError, match="not a public key"):
        ssh.public_key_blob("ssh-ed25519 !!!")
    with pytest.raises(ValueError, match="the line says ssh-rsa"):
        ssh.public_key_blob("ssh-rsa " + key.split()[1])


_MESSAGES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 20, 21, 30, 31, 50, 51, 52, 53, 60, 80, 81,
                             82, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 200])
_PAYLOADS = st.lists(st.tuples(_MESSAGES, st.binary(max_size=64)), max_size=6)


@settings(max_examples=300, deadline=None)
@given(_PAYLOADS, st.booleans())
def test_any_server_message_fails_only_with_ssh_error(payloads: list[tuple[int, bytes]],
                                                     logged_in: bool) -> None:
    """Whatever messages a server sends, before the key exchange or once
    logged in with a channel open, the client raises SshError (or goes on),
    never anything else; and nothing but the key exchange's own messages
    makes progress before keys are in place."""
    key = ed25519.Ed25519PrivateKey.generate()
    client = SshClient("user", password="secret", private_key=key)
    server = ScriptedServer()
    if logged_in:
        _converse(client, server)
        assert client.ready
        client.open_direct_tcpip("www.example.test", 80)
        _converse(client, server)
    else:
        client.receive_data(b"SSH-2.0-fuzz\r\n")
    try:
        for msg, body in payloads:
            client.receive_data(server.send(bytes((msg,)) + body))
            while client.next_event() is not None:
                pass
    except SshError:
        pass
    if not logged_in:
        assert not client.ready


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_before_the_version_fail_only_with_ssh_error(data: bytes) -> None:
    client = SshClient("user", password="pw")
    try:
        client.receive_data(data + b"\n" + data)
    except SshError:
        pass


def test_pinned_keys_choose_the_algorithms_offered() -> None:
    ed = ssh_string("ssh-ed25519") + ssh_string(bytes(32))
    rsa_key = ssh_string("ssh-rsa") + ssh.ssh_mpint(65537) + ssh.ssh_mpint(3 << 1000)
    assert ssh.algorithms_for([ed]) == ("ssh-ed25519",)
    assert ssh.algorithms_for([rsa_key, ed]) == ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256",
                                                 "ssh-rsa")
    assert ssh.algorithms_for([]) == ()
