/* flow_parse.h — packet parsing into a struct flow_key (no maps here: anomalies are reported in
 * struct pkt_info and counted by the caller; whether an interface decapsulates is the includer's
 * DECAP_WANTED).
 *
 * Two passes share one body (the `direct` argument is a compile-time constant after inlining):
 *  - direct: headers are read in place from the linear area (skb->data .. skb->data_end) with bounds
 *    checks. The first header that is not wholly there — beyond data_end (non-linear skb, or short
 *    frame) or at an offset past PKT_DIRECT_MAX_OFF — aborts the pass with PARSE_RETRY.
 *  - load_bytes: the original parser, every read through bpf_skb_load_bytes, which fails cleanly on
 *    short packets; run from scratch only when the direct pass aborted. It alone decides what is
 *    truncated (a header beyond skb->len), so anomaly counting is exactly that of bpf_skb_load_bytes.
 *    (TUNNEL_DECAP: the direct pass stops at a tunnel header with PARSE_TUNNEL, and the tunnel and
 *    inner headers are read by the load_bytes pass's parse_tunnel, the outer key kept.)
 * Both read the same bytes at the same offsets (data_end - data <= skb->len), so a packet gives the
 * same key and pkt_info whichever pass completes. */
#ifndef IPFIXER_FLOW_PARSE_H
#define IPFIXER_FLOW_PARSE_H

#include "flow_types.h"

#define ETH_HLEN_ 14
#define ETHP_IP 0x0800
#define ETHP_IPV6 0x86DD
#define ETHP_8021Q 0x8100
#define ETHP_8021AD 0x88A8
#define MAX_VLAN_TAGS 2              /* unrolled loop bound: QinQ (802.1ad outer + 802.1Q inner) */
#define IPV6_MAX_EXT 6               /* unrolled loop bound: the verifier needs a constant trip count, and
                                        each unrolled header walk adds instructions to both passes */
#ifndef PKT_DIRECT_MAX_OFF
/* Direct pass: farther headers go through bpf_skb_load_bytes. The offset is computed from packet bytes
 * (IHL, extension header lengths); the verifier only accepts data + off when off has a known upper
 * bound (below MAX_PACKET_OFF, 0xffff), and this comparison is that bound. A -D so tests can force the
 * fallback at chosen offsets. */
#define PKT_DIRECT_MAX_OFF 4096
#endif
#define PARSE_RETRY 0xff             /* pkt_info.anomaly of an aborted direct pass (never counted) */
#define PARSE_TUNNEL 0xfe            /* the direct pass stopped at a tunnel header (never counted) */

/* IP protocol / IPv6 Next Header numbers (IANA "Assigned Internet Protocol Numbers"); the extension
 * headers are those of RFC 8200 4.1 (and RFC 4302 AH) that the IPv6 walk below skips. Own names, not
 * uapi/linux/in.h's IPPROTO_* (an enum there: defining the same names as macros would break it).
 * ipfixer/sources/packets.py uses the same names and values (tests/unit/test_packet_names.py checks). */
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define PROTO_SCTP 132
#define PROTO_UDPLITE 136
#define IPV6_NH_HOPOPTS 0            /* hop-by-hop options */
#define IPV6_NH_ROUTING 43
#define IPV6_NH_FRAGMENT 44
#define IPV6_NH_AH 51                /* length in 4-octet units minus 2 (RFC 4302 2.2) */
#define IPV6_NH_DSTOPTS 60           /* destination options */
#define ENCAP_IPIP 4                 /* IPv4 in IP (RFC 2003) */
#define ENCAP_IPV6 41                /* IPv6 in IP: SIT (RFC 4213), IPv6-in-IPv6 (RFC 2473) */
#define ENCAP_GRE 47
#define UDP_PORT_VXLAN 4789          /* IANA, RFC 7348 */
#define UDP_PORT_GENEVE 6081         /* IANA, RFC 8926 */
#define ETHP_TEB 0x6558              /* Transparent Ethernet Bridging: an Ethernet frame follows */

struct pkt_info {
    __u64 octets;                    /* IP-layer octets as the wire carries them (GSO expanded) */
    __u32 packets;                   /* max(gso_segs, 1) */
    __u8  tcp_flags;
    __u8  tos;
    __u8  anomaly;                   /* CNT_* index of a truncation/malformation, 0 if none */
    __u8  fragment;                  /* non-first fragment: no ports */
    __u32 l4_off;                    /* offset of the transport header (the tunnel parser starts there) */
    __u8  tunnel;                    /* TUNNEL_* the packet was decapsulated from, 0 if not */
    __u8  kept_outer;                /* a tunnel packet metered as its outer flow (CNT_DECAP_KEPT_OUTER) */
};

