"""Control API over a real loopback socket (hypercorn + Starlette), read with
httpx, the CLI's client and a websocket client."""

from __future__ import annotations

import json
import socket
import time
import zipfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from dnslib import MX, QTYPE, RR, DNSRecord

from appliance.api import server as api_server
from appliance.api import views
from appliance.api.client import ApiClient, ApiError
from appliance.api.logbus import LogBus
from appliance.api.providers import Providers
from appliance.config import load_config, parse_rule
from appliance.config.model import (
    ApplianceConfig,
    Config,
    ControllerConfig,
    CorsConfig,
    Listen,
    ProxyConfig,
    ProxyGroupConfig,
)
from appliance.fakeip.pool import FakeIPPool
from appliance.flow import Flow, tproxy_entry
from appliance.gateway.splice import FlowRegistry
from appliance.metrics import render
from appliance.outbound.health import DelayHistory
from appliance.outbound.selections import Selections, selected_path
from appliance.routing import Dispatcher, Router, chain
from tests.ws_client import WsClient, WsRefused


class Counted:
    def __init__(self, stats: dict[str, int]) -> None:
        self._stats = stats

    def stats(self) -> dict[str, int]:
        return self._stats


class Capture:
    """The eBPF capture's counters: totals and per LAN client."""

    def stats(self) -> dict[str, int]:
        return {"dropped_total": 1}

    def clients(self) -> list[dict[str, Any]]:
        rows = []
        for address, packets in (("192.0.2.7", 3), ('we"ird', 4)):
            rows.append({"address": address, "packets": packets, "bytes": 0,
                         "captured_packets": 0, "captured_bytes": 0})
        return rows


class Resolver:
    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    async def query(self, request: DNSRecord) -> DNSRecord:
        await trio.lowlevel.checkpoint()
        self.asked.append((str(request.q.qname).rstrip("."), QTYPE[request.q.qtype]))
        reply = request.reply()
        reply.add_answer(RR(request.q.qname, QTYPE.MX, rdata=MX("mx.alpha.test"), ttl=60))
        return reply


def make_config(secret: str = "", **controller: Any) -> Config:
    return Config(
        secret=secret, tproxy_port=7893, mixed_port=7890, allow_lan=False,
        log_level="warning",
        proxies=(ProxyConfig(name="dante", type="socks5", server="192.0.2.1", port=1080),
                 ProxyConfig(name="squid", type="http", server="192.0.2.2", port=3128)),
        proxy_groups=(ProxyGroupConfig(name="Proxy", type="select",
                                       proxies=("dante", "squid", "DIRECT")),),
        rules=(parse_rule("DOMAIN-SUFFIX,alpha.test,Proxy"), parse_rule("MATCH,DIRECT")),
        controller=ControllerConfig(**controller),
        appliance=ApplianceConfig(controller_hosts=("gateway.lan",)),
    )


class View:
    """What the API reads and changes: the `Controlled` sources of a
    running appliance, with real pool, flow registry and router."""

    def __init__(self, cfg: Config, state_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.started_at = time.monotonic()
        self.reloads = 0
        self.pool = FakeIPPool(IPv4Network("198.18.0.0/16"))
        self.pool.allocate("www.alpha.test")
        self.pool.allocate("www.beta.test")
        self.pool.pin(IPv4Address("198.18.0.1"))
        self.resolver = Resolver()
        self.dns_handler = Counted({"queries": 7})
        self.flows = FlowRegistry()
        self.udp = None
        self.capture: Any = Capture()
        self.offload = None
        self.limits: Any = None
        self.delays = DelayHistory()
        self.selections = Selections(selected_path(state_dir) if state_dir else None)
        self.dispatcher = Dispatcher(self.router(), connect_timeout=1.0)
        self.api_providers = Providers(lambda: self.dispatcher.router.outbounds)
        self.log_bus = LogBus()
        self.applied: list[Config] = []
        self.reload_ok = True

    def router(self) -> Router:
        return Router.from_config(self.cfg, None, delays=self.delays,
                                  selections=self.selections)

    def preconnects(self) -> Mapping[str, Counted]:
        return {}

    def wants_fake_ip(self, name: str) -> bool:
        return name.endswith(".test")

    async def reload(self) -> bool:
        await trio.lowlevel.checkpoint()
        if self.reload_ok:
            self.reloads += 1
            self.dispatcher.replace(self.router())
        return self.reload_ok

    async def apply_config(self, new: Config) -> None:
        await trio.lowlevel.checkpoint()
        self.cfg = new
        self.applied.append(new)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, view: View, port: int) -> None:
        self.view = view
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def http(self, secret: str | None = None) -> httpx.AsyncClient:
        secret = self.view.cfg.secret if secret is None else secret
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.AsyncClient(base_url=self.base, headers=headers, trust_env=False,
                                 timeout=5)


