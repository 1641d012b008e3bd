"""`type: ssh` at load: mihomo's keys, the key file and host keys checked
there (a key path and a reason, never the secret), what is skipped, and
the outbound it builds (no UDP, as mihomo's ssh)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.config.loader import ConfigError, parse_config
from appliance.config.protocols.ssh import SshOptions
from appliance.config.render import effective_config
from appliance.outbound.build import build_outbounds
from appliance.outbound.ssh import SshOutbound


def _profile(**proxy: Any) -> dict[str, Any]:
    entry = {"name": "s", "type": "ssh", "server": "ssh.example", "port": 22,
             "username": "u", **proxy}
    return {"dns": {"nameserver": ["https://192.0.2.53/dns-query"]},
            "proxies": [entry], "rules": ["MATCH,s"]}


def _key_pem(passphrase: bytes | None = None) -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH, enc).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def test_password_proxy_builds_an_outbound_without_udp() -> None:
    cfg = parse_config(_profile(password="pw", udp=True))
    p = cfg.proxies[0]
    assert isinstance(p.options, SshOptions) and p.options.password == "pw"
    out = build_outbounds(cfg, None)["s"]
    assert isinstance(out, SshOutbound) and out.carries_udp is False
    shown = effective_config(cfg, redact=True)["proxies"][0]
    assert shown["password"] == "<redacted>" and shown["username"] == "u"
    assert parse_config(effective_config(cfg, redact=False)) == cfg


def test_private_key_inline_or_from_a_file_relative_to_the_profile(tmp_path: Path) -> None:
    private, public = _key_pem(b"pp")
    cfg = parse_config(_profile(**{"private-key": private, "private-key-passphrase": "pp",
                                   "host-key": [public]}))
    assert isinstance(cfg.proxies[0].options, SshOptions)
    assert cfg.proxies[0].options.host_keys == (public,)
    assert effective_config(cfg, redact=True)["proxies"][0]["private-key"] == "<redacted>"
    (tmp_path / "id").write_text(private)
    cfg = parse_config(_profile(**{"private-key": "id", "private-key-passphrase": "pp"}),
                       source=tmp_path / "profile.yaml")
    options = cfg.proxies[0].options
    assert isinstance(options, SshOptions) and options.private_key == private
    assert options.private_key_source == str(tmp_path / "id")
    assert isinstance(build_outbounds(cfg, None)["s"], SshOutbound)


def test_a_key_that_does_not_load_is_a_config_error_without_the_key(tmp_path: Path) -> None:
    private, _ = _key_pem(b"right")
    with pytest.raises(ConfigError) as e:
        parse_config(_profile(**{"private-key": private, "private-key-passphrase": "wrong"}))
    assert e.value.path == "proxies[0].private-key"
    assert "not a usable private key" in str(e.value) and "PRIVATE" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read the key file") as e:
        parse_config(_profile(**{"private-key": str(tmp_path / "missing")}))
    # Neither: mihomo -t loads it (and fails when it dials); Mirage skips
    # the proxy at load, saying why.
    profile = _profile()
    profile["rules"] = ["MATCH,DIRECT"]
    cfg = parse_config(profile)
    (note,) = [n for n in cfg.load_notes if n.kind == "skipped" and n.path == "proxies[0]"]
    assert isinstance(note.error, ConfigError) and note.error.path == "proxies[0].password"
    assert "needs a password or a private-key" in note.error.reason and not cfg.proxies


def test_host_keys_and_algorithms() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_profile(password="pw", **{"host-key": ["ssh-ed25519 AAAA!!"]}))
    assert e.value.path == "proxies[0].host-key[0]"
    profile = _profile(password="pw", **{
        "host-key-algorithms": ["ssh-ed25519-cert-v01@openssh.com"]})
    profile["rules"] = ["MATCH,DIRECT"]
    cfg = parse_config(profile)
    assert cfg.proxies == ()
    assert any("ssh proxy 's': host-key-algorithms ssh-ed25519-cert-v01@openssh.com" in k
               for k in cfg.ignored_keys)
    cfg = parse_config(_profile(password="pw", **{
        "host-key-algorithms": ["rsa-sha2-256", "sk-ssh-ed25519@openssh.com"]}))
    assert isinstance(cfg.proxies[0].options, SshOptions)
    assert cfg.proxies[0].options.host_key_algorithms == ("rsa-sha2-256",)
    assert any("sk-ssh-ed25519@openssh.com not supported" in k for k in cfg.ignored_keys)


def test_snell_is_skipped_with_the_reason() -> None:
    profile = _profile(password="pw")
    profile["proxies"].append({"name": "sn", "type": "snell", "server": "s.example",
                              "port": 443, "psk": "k", "version": 4})
    profile["rules"] = ["MATCH,sn"]
    # It loads (the rule's flows go to COMPATIBLE, as mihomo's would to a
    # proxy it cannot use), and the skip says why.
    cfg = parse_config(profile)
    assert "sn" not in {p.name for p in cfg.proxies}
    (skip,) = [s for s in cfg.skipped if s.name == "sn"]
    assert "no Snell server to test" in skip.reason
