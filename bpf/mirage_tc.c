/* Mirage's tc ingress program: the eBPF capture backend (appliance.redirect: ebpf).
 *
 * Attached (direct-action) to a clsact qdisc's ingress on every appliance.lan
 * interface by appliance/capture/ebpf.py, which compiles this file with bcc
 * and passes the configuration as -D defines (below) plus the bypass trie.
 * It does in one program what nft/mirage.nft does with TPROXY, without any
 * nftables rule (docs/architecture.md; Cilium's bpf/lib/proxy.h is the same
 * design):
 *
 *   TCP SYN to a fake range      -> the transparent listener on tproxy-port
 *                                   (or the flow's socket, for a retransmit);
 *   other TCP to a fake range    -> marked only: the kernel's own lookup (early
 *                                   demux) finds the accepted socket;
 *   UDP to a fake range          -> a socket connected to the flow, else the
 *                                   transparent socket on tproxy-port;
 *   TCP/UDP port 53, any address -> the DNS service's socket (dns-hijack);
 *
 * each with skb->mark = capture mark (and, but for the marked-only case,
 * bpf_sk_assign), so that
 * `ip rule fwmark MARK lookup TABLE` + `local default dev lo table TABLE`
 * deliver it locally although its destination is not a local address. The
 * packet is not rewritten: the socket sees the address and port the client
 * asked (getsockname / IP_ORIGDSTADDR), and answers from it.
 *
 * Everything else is passed untouched (TC_ACT_OK): other destinations, bypass
 * ranges, the gateway's own addresses (port 53 only: fake ranges are never
 * local), packets carrying routing-mark, non-IP. Traffic to a fake range is
 * never passed: a fake IP means nothing on the WAN, so what cannot be handed
 * to a socket (no listener, fragments, neither TCP nor UDP, truncated) is
 * dropped and counted (mirage_stats, see lib/stats.h). Loop guard: TCP/UDP
 * to tproxy-port on the gateway's own address is dropped (counted), since
 * the transparent listener would take it with a real destination and Mirage
 * would dial itself.
 *
 * "The gateway's own address" is what nftables calls `fib daddr type local`:
 * bpf_fib_lookup answers NOT_FWDED (local, broadcast; also no route at all,
 * when such a packet would be dropped anyway). It is asked only for port-53
 * and tproxy-port packets, never on the fake-range or plain forwarding path.
 *
 * Per-client counters (mirage_clients, LRU per-CPU hash keyed by source
 * address): every IP packet entering from the LAN, and how much of it was
 * captured.
 *
 * Fail-safe: port 53 with no DNS socket to take it (Mirage was killed and
 * this program stayed attached) is passed, counted, to the resolver the
 * client asked; fake-range traffic is still never passed.
 *
 * Fragments: in front of IP reassembly, a later fragment has no ports and the
 * first one cannot be assigned for the whole datagram. To a fake range every
 * fragment is dropped (counted); elsewhere fragments pass, including DNS
 * (a fragmented DNS query, rare, reaches the resolver it was sent to).
 */

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

/* --- configuration (-D from appliance/capture/ebpf/plan.py) --------------- */

#ifndef MIRAGE_CAPTURE_MARK
#error "MIRAGE_CAPTURE_MARK (appliance.capture-mark) is required"
#endif
#ifndef MIRAGE_TPROXY_PORT
#error "MIRAGE_TPROXY_PORT (tproxy-port) is required"
#endif
/* Fake IPv4 range: address and netmask as the raw 32-bit word the packet
 * holds (network byte order read natively), so the test is one AND. */
