"""WireGuard as Mirage sets it up, without I/O: what one `type: wireguard`
proxy asks of the kernel, and the texts exchanged with it.

Mirage does not speak WireGuard itself: a WireGuard interface does (the
kernel's, or wireguard-go's where the kernel has none), and the flows of
the proxy are sockets bound to that interface. This module decides what
that interface is:

- its name, derived from the proxy's name and bounded to IFNAMSIZ - 1
  (15) characters (`interface_name`), and the routing table of its own
  (`route_table`), both stable across runs so a later run or `mirage
  cleanup` finds a crashed run's leftovers by name;
- its whole configuration as one value (`DevicePlan`, from the options and
  the peers' resolved endpoints): an interface whose plan changed is made
  anew, one whose plan is the same is left alone (a reload keeps its flows);
- the configuration as wireguard-go's UAPI text (`uapi_set`, the
  cross-platform interface protocol of wireguard.com/xplatform) or as
  pyroute2's WireGuard peer mappings for the kernel (`kernel_peer`), and
  the UAPI `get` reply read back (`parse_uapi`, `handshake_times`);
- the DNS query and answer of `remote-dns-resolve` (`dns_query`,
  `dns_answer`), asked through the tunnel by the outbound.

Every function is pure; failures are ValueError (or UapiError for an
interface that answered with an errno).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSError, DNSRecord

from appliance.config.model import IPAddress
from appliance.config.protocols.wireguard import WireguardOptions, WireguardPeer

# Interface names Mirage creates start with this, so cleanup can tell its
# own from the administrator's (wg0, ...).
IFNAME_PREFIX = "mwg-"
IFNAMSIZ = 16  # including the terminating NUL
# Each interface's table is TABLE_BASE plus 16 bits of its name's hash: away
# from the small numbers people pick, and from `main` / `local`.
TABLE_BASE = 0x6D770000
# The `oif <interface> lookup <table>` rules: before the capture's fwmark
# rule (32000) and `main` (32766).
RULE_PRIORITY = 31900


def interface_name(proxy: str) -> str:
    """`mwg-<up to 5 letters or digits of the name>-<5 hex of its SHA-256>`:
    readable in `ip link`, unique per proxy name, at most 15 characters."""
    slug = "".join(c for c in proxy.lower() if c.isascii() and c.isalnum())[:5]
    digest = hashlib.sha256(proxy.encode()).hexdigest()[:5]
    name = f"{IFNAME_PREFIX}{slug}-{digest}" if slug else f"{IFNAME_PREFIX}{digest}"
    assert len(name) < IFNAMSIZ
    return name


def is_ours(ifname: str) -> bool:
    """Whether an interface name has the shape `interface_name` makes."""
    return re.fullmatch(r"mwg-(?:[a-z0-9]{1,5}-)?[0-9a-f]{5}", ifname) is not None


def route_table(ifname: str) -> int:
    """The routing table of the interface's own default routes."""
    return TABLE_BASE + int(hashlib.sha256(ifname.encode()).hexdigest()[:4], 16)


def effective_peers(options: WireguardOptions, server: str, port: int) -> tuple[WireguardPeer, ...]:
    """The peers as mihomo configures them: the `peers:` list, or the one
    peer at `server:port` with the top-level keys, allowed everything of the
    families the interface has an address in."""
    if options.peers:
        return options.peers
    assert options.public_key is not None  # the loader requires it without peers
    allowed = []
    if options.ip is not None:
        allowed.append(ipaddress.ip_network("0.0.0.0/0"))
    if options.ipv6 is not None:
        allowed.append(ipaddress.ip_network("::/0"))
    return (WireguardPeer(server=server, port=port, public_key=options.public_key,
                          allowed_ips=tuple(allowed), pre_shared_key=options.pre_shared_key),)


@dataclass(frozen=True)
class PeerPlan:
    """One peer as the interface holds it: the endpoint is an address (a
    server name was resolved by Mirage's resolver first)."""

    public_key: str
    endpoint: tuple[IPAddress, int]
    allowed_ips: tuple[str, ...]
    pre_shared_key: str | None = None
    persistent_keepalive: int = 0

    @property
    def endpoint_text(self) -> str:
        addr, port = self.endpoint
        return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


@dataclass(frozen=True)
class DevicePlan:
    """Everything one proxy's interface is: name, keys, addresses, MTU,
    the firewall mark of its own UDP (`routing-mark`, so the capture never
    takes the tunnel's packets), peers and routing table. Equal plans mean
    an interface that needs no change."""

    ifname: str
    private_key: str
    addresses: tuple[str, ...]
    mtu: int
    fwmark: int
    peers: tuple[PeerPlan, ...]
    table: int

    @property
    def families(self) -> tuple[int, ...]:
        """The address families the interface has an address in (4, 6)."""
        return tuple(sorted({ipaddress.ip_interface(a).version for a in self.addresses}))


