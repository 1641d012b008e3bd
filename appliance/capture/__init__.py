"""Capture: steer LAN traffic for fake IPs (and DNS) to Mirage's local sockets.

Backends: `nftables` (renders nft/mirage.nft into one table Mirage owns,
TPROXY) and the eBPF one (tc program in bpf/, sk_assign). Both rely on
`routing.PolicyRouting` (fwmark rule + local default route) to deliver the
captured packets locally.
"""
