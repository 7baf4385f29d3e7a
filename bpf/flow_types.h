/* flow_types.h — the ONLY struct definitions shared by ipfixer's BPF programs and userspace.
 *
 * Userspace never re-declares these: bcc exposes each map's key/leaf as a ctypes type generated from
 * this file, and ipfixer/kernel turns them into numpy dtypes. Layout rules: fields naturally aligned,
 * every hole is an explicit pad field that the program zeroes (the key is hashed byte for byte).
 */
#ifndef IPFIXER_FLOW_TYPES_H
#define IPFIXER_FLOW_TYPES_H

#ifndef FLOW_MAP_ENTRIES
#define FLOW_MAP_ENTRIES 65536
#endif
#ifndef SPILL_RING_PAGES
#define SPILL_RING_PAGES 1024        /* a power of two; 4 MiB = ~43,000 spill records (96 bytes each) */
#endif

#ifndef SAMPLING_INTERVAL
#define SAMPLING_INTERVAL 1          /* meter 1 in N packets, chosen at random (samplingAlgorithm 2) */
#endif

#ifndef TUNNEL_DECAP
#define TUNNEL_DECAP 0               /* 1: meter the inner flow of one level of encapsulation (config tunnels.decap) */
#endif
#ifndef DECAP_IFACES_MAX
#define DECAP_IFACES_MAX 4096        /* interfaces whose tunnels are decapsulated (config tunnels.interfaces) */
#endif

/* flow_key.tunnel_type (TUNNEL_DECAP builds): how the metered inner packet was carried. ipfixer's own
 * codes (exported as the enterprise element tunnelType, ipfixer/infomodel/data/ipfixer.csv), 0 = none. */
#define TUNNEL_NONE 0
#define TUNNEL_VXLAN 1               /* UDP 4789, RFC 7348; tunnel_id = VNI */
#define TUNNEL_GENEVE 2              /* UDP 6081, RFC 8926; tunnel_id = VNI */
#define TUNNEL_GRE 3                 /* IP protocol 47, RFC 2784/2890; tunnel_id = key (0 without one) */
#define TUNNEL_IPIP 4                /* IP protocol 4 or 41: IPIP, SIT, IPv6-in-IPv6 (RFC 2003, 4213, 2473) */

#define FLOW_DIR_INGRESS 0           /* IPFIX IE 61 flowDirection */
#define FLOW_DIR_EGRESS 1

/* One flow (60 bytes, 4-aligned; 100 with TUNNEL_DECAP). IPv4 addresses are ::ffff:a.b.c.d (RFC 4038). */
struct flow_key {
    __u16 ethertype;                 /* payload ethertype after VLAN tags, host order */
    __u8  direction;                 /* FLOW_DIR_* */
    __u8  protocol;                  /* IP protocol, 0 for non-IP */
    __u16 vlan_id;                   /* outer VLAN id (0 = untagged) */
    __u16 src_port;                  /* host order; ICMP: 0 */
    __u16 dst_port;                  /* host order; ICMP/ICMPv6: type*256+code */
    __u8  src_mac[6];
    __u8  dst_mac[6];
    __u8  pad0[2];                   /* zero */
    __u32 ifindex;                   /* observation interface */
    __u8  src_addr[16];
    __u8  dst_addr[16];
#if TUNNEL_DECAP
    /* The tunnel of an inner flow (all zero for a packet that was not decapsulated): 100 bytes in all. */
    __u32 tunnel_id;                 /* VNI (VXLAN/Geneve) or GRE key, host order */
    __u8  tunnel_type;               /* TUNNEL_* */
    __u8  pad1;                      /* zero */
    __u16 inner_vlan_id;             /* VLAN tag of the inner Ethernet frame (VXLAN, Geneve, GRETAP), 0 = none */
    __u8  outer_src_addr[16];        /* outer IP header's addresses, IPv4 as ::ffff:a.b.c.d */
    __u8  outer_dst_addr[16];
#endif
};

/* Counters of one flow (48 bytes). The map is a shared BPF_HASH updated with atomic adds, not a
 * per-CPU hash: netobserv measured ~80% byte loss with non-atomic updates, and a per-CPU hash costs
 * memory x CPUs, leaves stale per-CPU slots and makes the drain sum CPUs in userspace. Measured with
 * BPF_PROG_TEST_RUN (benchmarks/datapath.py, "shared hash vs per-CPU hash"): the program with its two
 * locked adds costs 156 ns/packet, the same program with plain adds (what a per-CPU hash allows)
 * 163 ns, median of 5: no measurable saving, while the kernel's batch lookup-and-delete, ~1 s per
 * 1M flows already, would copy every value once per CPU. Hence a shared hash. */
