"""SSH end to end: curl in the lab's client namespace, `mirage run` in the
gateway, Debian's OpenSSH sshd in the upstream node (three of them: one
with its default algorithms, one held to aes128-ctr + hmac-sha2-256, one
to chacha20-poly1305), each started here with its own config, host keys and log in a temp dir.

The user is the lab's own `mirage` (it exists only in the upstream
namespace's passwd/shadow: the host's user database is untouched); its
public key reaches sshd through `AuthorizedKeysCommand` (sshd reads it as
root, so the temp dir's mode does not matter). sshd at LogLevel DEBUG1
logs `server_request_direct_tcpip: ... target NAME port N`: the proof
that the name, not an address, reached the server.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.lab.lab import Lab
from appliance.lab.mirage import MirageRun, lab_config

pytestmark = pytest.mark.netns

SERVER_IP = "192.168.57.10"
SERVER_NAME = "www.alpha.test"
PORT = 20022
PORT_CTR = 20023
PORT_CHACHA = 20024
PASSPHRASE = "lab-key-pass"


@dataclass
class Sshd:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _keygen(path: Path, kind: str, passphrase: str = "") -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "lab",
                    "-f", str(path)], check=True, timeout=30)
    return path.with_suffix(".pub").read_text().strip()


def _sshd(lab: Lab, d: Path, name: str, port: int, extra: str = "") -> Sshd:
    config = d / f"{name}.conf"
    config.write_text(
        f"Port {port}\nListenAddress {SERVER_IP}\n"
        f"HostKey {d / 'host_ed25519'}\nHostKey {d / 'host_rsa'}\n"
        "PidFile none\nUsePAM no\nPasswordAuthentication yes\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "AuthorizedKeysFile none\n"
        f"AuthorizedKeysCommand /bin/cat {d / 'authorized_keys'}\n"
        "AuthorizedKeysCommandUser root\n"
        # inet: forwarded connections go to the name's IPv4 address (the
        # lab's web server serves another page on IPv6).
        "AddressFamily inet\nAllowTcpForwarding yes\nLogLevel DEBUG1\n" + extra)
    log = d / f"{name}.log"
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    with open(log, "wb") as out:
        proc = lab.popen("upstream", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                         stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while f"listening on {SERVER_IP} port {port}" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return Sshd(proc, log)


class SshLab:
    def __init__(self, lab: Lab, mirage: MirageRun, sshd: Sshd, ctr: Sshd, chacha: Sshd,
                 ports: dict[str, int]) -> None:
        self.lab = lab
        self.mirage = mirage
        self.sshd = sshd
        self.ctr = ctr
        self.chacha = chacha
        self.ports = ports

    def curl(self, proxy: str, path: str = "/", *extra: str) -> subprocess.CompletedProcess[str]:
        first = self.ports[proxy]
        return self.lab.exec("client", [
            "curl", "-sS", "--max-time", "10", "--local-port", f"{first}-{first + 9}", *extra,
            f"http://{SERVER_NAME}{path}"], timeout=20)

    def wait_log(self, text: str, seconds: float = 5) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            log = self.mirage.log_text()
            if text in log:
                return log
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in mirage's log:\n{self.mirage.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def ssh(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshLab]:
    d = tmp_path_factory.mktemp("sshd")
    host_ed = _keygen(d / "host_ed25519", "ed25519")
    host_rsa = _keygen(d / "host_rsa", "rsa")
    user_pub = _keygen(d / "user_ed25519", "ed25519", PASSPHRASE)
    (d / "authorized_keys").write_text(user_pub + "\n")
    user = next(s for s in lab.topology.socks if s.username)
    assert user.username is not None and user.password is not None
    base = {"type": "ssh", "server": SERVER_NAME, "port": PORT, "username": user.username}
    proxies: dict[str, tuple[dict[str, Any], int]] = {
        "ssh-pw": ({"password": user.password}, 32000),
        "ssh-key": ({"private-key": str(d / "user_ed25519"),
                     "private-key-passphrase": PASSPHRASE, "host-key": [host_ed]}, 32010),
        "ssh-ctr": ({"password": user.password, "port": PORT_CTR,
                     "host-key-algorithms": ["rsa-sha2-256"]}, 32020),
        # Pinned to the server's RSA key (it has an ed25519 one too).
        "ssh-chacha": ({"password": user.password, "port": PORT_CHACHA,
                        "host-key": [host_rsa]}, 32050),
        # An SSH connection that rides a channel of another one.
        "ssh-chained": ({"password": user.password, "port": PORT_CHACHA,
                         "dialer-proxy": "ssh-pw"}, 32060),
        "ssh-wrong-pw": ({"password": "not-it"}, 32030),
        # The user's key is not the server's: a host key mismatch.
        "ssh-wrong-host": ({"password": user.password, "host-key": [user_pub]}, 32040),
    }
    cfg = lab_config(lab, appliance={"state-dir": str(lab.state_dir / "ssh-mirage-state")})
    cfg["proxies"] = [*cfg["proxies"], *({"name": name, **base, **opts}
                                         for name, (opts, _) in proxies.items())]
    cfg["rules"] = [f"SRC-PORT,{first}-{first + 9},{name}"
                    for name, (_, first) in proxies.items()] + cfg["rules"]
    servers: list[Sshd] = []
    try:
        # RekeyLimit: the server re-keys every 1 MB, so the downloads below
        # run through key re-exchanges the server starts.
        servers.append(_sshd(lab, d, "sshd", PORT, "RekeyLimit 1M\n"))
        servers.append(_sshd(lab, d, "sshd-ctr", PORT_CTR,
                             "Ciphers aes128-ctr\nMACs hmac-sha2-256\n"))
        servers.append(_sshd(lab, d, "sshd-chacha", PORT_CHACHA,
                             "Ciphers chacha20-poly1305@openssh.com\n"))
        run = MirageRun(lab, cfg, name="ssh-mirage")
        run.start()
        try:
            yield SshLab(lab, run, *servers, {n: first for n, (_, first) in proxies.items()})
        finally:
            run.stop()
    finally:
        for s in servers:
            s.proc.terminate()
            s.proc.wait(timeout=5)
        for f in (lab.state_dir / "ssh-mirage-state").glob("fakeip*"):
            f.unlink()


@pytest.mark.parametrize("proxy", ["ssh-pw", "ssh-key", "ssh-ctr", "ssh-chacha"])
def test_http_through_ssh_reaches_sshd_by_name(ssh: SshLab, proxy: str) -> None:
    server = {"ssh-ctr": ssh.ctr, "ssh-chacha": ssh.chacha}.get(proxy, ssh.sshd)
    target = f"target {SERVER_NAME} port 80"
    before = server.text().count(target)
    out = ssh.curl(proxy)
    assert out.returncode == 0, out.stderr + ssh.mirage.log_text()[-2000:]
    assert "MARKER-ALPHA" in out.stdout
    assert server.text().count(target) > before
    if proxy == "ssh-key":
        assert "Accepted publickey for" in server.text()
    cipher = {"ssh-ctr": "aes128-ctr MAC: hmac-sha2-256",
              "ssh-chacha": "chacha20-poly1305@openssh.com MAC: <implicit>"}.get(
                  proxy, "aes128-gcm@openssh.com MAC: <implicit>")
    assert f"kex: client->server cipher: {cipher}" in server.text()
    if proxy == "ssh-chacha":
        assert "kex: host key algorithm: rsa-sha2-512" in server.text()


def test_dialer_proxy_carries_the_ssh_connection(ssh: SshLab) -> None:
    out = ssh.curl("ssh-chained")
    assert out.returncode == 0, out.stderr + ssh.mirage.log_text()[-2000:]
    assert "MARKER-ALPHA" in out.stdout
    # The first server opened the channel to the second; the second's login
    # came from the first (same host), not from the gateway.
    assert f"target {SERVER_NAME} port {PORT_CHACHA}" in ssh.sshd.text()
    assert f"Accepted password for mirage from {SERVER_IP}" in ssh.chacha.text()


def test_big_download_and_parallel_flows_share_one_connection(ssh: SshLab) -> None:
    web = ssh.lab.topology.web
    assert ssh.curl("ssh-pw").returncode == 0  # the proxy's connection is up
    accepted = ssh.sshd.text().count("Accepted password for")
    first = ssh.ports["ssh-pw"]
    script = " & ".join(
        f"curl -sS --max-time 20 -o /dev/null -w '%{{size_download}}\\n' "
        f"--local-port {first + 4 + 2 * i}-{first + 5 + 2 * i} "
        f"http://{SERVER_NAME}{web.big_path}" for i in range(3))
    out = ssh.lab.exec("client", ["sh", "-c", script + " & wait"], timeout=40)
    assert out.stdout.split() == [str(web.big_bytes)] * 3, out.stderr
    assert ssh.sshd.text().count("SSH2_MSG_KEXINIT sent") > 3  # re-keyed on the way
    # The connection of the first test carried these too (no new login).
    assert ssh.sshd.text().count("Accepted password for") == accepted


def test_wrong_password_fails_fast_with_the_reason(ssh: SshLab) -> None:
    started = time.monotonic()
    out = ssh.curl("ssh-wrong-pw")
    assert out.returncode != 0
    assert time.monotonic() - started < 5
    log = ssh.wait_log("ssh-wrong-pw: authentication failed for user 'mirage'")
    assert "the server allows publickey, password" in log


def test_wrong_host_key_fails_with_the_reason(ssh: SshLab) -> None:
    out = ssh.curl("ssh-wrong-host")
    assert out.returncode != 0
    ssh.wait_log("ssh-wrong-host: host key mismatch: the server sent ssh-ed25519 SHA256:")


def test_a_dropped_connection_is_replaced(ssh: SshLab) -> None:
    assert ssh.curl("ssh-pw").returncode == 0
    # sshd serves each connection in a child of the listener: end those.
    children = subprocess.run(["pgrep", "-P", str(ssh.sshd.proc.pid)], capture_output=True,
                              text=True, timeout=10).stdout.split()
    assert children
    for pid in children:
        subprocess.run(["kill", pid], check=False, timeout=10)
    ssh.wait_log("ssh-pw: SSH connection ended")
    accepted = ssh.sshd.text().count("Accepted password for")
    out = ssh.curl("ssh-pw")
    assert out.returncode == 0, out.stderr + ssh.mirage.log_text()[-2000:]
    assert "MARKER-ALPHA" in out.stdout
    assert ssh.sshd.text().count("Accepted password for") == accepted + 1


def _descendants(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         timeout=10).stdout.split()
    return [p for child in out for p in (child, *_descendants(int(child)))]


def test_a_silent_server_is_given_up_and_replaced(ssh: SshLab) -> None:
    assert ssh.curl("ssh-pw").returncode == 0
    # Stop (not end) the processes serving the connection: it stays open and
    # says nothing, as a vanished host would.
    stopped = _descendants(ssh.sshd.proc.pid)
    assert stopped
    try:
        for pid in stopped:
            subprocess.run(["kill", "-STOP", pid], check=False, timeout=10)
        assert ssh.curl("ssh-pw").returncode != 0
        ssh.wait_log("ssh-pw: the SSH server stopped answering", seconds=10)
        out = ssh.curl("ssh-pw")
        assert out.returncode == 0, out.stderr + ssh.mirage.log_text()[-2000:]
        assert "MARKER-ALPHA" in out.stdout
    finally:
        for pid in stopped:
            subprocess.run(["kill", "-CONT", pid], check=False, timeout=10)
            subprocess.run(["kill", pid], check=False, timeout=10)
