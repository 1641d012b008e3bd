"""The proxy ports: `mixed-port` (SOCKS5 and HTTP proxy on one port),
`socks-port` (SOCKS5 only) and `port` (HTTP proxy only), as in Clash.

What this is for: clients that are configured to use a proxy (browsers,
`curl -x`, apps with a SOCKS setting) instead of being captured
transparently. Their flows take the same path as captured ones: the target
(a name, a real IP, or a fake IP that the client resolved through Mirage and
that the pool maps back to its name) becomes a `Flow` (inbound `mixed`,
`socks` or `http`) that goes through `dial` (the dispatcher's
`connect_tcp`: rules -> outbound), then `splice`, and shows up in the same
`FlowRegistry` (so in the control API's /connections). That is why this package lives in
`appliance.gateway`: it is the gateway's third way in, next to the
transparent TCP listener (tcp.py) and UDP socket (udp.py), and shares their
accept loop, splice, flow registry and pool pins; only the first bytes of
a connection (the handshake) differ.

The parts, each usable alone:

- `handshake`: sniffing (first byte), SOCKS5 and HTTP proxy handshakes and
  authentication, without I/O: bytes in, events out (`Ask`, `UdpAssociate`,
  `Refuse`, `NeedMore`), over the protocol cores in appliance/proto/;
- appliance/proto/http_proxy.py: the forward-proxy logic (origin-form
  rewrite, hop-by-hop headers, request body framing, error responses);
- `target`: a requested host -> `Flow` (fake IP -> pinned name);
- `bind`: where to listen (LAN interfaces' addresses and loopback only);
- `service`: the trio service (listeners, one task per connection, limits,
  dial and splice), and `forward`, the one-request relay of the forward
  proxy;
- `udp_relay`: UDP ASSOCIATE, one relay per association.

Where it listens (the appliance never serves the WAN side): the addresses of
the `appliance.lan` interfaces, read at start and at each reload, plus 127.0.0.1 and ::1; with
no LAN interfaces (a plain host) or `allow-lan: false`, loopback only. A
`bind-address` other than `*` narrows the LAN side to that one address and
must be one of the LAN interfaces' addresses.

What a reload (SIGHUP) changes here, at once (`ProxyPorts.reconfigure`):
`authentication` for new connections, and the listeners `allow-lan` and
`bind-address` now ask for (the LAN interfaces' addresses read again);
connections already accepted go on. The ports themselves need a restart.

How it fails: per connection, never for the port (see `service`). Binding
fails the service at start (OSError or ProxyPortError) so the app can say
which key is wrong; at a reload, a listener that cannot be bound is logged
at ERROR and the others keep serving.
"""

from appliance.gateway.proxyport.bind import (
    BindAddress,
    ListenerChanges,
    ProxyPortError,
    choose_bind_addresses,
    lan_addresses,
    listener_changes,
)
from appliance.gateway.proxyport.handshake import Authenticator, Handshake, sniff
from appliance.gateway.proxyport.service import (
    Limits,
    ProxyPort,
    ProxyPorts,
    proxy_ports,
    serve,
)
from appliance.gateway.proxyport.udp_relay import OpenUdp

__all__ = [
    "Authenticator",
    "BindAddress",
    "Handshake",
    "Limits",
    "ListenerChanges",
    "OpenUdp",
    "ProxyPort",
    "ProxyPortError",
    "ProxyPorts",
    "choose_bind_addresses",
    "lan_addresses",
    "listener_changes",
    "proxy_ports",
    "serve",
    "sniff",
]
