/* Mirage's kernel DNS answerer: repeated A/AAAA queries answered on tc ingress.
 *
 * Attached (direct-action) to the clsact ingress of every appliance.lan
 * interface, one preference *before* the capture program (eBPF backend) or
 * alone (nftables backend), by appliance/capture/ebpf/answer.py, which
 * compiles this file with bcc and configures it with -D defines.
 *
 * A UDP query that Mirage's DNS service would get (port 53 to any address
 * with dns-hijack, or the DNS listener's port on a gateway address), of the
 * exact shape the userspace fast path takes (appliance/dns/wire.py
 * parse_query: one question, opcode QUERY, no TC, at most one EDNS version 0
 * OPT record without DO), for an A or AAAA question of class IN whose name
 * (lower-cased wire form) is a key of `mirage_names`, is answered here: the
 * packet is turned around in place (MACs, addresses and ports swapped, so
 * the answer leaves from the address the client asked), the answer record
 * (pointer to the question, TTL MIRAGE_KDNS_TTL) and, if the query had one,
 * Mirage's own OPT record (UDP size 1232, no options) replace everything
 * after the question, and it is sent back out of the interface it came in
 * on. The bytes of the DNS message are exactly those userspace would send
 * (tests/integration/test_kernel_dns.py compares them).
 *
 * Everything else returns TC_ACT_UNSPEC: the next filter (the capture
 * program) or the stack sees the packet untouched, and each reason is
 * counted (lib/dns_stats.h).
 *
 * Userspace owns `mirage_names` (appliance/fakeip/pool.py is its only
 * writer, through appliance/capture/ebpf/answer.py): an entry exists only
 * while the pool maps the name to that address and the DNS handler would
 * answer the name from the pool. The program only reads it, and stamps
 * `last_hit` (CLOCK_MONOTONIC ns) so that the pool's LRU can see names
 * that were used only here.
 *
 * Fail-safe: a query is answered only while Mirage's DNS socket exists
 * (looked up like the capture program does). When Mirage dies (SIGKILL
 * included) and this filter stays attached, nothing is answered from a map
 * nobody keeps current any more; the next `mirage run` (or the nftables
 * backend's leftover check) removes the filter.
 */

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

/* --- configuration (-D from appliance/capture/ebpf/answer.py) ------------ */

#ifndef MIRAGE_DNS_PORT
#error "MIRAGE_DNS_PORT (dns.listen port) is required"
#endif
#if !defined(MIRAGE_DNS4) && !defined(MIRAGE_DNS6)
#error "MIRAGE_DNS4 and/or MIRAGE_DNS6 (the DNS listener's address) is required"
#endif
#if defined(MIRAGE_DNS6) && !defined(MIRAGE_IPV6)
#error "MIRAGE_DNS6 needs MIRAGE_IPV6"
#endif
#ifndef MIRAGE_KDNS_ENTRIES
#define MIRAGE_KDNS_ENTRIES 65536
#endif
/* Bytes of a wire-format name the key holds (terminating zero included);
 * 2 + this is the key size. Longer names fall through. */
#ifndef MIRAGE_KDNS_NAME
#define MIRAGE_KDNS_NAME 126
#endif
#ifndef MIRAGE_KDNS_TTL
#define MIRAGE_KDNS_TTL 1
#endif
#ifndef MIRAGE_CLIENTS_MAX
#define MIRAGE_CLIENTS_MAX 4096
#endif
#ifndef MIRAGE_BYPASS_MAX
#define MIRAGE_BYPASS_MAX 1024
#endif

#define MIRAGE_DNS_HIJACK_PORT 53
#define MIRAGE_EDNS_UDP_SIZE 1232
#define MIRAGE_TYPE_A 1
#define MIRAGE_TYPE_AAAA 28
#define MIRAGE_TYPE_OPT 41
#define MIRAGE_CLASS_IN 1
/* Options of an OPT record walked to check they tile its RDATA. */
#define MIRAGE_EDNS_MAX_OPTIONS 4

#include "lib/parse.h"
#include "lib/dns_stats.h"
#include "lib/addr.h"

/* The answer record + OPT that replace everything after the question. */
#define ANSWER_FIXED 12   /* pointer, type, class, ttl, rdlength */
#define OPT_LEN 11
#define TAIL_MAX (ANSWER_FIXED + 16 + OPT_LEN)

