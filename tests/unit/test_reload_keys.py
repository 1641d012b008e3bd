"""Which changed keys a reload (SIGHUP) cannot apply and so names in a
WARNING (appliance/app.py `restart_keys`). No services."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from appliance.app import restart_keys
from appliance.config.model import ApplianceConfig, Config


def test_unchanged_config_needs_no_restart() -> None:
    assert restart_keys(Config(), Config(), proxy_ports_live=True) == []


def test_ports_and_listen_addresses_are_named_each() -> None:
    old = Config(mixed_port=7890, tproxy_port=7893)
    new = replace(old, mixed_port=7990, tproxy_port=7993, socks_port=1080)
    assert restart_keys(old, new, proxy_ports_live=True) == [
        "tproxy-port", "mixed-port", "socks-port"]


def test_proxy_port_keys_are_live_while_the_proxy_ports_run() -> None:
    old = Config(mixed_port=7890)
    new = replace(old, allow_lan=False, bind_address="192.168.56.1",
                  authentication=(("u", "p"),))
    assert restart_keys(old, new, proxy_ports_live=True) == []
    # Without running proxy ports there is nothing to apply them to.
    assert restart_keys(old, new, proxy_ports_live=False) == [
        "authentication", "allow-lan", "bind-address"]


def test_appliance_fields_are_named_by_their_config_key() -> None:
    old = Config()
    new = replace(old, appliance=ApplianceConfig(idle_timeout=60.0,
                                                 state_dir=Path("/tmp/elsewhere")))
    assert restart_keys(old, new, proxy_ports_live=True) == [
        "appliance.state-dir", "appliance.idle-timeout"]