#ifndef DECAP_WANTED
/* Whether this packet's interface decapsulates (the includer may define it: flow_tc.c asks its map). */
#define DECAP_WANTED(skb) 1
#endif

/* Where the headers come from: the linear area, or bpf_skb_load_bytes. */
struct pkt_src {
    struct __sk_buff *skb;
    void *data;
    void *data_end;
};

/* len header bytes at off: a pointer into the linear area (direct), else copied into buf by
 * bpf_skb_load_bytes. NULL if not available — direct: not in the linear area, parse again;
 * load_bytes: the packet is shorter than off + len. */
/* The bounds checks below are the shapes the verifier proves accesses with: every header read is "p + len
 * <= data_end" on a packet pointer (direct) or into a caller's stack buffer of constant size (load_bytes:
 * helpers take only stack memory of a size known at load time), hence buf/len arguments, never a
 * variable-sized read. `direct` is a literal at each call site, so after inlining each pass is its own
 * code and no register is a packet pointer on one path and a stack pointer on another. */
static __always_inline const __u8 *hdr(const struct pkt_src *s, const int direct, __u32 off,
                                       __u8 *buf, __u32 len)
{
    if (direct) {
        if (off > PKT_DIRECT_MAX_OFF)
            return 0;
        const __u8 *p = (const __u8 *)s->data + off;
        if ((const void *)(p + len) > s->data_end)
            return 0;
        return p;
    }
    if (bpf_skb_load_bytes(s->skb, off, buf, len) < 0)
        return 0;
    return buf;
}

/* Anomaly to report for a header that could not be read: in the direct pass, "parse again". */
#define SHORT(direct, kind) ((direct) ? PARSE_RETRY : (kind))

static __always_inline void v4mapped(__u8 *dst, __u32 addr_be)
{
    __builtin_memset(dst, 0, 10);
    dst[10] = 0xff;
    dst[11] = 0xff;
    __builtin_memcpy(dst + 12, &addr_be, 4);
}

/* Transport header at off: ports/ICMP type+code, TCP flags. Returns its length (0 if none/short). */
static __always_inline __u32 parse_l4(const struct pkt_src *s, const int direct, __u32 off,
                                      struct flow_key *key, struct pkt_info *info)
{
    __u8 buf[20];                    /* stack copy for the load_bytes pass: the largest header read here (TCP) */
    const __u8 *b;
    switch (key->protocol) {
    case PROTO_TCP:
        b = hdr(s, direct, off, buf, 20);
        if (!b) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L4);
            return 0;
        }
        key->src_port = ((__u16)b[0] << 8) | b[1];
        key->dst_port = ((__u16)b[2] << 8) | b[3];
        info->tcp_flags = b[13];
        if ((b[12] >> 4) < 5) {
            info->anomaly = CNT_MALFORMED;
            return 20;
        }
        return (__u32)(b[12] >> 4) * 4;
    case PROTO_UDP:
    case PROTO_UDPLITE:
        b = hdr(s, direct, off, buf, 8);
        if (!b) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L4);
            return 0;
        }
        key->src_port = ((__u16)b[0] << 8) | b[1];
        key->dst_port = ((__u16)b[2] << 8) | b[3];
        return 8;
    case PROTO_SCTP: /* common header, ports first */
        b = hdr(s, direct, off, buf, 12);
        if (!b) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L4);
            return 0;
        }
        key->src_port = ((__u16)b[0] << 8) | b[1];
        key->dst_port = ((__u16)b[2] << 8) | b[3];
        return 12;
    case PROTO_ICMP:
    case PROTO_ICMPV6: /* collectors expect dst_port = type*256 + code, src_port 0 */
        b = hdr(s, direct, off, buf, 2);
        if (!b) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L4);
            return 0;
        }
        key->dst_port = ((__u16)b[0] << 8) | b[1];
        return 8;
    }
    return 0;
}

