/* Counter indexes of mirage_dns.c's `mirage_dns_stats` per-CPU array.
 *
 * appliance/capture/ebpf/answer.py reads them by name: its DNS_STAT_NAMES
 * lists them in this order (tests/unit/test_kernel_dns.py checks the two
 * agree). Append only; keep MIRAGE_DS_MAX last. Every query the program
 * looks at ends in exactly one of them.
 */
#ifndef MIRAGE_DNS_STATS_H
#define MIRAGE_DNS_STATS_H

enum mirage_dns_stat {
    MIRAGE_DS_ANSWERED = 0,   /* answered from mirage_names in the kernel */
    MIRAGE_DS_MISS,           /* well-formed A/AAAA, name not in the map */
    MIRAGE_DS_NO_SOCKET,      /* Mirage's DNS socket is gone: never answered */
    MIRAGE_DS_NOT_QUERY,      /* QR, opcode, TC, RCODE or section counts unusual */
    MIRAGE_DS_NAME,           /* compression pointer, bad label, cut off */
    MIRAGE_DS_LONG_NAME,      /* longer than the map's key */
    MIRAGE_DS_QTYPE,          /* not A/AAAA in class IN */
    MIRAGE_DS_EDNS,           /* OPT record the fast path would not take */
    MIRAGE_DS_DO,             /* DNSSEC OK bit set */
    MIRAGE_DS_SHAPE,          /* trailing bytes, UDP length != packet */
    MIRAGE_DS_TRANSPORT,      /* IP options, IPv6 extension headers, fragment */
    MIRAGE_DS_RESIZE,         /* the kernel refused to grow the packet */
    MIRAGE_DS_MAX
};

#endif /* MIRAGE_DNS_STATS_H */