def device_plan(proxy: str, options: WireguardOptions, peers: tuple[WireguardPeer, ...],
                endpoints: tuple[IPAddress, ...], fwmark: int | None) -> DevicePlan:
    """The plan of proxy `proxy`'s interface; `endpoints[i]` is the address
    `peers[i].server` resolved to."""
    if len(peers) != len(endpoints):
        raise ValueError("one endpoint address per peer")
    ifname = interface_name(proxy)
    addresses = tuple(str(a) for a in (options.ip, options.ipv6) if a is not None)
    return DevicePlan(
        ifname=ifname, private_key=options.private_key, addresses=addresses,
        mtu=options.mtu, fwmark=fwmark or 0, table=route_table(ifname),
        peers=tuple(PeerPlan(public_key=p.public_key, endpoint=(ip, p.port),
                             allowed_ips=tuple(str(n) for n in p.allowed_ips),
                             pre_shared_key=p.pre_shared_key,
                             persistent_keepalive=options.persistent_keepalive)
                    for p, ip in zip(peers, endpoints, strict=True)),
    )  # fmt: skip


def key_hex(key: str) -> str:
    """A base64 WireGuard key as the UAPI writes it (lower-case hex)."""
    raw = base64.b64decode(key, validate=True)
    if len(raw) != 32:
        raise ValueError("a WireGuard key is 32 bytes")
    return raw.hex()


def uapi_set(plan: DevicePlan) -> bytes:
    """The UAPI `set=1` request that makes a new interface what `plan`
    says (the peers replace any there were)."""
    lines = ["set=1", f"private_key={key_hex(plan.private_key)}", f"fwmark={plan.fwmark}",
             "replace_peers=true"]
    for peer in plan.peers:
        lines.append(f"public_key={key_hex(peer.public_key)}")
        if peer.pre_shared_key is not None:
            lines.append(f"preshared_key={key_hex(peer.pre_shared_key)}")
        lines.append(f"endpoint={peer.endpoint_text}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode()


UAPI_GET = b"get=1\n\n"


class UapiError(OSError):
    """The interface answered a UAPI request with a non-zero errno."""


def parse_uapi(reply: bytes) -> list[tuple[str, str]]:
    """A complete UAPI reply (up to its blank line) -> its key=value pairs
    without the final `errno`; UapiError for a non-zero errno, ValueError
    for a reply that is not UAPI."""
    text = reply.decode("ascii", "replace")
    if not text.endswith("\n\n"):
        raise ValueError("incomplete UAPI reply")
    pairs = []
    for line in text[:-2].split("\n"):
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not a UAPI line: {line[:40]!r}")
        pairs.append((key, value))
    if not pairs or pairs[-1][0] != "errno":
        raise ValueError("UAPI reply without errno")
    err = int(pairs[-1][1])
    if err:
        raise UapiError(err, f"the interface refused the request (errno {err})")
    return pairs[:-1]


def handshake_times(pairs: list[tuple[str, str]]) -> dict[str, int]:
    """From a UAPI `get` reply: each peer's public key (base64) -> the time
    of its last completed handshake (Unix seconds; 0: never)."""
    out: dict[str, int] = {}
    current: str | None = None
    for key, value in pairs:
        if key == "public_key":
            current = base64.b64encode(bytes.fromhex(value)).decode()
            out[current] = 0
        elif key == "last_handshake_time_sec" and current is not None:
            out[current] = int(value)
    return out


def kernel_peer(peer: PeerPlan) -> dict[str, object]:
    """One peer as pyroute2's `WireGuard.set(peer=...)` takes it."""
    out: dict[str, object] = {
        "public_key": peer.public_key,
        "endpoint_addr": str(peer.endpoint[0]),
        "endpoint_port": peer.endpoint[1],
        "persistent_keepalive": peer.persistent_keepalive,
        "replace_allowed_ips": True,
        "allowed_ips": list(peer.allowed_ips),
    }
    if peer.pre_shared_key is not None:
        out["preshared_key"] = peer.pre_shared_key
    return out


def dns_query(name: str, family: int, qid: int) -> bytes:
    """A recursive A (family 4) or AAAA (6) query for `name`."""
    record = DNSRecord.question(name, "AAAA" if family == 6 else "A")
    record.header.id = qid
    return bytes(record.pack())


def dns_answer(reply: bytes, qid: int, family: int) -> tuple[list[IPAddress], int] | None:
    """The addresses (and lowest TTL) a reply to query `qid` carries; None
    for a datagram that is not that reply (another id, not DNS). Raises
    ValueError naming the rcode for a failed answer."""
    try:
        record = DNSRecord.parse(reply)
    except (DNSError, ValueError, IndexError):
        return None
    if record.header.id != qid or not record.header.qr:
        return None
    if record.header.rcode != RCODE.NOERROR:
        raise ValueError(f"the tunnel's DNS answered {RCODE.get(record.header.rcode)}")
    want = QTYPE.AAAA if family == 6 else QTYPE.A
    addresses: list[IPAddress] = []
    ttl = 0
    for rr in record.rr:
        if rr.rtype == want:
            addresses.append(ipaddress.ip_address(str(rr.rdata)))
            ttl = rr.ttl if len(addresses) == 1 else min(ttl, rr.ttl)
    return addresses, ttl
