"""The lab's real servers: their configs (rendered from the topology) and their processes.

Each server is a Debian package run in the foreground inside a namespace as
`ip netns exec NS ...` spawned in a new session (`ip netns exec` execs in
place, so the PID we get is the server's own, and it leads its own session
and process group; its forked workers share that group):

- nginx: one virtual host per test name, each the default server on its own
  addresses, body `MARKER-<NAME> host=<Host header> from=<client address>`, plus
  a fixed-size download at `web.big-path`.
- dante (danted): SOCKS5 with CONNECT, BIND and UDP ASSOCIATE, `debug: 1` so
  its log shows each request's address type; a second one with username auth.
- tinyproxy: HTTP CONNECT to `connect-ports` only.
- dnsmasq: the poisoned ISP resolver (answers only from `--address`).
- unbound: the honest resolver, DoH + plain DNS, with the config that
  appliance.lab.doh_server renders (started here rather than through
  `UnboundServer` so it gets a session of its own and a recorded PID that a
  `lab down` in another process can stop).

Owns only the files it writes under the state dir it is given and the
processes it starts. A process is identified by PID *and* start time (field 22
of /proc/PID/stat), so a stop after a crash or a reboot never signals a stranger
that reused the PID. Failures raise `ServerError` carrying the server's log.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dnslib import DNSRecord

from appliance.lab.doh_server import ServerConfig, render_config
from appliance.lab.topology import Socks, Topology


class ServerError(RuntimeError):
    """A server did not start or did not become ready; carries its log tail."""


@dataclass(frozen=True)
class Probe:
    """How to tell a server is ready: a TCP connect, or a DNS answer over UDP."""

    address: str
    port: int
    kind: str = "tcp"  # "tcp" | "dns"


@dataclass(frozen=True)
class ServerSpec:
    """One server process to start: its argv, the files it needs and its log."""

    name: str
    node: str
    argv: tuple[str, ...]
    log: Path
    files: dict[Path, str] = field(default_factory=dict)
    dirs: tuple[Path, ...] = ()
    # Files the server writes after dropping to user nobody: made beforehand.
    nobody_files: tuple[Path, ...] = ()
    probes: tuple[Probe, ...] = ()


@dataclass(frozen=True)
class ProcessRecord:
    """A started process, as saved in the lab's state file."""

    name: str
    pid: int
    start_time: int
    ns: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, object]) -> ProcessRecord:
        return cls(
            name=str(d["name"]),
            pid=int(str(d["pid"])),
            start_time=int(str(d["start_time"])),
            ns=str(d["ns"]),
        )


# --------------------------------------------------------------- configs


def _host(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{addr}]" if addr.version == 6 else str(addr)


