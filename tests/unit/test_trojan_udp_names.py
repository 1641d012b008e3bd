"""Trojan UDP and names in packets (appliance/outbound/trojan.py): a
server that closes the tunnel at a packet addressed by name, before any
reply (mihomo's Trojan inbound), gets the flow again by address with the
first datagrams sent again, and addresses from then on; a server that
answers a named packet keeps getting names. The tunnel is a memory stream
to a scripted server (its TLS and request head are not what is tested:
tests/integration/test_reality.py runs the real mihomo)."""

from __future__ import annotations

import ipaddress
from typing import Any

import trio
import trio.testing

from appliance.config.protocols.common import TlsOptions
from appliance.outbound.base import UdpPeer
from appliance.outbound.trojan import TrojanOutbound
from appliance.proto.socks5 import encode_address
from appliance.proto.trojan import UdpDecoder, encode_udp

RESOLVED = ipaddress.ip_address("192.0.2.7")


class Targets:
    async def udp_address(self, name: str) -> Any:
        await trio.lowlevel.checkpoint()
        return RESOLVED


class ScriptedTrojan(TrojanOutbound):
    """Tunnels to a server task that echoes each packet ("re:" + payload)
    unless it is addressed by name and `names` is False: then it closes."""

    def __init__(self, nursery: trio.Nursery, *, names: bool) -> None:
        async def no_dial(host: Any, port: int) -> trio.abc.Stream:
            raise AssertionError("not dialled")

        super().__init__("tj", "t.test", 443, "pw", tls=TlsOptions(), transport=None,
                         udp=True, dial=no_dial, connect_timeout=5,
                         targets=Targets())  # type: ignore[arg-type]
        self.nursery = nursery
        self.names = names
        self.heads: list[Any] = []

    async def _tunnel(self, command: int, host: Any, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        self.heads.append(host)
        self.nursery.start_soon(self._serve, theirs)
        await trio.lowlevel.checkpoint()
        return ours

    async def _serve(self, stream: trio.abc.Stream) -> None:
        decoder = UdpDecoder()
        while data := await stream.receive_some():
            for host, port, payload in decoder.feed(data):
                if isinstance(host, str) and not self.names:
                    await stream.aclose()
                    return
                await stream.send_all(encode_udp(encode_address(host, port), b"re:" + payload))


async def watched(nursery: trio.Nursery, peer: UdpPeer) -> trio.CancelScope:
    """`peer.watch()` in its own scope: the gateway cancels it before it
    closes the peer."""
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await peer.watch()

    nursery.start_soon(run)
    await trio.lowlevel.checkpoint()
    return scope


async def close(scope: trio.CancelScope, peer: UdpPeer) -> None:
    scope.cancel()
    await trio.lowlevel.checkpoint()
    await peer.aclose()


async def exchange(peer: UdpPeer, payload: bytes) -> bytes:
    peer.sock.send(peer.header + payload)
    with trio.fail_after(2):
        await trio.lowlevel.wait_readable(peer.sock)
    return peer.sock.recv(65535)


async def test_a_server_that_refuses_names_gets_the_flow_by_address() -> None:
    async with trio.open_nursery() as nursery:
        out = ScriptedTrojan(nursery, names=False)
        peer = await out.open_udp("www.example.test", 53)
        assert peer is not None
        scope = await watched(nursery, peer)
        # The first datagram went by name, was refused, and went again.
        assert await exchange(peer, b"one") == b"re:one"
        assert await exchange(peer, b"two") == b"re:two"
        assert out.heads == ["www.example.test", RESOLVED]
        assert out.udp_names is False
        await close(scope, peer)
        # From now on: by address at once.
        again = await out.open_udp("www.example.test", 53)
        assert again is not None
        scope = await watched(nursery, again)
        assert await exchange(again, b"three") == b"re:three"
        assert out.heads[2:] == [RESOLVED]
        await close(scope, again)
        nursery.cancel_scope.cancel()


async def test_a_server_that_answers_a_name_keeps_getting_names() -> None:
    async with trio.open_nursery() as nursery:
        out = ScriptedTrojan(nursery, names=True)
        peer = await out.open_udp("www.example.test", 53)
        assert peer is not None
        scope = await watched(nursery, peer)
        assert await exchange(peer, b"one") == b"re:one"
        assert out.udp_names is True and out.heads == ["www.example.test"]
        await close(scope, peer)
        nursery.cancel_scope.cancel()


async def test_a_refused_address_is_not_learned() -> None:
    """A tunnel closed without a reply by address too (a wrong password,
    say) teaches nothing: the flow ends, the habit stays unknown."""
    async with trio.open_nursery() as nursery:
        out = ScriptedTrojan(nursery, names=False)

        async def close_all(stream: trio.abc.Stream) -> None:
            await stream.receive_some()
            await stream.aclose()

        out._serve = close_all  # type: ignore[method-assign]
        peer = await out.open_udp("www.example.test", 53)
        assert peer is not None
        peer.sock.send(b"one")
        with trio.fail_after(2):
            await peer.watch()
        assert out.heads == ["www.example.test", RESOLVED] and out.udp_names is None
        await peer.aclose()
        nursery.cancel_scope.cancel()


async def test_a_tunnel_that_idles_out_without_a_reply_is_not_reopened(
        autojump_clock: trio.testing.MockClock) -> None:
    """Closed long after the first packet (an idle timeout, not a refusal
    of the name): the flow ends, nothing is sent again."""
    async with trio.open_nursery() as nursery:
        out = ScriptedTrojan(nursery, names=False)

        async def idle_out(stream: trio.abc.Stream) -> None:
            await stream.receive_some()
            await trio.sleep(60)
            await stream.aclose()

        out._serve = idle_out  # type: ignore[method-assign]
        peer = await out.open_udp("www.example.test", 53)
        assert peer is not None
        peer.sock.send(b"one")
        await peer.watch()
        assert out.heads == ["www.example.test"] and out.udp_names is None
        await peer.aclose()
        nursery.cancel_scope.cancel()
