"""What the DNS service needs from an upstream resolver, and how it fails.

Kept apart from `upstream.py` (the DoH/UDP/TCP implementation) so the server
and handler depend on a small protocol, not on httpx.
"""

from __future__ import annotations

from typing import Protocol

from dnslib import DNSRecord


class UpstreamError(Exception):
    """No upstream gave a usable answer in time (all failed, or the deadline
    passed). The DNS service turns this into SERVFAIL."""


class Upstream(Protocol):
    async def query(self, request: DNSRecord) -> DNSRecord:
        """Resolve `request` (one question) for real and return the reply.

        Bounded in time by the implementation; raises UpstreamError, never
        hangs and never returns a reply with another question.
        """
        ...