#if !defined(MIRAGE_FAKE4_NET) || !defined(MIRAGE_FAKE4_MASK)
#error "MIRAGE_FAKE4_NET and MIRAGE_FAKE4_MASK (dns.fake-ip-range) are required"
#endif
#if defined(MIRAGE_FAKE6) && !defined(MIRAGE_IPV6)
#error "MIRAGE_FAKE6 needs MIRAGE_IPV6"
#endif
#if defined(MIRAGE_DNS6) && !defined(MIRAGE_IPV6)
#error "MIRAGE_DNS6 needs MIRAGE_IPV6"
#endif
#if (defined(MIRAGE_DNS4) || defined(MIRAGE_DNS6)) && !defined(MIRAGE_DNS_PORT)
#error "MIRAGE_DNS_PORT (dns.listen port) is required with dns-hijack"
#endif
#ifndef MIRAGE_CLIENTS_MAX
#define MIRAGE_CLIENTS_MAX 4096
#endif
#ifndef MIRAGE_BYPASS_MAX
#define MIRAGE_BYPASS_MAX 1024
#endif

#define MIRAGE_DNS_HIJACK_PORT 53

#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/addr.h"

/* --- maps ------------------------------------------------------------------ */

/* All counters in one per-CPU element: one map lookup per packet. */
struct mirage_counters {
    __u64 v[MIRAGE_ST_MAX];
};
BPF_PERCPU_ARRAY(mirage_stats, struct mirage_counters, 1);

/* Per-client counters, LAN -> gateway, keyed by source address (IPv4 as
 * IPv4-mapped IPv6). LRU: a LAN full of (possibly spoofed) sources evicts
 * the quiet ones instead of failing updates. */
struct mirage_client {
    __u64 packets;
    __u64 bytes;
    __u64 captured_packets;
    __u64 captured_bytes;
};
BPF_TABLE("lru_percpu_hash", struct mirage_client_key, struct mirage_client, mirage_clients,
          MIRAGE_CLIENTS_MAX);

/* Destinations never captured (appliance.bypass plus loopback, link-local,
 * multicast, broadcast), IPv4 as IPv4-mapped IPv6 prefixes (/96 + len). */
BPF_LPM_TRIE(mirage_bypass, struct mirage_lpm_key, __u8, MIRAGE_BYPASS_MAX);

#ifdef MIRAGE_TEST_ASSIGN
/* BPF_PROG_TEST_RUN does not run at tc ingress, where bpf_sk_assign works
 * (it returns -EOPNOTSUPP there): the test build records which socket the
 * program would have assigned instead (tests/integration/test_ebpf_prog.py). */
struct mirage_probe {
    __u32 which;
    __u32 family;
    __u32 state;
    __u32 port;  /* the socket's local port, host order */
    __u32 assigned;
};
BPF_ARRAY(mirage_probe, struct mirage_probe, 1);
#endif /* MIRAGE_TEST_ASSIGN */

/* --- helpers --------------------------------------------------------------- */

static __always_inline int is_bypassed(struct mirage_pkt *p)
{
    struct mirage_lpm_key k = {};

    mirage_host_key(p, &k);
    return mirage_bypass.lookup(&k) != 0;
}

/* `st` may be NULL (the lookup cannot fail for index 0 of an array, but
 * the verifier does not know that). */
#define stat_add(st, idx, n)        \
    do {                            \
        if (st)                     \
            (st)->v[(idx)] += (n);  \
    } while (0)

static __always_inline int drop(struct mirage_counters *st, __u32 why)
{
    stat_add(st, why, 1);
    return TC_ACT_SHOT;
}

static __always_inline int pass(struct mirage_counters *st, __u32 why)
{
    stat_add(st, why, 1);
    return TC_ACT_OK;
}

static __always_inline struct mirage_client *client(struct mirage_pkt *p, __u32 len)
{
    struct mirage_client_key k = {};
    struct mirage_client *c;

    mirage_addr_key(p->family, p->src, k.addr);
    c = mirage_clients.lookup(&k);
    if (!c) {
        struct mirage_client zero = {};

        mirage_clients.update(&k, &zero);
        c = mirage_clients.lookup(&k);
        if (!c)
            return 0;
    }
    c->packets += 1;
    c->bytes += len;
    return c;
}

