"""`type: wireguard` without the kernel: the options as mihomo reads them
(and mihomo's own verdict on the same profiles), what Mirage refuses and
why, rendering, and the sans-I/O core (interface names, the UAPI texts,
the tunnel DNS exchange)."""

from __future__ import annotations

import base64
import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import QTYPE, RR, A, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from appliance.config.loader import ConfigError, parse_config
from appliance.config.protocols.wireguard import WireguardOptions
from appliance.config.render import effective_config
from appliance.lab.reference import mihomo_binary
from appliance.outbound.base import OutboundEnv, OutboundError
from appliance.outbound.build import BUILDERS
from appliance.outbound.wireguard import WireguardOutbound, render_plans
from appliance.proto.wireguard import (
    IFNAMSIZ,
    TABLE_BASE,
    UapiError,
    device_plan,
    dns_answer,
    dns_query,
    effective_peers,
    handshake_times,
    interface_name,
    is_ours,
    kernel_peer,
    parse_uapi,
    route_table,
    uapi_set,
)

PRIV = base64.b64encode(bytes(range(32))).decode()
PUB = base64.b64encode(bytes(range(32, 64))).decode()
PSK = base64.b64encode(bytes(range(64, 96))).decode()
NO_DNS = {"dns": {"enable": False}}


def profile(**extra: Any) -> dict[str, Any]:
    proxy = {"name": "wg", "type": "wireguard", "server": "162.159.192.1", "port": 2480,
             "ip": "172.16.0.2", "private-key": PRIV, "public-key": PUB, **extra}
    return {**NO_DNS, "proxies": [proxy], "rules": ["MATCH,wg"]}


def options(cfg: Any) -> WireguardOptions:
    opts = cfg.proxies[0].options
    assert isinstance(opts, WireguardOptions)
    return opts


def test_mihomo_single_peer_form() -> None:
    cfg = parse_config(profile(ipv6="fd01::2", udp=True, **{"pre-shared-key": PSK,
                                                           "persistent-keepalive": 25}))
    p = cfg.proxies[0]
    o = options(cfg)
    assert (p.server, p.port, p.udp) == ("162.159.192.1", 2480, True)
    assert str(o.ip) == "172.16.0.2/32" and str(o.ipv6) == "fd01::2/128"
    assert (o.mtu, o.persistent_keepalive, o.pre_shared_key) == (1408, 25, PSK)
    # One peer, allowed everything of both families (mihomo's genIpcConf).
    (peer,) = effective_peers(o, p.server, p.port)
    assert [str(n) for n in peer.allowed_ips] == ["0.0.0.0/0", "::/0"]
    assert (peer.server, peer.port, peer.public_key) == ("162.159.192.1", 2480, PUB)
    assert BUILDERS["wireguard"] == WireguardOutbound.from_config


def test_peers_list_replaces_the_top_level_peer() -> None:
    cfg = parse_config(profile(**{"public-key": None, "peers": [
        {"server": "wg.example", "port": 51820, "public-key": PUB, "pre-shared-key": PSK,
         "allowed-ips": ["10.0.0.0/8", "fd00::/8"], "reserved": [0, 0, 0]}]}))
    (peer,) = effective_peers(options(cfg), "ignored", 1)
    assert (peer.server, peer.port, peer.pre_shared_key) == ("wg.example", 51820, PSK)
    assert [str(n) for n in peer.allowed_ips] == ["10.0.0.0/8", "fd00::/8"]


