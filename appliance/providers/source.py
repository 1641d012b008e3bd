"""Where a provider's bytes come from: `http`, `file` or `inline`, with a
cache file, background refresh and the last good copy kept (mihomo's
`component/resource`: fetcher + vehicle).

One `ProviderSource` per provider (rule-provider, proxy-provider, geodata
file). It knows nothing of what the bytes mean: the owner hands in `parse`
(bytes -> a value, raising ValueError on content it cannot use) and
`on_update` (called with each new parsed value, in the caller's task: the
owner swaps its compiled set in one assignment). What it owns:

- the cache file (`path`): written atomically (temporary file in the same
  directory, fsync, rename) and only after `parse` accepted the bytes, so a
  broken download never replaces a good copy on disk either;
- the value last parsed (`value`), kept when a refresh fails (network down,
  HTTP error, over `size-limit`, content `parse` refuses): the error goes to
  the log and to `last_error`, the provider goes on with what it had;
- its refresh task (`serve`): every `interval` seconds; at start, a cache
  file younger than `interval` is used as it is and the first download waits
  for the rest of the interval, an older one is used at once and refreshed
  at once (mihomo's `Fetcher.Initial`). A boot with the network down thus
  runs on the cached file.

HTTP: a small HTTP/1.1 client on h11 (the sans-I/O core the control API
already uses) over any stream a `Dial` opens: the default dials straight
out; `dial` can be an outbound's `connect_tcp` (the provider's `proxy:`).
TLS with the system's trust store, redirects (at most 5), conditional
requests (If-None-Match with the last ETag, If-Modified-Since with the last
Last-Modified or the cache file's time: a 304 costs no parse), a whole-fetch
deadline (`timeout`) and `size-limit` (a larger body is refused, not cut:
a cut rule list would silently lose rules).

How it fails: `fetch_http` raises SourceError (one message, never a
credential: a URL's user info and query are left out of messages, they
often hold subscription tokens). `ProviderSource` methods never raise for a
failed fetch; `refresh` reports it in its result.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar
from urllib.parse import urljoin, urlsplit

import h11
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

# (host, port) -> a connected stream: how a fetch reaches the server.
Dial = Callable[[str, int], Awaitable[trio.abc.Stream]]

DEFAULT_TIMEOUT = 20.0  # seconds for one whole fetch (mihomo's DefaultHttpTimeout)
MAX_REDIRECTS = 5
USER_AGENT = "clash.meta/mirage"  # subscriptions serve Clash YAML to clash* agents


class SourceError(Exception):
    """A fetch failed: the message says why, without credentials."""


@dataclass(frozen=True)
class SourceSpec:
    """Where one provider's content lives, as the loader parsed it.

    `kind`: `http` (download `url`, cache at `path`), `file` (read `path`)
    or `inline` (`payload`, no file). `interval`: seconds between refreshes
    (0: never after the first). `size_limit`: bytes a download may have (0:
    no limit). `proxy`: the outbound name the download goes through (None:
    straight out); the owner turns it into a `Dial`. `headers`: extra
    request headers (`header:` in mihomo, one value each)."""

    kind: Literal["http", "file", "inline"]
    url: str | None = None
    path: Path | None = None
    interval: float = 0.0
    size_limit: int = 0
    proxy: str | None = None
    payload: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT


def cache_path(home: Path, prefix: str, url: str) -> Path:
    """mihomo's default path for an http provider without `path:`:
    `<home>/<prefix>/<md5 of the url>` (`C.Path.GetPathByHash`); prefix is
    `rules` for rule-providers and `proxies` for proxy-providers."""
    return home / prefix / hashlib.md5(url.encode()).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old
    file or the new one, never a part. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def safe_url(url: str) -> str:
    """`url` fit for a log line: scheme, host, port and path only (user
    info and query often hold tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


async def direct_dial(host: str, port: int) -> trio.abc.Stream:
    """Connect straight to host:port (the system resolver for a name)."""
    return await trio.open_tcp_stream(host, port)


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names, last value wins
    body: bytes


async def http_get(
    url: str,
    *,
    dial: Dial = direct_dial,
    headers: tuple[tuple[str, str], ...] = (),
    size_limit: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """One GET of `url`, following redirects. No deadline of its own: the
    caller's cancel scope bounds it. Raises SourceError."""
    for _ in range(MAX_REDIRECTS + 1):
        resp = await _get_once(url, dial, headers, size_limit, ssl_context)
        location = resp.headers.get("location")
        if resp.status in (301, 302, 303, 307, 308) and location:
            url = urljoin(url, location)
            continue
        return resp
    raise SourceError(f"{safe_url(url)}: more than {MAX_REDIRECTS} redirects")


async def _get_once(
    url: str,
    dial: Dial,
    headers: tuple[tuple[str, str], ...],
    size_limit: int,
    ssl_context: ssl.SSLContext | None,
) -> HttpResponse:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceError(f"{safe_url(url)}: not an http(s) URL")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if ":" not in host else f"[{host}]"
    if parts.port:
        host_header += f":{parts.port}"
    request_headers = [("Host", host_header), ("User-Agent", USER_AGENT),
                       ("Accept-Encoding", "identity"), ("Connection", "close")]
    request_headers += list(headers)
    try:
        stream = await dial(host, port)
    except (OSError, trio.BrokenResourceError) as err:
        raise SourceError(f"{safe_url(url)}: connect: {err}") from None
    except Exception as err:  # an outbound's own error type
        raise SourceError(f"{safe_url(url)}: connect: {err}") from None
    try:
        if parts.scheme == "https":
            ctx = ssl_context or ssl.create_default_context()
            tls = trio.SSLStream(stream, ctx, server_hostname=host)
            stream = tls
        return await _exchange(stream, target, request_headers, size_limit, url)
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as err:
        raise SourceError(f"{safe_url(url)}: {err or type(err).__name__}") from None
    except h11.ProtocolError as err:
        raise SourceError(f"{safe_url(url)}: bad HTTP response ({err})") from None
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


async def _exchange(
    stream: trio.abc.Stream,
    target: str,
    headers: list[tuple[str, str]],
    size_limit: int,
    url: str,
) -> HttpResponse:
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=headers)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    status = 0
    got: dict[str, str] = {}
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(bytes(data))  # b"" is the peer's EOF
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            got = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            length = got.get("content-length")
            if size_limit and status == 200 and length and length.isdigit() \
                    and int(length) > size_limit:
                raise SourceError(f"{safe_url(url)}: {length} bytes is over size-limit "
                                  f"{size_limit}")
        elif isinstance(event, h11.Data):
            body += event.data
            if size_limit and len(body) > size_limit:
                raise SourceError(f"{safe_url(url)}: more than size-limit {size_limit} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status, got, bytes(body))
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            raise SourceError(f"{safe_url(url)}: connection closed before the response ended")


Outcome = Literal["updated", "unchanged", "failed"]


@dataclass
class SourceStatus:
    """What a provider's last refresh did (for logs and the control API)."""

    updated_at: float | None = None  # wall-clock time of the content in use
    last_error: str | None = None
    last_attempt: float | None = None
    fetches: int = 0
    failures: int = 0
    digest: str | None = None  # sha256 of the content in use


@dataclass
class _Validators:
    etag: str | None = None
    last_modified: str | None = None


@dataclass
class ProviderSource(Generic[T]):
    """One provider's content: load, refresh, keep the last good one.

    `name` names it in logs ("rule-provider foo"). `dial` reaches the
    server (the `proxy:` outbound's connect, or straight out); it may be
    replaced at any time (reload). `clock` gives wall-clock seconds (tests).
    """

    name: str
    spec: SourceSpec
    parse: Callable[[bytes], T]
    on_update: Callable[[T], None] = lambda value: None
    dial: Dial = direct_dial
    clock: Callable[[], float] = time.time
    value: T | None = None
    status: SourceStatus = field(default_factory=SourceStatus)
    _validators: _Validators = field(default_factory=_Validators)

    # --- loading ------------------------------------------------------------

    def load_cached(self) -> bool:
        """Take the content from the inline payload or the file at `path`
        without any network. True when a value was loaded; a missing or
        unparsable file is logged and leaves `value` as it was."""
        spec = self.spec
        if spec.kind == "inline":
            return self._accept(spec.payload or b"", write=False, when=self.clock())
        if spec.path is None:
            return False
        try:
            data = spec.path.read_bytes()
            mtime = spec.path.stat().st_mtime
        except FileNotFoundError:
            if spec.kind == "file":
                self._fail(f"{spec.path}: no such file")
            return False
        except OSError as err:
            self._fail(f"{spec.path}: {err.strerror or err}")
            return False
        ok = self._accept(data, write=False, when=mtime)
        if ok and spec.kind == "http":
            self._validators.last_modified = email.utils.formatdate(mtime, usegmt=True)
        return ok

    def stale(self) -> bool:
        """Whether the content in use is older than `interval` (or there is
        none): what makes the first refresh run at once."""
        if self.value is None or self.status.updated_at is None:
            return True
        interval = self.spec.interval
        return bool(interval) and self.clock() - self.status.updated_at >= interval

    async def refresh(self) -> Outcome:
        """Fetch once (http: download; file: read again; inline: nothing new)
        and, if the content changed and parses, swap it in (`on_update`) and
        write the cache. Never raises for a failed fetch: the last good
        value stays, the error is logged and kept in `status`."""
        spec = self.spec
        self.status.last_attempt = self.clock()
        self.status.fetches += 1
        if spec.kind == "inline":
            return "unchanged" if self.value is not None else \
                ("updated" if self.load_cached() else "failed")
        if spec.kind == "file":
            assert spec.path is not None
            try:
                data = await trio.to_thread.run_sync(spec.path.read_bytes)
            except OSError as err:
                self._fail(f"{spec.path}: {err.strerror or err}")
                return "failed"
            return self._changed(data, write=False)
        assert spec.url is not None
        headers = list(spec.headers)
        if self.value is not None:
            if self._validators.etag:
                headers.append(("If-None-Match", self._validators.etag))
            if self._validators.last_modified:
                headers.append(("If-Modified-Since", self._validators.last_modified))
        try:
            with trio.fail_after(spec.timeout):
                resp = await http_get(spec.url, dial=self.dial, headers=tuple(headers),
                                      size_limit=spec.size_limit)
        except trio.TooSlowError:
            self._fail(f"{safe_url(spec.url)}: no complete answer in {spec.timeout:g} s")
            return "failed"
        except SourceError as err:
            self._fail(str(err))
            return "failed"
        if resp.status == 304 and self.value is not None:
            self._touch()
            log.debug("%s: not modified", self.name)
            return "unchanged"
        if not 200 <= resp.status <= 299:
            self._fail(f"{safe_url(spec.url)}: HTTP {resp.status}")
            return "failed"
        outcome = self._changed(resp.body, write=True)
        if outcome != "failed":
            self._validators.etag = resp.headers.get("etag")
            self._validators.last_modified = resp.headers.get("last-modified") \
                or email.utils.formatdate(self.clock(), usegmt=True)
        return outcome

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Load (cache first, then the network when there is no usable
        cache or it is stale), report started, then refresh every
        `interval` seconds until cancelled. `started` comes after the first
        load, successful or not: a provider that cannot load is empty."""
        self.load_cached()
        if self.spec.kind == "http" and self.stale():
            await self.refresh()
        task_status.started()
        interval = self.spec.interval
        if not interval or self.spec.kind == "inline":
            return
        # The rest of the interval since the content in use was fetched, or
        # since the attempt just made (a failed one is not retried at once).
        first = interval
        last = max(self.status.updated_at or 0.0, self.status.last_attempt or 0.0)
        if last:
            first = min(interval, max(0.0, interval - (self.clock() - last)))
        await trio.sleep(first)
        while True:
            await self.refresh()
            await trio.sleep(interval)

    # --- internals ------------------------------------------------------------

    def _changed(self, data: bytes, *, write: bool) -> Outcome:
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.status.digest and self.value is not None:
            self._touch()
            log.debug("%s: content unchanged", self.name)
            return "unchanged"
        return "updated" if self._accept(data, write=write, when=self.clock()) else "failed"

    def _accept(self, data: bytes, *, write: bool, when: float) -> bool:
        try:
            value = self.parse(data)
        except ValueError as err:
            self._fail(f"content refused: {err}")
            return False
        if write and self.spec.path is not None:
            try:
                atomic_write(self.spec.path, data)
            except OSError as err:
                # The new content is good: use it; only the cache is stale.
                log.warning("%s: cannot write cache %s: %s", self.name, self.spec.path,
                            err.strerror or err)
        self.value = value
        self.status.digest = hashlib.sha256(data).hexdigest()
        self.status.updated_at = when
        self.status.last_error = None
        self.on_update(value)
        log.info("%s: loaded (%d bytes)", self.name, len(data))
        return True

    def _touch(self) -> None:
        now = self.clock()
        self.status.updated_at = now
        self.status.last_error = None
        if self.spec.kind == "http" and self.spec.path is not None:
            try:
                os.utime(self.spec.path, (now, now))
            except OSError:
                pass  # only the cache's age: the next boot refreshes sooner

    def _fail(self, why: str) -> None:
        self.status.failures += 1
        self.status.last_error = why
        kept = "keeping the last good copy" if self.value is not None else "empty"
        log.error("%s: %s (%s)", self.name, why, kept)