/* --- maps ------------------------------------------------------------------ */

struct mirage_dns_counters {
    __u64 v[MIRAGE_DS_MAX];
};
BPF_PERCPU_ARRAY(mirage_dns_stats, struct mirage_dns_counters, 1);

/* qtype (host order) + the lower-cased wire-format name, zero-padded. */
struct mirage_name_key {
    __u16 qtype;
    __u8 name[MIRAGE_KDNS_NAME];
};
struct mirage_name_value {
    __u8 addr[16];     /* A: the first 4 bytes */
    __u64 last_hit;    /* bpf_ktime_get_ns() of the last kernel answer */
};
BPF_HASH(mirage_names, struct mirage_name_key, struct mirage_name_value, MIRAGE_KDNS_ENTRIES);
/* The key is built here, not on the stack: with the packet's headers and
 * the answer it would not fit in the verifier's 512 bytes. */
struct mirage_dns_scratch {
    struct mirage_name_key key;
    __u8 tail[TAIL_MAX + 1];
    __u8 ip[40];    /* the reply's IP header */
};
BPF_PERCPU_ARRAY(mirage_dns_scratch, struct mirage_dns_scratch, 1);

/* Queries answered here per client (source address, IPv4 as IPv4-mapped
 * IPv6): the kernel's share of what appliance/limits.py counts per client. */
BPF_TABLE("lru_percpu_hash", struct mirage_client_key, __u64, mirage_dns_clients,
          MIRAGE_CLIENTS_MAX);

/* Destinations never captured (the capture's bypass list): not answered. */
BPF_LPM_TRIE(mirage_dns_bypass, struct mirage_lpm_key, __u8, MIRAGE_BYPASS_MAX);

/* --- helpers --------------------------------------------------------------- */

static __always_inline int is_bypassed(struct mirage_pkt *p)
{
    struct mirage_lpm_key k = {};

    mirage_host_key(p, &k);
    return mirage_dns_bypass.lookup(&k) != 0;
}

#define FALL (-1)  /* TC_ACT_UNSPEC: the next filter / the stack decides */

static __always_inline int fall(struct mirage_dns_counters *st, __u32 why)
{
    if (st && why < MIRAGE_DS_MAX)
        st->v[why] += 1;
    return FALL;
}

/* Is Mirage's DNS socket there (the fail-safe)? Looked up as the capture
 * program finds it: the client's address and port toward the listener's. */
static __always_inline int dns_socket_alive(struct __sk_buff *skb, struct mirage_pkt *p)
{
    struct bpf_sock_tuple t = {};
    struct bpf_sock *sk;
    __u32 len = mirage_tuple_of(p, &t);

    if (p->family == MIRAGE_AF_INET) {
#ifdef MIRAGE_DNS4
        mirage_tuple_listener(p, &t, MIRAGE_DNS4_ADDR, 0, 0, 0, MIRAGE_DNS_PORT);
#else
        return 0;
#endif /* MIRAGE_DNS4 */
    } else {
#ifdef MIRAGE_DNS6
        mirage_tuple_listener(p, &t, MIRAGE_DNS6_A0, MIRAGE_DNS6_A1, MIRAGE_DNS6_A2,
                              MIRAGE_DNS6_A3, MIRAGE_DNS_PORT);
#else
        return 0;
#endif /* MIRAGE_DNS6 */
    }
    sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    /* Every socket a lookup returned holds a reference. */
    bpf_sk_release(sk);
    return 1;
}

/* Would Mirage's DNS service get this UDP packet? */
static __always_inline int is_ours(struct __sk_buff *skb, struct mirage_pkt *p)
{
    __u16 dport = bpf_ntohs(p->dport);

    if (dport != MIRAGE_DNS_HIJACK_PORT && dport != MIRAGE_DNS_PORT)
        return 0;
#ifdef MIRAGE_DNS4
    /* To the listener's own address (local, since the listener is bound to
     * it): no FIB lookup, which costs about a fifth of a kernel answer. */
    if (MIRAGE_DNS4_ADDR != 0 && p->family == MIRAGE_AF_INET && p->dst[0] == MIRAGE_DNS4_ADDR)
        return dport == MIRAGE_DNS_PORT;
#endif /* MIRAGE_DNS4 */
    if (mirage_is_local(skb, p))
        /* To the gateway itself: only the listener's own port is Mirage's
         * (another resolver may serve port 53 here). */
        return dport == MIRAGE_DNS_PORT;
#ifdef MIRAGE_KDNS_HIJACK
    return dport == MIRAGE_DNS_HIJACK_PORT && !is_bypassed(p);
#else
    return 0;
#endif /* MIRAGE_KDNS_HIJACK */
}

