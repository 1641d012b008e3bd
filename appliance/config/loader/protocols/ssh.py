"""`type: ssh` (mihomo adapter/outbound/ssh.go): `username`, `password`,
`private-key` (the key itself when it contains "PRIVATE KEY", else a file,
relative to the profile), `private-key-passphrase`, `host-key` (a list of
authorized_keys lines) and `host-key-algorithms`.

Everything that can be checked is checked here, so a key that does not
load (wrong passphrase, unknown format) or a host key that does not parse
is a ConfigError with its key path, never a flow-time failure. A
`host-key-algorithms` entry Mirage's SSH client does not implement (the
certificate and security-key kinds) is listed as ignored; when none of
them is left, the proxy is unusable (skipped with the reason). mihomo's
ssh carries no UDP: `udp: true` is read and has no effect (the outbound
says carries_udp False).
"""

from __future__ import annotations

from typing import Any

from appliance.config.loader.errors import NO_VALUE, ConfigError
from appliance.config.loader.protocols import ProtocolSpec, UnusableProxy
from appliance.config.loader.scalars import as_list, as_nonempty_str, as_path, as_str
from appliance.config.loader.section import Section
from appliance.config.protocols import ProtocolOptions
from appliance.config.protocols.ssh import SshOptions
from appliance.proto.ssh import HOST_KEY_ALGORITHMS, load_private_key, public_key_blob

KEYS = ("username", "password", "private-key", "private-key-passphrase", "host-key",
        "host-key-algorithms")


def _str_list(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(as_nonempty_str(v, f"{path}[{i}]") for i, v in enumerate(as_list(value, path)))


def _host_keys(value: Any, path: str) -> tuple[str, ...]:
    lines = _str_list(value, path)
    for i, line in enumerate(lines):
        try:
            public_key_blob(line)
        except ValueError as e:
            raise ConfigError(f"{path}[{i}]", line, f"an SSH public key line: {e}") from None
    return lines


def _algorithms(sec: Section) -> tuple[str, ...]:
    """`host-key-algorithms`: the ones the client speaks; the rest are
    noted (and when none is left, the proxy cannot be used)."""
    names: tuple[str, ...] = sec.get("host-key-algorithms", _str_list, ())
    known = tuple(n for n in names if n in HOST_KEY_ALGORITHMS)
    unknown = [n for n in names if n not in HOST_KEY_ALGORITHMS]
    if unknown and not known:
        raise UnusableProxy(f"host-key-algorithms {', '.join(unknown)} (Mirage's SSH client "
                            f"speaks {', '.join(HOST_KEY_ALGORITHMS)})")
    if unknown:
        sec.ctx.ignore(sec.at("host-key-algorithms"),
                       f"{', '.join(unknown)} not supported; offering {', '.join(known)}")
    return known


def parse(sec: Section) -> SshOptions:
    """mihomo reads the host keys and the private key when it loads the
    profile and refuses the profile if one does not parse (checked with
    `mihomo -t`): so does Mirage."""
    username = sec.require("username", as_nonempty_str)
    password = sec.get("password", as_str, "") or None
    passphrase = sec.get("private-key-passphrase", as_str, "") or None
    raw_key = sec.get("private-key", as_nonempty_str, None)
    key_text = source = None
    if raw_key is not None:
        path = sec.at("private-key")
        if "PRIVATE KEY" in raw_key:
            key_text = raw_key
        else:
            file = as_path(raw_key, path, sec.ctx.base)
            try:
                key_text = file.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(path, raw_key, f"cannot read the key file: {e}") from None
            source = str(file)
        try:
            load_private_key(key_text.encode(), passphrase)
        except ValueError as e:
            # Never the key itself in the message: it is a secret.
            raise ConfigError(path, source if source else NO_VALUE,
                              f"not a usable private key: {e}") from None
        except Exception as e:  # cryptography's UnsupportedAlgorithm and friends
            raise ConfigError(path, source if source else NO_VALUE,
                              f"not a usable private key: {e}") from None
    if password is None and key_text is None:
        raise ConfigError(sec.at("password"), NO_VALUE,
                          "an ssh proxy needs a password or a private-key")
    return SshOptions(
        username=username, password=password, private_key=key_text,
        private_key_source=source, private_key_passphrase=passphrase,
        host_keys=sec.get("host-key", _host_keys, ()),
        host_key_algorithms=_algorithms(sec),
    )


def render(options: ProtocolOptions, redact: bool) -> dict[str, Any]:
    assert isinstance(options, SshOptions)
    out: dict[str, Any] = {"username": options.username}
    if options.password is not None:
        out["password"] = "<redacted>" if redact else options.password
    if options.private_key is not None:
        out["private-key"] = options.private_key_source or (
            "<redacted>" if redact else options.private_key)
    if options.private_key_passphrase is not None:
        out["private-key-passphrase"] = "<redacted>" if redact \
            else options.private_key_passphrase
    if options.host_keys:
        out["host-key"] = list(options.host_keys)
    if options.host_key_algorithms:
        out["host-key-algorithms"] = list(options.host_key_algorithms)
    return out


SPEC: ProtocolSpec = ProtocolSpec(parse=parse, render=render, keys=KEYS)
