"""Capture: steer LAN traffic for fake IPs (and DNS) to Mirage's local sockets.

- `spec`: what the config asks of any capture (`CaptureSpec`: LAN
  interfaces, fake ranges in effect, bypass lists, marks, ports, DNS
  hijack target) and `CaptureError`; pure.
- `routing`: the policy routing both backends need (fwmark rule + local
  default route) to deliver captured packets locally.
- `nftables`: the nftables backend (nft/mirage.nft, one table Mirage owns,
  TPROXY).
- `ebpf/`: the eBPF backend (bpf/mirage_tc.c on tc ingress, sk_assign), one
  module per layer.
- `offload`: the DIRECT offload's map elements in the nftables table.
- `backend`: chooses the backend from `appliance.redirect` and holds it as
  a service.
"""
