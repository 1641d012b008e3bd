"""A real DNS-over-HTTPS upstream for the lab and the tests: Debian's unbound.

`UnboundServer` writes an unbound.conf into a work directory and runs
`unbound -d -c CONF` (inside `ip netns exec NS` when a namespace is given).
unbound then serves, on every given address, RFC 8484 DoH over HTTP/2 at
`https://ADDR:doh_port/dns-query`, plain DNS on UDP/TCP `dns_port`, and
with `dot_port` DNS over TLS (RFC 7858) there. `log_queries` makes it log
each query with the client's address (`info: 127.0.0.1 www.lab.test. A IN`),
which shows where a query came from.

It answers only from data: each zone in `zones` is a `static` local zone with
an SOA (so NXDOMAIN/NODATA carry the SOA that RFC 2308 negative caching
needs), `records` become `local-data`, and the root itself is a `static` local
zone, so unbound never recurses: lab traffic never leaves the lab.

Owns: its work directory (a fresh temp dir unless one is given), the config,
its log, and exactly one process (the PID it started); `stop()` signals that
PID and nothing else. Fails with `UnboundError` (carrying unbound's log) when
unbound refuses the config, exits early, or does not answer in time.

Independent of the rest of `appliance.lab` on purpose: the namespace lab and
the tests both start it the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from dnslib import QTYPE, DNSRecord

_CLONE_NEWNET = 0x40000000
DEFAULT_TTL = 300


class UnboundError(Exception):
    """unbound did not start or did not answer; the message carries its log."""


@dataclass(frozen=True)
class ServerConfig:
    """What one unbound instance serves.

    `records` maps an owner name to records written as `"TYPE RDATA"` or
    `"TTL TYPE RDATA"` in zone-file syntax, e.g.
    `{"www.lab.test": ["A 192.0.2.10", "AAAA 2001:db8::10", "MX 10 mail.lab.test.",
    'TXT "hello"', "HTTPS 1 . alpn=h2 ipv4hint=192.0.2.10"]}`; PTR records are
    given under their `in-addr.arpa` name. Names outside `zones` are answered
    too (each gets its own local-data), but only names inside a zone get an
    SOA with their negative answers.
    """

    addresses: Sequence[str]
    cert: Path
    key: Path
    records: Mapping[str, Sequence[str]] = field(default_factory=dict)
    zones: Sequence[str] = ("lab.test",)
    doh_port: int = 443
    # None: DoH only (no plain UDP/TCP listener).
    dns_port: int | None = 53
    http_endpoint: str = "/dns-query"
    # SOA minimum = TTL of negative answers (RFC 2308 section 5).
    negative_ttl: int = 30
    # DNS over TLS on this port (None: none).
    dot_port: int | None = None
    log_queries: bool = False


def _fqdn(name: str) -> str:
    return name.rstrip(".") + "."


def _quote(line: str) -> str:
    # unbound's config parser takes either quote; TXT rdata needs double quotes
    # inside, so those lines are wrapped in single quotes.
    if '"' in line and "'" in line:
        raise ValueError(f"record mixes both quote characters: {line!r}")
    return f"'{line}'" if '"' in line else f'"{line}"'


def _local_data(name: str, record: str) -> str:
    first, _, rest = record.strip().partition(" ")
    ttl, rr = (first, rest) if first.isdigit() else (str(DEFAULT_TTL), record.strip())
    return f"{_fqdn(name)} {ttl} IN {rr}"


def render_config(config: ServerConfig, workdir: Path) -> str:
    """unbound.conf text for `config`, with pidfile and state under `workdir`."""
    lines = [
        "server:",
        "  verbosity: 1",
        "  use-syslog: no",
        '  logfile: ""',
        '  chroot: ""',
        '  username: ""',
        f'  directory: "{workdir}"',
        f'  pidfile: "{workdir / "unbound.pid"}"',
        "  num-threads: 1",
        "  so-reuseport: no",
        f"  https-port: {config.doh_port}",
        f'  http-endpoint: "{config.http_endpoint}"',
        f'  tls-service-key: "{config.key}"',
        f'  tls-service-pem: "{config.cert}"',
        *([f"  tls-port: {config.dot_port}"] if config.dot_port is not None else []),
        *(["  log-queries: yes"] if config.log_queries else []),
        "  access-control: 0.0.0.0/0 allow",
        "  access-control: ::/0 allow",
        "  do-not-query-localhost: yes",
        '  module-config: "iterator"',
        '  local-zone: "." static',
    ]
    for address in config.addresses:
        lines.append(f"  interface: {address}@{config.doh_port}")
        if config.dns_port is not None:
            lines.append(f"  interface: {address}@{config.dns_port}")
        if config.dot_port is not None:
            lines.append(f"  interface: {address}@{config.dot_port}")
    for zone in config.zones:
        apex = _fqdn(zone)
        lines.append(f'  local-zone: "{apex}" static')
        soa = (
            f"{apex} 3600 IN SOA ns.{apex} hostmaster.{apex} 1 3600 600 86400 "
            f"{config.negative_ttl}"
        )
        lines.append(f"  local-data: {_quote(soa)}")
    for name, records in config.records.items():
        for record in records:
            lines.append(f"  local-data: {_quote(_local_data(name, record))}")
    lines += ["remote-control:", "  control-enable: no", ""]
    return "\n".join(lines)


def _probe(netns: str | None, address: str, config: ServerConfig) -> bool:
    """True when unbound answers a plain DNS query (or, DoH only, accepts TCP)
    on `address`. Runs in its own thread: entering the namespace with
    setns(2) changes only the calling thread, and a socket keeps the
    namespace it was made in."""
    result = [False]

    def run() -> None:
        if netns is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    return
            finally:
                os.close(fd)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            if config.dns_port is not None:
                zone = config.zones[0] if config.zones else "."
                query = DNSRecord.question(_fqdn(zone), "SOA")
                with socket.socket(family, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(0.2)
                    sock.sendto(query.pack(), (address, config.dns_port))
                    reply = DNSRecord.parse(sock.recv(4096))
                    ok = reply.header.id == query.header.id
                    ok = ok and reply.q.qtype == QTYPE.SOA
            else:
                ok = True
            with socket.create_connection((address, config.doh_port), timeout=0.2):
                pass
            result[0] = ok
        except Exception:  # OSError, timeouts, dnslib's own parse errors
            result[0] = False

    thread = threading.Thread(target=run, name="unbound-probe", daemon=True)
    thread.start()
    thread.join(2.0)
    return result[0]


class UnboundServer:
    """One unbound process serving `config` (see the module docstring).

    `start()` starts it and waits until every address answers; `stop()`
    ends exactly that process and removes a work dir it created. Also a
    context manager (`with UnboundServer(cfg) as server:`).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        netns: str | None = None,
        workdir: Path | None = None,
        unbound: str = "unbound",
    ) -> None:
        self.config = config
        self.netns = netns
        self._own_workdir = workdir is None
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="ub-"))
        self._unbound = unbound
        self._proc: subprocess.Popen[bytes] | None = None
        self.conf_path = self.workdir / "unbound.conf"
        self.log_path = self.workdir / "unbound.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def doh_url(self, address: str | None = None) -> str:
        host = address or self.config.addresses[0]
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.config.doh_port}{self.config.http_endpoint}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 10.0) -> None:
        """Write the config, start unbound and `wait_ready(timeout)`."""
        if self._proc is not None:
            raise UnboundError("already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(render_config(self.config, self.workdir))
        check = subprocess.run(
            ["unbound-checkconf", str(self.conf_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise UnboundError(f"unbound-checkconf: {check.stdout}{check.stderr}")
        argv = [self._unbound, "-d", "-c", str(self.conf_path)]
        if self.netns is not None:
            # `ip netns exec` execs the command in place: the PID we get is
            # unbound's own.
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll every address until it answers; UnboundError if unbound exits
        or `timeout` seconds pass first."""
        if self._proc is None:
            raise UnboundError("not started")
        deadline = time.monotonic() + timeout
        pending = list(self.config.addresses)
        while pending:
            if self._proc.poll() is not None:
                raise UnboundError(
                    f"unbound exited with {self._proc.returncode}:\n{self.log_text()}"
                )
            pending = [a for a in pending if not _probe(self.netns, a, self.config)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise UnboundError(f"unbound not answering on {pending}:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate our own unbound (SIGTERM, then SIGKILL after 5 s) and
        remove the work directory if this object created it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> UnboundServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

