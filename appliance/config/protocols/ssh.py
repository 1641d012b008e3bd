"""SSH's own options (mihomo `type: ssh`, adapter/outbound/ssh.go): flows
are `direct-tcpip` channels over one SSH connection per proxy."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config.protocols import ProtocolOptions


@dataclass(frozen=True)
class SshOptions(ProtocolOptions):
    """`username`; `password` and/or `private_key` (the key's text, read
    from `private-key` inline or from its file at load, and checked there
    with `private-key-passphrase`); `host_keys`: key blobs of `host-key`
    (authorized_keys lines) the server's key must be one of (empty: any,
    as mihomo); `host_key_algorithms` offered (empty: all supported)."""

    username: str
    password: str | None = None
    private_key: str | None = None
    private_key_source: str | None = None  # the path it was read from, or None: inline
    private_key_passphrase: str | None = None
    host_keys: tuple[str, ...] = ()
    host_key_algorithms: tuple[str, ...] = ()
