/* What mirage_tc.c and mirage_dns.c both ask of a parsed packet's addresses.
 *
 * - `mirage_addr_key`: an address as the four words the per-client and
 *   bypass keys hold (IPv4 as IPv4-mapped IPv6, so one key type serves
 *   both families);
 * - `struct mirage_lpm_key` and `mirage_host_key`: a destination as the
 *   /128 key of a program's bypass trie (destinations never captured:
 *   appliance.bypass plus loopback, link-local, multicast, broadcast; IPv4
 *   as /96 + len). The trie itself is declared in each program: bcc
 *   rewrites `map.lookup()` only in the file it compiles, not in headers;
 * - `mirage_is_local`: is the destination one of the gateway's own (or
 *   broadcast) addresses? The question `fib daddr type local` asks in
 *   nftables: bpf_fib_lookup answers NOT_FWDED for a destination the kernel
 *   would not forward (also for no route at all, when such a packet would be
 *   dropped anyway);
 * - `mirage_tuple_of` / `mirage_tuple_listener`: the packet's own socket
 *   tuple, and the same re-aimed at a listening socket (addr, port).
 *
 * Needs lib/parse.h (struct mirage_pkt).
 */
#ifndef MIRAGE_ADDR_H
#define MIRAGE_ADDR_H

struct mirage_client_key {
    __u32 addr[4];
};

struct mirage_lpm_key {
    __u32 prefixlen;
    __u32 addr[4];
};

/* `a` (p->src or p->dst) of a packet of `family` into out[4]. */
static __always_inline void mirage_addr_key(__u32 family, const __be32 *a, __u32 *out)
{
    if (family == MIRAGE_AF_INET) {
        out[0] = 0;
        out[1] = 0;
        out[2] = bpf_htonl(0xffff);
        out[3] = a[0];
    } else {
        __builtin_memcpy(out, a, 16);
    }
}

/* The packet's destination as a full-length key of a bypass trie. */
static __always_inline void mirage_host_key(struct mirage_pkt *p, struct mirage_lpm_key *k)
{
    k->prefixlen = 128;
    mirage_addr_key(p->family, p->dst, k->addr);
}

static __always_inline int mirage_is_local(struct __sk_buff *skb, struct mirage_pkt *p)
{
    struct bpf_fib_lookup f = {};

    f.family = p->family;
    f.l4_protocol = p->proto;
    f.sport = p->sport;
    f.dport = p->dport;
    f.ifindex = skb->ingress_ifindex;
    if (p->family == MIRAGE_AF_INET) {
        f.ipv4_src = p->src[0];
        f.ipv4_dst = p->dst[0];
    } else {
        __builtin_memcpy(f.ipv6_src, p->src, 16);
        __builtin_memcpy(f.ipv6_dst, p->dst, 16);
    }
    return bpf_fib_lookup(skb, &f, sizeof(f), 0) == BPF_FIB_LKUP_RET_NOT_FWDED;
}

/* The packet's own tuple; returns its size for the lookup helpers. */
static __always_inline __u32 mirage_tuple_of(struct mirage_pkt *p, struct bpf_sock_tuple *t)
{
    if (p->family == MIRAGE_AF_INET) {
        t->ipv4.saddr = p->src[0];
        t->ipv4.daddr = p->dst[0];
        t->ipv4.sport = p->sport;
        t->ipv4.dport = p->dport;
        return sizeof(t->ipv4);
    }
    __builtin_memcpy(t->ipv6.saddr, p->src, 16);
    __builtin_memcpy(t->ipv6.daddr, p->dst, 16);
    t->ipv6.sport = p->sport;
    t->ipv6.dport = p->dport;
    return sizeof(t->ipv6);
}

/* Re-aim the tuple at a listening socket: (addr, port), addr as 4 words
 * (IPv4: a[0]). A wildcard listener is found by the wildcard address; a
 * socket bound to the packet's own destination (say, a reply socket bound to
 * the resolver's address) is not. */
static __always_inline void mirage_tuple_listener(struct mirage_pkt *p, struct bpf_sock_tuple *t,
                                                  __u32 a0, __u32 a1, __u32 a2, __u32 a3,
                                                  __u16 port)
{
    if (p->family == MIRAGE_AF_INET) {
        t->ipv4.daddr = a0;
        t->ipv4.dport = bpf_htons(port);
    } else {
        t->ipv6.daddr[0] = a0;
        t->ipv6.daddr[1] = a1;
        t->ipv6.daddr[2] = a2;
        t->ipv6.daddr[3] = a3;
        t->ipv6.dport = bpf_htons(port);
    }
}

#endif /* MIRAGE_ADDR_H */
