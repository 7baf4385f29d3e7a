/* flow_parse.h — packet parsing into a struct flow_key (no maps here: anomalies are reported in
 * struct pkt_info and counted by the caller). Every read goes through bpf_skb_load_bytes, which fails
 * cleanly on short or non-linear packets, so a truncated frame is still counted, never a fault. */
#ifndef IPFIXER_FLOW_PARSE_H
#define IPFIXER_FLOW_PARSE_H

#include "flow_types.h"

#define ETH_HLEN_ 14
#define ETHP_IP 0x0800
#define ETHP_IPV6 0x86DD
#define ETHP_8021Q 0x8100
#define ETHP_8021AD 0x88A8
#define MAX_VLAN_TAGS 2
#define IPV6_MAX_EXT 6

struct pkt_info {
    __u64 octets;                    /* IP-layer octets as the wire carries them (GSO expanded) */
    __u32 packets;                   /* max(gso_segs, 1) */
    __u8  tcp_flags;
    __u8  tos;
    __u8  anomaly;                   /* CNT_* index of a truncation/malformation, 0 if none */
    __u8  fragment;                  /* non-first fragment: no ports */
};

static __always_inline void v4mapped(__u8 *dst, __u32 addr_be)
{
    __builtin_memset(dst, 0, 10);
    dst[10] = 0xff;
    dst[11] = 0xff;
    __builtin_memcpy(dst + 12, &addr_be, 4);
}

