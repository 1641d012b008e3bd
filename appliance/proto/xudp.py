"""XUDP: UDP datagrams as frames of v2ray's mux.cool protocol, one session
per stream (Xray's UDP for VLESS, mihomo's `packet-encoding: xudp`, and
its default for VLESS). Sans-I/O.

The proxy request carries command 3 (mux) and no address. Each datagram
is a frame: meta length (2), meta = session id (2, 0 here), status (1: New
for the first frame, Keep after), option (1: data), network (1: UDP),
port and address (the VMess order and numbering), then the data length
(2) and the datagram. Frames from the server are Keep (with or without an
address: the reply's source), KeepAlive, or End; an End or an error
option ends the flow. As sing-vmess (sing-box's client) does, the New
frame carries no global id.
"""

from __future__ import annotations

import struct

from appliance.proto.vmess import VmessError, encode_address

STATUS_NEW = 1
STATUS_KEEP = 2
STATUS_END = 3
STATUS_KEEPALIVE = 4
OPTION_DATA = 1
OPTION_ERROR = 2
NETWORK_UDP = 2


class XudpError(VmessError):
    """A frame that does not decode, or the server ended the session."""


class XudpCodec:
    """One flow's datagrams to `host:port` as XUDP frames and back."""

    def __init__(self, host: str, port: int) -> None:
        self._address = encode_address(host, port)
        self._sent_new = False
        self._buf = bytearray()
        self.ended = False

    def encode(self, payload: bytes) -> bytes:
        status = STATUS_KEEP if self._sent_new else STATUS_NEW
        self._sent_new = True
        meta = struct.pack(">HBBB", 0, status, OPTION_DATA, NETWORK_UDP) + self._address
        return b"".join((struct.pack(">H", len(meta)), meta,
                         struct.pack(">H", len(payload)), payload))

    def decode(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while not self.ended and len(buf) - pos >= 2:
            meta_len = (buf[pos] << 8) | buf[pos + 1]
            if meta_len < 4:
                raise XudpError(f"frame meta of {meta_len} bytes")
            head = pos + 2 + meta_len
            if len(buf) < head:
                break
            status, option = buf[pos + 4], buf[pos + 5]
            if status == STATUS_END or option & OPTION_ERROR:
                self.ended = True
                pos = head
                break
            if status not in (STATUS_KEEP, STATUS_KEEPALIVE):
                raise XudpError(f"unexpected frame status {status}")
            if not option & OPTION_DATA:
                pos = head
                continue
            if len(buf) < head + 2:
                break
            n = (buf[head] << 8) | buf[head + 1]
            if len(buf) < head + 2 + n:
                break
            out.append(bytes(buf[head + 2:head + 2 + n]))
            pos = head + 2 + n
        del buf[:pos]
        return out
