"""`type: wireguard`: flows leave through a WireGuard interface Mirage owns.

Mirage does not encrypt anything here: the proxy's interface (the
kernel's WireGuard, or wireguard-go's; appliance/outbound/wgdevice.py) does.
A flow is a plain socket bound to that interface (SO_BINDTODEVICE; the
interface's own routing table and `oif` rule route it) and carrying
`routing-mark`; a TCP flow's stream is a plain `trio.SocketStream`, so the
gateway splices it. The interface is made on the first flow (or when the
app prepares its proxies, `prepare`) and kept until no proxy names it.

Names (as mihomo does): a flow to a name is resolved by Mirage's resolver
and the address is sent through the tunnel; with `remote-dns-resolve` and
`dns`, the name is asked of those servers through the tunnel instead
(A, and AAAA when the interface has an IPv6 address; answers kept for their
TTL, 5 to 300 s). Addresses of a family the interface has no address in are
not tried; IPv6 ones go first (RFC 8305's order, without the race).

UDP (`udp: true`, off by default as in mihomo): one bound UDP socket per
flow, connected to the destination.

How it fails: WireGuard says nothing about a wrong key on the wire (the
peer drops the handshake silently), so a TCP flow that has not connected
within 0.9 x `connect-timeout` asks the interface whether a handshake with
its peer ever completed; if none did, the flow fails with "no WireGuard
handshake with <endpoint> (wrong keys, or the server is down or
unreachable)", logged at WARNING and kept as the flow's error. An
interface that cannot be made fails the flow with the reason
(WireguardError), retried at most every few seconds.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import socket
from collections.abc import Iterable, Sequence

import trio

from appliance.config.model import IPAddress, ProxyConfig
from appliance.config.protocols.wireguard import WireguardOptions
from appliance.outbound.base import (
    Dialer,
    OutboundEnv,
    OutboundError,
    UdpPeer,
    as_ip,
    interleave,
    no_udp,
    udp_socket,
)
from appliance.outbound.wgdevice import DEVICES, WireguardDevices, WireguardError, describe
from appliance.proto.wireguard import (
    DevicePlan,
    device_plan,
    dns_answer,
    dns_query,
    effective_peers,
    interface_name,
)
from appliance.sockopt import set_mark

log = logging.getLogger(__name__)

SO_BINDTODEVICE: int = getattr(socket, "SO_BINDTODEVICE", 25)
# The share of connect-timeout a TCP connect through the tunnel may take
# before the interface is asked why: the rest leaves time to ask and say so
# before the gateway's own deadline (the same connect-timeout) fires.
CONNECT_SHARE = 0.9
# One question to one tunnel DNS server, before the next server is asked.
DNS_ATTEMPT = 2.0
# Tunnel DNS answers are kept for their TTL, within these bounds (a burst
# of UDP sessions to one name costs one question), for at most this many
# names (oldest dropped).
DNS_TTL_MIN = 5.0
DNS_TTL_MAX = 300.0
DNS_CACHE_SIZE = 4096


def bind_to(sock: socket.socket, ifname: str) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())


class WireguardOutbound:
    """One `type: wireguard` proxy. Owns nothing kernel-side itself: its
    interface is `devices`' (shared by every router that has this proxy,
    so a reload keeps it); each flow owns its socket."""

    type = "WireGuard"

    def __init__(self, name: str, server: str, port: int, options: WireguardOptions,
                 env: OutboundEnv, *, udp: bool = False,
                 devices: WireguardDevices = DEVICES) -> None:
        self.name = name
        self.options = options
        self.peers = effective_peers(options, server, port)
        self.ifname = interface_name(name)
        self.families = {a.version for a in (options.ip, options.ipv6) if a is not None}
        self.connect_timeout = env.connect_timeout
        self.mark = env.routing_mark
        # Resolves the flows' names without remote-dns-resolve (never the
        # system resolver); the peers' endpoints go by the proxy's
        # `ip-version` (`server_dialer`: one address, as mihomo picks it).
        self.dialer = Dialer(env.resolve, env.routing_mark, ipv6=env.ipv6)
        self.server_dialer = env.server_dialer()
        self.devices = devices
        # A relay group's later hop (`env.via`): the kernel sends the
        # tunnel's UDP itself, so it cannot ride the hop before it
        # (`dialer-proxy` is refused at load for the same reason).
        self.relayed = env.via is not None
        self.carries_udp = udp and not self.relayed
        self.plan: DevicePlan | None = None
        # remote-dns-resolve answers: name -> (addresses, until when).
        self._answers: dict[str, tuple[list[IPAddress], float]] = {}

    @classmethod
    def from_config(cls, p: ProxyConfig, env: OutboundEnv) -> WireguardOutbound:
        assert isinstance(p.options, WireguardOptions)
        return cls(p.name, p.server, p.port, p.options, env, udp=p.udp)

    # -- the interface ---------------------------------------------------------

    async def prepare(self) -> DevicePlan:
        """The interface up as the options say (made on first use). Raises
        OutboundError naming why it cannot be."""
        if self.relayed:
            await trio.lowlevel.checkpoint()
            raise OutboundError(f"{self.name}: a WireGuard proxy cannot be a later hop of a "
                                "relay (the kernel sends its UDP, not the hop before it)")
        plan = self.plan
        if plan is None or plan.ifname not in self.devices.devices:
            endpoints = []
            for peer in self.peers:
                try:
                    endpoints.append(await self.server_dialer.udp_address(peer.server))
                except OutboundError as err:
                    raise OutboundError(f"{self.name}: peer {peer.server}: {err.reason}") from None
            plan = device_plan(self.name, self.options, self.peers, tuple(endpoints), self.mark)
        try:
            await self.devices.ensure(plan)
        except WireguardError as err:
            raise OutboundError(f"{self.name}: {err}") from None
        self.plan = plan
        return plan

    # -- flows -----------------------------------------------------------------

    async def connect_tcp(self, host: str | IPAddress, port: int) -> trio.SocketStream:
        what = f"{self.name} {host}:{port}"
        share = self.connect_timeout * CONNECT_SHARE
        with trio.move_on_after(share):
            plan = await self.prepare()
            addresses = await self._addresses(host, plan)
            errors = []
            for ip in addresses:
                try:
                    return await self._connect(ip, port)
                except OSError as e:
                    errors.append(f"{ip}: {e.strerror or e}")
            raise OutboundError(f"{what}: connect through {self.ifname} failed: "
                                + "; ".join(errors))
        raise OutboundError(f"{what}: {await self._why_slow(share)}")

    async def _why_slow(self, waited: float) -> str:
        plan = self.plan
        if plan is None:
            return f"the interface was not ready after {waited:g}s"
        with trio.move_on_after(max(self.connect_timeout - waited, 0.05) / 2):
            times = await trio.to_thread.run_sync(self.devices.handshakes, plan.ifname,
                                                  abandon_on_cancel=True)
            if times and not any(times.values()):
                endpoints = ", ".join(p.endpoint_text for p in plan.peers)
                why = (f"no WireGuard handshake with {endpoints} within {waited:g}s (wrong "
                       "keys, or the server is down or unreachable)")
                log.warning("%s: %s", self.name, why)
                return why
        return f"timed out after {waited:g}s (through {plan.ifname})"

    async def _connect(self, ip: IPAddress, port: int) -> trio.SocketStream:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            set_mark(sock, self.mark)
            bind_to(sock, self.ifname)
            err = sock.connect_ex((str(ip), port))
            if err == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    async def open_udp(self, host: str | IPAddress, port: int) -> UdpPeer | None:
        """A bound UDP socket connected to `host` (a name resolved first)."""
        if not self.carries_udp:
            return await no_udp(self.name)
        if not 0 < port <= 0xFFFF:
            raise OutboundError(f"bad port {port}")
        plan = await self.prepare()
        ip = (await self._addresses(host, plan))[0]
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = udp_socket(family, self.mark)
        try:
            bind_to(sock, self.ifname)
            sock.connect((str(ip), port))
        except OSError as e:
            sock.close()
            raise OutboundError(f"{self.name} udp {ip} port {port}: {e.strerror or e}") from None
        return UdpPeer(sock, self.name, remote=f"{ip}:{port} via {self.ifname}")

    # -- names -----------------------------------------------------------------

    async def _addresses(self, host: str | IPAddress, plan: DevicePlan) -> list[IPAddress]:
        """Where to connect for `host`, in the families the interface has."""
        ip = as_ip(host)
        if ip is not None:
            if ip.version not in self.families:
                raise OutboundError(f"{self.name}: {ip}: the interface has no IPv{ip.version} "
                                    "address")
            return [ip]
        assert isinstance(host, str)
        if self.options.remote_dns_resolve:
            found = await self._resolve_remote(host)
        else:
            found, _ = await self.dialer.resolve(host)
        usable = [a for a in interleave(found) if a.version in self.families]
        if not usable:
            raise OutboundError(f"{self.name}: {host} has no address of the interface's "
                                f"famil{'y' if len(self.families) == 1 else 'ies'}")
        return usable

    async def _resolve_remote(self, name: str) -> list[IPAddress]:
        """`name` asked of the `dns` servers through the tunnel, in order
        (kept for the answer's TTL, within DNS_TTL_MIN..DNS_TTL_MAX)."""
        key = name.rstrip(".").lower()
        now = trio.current_time()
        kept = self._answers.get(key)
        if kept is not None and kept[1] > now:
            return kept[0]
        errors: list[str] = []
        for server in self.options.dns:
            found: list[IPAddress] = []
            ttls: list[int] = []
            for family in sorted(self.families, reverse=True):
                try:
                    addresses, ttl = await self._ask(server, name, family)
                except (OSError, ValueError) as e:
                    errors.append(f"{server[0]}: {e}")
                    continue
                found += addresses
                if addresses:
                    ttls.append(ttl)
            if found:
                if len(self._answers) >= DNS_CACHE_SIZE:
                    self._answers.pop(next(iter(self._answers)))
                keep = min(max(min(ttls), DNS_TTL_MIN), DNS_TTL_MAX)
                self._answers[key] = (found, trio.current_time() + keep)
                return found
        raise OutboundError(f"{self.name}: cannot resolve {name} through the tunnel: "
                            + ("; ".join(errors) or "no address records"))

    async def _ask(self, server: tuple[IPAddress, int], name: str, family: int
                   ) -> tuple[list[IPAddress], int]:
        addr, port = server
        sock = udp_socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET, self.mark)
        try:
            bind_to(sock, self.ifname)
            sock.connect((str(addr), port))
            qid = random.getrandbits(16)
            sock.send(dns_query(name, family, qid))
            with trio.move_on_after(DNS_ATTEMPT):
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    answer = dns_answer(sock.recv(65535), qid, family)
                    if answer is not None:
                        return answer
            raise OSError(errno.ETIMEDOUT, f"no answer within {DNS_ATTEMPT:g}s")
        finally:
            sock.close()


