/* Packet parsing for mirage_tc.c and mirage_dns.c: Ethernet -> IPv4/IPv6 -> TCP/UDP ports.
 *
 * Fills a `struct mirage_pkt` with what the verdict needs: the addresses
 * (IPv4 as IPv4-mapped IPv6 in `src16`/`dst16` for the per-client key and the
 * bypass trie, plus the raw words for the socket tuple), the L4 protocol, the
 * ports, and whether the packet is a fragment.
 *
 * The fixed headers are read with direct packet access (bounds-checked
 * against data_end, which the verifier insists on before every read); the
 * variable part (IPv4 options, IPv6 extension headers, the ports behind
 * them) with bpf_skb_load_bytes, which bounds-checks itself and keeps
 * variable offsets away from packet pointers.
 *
 * IPv6 extension headers: up to MIRAGE_MAX_EXTHDR of hop-by-hop, routing,
 * destination options, fragment and AH are walked. Anything else (ESP, no
 * next header, ICMPv6, a chain longer than the bound) ends the walk with a
 * non-TCP/UDP protocol: such packets are not capturable (to a fake range
 * they are dropped, otherwise passed).
 */
#ifndef MIRAGE_PARSE_H
#define MIRAGE_PARSE_H

#ifndef MIRAGE_MAX_EXTHDR
#define MIRAGE_MAX_EXTHDR 6
#endif

#define MIRAGE_ETH_HLEN 14
#define MIRAGE_ETH_P_IP 0x0800
#define MIRAGE_ETH_P_IPV6 0x86DD
#define MIRAGE_AF_INET 2
#define MIRAGE_AF_INET6 10

/* IPv6 next-header values walked as extension headers. */
#define MIRAGE_NH_HOPOPTS 0
#define MIRAGE_NH_ROUTING 43
#define MIRAGE_NH_FRAGMENT 44
#define MIRAGE_NH_AUTH 51
#define MIRAGE_NH_DSTOPTS 60

/* Parse results (negative: the packet could not be parsed that far). */
#define MIRAGE_PARSE_OK 0
#define MIRAGE_PARSE_NOT_IP -1      /* not IPv4/IPv6: pass */
#define MIRAGE_PARSE_SHORT_IP -2    /* IP header cut off: pass, ip_rcv drops it */
#define MIRAGE_PARSE_SHORT_L4 -3    /* L4 header cut off: pass unless fake range */

struct mirage_pkt {
    __u32 family;        /* MIRAGE_AF_INET or MIRAGE_AF_INET6 */
    __u32 l4off;         /* offset of the L4 header from skb->data */
    __u8 proto;          /* IPPROTO_TCP, IPPROTO_UDP or anything else */
    __u8 fragment;       /* 1: first fragment (has ports), 2: later fragment */
    __u16 pad;
    __be16 sport;
    __be16 dport;
    __u8 tcp_flags;
    __u8 pad2[3];
    __be32 src[4];       /* IPv4: src[0] only */
    __be32 dst[4];
};

/* The first 14 bytes of a TCP header cover the flags; a UDP header is 8. */
struct mirage_ports {
    __be16 source;
    __be16 dest;
    __u8 rest[10];  /* TCP: seq, ack_seq, doff; rest[9] = flags (byte 13) */
};

#define MIRAGE_TCP_SYN 0x02
#define MIRAGE_TCP_ACK 0x10

/* IPv4: fixed header directly, options skipped by ihl. */
static __always_inline int mirage_parse_ipv4(struct __sk_buff *skb, void *data, void *data_end,
                                             struct mirage_pkt *p)
{
    struct iphdr *iph = data + MIRAGE_ETH_HLEN;

    /* The verifier needs this before any field is read. */
    if ((void *)(iph + 1) > data_end)
        return MIRAGE_PARSE_SHORT_IP;
    if (iph->ihl < 5)
        return MIRAGE_PARSE_SHORT_IP;
    p->family = MIRAGE_AF_INET;
    p->proto = iph->protocol;
    p->src[0] = iph->saddr;
    p->dst[0] = iph->daddr;
    p->l4off = MIRAGE_ETH_HLEN + iph->ihl * 4;
    /* frag_off: 3 flag bits + 13-bit offset, network order. 0x1fff is the
     * offset, 0x2000 "more fragments". */
    __u16 frag = bpf_ntohs(iph->frag_off);
    if (frag & 0x1fff)
        p->fragment = 2;
    else if (frag & 0x2000)
        p->fragment = 1;
    return MIRAGE_PARSE_OK;
}

#ifdef MIRAGE_IPV6
static __always_inline int mirage_parse_ipv6(struct __sk_buff *skb, void *data, void *data_end,
                                             struct mirage_pkt *p)
{
    struct ipv6hdr *ip6 = data + MIRAGE_ETH_HLEN;

    if ((void *)(ip6 + 1) > data_end)
        return MIRAGE_PARSE_SHORT_IP;
    p->family = MIRAGE_AF_INET6;
    __builtin_memcpy(p->src, &ip6->saddr, 16);
    __builtin_memcpy(p->dst, &ip6->daddr, 16);
    __u8 nh = ip6->nexthdr;
    __u32 off = MIRAGE_ETH_HLEN + sizeof(struct ipv6hdr);

#pragma unroll
    for (int i = 0; i < MIRAGE_MAX_EXTHDR; i++) {
        __u8 ext[8];

        if (nh != MIRAGE_NH_HOPOPTS && nh != MIRAGE_NH_ROUTING && nh != MIRAGE_NH_DSTOPTS &&
            nh != MIRAGE_NH_FRAGMENT && nh != MIRAGE_NH_AUTH)
            break;
        if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
            return MIRAGE_PARSE_SHORT_L4;
        if (nh == MIRAGE_NH_FRAGMENT) {
            /* ext[2..3]: 13-bit offset << 3 | M flag. */
            __u16 fo = ((__u16)ext[2] << 8) | ext[3];
            if (fo & 0xfff8)
                p->fragment = 2;
            else if (fo & 1)
                p->fragment = 1;
            off += 8;
        } else if (nh == MIRAGE_NH_AUTH) {
            off += ((__u32)ext[1] + 2) * 4;
        } else {
            off += ((__u32)ext[1] + 1) * 8;
        }
        nh = ext[0];
    }
    p->proto = nh;
    p->l4off = off;
    return MIRAGE_PARSE_OK;
}
#endif /* MIRAGE_IPV6 */

/* Ports of TCP/UDP packets that carry an L4 header (not later fragments). */
static __always_inline int mirage_parse_ports(struct __sk_buff *skb, struct mirage_pkt *p)
{
    struct mirage_ports ports;

    if (p->fragment == 2)
        return MIRAGE_PARSE_OK;
    if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
        return MIRAGE_PARSE_OK;
    /* The whole TCP/UDP header must be there, not just the ports: the
     * kernel would drop a runt anyway, and a socket must never see one. */
    __u32 need = p->proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
    if (p->l4off + need > skb->len)
        return MIRAGE_PARSE_SHORT_L4;
    if (p->proto == IPPROTO_TCP) {
        if (bpf_skb_load_bytes(skb, p->l4off, &ports, 14) < 0)
            return MIRAGE_PARSE_SHORT_L4;
        p->tcp_flags = ports.rest[9];
    } else if (bpf_skb_load_bytes(skb, p->l4off, &ports, 4) < 0) {
        return MIRAGE_PARSE_SHORT_L4;
    }
    p->sport = ports.source;
    p->dport = ports.dest;
    return MIRAGE_PARSE_OK;
}

#endif /* MIRAGE_PARSE_H */
