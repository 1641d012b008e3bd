"""SOCKS5 UDP behind a dialer-proxy (appliance/outbound/socks5.py
`CarriedSocks5Peer`): what the gateway sends rides the carrier (the
dialer-proxy's UDP flow to the relay) after the carrier's header, replies
come back without the carrier's SOCKS5 header and with ours, and the
association ends with its control connection (RFC 1928 section 7). The
carrier is a local datagram pair, the control connection a memory stream."""

from __future__ import annotations

import socket

import trio
import trio.testing

from appliance.outbound.base import UdpPeer
from appliance.outbound.socks5 import CarriedSocks5Peer
from appliance.proto.socks5 import encode_udp, parse_udp


async def test_datagrams_ride_the_carrier_and_the_association_ends_with_its_control() -> None:
    near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (near, far):
        s.setblocking(False)  # as every carrier socket is
    # The carrier: a SOCKS5 dialer-proxy's flow to the relay at 192.0.2.9:4000.
    carrier_header = encode_udp("192.0.2.9", 4000, b"")
    carrier_control, carrier_far = trio.testing.memory_stream_pair()
    carrier = UdpPeer(near, "hop", header=carrier_header, control=carrier_control)
    control, proxy_side = trio.testing.memory_stream_pair()
    ours = encode_udp("www.example.test", 53, b"")
    peer = CarriedSocks5Peer(carrier, control, "via", ours, "192.0.2.9:4000 via hop")
    assert peer.socks and peer.header == ours
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def watch() -> None:
            await peer.watch()
            done.set()

        nursery.start_soon(watch)
        peer.sock.send(peer.header + b"query")
        with trio.fail_after(2):
            await trio.lowlevel.wait_readable(far)
        sent = far.recv(65535)
        # The carrier's header, then our SOCKS5 datagram for the relay.
        assert sent == carrier_header + ours + b"query"
        relayed = parse_udp(sent)
        assert relayed.payload == ours + b"query"
        # The relay's reply (our header first) in the carrier's header.
        far.send(encode_udp("192.0.2.9", 4000, encode_udp("www.example.test", 53, b"answer")))
        with trio.fail_after(2):
            await trio.lowlevel.wait_readable(peer.sock)
        got = parse_udp(peer.sock.recv(65535))
        assert (got.host, got.port, got.payload) == ("www.example.test", 53, b"answer")
        # The proxy closes the control connection: the association ends.
        await proxy_side.aclose()
        with trio.fail_after(2):
            await done.wait()
    await peer.aclose()
    far.close()
    await carrier_far.aclose()
    assert near.fileno() == -1  # the carrier closed with the peer
