"""Contract of the control API against the real mihomo binary.

`ROUTES` is mihomo's route table (hub/route/server.go and the routers it
mounts: configs.go, proxies.go, groups.go, provider.go, rules.go,
connections.go, cache.go, dns.go, restart.go) restricted to what the
dashboards call (zashboard's and metacubexd's API clients), each with the
request they send. Every request goes to `mirage run` and to mihomo, both
on loopback with the same profile: the status codes must be equal, and
every field mihomo's answer has (at the depths a dashboard reads: the
document, each proxy, each connection and its metadata, each rule and
provider) must be in Mirage's. Mirage may answer more.

Routes left out of the differential, each tested in tests/unit/test_api.py:
/dns/query (mihomo needs its own DNS section), /restart (mihomo re-execs),
PUT /configs (mihomo would load the posted path). HEAD differs on
purpose: mihomo answers 405, Mirage serves HEAD wherever GET is served
(RFC 9110), which is what the issue asked for.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from appliance.lab.reference import mihomo_binary, mihomo_home
from appliance.lab.servers import stop_all
from tests.ws_client import WsClient

ROOT = Path(__file__).resolve().parents[2]
SECRET = "contract"
pytestmark = [pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Held:
    """A loopback TCP server that accepts and holds connections (the
    destination of a live flow), and answers HTTP for delay tests."""

    def __init__(self) -> None:
        self.hold = socket.create_server(("127.0.0.1", 0))
        self.hold_port = self.hold.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

        class Quiet(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(204)
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
        self.http_port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.hold.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.hold.close()
        self.http.shutdown()
        self.http.server_close()
        for c in self.conns:
            c.close()


def profile(mixed: int, api: int, held: Held) -> dict[str, Any]:
    return {
        "mixed-port": mixed, "allow-lan": False, "log-level": "info",
        "external-controller": f"127.0.0.1:{api}", "secret": SECRET,
        "proxies": [{"name": "far-socks", "type": "socks5", "server": "127.0.0.1",
                     "port": held.hold_port}],
        "proxy-groups": [{"name": "Proxy", "type": "select",
                          "proxies": ["DIRECT", "far-socks"]}],
        "rules": ["IP-CIDR,127.0.0.0/8,DIRECT,no-resolve",
                  # Logic rules' payloads are rebuilt by mihomo from their parts.
                  "AND,((DOMAIN-SUFFIX,and.test),(DST-PORT,443)),DIRECT",
                  "OR,((DOMAIN,or1.test),(DOMAIN-KEYWORD,or2)),Proxy",
                  "NOT,((NETWORK,tcp)),DIRECT", "MATCH,Proxy"],
    }


@dataclass
class Side:
    name: str
    api: int
    mixed: int
    proc: subprocess.Popen[bytes]

    def client(self, auth: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {SECRET}"} if auth else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.api}", headers=headers,
                            trust_env=False, timeout=10)


def wait_ready(side: Side, http_port: int) -> None:
    """Until the API answers and a DIRECT delay test succeeds: mihomo's API
    is up before its dialer is, and a delay test in that window fails with
    503 (seen once in every few starts on a loaded machine)."""
    deadline = time.monotonic() + 20
    delay = f"/proxies/DIRECT/delay?url=http://127.0.0.1:{http_port}/&timeout=2000"
    while time.monotonic() < deadline:
        assert side.proc.poll() is None, f"{side.name} exited"
        try:
            with side.client() as c:
                if (c.get("/version").status_code == 200
                        and c.get(delay).status_code == 200):
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{side.name} API not up")


@dataclass
class Pair:
    sides: dict[str, Side]
    held: Held
    mirage_log: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    held = Held()
    base = tmp_path_factory.mktemp("contract")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    try:
        m_api, m_mixed = free_port(), free_port()
        home = mihomo_home(base / "mihomo")
        (home / "config.yaml").write_text(yaml.safe_dump(profile(m_mixed, m_api, held)))
        log = open(base / "mihomo.log", "wb")  # noqa: SIM115 (closed in finally)
        logs.append(log)
        mihomo = subprocess.Popen([str(mihomo_binary()), "-d", str(home)],
                                  stdout=log, stderr=subprocess.STDOUT)
        procs.append(mihomo)
        g_api, g_mixed, g_dns = free_port(), free_port(), free_port()
        cfg = profile(g_mixed, g_api, held)
        cfg["dns"] = {"listen": f"127.0.0.1:{g_dns}", "nameserver": ["udp://127.0.0.1:1"]}
        cfg["appliance"] = {"state-dir": str(base / "state")}
        (base / "mirage.yaml").write_text(yaml.safe_dump(cfg))
        mlog = open(base / "mirage.log", "wb")  # noqa: SIM115 (closed in finally)
        logs.append(mlog)
        mirage = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "-c", str(base / "mirage.yaml")],
            stdout=mlog, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(mirage)
        out = {"mihomo": Side("mihomo", m_api, m_mixed, mihomo),
               "mirage": Side("mirage", g_api, g_mixed, mirage)}
        for side in out.values():
            wait_ready(side, held.http_port)
        yield Pair(out, held, base / "mirage.log")
    finally:
        stop_all(procs, grace=10)
        held.close()
        for f in logs:
            f.close()


def keys(doc: Any) -> set[str]:
    return set(doc) if isinstance(doc, dict) else set()


def missing(mihomo: Any, mirage: Any) -> set[str]:
    return keys(mihomo) - keys(mirage)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: Any = None
    auth: bool = True


# mihomo's routes as the dashboards call them.
ROUTES = [
    Call("GET", "/"),
    Call("GET", "/version"),
    Call("GET", "/version", auth=False),
    Call("GET", "/configs"),
    Call("GET", "/proxies/DIRECT/delay?url=http://127.0.0.1:{http}/&timeout=3000"),
    Call("PATCH", "/configs", {"log-level": "info"}),
    Call("GET", "/proxies"),
    Call("GET", "/proxies/Proxy"),
    Call("GET", "/proxies/GLOBAL"),
    Call("GET", "/proxies/DIRECT"),
    Call("GET", "/proxies/nope"),
    Call("PUT", "/proxies/Proxy", {"name": "nope"}),
    Call("PUT", "/proxies/far-socks", {"name": "DIRECT"}),
    Call("PUT", "/proxies/Proxy", {"name": "far-socks"}),
    Call("PUT", "/proxies/Proxy", {"name": "DIRECT"}),
    Call("GET", "/proxies/DIRECT/delay?timeout=bad"),
    Call("GET", "/group"),
    Call("GET", "/group/Proxy"),
    Call("GET", "/group/DIRECT"),
    Call("GET", "/group/Proxy/delay?url=http://127.0.0.1:{http}/&timeout=3000"),
    Call("GET", "/rules"),
    Call("GET", "/providers/proxies"),
    Call("GET", "/providers/proxies/default"),
    Call("PUT", "/providers/proxies/nope"),
    Call("GET", "/providers/rules"),
    Call("GET", "/connections"),
    Call("DELETE", "/connections/00000000-0000-0000-0000-000000000000"),
    Call("GET", "/logs?level=bogus"),
]


def call(side: Side, c: Call, http_port: int) -> httpx.Response:
    with side.client(c.auth) as client:
        return client.request(c.method, c.path.format(http=http_port),
                              json=c.body if c.body is not None else None)


def compare(path: str, a: Any, b: Any) -> list[str]:
    """Fields of mihomo's answer `a` missing from Mirage's `b`, at the
    depths dashboards read."""
    gaps = [f"{path}: {sorted(missing(a, b))}"] if missing(a, b) else []
    if not isinstance(a, dict) or not isinstance(b, dict):
        return gaps
    for key in ("proxies", "providers"):
        inner_a, inner_b = a.get(key), b.get(key)
        if isinstance(inner_a, dict) and isinstance(inner_b, dict):
            for name in set(inner_a) & set(inner_b):
                gaps += compare(f"{path}.{key}[{name}]", inner_a[name], inner_b[name])
        if isinstance(inner_a, list) and isinstance(inner_b, list) and inner_a and inner_b:
            gaps += compare(f"{path}.{key}[0]", inner_a[0], inner_b[0])
    for key in ("rules", "connections"):
        if a.get(key) and b.get(key):
            gaps += compare(f"{path}.{key}[0]", a[key][0], b[key][0])
    if "metadata" in a and "metadata" in b:
        gaps += compare(f"{path}.metadata", a["metadata"], b["metadata"])
    return gaps


def _values(doc: dict[str, Any]) -> Any:
    """What must be equal, not just present: rule types and payloads, a
    group's type, members and choice."""
    if "rules" in doc:
        return [(r["type"], r["payload"], r["proxy"]) for r in doc["rules"]]
    return (doc["type"], doc["now"], doc["all"])


