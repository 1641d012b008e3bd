"""Log records for the API's `/logs` stream, fanned out to subscribers.

A `logging.Handler` on Mirage's loggers that hands each record's message to
every subscriber's bounded trio channel. A slow reader loses lines (a full
channel drops them, as mihomo's log subscriber does) and never slows the
logger. Records logged from another thread reach the subscribers through
the trio token. Owns the subscribers' send channels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import trio

# mihomo's level names, by Python level.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "silent": logging.CRITICAL + 1}
BUFFER = 1024


def level_name(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


class LogBus(logging.Handler):
    """Installed on the root logger while the API serves (`installed`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._subscribers: set[trio.MemorySendChannel[tuple[int, str]]] = set()
        self._token: trio.lowlevel.TrioToken | None = None

    @contextmanager
    def installed(self, logger: logging.Logger) -> Iterator[None]:
        self._token = trio.lowlevel.current_trio_token()
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[tuple[int, str]]]:
        send, receive = trio.open_memory_channel[tuple[int, str]](BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()

    def emit(self, record: logging.LogRecord) -> None:
        if not self._subscribers:
            return
        try:
            line = (record.levelno, f"[{record.name}] {record.getMessage()}")
        except Exception:  # a bad format string: logging's own rule is to not raise
            return
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # another thread: deliver on the trio thread
            if self._token is not None:
                try:
                    self._token.run_sync_soon(self._deliver, line)
                except trio.RunFinishedError:
                    pass
            return
        self._deliver(line)

    def _deliver(self, line: tuple[int, str]) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(line)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass
