"""The lab's topology as typed data, read from `topology.yaml`.

The YAML file is the one source for the namespace lab (`appliance.lab.lab`)
and the Vagrant lab. This module only parses and checks it; it owns no
resource and starts nothing. A malformed file raises `TopologyError` naming
the key path, at load, so the lab never half-builds from bad data.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TOPOLOGY = Path(__file__).with_name("topology.yaml")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class TopologyError(ValueError):
    """The topology file is malformed; the message starts with the key path."""


@dataclass(frozen=True)
class Interface:
    name: str
    addresses: tuple[IPInterface, ...]

    def first(self, family: int) -> IPInterface | None:
        """The first address of IP version `family` (4 or 6), if any."""
        return next((a for a in self.addresses if a.version == family), None)


@dataclass(frozen=True)
class Node:
    """One machine of the lab: a network namespace here, a VM under Vagrant."""

    key: str  # "client", "gateway", "upstream"
    ns: str  # namespace suffix: the namespace is f"{prefix}-{ns}"
    role: str
    interfaces: tuple[Interface, ...]
    gateway4: ipaddress.IPv4Address | None
    gateway6: ipaddress.IPv6Address | None
    resolver: IPAddress | None
    forwarding: bool
    rp_filter: int | None

    def interface(self, name: str) -> Interface:
        for iface in self.interfaces:
            if iface.name == name:
                return iface
        raise KeyError(f"node {self.key} has no interface {name}")


@dataclass(frozen=True)
class Endpoint:
    node: str
    interface: str


@dataclass(frozen=True)
class Link:
    """A point-to-point link (a veth pair here, a private network under Vagrant)."""

    a: Endpoint
    b: Endpoint


@dataclass(frozen=True)
class VHost:
    name: str
    marker: str
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class Web:
    node: str
    big_path: str
    big_bytes: int
    vhosts: tuple[VHost, ...]
    https_port: int = 443

    def vhost(self, name: str) -> VHost:
        for v in self.vhosts:
            if v.name == name:
                return v
        raise KeyError(name)


@dataclass(frozen=True)
class Socks:
    name: str
    node: str
    address: IPAddress
    port: int
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class HttpProxy:
    node: str
    address: IPAddress
    port: int
    connect_ports: tuple[int, ...]


@dataclass(frozen=True)
class PoisonedResolver:
    node: str
    address: IPAddress
    answers: dict[str, tuple[IPAddress, ...]]


@dataclass(frozen=True)
class HonestResolver:
    node: str
    address: IPAddress
    name: str
    https_port: int
    path: str
    zone: str
    records: dict[str, tuple[str, ...]]
    address6: IPAddress | None = None

    @property
    def addresses(self) -> list[str]:
        """Its addresses as text, the IPv4 one first."""
        return [str(self.address)] + ([str(self.address6)] if self.address6 else [])

    @property
    def url(self) -> str:
        """The DoH URL by IP literal (the certificate carries the IP)."""
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"https://{host}:{self.https_port}{self.path}"


@dataclass(frozen=True)
class Topology:
    nodes: dict[str, Node]
    links: tuple[Link, ...]
    web: Web
    socks: tuple[Socks, ...]
    http_proxy: HttpProxy
    poisoned_resolver: PoisonedResolver
    honest_resolver: HonestResolver

    def node(self, key: str) -> Node:
        try:
            return self.nodes[key]
        except KeyError:
            raise KeyError(f"no node {key!r}; nodes: {sorted(self.nodes)}") from None

    def socks_server(self, name: str) -> Socks:
        for s in self.socks:
            if s.name == name:
                return s
        raise KeyError(name)


def load_topology(path: Path = DEFAULT_TOPOLOGY) -> Topology:
    """Read and check a topology file. Raises TopologyError (with the key path)
    or OSError (file unreadable)."""
    data = yaml.safe_load(path.read_text())
    return parse_topology(data)


def parse_topology(data: Any) -> Topology:
    top = _mapping(data, "")
    nodes_raw = _mapping(top.get("nodes"), "nodes")
    nodes = {key: _node(key, raw) for key, raw in nodes_raw.items()}
    links = tuple(
        _link(raw, f"links[{i}]", nodes) for i, raw in enumerate(_list(top.get("links"), "links"))
    )

    def node_ref(value: Any, path: str) -> str:
        name = _str(value, path)
        if name not in nodes:
            raise TopologyError(f"{path}: unknown node {name!r}")
        return name

    w = _mapping(top.get("web"), "web")
    vhosts = []
    for i, raw in enumerate(_list(w.get("vhosts"), "web.vhosts")):
        p = f"web.vhosts[{i}]"
        v = _mapping(raw, p)
        addrs = _list(v.get("addresses"), f"{p}.addresses")
        vhosts.append(
            VHost(
                name=_str(v.get("name"), f"{p}.name"),
                marker=_str(v.get("marker"), f"{p}.marker"),
                addresses=tuple(_ip(a, f"{p}.addresses[{j}]") for j, a in enumerate(addrs)),
            )
        )
    web = Web(
        node=node_ref(w.get("node"), "web.node"),
        big_path=_str(w.get("big-path", "/big"), "web.big-path"),
        big_bytes=_int(w.get("big-bytes", 4 << 20), "web.big-bytes"),
        vhosts=tuple(vhosts),
        https_port=_port(w.get("https-port", 443), "web.https-port"),
    )

    socks = []
    for i, raw in enumerate(_list(top.get("socks"), "socks")):
        s = _mapping(raw, f"socks[{i}]")
        p = f"socks[{i}]"
        username = s.get("username")
        password = s.get("password")
        if (username is None) != (password is None):
            raise TopologyError(f"{p}: username and password go together")
        socks.append(
            Socks(
                name=_str(s.get("name"), f"{p}.name"),
                node=node_ref(s.get("node"), f"{p}.node"),
                address=_ip(s.get("address"), f"{p}.address"),
                port=_port(s.get("port"), f"{p}.port"),
                username=None if username is None else _str(username, f"{p}.username"),
                password=None if password is None else _str(password, f"{p}.password"),
            )
        )

    h = _mapping(top.get("http-proxy"), "http-proxy")
    http_proxy = HttpProxy(
        node=node_ref(h.get("node"), "http-proxy.node"),
        address=_ip(h.get("address"), "http-proxy.address"),
        port=_port(h.get("port"), "http-proxy.port"),
        connect_ports=tuple(
            _port(x, f"http-proxy.connect-ports[{i}]")
            for i, x in enumerate(_list(h.get("connect-ports"), "http-proxy.connect-ports"))
        ),
    )

    pr = _mapping(top.get("poisoned-resolver"), "poisoned-resolver")
    answers_raw = _mapping(pr.get("answers"), "poisoned-resolver.answers")
    poisoned = PoisonedResolver(
        node=node_ref(pr.get("node"), "poisoned-resolver.node"),
        address=_ip(pr.get("address"), "poisoned-resolver.address"),
        answers={
            _str(name, "poisoned-resolver.answers"): tuple(
                _ip(a, f"poisoned-resolver.answers.{name}[{j}]")
                for j, a in enumerate(_list(addrs, f"poisoned-resolver.answers.{name}"))
            )
            for name, addrs in answers_raw.items()
        },
    )

    hr = _mapping(top.get("honest-resolver"), "honest-resolver")
    honest = HonestResolver(
        node=node_ref(hr.get("node"), "honest-resolver.node"),
        address=_ip(hr.get("address"), "honest-resolver.address"),
        name=_str(hr.get("name"), "honest-resolver.name"),
        https_port=_port(hr.get("https-port", 443), "honest-resolver.https-port"),
        path=_str(hr.get("path", "/dns-query"), "honest-resolver.path"),
        zone=_str(hr.get("zone"), "honest-resolver.zone"),
        records={
            _str(name, "honest-resolver.records"): tuple(
                _str(r, f"honest-resolver.records.{name}[{i}]")
                for i, r in enumerate(_list(rrs, f"honest-resolver.records.{name}"))
            )
            for name, rrs in _mapping(hr.get("records"), "honest-resolver.records").items()
        },
        address6=None
        if hr.get("address6") is None
        else _ip(hr["address6"], "honest-resolver.address6"),
    )

    return Topology(
        nodes=nodes,
        links=links,
        web=web,
        socks=tuple(socks),
        http_proxy=http_proxy,
        poisoned_resolver=poisoned,
        honest_resolver=honest,
    )


def _node(key: str, raw: Any) -> Node:
    p = f"nodes.{key}"
    n = _mapping(raw, p)
    ifaces_raw = _mapping(n.get("interfaces"), f"{p}.interfaces")
    interfaces = []
    for name, iraw in ifaces_raw.items():
        ip_ = f"{p}.interfaces.{name}"
        if not isinstance(name, str) or not 0 < len(name) <= 15:
            raise TopologyError(f"{ip_}: interface names are 1..15 characters")
        i = _mapping(iraw, ip_)
        addrs = []
        for j, a in enumerate(_list(i.get("addresses"), f"{ip_}.addresses")):
            try:
                addrs.append(ipaddress.ip_interface(_str(a, f"{ip_}.addresses[{j}]")))
            except ValueError as e:
                raise TopologyError(f"{ip_}.addresses[{j}]: {e}") from None
        interfaces.append(Interface(name=name, addresses=tuple(addrs)))
    gw4 = n.get("gateway4")
    gw6 = n.get("gateway6")
    g4 = None if gw4 is None else _ip(gw4, f"{p}.gateway4")
    g6 = None if gw6 is None else _ip(gw6, f"{p}.gateway6")
    if g4 is not None and not isinstance(g4, ipaddress.IPv4Address):
        raise TopologyError(f"{p}.gateway4: not an IPv4 address")
    if g6 is not None and not isinstance(g6, ipaddress.IPv6Address):
        raise TopologyError(f"{p}.gateway6: not an IPv6 address")
    resolver = n.get("resolver")
    rp = n.get("rp-filter")
    if rp is not None and rp not in (0, 1, 2):
        raise TopologyError(f"{p}.rp-filter: must be 0, 1 or 2")
    return Node(
        key=key,
        ns=_str(n.get("ns"), f"{p}.ns"),
        role=str(n.get("role", "")),
        interfaces=tuple(interfaces),
        gateway4=g4,
        gateway6=g6,
        resolver=None if resolver is None else _ip(resolver, f"{p}.resolver"),
        forwarding=bool(n.get("forwarding", False)),
        rp_filter=rp,
    )


def _link(raw: Any, path: str, nodes: dict[str, Node]) -> Link:
    ends = _list(raw, path)
    if len(ends) != 2:
        raise TopologyError(f"{path}: a link has exactly two ends")
    eps = []
    for i, end in enumerate(ends):
        node, sep, iface = _str(end, f"{path}[{i}]").partition(":")
        if not sep or node not in nodes:
            raise TopologyError(f"{path}[{i}]: expected <node>:<interface> with a known node")
        try:
            nodes[node].interface(iface)
        except KeyError as e:
            raise TopologyError(f"{path}[{i}]: {e.args[0]}") from None
        eps.append(Endpoint(node, iface))
    return Link(eps[0], eps[1])


def _mapping(v: Any, path: str) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise TopologyError(f"{path or '<top>'}: expected a mapping")
    return v


def _list(v: Any, path: str) -> list[Any]:
    if not isinstance(v, list):
        raise TopologyError(f"{path}: expected a list")
    return v


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise TopologyError(f"{path}: expected a non-empty string")
    return v


def _int(v: Any, path: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise TopologyError(f"{path}: expected a non-negative integer")
    return v


def _port(v: Any, path: str) -> int:
    p = _int(v, path)
    if not 0 < p < 65536:
        raise TopologyError(f"{path}: port out of range")
    return p


def _ip(v: Any, path: str) -> IPAddress:
    try:
        return ipaddress.ip_address(_str(v, path))
    except ValueError as e:
        raise TopologyError(f"{path}: {e}") from None