# What mihomo loads but the kernel cannot do (or no interface takes): the
# proxy is skipped with the reason.
SKIPPED: list[tuple[dict[str, Any], str]] = [
    ({"reserved": [209, 98, 59]}, "reserved bytes other than zeros"),
    ({"reserved": "U4An"}, "reserved bytes other than zeros"),
    ({"amnezia-wg-option": {"jc": 5, "jmin": 500, "jmax": 501, "s1": 30, "s2": 40,
                            "h1": 1, "h2": 2, "h3": 3, "h4": 4}}, "amnezia-wg-option"),
    ({"private-key": "c2hvcnQ="}, "private-key of 5 bytes"),
    ({"pre-shared-key": "c2hvcnQ="}, "pre-shared-key of 5 bytes"),
    ({"mtu": 100}, "mtu 100"),
    ({"remote-dns-resolve": True, "dns": ["https://1.1.1.1/dns-query"]}, "remote-dns-resolve"),
]
# What mihomo refuses too: the whole profile, with the key's path.
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"public-key": "not base64!"}, "proxies[0].public-key", "not base64"),
    ({"ip": None}, "proxies[0].ip", "required"),
    ({"reserved": [1, 2]}, "proxies[0].reserved", "3 bytes"),
    ({"peers": [{"server": "a.example", "port": 1, "public-key": PUB}]},
     "proxies[0].peers[0].allowed-ips", "required"),
]


@pytest.mark.parametrize(("extra", "why"), [*SKIPPED, ({"dialer-proxy": "other"}, "dialer-proxy")])
def test_what_the_kernel_cannot_send_skips_the_proxy(extra: dict[str, Any], why: str) -> None:
    cfg = parse_config({**profile(**extra), "proxy-groups": [
        {"name": "g", "type": "select", "proxies": ["wg", "DIRECT"]}], "rules": ["MATCH,g"]})
    assert cfg.proxies == ()
    assert any(f"wireguard proxy 'wg': {why}" in i for i in cfg.ignored_keys), cfg.ignored_keys


def test_zero_reserved_is_what_the_kernel_sends() -> None:
    assert options(parse_config(profile(reserved="AAAA"))).ip is not None
    assert options(parse_config(profile(reserved=[0, 0, 0]))).ip is not None


