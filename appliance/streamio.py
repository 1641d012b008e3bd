"""Reads and writes on trio streams that skip trio's scheduler turn when a
plain socket can answer at once.

trio's `SocketStream.receive_some` / `send_all` yield to the scheduler
after every successful system call (`_try_sync`'s
`cancel_shielded_checkpoint`), so that a task never runs unchecked. Under
load each yield is a turn of every other runnable flow, and it costs its
Python whether or not anything else runs: a TLS handshake makes four to
six such calls, a short relayed flow another four (bench/protocols.py,
py-spy: trio's socket helpers were the largest own share in every TCP
row). On a `trio.SocketStream` these read and write the descriptor
directly and wait (readable / writable) only when the socket would block;
any other stream (TLS over a tunnel, a ws transport, a test's memory
stream) goes through its own methods.

What the caller gives up: the implicit yield. A loop that can keep finding
data (the splice's copy loop) must checkpoint every few rounds itself.
Cancellation is still checked on entry. Errors are what trio raises:
ClosedResourceError for a closed socket, BrokenResourceError (from the
OSError) for anything else the system call reports.
"""

from __future__ import annotations

import errno
import os

import trio

# What `receive_some(stream, None)` asks for (trio's own default).
DEFAULT_RECEIVE = 65536


def _translate(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The stream error trio's SocketStream would raise for `exc`."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def receive_some(stream: trio.abc.Stream,
                       max_bytes: int | None = None) -> bytes | bytearray:
    """`stream.receive_some(max_bytes)`; on a plain socket, one read(2) of
    its descriptor that waits only when nothing is there. b"" at EOF."""
    if type(stream) is not trio.SocketStream:
        return await stream.receive_some(max_bytes)
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = stream.socket
    while True:
        try:
            return os.read(sock.fileno(), max_bytes or DEFAULT_RECEIVE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except OSError as exc:
            raise _translate(exc) from exc


async def send_all(stream: trio.abc.Stream, data: bytes | bytearray | memoryview) -> None:
    """`stream.send_all(data)`; on a plain socket, write(2)s of its
    descriptor that wait only while the socket is full."""
    if type(stream) is not trio.SocketStream:
        await stream.send_all(data)
        return
    await trio.lowlevel.checkpoint_if_cancelled()
    sock = stream.socket
    if sock.did_shutdown_SHUT_WR:
        raise trio.ClosedResourceError("can't send data after sending EOF")
    fd = sock.fileno()
    sent = 0
    total = len(data)
    view: memoryview | None = None
    while sent < total:
        try:
            if sent:
                if view is None:
                    view = memoryview(data)
                sent += os.write(fd, view[sent:])
            else:
                sent += os.write(fd, data)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        except OSError as exc:
            raise _translate(exc) from exc
