"""The shared proxy-protocol plumbing: a registered type's common keys,
TLS and transport options are read once, for every protocol, and render
back to an equal config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from appliance.config.loader import parse_config
from appliance.config.loader.protocols import PROTOCOLS, ProtocolSpec
from appliance.config.loader.scalars import as_nonempty_str
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.render import effective_config
from tests.config_problem import reported


@dataclass(frozen=True)
class EchoOptions(ProtocolOptions):
    secret: str


def _parse(sec: Section) -> ProtocolOptions:
    return EchoOptions(secret=sec.require("secret", as_nonempty_str))


def _render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, EchoOptions)
    return {"secret": "<redacted>" if redact else options.secret}


@pytest.fixture
def echo_type(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ProtocolSpec(_parse, _render, keys=("secret",), tls="optional",
                        sni_key="servername", networks=("tcp", "ws", "grpc"))
    monkeypatch.setitem(PROTOCOLS, "echo-test", spec)


def _profile(**extra: Any) -> dict[str, Any]:
    proxy = {"name": "e", "type": "echo-test", "server": "proxy.example", "port": 443,
             "secret": "s3", **extra}
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]},
            "proxies": [proxy], "rules": ["MATCH,e"]}


def test_common_tls_and_transport_keys_are_read_for_a_registered_type(echo_type: None) -> None:
    cfg = parse_config(_profile(
        tls=True, servername="front.example", alpn=["h2"], udp=True,
        network="ws", **{"ws-opts": {"path": "/t", "headers": {"Host": "cdn.example"},
                                     "max-early-data": 2048},
                         "dialer-proxy": "e2", "ip-version": "ipv4", "tfo": True}))
    p = cfg.proxies[0]
    assert isinstance(p.options, EchoOptions) and p.options.secret == "s3"
    assert p.udp and p.dialer_proxy == "e2" and p.ip_version == "ipv4"
    assert p.tls_options is not None and p.tls_options.sni == "front.example"
    assert p.tls_options.alpn == ("h2",)
    assert p.transport is not None and p.transport.network == "ws"
    assert p.transport.ws is not None and p.transport.ws.path == "/t"
    assert p.transport.ws.headers == (("Host", "cdn.example"),)
    assert p.transport.ws.max_early_data == 2048


def test_tls_off_and_a_network_the_type_does_not_take(echo_type: None) -> None:
    p = parse_config(_profile()).proxies[0]
    assert p.tls_options is None and p.transport is not None and p.transport.network == "tcp"
    assert reported(_profile(network="h2")).path == "proxies[0].network"


def test_a_bad_fingerprint_names_its_key(echo_type: None) -> None:
    assert reported(_profile(tls=True, fingerprint="abc")).path == "proxies[0].fingerprint"


def test_render_round_trips_and_redacts(echo_type: None) -> None:
    cfg = parse_config(_profile(tls=True, network="grpc",
                                **{"grpc-opts": {"grpc-service-name": "tun"}}))
    assert parse_config(effective_config(cfg, redact=False)) == cfg
    shown = effective_config(cfg, redact=True)
    assert shown["proxies"][0]["secret"] == "<redacted>"
