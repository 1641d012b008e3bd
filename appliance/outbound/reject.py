"""REJECT: refuse the flow at once (ad blocking, policy)."""

from __future__ import annotations

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.outbound.base import OutboundEnv, OutboundError, UdpPeer


class RejectOutbound:
    """TCP: raises OutboundError("rejected") without touching the network;
    the gateway then resets the client's connection. UDP: no peer (None),
    so the gateway drops the flow's datagrams; that is REJECT's answer, so
    it counts as carrying UDP (routing does not look past it). Owns nothing."""

    type = "Reject"
    carries_udp = True

    def __init__(self, name: str = "REJECT") -> None:
        self.name = name

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> RejectOutbound:
        return cls(p.name)

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        raise OutboundError("rejected")

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        await trio.lowlevel.checkpoint()
        return None
