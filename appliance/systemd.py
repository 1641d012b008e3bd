"""systemd's notify protocol: READY once the LAN is served, a watchdog that
pings only while the DNS service answers.

What this is for: the unit runs `mirage run` as `Type=notify` with
`WatchdogSec=`. systemd considers the service started only when Mirage
says READY=1, which `mirage run` sends once every listener is bound *and*
the capture is in place (so `After=mirage.service` means "LAN DNS is
served"). While running, `serve_watchdog` sends WATCHDOG=1 every half of
the interval systemd asked for, but only when a probe of the DNS service
got an answer in time: a process that is alive but no longer answers the
LAN (a hung event loop, SIGSTOP, a wedged socket) stops pinging, systemd
kills it (SIGABRT) and restarts it, and the unit's `ExecStopPost=mirage
cleanup` removes its capture in between, so LAN DNS falls back to the
resolvers the clients asked (docs/operations.md).

The probe is a DNS message with opcode STATUS (RFC 1035 section 4.1.1,
opcode 2), which the handler answers NOTIMP without touching the fake-IP
pool, the cache or any upstream: it proves the socket is read and answered,
and costs nothing.

Protocol (sd_notify(3)): one datagram per state to the AF_UNIX socket named
by $NOTIFY_SOCKET (a leading '@' is the abstract namespace); without that
variable nothing is sent. $WATCHDOG_USEC (and $WATCHDOG_PID, when set,
naming this process) give the interval. Owns one datagram socket per send.
How it fails: a send error is logged once and otherwise ignored; systemd,
not Mirage, decides what a missing message means.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

from appliance.config.model import Listen

log = logging.getLogger("mirage.systemd")

# How long the DNS probe may take before this round's ping is skipped.
PROBE_TIMEOUT = 1.0


def notify(state: str) -> bool:
    """Send `state` ("READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=...")
    to systemd; False when not running under a notify-aware manager."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("sd_notify %s to %s: %s", state.split("=", 1)[0], path, err)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings systemd expects (half its WatchdogSec), or None
    when no watchdog is asked of this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds / 2 if seconds > 0 else None


def status_probe(qid: int) -> bytes:
    """A header-only DNS message with opcode STATUS and id `qid`."""
    return struct.pack("!HHHHHH", qid, 2 << 11, 0, 0, 0, 0)


def probe_target(listen: Listen) -> tuple[str, int]:
    """Where to send the probe: the DNS listen address, or loopback of its
    family when it listens on every address."""
    host = listen.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, listen.port


async def dns_answers(listen: Listen, wait: float = PROBE_TIMEOUT) -> bool:
    """Did the DNS service answer a STATUS probe within `wait` seconds?"""
    host, port = probe_target(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    qid = random.getrandbits(16)
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock, trio.move_on_after(wait):
        await sock.connect((host, port))
        await sock.send(status_probe(qid))
        while True:
            reply = await sock.recv(512)
            if len(reply) >= 2 and struct.unpack("!H", reply[:2])[0] == qid:
                return True
    return False


async def serve_watchdog(alive: Callable[[], Awaitable[bool]], interval: float, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ping systemd every `interval` seconds while `alive()` says so; a
    failed check skips the ping (and is logged), so systemd's timeout runs."""
    task_status.started()
    failing = False
    while True:
        if await alive():
            notify("WATCHDOG=1")
            if failing:
                log.warning("watchdog: the DNS service answers again")
            failing = False
        elif not failing:
            log.error("watchdog: the DNS service did not answer a probe in %.1f s; "
                      "not pinging systemd", PROBE_TIMEOUT)
            failing = True
        await trio.sleep(interval)
