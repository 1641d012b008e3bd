"""One flow, whichever listener took it: what it is and what routing decided.

A `Flow` is made once per TCP connection or UDP session by the listener
that took it (the transparent TCP listener, the transparent UDP socket, a
proxy port), handed to the dispatcher (appliance/routing.py), which fills in
the routing decision, and read back by the listener for its logs and flow
list. Nothing here does I/O.

Addresses are parsed (`ipaddress` objects): the rules compare them as
numbers, and the transparent listener has them parsed anyway. `dst` is the
address the client connected or sent to: a fake IP (then `domain` is the
name the pool mapped it back to), a real address (`domain` None), or None
when the client named a host on a proxy port (then `domain` is that name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.config.model import IPAddress, Rule
from appliance.rules.names import rule_payload

Network = Literal["tcp", "udp"]
# Which listener took the flow: the transparent listener/socket on
# tproxy-port, or one of the proxy ports (mixed-port, socks-port, port).
Inbound = Literal["tproxy", "mixed", "socks", "http"]


@dataclass(frozen=True, slots=True)
class Entry:
    """How a flow came in, as mihomo's IN-* rules and `/connections` name
    it: the listener's kind (`inbound`), its port (IN-PORT), mihomo's name
    for the listener (IN-NAME: DEFAULT-TPROXY, DEFAULT-MIXED, ...), the
    protocol the client spoke (IN-TYPE: TPROXY, SOCKS5, HTTP for a
    forwarded request, HTTPS for CONNECT) and the proxy-port user who
    authenticated (IN-USER; empty without authentication)."""

    inbound: Inbound
    port: int
    name: str
    type: str
    user: str = ""

    def as_dict(self) -> dict[str, str | int]:
        """The fields of a flow row (the API's connections) that say how it
        came in."""
        return {"inbound": self.inbound, "in_port": self.port, "in_name": self.name,
                "in_type": self.type, "in_user": self.user}


def tproxy_entry(port: int) -> Entry:
    """The transparent listener (TCP or UDP) on tproxy-port."""
    return Entry("tproxy", port, "DEFAULT-TPROXY", "TPROXY")


@dataclass(slots=True, eq=False)
class Flow:
    """One TCP connection or UDP session, from the listener to its outbound.

    Set by the listener: `network`, `inbound`, the client (`src`,
    `src_port`), the destination (`dst`, `dst_port`), `domain` (see the
    module doc) and `entry` (how it came in, when the listener knows). Set
    by the dispatcher when it routes the flow: `outbound` (the name of the
    outbound the rules chose), `rule` (the rule that chose it; None: no
    rule matched, the default DIRECT), `chains` (the group members it went
    through) and, for UDP, `skipped` (matching rules passed
    over because their outbound cannot carry UDP).
    Owns nothing.
    """

    network: Network
    inbound: Inbound
    src: IPAddress
    src_port: int
    dst: IPAddress | None
    dst_port: int
    domain: str | None
    outbound: str = ""
    rule: Rule | None = None
    skipped: int = 0
    # The outbounds the flow went through, the last one first, as mihomo's
    # `chains` (["ss-1", "Proxy"] for the group Proxy's member ss-1): set
    # by the dispatcher, shown by the control API.
    chains: tuple[str, ...] = ()
    # Routed by the tunnel mode (global, direct), not by the rules: mihomo
    # then shows no rule at all, not its default's "Match".
    by_mode: bool = False
    entry: Entry | None = None

    @property
    def host(self) -> str | IPAddress:
        """What an outbound is asked to reach: the name when known (so a
        proxy resolves it at the far end), else the address."""
        if self.domain is not None:
            return self.domain
        assert self.dst is not None, "a flow has a domain or a destination address"
        return self.dst

    def rule_shown(self) -> tuple[str, str]:
        """The rule that routed the flow as the control API shows it: its
        keyword and its payload as mihomo spells it; ("MATCH", "") when no
        rule matched (the default, as mihomo shows it); ("", "") before
        routing and for a flow routed by the mode (global, direct)."""
        if self.by_mode:
            return "", ""
        if self.rule is not None:
            return self.rule.type, rule_payload(self.rule)
        return ("MATCH", "") if self.outbound else ("", "")

    def describe(self) -> str:
        """`src:port -> host:port`, for logs."""
        return f"{self.src}:{self.src_port} -> {self.host}:{self.dst_port}"