async def serve(nursery: trio.Nursery, view: View) -> Served:
    port = free_port()
    await nursery.start(api_server.serve, view, "127.0.0.1", port)
    return Served(view, port)


@pytest.fixture
async def api(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Served]:
    yield await serve(nursery, View(make_config(), tmp_path))


@pytest.fixture
async def guarded(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Served]:
    cfg = make_config("s3cret", cors=CorsConfig(allow_origins=("http://dash.example",)))
    yield await serve(nursery, View(cfg, tmp_path))


async def raw_exchange(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    """Send raw bytes to the API and read until it closes or resets (5 s
    bound)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    try:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            try:
                while chunk := await stream.receive_some(4096):
                    data += chunk
            except trio.BrokenResourceError:  # reset: refused at accept
                pass
        return data
    finally:
        await stream.aclose()


async def test_mihomo_documents_carry_real_values(api: Served) -> None:
    view = api.view
    flow = view.flows.open("tcp", ("192.168.1.20", 40000), ("198.18.0.1", 443),
                           "www.alpha.test")
    routed = Flow("tcp", "tproxy", IPv4Address("192.168.1.20"), 40000,
                  IPv4Address("198.18.0.1"), 443, "www.alpha.test", entry=tproxy_entry(7893))
    routed.outbound, routed.rule = "Proxy", view.cfg.rules[0]
    routed.chains = chain(view.dispatcher.router.outbounds["Proxy"])
    flow.routed(routed)
    flow.add_up(10)
    flow.add_down(20)
    gone = view.flows.open("tcp", ("192.168.1.21", 40001), ("192.0.2.9", 80), None)
    gone.add_up(5)
    view.flows.close(gone)
    async with api.http() as http:
        assert (await http.get("/")).json() == {"hello": "mihomo"}
        assert (await http.get("/version")).json()["meta"] is True
        configs = (await http.get("/configs")).json()
        assert (configs["tproxy-port"], configs["mixed-port"], configs["allow-lan"],
                configs["log-level"], configs["mode"]) == (7893, 7890, False, "warning", "rule")
        proxies = (await http.get("/proxies")).json()["proxies"]
        assert proxies["dante"]["type"] == "Socks5" and proxies["DIRECT"]["type"] == "Direct"
        assert proxies["Proxy"]["type"] == "Selector"
        assert proxies["Proxy"]["now"] == "dante"
        assert proxies["Proxy"]["all"] == ["dante", "squid", "DIRECT"]
        assert "Proxy" in proxies["GLOBAL"]["all"]
        rules = (await http.get("/rules")).json()["rules"]
        assert rules[0]["type"] == "DomainSuffix" and rules[0]["payload"] == "alpha.test"
        assert rules[0]["proxy"] == "Proxy"
        conns = (await http.get("/connections")).json()
        # Totals are every byte since start, the closed flow's too.
        assert (conns["uploadTotal"], conns["downloadTotal"]) == (15, 20)
        (row,) = conns["connections"]
        assert row["id"] == str(flow.id) and (row["upload"], row["download"]) == (10, 20)
        assert row["metadata"]["host"] == "www.alpha.test"
        assert row["metadata"]["sourceIP"] == "192.168.1.20"
        assert row["metadata"]["destinationPort"] == "443"
        assert row["metadata"]["type"] == "TProxy" and row["metadata"]["network"] == "tcp"
        assert (row["metadata"]["inboundName"], row["metadata"]["inboundPort"]) \
            == ("DEFAULT-TPROXY", "7893")
        assert row["chains"] == ["dante", "Proxy"]
        assert (row["rule"], row["rulePayload"]) == ("DomainSuffix", "alpha.test")
        assert row["start"].endswith("Z")
        mappings = (await http.get("/mirage/mappings")).json()["mappings"]
        assert mappings[0] == {"domain": "www.alpha.test", "ip": "198.18.0.1", "pins": 1}
        answer = (await http.get("/dns/query", params={"name": "a.alpha.test", "type": "MX"}))
        assert answer.json()["Status"] == 0
        assert answer.json()["Answer"][0]["type"] == 15
        assert answer.json()["Question"][0]["Name"] == "a.alpha.test."
        assert (await http.get("/dns/query", params={"name": "x", "type": "BOGUS"})
                ).status_code == 400
        resolved = (await http.get("/mirage/resolve?name=WWW.alpha.test.&type=MX")).json()
        assert resolved["mapping"] == {"ipv4": "198.18.0.1"}
        status = (await http.get("/mirage/status")).json()
        assert status["counters"]["dns"] == {"queries": 7}
        assert status["clients"][0]["address"] == "192.0.2.7"
        providers = (await http.get("/providers/proxies")).json()["providers"]
        assert [p["name"] for p in providers["default"]["proxies"]] == ["dante", "squid"]
        assert (await http.get("/providers/rules")).json() == {"providers": {}}
        assert (await http.put("/providers/proxies/nope")).status_code == 404
        assert (await http.get("/group/Proxy")).json()["now"] == "dante"
        assert (await http.get("/group/dante")).status_code == 404


async def test_select_switches_the_group_and_is_remembered(api: Served,
                                                          tmp_path: Path) -> None:
    view = api.view
    async with api.http() as http:
        r = await http.put("/proxies/Proxy", json={"name": "squid"})
        assert r.status_code == 204
        group: Any = view.dispatcher.router.outbounds["Proxy"]
        assert group.selected.name == "squid"
        assert (await http.get("/proxies/Proxy")).json()["now"] == "squid"
        assert (await http.put("/proxies/Proxy", json={"name": "nope"})).status_code == 400
        assert (await http.put("/proxies/dante", json={"name": "x"})).json() == {
            "message": "Must be a Selector"}
        assert (await http.put("/proxies/nope", json={"name": "x"})).status_code == 404
        # A reload builds new groups: the choice is applied to them.
        assert (await http.put("/configs", json={"path": "", "payload": ""})).status_code == 204
        assert view.dispatcher.router.outbounds["Proxy"] is not group
        assert (await http.get("/proxies/Proxy")).json()["now"] == "squid"
    # And a restart reads it from the state dir.
    again = View(make_config(), tmp_path)
    assert again.dispatcher.router.outbounds["Proxy"].selected.name == "squid"


async def test_delete_connections_cancels_the_flows(api: Served) -> None:
    flows = api.view.flows
    ended: list[int] = []

    async def relay(flow_id: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        record = flows.open("tcp", ("192.168.1.20", 40000 + flow_id), ("192.0.2.9", 80), None)
        with record.cancel_scope:
            task_status.started()
            await trio.sleep_forever()
        flows.close(record)
        ended.append(flow_id)

    async with trio.open_nursery() as nursery, api.http() as http:
        for i in range(3):
            await nursery.start(relay, i)
        first = flows.snapshot()[0]["id"]
        assert (await http.delete(f"/connections/{first}")).status_code == 204
        await trio.testing.wait_all_tasks_blocked()
        assert ended == [0] and len(flows) == 2
        assert (await http.delete("/connections/999")).status_code == 204
        assert (await http.delete("/connections")).status_code == 204
    assert sorted(ended) == [0, 1, 2] and len(flows) == 0



class UdpSessions:
    """The UDP gateway as the API sees it: sessions listed and closed by id."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.closed: list[int] = []

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self.ids)}

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"id": i, "network": "udp", "src_ip": "192.168.1.20", "src_port": 5000 + i,
                 "dst_ip": "198.18.0.1", "dst_port": 53, "domain": "www.alpha.test",
                 "outbound": "DIRECT", "started": time.time(), "up": 0, "down": 0}
                for i in self.ids]

    def close_flow(self, flow_id: int) -> bool:
        if flow_id not in self.ids:
            return False
        self.ids.remove(flow_id)
        self.closed.append(flow_id)
        return True


