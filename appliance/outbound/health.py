"""Delay probes, the delay history every proxy shares, and the health
checks of probed groups (url-test, fallback, load-balance).

A probe is what mihomo calls a URL test: an HTTP GET of the group's `url`
through one outbound, timed from the start of the connect to the first
byte of the response (mihomo's `delay`, in milliseconds), accepted when the
status is in `expected-status`. A failed probe is a delay of 0, as in
mihomo's `history`.

`DelayHistory` keeps the last `HISTORY_LEN` results of each proxy (by
name, so it outlives a reload that rebuilds the outbounds) and answers
"alive?" and "how fast?" for the groups; the control API serves it as the
Clash `history`. `HealthChecks` is the service: one task per probed group
in its own nursery, replaced as a whole when the groups are rebuilt.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import trio

from appliance.outbound.base import Outbound, OutboundError

if TYPE_CHECKING:
    from appliance.config.model import HealthCheckConfig

log = logging.getLogger(__name__)

# mihomo's defaultHistoriesNum: the API shows this many results per proxy.
HISTORY_LEN = 10
# What a group sorts a dead or never-measured proxy by (mihomo's 0xffff).
UNREACHABLE = 0xFFFF
# A probe reads at most this much looking for the status line.
_MAX_HEAD = 8192


@dataclass(frozen=True)
class DelaySample:
    """One probe result: `time` (Unix seconds), `delay` in ms (0: failed)
    and the `url` probed."""

    time: float
    delay: int
    url: str


class DelayHistory:
    """The last probe results of every proxy, by proxy name.

    `history(name)` is mihomo's `history` (oldest first, any URL); `last`,
    `alive` and `delay` answer for one test URL when given (a group that
    probes its own URL judges its members by it, as mihomo's
    AliveForTestUrl does) and fall back to the newest result of any URL.
    A proxy never probed is alive (mihomo starts every proxy alive), with
    delay `UNREACHABLE` for sorting. Owns only memory; no I/O.
    """

    def __init__(self, size: int = HISTORY_LEN) -> None:
        self.size = size
        self._history: dict[str, deque[DelaySample]] = {}
        self._by_url: dict[tuple[str, str], DelaySample] = {}

    def record(self, proxy: str, url: str, delay: int) -> None:
        sample = DelaySample(time.time(), max(0, delay), url)
        self._history.setdefault(proxy, deque(maxlen=self.size)).append(sample)
        self._by_url[(proxy, url)] = sample

    def history(self, proxy: str) -> list[DelaySample]:
        return list(self._history.get(proxy, ()))

    def last(self, proxy: str, url: str | None = None) -> DelaySample | None:
        if url is not None:
            sample = self._by_url.get((proxy, url))
            if sample is not None:
                return sample
        samples = self._history.get(proxy)
        return samples[-1] if samples else None

    def alive(self, proxy: str, url: str | None = None) -> bool:
        sample = self.last(proxy, url)
        return sample is None or sample.delay > 0

    def delay(self, proxy: str, url: str | None = None) -> int:
        """The last delay in ms; `UNREACHABLE` when dead or never probed."""
        sample = self.last(proxy, url)
        return sample.delay if sample is not None and sample.delay > 0 else UNREACHABLE


class ProbeError(Exception):
    """A probe failed: connect, TLS, no answer, bad status or timeout."""


def status_ok(status: int, expected: Sequence[tuple[int, int]]) -> bool:
    """`expected-status` as ranges; empty: any status (mihomo's `*`)."""
    return not expected or any(lo <= status <= hi for lo, hi in expected)


_ssl_context: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context


async def url_delay(outbound: Outbound, url: str, limit: float,
                    expected: Sequence[tuple[int, int]] = ()) -> int:
    """Milliseconds from the start of the connect through `outbound` to the
    first byte of the answer to `GET url` (http or https), at least 1.
    Raises ProbeError (never OutboundError or OSError)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProbeError(f"cannot probe {url!r}: not an http(s) URL")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    authority = host if ":" not in host else f"[{host}]"
    if parts.port:
        authority += f":{parts.port}"
    request = (f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: mirage\r\n"
               "Connection: close\r\n\r\n").encode()
    start = trio.current_time()
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(limit):
            stream = await outbound.connect_tcp(host, port)
            if parts.scheme == "https":
                stream = trio.SSLStream(stream, _tls_context(), server_hostname=host)
            await stream.send_all(request)
            head = bytes(await stream.receive_some(_MAX_HEAD))
            elapsed = trio.current_time() - start
            while b"\r\n" not in head and 0 < len(head) < _MAX_HEAD:
                more = await stream.receive_some(_MAX_HEAD - len(head))
                if not more:
                    break
                head += more
    except trio.TooSlowError:
        raise ProbeError(f"timed out after {limit:g}s") from None
    except OutboundError as e:
        raise ProbeError(e.reason) from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
        raise ProbeError(str(e) or type(e).__name__) from None
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or not line[0].startswith(b"HTTP/") or not line[1].isdigit():
        raise ProbeError("no HTTP answer")
    status = int(line[1])
    if not status_ok(status, expected):
        raise ProbeError(f"status {status} not expected")
    return max(1, round(elapsed * 1000))


async def measure(outbound: Outbound, history: DelayHistory, url: str, limit: float,
                  expected: Sequence[tuple[int, int]] = ()) -> int:
    """Probe `outbound` once and record the result under its name: the
    delay in ms, 0 when the probe failed (never raises ProbeError)."""
    try:
        delay = await url_delay(outbound, url, limit, expected)
    except ProbeError as e:
        log.debug("probe %s via %s: %s", url, outbound.name, e)
        delay = 0
    history.record(outbound.name, url, delay)
    return delay


class Probed(Protocol):
    """What `HealthChecks` needs of a group (appliance/outbound/groups.py)."""

    name: str
    health: HealthCheckConfig

    def touched_since(self, when: float) -> bool: ...

    async def check(self) -> dict[str, int]: ...

    async def wait_failed(self) -> None: ...


class HealthChecks:
    """The service that probes groups: one task per group whose health
    check is on (`interval` > 0), all in one nursery that `watch` replaces
    when the groups are rebuilt (start, reload, provider update).

    Each task probes every member at once, then every `interval` seconds;
    with `lazy` it skips a round when no flow used the group since the last
    one (mihomo's lazy); a group whose connects failed `max-failed-times`
    in a row wakes its task early. A probe's failure is a result (delay 0),
    never an error of the service. Owns its nursery."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._current: trio.CancelScope | None = None
        self._pending: list[Probed] | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._pending is not None:
                self.watch(self._pending)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def watch(self, groups: Iterable[Probed]) -> None:
        """Probe these groups from now on (and stop probing the others)."""
        probed = [g for g in groups if g.health.enable and g.health.interval > 0]
        if self._current is not None:
            self._current.cancel()
            self._current = None
        if self._nursery is None:
            self._pending = probed
            return
        scope = self._current = trio.CancelScope()
        self._nursery.start_soon(self._run, probed, scope)

    async def _run(self, groups: list[Probed], scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for group in groups:
                    nursery.start_soon(self._probe_loop, group)

    @staticmethod
    async def _probe_loop(group: Probed) -> None:
        last = -float("inf")
        while True:
            if not (group.health.lazy and last > -float("inf")
                    and not group.touched_since(last)):
                last = trio.current_time()
                delays = await group.check()
                alive = sum(1 for d in delays.values() if d > 0)
                log.debug("health check %s: %d/%d alive", group.name, alive, len(delays))
            with trio.move_on_after(group.health.interval):
                await group.wait_failed()
