"""The eBPF capture plan: config -> compile flags, bypass trie, `mirage rules` text.

Pure: no compiler, no kernel. The program itself is tested under
BPF_PROG_TEST_RUN (tests/integration/test_ebpf_prog.py) and end to end
(tests/integration/test_ebpf_e2e.py).
"""

from __future__ import annotations

import ipaddress
import re
import struct
import sys
from typing import Any

import pytest

from appliance.capture import ebpf
from appliance.capture.backend import render_plan
from appliance.capture.spec import CaptureError
from appliance.config.model import ApplianceConfig, Config, DnsConfig, Listen


def make_cfg(**kw: Any) -> Config:
    app_kw = {"redirect": "ebpf", **kw.pop("app", {})}
    dns_kw = kw.pop("dns", {})
    base: dict[str, Any] = {
        "tproxy_port": 7893,
        "routing_mark": 0xFF,
        "dns": DnsConfig(**dns_kw),
        "appliance": ApplianceConfig(lan=("lan0", "lan1"), **app_kw),
    }
    base.update(kw)
    return Config(**base)


def defines(p: ebpf.Plan) -> dict[str, str]:
    out = {}
    for f in p.cflags:
        if f.startswith("-D"):
            name, _, value = f[2:].partition("=")
            out[name] = value
    return out


def native(addr: str) -> int:
    """What the program reads from a packet holding `addr` (a u32 load)."""
    return int(struct.unpack("=I", ipaddress.IPv4Address(addr).packed)[0])


def test_stat_names_follow_the_c_enum() -> None:
    text = (ebpf.BPF_DIR / "lib" / "stats.h").read_text()
    names = re.findall(r"^\s*MIRAGE_ST_(\w+)", text, re.M)
    assert names[-1] == "MAX"
    assert [n.lower() for n in names[:-1]] == list(ebpf.STAT_NAMES)


def test_every_define_is_used_by_the_c_source() -> None:
    cfg = make_cfg(ipv6=True, dns={"listen": Listen("::", 53), "ipv6": True,
                                   "fake_ip_range6": ipaddress.IPv6Network("fd00:18::/64")})
    source = "".join(p.read_text() for p in ebpf.BPF_DIR.rglob("*.[ch]"))
    for name in defines(ebpf.plan(cfg)):
        assert name in source, name


def test_default_config_flags() -> None:
    d = defines(ebpf.plan(make_cfg()))
    assert d["MIRAGE_CAPTURE_MARK"] == "0x233"
    assert d["MIRAGE_ROUTING_MARK"] == "0xff"
    assert d["MIRAGE_TPROXY_PORT"] == "7893"
    assert int(d["MIRAGE_FAKE4_NET"], 16) == native("198.18.0.0")
    assert int(d["MIRAGE_FAKE4_MASK"], 16) == native("255.255.0.0")
    if sys.byteorder == "little":
        assert d["MIRAGE_FAKE4_NET"] == "0x12c6"
    # dns.listen 0.0.0.0:53: the DNS service binds the dual-stack wildcard,
    # so IPv6 resolvers are hijacked too, whatever `ipv6` says (IPv6 parsed
    # for it); no IPv6 fake range.
    assert d["MIRAGE_DNS_PORT"] == "53" and d["MIRAGE_DNS4_ADDR"] == "0x0"
    assert "MIRAGE_IPV6" in d and "MIRAGE_DNS6" in d and "MIRAGE_FAKE6" not in d
    d = defines(ebpf.plan(make_cfg(app={"dns_hijack": False})))
    assert "MIRAGE_IPV6" not in d


def test_ipv6_flags() -> None:
    cfg = make_cfg(ipv6=True, dns={"listen": Listen("::", 1053), "ipv6": True,
                                   "fake_ip_range6": ipaddress.IPv6Network("fd00:18::/64")})
    d = defines(ebpf.plan(cfg))
    assert "MIRAGE_IPV6" in d and "MIRAGE_FAKE6" in d
    net = ipaddress.IPv6Address("fd00:18::").packed
    mask = ipaddress.IPv6Network("fd00:18::/64").netmask.packed
    for i in range(4):
        assert int(d[f"MIRAGE_FAKE6_A{i}"], 16) == struct.unpack("=I", net[i * 4:i * 4 + 4])[0]
        assert int(d[f"MIRAGE_FAKE6_M{i}"], 16) == struct.unpack("=I", mask[i * 4:i * 4 + 4])[0]
    # "::" is dual-stack: IPv4 queries go to it through the IPv4 wildcard.
    assert d["MIRAGE_DNS4_ADDR"] == "0x0" and "MIRAGE_DNS6" in d
    assert d["MIRAGE_DNS_PORT"] == "1053"


