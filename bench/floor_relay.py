#!/usr/bin/env python3
"""The least a trio relay does per connection: bench/gateway.py's floor row.

Accepts connections REDIRECTed to `port` (nft, like redsocks), asks the
SOCKS5 server for `name` (ATYP 3, greeting and request in one segment, as
Mirage does), reads the 10-byte IPv4 reply, then copies both ways on the
sockets' fds with half-close. Nothing else: no fake IPs, rules, outbounds,
accounting, timeouts or logs. What it costs per connection is what any
trio gateway pays on this machine before doing any of Mirage's work, so
the floor row places Mirage's SOCKS5 row between it and redsocks (C).

Not a proxy to use: any error ends that one connection silently.

Usage: floor_relay.py SOCKS_IP SOCKS_PORT PORT NAME
"""

from __future__ import annotations

import os
import socket
import sys

import trio

REPLY_IPV4 = 10  # VER REP RSV ATYP=1 addr(4) port(2)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where REDIRECT'd connections were going


async def pump(src: trio.socket.SocketType, dst: trio.socket.SocketType) -> None:
    sfd, dfd = src.fileno(), dst.fileno()
    while True:
        try:
            data = os.read(sfd, 65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            continue
        if not data:
            dst.shutdown(socket.SHUT_WR)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(dfd, view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst)


async def relay(conn: trio.socket.SocketType, socks: tuple[str, int], head: bytes) -> None:
    """`head`: greeting + request up to the port, which is the connection's
    original one (iperf3 and HTTP share the redirect)."""
    with conn, trio.socket.socket() as up:
        original = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        await up.connect(socks)
        os.write(up.fileno(), head + original[2:4])
        reply = b""
        while len(reply) < 2 + REPLY_IPV4:  # method selection + reply
            try:
                got = os.read(up.fileno(), 2 + REPLY_IPV4 - len(reply))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(up)
                continue
            if not got:
                return
            reply += got
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, up, conn)
            await pump(conn, up)


async def handle(conn: trio.socket.SocketType, socks: tuple[str, int], head: bytes) -> None:
    try:
        await relay(conn, socks, head)
    except (OSError, BaseExceptionGroup):
        pass


async def main(socks: tuple[str, int], port: int, name: str) -> None:
    head = b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode()
    listener = trio.socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await listener.bind(("0.0.0.0", port))
    listener.listen(1024)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(handle, conn, socks, head)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.rsplit("Usage: ", 1)[1])
    trio.run(main, (sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), sys.argv[4])
