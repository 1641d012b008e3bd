"""DIRECT: connect to the destination ourselves, resolving names over DoH.

For the fake-IP filter's names and for rules that send traffic out
unproxied. Owns only the sticky-address cache of its `Dialer`.
"""

from __future__ import annotations

import trio

from appliance.config.model import IPAddress
from appliance.outbound.base import Dialer, Resolve, outbound_deadline


class DirectOutbound:
    """Resolves through `resolve` (the upstream resolver's `resolve_ips`,
    never the system resolver), keeps the address that worked for a name
    while its TTL lasts, tries the addresses happy-eyeballs style, and marks
    the socket with `routing_mark`. Returns a plain `trio.SocketStream`.
    Raises OutboundError on resolve failure, refusal, or after
    `connect_timeout` seconds."""

    type = "Direct"

    def __init__(
        self,
        resolve: Resolve | None,
        routing_mark: int | None,
        connect_timeout: float,
        *,
        name: str = "DIRECT",
        ipv6: bool = False,
    ) -> None:
        self.name = name
        self.connect_timeout = connect_timeout
        self.dialer = Dialer(resolve, routing_mark, ipv6=ipv6)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.SocketStream:
        with outbound_deadline(self.connect_timeout, f"{self.name} {host}:{port}"):
            return await self.dialer.dial(host, port)
