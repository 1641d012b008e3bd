"""accept_loop on loopback: bursts of connections, and running out of file
descriptors (EMFILE) pauses accepting instead of failing, then resumes.

The EMFILE case runs in a child process: it exhausts that process's own
descriptors, which the test runner must never do to itself.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest
import trio

from appliance.gateway.tcp import accept_loop, open_transparent_listeners
from appliance.sockopt import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL

EXHAUST = r"""
import logging, os, socket, sys, trio
from appliance.gateway.tcp import accept_loop
logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(message)s")

async def main():
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    served = []

    async def handler(stream, peer):
        served.append(1)
        await stream.send_all(b"hi")
        stream.socket.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, listener, handler, nursery, "exhaust")
        await trio.sleep(0.05)
        client = socket.create_connection(("127.0.0.1", port))
        hog = []
        try:
            while True:  # every descriptor this process may still open
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        await trio.sleep(0.35)  # accept fails (EMFILE) and retries every 0.1 s
        print("served while exhausted", len(served), flush=True)
        for fd in hog:
            os.close(fd)
        with trio.fail_after(5):
            while not served:
                await trio.sleep(0.02)
        client.settimeout(5)
        print("client got", client.recv(2).decode(), flush=True)
        nursery.cancel_scope.cancel()

trio.run(main)
"""


def test_running_out_of_descriptors_pauses_then_resumes() -> None:
    r = subprocess.run([sys.executable, "-c", EXHAUST], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "exhaust: accept failed: Too many open files; retrying in 0.1s" in r.stdout
    assert "served while exhausted 0" in r.stdout
    assert "client got hi" in r.stdout


async def test_a_burst_of_connections_is_served() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    served: list[int] = []

    async def handler(stream: trio.SocketStream, peer: Any) -> None:
        assert peer == stream.socket.getpeername()
        served.append(1)
        await stream.send_all(b"ok")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, listener, handler, nursery, "burst")
        # More than ACCEPT_BURST waiting at once: all accepted, none lost.
        clients = [trio.socket.socket() for _ in range(50)]
        with trio.fail_after(10):
            for c in clients:
                await c.connect(("127.0.0.1", port))
            replies = []
            for c in clients:
                replies.append(await c.recv(2))
                c.close()
        assert replies == [b"ok"] * 50 and len(served) == 50
        nursery.cancel_scope.cancel()


async def test_accepted_connections_have_the_listeners_keepalive() -> None:
    # The splice leaves the client's socket alone: keepalive comes from the
    # transparent listener (Linux copies it to each accepted socket).
    try:
        listener = (await open_transparent_listeners(0, ipv6=False))[0]
    except PermissionError:
        pytest.skip("IP_TRANSPARENT needs CAP_NET_ADMIN")
    port = listener.socket.getsockname()[1]
    async with listener:
        client = trio.socket.socket()
        with trio.fail_after(5):
            await client.connect(("127.0.0.1", port))
            accepted = await listener.accept()
        sock = accepted.socket
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == (
                    KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        await accepted.aclose()
        client.close()