def render_plans(proxies: Iterable[ProxyConfig], mark: int | None) -> str:
    """What `mirage rules` shows for the WireGuard proxies of a config: each
    interface as the equivalent `ip`/`wg` commands (a server name stands
    for the address it will resolve to)."""
    out = []
    for p in proxies:
        if not isinstance(p.options, WireguardOptions):
            continue
        peers = effective_peers(p.options, p.server, p.port)
        # A placeholder address for names: shown as the name below.
        plan = device_plan(p.name, p.options, peers,
                           tuple(as_ip(peer.server) or ipaddress.ip_address("0.0.0.0")
                                 for peer in peers), mark)
        lines = describe(plan)
        for peer in peers:
            if as_ip(peer.server) is None:
                lines = [line.replace(f"endpoint 0.0.0.0:{peer.port}",
                                      f"endpoint {peer.server}:{peer.port}") for line in lines]
        out.append(f"# WireGuard proxy {p.name!r} (made with pyroute2 or wireguard-go; "
                   "equivalent commands):\n" + "".join(f"#   {line}\n" for line in lines))
    return "\n" + "\n".join(out) if out else ""


async def prepare_all(outbounds: Iterable[object], devices: WireguardDevices = DEVICES,
                      *, remove_others: bool = True) -> list[str]:
    """Bring up the interfaces of the WireGuard proxies among `outbounds`
    (failures logged, not raised: a flow reports them again), then remove
    the interfaces no longer named (a reload that dropped a proxy).
    Returns the names of the interfaces that are up."""
    ours: Sequence[WireguardOutbound] = [o for o in outbounds
                                          if isinstance(o, WireguardOutbound) and not o.relayed]
    up = []
    async with devices.sync_lock:
        for outbound in ours:
            try:
                plan = await outbound.prepare()
                up.append(plan.ifname)
            except OutboundError as err:
                log.error("wireguard: %s", err.reason)
        if remove_others:
            await devices.retain(o.ifname for o in ours)
    return up