def test_every_dashboard_route_answers_like_mihomo(pair: Pair) -> None:
    gaps: list[str] = []
    for c in ROUTES:
        answers = {name: call(side, c, pair.held.http_port) for name, side in pair.sides.items()}
        a, b = answers["mihomo"], answers["mirage"]
        if "/delay?url=" in c.path and a.status_code == 503:
            # mihomo's own delay test to the loopback server fails in about
            # one run in four here (503 at once, nothing logged, retries
            # fail too): no oracle for this call then; Mirage's answer must
            # still be a measured delay.
            assert b.status_code == 200 and b.json()["delay"] > 0, (c.path, b.text)
            continue
        what = f"{c.method} {c.path}{'' if c.auth else ' (no secret)'}"
        assert a.status_code == b.status_code, (what, a.status_code, a.text[:200],
                                                b.status_code, b.text[:200])
        if a.content and a.headers.get("content-type", "").startswith("application/json"):
            gaps += compare(what, a.json(), b.json())
            if c.method == "GET" and c.path in ("/rules", "/proxies/Proxy", "/group/Proxy"):
                assert _values(a.json()) == _values(b.json()), what
    assert not gaps, "\n".join(gaps)
    # The delay tests above went into each proxy's and member's history.
    for side in pair.sides.values():
        with side.client() as client:
            assert client.get("/proxies/DIRECT").json()["history"], side.name


