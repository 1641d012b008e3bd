"""rule-providers against a local HTTP server (loopback): the first load,
a background refresh that changes routing, a failed refresh that keeps the
last good set, a boot with the server gone that runs on the cached file,
the control API's list()/update(), and a file provider next to the profile."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from appliance.config import parse_config
from appliance.providers.rules import RuleProviders
from appliance.routing import Router
from appliance.rules.engine import FlowContext, RuleEnv
from appliance.rules.provider import write_mrs


@dataclass
class Site:
    files: dict[str, tuple[int, bytes]]
    hits: int = 0


async def _serve(site: Site, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        target = ""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
            elif isinstance(event, h11.Request):
                target = event.target.decode()
            elif isinstance(event, h11.EndOfMessage):
                break
        site.hits += 1
        status, body = site.files.get(target, (404, b""))
        await stream.send_all(conn.send(h11.Response(
            status_code=status, headers=[("Content-Length", str(len(body)))])))
        await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


@pytest.fixture
async def site(nursery: trio.Nursery) -> AsyncIterator[tuple[str, Site]]:
    s = Site({})
    listeners = await nursery.start(partial(trio.serve_tcp, partial(_serve, s), 0,
                                            host="127.0.0.1"))
    yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", s


def profile(url: str, state: Path, interval: int = 0) -> dict[str, Any]:
    return {
        "dns": {"enable": False},
        "proxies": [{"name": "P", "type": "socks5", "server": "127.0.0.1", "port": 1}],
        "rule-providers": {
            "ads": {"type": "http", "behavior": "domain", "format": "text",
                    "url": f"{url}/ads.txt", "interval": interval},
            "nets": {"type": "http", "behavior": "ipcidr", "format": "mrs",
                     "url": f"{url}/nets.mrs", "path": "./ruleset/nets.mrs"},
            "mix": {"type": "inline", "behavior": "classical",
                    "payload": ["DST-PORT,22", "DOMAIN-KEYWORD,tracker"]},
        },
        "rules": ["RULE-SET,ads,REJECT", "RULE-SET,nets,P,no-resolve", "RULE-SET,mix,P",
                  "MATCH,DIRECT"],
        "appliance": {"state-dir": str(state)},
    }


class Live:
    """What the appliance does on a change: recompile over the new content."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.providers: RuleProviders | None = None
        self.router = Router.from_config(cfg, None)
        self.rebuilt = 0
        self.changed = trio.Event()

    async def rebuild(self) -> None:
        assert self.providers is not None
        self.router = self.router.with_env(RuleEnv(providers=self.providers.contents()))
        self.rebuilt += 1
        self.changed.set()

    def route(self, domain: str | None, dst: str | None = None, port: int = 443) -> str:
        import ipaddress

        c = FlowContext(domain, ipaddress.ip_address(dst) if dst else None, port)
        return self.router.pick(c)[0].name


async def test_load_refresh_last_good_and_cached_boot(site: tuple[str, Site],
                                                      tmp_path: Path) -> None:
    url, s = site
    s.files = {"/ads.txt": (200, b"+.ads.test\n"),
               "/nets.mrs": (200, write_mrs("ipcidr", ["10.0.0.0/8"]))}
    cfg = parse_config(profile(url, tmp_path, interval=1))
    live = Live(cfg)
    live.providers = RuleProviders(cfg, on_change=live.rebuild)
    async with trio.open_nursery() as nursery:
        await nursery.start(live.providers.serve)
        assert live.route("x.ads.test") == "REJECT"
        assert live.route(None, "10.2.3.4") == "P"
        assert live.route("a.test", port=22) == "P" and live.route("my-tracker.test") == "P"
        assert live.route("other.test") == "DIRECT"
        # Cached where mihomo would put them.
        assert (tmp_path / "ruleset" / "nets.mrs").exists()
        assert len(list((tmp_path / "rules").iterdir())) == 1  # rules/<md5 of url>

        # The server changes the list: the next refresh (interval 1 s) routes by it.
        s.files["/ads.txt"] = (200, b"+.other.test\n")
        live.changed = trio.Event()
        with trio.fail_after(10):
            await live.changed.wait()
        assert live.route("other.test") == "REJECT" and live.route("x.ads.test") == "DIRECT"

        # A broken list and a dead server: the last good set stays.
        s.files["/ads.txt"] = (500, b"")
        assert await live.providers.update("ads") == "failed"
        assert live.route("other.test") == "REJECT"
        listed = {p["name"]: p for p in live.providers.list()}
        assert listed["ads"]["lastError"].endswith("HTTP 500")
        assert listed["ads"]["ruleCount"] == 1 and listed["mix"]["vehicleType"] == "Inline"
        assert listed["nets"]["behavior"] == "IPCIDR" and listed["nets"]["format"] == "MrsRule"
        nursery.cancel_scope.cancel()

    # Boot again with the server unreachable: the cached files serve.
    down = parse_config(profile("http://127.0.0.1:9", tmp_path))
    again = Live(down)
    # The cache of `ads` is keyed by its URL: point the new URL at the old file.
    old = next((tmp_path / "rules").iterdir())
    from appliance.providers.source import cache_path

    cache_path(tmp_path, "rules", "http://127.0.0.1:9/ads.txt").write_bytes(old.read_bytes())
    again.providers = RuleProviders(down, on_change=again.rebuild)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(again.providers.serve)
        assert again.route("other.test") == "REJECT"
        assert again.route(None, "10.2.3.4") == "P"
        nursery.cancel_scope.cancel()