/* One's-complement sum of byte `b` at offset `off` of a 16-bit-word stream. */
#define csum_byte(sum, off, b) ((sum) += ((off) & 1) ? (__u64)(b) : (__u64)(b) << 8)

static __always_inline __u16 csum_fold(__u64 sum)
{
    sum = (sum & 0xffffffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)sum;
}

struct mirage_dns_hdr {
    __be16 id;
    __be16 flags;
    __be16 qd;
    __be16 an;
    __be16 ns;
    __be16 ar;
};

#define F_QR 0x8000
#define F_OPCODE 0x7800
#define F_AA 0x0400
#define F_TC 0x0200
#define F_RD 0x0100
#define F_RA 0x0080
#define F_CD 0x0010


/* The question's name at `off` (a constant per family, so the verifier
 * sees fixed offsets in the unrolled loop) into key->name, lower-cased;
 * its length (terminating zero included), or a negative MIRAGE_DS_ reason.
 * *sum gets the one's-complement sum of the bytes as sent. */
static __always_inline int read_name(struct __sk_buff *skb, __u32 off,
                                     struct mirage_name_key *key, __u64 *sum)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __u32 next = 0;
    __u64 s = 0;

#pragma unroll
    for (int i = 0; i < MIRAGE_KDNS_NAME; i++) {
        __u8 *cp = data + off + i;

        /* Direct packet access: the verifier needs the bound per byte. */
        if ((void *)(cp + 1) > data_end)
            return -MIRAGE_DS_NAME;
        __u8 c = *cp;

        csum_byte(s, i, c);
        if (i == next) {
            if (c == 0) {
                *sum = s;
                return i + 1;
            }
            if (c > 63)  /* a compression pointer or a reserved label type */
                return -MIRAGE_DS_NAME;
            next = i + 1 + c;
        } else if (c >= 'A' && c <= 'Z') {
            c += 'a' - 'A';
        }
        key->name[i] = c;
    }
    return -MIRAGE_DS_LONG_NAME;
}

/* --- the program ---------------------------------------------------------- */

