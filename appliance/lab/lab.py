"""The namespace lab: client, gateway and upstream with real servers, built
from `topology.yaml` (the same file the Vagrant lab reads).

    lab = Lab("mt1234").up()          # or: with Lab("mt1234") as lab:
    lab.exec("client", ["curl", "-s", "http://www.alpha.test/"])
    lab.down()

What a `Lab` owns, all named by its prefix so several labs can coexist (the
tests' and `mirage lab up`'s):

- the namespaces `<prefix>-client`, `<prefix>-gw`, `<prefix>-up` and their
  `/etc/netns/<ns>/` directories (resolv.conf; the upstream's lab-only users);
- its state dir `/run/mirage-lab/<prefix>/` with every server's config, log
  and pid file, the lab CA (`ca.pem`) and `state.json`, the record of every
  process it started (PID + start time);
- those processes (nginx, dante x2, tinyproxy, dnsmasq, unbound), each in its
  own session so it outlives the process that ran `up()`; and whatever was
  started through `popen()`.

`up()` first removes leftovers of an earlier lab with the same prefix (a
crashed test run, a forgotten `mirage lab up`), then builds; if building
fails it tears down what it made and re-raises. `down()` stops exactly the
recorded processes, then anything still running inside the lab's own
namespaces, deletes the namespaces by name and removes the state dir. It
keeps going past errors and raises the first at the end.

The lab has no link to the host: no veth ends in the root namespace, and the
gateway has no default route, so nothing sent in the lab can leave it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.lab import netns, servers
from appliance.lab.certs import make_ca_and_cert
from appliance.lab.servers import ProcessRecord
from appliance.lab.topology import DEFAULT_TOPOLOGY, Topology, load_topology

STATE_ROOT = Path("/run/mirage-lab")
DEFAULT_PREFIX = "mirage"
_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")


class LabError(RuntimeError):
    """The lab could not be built or torn down completely."""


class Lab:
    """One instance of the lab topology (see the module docstring)."""

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        topology: Topology | None = None,
        state_root: Path = STATE_ROOT,
        topology_path: Path = DEFAULT_TOPOLOGY,
        etc_files: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"lab prefix {prefix!r}: use 1-24 of [a-z0-9-], starting alnum")
        self.prefix = prefix
        # Extra /etc files per node (name -> text), e.g. a bench's gai.conf;
        # written with the resolv.conf before any server starts.
        self.etc_files = {node: dict(files) for node, files in (etc_files or {}).items()}
        self.topology = topology if topology is not None else load_topology(topology_path)
        self.state_dir = state_root / prefix
        self._records: list[ProcessRecord] = []
        self._popens: list[subprocess.Popen[Any]] = []

    # ---------------------------------------------------------------- names

    def ns(self, node: str) -> str:
        """The namespace name of `node` ("client", "gateway", "upstream")."""
        return f"{self.prefix}-{self.topology.node(node).ns}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(k) for k in self.topology.nodes]

    def addr(self, node: str, iface: str | None = None, family: int = 4) -> str:
        """The first IPv`family` address (no prefix length) of `node`'s
        interface `iface` (default: its first interface)."""
        n = self.topology.node(node)
        i = n.interface(iface) if iface is not None else n.interfaces[0]
        a = i.first(family)
        if a is None:
            raise KeyError(f"{node}:{i.name} has no IPv{family} address")
        return str(a.ip)

    @property
    def ca_path(self) -> Path:
        """The lab CA certificate: trust it to verify the DoH server."""
        return self.state_dir / "tls" / "ca.pem"

    def log(self, server: str) -> Path:
        """The log file of a lab server: nginx (access log), dante,
        dante-auth, tinyproxy, dnsmasq, unbound."""
        logs = {
            "nginx": self.state_dir / "nginx-access.log",
            "tinyproxy": self.state_dir / "tinyproxy.log",
            "dnsmasq": self.state_dir / "dnsmasq.log",
            "unbound": self.state_dir / "unbound" / "unbound.log",
        }
        for s in self.topology.socks:
            logs[s.name] = self.state_dir / f"{s.name}.log"
        return logs[server]

    @property
    def dante_log(self) -> Path:
        """The unauthenticated dante's log (`debug: 1`: shows each request's ATYP)."""
        return self.log(self.topology.socks[0].name)

    @property
    def processes(self) -> list[ProcessRecord]:
        """The server processes this lab started (or found in its state file)."""
        return list(self._records) or self._load_state()

    # ---------------------------------------------------------------- running things

    def exec(
        self,
        node: str,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 30.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `node`'s namespace (`ip netns exec`, so the node's
        resolv.conf applies) and return its result (text, captured). `env`
        adds to (not replaces) this process's environment."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(node), *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            input=input,
            env=None if env is None else {**os.environ, **env},
        )

    def popen(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside `node`'s namespace; `kw` goes to Popen. The lab
        terminates it at `down()` if the caller has not."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(node), *argv], **kw)
        self._popens.append(p)
        return p

    # ---------------------------------------------------------------- lifecycle

    def up(self) -> Lab:
        """Build the lab and start its servers; returns self. Replaces
        leftovers of an earlier lab with this prefix first."""
        self.down()
        try:
            self._build()
        except BaseException:
            with contextlib.suppress(Exception):
                self.down()
            raise
        return self

    def _build(self) -> None:
        topo = self.topology
        d = self.state_dir
        d.mkdir(parents=True, mode=0o755)
        self._save_state()
        netns.build(topo, self.ns)
        for key, node in topo.nodes.items():
            files: dict[str, str] = {}
            modes: dict[str, int] = {}
            if node.resolver is not None:
                files["resolv.conf"] = f"nameserver {node.resolver}\n"
            if any(s.node == key and s.username for s in topo.socks):
                users, user_modes = servers.user_db_files(topo)
                files.update(users)
                modes.update(user_modes)
            files.update(self.etc_files.get(key, {}))
            if files:
                netns.write_etc(self.ns(key), files, modes)

        # One certificate for every TLS server of the lab (DoH and the web
        # vhosts), issued by the lab CA that clients are told to trust.
        certs = make_ca_and_cert(d / "tls", *servers.tls_subjects(topo))
        servers.write_big_file(topo, d)

        specs = servers.server_specs(topo, d, certs.cert, certs.key)
        servers.check_unbound_config(next(s for s in specs if s.name == "unbound"))
        started = []
        for spec in specs:
            rec = servers.start(spec, self.ns(spec.node))
            self._records.append(rec)
            self._save_state()
            started.append((spec, rec))
        # Start all first, then wait: the servers come up in parallel.
        for spec, rec in started:
            servers.wait_ready(spec, rec, timeout=15.0)

    def down(self) -> None:
        """Tear the lab down (see the module docstring). Safe to call on a
        lab that was never built or is already gone."""
        errors: list[BaseException] = []
        for p in self._popens:
            try:
                servers.terminate(p)
            except Exception as e:
                errors.append(e)
        self._popens.clear()
        records = {(r.pid, r.start_time): r for r in [*self._records, *self._load_state()]}
        for rec in records.values():
            try:
                servers.stop(rec)
            except Exception as e:
                errors.append(e)
        self._records.clear()
        for name in self.namespaces:
            try:
                servers.kill_stragglers(name)
            except Exception as e:
                errors.append(e)
        try:
            netns.delete_all(self.namespaces)
        except Exception as e:
            errors.append(e)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if errors:
            raise LabError(f"lab {self.prefix}: teardown incomplete: {errors[0]}") from errors[0]

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # ---------------------------------------------------------------- state file

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _save_state(self) -> None:
        data = {
            "prefix": self.prefix,
            "namespaces": self.namespaces,
            "processes": [r.to_json() for r in self._records],
        }
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self._state_file)

    def _load_state(self) -> list[ProcessRecord]:
        try:
            data = json.loads(self._state_file.read_text())
            return [ProcessRecord.from_json(r) for r in data.get("processes", [])]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []

    # ---------------------------------------------------------------- a person's view

    def describe(self) -> str:
        """A short text for `mirage lab up`: namespaces, addresses, servers."""
        topo = self.topology
        lines = [f"Mirage lab {self.prefix!r} (state: {self.state_dir})", ""]
        for key, node in topo.nodes.items():
            addrs = ", ".join(
                f"{i.name} {' '.join(str(a) for a in i.addresses)}" for i in node.interfaces
            )
            lines.append(f"  {key:9} ns {self.ns(key):18} {addrs}")
            if node.resolver is not None:
                lines.append(f"  {'':9}    resolver {node.resolver}")
        lines.append("")
        procs = {r.name: r.pid for r in self.processes}

        def row(kind: str, what: str, where: str, extra: str = "") -> str:
            return f"  {kind:6} {what:20} {where:40} {extra}".rstrip()

        web = topo.web
        for v in web.vhosts:
            where = ", ".join(map(str, v.addresses))
            lines.append(row("web", v.name, where, f"{v.marker} (http, https:{web.https_port})"))
        lines.append(row("", "", "", f"nginx pid {procs.get('nginx')}"))
        for s in topo.socks:
            auth = f"user {s.username} password {s.password}  " if s.username else ""
            where = f"socks5://{s.address}:{s.port}"
            lines.append(row("proxy", f"dante ({s.name})", where, f"{auth}pid {procs.get(s.name)}"))
        hp = topo.http_proxy
        where = f"http://{hp.address}:{hp.port}"
        lines.append(row("proxy", "tinyproxy (CONNECT)", where, f"pid {procs.get('tinyproxy')}"))
        pr = topo.poisoned_resolver
        where = f"{pr.address}:53"
        lines.append(row("dns", "poisoned (dnsmasq)", where, f"pid {procs.get('dnsmasq')}"))
        hr = topo.honest_resolver
        lines.append(row("dns", "honest (unbound)", hr.url, f"pid {procs.get('unbound')}"))
        lines.append(row("", "", f"{hr.address}:53 (udp, tcp)", f"CA {self.ca_path}"))
        down = "mirage lab down" + (
            "" if self.prefix == DEFAULT_PREFIX else f" --prefix {self.prefix}"
        )
        lines += [
            "",
            f"  try: ip netns exec {self.ns('client')} dig +short www.alpha.test",
            f"       ip netns exec {self.ns('client')} curl -s http://www.alpha.test/",
            f"  run: ip netns exec {self.ns('gateway')} mirage run -c examples/lab.yaml",
            f"  end: {down}",
        ]
        return "\n".join(lines)


def lab_up(prefix: str = DEFAULT_PREFIX) -> Lab:
    """Build the lab and leave it running after this process exits (the CLI's
    `mirage lab up`). Replaces an earlier lab with the same prefix."""
    return Lab(prefix).up()


def lab_down(prefix: str = DEFAULT_PREFIX) -> None:
    """Remove the lab with this prefix, whichever process built it."""
    Lab(prefix).down()
