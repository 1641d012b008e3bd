"""appliance/providers/source.py against a local HTTP server on loopback:
download and cache, conditional requests, last good copy on failure,
size-limit, redirects, a cached boot with the server gone, file and inline
sources, and the dial hook (how `proxy:` fetches go through an outbound)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from appliance.providers.source import (
    ProviderSource,
    SourceSpec,
    atomic_write,
    cache_path,
    http_get,
    safe_url,
)


@dataclass
class Served:
    """What the test server answers, and what it saw."""

    status: int = 200
    body: bytes = b"one\n"
    headers: list[tuple[str, str]] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    redirect_from: str | None = None


async def _handle(stream: trio.SocketStream, served: Served) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Request):
                target = event.target.decode()
                served.paths.append(target)
                served.requests.append(
                    {k.decode().lower(): v.decode() for k, v in event.headers})
                continue
            if isinstance(event, h11.EndOfMessage):
                break
        target = served.paths[-1]
        req = served.requests[-1]
        if served.redirect_from is not None and target == served.redirect_from:
            status, body, headers = 302, b"", [("Location", "/moved")]
        elif served.status == 200 and "if-none-match" in req and \
                ("ETag", req["if-none-match"]) in served.headers:
            status, body, headers = 304, b"", []
        else:
            status, body, headers = served.status, served.body, list(served.headers)
        headers += [("Content-Length", str(len(body))), ("Connection", "close")]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        if body:
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
    finally:
        await stream.aclose()


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[tuple[str, Served]]:
    served = Served()
    listeners = await nursery.start(
        partial(trio.serve_tcp, lambda s: _handle(s, served), 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    yield f"http://127.0.0.1:{port}", served


def _lines(data: bytes) -> tuple[str, ...]:
    text = data.decode()
    if "bad" in text:
        raise ValueError("bad content")
    return tuple(text.split())


async def test_download_caches_and_swaps(server: tuple[str, Served], tmp_path: Path) -> None:
    url, served = server
    seen: list[tuple[str, ...]] = []
    spec = SourceSpec("http", url=f"{url}/list?token=secret", path=tmp_path / "c" / "list")
    src = ProviderSource("rule-provider t", spec, _lines, seen.append)
    assert await src.refresh() == "updated"
    assert src.value == ("one",) and seen == [("one",)]
    assert (tmp_path / "c" / "list").read_bytes() == b"one\n"
    assert served.requests[0]["host"] == url.removeprefix("http://")
    # Same bytes again: unchanged, no second swap.
    assert await src.refresh() == "unchanged"
    assert seen == [("one",)]


async def test_etag_and_last_modified_sent(server: tuple[str, Served], tmp_path: Path) -> None:
    url, served = server
    served.headers = [("ETag", '"v1"'), ("Last-Modified", "Fri, 04 Dec 2026 10:00:00 GMT")]
    src = ProviderSource("p", SourceSpec("http", url=url + "/x", path=tmp_path / "x"), _lines)
    assert await src.refresh() == "updated"
    assert await src.refresh() == "unchanged"
    second = served.requests[1]
    assert second["if-none-match"] == '"v1"'
    assert second["if-modified-since"] == "Fri, 04 Dec 2026 10:00:00 GMT"


async def test_failures_keep_last_good(server: tuple[str, Served], tmp_path: Path) -> None:
    url, served = server
    path = tmp_path / "keep"
    src = ProviderSource("p", SourceSpec("http", url=url + "/k", path=path), _lines)
    assert await src.refresh() == "updated"
    served.status, served.body = 500, b"oops"
    assert await src.refresh() == "failed"
    assert src.value == ("one",) and "HTTP 500" in (src.status.last_error or "")
    served.status, served.body = 200, b"bad content"
    assert await src.refresh() == "failed"
    assert src.value == ("one",) and path.read_bytes() == b"one\n"  # cache not replaced
    served.body = b"two three"
    assert await src.refresh() == "updated"
    assert src.value == ("two", "three") and src.status.last_error is None


async def test_size_limit_refuses(server: tuple[str, Served], tmp_path: Path) -> None:
    url, served = server
    served.body = b"x" * 5000
    spec = SourceSpec("http", url=url + "/big", path=tmp_path / "big", size_limit=1000)
    src = ProviderSource("p", spec, _lines)
    assert await src.refresh() == "failed"
    assert "size-limit" in (src.status.last_error or "")
    assert src.value is None and not (tmp_path / "big").exists()


async def test_redirect_followed(server: tuple[str, Served]) -> None:
    url, served = server
    served.redirect_from = "/old"
    resp = await http_get(url + "/old")
    assert resp.status == 200 and resp.body == b"one\n"
    assert served.paths == ["/old", "/moved"]


async def test_cached_boot_without_network(tmp_path: Path) -> None:
    """The server is gone: a fresh cache is used and nothing is fetched; a
    stale one is used too, and the failed refresh keeps it."""
    path = tmp_path / "cached"
    atomic_write(path, b"cached rules")
    spec = SourceSpec("http", url="http://127.0.0.1:9/gone", path=path, interval=3600,
                      timeout=2)
    src = ProviderSource("p", spec, _lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(src.serve)
        assert src.value == ("cached", "rules") and src.status.fetches == 0
        nursery.cancel_scope.cancel()
    old = path.stat().st_mtime - 7200
    os.utime(path, (old, old))
    src = ProviderSource("p", spec, _lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(src.serve)
        assert src.value == ("cached", "rules")
        assert src.status.fetches == 1 and src.status.last_error is not None
        nursery.cancel_scope.cancel()


async def test_interval_refresh(server: tuple[str, Served], tmp_path: Path) -> None:
    url, served = server
    got: list[tuple[str, ...]] = []
    updated = trio.Event()

    def on_update(value: tuple[str, ...]) -> None:
        got.append(value)
        if len(got) == 2:
            updated.set()

    spec = SourceSpec("http", url=url + "/i", path=tmp_path / "i", interval=0.2)
    src = ProviderSource("p", spec, _lines, on_update)
    async with trio.open_nursery() as nursery:
        await nursery.start(src.serve)
        assert got == [("one",)]
        served.body = b"later"
        with trio.fail_after(5):
            await updated.wait()
        nursery.cancel_scope.cancel()
    assert got[-1] == ("later",)


async def test_file_and_inline(tmp_path: Path) -> None:
    path = tmp_path / "local.txt"
    path.write_bytes(b"a b")
    src = ProviderSource("p", SourceSpec("file", path=path), _lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(src.serve)
    assert src.value == ("a", "b")
    path.write_bytes(b"c")
    assert await src.refresh() == "updated" and src.value == ("c",)
    inline = ProviderSource("p", SourceSpec("inline", payload=b"x y"), _lines)
    assert inline.load_cached() and inline.value == ("x", "y")
    missing = ProviderSource("p", SourceSpec("file", path=tmp_path / "none"), _lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(missing.serve)
    assert missing.value is None and "no such file" in (missing.status.last_error or "")


async def test_dial_hook_is_used(server: tuple[str, Served], tmp_path: Path) -> None:
    """A `proxy:` fetch: the owner's dial decides where the bytes go."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    dialled: list[tuple[str, int]] = []

    async def via_outbound(host: str, p: int) -> trio.abc.Stream:
        dialled.append((host, p))
        return await trio.open_tcp_stream("127.0.0.1", port)

    spec = SourceSpec("http", url="http://rules.example:8080/r", path=tmp_path / "r")
    src = ProviderSource("p", spec, _lines, dial=via_outbound)
    assert await src.refresh() == "updated"
    assert dialled == [("rules.example", 8080)]


def test_cache_path_and_safe_url(tmp_path: Path) -> None:
    # mihomo: <home>/rules/<md5(url)>
    assert cache_path(tmp_path, "rules", "https://x/y") == \
        tmp_path / "rules" / "82a2e708b2fc53792af9097bc4a00b8c"
    assert safe_url("https://u:p@h.example:8443/sub?token=t") == "https://h.example:8443/sub"