static __always_inline int is_fake(struct mirage_pkt *p)
{
    if (p->family == MIRAGE_AF_INET)
        return (p->dst[0] & MIRAGE_FAKE4_MASK) == MIRAGE_FAKE4_NET;
#ifdef MIRAGE_FAKE6
    return (p->dst[0] & MIRAGE_FAKE6_M0) == MIRAGE_FAKE6_A0 &&
           (p->dst[1] & MIRAGE_FAKE6_M1) == MIRAGE_FAKE6_A1 &&
           (p->dst[2] & MIRAGE_FAKE6_M2) == MIRAGE_FAKE6_A2 &&
           (p->dst[3] & MIRAGE_FAKE6_M3) == MIRAGE_FAKE6_A3;
#else
    return 0;
#endif /* MIRAGE_FAKE6 */
}

#define MIRAGE_NO_SOCKET (-2)   /* -ENOENT: nothing to assign */

static __always_inline long assign(struct __sk_buff *skb, struct bpf_sock *sk, __u32 which)
{
    long ret;

#ifdef MIRAGE_TEST_ASSIGN
    __u32 zero = 0;
    struct mirage_probe *pr = mirage_probe.lookup(&zero);

    if (pr) {
        pr->which = which;
        pr->family = sk->family;
        pr->state = sk->state;
        pr->port = sk->src_port;
        pr->assigned += 1;
    }
    ret = 0;
#else
    ret = bpf_sk_assign(skb, sk, 0);
#endif /* MIRAGE_TEST_ASSIGN */
    /* Every socket a lookup returned holds a reference: release it on every
     * path, or the verifier rejects the program (reference leak). */
    bpf_sk_release(sk);
    return ret;
}

/* TCP: the flow's socket (anything but a listener: established, SYN-RECV,
 * TIME-WAIT), else the listener at (addr, port). *which gets the counter. */
static __always_inline long steer_tcp(struct __sk_buff *skb, struct mirage_pkt *p,
                                      __u32 a0, __u32 a1, __u32 a2, __u32 a3, __u16 port,
                                      __u32 st_flow, __u32 st_listener, __u32 *which)
{
    struct bpf_sock_tuple t = {};
    __u32 len = mirage_tuple_of(p, &t);
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);

    if (sk) {
        if (sk->state != BPF_TCP_LISTEN) {
            *which = st_flow;
            return assign(skb, sk, st_flow);
        }
        /* Some local service listening on the destination port: not ours. */
        bpf_sk_release(sk);
    }
    mirage_tuple_listener(p, &t, a0, a1, a2, a3, port);
    sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return MIRAGE_NO_SOCKET;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return MIRAGE_NO_SOCKET;
    }
    *which = st_listener;
    return assign(skb, sk, st_listener);
}

/* UDP: a socket connected to exactly this flow (what TPROXY's established
 * lookup also prefers), else the socket at (addr, port). An unconnected
 * socket bound to the destination (a reply socket) is deliberately skipped. */
static __always_inline long steer_udp(struct __sk_buff *skb, struct mirage_pkt *p,
                                      __u32 a0, __u32 a1, __u32 a2, __u32 a3, __u16 port,
                                      __u32 st_flow, __u32 st_listener, __u32 *which)
{
    struct bpf_sock_tuple t = {};
    __u32 len = mirage_tuple_of(p, &t);
    struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);

    if (sk) {
        /* A connected UDP socket is in TCP_ESTABLISHED. */
        if (sk->state == BPF_TCP_ESTABLISHED) {
            *which = st_flow;
            return assign(skb, sk, st_flow);
        }
        bpf_sk_release(sk);
    }
    mirage_tuple_listener(p, &t, a0, a1, a2, a3, port);
    sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return MIRAGE_NO_SOCKET;
    *which = st_listener;
    return assign(skb, sk, st_listener);
}

static __always_inline int captured(struct __sk_buff *skb, struct mirage_counters *st,
                                    long ret, __u32 which, struct mirage_client *c)
{
    if (ret == MIRAGE_NO_SOCKET)
        return drop(st, MIRAGE_ST_DROP_NO_LISTENER);
    if (ret < 0)
        return drop(st, MIRAGE_ST_DROP_ASSIGN);
    skb->mark = MIRAGE_CAPTURE_MARK;
    if (which < MIRAGE_ST_MAX)
        stat_add(st, which, 1);
    if (c) {
        c->captured_packets += 1;
        c->captured_bytes += skb->len;
    }
    return TC_ACT_OK;
}

