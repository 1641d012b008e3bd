"""Share links and subscription content -> proxy mappings, and on through
the profile's proxy loader (appliance/providers/)."""

from __future__ import annotations

import base64
import json

import pytest

from appliance.config.model import MemberFilter, ProviderOverride, ProxyProviderConfig
from appliance.providers.proxies import parse_provided
from appliance.providers.share_links import decode_subscription, parse_link, parse_share_links

# SIP002's own examples (shadowsocks.org/doc/sip002.html).
SIP002 = "ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888#Example1"
SIP002_PLUGIN = ("ss://cmM0LW1kNTpwYXNzd2Q@192.168.100.1:8888/?plugin=obfs-local%3Bobfs%3Dhttp"
                 "#Example2")
SIP022 = ("ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D"
          "@192.168.100.1:8888#Example3")
# The legacy form: everything base64, the name after '#'.
LEGACY_SS = "ss://" + base64.b64encode(b"aes-256-gcm:pa:ss@198.51.100.7:8388").decode() + "#old"
# v2rayN's documented example (its wiki, share link format ver 2).
VMESS_JSON = {"v": "2", "ps": "remark", "add": "111.111.111.111", "port": "32000",
              "id": "1386f85e-657b-4d6e-9d56-78badb75e1fd", "aid": "100", "scy": "zero",
              "net": "ws", "type": "none", "host": "www.bbb.com", "path": "/ws?ed=2048",
              "tls": "tls", "sni": "www.ccc.com", "alpn": "h2,http/1.1"}
VMESS = "vmess://" + base64.b64encode(json.dumps(VMESS_JSON).encode()).decode()
VLESS = ("vless://b831381d-6324-4d53-ad4f-8cda48b30811@example.com:443?encryption=none"
         "&security=tls&sni=example.com&type=ws&host=example.com&path=%2Fws&fp=firefox"
         "#VLESS%20WS")
TROJAN = "trojan://pass%40word@tj.example.net:443?sni=tj.example.net&allowInsecure=1#Trojan"
# The hysteria 2 docs' URI example.
HY2 = ("hysteria2://letmein@example.com:8443/?insecure=1&obfs=salamander"
       "&obfs-password=gawrgura&pinSHA256=deadbeef&sni=real.example.com#hy2")
TUIC = ("tuic://0ee5a3a2-2f4c-4b43-a8f8-3c1d1f8d8c8a:pw@tu.example.com:443"
        "?congestion_control=bbr&alpn=h3&sni=tu.example.com&udp_relay_mode=native#tuic")


def test_ss_links_every_form() -> None:
    assert parse_link(SIP002) == {
        "name": "Example1", "type": "ss", "server": "192.168.100.1", "port": 8888,
        "cipher": "aes-128-gcm", "password": "test", "udp": True}
    plugin = parse_link(SIP002_PLUGIN)
    assert (plugin["cipher"], plugin["password"]) == ("rc4-md5", "passwd")
    assert plugin["plugin"] == "obfs" and plugin["plugin-opts"] == {"mode": "http", "host": ""}
    plain = parse_link(SIP022)
    assert plain["cipher"] == "2022-blake3-aes-256-gcm"
    assert plain["password"] == "YctPZ6U7xPPcU+gp3u+0tx/tRizJN9K8y+uKlW2qjlI="
    old = parse_link(LEGACY_SS)
    assert (old["name"], old["server"], old["port"]) == ("old", "198.51.100.7", 8388)
    assert (old["cipher"], old["password"]) == ("aes-256-gcm", "pa:ss")


def test_vmess_vless_trojan_hy2_tuic() -> None:
    vmess = parse_link(VMESS)
    assert (vmess["name"], vmess["server"], vmess["port"]) == ("remark", "111.111.111.111", 32000)
    assert vmess["uuid"] == VMESS_JSON["id"] and vmess["alterId"] == 100
    assert vmess["tls"] is True and vmess["servername"] == "www.ccc.com"
    assert vmess["alpn"] == ["h2", "http/1.1"] and vmess["cipher"] == "zero"
    assert vmess["ws-opts"] == {"path": "/ws", "headers": {"Host": "www.bbb.com"},
                                "max-early-data": 2048,
                                "early-data-header-name": "Sec-WebSocket-Protocol"}
    vless = parse_link(VLESS)
    assert (vless["name"], vless["network"], vless["servername"]) == ("VLESS WS", "ws",
                                                                       "example.com")
    assert vless["tls"] is True and vless["client-fingerprint"] == "firefox"
    assert vless["ws-opts"]["path"] == "/ws"
    trojan = parse_link(TROJAN)
    assert trojan["password"] == "pass@word" and trojan["skip-cert-verify"] is True
    assert trojan["sni"] == "tj.example.net"
    hy2 = parse_link(HY2)
    assert (hy2["type"], hy2["password"], hy2["port"]) == ("hysteria2", "letmein", 8443)
    assert (hy2["obfs"], hy2["obfs-password"], hy2["fingerprint"]) == (
        "salamander", "gawrgura", "deadbeef")
    assert parse_link("hy2://pw@h.example.com#x")["port"] == 443
    tuic = parse_link(TUIC)
    assert (tuic["uuid"], tuic["password"]) == ("0ee5a3a2-2f4c-4b43-a8f8-3c1d1f8d8c8a", "pw")
    assert (tuic["congestion-controller"], tuic["udp-relay-mode"]) == ("bbr", "native")


def test_subscription_base64_plain_and_yaml_agree() -> None:
    links = "\n".join([SIP002, TROJAN, "not a link", SIP002, HY2]) + "\n"
    expected = parse_share_links(links)
    # Duplicate names get mihomo's suffix.
    assert [p["name"] for p in expected] == ["Example1", "Trojan", "Example1-01", "hy2"]
    for body in (links.encode(), base64.b64encode(links.encode()),
                 base64.urlsafe_b64encode(links.encode()).rstrip(b"=")):
        assert decode_subscription(body) == expected
    yaml_body = b"proxies:\n  - {name: a, type: socks5, server: 192.0.2.1, port: 1080}\n"
    assert decode_subscription(yaml_body) == [
        {"name": "a", "type": "socks5", "server": "192.0.2.1", "port": 1080}]
    with pytest.raises(ValueError):
        decode_subscription(b"<html>login</html>")


def test_provider_content_goes_through_the_proxy_loader() -> None:
    links = "\n".join([SIP002, SIP002_PLUGIN, TROJAN, LEGACY_SS, TUIC])
    cfg = ProxyProviderConfig(
        name="sub", type="inline",
        filter=MemberFilter(exclude_filter="^Trojan$"),
        override=ProviderOverride(additional_prefix="[S] ", udp=False,
                                  proxy_name=(("Example", "Ex"),)))
    got = parse_provided(base64.b64encode(links.encode()), cfg)
    names = [p.name for p in got.proxies]
    assert names == ["[S] Ex1", "[S] old"]
    assert all(not p.udp for p in got.proxies)
    # Skipped with the profile loader's reason, under the overridden name.
    assert "plugin" in got.skipped["[S] Ex2"]
    assert "tuic" in got.skipped["[S] tuic"]
    with pytest.raises(ValueError):
        parse_provided(b"proxies: []\n", cfg)
