"""Outbounds against real servers on loopback: nginx (the far end, serving a
marker page), dante (SOCKS5, with and without username/password), tinyproxy
(HTTP CONNECT with Basic auth), stunnel in front of tinyproxy (an HTTPS
proxy) and microsocks (a SOCKS5 server that drops a pipelined request).
Each server runs in a private mount namespace whose /etc/hosts names the
nginx address, so the proxies resolve `marker.ob.test` themselves (the
name must reach them unresolved). Processes are started here, killed by PID
in teardown; the SOCKS5 auth test's system user is created and deleted by
name. Addresses: 127.111.98.x ("ob") and 127.0.0.1 for dante (it binds only
addresses configured on an interface), ports picked free at setup.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from trio.testing import memory_stream_pair

from appliance.config import parse_rule
from appliance.config.model import (
    ApplianceConfig,
    Config,
    IPAddress,
    ProxyConfig,
    ProxyGroupConfig,
)
from appliance.config.protocols.shadowsocks import ShadowsocksOptions
from appliance.dns.upstream_api import UpstreamError
from appliance.flow import Flow
from appliance.lab.servers import stop_all
from appliance.outbound.base import OutboundError, ReplayStream, open_marked_tcp
from appliance.outbound.build import BuildError, build_outbounds
from appliance.outbound.direct import DirectOutbound
from appliance.outbound.groups import FallbackGroup, SelectGroup
from appliance.outbound.http import HttpOutbound
from appliance.outbound.reject import RejectOutbound
from appliance.outbound.shadowsocks import ShadowsocksOutbound
from appliance.outbound.socks5 import PIPELINE_STALL, Socks5Outbound
from appliance.proto.socks5 import encode_reply
from appliance.routing import Dispatcher, Router
from appliance.rules.engine import FlowContext
from appliance.sockopt import SO_MARK

pytestmark = pytest.mark.netns

NAME = "marker.ob.test"
MARKER = b"OB-MARKER-7f3a"
WEB_IP = "127.111.98.1"
TINY_IP = "127.111.98.3"
TLS_IP = "127.111.98.4"
DEAD_IP = "127.111.98.9"  # nothing listens here: connections are refused
STUCK_IP = "127.111.98.10"  # a listener with a full backlog: SYNs go unanswered
SOCKS_USER = "obsocks5"
SOCKS_PASS = "s3cret-Ob"
MARK = 0x6F62  # "ob"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within 10 s")


def in_private_hosts(hosts: Path, argv: list[str]) -> list[str]:
    """Run argv with `hosts` bind-mounted over /etc/hosts in a private mount
    namespace; exec keeps the PID ours to kill."""
    cmd = " ".join(argv)
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f"mount --bind {hosts} /etc/hosts && exec {cmd}",
    ]


@dataclass
class Servers:
    dir: Path
    web_port: int
    socks_port: int
    socks_auth_port: int | None
    tiny_port: int
    tls_port: int | None
    dante_log: Path
    cert: Path | None
    micro_port: int | None = None


def _dante_conf(path: Path, log: Path, port: int, method: str) -> None:
    path.write_text(
        f"""logoutput: {log}
debug: 1
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: {method}
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
  from: 0.0.0.0/0 to: 0.0.0.0/0
  log: connect error
}}
socks pass {{
  from: 0.0.0.0/0 to: 0.0.0.0/0
  command: connect
  log: connect error
}}
"""
    )


def _create_user() -> bool:
    subprocess.run(["userdel", SOCKS_USER], capture_output=True, check=False)  # crashed run
    r = subprocess.run(
        ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", SOCKS_USER], capture_output=True
    )
    if r.returncode != 0:
        return False
    subprocess.run(["chpasswd"], input=f"{SOCKS_USER}:{SOCKS_PASS}".encode(), check=True)
    return True


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    for tool in ("nginx", "danted", "tinyproxy", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("ob-outbounds")
    procs: list[subprocess.Popen[bytes]] = []
    user_created = False
    try:
        hosts = d / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{WEB_IP} {NAME}\n")
        web_port = free_port(WEB_IP)
        (d / "nginx.conf").write_text(
            f"""worker_processes 1;