static __always_inline void gso_expand(struct __sk_buff *skb, __u32 l3_off, __u32 hdr_len,
                                       struct pkt_info *info)
{
    /* A GSO super-packet becomes gso_segs packets on the wire, each repeating the IP+L4 headers. */
    __u32 segs = skb->gso_segs;
    if (segs > 1) {
        info->packets = segs;
        info->octets = (__u64)(skb->len - l3_off) + (__u64)(segs - 1) * hdr_len;
    }
}

static __always_inline void parse_ipv4(const struct pkt_src *s, const int direct, __u32 off,
                                       struct flow_key *key, struct pkt_info *info)
{
    __u8 buf[20];                    /* load_bytes pass: the fixed IPv4 header (options are not read) */
    __u32 len = s->skb->len;
    info->octets = len > off ? len - off : 0;
    const __u8 *h = hdr(s, direct, off, buf, 20);
    if (!h) {
        info->anomaly = SHORT(direct, CNT_TRUNC_L3);
        return;
    }
    __u32 ihl = (__u32)(h[0] & 0x0f) * 4;
    if ((h[0] >> 4) != 4 || ihl < 20) {
        info->anomaly = CNT_MALFORMED;
        return;
    }
    __u32 tot_len = ((__u32)h[2] << 8) | h[3];
    __u32 have = info->octets;      /* IP-layer bytes the skb holds: the most the wire carried */
    info->tos = h[1];
    key->protocol = h[9];
    __u32 a;
    __builtin_memcpy(&a, h + 12, 4);
    v4mapped(key->src_addr, a);
    __builtin_memcpy(&a, h + 16, 4);
    v4mapped(key->dst_addr, a);
    if (tot_len == 0 && s->skb->gso_segs > 1) {
        /* BIG TCP super-packet: the skb length is the truth, gso_expand() below */
    } else if (tot_len < ihl) {     /* RFC 791: total length includes the header; 0 without GSO too */
        info->anomaly = CNT_BAD_LENGTH;
        return;
    } else if (tot_len > have) {
        /* A length beyond the bytes received (spoofed, or the frame was cut): octets stay what the
         * skb holds, never the header's claim. GSO skbs are measured by gso_expand() instead. */
        if (s->skb->gso_segs <= 1)
            info->anomaly = CNT_BAD_LENGTH; /* a cut transport header below says trunc_l4 instead */
    } else {
        info->octets = tot_len;     /* excludes Ethernet padding */
    }
    __u16 frag = ((__u16)h[6] << 8) | h[7];
    if (frag & 0x1fff) {            /* non-first fragment: no transport header here */
        info->fragment = 1;
        return;
    }
    info->l4_off = off + ihl;
    __u32 l4 = parse_l4(s, direct, off + ihl, key, info);
    gso_expand(s->skb, off, ihl + l4, info);
}

/* An extension header the walk in parse_ipv6 skips (the cases of its switch). */
static __always_inline int ipv6_ext_header(__u8 nh)
{
    return nh == IPV6_NH_HOPOPTS || nh == IPV6_NH_ROUTING || nh == IPV6_NH_DSTOPTS || nh == IPV6_NH_AH ||
           nh == IPV6_NH_FRAGMENT;
}