def socks_connect(port: int, dst_port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + dst_port.to_bytes(2, "big"))
    reply = s.recv(10)
    assert reply[:2] == b"\x05\x00", reply
    return s


def test_live_connections_look_alike_and_close(pair: Pair) -> None:
    held_port = pair.held.hold_port
    docs = {}
    socks = {}
    for name, side in pair.sides.items():
        socks[name] = socks_connect(side.mixed, held_port)
        socks[name].sendall(b"ping")
        with side.client() as c:
            deadline = time.monotonic() + 5
            while True:
                doc = c.get("/connections").json()
                if doc.get("connections") and doc["uploadTotal"] >= 4:
                    break
                assert time.monotonic() < deadline, (name, doc)
                time.sleep(0.1)
        docs[name] = doc
    gaps = compare("GET /connections (live)", docs["mihomo"], docs["mirage"])
    assert not gaps, "\n".join(gaps)
    mine = docs["mirage"]["connections"][0]
    assert mine["metadata"]["destinationPort"] == str(held_port)
    theirs = docs["mihomo"]["connections"][0]
    for key in ("chains", "rule", "rulePayload"):
        assert mine[key] == theirs[key], key
    for key in ("network", "type", "sourceIP", "destinationIP", "destinationPort", "host",
                "inboundName"):
        assert mine["metadata"][key] == theirs["metadata"][key], key
    # The listener's own port (IN-PORT): each side's mixed port.
    for name, side in pair.sides.items():
        metadata = docs[name]["connections"][0]["metadata"]
        assert metadata["inboundPort"] == str(side.mixed), name
    # DELETE by id ends the flow: the client sees the close.
    for name, side in pair.sides.items():
        flow_id = docs[name]["connections"][0]["id"]
        with side.client() as c:
            assert c.delete(f"/connections/{flow_id}").status_code == 204
        socks[name].settimeout(5)
        try:
            assert socks[name].recv(100) == b"", name
        except ConnectionResetError:
            pass
        socks[name].close()


def test_modes_switch_live_like_mihomo(pair: Pair) -> None:
    """PATCH /configs `mode` on both: global sends a flow the rules would
    send DIRECT to GLOBAL's selection, direct sends it DIRECT without a
    rule; the chains and rule /connections shows are mihomo's."""
    held_port = pair.held.hold_port

    def flow_row(side: Side, sock: socket.socket) -> dict[str, Any]:
        port = str(sock.getsockname()[1])
        with side.client() as c:
            deadline = time.monotonic() + 5
            while True:
                rows = [r for r in c.get("/connections").json().get("connections") or []
                        if r["metadata"]["sourcePort"] == port]
                if rows:
                    return rows[0]
                assert time.monotonic() < deadline, side.name
                time.sleep(0.1)

    try:
        for side in pair.sides.values():
            with side.client() as c:
                assert c.put("/proxies/Proxy", json={"name": "DIRECT"}).status_code == 204
                assert c.put("/proxies/GLOBAL", json={"name": "Proxy"}).status_code == 204
        for mode in ("Global", "direct", "rule"):
            seen = {}
            for name, side in pair.sides.items():
                with side.client() as c:
                    assert c.patch("/configs", json={"mode": mode}).status_code == 204, name
                    assert c.get("/configs").json()["mode"] == mode.lower(), name
                sock = socks_connect(side.mixed, held_port)
                try:
                    row = flow_row(side, sock)
                    seen[name] = (row["chains"], row["rule"])
                    with side.client() as c:
                        c.delete(f"/connections/{row['id']}")
                finally:
                    sock.close()
            assert seen["mirage"] == seen["mihomo"], (mode, seen)
        with pair.sides["mirage"].client() as c:
            assert c.patch("/configs", json={"mode": "script"}).status_code == 400
    finally:
        for side in pair.sides.values():
            with side.client() as c:
                c.patch("/configs", json={"mode": "rule"})