async def test_delete_connections_ends_udp_sessions_too(api: Served) -> None:
    flows = api.view.flows
    tcp = flows.open("tcp", ("192.168.1.20", 40000), ("192.0.2.9", 80), None)
    udp = UdpSessions([flows.new_id(), flows.new_id()])
    api.view.udp = udp  # type: ignore[assignment]
    async with api.http() as http:
        listed = [c["id"] for c in (await http.get("/connections")).json()["connections"]]
        assert sorted(listed) == sorted(str(i) for i in (tcp.id, *udp.ids))
        first = udp.ids[0]
        assert (await http.delete(f"/connections/{first}")).status_code == 204
        assert udp.closed == [first] and not tcp.cancel_scope.cancel_called
        assert (await http.delete("/connections")).status_code == 204
    assert udp.ids == [] and tcp.cancel_scope.cancel_called


async def test_head_patch_put_and_errors(api: Served) -> None:
    view = api.view
    async with api.http() as http:
        head = await http.head("/version")
        assert head.status_code == 200 and head.content == b""
        assert (await http.get("/nope")).status_code == 404
        assert (await http.patch("/configs", json={"log-level": "debug"})).status_code == 204
        assert view.cfg.log_level == "debug"
        bad = await http.patch("/configs", json={"mixed-port": 1})
        assert bad.status_code == 400 and "mixed-port" in bad.json()["message"]
        # mihomo's modes, any case; the live router's (app.apply_config).
        assert (await http.patch("/configs", json={"mode": "Global"})).status_code == 204
        assert view.cfg.mode == "global"
        assert (await http.get("/configs")).json()["mode"] == "global"
        assert (await http.patch("/configs", json={"mode": "script"})).status_code == 400
        # Never another file, never a posted profile.
        r = await http.put("/configs", json={"path": "/etc/passwd"})
        assert r.status_code == 400
        r = await http.put("/configs", json={"payload": "rules: []"})
        assert r.status_code == 400
        view.reload_ok = False
        assert (await http.put("/configs", json={})).status_code == 400
        assert (await http.post("/restart")).status_code == 500
        view.reload_ok = True
        assert (await http.post("/restart")).json() == {"status": "ok"}
        r = await http.post("/cache/fakeip/flush")
        assert r.status_code == 204
        # The pinned mapping (a live flow) stays; the other is gone.
        assert [m[0] for m in view.pool.mappings()] == ["www.alpha.test"]
        r = await http.get("/proxies/dante/delay", params={"timeout": "x"})
        assert r.status_code == 400


