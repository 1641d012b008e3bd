"""Where the proxy ports listen: the LAN interfaces' addresses and loopback.

The appliance never serves the WAN side. `lan_addresses` reads the
addresses of the `appliance.lan` interfaces from the kernel (pyroute2,
blocking: call it through trio.to_thread); `choose_bind_addresses` decides,
without I/O, which of them (plus 127.0.0.1 and ::1) to listen on from
`allow-lan` and `bind-address`; `listener_changes` says, also without I/O,
which listeners a reload closes and opens to get there.

How it fails: `ProxyPortError` for a bind-address that is not an address
of the LAN interfaces (or not an address at all) and for a LAN interface
that does not exist, so the app can say which key is wrong.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class ProxyPortError(Exception):
    """The proxy ports cannot start: bad bind-address, missing LAN interface."""


@dataclass(frozen=True)
class BindAddress:
    """One local address to listen on; `scope_id` for IPv6 link-local."""

    host: str
    scope_id: int = 0

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.host).version

    def sockaddr(self, port: int) -> tuple[Any, ...]:
        if self.version == 6:
            return (self.host, port, 0, self.scope_id)
        return (self.host, port)

    def __str__(self) -> str:
        return f"[{self.host}]" if self.version == 6 else self.host


LOOPBACK = (BindAddress("127.0.0.1"), BindAddress("::1"))


def choose_bind_addresses(
    lan: Sequence[BindAddress], *, allow_lan: bool = True, bind_address: str = "*"
) -> list[BindAddress]:
    """Loopback plus the LAN side, never anything else.

    `lan` are the addresses of the `appliance.lan` interfaces. `allow-lan:
    false` keeps to loopback; `bind-address` other than `*` selects one LAN
    address (raises ProxyPortError if it is not one, e.g. a WAN address).
    """
    chosen: list[BindAddress] = list(LOOPBACK)
    if allow_lan:
        if bind_address in ("*", ""):
            chosen += lan
        else:
            try:
                want = ipaddress.ip_address(bind_address.strip("[]"))
            except ValueError:
                raise ProxyPortError(
                    f"bind-address {bind_address!r} is not an IP address"
                ) from None
            if not want.is_loopback:
                match = [a for a in lan if ipaddress.ip_address(a.host) == want]
                if not match:
                    raise ProxyPortError(
                        f"bind-address {bind_address} is not an address of the appliance.lan "
                        "interfaces (proxy ports are served on the LAN side only)"
                    )
                chosen += match
    out: list[BindAddress] = []
    for a in chosen:
        if a not in out:
            out.append(a)
    return out


def lan_addresses(interfaces: Sequence[str]) -> list[BindAddress]:
    """The IPv4 and IPv6 addresses of `interfaces`, read from the kernel.
    Blocking (pyroute2): call through trio.to_thread. Raises ProxyPortError
    for an interface that does not exist."""
    from pyroute2 import IPRoute

    out: list[BindAddress] = []
    with IPRoute() as ipr:
        for name in interfaces:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise ProxyPortError(f"appliance.lan: no interface named {name!r}")
            index = found[0]
            for msg in ipr.get_addr(index=index):
                text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if not text:
                    continue
                ip = ipaddress.ip_address(text)
                link_local = ip.version == 6 and ip.is_link_local
                out.append(BindAddress(str(ip), index if link_local else 0))
    return out


# One listening socket: a proxy-port key ("mixed-port", ...) on one address.
ListenerKey = tuple[str, BindAddress]


@dataclass(frozen=True)
class ListenerChanges:
    """What a reload does to the listening sockets: `close` those the new
    configuration no longer wants, `open` those it now wants (in the order
    of `keys` and `addresses`); every other listener is left as it is."""

    close: tuple[ListenerKey, ...]
    open: tuple[ListenerKey, ...]

    def __bool__(self) -> bool:
        return bool(self.close or self.open)


def listener_changes(
    listening: Iterable[ListenerKey], keys: Sequence[str], addresses: Sequence[BindAddress]
) -> ListenerChanges:
    """From the listeners there are (`listening`) to one per key of `keys`
    on each of `addresses` (what `choose_bind_addresses` now says)."""
    have = list(listening)
    want = [(key, a) for key in keys for a in addresses]
    return ListenerChanges(
        close=tuple(k for k in have if k not in want),
        open=tuple(k for k in want if k not in have),
    )