static __always_inline void parse_ipv6(const struct pkt_src *s, const int direct, __u32 off,
                                       struct flow_key *key, struct pkt_info *info)
{
    __u8 buf[40];                    /* load_bytes pass: the fixed IPv6 header */
    __u32 l3_off = off;
    __u32 len = s->skb->len;
    info->octets = len > off ? len - off : 0;
    const __u8 *h = hdr(s, direct, off, buf, 40);
    if (!h) {
        info->anomaly = SHORT(direct, CNT_TRUNC_L3);
        return;
    }
    if ((h[0] >> 4) != 6) {
        info->anomaly = CNT_MALFORMED;
        return;
    }
    __u32 plen = ((__u32)h[4] << 8) | h[5];
    if (plen + 40 > info->octets) {
        /* More than the skb holds (spoofed, or cut): keep the skb's bytes, never the header's claim.
         * GSO skbs are measured by gso_expand() below. */
        if (plen && s->skb->gso_segs <= 1)
            info->anomaly = CNT_BAD_LENGTH; /* a cut header further on reports trunc_* instead */
    } else if (plen) {
        info->octets = plen + 40;   /* excludes Ethernet padding; 0 = jumbogram / BIG TCP: skb length */
    }
    info->tos = (__u8)((h[0] << 4) | (h[1] >> 4));
    __builtin_memcpy(key->src_addr, h + 8, 16);
    __builtin_memcpy(key->dst_addr, h + 24, 16);
    __u8 nh = h[6];
    off += 40;
    /* `break` inside the switch leaves only the switch: the flag ends the walk at the first non-extension
     * header, keeping the loop a plain counted one that clang fully unrolls (no goto out of it). */
    int walking = 1;
#pragma unroll
    for (int i = 0; i < IPV6_MAX_EXT; i++) {
        __u8 ebuf[4];                /* load_bytes pass: next header + length (+ fragment offset) */
        const __u8 *e;
        if (!walking)
            break;
        switch (nh) {
        case IPV6_NH_HOPOPTS:
        case IPV6_NH_ROUTING:
        case IPV6_NH_DSTOPTS:
            e = hdr(s, direct, off, ebuf, 2);
            if (!e) {
                info->anomaly = SHORT(direct, CNT_TRUNC_L3);
                key->protocol = nh;
                return;
            }
            nh = e[0];
            off += ((__u32)e[1] + 1) * 8;
            break;
        case IPV6_NH_AH:
            e = hdr(s, direct, off, ebuf, 2);
            if (!e) {
                info->anomaly = SHORT(direct, CNT_TRUNC_L3);
                key->protocol = nh;
                return;
            }
            nh = e[0];
            off += ((__u32)e[1] + 2) * 4;
            break;
        case IPV6_NH_FRAGMENT:
            e = hdr(s, direct, off, ebuf, 4);
            if (!e) {
                info->anomaly = SHORT(direct, CNT_TRUNC_L3);
                key->protocol = nh;
                return;
            }
            nh = e[0];
            off += 8;
            if ((((__u16)e[2] << 8) | e[3]) & 0xfff8) {
                key->protocol = nh;
                info->fragment = 1;
                return;
            }
            break;
        default:
            walking = 0;
        }
    }
    key->protocol = nh;
    if (ipv6_ext_header(nh)) {       /* still an extension header after IPV6_MAX_EXT of them */
        info->anomaly = CNT_IPV6_EXT_LIMIT;
        return;
    }
    info->l4_off = off;
    __u32 l4 = parse_l4(s, direct, off, key, info);
    gso_expand(s->skb, l3_off, off - l3_off + l4, info);
}

#if TUNNEL_DECAP
static __always_inline int tunnel_candidate(const struct flow_key *key)
{
    __u8 p = key->protocol;
    return (p == PROTO_UDP && (key->dst_port == UDP_PORT_VXLAN || key->dst_port == UDP_PORT_GENEVE)) ||
           p == ENCAP_GRE || p == ENCAP_IPIP || p == ENCAP_IPV6;
}

/* One level of encapsulation (TUNNEL_DECAP builds): when the outer packet is VXLAN, Geneve, GRE or
 * IP-in-IP, the flow becomes the inner packet's (key, octets, flags) plus the tunnel: type, VNI or GRE
 * key and the outer addresses. Called only for a first fragment parsed without anomaly. Every header
 * is at an offset bounded by constants (Geneve options <= 252 bytes, GRE <= 16), and the inner IP
 * header is parsed by the same parse_ipv4/parse_ipv6 as the outer one, never a further tunnel.
 * The inner Ethernet frame may carry one VLAN tag (inner_vlan_id). A tunnel header or inner IP header cut
 * short keeps the outer flow (counted trunc_l4); a payload that is not IPv4/IPv6 (ARP in VXLAN, MPLS in
 * GRE) keeps the outer flow too; both are counted decap_kept_outer. Only interfaces DECAP_WANTED names
 * are decapsulated (a tunnel_candidate packet elsewhere is its outer flow, uncounted). */