@pytest.mark.parametrize(("extra", "path", "why"), [
    *REFUSED,
    ({"ip": "fd00::1"}, "proxies[0].ip", "not an IPv4 address"),
    ({"public-key": None}, "proxies[0].public-key", "required"),
])
def test_bad_values_name_their_key(extra: dict[str, Any], path: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(profile(**extra))
    assert err.value.path == path and why in err.value.reason
    assert PRIV not in str(err.value)  # keys never printed


def test_an_unknown_key_is_reported_with_a_did_you_mean() -> None:
    cfg = parse_config(profile(**{"persistent-keepalives": 25}))
    assert options(cfg).persistent_keepalive == 0
    assert any("persistent-keepalives" in i and "did you mean 'persistent-keepalive'" in i
               for i in cfg.ignored_keys), cfg.ignored_keys


def test_dns_only_with_remote_dns_resolve_and_plain_servers() -> None:
    cfg = parse_config(profile(**{"remote-dns-resolve": True,
                                  "dns": ["1.1.1.1", "udp://[2606:4700::1111]:5353",
                                          "tls://1.1.1.1"], "workers": 4}))
    o = options(cfg)
    assert o.remote_dns_resolve
    assert o.dns == ((ipaddress.ip_address("1.1.1.1"), 53),
                     (ipaddress.ip_address("2606:4700::1111"), 5353))
    ignored = cfg.ignored_keys
    assert any("dns[2]" in i for i in ignored) and any("workers" in i for i in ignored)
    plain = options(parse_config(profile(dns=["1.1.1.1"])))
    assert not plain.remote_dns_resolve and plain.dns == ()


def test_render_round_trips_and_redacts() -> None:
    cfg = parse_config(profile(ipv6="fd01::2/64", **{
        "pre-shared-key": PSK, "remote-dns-resolve": True, "dns": ["10.0.0.1:5353"]}))
    shown = effective_config(cfg, redact=True)["proxies"][0]
    assert shown["private-key"] == shown["pre-shared-key"] == "<redacted>"
    assert PRIV not in yaml.safe_dump(shown)
    again = parse_config({**NO_DNS, "proxies": [effective_config(cfg, redact=False)["proxies"][0]],
                          "rules": ["MATCH,wg"]})
    assert again.proxies == cfg.proxies


def mihomo_loads(cfg: dict[str, Any], home: Path) -> tuple[bool, str]:
    home.mkdir(exist_ok=True)
    (home / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run([str(mihomo_binary()), "-t", "-d", str(home)],
                         capture_output=True, text=True, timeout=60)
    return run.returncode == 0, run.stdout + run.stderr


def test_mihomo_refuses_what_mirage_refuses_and_loads_what_it_skips(tmp_path: Path) -> None:
    for i, (extra, path, _) in enumerate(REFUSED):
        ok, said = mihomo_loads(profile(**extra), tmp_path / f"refused{i}")
        assert not ok, (path, said)
    skipped = {**NO_DNS, "proxies": [
        {**profile(**extra)["proxies"][0], "name": f"wg{i}"} for i, (extra, _) in
        enumerate(SKIPPED)], "rules": ["MATCH,DIRECT"]}
    ok, said = mihomo_loads(skipped, tmp_path / "skipped")
    assert ok, said
    assert parse_config(skipped).proxies == ()


def test_mtu_zero_is_mihomos_default() -> None:
    assert options(parse_config(profile(mtu=0))).mtu == 1408


def test_mihomo_accepts_the_profiles_mirage_loads(tmp_path: Path) -> None:
    cfg = profile(ipv6="fd01::2", udp=True, reserved=[0, 0, 0], **{
        "remote-dns-resolve": True, "dns": ["10.0.0.1"], "persistent-keepalive": 25})
    cfg["proxies"].append({"name": "peers", "type": "wireguard", "server": "a.example",
                           "port": 1, "ip": "10.1.0.2/24", "private-key": PRIV, "peers": [
                               {"server": "b.example", "port": 51820, "public-key": PUB,
                                "allowed-ips": ["10.0.0.0/8"]}]})
    parse_config(cfg)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run([str(mihomo_binary()), "-t", "-d", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


# -- the sans-I/O core --------------------------------------------------------

@given(st.text(max_size=80))
def test_interface_names_are_bounded_and_recognisable(name: str) -> None:
    ifname = interface_name(name)
    assert len(ifname) < IFNAMSIZ and is_ours(ifname)
    assert ifname.isascii() and " " not in ifname and "/" not in ifname
    assert TABLE_BASE <= route_table(ifname) <= TABLE_BASE + 0xFFFF


def test_names_differ_by_proxy_and_foreign_ones_are_not_ours() -> None:
    assert interface_name("WARP") != interface_name("warp")
    assert interface_name("office wg").startswith("mwg-offic-")
    assert not is_ours("wg0") and not is_ours("mwg-") and not is_ours("mwg-x-zzzzz")


def _plan(**extra: Any) -> Any:
    cfg = parse_config(profile(ipv6="fd01::2", **{"pre-shared-key": PSK,
                                                  "persistent-keepalive": 25}, **extra))
    p = cfg.proxies[0]
    o = options(cfg)
    peers = effective_peers(o, p.server, p.port)
    return device_plan(p.name, o, peers, (ipaddress.ip_address("162.159.192.1"),), 255)


def test_uapi_set_configures_keys_peer_and_mark() -> None:
    text = uapi_set(_plan()).decode()
    assert text.endswith("\n\n")
    lines = text.strip().split("\n")
    assert lines[:4] == ["set=1", f"private_key={bytes(range(32)).hex()}", "fwmark=255",
                         "replace_peers=true"]
    assert lines[4:] == [
        f"public_key={bytes(range(32, 64)).hex()}", f"preshared_key={bytes(range(64, 96)).hex()}",
        "endpoint=162.159.192.1:2480", "persistent_keepalive_interval=25",
        "replace_allowed_ips=true", "allowed_ip=0.0.0.0/0", "allowed_ip=::/0"]
    assert _plan() == _plan() and _plan().families == (4, 6)
    assert kernel_peer(_plan().peers[0]) == {
        "public_key": PUB, "preshared_key": PSK, "endpoint_addr": "162.159.192.1",
        "endpoint_port": 2480, "persistent_keepalive": 25, "replace_allowed_ips": True,
        "allowed_ips": ["0.0.0.0/0", "::/0"]}


def test_uapi_replies() -> None:
    key = bytes(range(32, 64))
    pairs = parse_uapi(f"private_key={'00' * 32}\npublic_key={key.hex()}\n"
                       "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
                       "allowed_ip=0.0.0.0/0\nerrno=0\n\n".encode())
    assert handshake_times(pairs) == {PUB: 0}
    assert handshake_times([("public_key", key.hex()), ("last_handshake_time_sec", "17")]) \
        == {PUB: 17}
    with pytest.raises(UapiError):
        parse_uapi(b"errno=22\n\n")
    for bad in (b"errno=0\n", b"garbage\n\n", b"a=b\n\n"):
        with pytest.raises(ValueError):
            parse_uapi(bad)


@given(st.binary(max_size=200))
def test_uapi_parser_fails_only_with_value_error(data: bytes) -> None:
    try:
        parse_uapi(data)
    except ValueError:
        pass


def test_tunnel_dns_exchange() -> None:
    query = dns_query("www.wg.test", 4, 4242)
    parsed = DNSRecord.parse(query)
    assert parsed.header.id == 4242 and parsed.q.qtype == QTYPE.A
    reply = parsed.reply()
    reply.add_answer(RR("www.wg.test", QTYPE.A, rdata=A("10.99.0.1"), ttl=30))
    assert dns_answer(reply.pack(), 4242, 4) == ([ipaddress.ip_address("10.99.0.1")], 30)
    assert dns_answer(reply.pack(), 1, 4) is None  # not our query
    assert dns_answer(b"\x00", 4242, 4) is None
    refused = parsed.reply()
    refused.header.rcode = 5
    with pytest.raises(ValueError, match="REFUSED"):
        dns_answer(refused.pack(), 4242, 4)


def test_outbound_without_touching_the_kernel() -> None:
    cfg = parse_config(profile())
    out = WireguardOutbound.from_config(cfg.proxies[0], OutboundEnv(None, 255, 5.0))
    assert out.type == "WireGuard" and not out.carries_udp  # udp is off unless asked
    assert out.ifname == interface_name("wg") and out.families == {4}


def test_mirage_rules_shows_the_interface_without_its_keys() -> None:
    cfg = parse_config(profile(server="wg.example", **{"pre-shared-key": PSK}))
    text = render_plans(cfg.proxies, 255)
    name = interface_name("wg")
    assert f"ip link add {name} type wireguard" in text
    assert "endpoint wg.example:2480 allowed-ips 0.0.0.0/0" in text
    assert f"ip rule add oif {name} lookup {route_table(name)} priority 31900" in text
    assert f"ip rule add from 172.16.0.2 lookup {route_table(name)}" in text
    assert PRIV not in text and PSK not in text and "fwmark 0xff" in text
    assert render_plans(parse_config({**NO_DNS}).proxies, None) == ""


async def test_a_relay_hop_fails_with_the_reason_and_carries_no_udp() -> None:
    cfg = parse_config(profile(udp=True))
    hop = WireguardOutbound.from_config(cfg.proxies[0], OutboundEnv(None, None, 1.0))
    relayed = WireguardOutbound.from_config(cfg.proxies[0],
                                            OutboundEnv(None, None, 1.0, via=hop))
    assert hop.carries_udp and not relayed.carries_udp
    with pytest.raises(OutboundError, match="cannot be a later hop of a relay"):
        await relayed.connect_tcp("www.example.test", 80)