struct flow_metrics {
    __u64 packets;                   /* __sync_fetch_and_add */
    __u64 octets;                    /* IP-layer octets, __sync_fetch_and_add */
    __u64 first_ns;                  /* bpf_ktime_get_ns() at insert */
    __u64 last_ns;                   /* bpf_ktime_get_ns() of the latest packet (plain store) */
    __u64 tcp_flags;                 /* OR of TCP flags (u64: bcc's target only has 64-bit atomic OR) */
    __u8  tos;                       /* latest IPv4 TOS / IPv6 traffic class */
    __u8  pad0[7];
};

/* One packet that did not fit in the flow map, sent to userspace through the ring buffer (88 bytes). */
struct spill_record {
    struct flow_key key;
    __u32 packets;                   /* max(gso_segs, 1) */
    __u64 octets;
    __u64 ts_ns;                     /* bpf_ktime_get_ns() */
    __u8  tcp_flags;
    __u8  tos;
    __u8  pad0[6];
};

/* One packet seen by bpf/cgroup_skb.c (container attribution), a ring-buffer event (32 bytes) that
 * ipfixer/enrich/cgroups.py reads as struct "=QQ4s4sHHBBH": timestamp_ns @0, cgroup_id @8, src_ip @16,
 * dst_ip @20, src_port @24, dst_port @26, protocol @28, direction @29, packet_len @30.
 * Addresses in network order (copied from the packet), ports and packet_len in host order. */
struct cgroup_flow_event {
    __u64 timestamp_ns;              /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 cgroup_id;                 /* bpf_skb_cgroup_id(): the socket's cgroup v2 id == its directory inode */
    __u32 src_ip;                    /* network order */
    __u32 dst_ip;                    /* network order */
    __u16 src_port;                  /* host order; ICMP: 0 */
    __u16 dst_port;                  /* host order; ICMP: type << 8 | code */
    __u8  protocol;
    __u8  direction;                 /* FLOW_DIR_* */
    __u16 packet_len;                /* IP total length, host order */
};

/* Per-CPU counter array indices (BPF_PERCPU_ARRAY counters, __u64). The one list of them:
 * ipfixer/sources/kernel/program.py reads this enum (COUNTER_NAMES = each CNT_X lowercased, without
 * CNT_, in order), so an entry is one line here; entries take their values in order from 0 (no "= N"
 * after the first), and CNT_MAX ends the list. */
enum ipfixer_counter {
    CNT_PACKETS = 0,                 /* frames seen by the classifier */
    CNT_MAP_FULL,                    /* insert failed E2BIG / ENOMEM: map full */
    CNT_INSERT_RACE,                 /* insert failed EEXIST: another CPU inserted first (then added) */
    CNT_INSERT_BUSY,                 /* insert failed EBUSY: bucket lock busy */
    CNT_INSERT_OTHER,                /* insert failed for another reason */
    CNT_SPILLED,                     /* packets sent to the ring buffer */
    CNT_RINGBUF_FAIL,                /* ring buffer full: packet lost (counted here) */
    CNT_TRUNC_L2,                    /* frame shorter than its Ethernet/VLAN header */
    CNT_TRUNC_L3,                    /* IP header cut short */
    CNT_TRUNC_L4,                    /* transport header cut short */
    CNT_MALFORMED,                   /* bad IP version / IHL */
    CNT_NON_IP,                      /* neither IPv4 nor IPv6 */
    CNT_IPV6_EXT_LIMIT,              /* too many IPv6 extension headers to walk */
    CNT_FRAGMENT,                    /* non-first IP fragment (no ports) */
    CNT_NOT_SAMPLED,                 /* skipped by 1-in-N sampling (SAMPLING_INTERVAL > 1) */
    CNT_BAD_LENGTH,                  /* malformed: IP length beyond the bytes received (octets capped at
                                        what the skb holds), or IPv4 total length below its header */
    CNT_OBSERVED_PACKETS_INGRESS,    /* metered wire packets (GSO expanded) by direction: + FLOW_DIR_* */
    CNT_OBSERVED_PACKETS_EGRESS,
    CNT_OBSERVED_OCTETS_INGRESS,     /* their IP-layer octets, by direction */
    CNT_OBSERVED_OCTETS_EGRESS,
    CNT_DECAP_VXLAN,                 /* TUNNEL_DECAP builds: packets metered as their inner flow, by tunnel: */
    CNT_DECAP_GENEVE,                /*   CNT_DECAP_VXLAN + TUNNEL_* - 1 */
    CNT_DECAP_GRE,
    CNT_DECAP_IPIP,
    CNT_DECAP_KEPT_OUTER,            /* a tunnel packet on a decap interface metered as its outer flow: tunnel
                                        header not understood or cut, or a payload that is not IP */
    CNT_MAX
};

#endif