error_log {d}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  server {{
    listen {WEB_IP}:{web_port};
    location / {{ default_type text/plain; return 200 "{MARKER.decode()}\\n"; }}
  }}
}}
"""
        )

        def start(argv: list[str], host: str, port: int, what: str) -> None:
            out = open(d / f"{what}.out", "wb")  # noqa: SIM115 - lives as long as the process
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            out.close()
            procs.append(p)
            wait_listening(host, port, p, what)

        start(
            [
                "nginx",
                "-p",
                str(d),
                "-c",
                str(d / "nginx.conf"),
                "-g",
                f"daemon off; pid {d}/nginx.pid;",
            ],
            WEB_IP,
            web_port,
            "nginx",
        )

        socks_port = free_port("127.0.0.1")
        dante_log = d / "danted.log"
        _dante_conf(d / "danted.conf", dante_log, socks_port, "none")
        start(
            in_private_hosts(hosts, ["danted", "-f", str(d / "danted.conf")]),
            "127.0.0.1",
            socks_port,
            "danted",
        )

        socks_auth_port: int | None = None
        user_created = _create_user()
        if user_created:
            socks_auth_port = free_port("127.0.0.1")
            _dante_conf(d / "danted-auth.conf", d / "danted-auth.log", socks_auth_port, "username")
            start(
                in_private_hosts(hosts, ["danted", "-f", str(d / "danted-auth.conf")]),
                "127.0.0.1",
                socks_auth_port,
                "danted-auth",
            )

        tiny_port = free_port(TINY_IP)
        (d / "tinyproxy.conf").write_text(
            f"""Port {tiny_port}
Listen {TINY_IP}
Timeout 30
LogLevel Info
MaxClients 20
Allow 127.0.0.0/8
BasicAuth obuser obpass
"""
        )
        start(
            in_private_hosts(hosts, ["tinyproxy", "-d", "-c", str(d / "tinyproxy.conf")]),
            TINY_IP,
            tiny_port,
            "tinyproxy",
        )

        tls_port: int | None = None
        cert: Path | None = None
        if shutil.which("stunnel4") and shutil.which("openssl"):
            cert, key = d / "proxy.pem", d / "proxy.key"
            subprocess.run(
                [
                    "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=proxy.ob.test", "-addext",
                    f"subjectAltName=DNS:proxy.ob.test,IP:{TLS_IP}",
                    "-keyout", str(key), "-out", str(cert),
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip
            tls_port = free_port(TLS_IP)
            (d / "stunnel.conf").write_text(
                f"""foreground = yes
pid =
[https-proxy]
accept = {TLS_IP}:{tls_port}
connect = {TINY_IP}:{tiny_port}
cert = {cert}
key = {key}
"""
            )
            start(["stunnel4", str(d / "stunnel.conf")], TLS_IP, tls_port, "stunnel")

        micro_port: int | None = None
        if shutil.which("microsocks"):
            micro_port = free_port("127.0.0.1")
            start(
                in_private_hosts(hosts, ["microsocks", "-i", "127.0.0.1", "-p", str(micro_port)]),
                "127.0.0.1",
                micro_port,
                "microsocks",
            )

        yield Servers(
            d, web_port, socks_port, socks_auth_port, tiny_port, tls_port, dante_log, cert,
            micro_port,
        )
    finally:
        stop_all(procs)
        if user_created:
            subprocess.run(["userdel", SOCKS_USER], capture_output=True, check=False)


class DictResolver:
    """A test-local stand-in for the upstream resolver's resolve_ips."""

    def __init__(self, table: dict[str, list[str]], ttl: int = 60) -> None:
        self.table = {k: [ipaddress.ip_address(a) for a in v] for k, v in table.items()}
        self.ttl = ttl
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, name: str, family: int) -> tuple[list[IPAddress], int]:
        await trio.lowlevel.checkpoint()
        self.calls.append((name, family))
        if name not in self.table:
            raise UpstreamError(f"{name}: NXDOMAIN (test resolver)")
        return [a for a in self.table[name] if a.version == family], self.ttl


