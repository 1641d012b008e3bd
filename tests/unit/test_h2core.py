"""The lean HTTP/2 client core (appliance/outbound/transport/h2core.py)
against h2's server side, fed bytes only: requests, responses and
trailers, flow control both ways, SETTINGS/PING answers, resets, GOAWAY,
frames split at every byte, and protocol errors."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.settings import SettingCodes

from appliance.outbound.transport.h2core import (
    DATA,
    FRAME_CONTINUATION,
    FRAME_HEADERS,
    FRAME_PUSH_PROMISE,
    GOAWAY,
    HEADERS,
    RESET,
    H2Client,
    H2ProtocolError,
    frame,
    header_block,
)

REQUEST = [(":method", "POST"), (":scheme", "https"), (":path", "/Svc/Tun"),
           (":authority", "g.test"), ("content-type", "application/grpc"),
           ("te", "trailers")]


def server() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    return conn


def connected(window: int = 1 << 20) -> tuple[H2Client, h2.connection.H2Connection]:
    client = H2Client(window=window, max_frame=1 << 16)
    srv = server()
    srv.receive_data(client.data_to_send())
    assert client.receive_data(srv.data_to_send()) == []
    srv.receive_data(client.data_to_send())  # our SETTINGS ACK
    return client, srv


def test_requests_share_one_header_block_and_get_responses_and_trailers() -> None:
    client, srv = connected()
    block = header_block(REQUEST)
    sids = [client.open_stream(block) for _ in range(3)]
    assert sids == [1, 3, 5] and client.open_streams == 3
    events = srv.receive_data(client.data_to_send())
    requests = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert [e.stream_id for e in requests] == sids
    assert all(dict(e.headers)[b":path"] == b"/Svc/Tun" for e in requests)
    srv.send_headers(3, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    srv.send_data(3, b"hello")
    srv.send_headers(3, [(b"grpc-status", b"0")], end_stream=True)
    got = client.receive_data(srv.data_to_send())
    assert got[0][:2] == (HEADERS, 3) and (b":status", b"200") in got[0][2]
    assert got[1] == (DATA, 3, b"hello", 5, False)
    assert got[2] == (HEADERS, 3, [(b"grpc-status", b"0")], True)


def test_every_split_of_the_servers_bytes_gives_the_same_events() -> None:
    client, srv = connected()
    client.open_stream(header_block(REQUEST))
    srv.receive_data(client.data_to_send())
    srv.send_headers(1, [(b":status", b"200")])
    srv.send_data(1, b"a" * 300, pad_length=7)
    srv.ping(b"12345678")
    srv.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    wire = srv.data_to_send()
    for cut in range(len(wire) + 1):
        c, s = connected()
        c.open_stream(header_block(REQUEST))
        s.receive_data(c.data_to_send())
        events = c.receive_data(wire[:cut]) + c.receive_data(wire[cut:])
        assert [e[0] for e in events] == [HEADERS, DATA, HEADERS]
        assert events[1] == (DATA, 1, b"a" * 300, 308, False)
        pong = s.receive_data(c.data_to_send())
        assert any(isinstance(e, h2.events.PingAckReceived) for e in pong)


def test_flow_control_both_ways() -> None:
    client, srv = connected(window=1 << 16)
    sid = client.open_stream(header_block(REQUEST))
    # Sending: the server's default window (65535), then its updates.
    assert client.send_window(sid) == 65535
    client.send_data(sid, b"x" * 65535)
    assert client.send_window(sid) == 0
    with pytest.raises(H2ProtocolError):
        client.send_data(sid, b"y")
    events = srv.receive_data(client.data_to_send())
    body = sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived))
    assert body == 65535
    srv.acknowledge_received_data(65535, sid)
    client.receive_data(srv.data_to_send())
    assert client.send_window(sid) > 0
    # Receiving: no update until a quarter window is consumed, then both.
    srv.send_headers(sid, [(b":status", b"200")])
    srv.send_data(sid, b"z" * 16000)
    client.receive_data(srv.data_to_send())
    client.acknowledge(sid, 16000)
    assert not client.pending
    client.acknowledge(sid, 400)
    updates = [e for e in srv.receive_data(client.data_to_send())
               if isinstance(e, h2.events.WindowUpdated)]
    assert sorted(e.stream_id for e in updates) == [0, sid]


def test_server_settings_change_windows_and_frame_size() -> None:
    client, srv = connected()
    sid = client.open_stream(header_block(REQUEST))
    srv.receive_data(client.data_to_send())
    srv.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000,
                         SettingCodes.MAX_FRAME_SIZE: 20000,
                         SettingCodes.MAX_CONCURRENT_STREAMS: 7})
    client.receive_data(srv.data_to_send())
    assert client.send_window(sid) == 1000
    assert client.max_outbound_frame == 20000 and client.max_concurrent_streams == 7
    acked = srv.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in acked)


def test_resets_and_goaway() -> None:
    client, srv = connected()
    a = client.open_stream(header_block(REQUEST))
    b = client.open_stream(header_block(REQUEST))
    srv.receive_data(client.data_to_send())
    srv.reset_stream(a, error_code=2)
    assert client.receive_data(srv.data_to_send()) == [(RESET, a, 2)]
    # Reset by the server: ours sends nothing; b is reset by us.
    client.reset_stream(a)
    assert not client.pending
    client.reset_stream(b)
    events = srv.receive_data(client.data_to_send())
    assert [(type(e), e.stream_id) for e in events] == [(h2.events.StreamReset, b)]
    assert client.open_streams == 0 and client.send_window(b) == 0
    srv.close_connection(error_code=0, last_stream_id=b)
    assert client.receive_data(srv.data_to_send()) == [(GOAWAY, b, 0)]


def test_header_block_over_continuation_frames() -> None:
    client, _ = connected()
    client.open_stream(header_block(REQUEST))
    block = header_block([(":status", "200"), ("x-long", "v" * 100)])
    wire = (frame(FRAME_HEADERS, 0, 1, block[:40]) + frame(FRAME_CONTINUATION, 0, 1, block[40:90])
            + frame(FRAME_CONTINUATION, 4, 1, block[90:]))
    assert client.receive_data(wire) == [
        (HEADERS, 1, [(b":status", b"200"), (b"x-long", b"v" * 100)], False)]


@pytest.mark.parametrize("wire", [
    frame(FRAME_PUSH_PROMISE, 4, 1, b"\x00\x00\x00\x02"),
    frame(FRAME_CONTINUATION, 4, 1, b""),
    frame(FRAME_HEADERS, 0, 1, b"") + frame(0, 0, 1, b"x"),
    frame(0, 0, 0, b"x"),
    frame(4, 0, 0, b"\x00\x04\x80\x00\x00\x00"),
    b"\x01\x00\x01" + bytes(6),  # larger than our MAX_FRAME_SIZE
])
def test_protocol_errors(wire: bytes) -> None:
    client, _ = connected()
    client.open_stream(header_block(REQUEST))
    with pytest.raises(H2ProtocolError):
        client.receive_data(wire)


def test_repeated_indexed_blocks_decode_as_the_table_stands() -> None:
    client, srv = connected()
    block = header_block(REQUEST)
    seen = []
    for i in range(6):
        sid = client.open_stream(block)
        srv.receive_data(client.data_to_send())
        # The same headers each time (indexed after the first), and now and
        # then a new value that inserts into the server's dynamic table.
        extra = [(b"x-n", str(i // 2).encode())]
        srv.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                               *extra])
        event = client.receive_data(srv.data_to_send())[0]
        seen.append(dict(event[2]))
    assert [h[b"x-n"] for h in seen] == [b"0", b"0", b"1", b"1", b"2", b"2"]
    assert all(h[b"content-type"] == b"application/grpc" for h in seen)
    assert client._indexed_blocks  # the repeats were served from it