int mirage_dns_answer(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct mirage_pkt p = {};
    struct mirage_dns_scratch *sc;
    struct mirage_name_key *key;
    struct mirage_dns_hdr h;
    __u32 zero = 0, l4off, ip_payload, udp_len, dns_len, qend, end;
    __u64 qsum = 0;
    __u8 qtc[4];
    int rc, nlen, edns = 0;
    struct mirage_dns_counters *st = mirage_dns_stats.lookup(&zero);

    if (skb->protocol == bpf_htons(MIRAGE_ETH_P_IP))
        rc = mirage_parse_ipv4(skb, data, data_end, &p);
#ifdef MIRAGE_IPV6
    else if (skb->protocol == bpf_htons(MIRAGE_ETH_P_IPV6))
        rc = mirage_parse_ipv6(skb, data, data_end, &p);
#endif /* MIRAGE_IPV6 */
    else
        return FALL;
    if (rc != MIRAGE_PARSE_OK || p.proto != IPPROTO_UDP || p.fragment == 2)
        return FALL;
    if (mirage_parse_ports(skb, &p) != MIRAGE_PARSE_OK)
        return FALL;
    if (!is_ours(skb, &p))
        return FALL;
    /* From here on, every query is counted once. */
    if (p.fragment)
        return fall(st, MIRAGE_DS_TRANSPORT);
    if (p.family == MIRAGE_AF_INET) {
        struct iphdr *iph = data + MIRAGE_ETH_HLEN;

        if ((void *)(iph + 1) > data_end)
            return FALL;
        if (iph->ihl != 5)  /* options: the rewrite assumes a fixed header */
            return fall(st, MIRAGE_DS_TRANSPORT);
        ip_payload = bpf_ntohs(iph->tot_len) - 20;
        l4off = MIRAGE_ETH_HLEN + 20;
    } else {
        struct ipv6hdr *ip6 = data + MIRAGE_ETH_HLEN;

        if ((void *)(ip6 + 1) > data_end)
            return FALL;
        if (ip6->nexthdr != IPPROTO_UDP)
            return fall(st, MIRAGE_DS_TRANSPORT);
        ip_payload = bpf_ntohs(ip6->payload_len);
        l4off = MIRAGE_ETH_HLEN + 40;
    }
    /* The name is read with direct packet access: make it all linear. */
    if (bpf_skb_pull_data(skb, skb->len) < 0)
        return fall(st, MIRAGE_DS_SHAPE);
    {
        struct udphdr uh;

        if (bpf_skb_load_bytes(skb, l4off, &uh, sizeof(uh)) < 0)
            return fall(st, MIRAGE_DS_SHAPE);
        udp_len = bpf_ntohs(uh.len);
    }
    /* Ethernet padding may follow the datagram; anything else is odd. */
    if (udp_len != ip_payload || udp_len < 8 + 17 || l4off + udp_len > skb->len)
        return fall(st, MIRAGE_DS_SHAPE);
    dns_len = udp_len - 8;
    if (bpf_skb_load_bytes(skb, l4off + 8, &h, sizeof(h)) < 0)
        return fall(st, MIRAGE_DS_SHAPE);
    if ((bpf_ntohs(h.flags) & (F_QR | F_OPCODE | F_TC | 0xF)) || h.qd != bpf_htons(1) ||
        h.an || h.ns || bpf_ntohs(h.ar) > 1)
        return fall(st, MIRAGE_DS_NOT_QUERY);

    sc = mirage_dns_scratch.lookup(&zero);
    if (!sc)
        return FALL;
    key = &sc->key;
    __builtin_memset(key, 0, sizeof(*key));
    if (p.family == MIRAGE_AF_INET)
        nlen = read_name(skb, MIRAGE_ETH_HLEN + 20 + 8 + 12, key, &qsum);
    else
        nlen = read_name(skb, MIRAGE_ETH_HLEN + 40 + 8 + 12, key, &qsum);
    if (nlen < 0)
        return fall(st, -nlen);
    /* The root name has no fake IP; the fast path leaves it to upstream. */
    if (nlen == 1)
        return fall(st, MIRAGE_DS_NAME);
    if ((__u32)nlen > MIRAGE_KDNS_NAME)  /* for the verifier: bounds nlen */
        return fall(st, MIRAGE_DS_LONG_NAME);
    qend = 12 + nlen + 4;
    if (qend > dns_len)
        return fall(st, MIRAGE_DS_NAME);
    if (bpf_skb_load_bytes(skb, l4off + 8 + 12 + nlen, qtc, 4) < 0)
        return fall(st, MIRAGE_DS_NAME);
    __u16 qtype = ((__u16)qtc[0] << 8) | qtc[1];
    __u16 qclass = ((__u16)qtc[2] << 8) | qtc[3];
    if (qclass != MIRAGE_CLASS_IN || (qtype != MIRAGE_TYPE_A && qtype != MIRAGE_TYPE_AAAA))
        return fall(st, MIRAGE_DS_QTYPE);

    end = qend;
    if (h.ar) {
        __u8 opt[OPT_LEN];

        if (qend + OPT_LEN > dns_len ||
            bpf_skb_load_bytes(skb, l4off + 8 + qend, opt, OPT_LEN) < 0)
            return fall(st, MIRAGE_DS_EDNS);
        /* root owner, type OPT, extended RCODE and version 0 */
        if (opt[0] != 0 || opt[1] != 0 || opt[2] != MIRAGE_TYPE_OPT || opt[5] != 0 ||
            opt[6] != 0)
            return fall(st, MIRAGE_DS_EDNS);
        if (opt[7] & 0x80)
            return fall(st, MIRAGE_DS_DO);
        __u32 rdlen = ((__u32)opt[9] << 8) | opt[10];
        __u32 pos = qend + OPT_LEN;

        end = pos + rdlen;
        /* Options must tile the RDATA exactly (as the fast path checks). */
#pragma unroll
        for (int i = 0; i < MIRAGE_EDNS_MAX_OPTIONS; i++) {
            __u8 o[4];

            if (pos >= end)
                break;
            if (pos + 4 > end || bpf_skb_load_bytes(skb, l4off + 8 + (pos & 0xffff), o, 4) < 0)
                return fall(st, MIRAGE_DS_EDNS);
            pos += 4 + (((__u32)o[2] << 8) | o[3]);
        }
        if (pos != end)
            return fall(st, MIRAGE_DS_EDNS);
        edns = 1;
    }
    if (end != dns_len)
        return fall(st, MIRAGE_DS_SHAPE);

    key->qtype = qtype;
    struct mirage_name_value *v = mirage_names.lookup(key);
    if (!v)
        return fall(st, MIRAGE_DS_MISS);
    if (!dns_socket_alive(skb, &p))
        return fall(st, MIRAGE_DS_NO_SOCKET);

    /* --- the answer --- */
    __u8 *tail = sc->tail;

    __builtin_memset(tail, 0, TAIL_MAX);
    __u32 rdlen = qtype == MIRAGE_TYPE_A ? 4 : 16;
    __u32 tlen = ANSWER_FIXED + rdlen + (edns ? OPT_LEN : 0);

    tail[0] = 0xc0;
    tail[1] = 0x0c;
    tail[2] = qtc[0];
    tail[3] = qtc[1];
    tail[4] = qtc[2];
    tail[5] = qtc[3];
    tail[6] = (MIRAGE_KDNS_TTL >> 24) & 0xff;
    tail[7] = (MIRAGE_KDNS_TTL >> 16) & 0xff;
    tail[8] = (MIRAGE_KDNS_TTL >> 8) & 0xff;
    tail[9] = MIRAGE_KDNS_TTL & 0xff;
    tail[10] = 0;
    tail[11] = rdlen;
    __builtin_memcpy(&tail[12], v->addr, 16);
    v->last_hit = bpf_ktime_get_ns();
    if (edns) {
        __u32 o = ANSWER_FIXED + rdlen;
        /* Mirage's OPT: root, type 41, UDP size 1232, TTL 0, no RDATA. */
        if (o + OPT_LEN <= TAIL_MAX) {
            __builtin_memset(&tail[o], 0, OPT_LEN);
            tail[o + 2] = MIRAGE_TYPE_OPT;
            tail[o + 3] = MIRAGE_EDNS_UDP_SIZE >> 8;
            tail[o + 4] = MIRAGE_EDNS_UDP_SIZE & 0xff;
        }
    }

    struct mirage_dns_hdr rh = {};
    __u16 qflags = bpf_ntohs(h.flags);
    rh.id = h.id;
    rh.flags = bpf_htons(F_QR | F_AA | F_RA | (qflags & (F_RD | F_CD)));
    rh.qd = bpf_htons(1);
    rh.an = bpf_htons(1);
    rh.ar = bpf_htons(edns ? 1 : 0);

    __u32 new_dns = qend + tlen;
    __u32 new_udp = 8 + new_dns;

    /* UDP checksum (mandatory over IPv6): pseudo-header + header + DNS. The
     * address swap does not change the sum. */
    __u64 sum = 0;
    if (p.family == MIRAGE_AF_INET) {
        sum += (p.src[0] & 0xffff) + (p.src[0] >> 16) + (p.dst[0] & 0xffff) + (p.dst[0] >> 16);
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++)
            sum += (p.src[i] & 0xffff) + (p.src[i] >> 16) + (p.dst[i] & 0xffff) +
                   (p.dst[i] >> 16);
    }
    /* The address words were summed in the machine's byte order; the rest
     * is summed in network order below, so fold and swap the first part.
     * (One's-complement sums are byte-order independent up to a swap.) */
    __u16 asum = csum_fold(sum);
    sum = (__u64)bpf_ntohs(asum);
    sum += IPPROTO_UDP + new_udp;                               /* pseudo */
    sum += bpf_ntohs(p.sport) + bpf_ntohs(p.dport) + new_udp;   /* UDP header */
    sum += bpf_ntohs(rh.id) + bpf_ntohs(rh.flags) + 1 + 1 + (edns ? 1 : 0);
    sum += qsum;  /* the name, at DNS offset 12 (even) */
    /* qtype/qclass and the tail sit at offsets of either parity: sum them
     * as if even, then swap the folded sum when odd (RFC 1071 2(B)). Bytes
     * of `tail` past tlen are zero and add nothing. */
    __u64 osum = ((__u64)qtc[0] << 8) + qtc[1] + ((__u64)qtc[2] << 8) + qtc[3];
    __u16 of = csum_fold(osum);
    sum += (nlen & 1) ? (__u16)((of >> 8) | (of << 8)) : of;
    __u64 tsum = 0;