static __always_inline void parse_tunnel(const struct pkt_src *s, const int direct,
                                         struct flow_key *key, struct pkt_info *info)
{
    __u8 buf[40];                    /* load_bytes pass: the largest header read here (inner IPv6) */
    const __u8 *b;
    __u32 off = info->l4_off;
    __u32 id = 0;
    __u8 type;
    __u16 inner;
    __u16 vlan = 0;
    if (!tunnel_candidate(key) || !DECAP_WANTED(s->skb))
        return;
    info->kept_outer = 1;                             /* until the inner packet is found */
    if (direct) {
        /* Decapsulated with bpf_skb_load_bytes only: the inner headers parsed in place as well would make
         * the verifier walk outer x inner paths twice (past its 1M-instruction budget). parse_packet goes
         * on from here (the outer key stands), without parsing the outer headers again. */
        info->anomaly = PARSE_TUNNEL;
        return;
    }
    if (key->protocol == PROTO_UDP && key->dst_port == UDP_PORT_VXLAN) {
        b = hdr(s, direct, off + 8, buf, 8);          /* RFC 7348 5: flags, reserved, VNI, reserved */
        if (!b) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L4);
            return;
        }
        if (!(b[0] & 0x08))                           /* I flag: the VNI is valid */
            return;
        type = TUNNEL_VXLAN;
        id = ((__u32)b[4] << 16) | ((__u32)b[5] << 8) | b[6];
        inner = ETHP_TEB;
        off += 16;
    } else if (key->protocol == PROTO_UDP && key->dst_port == UDP_PORT_GENEVE) {
        b = hdr(s, direct, off + 8, buf, 8);          /* RFC 8926 3.4: ver, opt len, flags, type, VNI */
        if (!b) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L4);
            return;
        }
        if (b[0] >> 6)                                /* version 0 only */
            return;
        type = TUNNEL_GENEVE;
        id = ((__u32)b[4] << 16) | ((__u32)b[5] << 8) | b[6];
        inner = ((__u16)b[2] << 8) | b[3];
        off += 16 + (__u32)(b[0] & 0x3f) * 4;          /* options skipped by length: at most 252 bytes */
    } else if (key->protocol == ENCAP_GRE) {
        b = hdr(s, direct, off, buf, 4);              /* RFC 2784 2.1 / RFC 2890 2: C, K, S, version */
        if (!b) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L4);
            return;
        }
        __u8 flags = b[0];
        if ((flags & 0x40) || (b[1] & 0x07))          /* RFC 1701 routing, or not version 0 (PPTP) */
            return;
        type = TUNNEL_GRE;
        inner = ((__u16)b[2] << 8) | b[3];
        __u32 glen = 4;
        if (flags & 0x80)                             /* checksum + reserved1 */
            glen += 4;
        if (flags & 0x20) {                           /* key */
            b = hdr(s, direct, off + glen, buf, 4);
            if (!b) {
                info->anomaly = SHORT(direct, CNT_TRUNC_L4);
                return;
            }
            id = ((__u32)b[0] << 24) | ((__u32)b[1] << 16) | ((__u32)b[2] << 8) | b[3];
            glen += 4;
        }
        if (flags & 0x10)                             /* sequence number */
            glen += 4;
        off += glen;
    } else if (key->protocol == ENCAP_IPIP) {
        type = TUNNEL_IPIP;
        inner = ETHP_IP;
    } else if (key->protocol == ENCAP_IPV6) {
        type = TUNNEL_IPIP;
        inner = ETHP_IPV6;
    } else {
        return;
    }
    if (inner == ETHP_TEB) {                          /* VXLAN, Geneve or GRETAP: an Ethernet frame */
        b = hdr(s, direct, off, buf, ETH_HLEN_);
        if (!b) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L4);
            return;
        }
        inner = ((__u16)b[12] << 8) | b[13];
        off += ETH_HLEN_;
        if (inner == ETHP_8021Q || inner == ETHP_8021AD) {  /* one tag in the inner frame (the tenant's) */
            b = hdr(s, direct, off, buf, 4);
            if (!b) {
                info->anomaly = SHORT(direct, CNT_TRUNC_L4);
                return;
            }
            vlan = (((__u16)b[0] << 8) | b[1]) & 0x0fff;
            inner = ((__u16)b[2] << 8) | b[3];
            off += 4;
        }
    }
    if (inner != ETHP_IP && inner != ETHP_IPV6)
        return;
    /* the inner IP header wholly there, or the outer flow stays (options/headers past the end) */
    if (inner == ETHP_IP ? !hdr(s, direct, off, buf, 20) : !hdr(s, direct, off, buf, 40)) {
        info->anomaly = SHORT(direct, CNT_TRUNC_L4);
        return;
    }
    /* the flow is the inner packet's from here: the outer key fields are replaced, MACs/VLAN stay
     * those seen on the observation interface */
    __builtin_memcpy(key->outer_src_addr, key->src_addr, 16);
    __builtin_memcpy(key->outer_dst_addr, key->dst_addr, 16);
    key->tunnel_type = type;
    key->tunnel_id = id;
    key->inner_vlan_id = vlan;
    info->tunnel = type;
    info->kept_outer = 0;
    key->ethertype = inner;
    key->protocol = 0;
    key->src_port = 0;
    key->dst_port = 0;
    __builtin_memset(key->src_addr, 0, 16);
    __builtin_memset(key->dst_addr, 0, 16);
    info->packets = 1;
    info->tcp_flags = 0;
    info->tos = 0;
    if (inner == ETHP_IP)
        parse_ipv4(s, direct, off, key, info);
    else
        parse_ipv6(s, direct, off, key, info);
}
#endif

