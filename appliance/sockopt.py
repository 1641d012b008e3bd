"""Linux socket options and control messages the data path uses, without I/O.

What it is for: the transparent listeners (gateway/tcp.py, gateway/udp.py),
the proxy ports (gateway/proxyport/), the DNS server and the outbounds set the
same Linux socket options and read the same ancillary data. The numbers live
here once (Python 3.11's `socket` module names only some of them; the
fallbacks are the values from <linux/in.h>, <linux/in6.h> and
<asm-generic/socket.h>), and so do the decoders for what the kernel hands
back with `recvmsg`, and `set_mark` (SO_MARK on an outgoing socket).

Nothing here imports trio, and only `open_transparent_sender` (the socket
TPROXY replies leave from) and `start_marked_connect` (an outgoing TCP
connect, not waited for) open sockets; the decoders take plain bytes
(tests/unit/test_udp_sessions.py) and return None for what they do not
recognise, never raise.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

# -- socket options -------------------------------------------------------------

# Bind to and accept for addresses that are not local (TPROXY, spoofed replies).
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT: int = getattr(socket, "IPV6_TRANSPARENT", 75)
# Bind to an address that is not (yet) configured on an interface.
IP_FREEBIND: int = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND: int = getattr(socket, "IPV6_FREEBIND", 78)
# Ask for / carry the datagram's destination address (the reply's source).
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO: int = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: int = getattr(socket, "IPV6_PKTINFO", 50)
# Ask for the original destination of a TPROXY'd datagram. The control
# message carrying it has the same number (IP_ORIGDSTADDR == IP_RECVORIGDSTADDR,
# IPV6_ORIGDSTADDR == IPV6_RECVORIGDSTADDR), so one name serves both.
IP_ORIGDSTADDR: int = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IPV6_ORIGDSTADDR: int = getattr(socket, "IPV6_RECVORIGDSTADDR", 74)
# Firewall mark on every socket an outbound or the resolver opens.
SO_MARK: int = getattr(socket, "SO_MARK", 36)
# SO_RCVBUF past net.core.rmem_max (needs CAP_NET_ADMIN).
SO_RCVBUFFORCE: int = getattr(socket, "SO_RCVBUFFORCE", 33)



# TCP keepalive on relayed sockets (mihomo's dialer turns it on for its TCP
# connections too): a peer that vanished without FIN or RST is noticed after
# KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL of silence (75 s)
# instead of never.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4


class _Settable(Protocol):
    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


def set_mark(sock: _Settable, mark: int | None) -> None:
    """Give `sock` (a socket or trio socket, before connect/sendto) the
    firewall mark `mark`; nothing for None or 0 (a new socket's mark is 0).
    Raises OSError as setsockopt does (EPERM without CAP_NET_ADMIN)."""
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def set_keepalive(sock: _Settable, idle: int = KEEPALIVE_IDLE,
                  interval: int = KEEPALIVE_INTERVAL, count: int = KEEPALIVE_COUNT) -> None:
    """TCP keepalive on a connected TCP socket (SO_KEEPALIVE, TCP_KEEPIDLE,
    TCP_KEEPINTVL, TCP_KEEPCNT). Best effort: a socket that refuses (not
    TCP, already closed) is left as it is."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except OSError:
        return


def start_marked_connect(ip: str, port: int, family: int,
                         mark: int | None) -> tuple[socket.socket, int]:
    """A non-blocking TCP socket carrying `mark`, its connect to ip:port
    started: (socket, connect_ex's errno: 0, EINPROGRESS, or why it failed
    at once). Raises OSError only if the socket cannot be made or marked
    (then nothing is left open); the caller owns the socket otherwise."""
    # Non-blocking from socket(2) on: setblocking() would be a system call
    # of its own, on every outbound connection.
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        set_mark(sock, mark)
        return sock, sock.connect_ex((ip, port))
    except BaseException:
        sock.close()
        raise


def open_transparent_sender(dst: Destination) -> socket.socket:
    """A non-blocking UDP socket bound to `dst` = (family, address, port), an
    address that need not be local (IP_TRANSPARENT / IPV6_TRANSPARENT), for
    sending replies from a TPROXY'd datagram's original destination. Never
    connected (TPROXY's socket lookup prefers connected sockets, and the
    listener must keep receiving) and never read, so its receive buffer is
    kept small. Raises OSError (EPERM without CAP_NET_ADMIN, EADDRNOTAVAIL
    for an address family mismatch); the socket is closed then."""
    family, host, port = dst
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


# -- control messages -----------------------------------------------------------

Ancillary = list[tuple[int, int, bytes]]  # recvmsg's ancdata: (level, type, data)
Destination = tuple[int, str, int]  # (socket family, address text, port)


def original_destination(ancdata: Ancillary) -> Destination | None:
    """(family, address, port) a TPROXY'd datagram was sent to, from its
    IP_ORIGDSTADDR (a sockaddr_in) or IPV6_ORIGDSTADDR (a sockaddr_in6)
    control message (ports in network order); None if there is none."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port = int.from_bytes(data[2:4], "big")
            return socket.AF_INET, socket.inet_ntop(socket.AF_INET, data[4:8]), port
        if level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            port = int.from_bytes(data[2:4], "big")
            return socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


def reply_pktinfo(ancdata: Ancillary) -> Ancillary:
    """The control message for `sendmsg` that makes a reply leave from the
    address its datagram was sent to (from the IP_PKTINFO / IPV6_PKTINFO the
    datagram came with); empty if there is none."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            return [(level, kind, data[:20])]  # struct in6_pktinfo {addr, ifindex}
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo {ifindex, spec_dst, addr}: send from `addr`
            # (the header's destination), let routing pick the interface.
            return [(level, kind, struct.pack("=i4s4s", 0, data[8:12], bytes(4)))]
    return []
