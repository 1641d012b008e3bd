"""`mirage run` inside a lab's gateway namespace, as a real process.

Used by the demo and the end-to-end tests: `lab_config()` writes the lab's
Mirage configuration (addresses, the lab CA, proxies from the topology),
`MirageRun` starts `mirage run` on it in the gateway namespace, waits until
the appliance says it is running (capture rules applied last), and stops it
with a signal, like an operator or systemd would.

Owns: the config file and log under the lab's state dir, and the process.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from appliance.lab.lab import Lab
from appliance.lab.servers import terminate, wait_for_text

READY_LINE = " running (pid "


class MirageError(RuntimeError):
    """`mirage run` did not come up, or did not stop; the message carries the
    tail of its log."""


def lab_config(lab: Lab, **overrides: Any) -> dict[str, Any]:
    """The Mirage configuration for `lab`'s gateway, as a YAML-ready dict.

    `overrides` replace top-level keys; a dict value is merged one level deep
    (e.g. `dns={"nameserver": [...]}` keeps the other dns keys).
    """
    topo = lab.topology
    honest = topo.honest_resolver
    socks = topo.socks[0]
    http = topo.http_proxy
    cfg: dict[str, Any] = {
        "tproxy-port": 7893,
        "routing-mark": 255,
        "log-level": "info",
        "external-controller": "127.0.0.1:9090",
        "profile": {"store-fake-ip": True},
        "dns": {
            "enable": True,
            "listen": "0.0.0.0:53",
            "enhanced-mode": "fake-ip",
            "fake-ip-range": "198.18.0.1/16",
            "fake-ip-filter": ["+.lan", "time.*.test"],
            "nameserver": [f"https://{honest.address}{honest.path}"],
            "ca-file": str(lab.ca_path),
            "upstream-timeout": 2.0,
        },
        "proxies": [
            {"name": socks.name, "type": "socks5", "server": str(socks.address), "port": socks.port,
             "udp": True},
            {"name": "tinyproxy", "type": "http", "server": str(http.address), "port": http.port},
        ],
        "rules": [
            f"DOMAIN-SUFFIX,alpha.test,{socks.name}",
            "DOMAIN-SUFFIX,beta.test,tinyproxy",
            "MATCH,DIRECT",
        ],
        "appliance": {
            "lan": ["lan0"],
            "redirect": "nftables",
            "dns-hijack": True,
            "bypass": [],
            "state-dir": str(lab.state_dir / "mirage-state"),
            "store-flush-interval": 0.2,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            merged = copy.deepcopy(cfg[key])
            merged.update(value)
            cfg[key] = merged
        else:
            cfg[key] = value
    return cfg


class MirageRun:
    """One `mirage run -c <file>` in the lab's gateway namespace."""

    def __init__(self, lab: Lab, config: dict[str, Any], name: str = "mirage",
                 env: dict[str, str] | None = None) -> None:
        self.lab = lab
        self.config = config
        # Extra environment (a test's NOTIFY_SOCKET / WATCHDOG_USEC).
        self.env = dict(env or {})
        self.config_path = lab.state_dir / f"{name}.yaml"
        self.log_path = lab.state_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path | None:
        """The appliance's state dir from the config (None where it has none)."""
        value = self.config.get("appliance", {}).get("state-dir")
        return Path(value) if value else None

    def forget_fake_ips(self) -> None:
        """Remove the fake-IP store (the database and its journal files) from
        the state dir, so the next run there starts from empty mappings."""
        if self.state_dir is not None:
            for f in self.state_dir.glob("fakeip.sqlite3*"):
                f.unlink()

    def write_config(self) -> Path:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return self.config_path

    def start(self, timeout: float = 30.0) -> MirageRun:
        """Start and wait until the appliance reports running (all services
        bound, capture applied). Raises MirageError with the log tail."""
        self.write_config()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = self.lab.popen(
                "gateway",
                [sys.executable, "-m", "appliance", "run", "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text(offset)
            if READY_LINE in text:
                return self
            if self.proc.poll() is not None:
                raise MirageError(f"mirage run exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.1)
        self.kill()
        raise MirageError(f"mirage run not ready after {timeout:.0f} s:\n{self.log_text()[-3000:]}")

    def log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, seconds: float = 5, offset: int = 0) -> str:
        """The log from `offset` once `text` is in it (AssertionError after
        `seconds`)."""
        return wait_for_text(lambda: self.log_text(offset), text, seconds, "mirage's log")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait for it; returns its exit code."""
        if self.proc is None:
            return 0
        if not terminate(self.proc, sig, timeout):
            raise MirageError(f"mirage run ignored {signal.Signals(sig).name} for "
                              f"{timeout:.0f} s:\n{self.log_text()[-3000:]}")
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash. Leaves the capture rules behind, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def __enter__(self) -> MirageRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except MirageError:
            pass


@contextlib.contextmanager
def running(run: MirageRun) -> Iterator[MirageRun]:
    """`run` started, for a test module's fixture; on the way out stopped and
    its fake-IP store removed, so the next module's run starts afresh."""
    run.start()
    try:
        yield run
    finally:
        run.stop()
        run.forget_fake_ips()


class MirageRuns:
    """Starts `mirage run` variants in one lab, one after another, and stops
    every one of them at `close()` (test fixtures). `close()` also removes the
    fake-IP store, so the next user starts from empty mappings."""

    def __init__(self, lab: Lab, name: str = "mirage") -> None:
        self.lab = lab
        self.name = name
        self.running: list[MirageRun] = []

    def start(self, **overrides: Any) -> MirageRun:
        run = MirageRun(self.lab, lab_config(self.lab, **overrides), name=self.name)
        self.running.append(run)
        return run.start()

    def close(self) -> None:
        try:
            for run in self.running:
                run.stop()
        finally:
            # The store and the ledger: the next run starts as a new appliance.
            for f in (self.lab.state_dir / "mirage-state").glob("fakeip*"):
                f.unlink()


class BackendRuns(MirageRuns):
    """`MirageRuns` whose `start` takes the capture backend first
    (`appliance.redirect`), for tests that tell one story under each
    backend; `defaults` are top-level keys every run gets (a call's own
    keys win)."""

    def __init__(self, lab: Lab, name: str = "mirage",
                 defaults: dict[str, Any] | None = None) -> None:
        super().__init__(lab, name=name)
        self.defaults = dict(defaults or {})

    def start(self, backend: str, **overrides: Any) -> MirageRun:  # type: ignore[override]
        app = {"redirect": backend, **overrides.pop("appliance", {})}
        return super().start(appliance=app, **{**self.defaults, **overrides})
