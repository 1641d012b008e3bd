"""The options of the proxy protocols, as the loader hands them to outbounds.

A proxy entry becomes a `ProxyConfig` (appliance/config/model.py): the
fields every proxy has (name, type, server, port, udp, `dialer-proxy`,
`ip-version`), the shared TLS and transport layers (`common`: `TlsOptions`,
`TransportOptions`) and `options`, the protocol's own keys as one frozen
`ProtocolOptions` subclass defined in this package, one module per protocol
(its parser is the module of the same name under appliance/config/loader/
protocols/, registered there in `PROTOCOLS`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProtocolOptions:
    """Base of one protocol's own options (a frozen dataclass per protocol;
    its outbound narrows `ProxyConfig.options` with isinstance)."""