def nginx_spec(
    topo: Topology, d: Path, cert: Path | None = None, key: Path | None = None
) -> ServerSpec:
    """nginx in the foreground as one process (master_process off): one PID to
    own and stop. Listens on each virtual host's own addresses, port 80, and
    with `cert`/`key` (which must carry every vhost's name and addresses)
    also on `web.https-port` with TLS and HTTP/2."""
    web = topo.web
    big = d / "big.bin"
    tmp = d / "nginx-tmp"
    tls = cert is not None and key is not None
    servers = []
    for v in web.vhosts:
        listens = "".join(f"        listen {_host(a)}:80 default_server;\n" for a in v.addresses)
        if tls:
            listens += "".join(
                f"        listen {_host(a)}:{web.https_port} ssl http2 default_server;\n"
                for a in v.addresses
            )
        servers.append(
            "    server {\n"
            f"{listens}"
            f"        server_name {v.name};\n"
            f"        location = {web.big_path} {{\n"
            "            default_type application/octet-stream;\n"
            f"            alias {big};\n"
            "        }\n"
            "        location / {\n"
            f'            return 200 "{v.marker} host=$host from=$remote_addr\\n";\n'
            "        }\n"
            "    }\n"
        )
    conf = (
        "daemon off;\n"
        "master_process off;\n"
        "worker_processes 1;\n"
        f"pid {d / 'nginx.pid'};\n"
        f"error_log {d / 'nginx-error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        "    default_type text/plain;\n"
        f"    access_log {d / 'nginx-access.log'};\n"
        f"    client_body_temp_path {tmp}/body;\n"
        f"    proxy_temp_path {tmp}/proxy;\n"
        f"    fastcgi_temp_path {tmp}/fastcgi;\n"
        f"    uwsgi_temp_path {tmp}/uwsgi;\n"
        f"    scgi_temp_path {tmp}/scgi;\n"
        "    sendfile on;\n"
        "    keepalive_timeout 30;\n"
        + (f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n" if tls else "")
        + f"{''.join(servers)}"
        "}\n"
    )
    conf_path = d / "nginx.conf"
    return ServerSpec(
        name="nginx",
        node=web.node,
        argv=("nginx", "-c", str(conf_path), "-p", str(d)),
        log=d / "nginx.out",
        files={conf_path: conf},
        dirs=(tmp,),
        probes=tuple(
            Probe(str(a), port)
            for v in web.vhosts
            for a in v.addresses
            for port in ((80, web.https_port) if tls else (80,))
        ),
    )


def write_big_file(topo: Topology, d: Path) -> Path:
    """The download behind `web.big-path`: pseudo-random (not compressible),
    the same bytes every time so a test can compare digests."""
    path = d / "big.bin"
    size = topo.web.big_bytes
    block = bytes((i * 2654435761 >> 13) & 0xFF for i in range(65536))
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    return path


def dante_spec(topo: Topology, socks: Socks, d: Path) -> ServerSpec:
    """danted in the foreground (no -D). `debug: 1` logs each request with its
    address type, e.g. `dorequest(): command 1 request received from client
    192.168.56.10.49554 ... Packet: VER: 5 CMD: 1 FLAG: 0 ATYP: 3 address:
    www.alpha.test.80` (ATYP 3: the client sent a name, RFC 1928 section 5)."""
    log = d / f"{socks.name}.log"
    method = "username" if socks.username else "none"
    conf = (
        f"logoutput: {log}\n"
        "debug: 1\n"
        f"internal: {socks.address} port = {socks.port}\n"
        f"external: {_external_iface(topo, socks.node)}\n"
        "external.rotation: route\n"
        f"socksmethod: {method}\n"
        "clientmethod: none\n"
        "user.privileged: root\n"
        "user.unprivileged: nobody\n"
        "timeout.negotiate: 10\n"
        "timeout.io: 600\n"
        "client pass {\n"
        "    from: 0.0.0.0/0 to: 0.0.0.0/0\n"
        "    log: error connect disconnect\n"
        "}\n"
        "client pass {\n"
        "    from: ::/0 to: ::/0\n"
        "    log: error connect disconnect\n"
        "}\n"
        "socks pass {\n"
        "    from: 0/0 to: 0/0\n"
        "    command: bind connect udpassociate bindreply udpreply\n"
        f"    socksmethod: {method}\n"
        "    log: error connect disconnect iooperation\n"
        "}\n"
    )
    conf_path = d / f"{socks.name}.conf"
    return ServerSpec(
        name=socks.name,
        node=socks.node,
        argv=(
            "danted",
            "-f",
            str(conf_path),
            "-p",
            str(d / f"{socks.name}.pid"),
            "-N",
            "1",
        ),
        log=d / f"{socks.name}.out",
        files={conf_path: conf},
        probes=(Probe(str(socks.address), socks.port),),
    )


def _external_iface(topo: Topology, node: str) -> str:
    # The node's only (first) interface carries its outgoing traffic.
    return topo.node(node).interfaces[0].name


def tinyproxy_spec(topo: Topology, d: Path) -> ServerSpec:
    """tinyproxy in the foreground (-d), CONNECT only to `connect-ports`."""
    hp = topo.http_proxy
    conf = (
        f"Port {hp.port}\n"
        f"Listen {hp.address}\n"
        "User nobody\n"
        "Group nogroup\n"
        "Timeout 600\n"
        f'LogFile "{d / "tinyproxy.log"}"\n'
        "LogLevel Info\n"
        f'PidFile "{d / "tinyproxy.pid"}"\n'
        "MaxClients 100\n"
        "DisableViaHeader Yes\n" + "".join(f"ConnectPort {p}\n" for p in hp.connect_ports)
    )
    conf_path = d / "tinyproxy.conf"
    return ServerSpec(
        name="tinyproxy",
        node=hp.node,
        argv=("tinyproxy", "-d", "-c", str(conf_path)),
        log=d / "tinyproxy.out",
        files={conf_path: conf},
        nobody_files=(d / "tinyproxy.log",),
        probes=(Probe(str(hp.address), hp.port),),
    )


def dnsmasq_spec(topo: Topology, d: Path) -> ServerSpec:
    """dnsmasq in the foreground (-k): answers only its forged `--address`
    entries, refuses the rest (no upstream, no /etc/hosts), logs each query."""
    pr = topo.poisoned_resolver
    argv = [
        "dnsmasq",
        "-k",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        f"--listen-address={pr.address}",
        "--except-interface=lo",
        "--port=53",
        "--user=nobody",
        "--cache-size=0",
        "--log-queries",
        f"--log-facility={d / 'dnsmasq.log'}",
        f"--pid-file={d / 'dnsmasq.pid'}",
    ]
    for name, addrs in pr.answers.items():
        argv += [f"--address=/{name}/{a}" for a in addrs]
    probe_name = next(iter(pr.answers), "example.test")
    return ServerSpec(
        name="dnsmasq",
        node=pr.node,
        argv=tuple(argv),
        log=d / "dnsmasq.out",
        probes=(Probe(str(pr.address), 53, f"dns:{probe_name}"),),
    )


def tls_subjects(topo: Topology) -> tuple[list[str], list[str]]:
    """The IPs and names the lab's one server certificate covers: the honest
    resolver (DoH) and every web vhost (for `certs.make_ca_and_cert`)."""
    hr = topo.honest_resolver
    ips, names = hr.addresses, [hr.name]
    for v in topo.web.vhosts:
        ips += [str(a) for a in v.addresses]
        names.append(v.name)
    return ips, names


def server_specs(topo: Topology, d: Path, cert: Path, key: Path) -> list[ServerSpec]:
    """Every server of the lab, its files under `d`, TLS from `cert`/`key`:
    what `mirage lab up` starts and the Vagrant lab's upstream serves."""
    return [
        dnsmasq_spec(topo, d),
        unbound_spec(topo, cert, key, d),
        nginx_spec(topo, d, cert, key),
        *(dante_spec(topo, s, d) for s in topo.socks),
        tinyproxy_spec(topo, d),
    ]


def unbound_config(topo: Topology, cert: Path, key: Path) -> ServerConfig:
    """The honest resolver's doh_server config: DoH, DoT and plain DNS on
    its addresses, the test zone from the topology."""
    hr = topo.honest_resolver
    return ServerConfig(
        addresses=hr.addresses,
        cert=cert,
        key=key,
        records={name: list(rrs) for name, rrs in hr.records.items()},
        zones=(hr.zone,),
        doh_port=hr.https_port,
        dns_port=53,
        http_endpoint=hr.path,
        # DoT too (RFC 7858), and every query logged with its client's
        # address: shows whether a query came through a proxy.
        dot_port=853,
        log_queries=True,
    )


def unbound_spec(topo: Topology, cert: Path, key: Path, d: Path) -> ServerSpec:
    """unbound (`unbound -d`) with doh_server's rendered config, started like
    every other lab server (own session, recorded PID) so that `lab down` in
    another process can stop it. Ready when each address answers plain DNS
    and accepts TCP on the DoH port."""
    config = unbound_config(topo, cert, key)
    workdir = d / "unbound"
    conf_path = workdir / "unbound.conf"
    probe_name = next(iter(topo.honest_resolver.records), topo.honest_resolver.name)
    probes: list[Probe] = []
    for a in config.addresses:
        probes.append(Probe(a, 53, f"dns:{probe_name}"))
        probes.append(Probe(a, config.doh_port))
    return ServerSpec(
        name="unbound",
        node=topo.honest_resolver.node,
        argv=("unbound", "-d", "-c", str(conf_path)),
        log=workdir / "unbound.log",
        files={conf_path: render_config(config, workdir)},
        probes=tuple(probes),
    )


def check_unbound_config(spec: ServerSpec) -> None:
    """Run unbound-checkconf on the spec's config (written first); ServerError
    with its output when unbound would refuse it."""
    for path, text in spec.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    conf = next(iter(spec.files))
    r = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise ServerError(f"unbound-checkconf {conf}: {r.stdout}{r.stderr}")


def user_db_files(topo: Topology) -> tuple[dict[str, str], dict[str, int]]:
    """passwd and shadow for the upstream namespace's /etc/netns dir.

    dante's `username` method checks the system user database; rather than
    adding a user to the host, the lab gives its own namespace a copy of the
    host's passwd plus the lab users, and a shadow holding only the lab users'
    hashes (`ip netns exec` bind-mounts both over /etc). Returns (files, modes).
    """
    users = [s for s in topo.socks if s.username and s.password]
    if not users:
        return {}, {}
    host_passwd = Path("/etc/passwd").read_text()
    taken = {p.pw_uid for p in pwd.getpwall()}
    lines = [host_passwd.rstrip("\n")]
    shadow = []
    uid = 64000
    for s in users:
        assert s.username is not None and s.password is not None
        while uid in taken:
            uid += 1
        taken.add(uid)
        lines.append(f"{s.username}:x:{uid}:65534:mirage lab:/nonexistent:/usr/sbin/nologin")
        hashed = subprocess.run(
            ["openssl", "passwd", "-6", "-stdin"],
            input=s.password,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        shadow.append(f"{s.username}:{hashed}:19000:0:99999:7:::")
    return (
        {"passwd": "\n".join(lines) + "\n", "shadow": "\n".join(shadow) + "\n"},
        {"passwd": 0o644, "shadow": 0o640},
    )


# --------------------------------------------------------------- processes


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or
    None when no such process (or only a zombie) exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ")".
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def is_running(rec: ProcessRecord) -> bool:
    return proc_start_time(rec.pid) == rec.start_time


def start(spec: ServerSpec, ns: str) -> ProcessRecord:
    """Write the spec's files and start its process in namespace `ns` in a new
    session: it outlives the caller (`mirage lab up` exits, the lab stays) and
    gets no terminal signals. posix_spawn rather than Popen because the lab
    may hand its processes over to a later `lab down` in another process;
    `stop()` reaps them when they are our children."""
    for path in spec.dirs:
        path.mkdir(parents=True, exist_ok=True)
    for path, text in spec.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    nobody = pwd.getpwnam("nobody")
    for path in spec.nobody_files:
        path.touch()
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    argv = ["ip", "netns", "exec", ns, *spec.argv]
    spec.log.parent.mkdir(parents=True, exist_ok=True)
    pid = os.posix_spawnp(
        argv[0],
        argv,
        dict(os.environ),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(spec.log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    st = proc_start_time(pid)
    if st is None:
        _reap(pid, 5.0)
        raise ServerError(f"{spec.name} exited at once:\n{log_tail(spec.log)}")
    return ProcessRecord(spec.name, pid, st, ns)


def wait_ready(spec: ServerSpec, rec: ProcessRecord, timeout: float = 10.0) -> None:
    """Poll the spec's probes until all pass; ServerError if the process exits
    or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    pending = list(spec.probes)
    while True:
        if not is_running(rec):
            _reap(rec.pid, 1.0)
            raise ServerError(f"{spec.name} exited:\n{log_tail(spec.log)}")
        pending = [p for p in pending if not _probe(rec.ns, p)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ServerError(
                f"{spec.name} not ready on {pending} after {timeout} s:\n{log_tail(spec.log)}"
            )
        time.sleep(0.05)


def _reap(pid: int, timeout: float) -> None:
    """Collect our exited child `pid` (no zombie left); a PID that is not our
    child (started by another process) is init's to reap."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def _probe(ns: str, probe: Probe) -> bool:
    # A socket belongs to the namespace of the thread that makes it, and
    # setns(2) only moves the calling thread: probe from a fresh thread.
    from appliance.lab.netns import in_ns

    def run() -> bool:
        family = socket.AF_INET6 if ":" in probe.address else socket.AF_INET
        try:
            if probe.kind.startswith("dns:"):
                q = DNSRecord.question(probe.kind[4:], "A")
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.settimeout(0.2)
                    s.sendto(q.pack(), (probe.address, probe.port))
                    return bool(DNSRecord.parse(s.recv(4096)).header.id == q.header.id)
            with socket.create_connection((probe.address, probe.port), timeout=0.2):
                return True
        except Exception:  # OSError, timeouts, dnslib parse errors: not ready yet
            return False

    try:
        return in_ns(ns, run, timeout=2.0)
    except Exception:
        return False


def stop(rec: ProcessRecord, grace: float = 5.0) -> None:
    """Stop one recorded process and its process group (the children it
    forked, such as dante's workers): SIGTERM, then SIGKILL after `grace` s.
    Does nothing if the PID now belongs to another process (start time differs)."""
    if not is_running(rec):
        _reap(rec.pid, 0.5)
        return
    group = _own_group(rec.pid)
    _signal(rec.pid, group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while is_running(rec) and time.monotonic() < deadline:
        _reap(rec.pid, 0.05)
    if is_running(rec):
        _signal(rec.pid, group, signal.SIGKILL)
    _reap(rec.pid, 2.0)
    if group:
        # Workers that ignored SIGTERM or outlived their leader.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rec.pid, signal.SIGKILL)


def terminate(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 5.0) -> bool:
    """End our child `proc`: `sig`, then SIGKILL if it is still there after
    `grace` s. True when it exited within the grace (or had already)."""
    if proc.poll() is not None:
        return True
    proc.send_signal(sig)
    try:
        proc.wait(grace)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return False


def _own_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _signal(pid: int, group: bool, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return "(no log)"


def kill_stragglers(ns: str, grace: float = 3.0) -> list[int]:
    """SIGTERM then SIGKILL whatever still runs inside namespace `ns` (the lab
    owns its namespaces, so anything inside is the lab's: processes a test
    started with Lab.popen, or servers of a crashed lab). Returns the PIDs."""
    from appliance.lab.netns import pids_in_ns

    pids = [p for p in pids_in_ns(ns) if p != os.getpid()]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(proc_start_time(p) is not None for p in pids):
        time.sleep(0.05)
    for p in pids:
        if proc_start_time(p) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    return pids
