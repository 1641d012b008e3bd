"""Control API over a real loopback socket, read by the real CLI client."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import trio
from dnslib import MX, QTYPE, RR, DNSRecord

from appliance.api import server as api_server
from appliance.api.client import ApiClient, ApiError
from appliance.config import parse_rule
from appliance.config.model import Config, Listen, ProxyConfig
from appliance.fakeip.pool import FakeIPPool


class Counted:
    def __init__(self, stats: dict[str, int], rows: list[dict[str, Any]] | None = None) -> None:
        self._stats = stats
        self._rows = rows or []

    def stats(self) -> dict[str, int]:
        return self._stats

    def snapshot(self) -> list[dict[str, Any]]:
        return self._rows


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


class View:
    """The `Sources` the API reads: a config, a pool, counters, flows."""

    def __init__(self, secret: str = "") -> None:
        self.cfg = Config(
            secret=secret, tproxy_port=7893,
            proxies=(ProxyConfig(name="dante", type="socks5", server="192.0.2.1", port=1080),),
            rules=(parse_rule("DOMAIN-SUFFIX,alpha.test,dante"), parse_rule("MATCH,DIRECT")),
        )
        self.started_at = time.monotonic()
        self.reloads = 0
        self.pool = FakeIPPool(IPv4Network("198.18.0.0/16"))
        self.pool.allocate("www.alpha.test")
        self.pool.allocate("www.beta.test")
        self.pool.pin(IPv4Address("198.18.0.1"))
        self.resolver = Resolver()
        self.dns_handler = Counted({"queries_total": 7})
        self.flows = Counted({"opened": 1}, [{"id": "1", "upload": 10, "download": 20}])
        self.udp = None
        self.capture: Any = Capture()
        self.offload = None
        self.limits: Any = None

    def preconnects(self) -> Mapping[str, Counted]:
        return {}

    def wants_fake_ip(self, name: str) -> bool:
        return name.endswith(".test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_api(nursery: trio.Nursery, view: View) -> ApiClient:
    port = free_port()
    await nursery.start(api_server.serve, view, "127.0.0.1", port)
    return ApiClient("127.0.0.1", port, view.cfg.secret)


async def raw_exchange(client: ApiClient, request: bytes) -> bytes:
    """Send raw bytes to the API and read until it closes (5 s bound)."""
    stream = await trio.open_tcp_stream(client.host, client.port)
    try:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
        return data
    finally:
        await stream.aclose()


async def test_endpoints_answer_json(nursery: trio.Nursery) -> None:
    view = View()
    client = await start_api(nursery, view)
    get = lambda path: trio.to_thread.run_sync(client.get, path)  # noqa: E731
    assert await get("/") == {"hello": "mirage"}
    assert (await get("/configs"))["tproxy-port"] == 7893
    proxies = (await get("/proxies"))["proxies"]
    assert proxies["dante"]["type"] == "Socks5" and "DIRECT" in proxies
    assert (await get("/rules"))["rules"][0] == {
        "type": "DOMAIN-SUFFIX", "payload": "alpha.test", "proxy": "dante"}
    conns = await get("/connections")
    assert conns["uploadTotal"] == 10 and conns["downloadTotal"] == 20
    mappings = (await get("/mirage/mappings"))["mappings"]
    assert mappings[0] == {"domain": "www.alpha.test", "ip": "198.18.0.1", "pins": 1}
    assert await get("/mirage/resolve?name=WWW.alpha.test.&type=MX") == {
        "name": "www.alpha.test", "type": "MX", "fake_ip": True,
        "mapping": {"ipv4": "198.18.0.1"},
        "upstream": {"rcode": "NOERROR", "answers": [
            {"name": "www.alpha.test", "type": "MX", "ttl": 60, "data": "10 mx.alpha.test."}]}}
    assert view.resolver.asked == [("www.alpha.test", "MX")]
    status = await get("/mirage/status")
    assert status["counters"]["gateway"] == {"opened": 1}
    assert status["counters"]["capture"] == {"dropped_total": 1}
    assert status["clients"][0]["address"] == "192.0.2.7"
    assert status["tproxy_port"] == 7893 and "udp" not in status["counters"]


async def test_bad_requests_get_clear_errors(nursery: trio.Nursery) -> None:
    client = await start_api(nursery, View())
    with pytest.raises(ApiError, match="404"):
        await trio.to_thread.run_sync(client.get, "/nope")
    with pytest.raises(ApiError, match=r"400.*name"):
        await trio.to_thread.run_sync(client.get, "/mirage/resolve")
    with pytest.raises(ApiError, match="unknown query type"):
        await trio.to_thread.run_sync(client.get, "/mirage/resolve?name=a.test&type=BOGUS")


async def test_garbage_on_the_socket_gets_400_and_service_continues(nursery: trio.Nursery) -> None:
    client = await start_api(nursery, View())
    reply = await raw_exchange(client, b"\x16\x03\x01 this is not http\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    assert await trio.to_thread.run_sync(client.get, "/") == {"hello": "mirage"}


async def test_secret_is_required_when_set(nursery: trio.Nursery) -> None:
    view = View(secret="s3cret")
    client = await start_api(nursery, view)
    anonymous = ApiClient(client.host, client.port, "")
    with pytest.raises(ApiError, match="401"):
        await trio.to_thread.run_sync(anonymous.get, "/mirage/status")
    wrong = ApiClient(client.host, client.port, "guess")
    with pytest.raises(ApiError, match="401"):
        await trio.to_thread.run_sync(wrong.get, "/mirage/status")
    status = await trio.to_thread.run_sync(client.get, "/mirage/status")
    assert isinstance(status, dict) and status["counters"]["dns"]["queries_total"] == 7


async def test_metrics_are_prometheus_text(nursery: trio.Nursery) -> None:
    client = await start_api(nursery, View())
    data = await raw_exchange(
        client, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"text/plain" in head
    lines = body.decode().splitlines()
    assert "# TYPE mirage_dns_queries_total counter" in lines
    assert "mirage_dns_queries_total 7" in lines
    assert "mirage_gateway_opened 1" in lines
    assert "mirage_fakeip_size4 2" in lines
    assert lines.count("# TYPE mirage_capture_client_packets_total counter") == 1
    assert 'mirage_capture_client_packets_total{client="192.0.2.7"} 3' in lines
    assert 'mirage_capture_client_packets_total{client="we\\"ird"} 4' in lines


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
    from appliance.routing import Dispatcher, Router

    cfg = Config(proxies=(
        ProxyConfig(name="a", type="socks5", server="192.0.2.1", port=1080, preconnect=2),
        ProxyConfig(name="b", type="http", server="192.0.2.2", port=3128, preconnect=1),
        ProxyConfig(name="c", type="socks5", server="192.0.2.3", port=1080),
    ))
    from appliance.api import views

    app = Appliance(cfg)
    app.dispatcher = Dispatcher(Router.from_config(cfg, None), connect_timeout=1.0)
    rows = list(views.series(app))
    names = [metric for metric, _, _ in rows]
    # Proxies without a pool (c) have no series; each family is contiguous.
    assert [labels["proxy"] for _, labels, _ in rows] == ["a", "b"] * 5
    assert names == [n for n in dict.fromkeys(names) for _ in range(2)]
    assert ("mirage_preconnect_ready", {"proxy": "a"}, 0) in rows
    text = api_server.render_metrics(app)
    assert text.count("# TYPE mirage_preconnect_hits_total counter") == 1
    assert 'mirage_preconnect_misses_total{proxy="b"} 0' in text
    app.dispatcher.router.close()