async def http_get(stream: trio.abc.Stream) -> bytes:
    """GET / with Connection: close; the whole response, bounded in reads."""
    with trio.fail_after(5):
        await stream.send_all(
            f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        for _ in range(1000):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    await stream.aclose()
    return data


def mark_per_ss(stream: trio.SocketStream) -> str:
    """The fwmark `ss` (iproute2, an independent tool) reports for the socket."""
    local = stream.socket.getsockname()
    out = subprocess.run(
        ["ss", "-Htne", "src", f"{local[0]}:{local[1]}"], capture_output=True, text=True, check=True
    ).stdout
    for word in out.split():
        if word.startswith("fwmark:"):
            return word.split(":", 1)[1]
    return ""


@contextmanager
def stuck_listener(port: int = 0) -> Iterator[int]:
    """A port on STUCK_IP whose connect() hangs: the listener's accept queue
    is full and never drained, so the kernel drops further SYNs (a black
    hole on loopback). Yields the port."""
    listener = socket.socket()
    held: list[socket.socket] = []
    try:
        listener.bind((STUCK_IP, port))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect((STUCK_IP, port))
            except BlockingIOError:
                pass
            held.append(s)
        time.sleep(0.1)
        yield port
    finally:
        for s in held:
            s.close()
        listener.close()


# -- DIRECT --------------------------------------------------------------------


async def test_direct_fetches_marker_with_so_mark(servers: Servers) -> None:
    resolve = DictResolver({NAME: [WEB_IP]})
    out = DirectOutbound(resolve, MARK, 3.0)
    stream = await out.connect_tcp(NAME, servers.web_port)
    assert isinstance(stream, trio.SocketStream)  # spliceable
    assert stream.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK
    assert mark_per_ss(stream) == hex(MARK)
    assert stream.socket.getpeername() == (WEB_IP, servers.web_port)
    response = await http_get(stream)
    assert response.startswith(b"HTTP/1.1 200") and MARKER in response
    assert resolve.calls == [(NAME, 4)]


async def test_direct_happy_eyeballs_and_sticky_address(servers: Servers) -> None:
    # The first address refuses; the second answers and becomes sticky.
    resolve = DictResolver({NAME: [DEAD_IP, WEB_IP]}, ttl=60)
    out = DirectOutbound(resolve, MARK, 3.0)
    for _ in range(3):
        stream = await out.connect_tcp(NAME, servers.web_port)
        assert stream.socket.getpeername()[0] == WEB_IP
        assert MARKER in await http_get(stream)
    assert len(resolve.calls) == 1  # later connections skipped the resolver

    # TTL 0: the address that worked is still kept for the dial cache's
    # floor (DIAL_TTL_FLOOR), so the second connection skips the resolver.
    resolve0 = DictResolver({NAME: [WEB_IP]}, ttl=0)
    out0 = DirectOutbound(resolve0, None, 3.0)
    for _ in range(2):
        await (await out0.connect_tcp(NAME, servers.web_port)).aclose()
    assert len(resolve0.calls) == 1


async def test_direct_failures_are_outbound_errors(servers: Servers) -> None:
    out = DirectOutbound(DictResolver({NAME: [WEB_IP]}), None, 3.0)
    with pytest.raises(OutboundError, match="NXDOMAIN"):
        await out.connect_tcp("missing.ob.test", 80)
    t0 = trio.current_time()
    with pytest.raises(OutboundError, match="refused"):
        await out.connect_tcp(DEAD_IP, servers.web_port)
    assert trio.current_time() - t0 < 1.0


async def test_direct_connect_timeout_and_happy_eyeballs(servers: Servers) -> None:
    out = DirectOutbound(DictResolver({NAME: [STUCK_IP, WEB_IP]}), MARK, 0.5)
    with stuck_listener() as port:
        t0 = trio.current_time()
        with pytest.raises(OutboundError, match="timed out"):
            await out.connect_tcp(STUCK_IP, port)
        assert 0.45 < trio.current_time() - t0 < 1.5

    # The first address hangs; 250 ms later the second is tried and wins,
    # well inside the 0.5 s deadline.
    with stuck_listener(servers.web_port):
        t0 = trio.current_time()
        stream = await out.connect_tcp(NAME, servers.web_port)
        elapsed = trio.current_time() - t0
        assert stream.socket.getpeername()[0] == WEB_IP
        assert 0.2 < elapsed < 0.5
        assert MARKER in await http_get(stream)


# -- SOCKS5 ----------------------------------------------------------------------


async def test_socks5_sends_the_name_and_fetches_marker(servers: Servers) -> None:
    out = Socks5Outbound("dante", "127.0.0.1", servers.socks_port, routing_mark=MARK)
    stream = await out.connect_tcp(NAME, servers.web_port)
    # Only the reply was read: the stream is still the raw socket.
    assert isinstance(stream, trio.SocketStream)
    assert stream.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK
    assert mark_per_ss(stream) == hex(MARK)
    response = await http_get(stream)
    assert response.startswith(b"HTTP/1.1 200") and MARKER in response
    log = servers.dante_log.read_text(errors="replace")
    assert f"ATYP: 3 address: {NAME}.{servers.web_port}" in log


async def test_socks5_learns_which_server_takes_pipelining(servers: Servers) -> None:
    # dante reads a stream: the pipelined request is answered, and
    # pipelining becomes that server's known habit.
    dante = Socks5Outbound("dante", "127.0.0.1", servers.socks_port)
    assert dante.pipelining is None
    assert MARKER in await http_get(await dante.connect_tcp(NAME, servers.web_port))
    assert dante.pipelining is True

    # microsocks answers the greeting and drops the request that came with
    # it: the first flow starts over in lock step after the stall bound,
    # well under a second (not the connect timeout); later flows go in
    # lock step at once.
    if servers.micro_port is None:
        pytest.skip("microsocks is not installed (scripts/setup.sh installs it)")
    micro = Socks5Outbound("micro", "127.0.0.1", servers.micro_port, connect_timeout=5.0)
    t0 = trio.current_time()
    assert MARKER in await http_get(await micro.connect_tcp(NAME, servers.web_port))
    assert trio.current_time() - t0 < 1.0
    assert micro.pipelining is False
    t0 = trio.current_time()
    assert MARKER in await http_get(await micro.connect_tcp(NAME, servers.web_port))
    assert trio.current_time() - t0 < PIPELINE_STALL  # no stall this time


async def test_socks5_username_password(servers: Servers) -> None:
    if servers.socks_auth_port is None:
        pytest.skip("could not create the system user dante's username method checks")
    ok = Socks5Outbound(
        "dante-auth",
        "127.0.0.1",
        servers.socks_auth_port,
        username=SOCKS_USER,
        password=SOCKS_PASS,
    )
    assert MARKER in await http_get(await ok.connect_tcp(NAME, servers.web_port))
    bad = Socks5Outbound(
        "dante-auth", "127.0.0.1", servers.socks_auth_port, username=SOCKS_USER, password="nope"
    )
    with pytest.raises(OutboundError, match="refused the username"):
        await bad.connect_tcp(NAME, servers.web_port)
    anon = Socks5Outbound("dante-auth", "127.0.0.1", servers.socks_auth_port)
    with pytest.raises(OutboundError, match="none of the offered"):
        await anon.connect_tcp(NAME, servers.web_port)


async def test_socks5_error_reply_from_proxy(servers: Servers) -> None:
    # The proxy's own name is resolved through the given resolver too.
    resolve = DictResolver({"socks.ob.test": ["127.0.0.1"]})
    out = Socks5Outbound("dante", "socks.ob.test", servers.socks_port, resolve=resolve)
    with pytest.raises(OutboundError, match="proxy replied"):
        await out.connect_tcp(NAME, free_port(WEB_IP))  # nothing listens there
    assert resolve.calls == [("socks.ob.test", 4)]


async def test_proxy_down_fails_fast(servers: Servers) -> None:
    refused = Socks5Outbound("down", DEAD_IP, servers.socks_port, connect_timeout=5.0)
    t0 = trio.current_time()
    with pytest.raises(OutboundError, match="refused"):
        await refused.connect_tcp(NAME, 80)
    assert trio.current_time() - t0 < 1.0

    # A proxy that accepts TCP but never answers: the connect timeout ends it.
    with trio.socket.socket() as mute:
        await mute.bind((DEAD_IP, 0))
        mute.listen(8)
        port = mute.getsockname()[1]
        for out in (
            Socks5Outbound("mute", DEAD_IP, port, connect_timeout=0.5),
            HttpOutbound("mute", DEAD_IP, port, connect_timeout=0.5),
        ):
            t0 = trio.current_time()
            with pytest.raises(OutboundError, match="timed out"):
                await out.connect_tcp(NAME, 80)
            assert 0.45 < trio.current_time() - t0 < 1.5


# -- HTTP CONNECT ------------------------------------------------------------------


async def test_http_connect_with_basic_auth(servers: Servers) -> None:
    out = HttpOutbound(
        "tiny", TINY_IP, servers.tiny_port, username="obuser", password="obpass", routing_mark=MARK
    )
    stream = await out.connect_tcp(NAME, servers.web_port)
    assert isinstance(stream, trio.SocketStream)  # head read exactly (MSG_PEEK)
    assert stream.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK
    response = await http_get(stream)
    assert response.startswith(b"HTTP/1.1 200") and MARKER in response
    log = (servers.dir / "tinyproxy.out").read_text(errors="replace")
    assert f"CONNECT {NAME}:{servers.web_port}" in log

    anon = HttpOutbound("tiny", TINY_IP, servers.tiny_port)
    with pytest.raises(OutboundError, match="407"):
        await anon.connect_tcp(NAME, servers.web_port)


async def test_https_proxy_over_tls(servers: Servers) -> None:
    if servers.tls_port is None or servers.cert is None:
        pytest.skip("stunnel4 is not installed (scripts/setup.sh installs it)")
    out = HttpOutbound(
        "tiny-tls",
        TLS_IP,
        servers.tls_port,
        username="obuser",
        password="obpass",
        tls=True,
        sni="proxy.ob.test",
        ca_file=str(servers.cert),
    )
    stream = await out.connect_tcp(NAME, servers.web_port)
    assert isinstance(stream, trio.SSLStream)
    assert MARKER in await http_get(stream)

    # Verification is on: a name the certificate does not carry fails.
    wrong = HttpOutbound(
        "tiny-tls", TLS_IP, servers.tls_port, tls=True, sni="other.test", ca_file=str(servers.cert)
    )
    with pytest.raises(OutboundError, match="TLS"):
        await wrong.connect_tcp(NAME, servers.web_port)
    # ... unless skip-cert-verify says otherwise.
    lax = HttpOutbound(
        "tiny-tls",
        TLS_IP,
        servers.tls_port,
        username="obuser",
        password="obpass",
        tls=True,
        skip_cert_verify=True,
    )
    assert MARKER in await http_get(await lax.connect_tcp(NAME, servers.web_port))


# -- REJECT, groups, build + Router --------------------------------------------------


async def test_reject_is_immediate() -> None:
    t0 = trio.current_time()
    with pytest.raises(OutboundError, match="rejected"):
        await RejectOutbound().connect_tcp(NAME, 80)
    assert trio.current_time() - t0 < 0.1


async def test_fallback_skips_a_dead_member_and_remembers(servers: Servers) -> None:
    dead = Socks5Outbound("dead", DEAD_IP, servers.socks_port)
    live = Socks5Outbound("live", "127.0.0.1", servers.socks_port)
    group = FallbackGroup("auto", [dead, live], retry_after=30)
    assert MARKER in await http_get(await group.connect_tcp(NAME, servers.web_port))
    assert group.current() is live  # dead is tried last for a while
    sel = SelectGroup("pick", [live, dead])
    assert MARKER in await http_get(await sel.connect_tcp(NAME, servers.web_port))
    sel.select("dead")
    with pytest.raises(OutboundError):
        await sel.connect_tcp(NAME, servers.web_port)
    all_dead = FallbackGroup("none", [dead, RejectOutbound()])
    with pytest.raises(OutboundError, match="every member failed"):
        await all_dead.connect_tcp(NAME, servers.web_port)


def _cfg(**kw: object) -> Config:
    base: dict[str, object] = {
        "routing_mark": MARK,
        "appliance": ApplianceConfig(connect_timeout=2.0),
    }
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


async def test_build_and_route_end_to_end(servers: Servers) -> None:
    cfg = _cfg(
        proxies=(
            ProxyConfig("dante", "socks5", "127.0.0.1", servers.socks_port),
            ProxyConfig(
                "tiny", "http", TINY_IP, servers.tiny_port, username="obuser", password="obpass"
            ),
            ProxyConfig("ss1", "ss", DEAD_IP, 8388,
                        options=ShadowsocksOptions("aes-128-gcm", "x")),
        ),
        proxy_groups=(
            ProxyGroupConfig("outer", "select", ("inner", "DIRECT")),
            ProxyGroupConfig("inner", "fallback", ("ss1", "dante")),
        ),
        rules=(
            parse_rule("DOMAIN-SUFFIX,ob.test,outer"),
            parse_rule("DST-PORT,8080,tiny"),
            parse_rule("IP-CIDR,10.0.0.0/8,REJECT,no-resolve"),
        ),
    )
    outbounds = build_outbounds(cfg, DictResolver({NAME: [WEB_IP]}))
    assert {"DIRECT", "REJECT", "dante", "tiny", "ss1", "outer", "inner"} <= outbounds.keys()
    assert isinstance(outbounds["ss1"], ShadowsocksOutbound)
    router = Router(cfg.rules, outbounds)
    dispatcher = Dispatcher(router, connect_timeout=2.0)

    flow = Flow("tcp", "mixed", ipaddress.ip_address("127.0.0.1"), 40000, None,
                servers.web_port, NAME)
    # outer -> inner -> ss1 (nothing listens: refused) -> dante: the marker.
    assert MARKER in await http_get(await dispatcher.connect_tcp(flow))
    assert flow.outbound == "outer" and flow.rule is not None and flow.rule.target == "outer"

    def route(ctx: FlowContext) -> object:
        return router.pick(ctx)[0]

    assert route(FlowContext("x.test", None, 8080)) is outbounds["tiny"]
    assert route(FlowContext(None, ipaddress.ip_address("10.1.1.1"), 80)) is outbounds["REJECT"]
    assert route(FlowContext("other.test", None, 443)) is outbounds["DIRECT"]
    direct = outbounds["DIRECT"]
    stream = await direct.connect_tcp(NAME, servers.web_port)
    assert isinstance(stream, trio.SocketStream)
    assert stream.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK
    await stream.aclose()

    # No rules at all: everything goes DIRECT.
    empty = _cfg()
    assert Router.from_config(empty, None).pick(FlowContext(NAME, None, 80))[0].name == "DIRECT"


def test_build_errors() -> None:
    # (Group cycles are the loader's to refuse: tests/unit/test_config.py.)
    unknown = _cfg(proxy_groups=(ProxyGroupConfig("a", "select", ("nope",)),))
    with pytest.raises(BuildError, match="unknown member"):
        build_outbounds(unknown, None)
    dup = _cfg(proxies=(ProxyConfig("DIRECT", "direct"),))
    with pytest.raises(BuildError, match="duplicate"):
        build_outbounds(dup, None)
    bad_target = _cfg(rules=(parse_rule("MATCH,nowhere"),))
    with pytest.raises(BuildError, match="nowhere"):
        Router.from_config(bad_target, None)


async def test_open_marked_tcp_cancels_losers(servers: Servers) -> None:
    # Two live addresses: the first wins, the second attempt never starts
    # (or is cancelled and closed); nothing is left connected to it.
    a = ipaddress.ip_address(WEB_IP)
    stream = await open_marked_tcp([a, a], servers.web_port, mark=None)
    assert stream.socket.getpeername()[0] == WEB_IP
    await stream.aclose()


# -- the far end speaks first: no tunnel byte may be lost ---------------------------


async def _scripted_proxy(nursery: trio.Nursery, expect_prefix: bytes, answers: list[bytes]) -> int:
    """A one-connection peer that reads, then writes each answer in one
    send (so the reply and the far end's first bytes share a segment). For
    the case real proxies produce only by timing luck (SMTP/SSH banners)."""
    listener = (await trio.open_tcp_listeners(0, host=DEAD_IP))[0]
    port = listener.socket.getsockname()[1]

    async def serve_one() -> None:
        async with listener:
            conn = await listener.accept()
            async with conn:
                got = b""
                with trio.fail_after(5):
                    for answer in answers:
                        got += await conn.receive_some(65536)
                        await conn.send_all(answer)
                    assert got.startswith(expect_prefix)
                    await conn.receive_some(65536)  # until the client closes

    nursery.start_soon(serve_one)
    return int(port)


async def test_socks5_reply_and_banner_in_one_segment() -> None:
    # Greeting and request arrive together (pipelined, no credentials); the
    # method selection, the reply and the server's banner leave in one send.
    async with trio.open_nursery() as nursery:
        port = await _scripted_proxy(
            nursery,
            b"\x05\x01\x00\x05\x01\x00\x03\x0csmtp.ob.test\x00\x19",
            [b"\x05\x00" + encode_reply(0, "bound.ob.test", 9) + b"220 hi\r\n"],
        )
        out = Socks5Outbound("scripted", DEAD_IP, port)
        stream = await out.connect_tcp("smtp.ob.test", 25)
        assert isinstance(stream, trio.SocketStream)
        assert await stream.receive_some(100) == b"220 hi\r\n"
        await stream.aclose()


async def test_http_response_and_banner_in_one_segment() -> None:
    async with trio.open_nursery() as nursery:
        port = await _scripted_proxy(
            nursery,
            b"CONNECT ssh.ob.test:22 HTTP/1.1\r\n",
            [b"HTTP/1.1 200 Connection established\r\nX-A: b\r\n\r\nSSH-2.0-test\r\n"],
        )
        out = HttpOutbound("scripted", DEAD_IP, port)
        stream = await out.connect_tcp("ssh.ob.test", 22)
        assert isinstance(stream, trio.SocketStream)  # peeked: nothing over-read
        assert await stream.receive_some(100) == b"SSH-2.0-test\r\n"
        await stream.aclose()


async def test_replay_stream_returns_prefix_first() -> None:
    a, b = memory_stream_pair()
    r = ReplayStream(a, b"early")
    await b.send_all(b"later")
    assert await r.receive_some(3) == b"ear"
    assert await r.receive_some() == b"ly"
    assert await r.receive_some() == b"later"
    await r.send_all(b"up")
    assert await b.receive_some() == b"up"
    await r.send_eof()
    assert await b.receive_some() == b""
    await r.aclose()


# -- preconnect: connections to the proxy kept ready ------------------------------


async def test_socks5_preconnect_serves_flows_from_kept_connections(servers: Servers) -> None:
    out = Socks5Outbound("dante", "127.0.0.1", servers.socks_port, routing_mark=MARK,
                         preconnect=2)
    pool = out.preconnect
    assert pool is not None
    streams = []
    for _ in range(4):
        stream = await out.connect_tcp(NAME, servers.web_port)
        assert isinstance(stream, trio.SocketStream)  # still spliceable
        assert stream.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK
        streams.append(stream)
    # Flows 1 and 2 found nothing kept (2 opened a replacement); 3 and 4
    # took kept connections; one is ready for the next flow.
    assert (pool.misses, pool.hits, len(pool)) == (2, 2, 1)
    for stream in streams:
        response = await http_get(stream)
        assert response.startswith(b"HTTP/1.1 200") and MARKER in response
    # Every flow, kept connection or not, sent the name (ATYP 3).
    log = servers.dante_log.read_text(errors="replace")
    assert log.count(f"ATYP: 3 address: {NAME}.{servers.web_port}") >= 4
    pool.close()


async def test_http_preconnect_serves_flows_from_kept_connections(servers: Servers) -> None:
    out = HttpOutbound("tiny", TINY_IP, servers.tiny_port, username="obuser",
                       password="obpass", preconnect=1)
    assert out.preconnect is not None
    for _ in range(3):
        assert MARKER in await http_get(await out.connect_tcp(NAME, servers.web_port))
    assert out.preconnect.hits == 1
    out.preconnect.close()
    with pytest.raises(ValueError, match="plain"):
        HttpOutbound("tls", TLS_IP, 443, tls=True, preconnect=1)


@pytest.mark.parametrize("kind", ["socks5", "http"])
async def test_preconnect_stale_connection_retries_on_a_new_one(kind: str) -> None:
    # A proxy that reads the request on the kept connection and hangs up
    # without a word (it had given up on it): the flow must not fail, it
    # retries once on a new connection, which is served.
    reply = (b"\x05\x00" + encode_reply(0, "bound.ob.test", 9) if kind == "socks5"
             else b"HTTP/1.1 200 Connection established\r\n\r\n")
    accepted: list[int] = []

    async def serve(conn: trio.SocketStream) -> None:
        n = len(accepted) + 1
        accepted.append(n)
        async with conn:
            with trio.move_on_after(5):
                await conn.receive_some(65536)
                if n == 3:
                    return  # the kept one: closed, never answered
                await conn.send_all(reply + b"hello")
                await conn.receive_some(65536)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host=DEAD_IP))
        port = listeners[0].socket.getsockname()[1]
        cls = Socks5Outbound if kind == "socks5" else HttpOutbound
        out = cls("scripted", DEAD_IP, port, preconnect=1)
        assert out.preconnect is not None
        for _ in range(3):
            stream = await out.connect_tcp("x.ob.test", 80)
            assert await stream.receive_some(100) == b"hello"
            await stream.aclose()
        # Flow 3 took the kept connection (the 3rd accepted), which was
        # dead; it went on over the 4th.
        assert out.preconnect.stale == 1 and out.preconnect.hits == 1
        assert accepted[:4] == [1, 2, 3, 4]
        out.preconnect.close()
        nursery.cancel_scope.cancel()


async def test_preconnect_to_a_dead_proxy_still_fails_fast(servers: Servers) -> None:
    out = Socks5Outbound("down", DEAD_IP, servers.socks_port, connect_timeout=5.0, preconnect=2)
    for _ in range(3):
        t0 = trio.current_time()
        with pytest.raises(OutboundError, match="refused"):
            await out.connect_tcp(NAME, 80)
        assert trio.current_time() - t0 < 1.0
    assert out.preconnect is not None and out.preconnect.hits == 0
    out.preconnect.close()
