/* Counter indexes of the `mirage_stats` per-CPU array.
 *
 * appliance/capture/ebpf.py reads them by name: its STAT_NAMES lists them in
 * this order (tests/unit/test_ebpf_plan.py checks the two agree). Append
 * only; keep MIRAGE_ST_MAX last.
 */
#ifndef MIRAGE_STATS_H
#define MIRAGE_STATS_H

enum mirage_stat {
    MIRAGE_ST_PACKETS = 0,       /* every packet seen on LAN ingress */
    MIRAGE_ST_BYTES,             /* and their bytes (skb->len) */
    MIRAGE_ST_NOT_IP,            /* neither IPv4 nor (with ipv6) IPv6: passed */
    MIRAGE_ST_SHORT,             /* IP header cut off: passed (ip_rcv drops it) */
    MIRAGE_ST_OWN,               /* carries routing-mark: passed */
    MIRAGE_ST_BYPASS,            /* capture candidate in a bypass range: passed */
    MIRAGE_ST_LOCAL,             /* port 53 to the gateway's own address: passed */
    MIRAGE_ST_TCP_ESTABLISHED,   /* fake range, packets of a flow (marked) */
    MIRAGE_ST_TCP_LISTENER,      /* fake range, to the tproxy-port listener */
    MIRAGE_ST_UDP_CONNECTED,     /* fake range, to a connected UDP socket */
    MIRAGE_ST_UDP_LISTENER,      /* fake range, to the tproxy-port UDP socket */
    MIRAGE_ST_DNS_TCP,           /* hijacked TCP port 53 (established or listener) */
    MIRAGE_ST_DNS_UDP,           /* hijacked UDP port 53 */
    MIRAGE_ST_DROP_NO_LISTENER,  /* fake range: no socket to hand it to */
    MIRAGE_ST_DROP_ASSIGN,       /* bpf_sk_assign refused the socket */
    MIRAGE_ST_DROP_FRAGMENT,     /* a fragment to a fake range */
    MIRAGE_ST_DROP_NOT_TCP_UDP,  /* fake range, neither TCP nor UDP (ICMP, ESP...) */
    MIRAGE_ST_DROP_MALFORMED,    /* fake range, L4 header cut off */
    MIRAGE_ST_DROP_LOOP,         /* tproxy-port on the gateway's own address */
    MIRAGE_ST_DNS_NO_SOCKET,     /* port 53 with no DNS socket (Mirage gone): passed */
    MIRAGE_ST_MAX
};

#endif /* MIRAGE_STATS_H */