/* --- the program ---------------------------------------------------------- */

int mirage_ingress(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct mirage_pkt p = {};
    struct mirage_client *c;
    __u32 which = 0, zero = 0;
    long ret;
    int rc;
    struct mirage_counters *st = mirage_stats.lookup(&zero);

    stat_add(st, MIRAGE_ST_PACKETS, 1);
    stat_add(st, MIRAGE_ST_BYTES, skb->len);

    if (skb->protocol == bpf_htons(MIRAGE_ETH_P_IP))
        rc = mirage_parse_ipv4(skb, data, data_end, &p);
#ifdef MIRAGE_IPV6
    else if (skb->protocol == bpf_htons(MIRAGE_ETH_P_IPV6))
        rc = mirage_parse_ipv6(skb, data, data_end, &p);
#endif /* MIRAGE_IPV6 */
    else
        return pass(st, MIRAGE_ST_NOT_IP);
    if (rc == MIRAGE_PARSE_SHORT_IP)
        return pass(st, MIRAGE_ST_SHORT);

    c = client(&p, skb->len);

#ifdef MIRAGE_ROUTING_MARK
    /* Mirage's own outbound traffic (SO_MARK), should it come back in
     * through a LAN interface. */
    if (skb->mark == MIRAGE_ROUTING_MARK)
        return pass(st, MIRAGE_ST_OWN);
#endif /* MIRAGE_ROUTING_MARK */

    if (rc == MIRAGE_PARSE_OK)
        rc = mirage_parse_ports(skb, &p);

    if (is_fake(&p)) {
        if (is_bypassed(&p))
            return pass(st, MIRAGE_ST_BYPASS);
        if (rc != MIRAGE_PARSE_OK)
            return drop(st, MIRAGE_ST_DROP_MALFORMED);
        if (p.fragment)
            return drop(st, MIRAGE_ST_DROP_FRAGMENT);
        if (p.proto == IPPROTO_TCP) {
            if ((p.tcp_flags & (MIRAGE_TCP_SYN | MIRAGE_TCP_ACK)) != MIRAGE_TCP_SYN) {
                /* Not a connection request: a packet of a flow whose socket
                 * (accepted from the listener, bound to this very fake
                 * address and port) the kernel's own lookup finds. The mark
                 * is enough, as nft's `socket transparent` rule does: no
                 * lookup here, and no skb->sk, so early demux keeps its
                 * cached route. With no such socket the packet is still
                 * delivered locally, where the kernel answers RST: never
                 * forwarded. */
                return captured(skb, st, 0, MIRAGE_ST_TCP_ESTABLISHED, c);
            }
            ret = steer_tcp(skb, &p, 0, 0, 0, 0, MIRAGE_TPROXY_PORT, MIRAGE_ST_TCP_ESTABLISHED,
                            MIRAGE_ST_TCP_LISTENER, &which);
        } else if (p.proto == IPPROTO_UDP) {
            ret = steer_udp(skb, &p, 0, 0, 0, 0, MIRAGE_TPROXY_PORT, MIRAGE_ST_UDP_CONNECTED,
                            MIRAGE_ST_UDP_LISTENER, &which);
        } else {
            return drop(st, MIRAGE_ST_DROP_NOT_TCP_UDP);
        }
        return captured(skb, st, ret, which, c);
    }

    if (rc != MIRAGE_PARSE_OK || p.fragment)
        return TC_ACT_OK;
    if (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP)
        return TC_ACT_OK;

#if defined(MIRAGE_DNS4) || defined(MIRAGE_DNS6)
    if (p.dport == bpf_htons(MIRAGE_DNS_HIJACK_PORT)) {
        __u32 a0 = 0, a1 = 0, a2 = 0, a3 = 0;

        if (p.family == MIRAGE_AF_INET) {
#ifdef MIRAGE_DNS4
            a0 = MIRAGE_DNS4_ADDR;
#else
            return TC_ACT_OK;
#endif /* MIRAGE_DNS4 */
        } else {
#ifdef MIRAGE_DNS6
            a0 = MIRAGE_DNS6_A0;
            a1 = MIRAGE_DNS6_A1;
            a2 = MIRAGE_DNS6_A2;
            a3 = MIRAGE_DNS6_A3;
#else
            return TC_ACT_OK;
#endif /* MIRAGE_DNS6 */
        }
        if (is_bypassed(&p))
            return pass(st, MIRAGE_ST_BYPASS);
        /* The gateway's own resolvers (and Mirage's, when listening on 53)
         * are reached without any help. */
        if (mirage_is_local(skb, &p))
            return pass(st, MIRAGE_ST_LOCAL);
        if (p.proto == IPPROTO_TCP)
            ret = steer_tcp(skb, &p, a0, a1, a2, a3, MIRAGE_DNS_PORT, MIRAGE_ST_DNS_TCP,
                            MIRAGE_ST_DNS_TCP, &which);
        else
            ret = steer_udp(skb, &p, a0, a1, a2, a3, MIRAGE_DNS_PORT, MIRAGE_ST_DNS_UDP,
                            MIRAGE_ST_DNS_UDP, &which);
        /* Fail-safe: no DNS socket means Mirage is gone (killed, crashed)
         * while this program stays attached. The query goes on to the
         * resolver the client asked instead of into a black hole. */
        if (ret == MIRAGE_NO_SOCKET)
            return pass(st, MIRAGE_ST_DNS_NO_SOCKET);
        return captured(skb, st, ret, which, c);
    }
#endif /* MIRAGE_DNS4 || MIRAGE_DNS6 */

    /* Loop guard: a LAN client naming the gateway's own address at
     * tproxy-port would reach the transparent listener with a real
     * destination, which Mirage would dial, reaching itself again. */
    if (p.dport == bpf_htons(MIRAGE_TPROXY_PORT) && mirage_is_local(skb, &p))
        return drop(st, MIRAGE_ST_DROP_LOOP);

    return TC_ACT_OK;
}

