"""The nftables capture backend: renders nft/mirage.nft from the config and applies it.

What it owns: exactly one nftables table (`inet mirage` unless told otherwise)
and, through `PolicyRouting`, the fwmark rule and local route that deliver the
captured packets to local sockets. It never lists, changes or flushes any other
table: deleting its table is its flush.

Two renderings of one ruleset:

- `render(cfg)` builds the nftables JSON commands the way firewalld does
  (`src/firewall/core/nftables.py`): every rule a plain dict assembled from
  small fragment helpers, one builder for the objects, wrapped in `add` to
  apply; the whole start-up (replace a crashed run's leftover table, create
  sets, chains, rules) is ONE `json_cmd` batch, so the kernel sees all of it or
  none of it.
- `render_text(cfg)` fills the template `nft/mirage.nft` (what a person reads,
  and what `mirage rules -c FILE` prints) and appends the policy routing.

The integration tests load both into two namespaces and compare the kernel's
listings, so the template and the builder cannot drift apart silently.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio
from pyroute2.netlink.exceptions import NetlinkError

from appliance.capture.routing import PolicyRouting
from appliance.config.model import Config, IPNetwork

log = logging.getLogger(__name__)

DEFAULT_TABLE = "mirage"
FAMILY = "inet"
TEMPLATE = Path(__file__).resolve().parents[2] / "nft" / "mirage.nft"

# Never captured, whatever the config says (brief: loopback, link-local,
# multicast, broadcast). The gateway's own addresses are matched with
# `fib daddr type local` instead, so they need no list.
ALWAYS_BYPASS4 = tuple(
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
)
ALWAYS_BYPASS6 = tuple(
    ipaddress.IPv6Network(n) for n in ("::/128", "::1/128", "fe80::/10", "ff00::/8")
)

DNS_PORT = 53

# Elements the DIRECT offload maps may hold (per family); past it new fake
# IPs simply stay on the userspace path (appliance/capture/offload.py).
OFFLOAD_SIZE = 65536
# Their names, by IP version (appliance/capture/offload.py adds the elements).
OFFLOAD_MAPS = {4: "offload4", 6: "offload6"}

Json = dict[str, Any]


class CaptureError(RuntimeError):
    """The config cannot be rendered, or the kernel refused the batch."""


# --- what the config means for the ruleset ---------------------------------


def check_capturable(cfg: Config, backend: str = "nftables") -> int:
    """Return tproxy-port; refuse configs no capture backend can express
    (CaptureError naming `backend`). The eBPF plan checks the same."""
    if cfg.tproxy_port is None:
        raise CaptureError(f"tproxy-port is not set: the {backend} capture needs it")
    a = cfg.appliance
    if cfg.routing_mark is not None and cfg.routing_mark == a.capture_mark:
        raise CaptureError(
            f"routing-mark {cfg.routing_mark:#x} equals the capture mark: "
            "Mirage's own traffic would be captured"
        )
    return cfg.tproxy_port


def _dns_hijack(cfg: Config) -> bool:
    return cfg.appliance.dns_hijack and cfg.dns.enable


def _dns_target(cfg: Config) -> tuple[str | None, Json]:
    """(nfproto restriction, nat statement) for the DNS hijack rule.

    Redirect, not TPROXY: conntrack rewrites the answer's source back to the
    address and port the client asked, whatever port dns.listen uses (a
    TPROXY'd UDP answer sent with IP_PKTINFO keeps the listener's port, which
    a client's connected socket drops unless that port is 53). An
    unspecified listen address takes `redirect` (to the address of the
    interface the query came in on); a specific one is named with `dnat`,
    which then fits packets of that family only.
    """
    listen = cfg.dns.listen
    addr = ipaddress.ip_address(listen.host)
    if addr.is_unspecified:
        return (None if cfg.ipv6 else "ipv4"), {"redirect": {"port": listen.port}}
    if addr.is_loopback:
        # A loopback destination arriving on a LAN interface is a martian
        # (unless route_localnet, which Mirage does not set behind your back).
        raise CaptureError(
            f"dns.listen {listen}: a loopback address cannot receive hijacked LAN queries; "
            "listen on 0.0.0.0 (or a LAN address) or turn appliance.dns-hijack off"
        )
    family = "ip" if addr.version == 4 else "ip6"
    nat = {"dnat": {"family": family, "addr": str(addr), "port": listen.port}}
    return ("ipv4" if addr.version == 4 else "ipv6"), nat


def _bypass(cfg: Config) -> tuple[list[IPNetwork], list[IPNetwork]]:
    # Collapsed: an interval set refuses overlapping elements, and a user's
    # list may overlap itself or the fixed ones (10.0.0.0/8 and 10.1.0.0/16).
    v4 = [*ALWAYS_BYPASS4]
    v6 = [*ALWAYS_BYPASS6]
    for n in cfg.appliance.bypass:
        if isinstance(n, ipaddress.IPv4Network):
            v4.append(n)
        else:
            v6.append(n)
    return list(ipaddress.collapse_addresses(v4)), list(ipaddress.collapse_addresses(v6))


def _fake6(cfg: Config) -> ipaddress.IPv6Network | None:
    return cfg.dns.fake_ip_range6 if cfg.ipv6 else None


# --- JSON fragment helpers (firewalld style) --------------------------------


def _offload_maps(cfg: Config) -> list[tuple[str, str, str]]:
    """(name, key/value type, payload protocol) of the DIRECT offload maps:
    one per fake range; none without appliance.offload-direct."""
    if not cfg.appliance.offload_direct:
        return []
    maps = [(OFFLOAD_MAPS[4], "ipv4_addr", "ip")]
    if _fake6(cfg) is not None:
        maps.append((OFFLOAD_MAPS[6], "ipv6_addr", "ip6"))
    return maps


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _anyof(*values: Any) -> Json:
    return {"set": list(values)}


def _set_mark(mark: int) -> Json:
    return {"mangle": {"key": _meta("mark"), "value": mark}}


def _tproxy(port: int, family: str | None = None, addr: str | None = None) -> Json:
    t: Json = {"port": port}
    if family is not None:
        t["family"] = family
    if addr is not None:
        t["addr"] = addr
    return {"tproxy": t}


_RETURN: Json = {"return": None}
_ACCEPT: Json = {"accept": None}


def _prefix(net: IPNetwork) -> Json:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


class _Builder:
    """The table's objects (table, sets, chains, rules) as JSON objects.

    One builder for every verb: `render` wraps each object in `add`; the
    table object alone, wrapped in `add` then `delete`, is the removal.
    """

    def __init__(self, cfg: Config, table: str) -> None:
        self.cfg = cfg
        self.table = table
        self.port = check_capturable(cfg)
        self.mark = cfg.appliance.capture_mark

    def table_obj(self) -> Json:
        return {"table": {"family": FAMILY, "name": self.table}}

    def _set(self, name: str, type_: str, elems: list[Any], interval: bool) -> Json:
        s: Json = {"family": FAMILY, "table": self.table, "name": name, "type": type_}
        if interval:
            s["flags"] = ["interval"]
        if elems:
            s["elem"] = elems
        return {"set": s}

    def _chain(self, name: str, hook: str, prio: int, type_: str = "filter") -> Json:
        return {
            "chain": {
                "family": FAMILY,
                "table": self.table,
                "name": name,
                "type": type_,
                "hook": hook,
                "prio": prio,
                "policy": "accept",
            }
        }

    def _rule(self, chain: str, *expr: Json) -> Json:
        return {"rule": {"family": FAMILY, "table": self.table, "chain": chain, "expr": list(expr)}}

    def sets(self) -> Iterator[Json]:
        cfg = self.cfg
        b4, b6 = _bypass(cfg)
        yield self._set("lan", "ifname", list(cfg.appliance.lan), interval=False)
        yield self._set("fake4", "ipv4_addr", [_prefix(cfg.dns.fake_ip_range)], interval=True)
        yield self._set("bypass4", "ipv4_addr", [_prefix(n) for n in b4], interval=True)
        if cfg.ipv6:
            f6 = _fake6(cfg)
            yield self._set("fake6", "ipv6_addr", [_prefix(f6)] if f6 else [], interval=True)
            yield self._set("bypass6", "ipv6_addr", [_prefix(n) for n in b6], interval=True)
        for name, type_, _proto in _offload_maps(cfg):
            yield {"map": {"family": FAMILY, "table": self.table, "name": name,
                           "type": type_, "map": type_, "flags": ["timeout"],
                           "size": OFFLOAD_SIZE}}

    def chains(self) -> Iterator[Json]:
        yield self._chain("prerouting", "prerouting", -150)  # priority mangle
        if _dns_hijack(self.cfg):
            yield self._chain("dns", "prerouting", -100, type_="nat")  # priority dstnat
        if self.cfg.appliance.offload_direct:
            yield self._chain("direct_nat", "prerouting", -100, type_="nat")
            yield self._chain("fake_guard", "forward", 0)
        yield self._chain("input", "input", 0)  # priority filter

    def rules(self) -> Iterator[Json]:
        cfg, mark, port = self.cfg, self.mark, self.port
        pre = "prerouting"
        l4 = _match(_meta("l4proto"), _anyof("tcp", "udp"))
        yield self._rule(pre, _match(_meta("iifname"), "@lan", "!="), _RETURN)
        if cfg.routing_mark is not None:
            yield self._rule(pre, _match(_meta("mark"), cfg.routing_mark), _RETURN)
        yield self._rule(pre, _match({"ct": {"key": "status"}}, "dnat", "in"), _RETURN)
        yield self._rule(
            pre,
            _match(
                {"fib": {"result": "type", "flags": ["daddr"]}},
                _anyof("local", "broadcast", "multicast"),
            ),
            _RETURN,
        )
        yield self._rule(pre, _match(_payload("ip", "daddr"), "@bypass4"), _RETURN)
        if cfg.ipv6:
            yield self._rule(pre, _match(_payload("ip6", "daddr"), "@bypass6"), _RETURN)
        yield self._rule(
            pre,
            _match(_payload("tcp", "flags"), "syn", "!"),
            _match({"socket": {"key": "transparent"}}, 1),
            _set_mark(mark),
            _ACCEPT,
        )
        offload = _offload_maps(cfg)
        for name, _type, proto in offload:
            yield self._rule(pre, _match(_payload(proto, "daddr"), f"@{name}"),
                             _match({"ct": {"key": "state"}}, "new", "in"), _RETURN)
        yield self._rule(
            pre,
            _match(_payload("ip", "daddr"), "@fake4"),
            l4,
            _tproxy(port, "ip"),
            _set_mark(mark),
            _ACCEPT,
        )
        if _fake6(cfg) is not None:
            yield self._rule(
                pre,
                _match(_payload("ip6", "daddr"), "@fake6"),
                l4,
                _tproxy(port, "ip6"),
                _set_mark(mark),
                _ACCEPT,
            )
        fakes = [("ip", "@fake4")]
        if _fake6(cfg) is not None:
            fakes.append(("ip6", "@fake6"))
        for proto, name in fakes:
            yield self._rule(
                pre,
                _match(_payload(proto, "daddr"), name),
                _match(_meta("l4proto"), "tcp"),
                {"reject": {"type": "tcp reset"}},
            )
            yield self._rule(pre, _match(_payload(proto, "daddr"), name), {"drop": None})
        if _dns_hijack(cfg):
            nfproto, nat = _dns_target(cfg)
            dns = "dns"
            yield self._rule(dns, _match(_meta("iifname"), "@lan", "!="), _RETURN)
            fib = {"fib": {"result": "type", "flags": ["daddr"]}}
            yield self._rule(dns, _match(fib, "local"), _RETURN)
            yield self._rule(dns, _match(_payload("ip", "daddr"), "@bypass4"), _RETURN)
            if cfg.ipv6:
                yield self._rule(dns, _match(_payload("ip6", "daddr"), "@bypass6"), _RETURN)
            head = [_match(_meta("nfproto"), nfproto)] if nfproto else []
            yield self._rule(dns, *head, l4, _match(_payload("th", "dport"), DNS_PORT), nat)
        if offload:
            yield self._rule("direct_nat", _match(_meta("iifname"), "@lan", "!="), _RETURN)
            for name, _type, proto in offload:
                key = {"payload": {"protocol": proto, "field": "daddr"}}
                yield self._rule("direct_nat", {"dnat": {
                    "family": proto, "addr": {"map": {"key": key, "data": f"@{name}"}}}})
            for proto, name in fakes:
                yield self._rule("fake_guard", _match(_payload(proto, "daddr"), name),
                                 {"drop": None})
        inp = "input"
        not_captured = _match(_meta("mark"), mark, "!=")
        yield self._rule(
            inp,
            _match(_payload("tcp", "dport"), port),
            not_captured,
            {"reject": {"type": "tcp reset"}},
        )
        yield self._rule(
            inp,
            _match(_payload("udp", "dport"), port),
            not_captured,
            {"reject": {"type": "icmpx", "expr": "port-unreachable"}},
        )

    def objects(self) -> Iterator[Json]:
        yield self.table_obj()
        yield from self.sets()
        yield from self.chains()
        yield from self.rules()


def render(cfg: Config, table: str = DEFAULT_TABLE) -> list[Json]:
    """The JSON commands `apply` sends: one batch that replaces a leftover.

    `add table` before `delete table` makes the delete valid whether or not a
    crashed run left the table behind; the rest recreates it from scratch.
    """
    b = _Builder(cfg, table)
    t = b.table_obj()
    return [{"add": t}, {"delete": t}, *({"add": o} for o in b.objects())]


def render_remove(table: str = DEFAULT_TABLE) -> list[Json]:
    """The JSON commands that remove Mirage's table, present or not."""
    t = {"table": {"family": FAMILY, "name": table}}
    return [{"add": t}, {"delete": t}]


# --- the template ------------------------------------------------------------

_IF = re.compile(r"^\s*#\s*if\s+(\w+)\s*$")
_ENDIF = re.compile(r"^\s*#\s*endif\s*$")


def _preprocess(text: str, flags: dict[str, bool]) -> str:
    """Keep or drop the `# if NAME` ... `# endif` blocks (nestable)."""
    out: list[str] = []
    keep: list[bool] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if m := _IF.match(line):
            if m.group(1) not in flags:
                raise CaptureError(f"{TEMPLATE.name}:{lineno}: unknown condition {m.group(1)!r}")
            keep.append(flags[m.group(1)])
        elif _ENDIF.match(line):
            if not keep:
                raise CaptureError(f"{TEMPLATE.name}:{lineno}: endif without if")
            keep.pop()
        elif all(keep):
            out.append(line)
    if keep:
        raise CaptureError(f"{TEMPLATE.name}: unclosed if")
    return "\n".join(out) + "\n"


def _elements(items: list[str]) -> str:
    return f"elements = {{ {', '.join(items)} }}" if items else ""


def render_nft(cfg: Config, table: str = DEFAULT_TABLE, template: Path = TEMPLATE) -> str:
    """The ruleset in nft syntax (loadable with `nft -f`), from nft/mirage.nft."""
    port = check_capturable(cfg)
    b4, b6 = _bypass(cfg)
    f6 = _fake6(cfg)
    dns_match, dns_nat = "", ""
    if _dns_hijack(cfg):
        nfproto, nat = _dns_target(cfg)
        dns_match = f"meta nfproto {nfproto} " if nfproto else ""
        if "redirect" in nat:
            dns_nat = f"redirect to :{nat['redirect']['port']}"
        else:
            d = nat["dnat"]
            host = f"[{d['addr']}]" if d["family"] == "ip6" else d["addr"]
            dns_nat = f"dnat {d['family']} to {host}:{d['port']}"
    values = {
        "table": table,
        "lan_elements": _elements([f'"{i}"' for i in cfg.appliance.lan]),
        "fake4": str(cfg.dns.fake_ip_range),
        "bypass4": ", ".join(str(n) for n in b4),
        "fake6_elements": _elements([str(f6)] if f6 else []),
        "bypass6": ", ".join(str(n) for n in b6),
        "routing_mark": f"{cfg.routing_mark:#x}" if cfg.routing_mark is not None else "",
        "capture_mark": f"{cfg.appliance.capture_mark:#x}",
        "tproxy_port": str(port),
        "dns_match": dns_match,
        "dns_nat": dns_nat,
        "offload_size": str(OFFLOAD_SIZE),
    }
    flags = {
        "offload": cfg.appliance.offload_direct,
        "ipv6": cfg.ipv6,
        "fake6": f6 is not None,
        "routing_mark": cfg.routing_mark is not None,
        "dns_hijack": _dns_hijack(cfg),
    }
    text = _preprocess(template.read_text(), flags)
    try:
        return string.Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise CaptureError(f"{template.name}: bad placeholder: {exc}") from exc


def render_text(cfg: Config, table: str = DEFAULT_TABLE) -> str:
    """What `mirage rules -c FILE` prints: the nft ruleset, then the policy
    routing as the equivalent `ip` commands (comments, so the whole text
    still loads with `nft -f`)."""
    routing = PolicyRouting.from_config(cfg)
    lines = ["", "# Policy routing (applied with pyroute2; equivalent ip commands):"]
    lines += [f"#   {c}" for c in routing.describe()]
    return render_nft(cfg, table) + "\n".join(lines) + "\n"


# --- applying ----------------------------------------------------------------


def apply_routing(routing: PolicyRouting) -> None:
    """Apply `routing`; the kernel's refusal as CaptureError naming the rule.
    Both capture backends apply their policy routing this way."""
    try:
        routing.apply()
    except (OSError, NetlinkError) as exc:
        raise CaptureError(
            f"policy routing (fwmark {routing.mark:#x} table {routing.table}): {exc}"
        ) from exc


def run_commands(commands: list[Json], what: str) -> None:
    # Imported here: Debian's bindings load libnftables through ctypes, which
    # `mirage rules` and the unit tests do not need.
    import nftables

    nft = nftables.Nftables()
    rc, _out, err = nft.json_cmd({"nftables": commands})
    if rc != 0:
        raise CaptureError(f"nftables refused to {what}: {err.strip() or f'rc={rc}'}")


def delete_table(table: str = DEFAULT_TABLE) -> None:
    """Delete Mirage's table, present or not (CaptureError if nft refuses;
    ImportError without the nftables bindings)."""
    run_commands(render_remove(table), f"delete table {FAMILY} {table}")


class NftablesCapture:
    """Applies and removes Mirage's capture (nft table + policy routing).

    Synchronous (netlink calls; pyroute2 runs a private loop): call at setup
    and teardown, or through `trio.to_thread.run_sync`. `apply` replaces any
    leftover of a crashed run; `remove` deletes exactly what `apply` added and
    is safe to call twice. On failure `apply` raises `CaptureError` (the
    kernel refused the batch, or the policy routing) and leaves nothing
    applied.
    """

    def __init__(self, cfg: Config, table: str = DEFAULT_TABLE) -> None:
        self.cfg = cfg
        self.table = table
        self.routing = PolicyRouting.from_config(cfg)
        # Render before touching anything: a bad config fails here.
        self._commands = render(cfg, table)
        self.applied = False

    def apply(self) -> None:
        # Routing first: a packet the rules mark must find the local route.
        apply_routing(self.routing)
        try:
            run_commands(self._commands, f"apply table {FAMILY} {self.table}")
        except BaseException:
            self.routing.remove()
            raise
        self.applied = True
        log.info(
            "capture: nftables table %s %s applied, fwmark %#x -> table %d",
            FAMILY,
            self.table,
            self.cfg.appliance.capture_mark,
            self.routing.table,
        )

    def remove(self) -> None:
        try:
            delete_table(self.table)
        finally:
            self.routing.remove()
        self.applied = False
        log.info("capture: nftables table %s %s and policy routing removed", FAMILY, self.table)


async def serve(
    cfg: Config,
    table: str = DEFAULT_TABLE,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Apply the capture, report started, hold it until cancelled, remove it.

    Start this last: once it has started, LAN traffic reaches the listeners.
    """
    capture = NftablesCapture(cfg, table)
    await trio.to_thread.run_sync(capture.apply)
    await hold(capture, task_status)


async def hold(capture: Any, task_status: trio.TaskStatus[Any], started: Any = None) -> None:
    """Report started (with `started`), hold an applied `capture` until
    cancelled, then remove it (`capture.remove()` in a worker thread). Every
    capture service ends this way: nftables, eBPF and the backend choice."""
    try:
        task_status.started(started)
        await trio.sleep_forever()
    finally:
        # Shielded: removal must run even while the nursery is being cancelled.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(capture.remove)