/* Transport header at off: ports/ICMP type+code, TCP flags. Returns its length (0 if none/short). */
static __always_inline __u32 parse_l4(struct __sk_buff *skb, __u32 off, struct flow_key *key,
                                      struct pkt_info *info)
{
    __u8 b[20];
    switch (key->protocol) {
    case 6: /* TCP */
        if (bpf_skb_load_bytes(skb, off, b, 20) < 0) {
            info->anomaly = CNT_TRUNC_L4;
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
    case 17:  /* UDP */
    case 136: /* UDP-Lite */
        if (bpf_skb_load_bytes(skb, off, b, 8) < 0) {
            info->anomaly = CNT_TRUNC_L4;
            return 0;
        }
        key->src_port = ((__u16)b[0] << 8) | b[1];
        key->dst_port = ((__u16)b[2] << 8) | b[3];
        return 8;
    case 132: /* SCTP: common header, ports first */
        if (bpf_skb_load_bytes(skb, off, b, 12) < 0) {
            info->anomaly = CNT_TRUNC_L4;
            return 0;
        }
        key->src_port = ((__u16)b[0] << 8) | b[1];
        key->dst_port = ((__u16)b[2] << 8) | b[3];
        return 12;
    case 1:  /* ICMP */
    case 58: /* ICMPv6: collectors expect dst_port = type*256 + code, src_port 0 */
        if (bpf_skb_load_bytes(skb, off, b, 2) < 0) {
            info->anomaly = CNT_TRUNC_L4;
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

static __always_inline void parse_ipv4(struct __sk_buff *skb, __u32 off, struct flow_key *key,
                                       struct pkt_info *info)
{
    __u8 h[20];
    info->octets = skb->len > off ? skb->len - off : 0;
    if (bpf_skb_load_bytes(skb, off, h, 20) < 0) {
        info->anomaly = CNT_TRUNC_L3;
        return;
    }
    __u32 ihl = (__u32)(h[0] & 0x0f) * 4;
    if ((h[0] >> 4) != 4 || ihl < 20) {
        info->anomaly = CNT_MALFORMED;
        return;
    }
    __u16 tot_len = ((__u16)h[2] << 8) | h[3];
    if (tot_len)
        info->octets = tot_len;     /* excludes Ethernet padding; 0 means BIG TCP: keep skb length */
    info->tos = h[1];
    key->protocol = h[9];
    __u32 a;
    __builtin_memcpy(&a, h + 12, 4);
    v4mapped(key->src_addr, a);
    __builtin_memcpy(&a, h + 16, 4);
    v4mapped(key->dst_addr, a);
    __u16 frag = ((__u16)h[6] << 8) | h[7];
    if (frag & 0x1fff) {            /* non-first fragment: no transport header here */
        info->fragment = 1;
        return;
    }
    __u32 l4 = parse_l4(skb, off + ihl, key, info);
    gso_expand(skb, off, ihl + l4, info);
}

static __always_inline void parse_ipv6(struct __sk_buff *skb, __u32 off, struct flow_key *key,
                                       struct pkt_info *info)
{
    __u8 h[40];
    __u32 l3_off = off;
    info->octets = skb->len > off ? skb->len - off : 0;
    if (bpf_skb_load_bytes(skb, off, h, 40) < 0) {
        info->anomaly = CNT_TRUNC_L3;
        return;
    }
    if ((h[0] >> 4) != 6) {
        info->anomaly = CNT_MALFORMED;
        return;
    }
    __u16 plen = ((__u16)h[4] << 8) | h[5];
    if (plen)
        info->octets = (__u64)plen + 40;   /* 0 = jumbogram / BIG TCP: keep skb length */
    info->tos = (__u8)((h[0] << 4) | (h[1] >> 4));
    __builtin_memcpy(key->src_addr, h + 8, 16);
    __builtin_memcpy(key->dst_addr, h + 24, 16);
    __u8 nh = h[6];
    off += 40;
    int walking = 1;
#pragma unroll
    for (int i = 0; i < IPV6_MAX_EXT; i++) {
        __u8 e[4];
        if (!walking)
            break;
        switch (nh) {
        case 0:  /* hop-by-hop */
        case 43: /* routing */
        case 60: /* destination options */
            if (bpf_skb_load_bytes(skb, off, e, 2) < 0) {
                info->anomaly = CNT_TRUNC_L3;
                key->protocol = nh;
                return;
            }
            nh = e[0];
            off += ((__u32)e[1] + 1) * 8;
            break;
        case 51: /* AH: length in 4-octet units minus 2 */
            if (bpf_skb_load_bytes(skb, off, e, 2) < 0) {
                info->anomaly = CNT_TRUNC_L3;
                key->protocol = nh;
                return;
            }
            nh = e[0];
            off += ((__u32)e[1] + 2) * 4;
            break;
        case 44: /* fragment */
            if (bpf_skb_load_bytes(skb, off, e, 4) < 0) {
                info->anomaly = CNT_TRUNC_L3;
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
    if (nh == 0 || nh == 43 || nh == 60 || nh == 51 || nh == 44) {
        info->anomaly = CNT_IPV6_EXT_LIMIT;
        return;
    }
    __u32 l4 = parse_l4(skb, off, key, info);
    gso_expand(skb, l3_off, off - l3_off + l4, info);
}

/* Fill key (zeroed by the caller) and info from the frame. Never fails: whatever could be parsed is
 * the key, and info->anomaly says what was cut short. */
static __always_inline void parse_packet(struct __sk_buff *skb, struct flow_key *key, struct pkt_info *info)
{
    __u8 eth[ETH_HLEN_];
    info->packets = 1;
    info->octets = skb->len;
    if (bpf_skb_load_bytes(skb, 0, eth, ETH_HLEN_) < 0) {
        info->anomaly = CNT_TRUNC_L2;
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
        __u8 t[4];
        if (bpf_skb_load_bytes(skb, off, t, 4) < 0) {
            info->anomaly = CNT_TRUNC_L2;
            key->ethertype = proto;
            info->octets = skb->len > off ? skb->len - off : 0;
            return;
        }
        if (!key->vlan_id)
            key->vlan_id = (((__u16)t[0] << 8) | t[1]) & 0x0fff;
        proto = ((__u16)t[2] << 8) | t[3];
        off += 4;
    }
    key->ethertype = proto;
    if (proto == ETHP_IP) {
        parse_ipv4(skb, off, key, info);
    } else if (proto == ETHP_IPV6) {
        parse_ipv6(skb, off, key, info);
    } else {
        info->anomaly = CNT_NON_IP;
        info->octets = skb->len > off ? skb->len - off : 0;
    }
}

#endif
