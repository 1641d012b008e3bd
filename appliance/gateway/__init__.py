"""The gateway: where captured flows are accepted and relayed.

`tcp` is the transparent TCP listener (tproxy-port): original destination ->
pinned fake-IP domain -> `dial` (routing + outbound, supplied by the app) ->
`splice`. `splice` relays both directions (zero-copy between plain sockets)
and keeps the `FlowRegistry` of live flows and byte counters.
"""
