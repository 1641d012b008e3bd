"""REJECT: refuse the flow at once (ad blocking, policy)."""

from __future__ import annotations

import trio

from appliance.config.model import IPAddress
from appliance.outbound.base import OutboundError


class RejectOutbound:
    """Raises OutboundError("rejected") without touching the network; the
    gateway then resets the client's connection. Owns nothing."""

    type = "Reject"

    def __init__(self, name: str = "REJECT") -> None:
        self.name = name

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        raise OutboundError("rejected")
