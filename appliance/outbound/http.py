"""HTTP outbound: a CONNECT tunnel through an HTTP(S) proxy, by name.

`CONNECT host:port` carries the name unresolved, like SOCKS5 ATYP=3.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.outbound.base import (
    OutboundEnv,
    OutboundError,
    ProxyOutbound,
    ReplayStream,
    as_ip,
    handshake_send,
)
from appliance.proto.http_connect import DEFAULT_MAX_HEAD, HttpConnectClient, HttpConnectError

_MAX_READS = 1000  # with a 16 KiB head bound, a trickling proxy ends sooner


def make_ssl_context(skip_cert_verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if skip_cert_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class HttpOutbound(ProxyOutbound):
    """CONNECT through an HTTP proxy at `server:port`, optionally with Basic
    auth and optionally over TLS to the proxy (`tls`; `sni` overrides the
    name sent and verified; `skip_cert_verify` disables verification).

    Plain proxies return a `trio.SocketStream` positioned right after the
    response head: the head is read with MSG_PEEK so no tunnel byte is
    consumed and the stream stays spliceable. Over TLS the result is a
    `trio.SSLStream`, or a `ReplayStream` around it if the proxy's answer
    came with tunnel bytes.

    Raises OutboundError on connect or TLS failure, a non-2xx answer (the
    text has the status; 407 = credentials missing or refused), or after
    `connect_timeout` seconds for the whole exchange. Carries no UDP (HTTP
    CONNECT is a TCP tunnel).
    """

    type = "Http"

    def __init__(
        self,
        name: str,
        server: str,
        port: int,
        *,
        tls: bool = False,
        skip_cert_verify: bool = False,
        sni: str | None = None,
        ca_file: str | None = None,
        **common: Any,
    ) -> None:
        if tls and common.get("preconnect"):
            raise ValueError(f"{name}: preconnect is for plain (non-TLS) proxies")
        super().__init__(name, server, port, **common)
        self.tls = tls
        self.sni = sni
        self.ssl_context = make_ssl_context(skip_cert_verify, ca_file) if tls else None

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> HttpOutbound:
        return cls(p.name, p.server, p.port, tls=p.tls, skip_cert_verify=p.skip_cert_verify,
                   sni=p.sni, username=p.username, password=p.password,
                   routing_mark=env.routing_mark, connect_timeout=env.connect_timeout,
                   resolve=env.resolve, ipv6=env.ipv6, ip_version=env.ip_version,
                   preconnect=p.preconnect,
                   server_dial=env.via.connect_tcp if env.via is not None else None)

    async def _connect(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        def new_client() -> HttpConnectClient:
            return HttpConnectClient(host, port, username=self.username, password=self.password)

        try:
            client = new_client()  # a bad target fails before any connection
        except HttpConnectError as e:
            raise OutboundError(f"{self.name}: {e}") from None
        return await self._open_tunnel(client, new_client, self._handshake)

    async def _handshake(self, sock_stream: trio.abc.Stream,
                         client: HttpConnectClient) -> trio.abc.Stream:
        """TLS (if configured), CONNECT, the response head; closes the
        stream on any failure."""
        stream: trio.abc.Stream = sock_stream
        try:
            if self.ssl_context is not None:
                server_hostname = self.sni or (None if as_ip(self.server) else self.server)
                if server_hostname is None and self.ssl_context.check_hostname:
                    # An IP literal server: verify the certificate's IP SAN.
                    server_hostname = self.server.strip("[]")
                ssl_stream = trio.SSLStream(
                    sock_stream, self.ssl_context, server_hostname=server_hostname
                )
                await ssl_stream.do_handshake()
                stream = ssl_stream
            await handshake_send(stream, client.request_bytes())
            self.request_sent()
            if isinstance(stream, trio.SocketStream):
                await self._read_head_exactly(stream, client)
            else:
                for _ in range(_MAX_READS):
                    if client.receive_data(await stream.receive_some()) is not None:
                        break
                else:
                    raise OutboundError(f"{self.name}: no answer to CONNECT")
        except HttpConnectError as e:
            await trio.aclose_forcefully(stream)
            raise OutboundError(f"{self.name}: {e}") from None
        except (ssl.SSLError, trio.BrokenResourceError) as e:
            await trio.aclose_forcefully(stream)
            raise OutboundError(f"{self.name}: TLS to proxy failed: {e}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if client.trailing_data:
            return ReplayStream(stream, client.trailing_data)
        return stream

    async def _read_head_exactly(
        self, stream: trio.SocketStream, client: HttpConnectClient
    ) -> None:
        """Read the response head and not one byte more: peek, find where
        the head ends (possibly in bytes already read), read up to there."""
        seen = bytearray()
        for _ in range(_MAX_READS):
            peeked = await stream.socket.recv(DEFAULT_MAX_HEAD, socket.MSG_PEEK)
            if not peeked:
                client.receive_data(b"")  # EOF: raises
            # Bytes without the head's end are all head: take them all.
            # Otherwise take exactly up to the end of the head.
            end = client.head_length(seen + peeked)
            take = len(peeked) if end is None else end - len(seen)
            data = await stream.socket.recv(take)
            seen += data
            if client.receive_data(data) is not None:
                return
        raise OutboundError(f"{self.name}: no answer to CONNECT")