/* --- sk_lookup: a SYN that met a TIME-WAIT socket -------------------------- */

/* Mirage's transparent TCP listener (index 0), written by the loader. */
/* Declared with the generic table macro: bcc's BPF_SOCKMAP has no lookup(). */
BPF_TABLE("sockmap", __u32, __u32, mirage_listener, 1);

/* Attached to the gateway's network namespace (a BPF_SK_LOOKUP link), it
 * answers the kernel's *listener* lookups for fake-range TCP.
 *
 * Why: a client that reuses a finished flow's addresses and ports sends its
 * SYN to the socket the gateway keeps in TIME-WAIT for that flow (Mirage
 * usually closes toward the client first). The kernel then asks for a
 * listener on the SYN's destination to take over; a fake address has none,
 * so the TIME-WAIT socket answers with an ACK, the client resets and retries
 * after its timeout. With this program that lookup finds Mirage's listener,
 * the TIME-WAIT socket is retired and the SYN accepted at once: what
 * TPROXY's own TIME-WAIT handling does for the nftables backend. (The tc
 * program cannot do it: assigning the listener there while the TIME-WAIT
 * socket still holds the 4-tuple makes the kernel drop the new request.)
 *
 * Only listener lookups run it (a SYN with no established socket, or one
 * that met a TIME-WAIT socket); other destinations pass untouched. */
int mirage_sk_lookup(struct bpf_sk_lookup *ctx)
{
    struct mirage_pkt p = {};
    struct bpf_sock *sk;
    __u32 zero = 0;

    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    p.family = ctx->family;
    if (ctx->family == MIRAGE_AF_INET) {
        p.dst[0] = ctx->local_ip4;
    } else {
        p.dst[0] = ctx->local_ip6[0];
        p.dst[1] = ctx->local_ip6[1];
        p.dst[2] = ctx->local_ip6[2];
        p.dst[3] = ctx->local_ip6[3];
    }
    if (!is_fake(&p))
        return SK_PASS;
    sk = (struct bpf_sock *)mirage_listener.lookup(&zero);
    if (!sk)
        return SK_PASS;
    bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return SK_PASS;
}