async def test_file_provider_next_to_the_profile(tmp_path: Path) -> None:
    (tmp_path / "local.yaml").write_text("payload:\n  - '+.local.test'\n")
    data = {
        "dns": {"enable": False},
        "rule-providers": {"local": {"type": "file", "behavior": "domain",
                                     "path": "./local.yaml"}},
        "rules": ["RULE-SET,local,REJECT"],
        "appliance": {"state-dir": str(tmp_path / "state")},
    }
    cfg = parse_config(data, source=tmp_path / "config.yaml")
    live = Live(cfg)
    live.providers = RuleProviders(cfg, on_change=live.rebuild)
    async with trio.open_nursery() as nursery:
        await nursery.start(live.providers.serve)
        assert live.route("a.local.test") == "REJECT"
        (tmp_path / "local.yaml").write_text("payload:\n  - '+.else.test'\n")
        assert await live.providers.update("local") == "updated"
        assert live.route("a.local.test") == "DIRECT" and live.route("else.test") == "REJECT"
        nursery.cancel_scope.cancel()


async def test_geodata_downloaded_when_missing(site: tuple[str, Site], tmp_path: Path) -> None:
    """GEOSITE with no GeoSite.dat in the state dir: fetched from geox-url
    (here the local server, serving the wheel's file), then the rules see it."""
    import ipaddress

    from appliance.geodata import Geodata
    from appliance.geodata.update import GeodataFiles, needed
    from appliance.lab.reference import mihomo_geodata

    url, s = site
    s.files = {"/geosite.dat": (200, (mihomo_geodata() / "geosite.dat").read_bytes()),
               "/bad.mmdb": (200, b"not a database")}
    data = {"dns": {"enable": False}, "rules": ["GEOSITE,google,REJECT", "GEOIP,CN,REJECT",
                                                 "MATCH,DIRECT"],
            "geox-url": {"geosite": f"{url}/geosite.dat", "mmdb": f"{url}/bad.mmdb"},
            "appliance": {"state-dir": str(tmp_path)}}
    cfg = parse_config(data)
    geo = Geodata(tmp_path)
    kinds = needed(cfg.rules, cfg.geodata.mode)
    assert kinds == {"geosite", "mmdb"}
    changed: list[int] = []

    async def on_change() -> None:
        changed.append(1)

    files = GeodataFiles(cfg.geodata, geo, kinds, on_change=on_change)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            await nursery.start(files.serve)
        nursery.cancel_scope.cancel()
    assert (tmp_path / "GeoSite.dat").exists() and changed
    assert not (tmp_path / "geoip.metadb").exists()  # refused: not a MaxMind DB
    assert "not a MaxMind DB" in (files.sources["mmdb"].status.last_error or "")
    router = Router.from_config(cfg, None, RuleEnv(geo=geo))
    assert router.pick(FlowContext("mail.google.com", None, 443))[0].name == "REJECT"
    # No country database: GEOIP matches nothing, the appliance goes on.
    assert router.pick(FlowContext(None, ipaddress.ip_address("114.114.114.114"), 443)
                       )[0].name == "DIRECT"
