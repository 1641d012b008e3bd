"""The gateway: where captured flows are accepted and relayed.

`tcp` is the transparent TCP listener (tproxy-port): original destination ->
pinned fake-IP domain -> `dial` (routing + outbound, supplied by the app) ->
`splice`. `splice` relays both directions (zero-copy between plain sockets)
and keeps the `FlowRegistry` of live flows and byte counters. `udp` is the
transparent UDP socket and its sessions. `proxyport` is the third way in:
the proxy ports (mixed-port, socks-port, port) for clients configured to
use a proxy, whose flows then take the same path (`dial`, `splice`, the
same registry).
"""