async def test_garbage_on_the_socket_gets_400_and_service_continues(api: Served) -> None:
    reply = await raw_exchange(api.port, b"\x16\x03\x01 this is not http\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    async with api.http() as http:
        assert (await http.get("/")).status_code == 200


async def test_secret_cors_and_host_checks(guarded: Served) -> None:
    async with guarded.http(secret="") as anonymous:
        assert (await anonymous.get("/mirage/status")).status_code == 401
        # ?token= is for websockets only, as in mihomo.
        assert (await anonymous.get("/version?token=s3cret")).status_code == 401
        ui = await anonymous.get("/ui/")
        assert ui.status_code == 404  # no external-ui configured; no secret needed to ask
    async with guarded.http(secret="guess") as wrong:
        assert (await wrong.get("/version")).status_code == 401
    async with guarded.http() as http:
        assert (await http.get("/version")).status_code == 200
        for host, status in [("127.0.0.1", 200), ("localhost:9090", 200), ("[::1]:1", 200),
                             ("gateway.lan", 200), ("evil.example", 403),
                             ("evil.example:9090", 403), ("", 403)]:
            r = await http.get("/version", headers={"Host": host})
            assert r.status_code == status, host
        r = await http.get("/version", headers={"Origin": "http://dash.example"})
        assert r.headers["access-control-allow-origin"] == "http://dash.example"
        r = await http.get("/version", headers={"Origin": "http://other.example"})
        assert "access-control-allow-origin" not in r.headers
        pre = await http.options("/proxies/Proxy", headers={
            "Origin": "http://dash.example", "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Private-Network": "true"})
        assert pre.status_code == 204
        assert "PUT" in pre.headers["access-control-allow-methods"]
        assert pre.headers["access-control-allow-private-network"] == "true"
    with pytest.raises(WsRefused):
        await WsClient.connect("127.0.0.1", guarded.port, "/traffic")
    ws = await WsClient.connect("127.0.0.1", guarded.port, "/traffic?token=s3cret")
    await ws.aclose()


async def test_no_cors_without_a_secret(api: Served) -> None:
    async with api.http() as http:
        r = await http.get("/version", headers={"Origin": "http://dash.example"})
        assert "access-control-allow-origin" not in r.headers
        pre = await http.options("/version", headers={
            "Origin": "http://dash.example", "Access-Control-Request-Method": "GET"})
        assert pre.status_code == 204 and "access-control-allow-origin" not in pre.headers


async def test_streams_as_websockets_and_json_lines(api: Served) -> None:
    view = api.view
    flow = view.flows.open("tcp", ("192.168.1.20", 40000), ("192.0.2.9", 80), None)
    ws = await WsClient.connect("127.0.0.1", api.port, "/connections?interval=100")
    try:
        with trio.fail_after(5):
            snapshot = await ws.receive_json()
        assert snapshot["connections"][0]["id"] == str(flow.id)
    finally:
        await ws.aclose()
    traffic = await WsClient.connect("127.0.0.1", api.port, "/traffic")
    logs = await WsClient.connect("127.0.0.1", api.port, "/logs?level=warning")
    try:
        flow.add_down(4096)
        with trio.fail_after(5):
            tick = await traffic.receive_json()
        assert tick["down"] == 4096 and tick["up"] == 0
        with view.log_bus.installed(__import__("logging").getLogger("mirage.test")):
            import logging

            logging.getLogger("mirage.test").info("not at warning")
            logging.getLogger("mirage.test").warning("seen at warning")
            with trio.fail_after(5):
                line = await logs.receive_json()
        assert line == {"type": "warning", "payload": "[mirage.test] seen at warning"}
    finally:
        await traffic.aclose()
        await logs.aclose()
    # Plain HTTP: chunked JSON lines.
    stream = await trio.open_tcp_stream("127.0.0.1", api.port)
    try:
        await stream.send_all(b"GET /memory HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while b"}\n" not in data:
                data += await stream.receive_some(4096)
    finally:
        await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"application/json" in head
    size, _, chunk = body.partition(b"\r\n")
    assert json.loads(chunk[: int(size, 16)]) == {"inuse": 0, "oslimit": 0}
    async with api.http() as http:
        assert (await http.get("/logs?level=loud")).status_code == 400


async def test_idle_sockets_from_one_client_lock_out_nobody(api: Served) -> None:
    # 200 idle connections from 127.0.0.2: PER_CLIENT held, the rest
    # closed at accept; the other client is served at once.
    idle = []
    try:
        for _ in range(200):
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.2", 0))
            await sock.connect(("127.0.0.1", api.port))
            idle.append(sock)
        async with api.http() as http:
            with trio.fail_after(2):
                assert (await http.get("/version")).status_code == 200
        # The same client's next connection is refused while it holds them all.
        reply = await raw_exchange(api.port, b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                   source="127.0.0.2")
        assert reply == b""
        # Idle ones are closed after IDLE_TIMEOUT: the client can come back.
        with trio.fail_after(api_server.IDLE_TIMEOUT + 5):
            while True:
                reply = await raw_exchange(api.port, b"GET /version HTTP/1.1\r\n"
                                           b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n",
                                           source="127.0.0.2")
                if reply.startswith(b"HTTP/1.1 200"):
                    break
                await trio.sleep(0.5)
    finally:
        for sock in idle:
            sock.close()


async def test_metrics_are_prometheus_with_help_and_histograms(api: Served) -> None:
    view = api.view
    view.flows.open("tcp", ("192.168.1.20", 40000), ("192.0.2.9", 80), None).add_up(3)
    async with api.http() as http:
        r = await http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert "# TYPE mirage_dns_queries_total counter" in lines
    assert "mirage_dns_queries_total 7.0" in lines
    assert any(line.startswith("# HELP mirage_dns_queries_total ") for line in lines)
    assert "# TYPE mirage_gateway_opened_total counter" in lines
    assert "mirage_gateway_bytes_up_total 3.0" in lines
    assert "# TYPE mirage_gateway_active gauge" in lines
    assert "mirage_fakeip_size4 2.0" in lines
    assert "# TYPE mirage_capture_dropped_total counter" in lines
    assert lines.count("# TYPE mirage_capture_client_packets_total counter") == 1
    assert 'mirage_capture_client_packets_total{client="192.0.2.7"} 3.0' in lines
    assert 'mirage_capture_client_packets_total{client="we\\"ird"} 4.0' in lines
    assert "# TYPE mirage_connect_seconds histogram" in lines
    assert "# TYPE mirage_dns_upstream_answer_seconds histogram" in lines


async def test_external_ui_from_a_local_zip(nursery: trio.Nursery, tmp_path: Path) -> None:
    archive = tmp_path / "dash.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("dist/index.html", "<html>dashboard</html>")
        z.writestr("dist/assets/app.js", "console.log(1)")
    cfg = make_config("s3cret", ui=tmp_path / "ui", ui_url=str(archive))
    served = await serve(nursery, View(cfg, tmp_path))
    async with served.http(secret="") as http:
        r = await http.get("/ui")
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        assert "dashboard" in (await http.get("/ui/")).text
        assert (await http.get("/ui/assets/app.js")).text == "console.log(1)"


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    from appliance.api.ui import unpack

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../escaped.html", "x")
    with pytest.raises(ValueError, match="outside"):
        unpack(archive, tmp_path / "ui")
    assert not (tmp_path / "escaped.html").exists()


def test_a_lan_controller_without_secret_stays_on_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    dns = "dns:\n  nameserver: [udp://192.0.2.53]\n"
    # mihomo opens it to the LAN; Mirage loads the profile and keeps the
    # API on loopback until a secret is set, and says so.
    cfg.write_text("external-controller: 0.0.0.0:9090\n" + dns)
    loaded = load_config(cfg)
    assert str(loaded.external_controller) == "127.0.0.1:9090"
    assert any(n.path == "external-controller" and "127.0.0.1:9090 only" in n.note
               for n in loaded.load_notes)
    cfg.write_text("external-controller: '[::]:9090'\n" + dns)
    assert str(load_config(cfg).external_controller) == "[::1]:9090"
    cfg.write_text("external-controller: '[::1]:9090'\nexternal-ui: ui\n"
                   "external-ui-url: file:///srv/dash.zip\n"
                   "external-controller-cors: {allow-origins: [http://a.example]}\n" + dns)
    loaded = load_config(cfg)
    assert loaded.controller.ui == tmp_path / "ui"
    assert loaded.controller.ui_url == "/srv/dash.zip"
    assert loaded.controller.cors.allow_origins == ("http://a.example",)
    # A dashboard URL mihomo would download: not downloaded, said, dropped.
    cfg.write_text("external-controller: 127.0.0.1:9090\n"
                   "external-ui-url: https://example.com/dash.zip\n" + dns)
    loaded = load_config(cfg)
    assert loaded.controller.ui_url == ""
    assert any(n.path == "external-ui-url" and "not downloaded" in n.note
               for n in loaded.load_notes)


def test_client_reads_controller_from_config(tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("external-controller: 127.0.0.1:9999\nsecret: abc\n"
                   "dns:\n  nameserver: [udp://192.0.2.53]\n")
    client = ApiClient.from_config_file(cfg)
    assert (client.host, client.port, client.secret) == ("127.0.0.1", 9999, "abc")
    with pytest.raises(ApiError, match="9999"):
        client.get("/")  # nothing listens there: a clear error, not a traceback
    assert json.dumps(Listen("::1", 1).__str__()) == '"[::1]:1"'


def test_preconnect_series_come_one_family_at_a_time() -> None:
    # The appliance's own series(): each proxy's pool counters, grouped by
    # metric (the exposition format wants a family's samples together).
    from appliance.app import Appliance

    cfg = replace(Config(), proxies=(
        ProxyConfig(name="a", type="socks5", server="192.0.2.1", port=1080, preconnect=2),
        ProxyConfig(name="b", type="http", server="192.0.2.2", port=3128, preconnect=1),
        ProxyConfig(name="c", type="socks5", server="192.0.2.3", port=1080),
    ))
    app = Appliance(cfg)
    app.dispatcher = Dispatcher(Router.from_config(cfg, None), connect_timeout=1.0)
    rows = list(views.series(app))
    names = [metric for metric, _, _ in rows]
    # Proxies without a pool (c) have no series; each family is contiguous.
    assert [labels["proxy"] for _, labels, _ in rows] == ["a", "b"] * 5
    assert names == [n for n in dict.fromkeys(names) for _ in range(2)]
    assert ("mirage_preconnect_ready", {"proxy": "a"}, 0) in rows
    text = render(views.collector(app)).decode()
    assert text.count("# TYPE mirage_preconnect_hits_total counter") == 1
    assert 'mirage_preconnect_misses_total{proxy="b"} 0.0' in text
    app.dispatcher.router.close()


async def test_cli_commands_read_and_switch(api: Served, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    from appliance.cli import build_parser

    def main(argv: list[str]) -> int:  # cli.main without its SIGPIPE setup (main thread only)
        args = build_parser().parse_args(argv)
        result: int = args.func(args)
        return result

    view = api.view
    flow = view.flows.open("tcp", ("192.168.1.20", 40000), ("198.18.0.1", 443),
                           "www.alpha.test")
    flow.add_down(2048)
    cfg = tmp_path / "none.yaml"  # the flags say where; the file is never read
    flags = ["-c", str(cfg), "--controller", f"127.0.0.1:{api.port}", "--secret", ""]

    async def run(*argv: str) -> tuple[int, str]:
        code = await trio.to_thread.run_sync(main, [*argv, *flags])
        return code, capsys.readouterr().out

    code, out = await run("select", "Proxy", "squid")
    assert code == 0 and out.splitlines() == [
        "Proxy (Selector): squid", "    dante", "  * squid", "    DIRECT"]
    assert view.dispatcher.router.outbounds["Proxy"].now == "squid"
    code, out = await run("connections")
    header, row, total = out.splitlines()
    assert header.split() == ["ID", "NET", "SOURCE", "DESTINATION", "CHAIN", "RULE", "UP",
                              "DOWN", "AGE"]
    assert row.split()[:4] == [str(flow.id), "tcp", "192.168.1.20:40000", "www.alpha.test:443"]
    assert "2.0 KiB" in row and "down 2.0 KiB" in total
    code, out = await run("connections", "--json")
    assert json.loads(out)["connections"][0]["metadata"]["host"] == "www.alpha.test"
    code, out = await run("connections", "--close", str(flow.id))
    assert code == 0 and flow.cancel_scope.cancel_called
    code, out = await run("status")
    assert out.startswith("mirage ")
    assert ["dns", "queries", "7"] in [line.split() for line in out.splitlines()]
    code, out = await run("resolve", "www.alpha.test", "--type", "MX")
    assert "fake IP yes (mapping 198.18.0.1)" in out and "mx.alpha.test" in out