@pytest.mark.parametrize(
    ("listen", "ipv6", "v4", "v6"),
    [
        ("0.0.0.0", True, True, True),
        ("0.0.0.0", False, True, True),
        ("::", False, True, True),
        ("192.168.56.1", True, True, False),
        ("fd56::1", True, False, True),
        ("fd56::1", False, False, True),
    ],
)
def test_dns_hijack_families(listen: str, ipv6: bool, v4: bool, v6: bool) -> None:
    d = defines(ebpf.plan(make_cfg(ipv6=ipv6, dns={"listen": Listen(listen, 53)})))
    assert ("MIRAGE_DNS4" in d) is v4
    assert ("MIRAGE_DNS6" in d) is v6
    if listen == "192.168.56.1":
        assert int(d["MIRAGE_DNS4_ADDR"], 16) == native(listen)


def test_no_dns_flags_without_hijack() -> None:
    d = defines(ebpf.plan(make_cfg(app={"dns_hijack": False})))
    assert not any(k.startswith("MIRAGE_DNS") for k in d)
    d = defines(ebpf.plan(make_cfg(dns={"enable": False})))
    assert not any(k.startswith("MIRAGE_DNS") for k in d)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (make_cfg(tproxy_port=None), "tproxy-port"),
        (make_cfg(routing_mark=0x233), "capture mark"),
        (make_cfg(dns={"listen": Listen("127.0.0.1", 53)}), "loopback"),
    ],
)
def test_refused_configs(cfg: Config, message: str) -> None:
    with pytest.raises(CaptureError, match=message):
        ebpf.plan(cfg)


def test_bypass_trie_entries() -> None:
    user = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    p = ebpf.plan(make_cfg(app={"bypass": user}))
    assert ipaddress.ip_network("10.0.0.0/8") in p.bypass
    assert ipaddress.ip_network("127.0.0.0/8") in p.bypass
    # IPv6 off, but IPv6 DNS hijacked: the program parses IPv6 for it, and
    # the IPv6 bypass applies to it.
    assert ipaddress.ip_network("fd00::/8") in p.bypass
    # IPv6 off and no hijack: IPv6 passes untouched, no IPv6 entries; said so.
    p = ebpf.plan(make_cfg(app={"bypass": user, "dns_hijack": False}))
    assert not any(n.version == 6 for n in p.bypass)
    assert any("IPv6 bypass" in n for n in p.notes)
    p6 = ebpf.plan(make_cfg(ipv6=True, app={"bypass": user}))
    assert ipaddress.ip_network("fd00::/8") in p6.bypass
    assert ipaddress.ip_network("fe80::/10") in p6.bypass


def test_trie_keys_are_ipv4_mapped() -> None:
    plen, words = ebpf.trie_key(ipaddress.ip_network("10.1.0.0/16"))
    assert plen == 112
    raw = b"".join(struct.pack("=I", w) for w in words)
    assert ipaddress.IPv6Address(raw) == ipaddress.IPv6Address("::ffff:10.1.0.0")
    plen, words = ebpf.trie_key(ipaddress.ip_network("fd00::/8"))
    assert plen == 8


def test_too_many_bypass_entries() -> None:
    many = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(1100))
    with pytest.raises(CaptureError, match="at most"):
        ebpf.plan(make_cfg(app={"bypass": many}))


def test_rules_text_for_each_mode() -> None:
    text = render_plan(make_cfg())
    assert "no nftables rule" in text and "tproxy ip" not in text
    assert "tc qdisc add dev lan0 clsact" in text
    assert "tc qdisc add dev lan1 clsact" in text
    assert f"pref {ebpf.FILTER_PREF}" in text
    assert "ip rule add fwmark 0x233 lookup 233" in text
    assert "-DMIRAGE_TPROXY_PORT=7893" in text
    nft = render_plan(make_cfg(app={"redirect": "nftables"}))
    assert "table inet mirage" in nft and "tproxy ip" in nft and "clsact" not in nft
    auto = render_plan(make_cfg(app={"redirect": "auto"}))
    assert auto.index("clsact") < auto.index("Fallback") < auto.index("tproxy ip")
