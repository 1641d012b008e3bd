"""Where the proxy ports listen and which ones `cfg` asks for
(appliance/gateway/proxyport/bind.py, service.proxy_ports), and their
config keys. No sockets."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.config import ConfigError, parse_config
from appliance.config.model import Config
from appliance.gateway.proxyport import (
    BindAddress,
    ProxyPort,
    ProxyPortError,
    choose_bind_addresses,
    listener_changes,
    proxy_ports,
)

# ------------------------------------------------------------------- where to listen

LAN = [BindAddress("192.168.56.1"), BindAddress("fd56::1"), BindAddress("fe80::1", 3)]


def test_bind_lan_and_loopback_only() -> None:
    got = choose_bind_addresses(LAN)
    assert [a.host for a in got] == ["127.0.0.1", "::1", "192.168.56.1", "fd56::1", "fe80::1"]
    assert got[-1].sockaddr(7890) == ("fe80::1", 7890, 0, 3)
    # A plain host (no appliance.lan) and allow-lan: false: loopback only.
    assert [a.host for a in choose_bind_addresses([])] == ["127.0.0.1", "::1"]
    assert [a.host for a in choose_bind_addresses(LAN, allow_lan=False)] == ["127.0.0.1", "::1"]


def test_bind_address_must_be_on_the_lan() -> None:
    got = choose_bind_addresses(LAN, bind_address="192.168.56.1")
    assert [a.host for a in got] == ["127.0.0.1", "::1", "192.168.56.1"]
    with pytest.raises(ProxyPortError, match="LAN side only"):
        choose_bind_addresses(LAN, bind_address="192.168.57.1")  # the WAN address
    with pytest.raises(ProxyPortError):
        choose_bind_addresses(LAN, bind_address="not-an-ip")


def test_proxy_ports_from_config() -> None:
    assert proxy_ports(Config()) == []
    ports = proxy_ports(Config(mixed_port=7890, socks_port=7891, http_port=7892))
    assert ports == [
        ProxyPort("mixed-port", 7890, socks=True, http=True),
        ProxyPort("socks-port", 7891, socks=True, http=False),
        ProxyPort("port", 7892, socks=False, http=True),
    ]


NO_DNS = {"dns": {"enable": False}}


def test_config_keys() -> None:
    cfg = parse_config(
        {
            "mixed-port": 7890,
            "socks-port": 7891,
            "port": 7892,
            "authentication": ["alice:s3:cret", "bob:pw"],
            "allow-lan": False,
            "bind-address": "[fd56::1]",
            **NO_DNS,
        }
    )
    assert (cfg.mixed_port, cfg.socks_port, cfg.http_port) == (7890, 7891, 7892)
    assert cfg.authentication == (("alice", "s3:cret"), ("bob", "pw"))
    assert (cfg.allow_lan, cfg.bind_address) == (False, "fd56::1")
    assert "port" not in cfg.ignored_keys and "authentication" not in cfg.ignored_keys
    # Defaults: every LAN address, no auth, port 0 means off.
    cfg = parse_config({"socks-port": 0, **NO_DNS})
    assert (cfg.socks_port, cfg.authentication, cfg.allow_lan, cfg.bind_address) == (
        None,
        (),
        True,
        "*",
    )


def test_an_authentication_entry_without_a_colon_adds_no_user() -> None:
    # mihomo drops it (the templates' `- ""` placeholder): no user, no
    # authentication asked; said at load, without the entry's text.
    cfg = parse_config({"authentication": ["", "sEcr3t", "bob:pw"], **NO_DNS})
    assert cfg.authentication == (("bob", "pw"),)
    skipped = [n for n in cfg.load_notes if n.kind == "skipped"]
    assert [n.path for n in skipped] == ["authentication[0]", "authentication[1]"]
    assert "sEcr3t" not in repr(cfg.load_notes) + repr(cfg.ignored_keys)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"authentication": ["user:"]}, "authentication[0]"),
        ({"authentication": [":pw"]}, "authentication[0]"),
        ({"authentication": ["a:1", "a:2"]}, "authentication[1]"),
        ({"authentication": "a:b"}, "authentication"),
        ({"bind-address": "lan0"}, "bind-address"),
        ({"mixed-port": 7890, "port": 7890}, "port"),
        ({"socks-port": 70000}, "socks-port"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({**data, **NO_DNS})
    assert exc.value.path == path


# ------------------------------------------------------------------- what a reload moves


def test_listener_changes_close_what_is_no_longer_wanted_and_open_what_is() -> None:
    lo, lan = BindAddress("127.0.0.1"), BindAddress("192.168.56.1")
    keys = ["mixed-port", "socks-port"]
    listening = [(k, a) for k in keys for a in (lo, BindAddress("::1"), lan)]
    # allow-lan: true -> false: the LAN address closes on every port, nothing opens.
    off = listener_changes(listening, keys, choose_bind_addresses([lan], allow_lan=False))
    assert off.close == (("mixed-port", lan), ("socks-port", lan)) and off.open == ()
    # ... and back: it opens again.
    now = [k for k in listening if k not in off.close]
    on = listener_changes(now, keys, choose_bind_addresses([lan]))
    assert on.open == (("mixed-port", lan), ("socks-port", lan)) and on.close == ()
    # Nothing changed: nothing moves.
    assert not listener_changes(listening, keys, choose_bind_addresses([lan]))
