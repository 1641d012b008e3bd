"""HTTP/3 (QUIC, RFC 9114) server and client for the UDP gateway test, on aioquic.

Run as a script inside a lab namespace:

  h3_lab.py server ADDR PORT CERT KEY MARKER [--max-seconds N]
      answers every request with "<MARKER> authority=<:authority>"; prints
      "ready" once bound; exits after --max-seconds (default 300).
  h3_lab.py get IP PORT NAME CAFILE
      one GET https://NAME/ sent to IP (SNI and certificate check use NAME);
      prints JSON {"status", "body", "peer"} (peer: the address the
      connection's replies came from, as the client's socket saw it).

Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent


class Server(QuicConnectionProtocol):
    marker = "H3"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3: H3Connection | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic)
        if self.h3 is None:
            return
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                headers = dict(ev.headers)
                authority = headers.get(b":authority", b"").decode()
                body = f"{self.marker} authority={authority}\n".encode()
                self.h3.send_headers(ev.stream_id, [
                    (b":status", b"200"), (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode())])
                self.h3.send_data(ev.stream_id, body, end_stream=True)
                self.transmit()


class Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.status = ""
        self.body = b""
        self.peer: Any = None
        self.done = asyncio.Event()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.peer = addr
        super().datagram_received(data, addr)

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            self.h3_event(ev)

    def h3_event(self, ev: H3Event) -> None:
        if isinstance(ev, HeadersReceived):
            self.status = dict(ev.headers).get(b":status", b"").decode()
        elif isinstance(ev, DataReceived):
            self.body += ev.data
        if isinstance(ev, HeadersReceived | DataReceived) and ev.stream_ended:
            self.done.set()


async def run_server(addr: str, port: int, cert: str, key: str, marker: str,
                     seconds: float) -> None:
    cfg = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    cfg.load_cert_chain(cert, key)
    Server.marker = marker
    server = await serve(addr, port, configuration=cfg, create_protocol=Server)
    print("ready", flush=True)
    try:
        await asyncio.sleep(seconds)
    finally:
        server.close()


async def get(ip: str, port: int, name: str, cafile: str) -> dict[str, Any]:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=name)
    cfg.load_verify_locations(cafile)
    async with connect(ip, port, configuration=cfg, create_protocol=Client,
                       wait_connected=True) as client:
        assert isinstance(client, Client)
        stream = client._quic.get_next_available_stream_id()
        client.h3.send_headers(stream, [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", name.encode()),
            (b":path", b"/")], end_stream=True)
        client.transmit()
        await asyncio.wait_for(client.done.wait(), 5)
        peer = list(client.peer[:2]) if client.peer else None
        return {"status": client.status, "body": client.body.decode(), "peer": peer}


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    for a in ("addr", "port", "cert", "key", "marker"):
        s.add_argument(a)
    s.add_argument("--max-seconds", type=float, default=300.0)
    g = sub.add_parser("get")
    for a in ("ip", "port", "name", "cafile"):
        g.add_argument(a)
    args = ap.parse_args()
    if args.mode == "server":
        asyncio.run(run_server(args.addr, int(args.port), args.cert, args.key, args.marker,
                               args.max_seconds))
    else:
        out = asyncio.run(asyncio.wait_for(get(args.ip, int(args.port), args.name, args.cafile),
                                           10))
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