/* One pass over the frame (see the top of this file). Every anomaly ends the pass, except an IP
 * length larger than the packet (CNT_BAD_LENGTH, octets = bytes held): the headers present are still
 * parsed, so the flow keeps its ports. */
static __always_inline void parse_frame(const struct pkt_src *s, const int direct,
                                        struct flow_key *key, struct pkt_info *info)
{
    struct __sk_buff *skb = s->skb;
    __u8 buf[ETH_HLEN_];             /* load_bytes pass: the Ethernet header */
    __u32 len = skb->len;
    info->packets = 1;
    info->octets = len;
    const __u8 *eth = hdr(s, direct, 0, buf, ETH_HLEN_);
    if (!eth) {
        info->anomaly = SHORT(direct, CNT_TRUNC_L2);
        return;
    }
    __builtin_memcpy(key->dst_mac, eth, 6);
    __builtin_memcpy(key->src_mac, eth + 6, 6);
    __u16 proto = ((__u16)eth[12] << 8) | eth[13];
    __u32 off = ETH_HLEN_;
    /* The outer tag is usually in skb metadata: the receive path untags before tc ingress and
     * VLAN devices on veth/most NICs use tx offload. Tags left in the frame (QinQ inner, test runs)
     * follow the Ethernet header. */
    if (skb->vlan_present)
        key->vlan_id = skb->vlan_tci & 0x0fff;
#pragma unroll
    for (int i = 0; i < MAX_VLAN_TAGS; i++) {
        if (proto != ETHP_8021Q && proto != ETHP_8021AD)
            break;
        __u8 tbuf[4];                /* load_bytes pass: one VLAN tag */
        const __u8 *t = hdr(s, direct, off, tbuf, 4);
        if (!t) {
            info->anomaly = SHORT(direct, CNT_TRUNC_L2);
            key->ethertype = proto;
            info->octets = len > off ? len - off : 0;
            return;
        }
        if (!key->vlan_id)
            key->vlan_id = (((__u16)t[0] << 8) | t[1]) & 0x0fff;
        proto = ((__u16)t[2] << 8) | t[3];
        off += 4;
    }
    key->ethertype = proto;
    if (proto == ETHP_IP) {
        parse_ipv4(s, direct, off, key, info);
    } else if (proto == ETHP_IPV6) {
        parse_ipv6(s, direct, off, key, info);
    } else {
        info->anomaly = CNT_NON_IP;
        info->octets = len > off ? len - off : 0;
        return;
    }
#if TUNNEL_DECAP
    if (!info->anomaly && !info->fragment)
        parse_tunnel(s, direct, key, info);
#endif
}

/* Fill key (zeroed by the caller) and info from the frame. Never fails: whatever could be parsed is
 * the key, and info->anomaly says what was cut short. Headers in the linear area are read in place;
 * if one is not, the frame is parsed again from scratch with bpf_skb_load_bytes. */
static __always_inline void parse_packet(struct __sk_buff *skb, struct flow_key *key, struct pkt_info *info)
{
    struct pkt_src s = {
        .skb = skb,
        .data = (void *)(long)skb->data,
        .data_end = (void *)(long)skb->data_end,
    };
    parse_frame(&s, 1, key, info);
#if TUNNEL_DECAP
    if (info->anomaly == PARSE_TUNNEL) {
        /* the outer headers were all read in place: the tunnel and inner headers through load_bytes */
        info->anomaly = 0;
        parse_tunnel(&s, 0, key, info);
        return;
    }
#endif
    if (info->anomaly != PARSE_RETRY)
        return;
    /* from scratch: the aborted pass may have written part of the key (hashed byte for byte) */
    __builtin_memset(key, 0, sizeof(*key));
    __builtin_memset(info, 0, sizeof(*info));
    parse_frame(&s, 0, key, info);
}

#endif