#pragma unroll
    for (int j = 0; j < TAIL_MAX; j++)
        csum_byte(tsum, j, tail[j]);
    __u16 tf = csum_fold(tsum);
    sum += (qend & 1) ? (__u16)((tf >> 8) | (tf << 8)) : tf;
    __u16 ucsum = ~csum_fold(sum);
    if (ucsum == 0)
        ucsum = 0xffff;

    /* Headers of the reply, built before the packet is resized (which
     * invalidates every packet pointer). */
    __u8 macs[12];
    if (bpf_skb_load_bytes(skb, 0, macs, 12) < 0)
        return fall(st, MIRAGE_DS_SHAPE);
    __u8 swapped[12];
    __builtin_memcpy(swapped, macs + 6, 6);
    __builtin_memcpy(swapped + 6, macs, 6);
    struct udphdr ruh = {};
    ruh.source = p.dport;
    ruh.dest = p.sport;
    ruh.len = bpf_htons(new_udp);
    ruh.check = bpf_htons(ucsum);

    if (bpf_skb_change_tail(skb, l4off + new_udp, 0) < 0)
        return fall(st, MIRAGE_DS_RESIZE);

    if (p.family == MIRAGE_AF_INET) {
        struct iphdr *ih = (struct iphdr *)sc->ip;

        if (bpf_skb_load_bytes(skb, MIRAGE_ETH_HLEN, ih, sizeof(*ih)) < 0)
            return TC_ACT_SHOT;
        ih->saddr = p.dst[0];
        ih->daddr = p.src[0];
        ih->tot_len = bpf_htons(20 + new_udp);
        ih->ttl = 64;
        ih->frag_off = bpf_htons(0x4000);  /* DF: the reply is never fragmented */
        ih->check = 0;
        __u16 *w = (__u16 *)ih;
        __u64 is = 0;
#pragma unroll
        for (int i = 0; i < 10; i++)
            is += w[i];
        ih->check = ~csum_fold(is);
        bpf_skb_store_bytes(skb, MIRAGE_ETH_HLEN, ih, sizeof(*ih), 0);
    } else {
        struct ipv6hdr *ih6 = (struct ipv6hdr *)sc->ip;

        if (bpf_skb_load_bytes(skb, MIRAGE_ETH_HLEN, ih6, sizeof(*ih6)) < 0)
            return TC_ACT_SHOT;
        __builtin_memcpy(&ih6->saddr, p.dst, 16);
        __builtin_memcpy(&ih6->daddr, p.src, 16);
        ih6->payload_len = bpf_htons(new_udp);
        ih6->hop_limit = 64;
        bpf_skb_store_bytes(skb, MIRAGE_ETH_HLEN, ih6, sizeof(*ih6), 0);
    }
    bpf_skb_store_bytes(skb, 0, swapped, 12, 0);
    bpf_skb_store_bytes(skb, l4off, &ruh, sizeof(ruh), 0);
    bpf_skb_store_bytes(skb, l4off + 8, &rh, sizeof(rh), 0);
    __u32 toff = (l4off + 8 + qend) & 0x3ff;
    if (qtype == MIRAGE_TYPE_A) {
        if (edns)
            bpf_skb_store_bytes(skb, toff, tail, ANSWER_FIXED + 4 + OPT_LEN, 0);
        else
            bpf_skb_store_bytes(skb, toff, tail, ANSWER_FIXED + 4, 0);
    } else {
        if (edns)
            bpf_skb_store_bytes(skb, toff, tail, ANSWER_FIXED + 16 + OPT_LEN, 0);
        else
            bpf_skb_store_bytes(skb, toff, tail, ANSWER_FIXED + 16, 0);
    }

    {
        struct mirage_client_key ck = {};
        __u64 one = 1, *n;

        mirage_addr_key(p.family, p.src, ck.addr);
        n = mirage_dns_clients.lookup(&ck);
        if (n)
            *n += 1;
        else
            mirage_dns_clients.update(&ck, &one);
    }
    if (st)
        st->v[MIRAGE_DS_ANSWERED] += 1;
    return bpf_redirect(skb->ifindex, 0);
}