def test_streams_look_alike(pair: Pair) -> None:
    async def first(side: Side, target: str) -> Any:
        ws = await WsClient.connect("127.0.0.1", side.api, f"{target}token={SECRET}")
        try:
            with trio.fail_after(5):
                return await ws.receive_json()
        finally:
            await ws.aclose()

    for target in ("/traffic?", "/memory?", "/connections?interval=200&"):
        a = trio.run(first, pair.sides["mihomo"], target)
        b = trio.run(first, pair.sides["mirage"], target)
        assert not missing(a, b), (target, sorted(missing(a, b)))


# -- a third-party client: clashctl's library (its TUI is built on it) ----------------


# clashctl's stream helpers leave httpx's inner line iterators to the
# garbage collector when a reader stops early (clashctl/api/streams.py);
# trio reports each as an unraisable ResourceWarning. Theirs, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_clashctl_lists_switches_and_reads_connections(pair: Pair) -> None:
    """clashctl (PyPI) is a Textual TUI; its `Clash` client and `streams`
    are what the TUI calls, driven here without a terminal, against both
    servers: the same calls must work on Mirage as on mihomo."""
    from clashctl.api.client import Clash
    from clashctl.api.streams import stream_logs, stream_traffic

    async def drive(side: Side) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with Clash(f"http://127.0.0.1:{side.api}", SECRET) as clash:
            seen["version"] = (await clash.version()).version
            proxies = await clash.proxies()
            group = proxies.root["Proxy"] if hasattr(proxies, "root") else proxies["Proxy"]
            seen["all"] = group.all
            await clash.select("Proxy", "far-socks")
            seen["now"] = (await clash.proxy("Proxy")).now
            await clash.select("Proxy", "DIRECT")
            held = socks_connect(side.mixed, pair.held.hold_port)
            held.sendall(b"ping")
            with trio.fail_after(5):
                while True:
                    conns = (await clash.connections()).connections
                    if conns and conns[0].upload >= 4:
                        break
                    await trio.sleep(0.1)
            seen["conn"] = (conns[0].metadata.destination_port, conns[0].chains)
            await clash.close_connection(conns[0].id)
            held.settimeout(5)
            try:
                seen["closed"] = await trio.to_thread.run_sync(held.recv, 100) == b""
            except ConnectionResetError:
                seen["closed"] = True
            held.close()
            with trio.fail_after(5):
                async with aclosing(stream_traffic(clash)) as traffic:
                    async for sample in traffic:
                        seen["traffic"] = sample.up >= 0
                        break
            if side.name == "mihomo":
                return seen  # its log lines at info come from traffic, not from a switch
            with trio.fail_after(5):

                async def log_something() -> None:
                    await trio.sleep(0.3)
                    await clash.select("Proxy", "DIRECT")  # Mirage logs a switch at info

                async with trio.open_nursery() as nursery, \
                        aclosing(stream_logs(clash)) as logs:
                    nursery.start_soon(log_something)
                    async for line in logs:
                        seen["log"] = bool(line.payload)
                        break
        return seen

    results = {name: trio.run(drive, side) for name, side in pair.sides.items()}
    mine, theirs = results["mirage"], results["mihomo"]
    assert mine["all"] == theirs["all"] == ["DIRECT", "far-socks"]
    assert mine["now"] == theirs["now"] == "far-socks"
    assert mine["conn"] == theirs["conn"] == (str(pair.held.hold_port), ["DIRECT"])
    assert mine["closed"] and theirs["closed"]
    assert mine["traffic"] and mine["log"]
    assert mine["version"].startswith("mirage-")
