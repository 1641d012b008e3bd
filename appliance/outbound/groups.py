"""Proxy groups: `select` (the chosen member, first by default) and
`fallback` (the first member that connects).

Both delegate TCP and UDP to their members: a select group carries UDP when
its selected member does; a fallback group when any member does, and it
tries only those members for a UDP flow."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from appliance.config.model import IPAddress
from appliance.outbound.base import Outbound, OutboundError, UdpPeer


class SelectGroup:
    """Sends every flow through the selected member: the first one until
    `select(name)` (the Clash API's PUT /proxies/{group}) picks another.
    Errors are the member's. Owns nothing."""

    type = "Selector"

    def __init__(self, name: str, members: Sequence[Outbound]) -> None:
        if not members:
            raise ValueError(f"group {name!r} has no members")
        self.name = name
        self.members = tuple(members)
        self.selected: Outbound = self.members[0]

    def select(self, member: str) -> None:
        """Raises KeyError if `member` is not in the group."""
        for m in self.members:
            if m.name == member:
                self.selected = m
                return
        raise KeyError(member)

    @property
    def carries_udp(self) -> bool:
        return self.selected.carries_udp

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        return await self.selected.connect_tcp(host, port)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        return await self.selected.open_udp(host, port)


class FallbackGroup:
    """Tries members in order and returns the first stream that opens.

    A member that failed is remembered as down for `retry_after` seconds and
    tried only after the members not known to be down (still tried: a flow
    should not fail just because every member failed once). There is no
    background health check; the next real connection is the probe.
    Worst case, one connect costs the sum of the members' timeouts.
    Raises OutboundError naming every member's failure. Owns only the
    failure memory (trio clock times).
    """

    type = "Fallback"

    def __init__(self, name: str, members: Sequence[Outbound], retry_after: float = 30.0) -> None:
        if not members:
            raise ValueError(f"group {name!r} has no members")
        self.name = name
        self.members = tuple(members)
        self.retry_after = retry_after
        self._down_until: dict[str, float] = {}

    def ordered(self) -> list[Outbound]:
        """Members not known to be down first (config order), then the rest."""
        now = trio.current_time()
        up = [m for m in self.members if self._down_until.get(m.name, 0.0) <= now]
        return up + [m for m in self.members if m not in up]

    @property
    def current(self) -> Outbound:
        """The member the next connection tries first (for the API)."""
        return self.ordered()[0]

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.abc.Stream:
        errors: list[str] = []
        for member in self.ordered():
            try:
                stream = await member.connect_tcp(host, port)
            except OutboundError as e:
                self._down_until[member.name] = trio.current_time() + self.retry_after
                errors.append(f"{member.name}: {e.reason}")
                continue
            self._down_until.pop(member.name, None)
            return stream
        raise OutboundError(f"{self.name}: every member failed ({'; '.join(errors)})")

    @property
    def carries_udp(self) -> bool:
        return any(m.carries_udp for m in self.members)

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        """The first member that carries UDP and opens (members known to be
        down last, as for TCP; UDP failures do not mark a member down)."""
        errors: list[str] = []
        for member in self.ordered():
            if not member.carries_udp:
                continue
            try:
                return await member.open_udp(host, port)
            except OutboundError as e:
                errors.append(f"{member.name}: {e.reason}")
        raise OutboundError(f"{self.name}: no member opened UDP ({'; '.join(errors)})")
