/* flow_tc.c — ipfixer's traffic-control classifier (BPF_PROG_TYPE_SCHED_CLS, direct-action).
 *
 * One body, two entry points (ipfixer_ingress / ipfixer_egress) so the direction is a compile-time
 * constant rather than a guess from skb fields. Observe only: every path returns TC_ACT_UNSPEC, which
 * under direct-action means "no verdict, continue with the next filter", so tools attached after us
 * (Cilium, a firewall) still see and decide on the packet; TC_ACT_OK would end classification. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/asm-generic/errno-base.h>
#include "flow_types.h"

#if TUNNEL_DECAP
/* The interfaces whose tunnels are decapsulated (config tunnels.interfaces): ifindex -> 1, kept by
 * ipfixer/sources/ebpf.py as interfaces are attached. Looked up only for tunnel packets. */
BPF_HASH(decap_ifaces, __u32, __u8, DECAP_IFACES_MAX);

static __always_inline int decap_wanted(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ifindex;
    return decap_ifaces.lookup(&ifindex) != 0;
}
#define DECAP_WANTED(skb) decap_wanted(skb)
#endif
#include "flow_parse.h"

BPF_HASH(flows, struct flow_key, struct flow_metrics, FLOW_MAP_ENTRIES);
BPF_PERCPU_ARRAY(counters, __u64, CNT_MAX);
BPF_RINGBUF_OUTPUT(spill, SPILL_RING_PAGES);
/* Never used by the program: declares struct spill_record to bcc so userspace gets its layout from
 * this source (ringbuf maps carry no record type). */
BPF_ARRAY(spill_layout, struct spill_record, 1);

static __always_inline void count(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        *v += 1;                     /* per-CPU slot, tc runs with BH off: no atomic needed */
}

/* Wire packets/octets by direction, live at every drain (the metrics' packets/octets_observed), where
 * flow records show them only once exported. H3 (issue 10); direction is a compile-time constant. */
static __always_inline void count_observed(__u8 direction, const struct pkt_info *info)
{
    __u32 idx = CNT_OBSERVED_PACKETS_INGRESS + direction;
    __u64 *v = counters.lookup(&idx);
    if (v)
        *v += info->packets;
    idx = CNT_OBSERVED_OCTETS_INGRESS + direction;
    v = counters.lookup(&idx);
    if (v)
        *v += info->octets;
}

static __always_inline void add_to(struct flow_metrics *m, struct pkt_info *info, __u64 now)
{
#ifdef IPFIXER_BENCH_PLAIN_ADDS
    /* benchmarks/datapath.py only: what a per-CPU map would save (no locked instructions). Loses
     * counts on a shared map under concurrency: never used by ipfixer itself. */
    m->packets += info->packets;
    m->octets += info->octets;
#else
    __sync_fetch_and_add(&m->packets, info->packets);
    __sync_fetch_and_add(&m->octets, info->octets);
#endif
    m->last_ns = now;
    m->tos = info->tos;
    __u64 f = info->tcp_flags;
    if (f && (m->tcp_flags & f) != f)
        __sync_fetch_and_or(&m->tcp_flags, f);
}

static __always_inline int account(struct __sk_buff *skb, __u8 direction)
{
    struct flow_key key;
    struct pkt_info info;
    /* Whole structs zeroed, pads included: the hash compares keys byte for byte (a stray pad byte would
     * split one flow in two), and a verifier without allow_uninit_stack (no CAP_PERFMON) refuses stack
     * bytes never written as a helper's input. */
    __builtin_memset(&key, 0, sizeof(key));
    __builtin_memset(&info, 0, sizeof(info));
    count(CNT_PACKETS);
#if SAMPLING_INTERVAL > 1
    /* Random 1-in-N packet sampling (RFC 5476 random n-out-of-N with n = 1); the collector scales
     * counts by samplingInterval, announced in the sampling options record. */
    if (bpf_get_prandom_u32() % SAMPLING_INTERVAL) {
        count(CNT_NOT_SAMPLED);
        return TC_ACT_UNSPEC;
    }
#endif
    parse_packet(skb, &key, &info);
    if (info.anomaly)
        count(info.anomaly);
    if (info.fragment)
        count(CNT_FRAGMENT);
#if TUNNEL_DECAP
    if (info.tunnel)
        count(CNT_DECAP_VXLAN + info.tunnel - 1);
    else if (info.kept_outer)
        count(CNT_DECAP_KEPT_OUTER);
#endif
    key.direction = direction;
    key.ifindex = skb->ifindex;
    count_observed(direction, &info);
    __u64 now = bpf_ktime_get_ns();

    struct flow_metrics *m = flows.lookup(&key);
    if (m) {
        add_to(m, &info, now);
        return TC_ACT_UNSPEC;
    }
    struct flow_metrics fresh;
    __builtin_memset(&fresh, 0, sizeof(fresh));  /* pad0 too: userspace reads the whole leaf */
    fresh.packets = info.packets;
    fresh.octets = info.octets;
    fresh.first_ns = now;
    fresh.last_ns = now;
    fresh.tcp_flags = info.tcp_flags;
    fresh.tos = info.tos;
    int err = flows.insert(&key, &fresh);   /* BPF_NOEXIST */
    if (err == 0)
        return TC_ACT_UNSPEC;
    if (err == -EEXIST) {
        count(CNT_INSERT_RACE);      /* another CPU inserted it first: add to theirs */
        m = flows.lookup(&key);
        if (m) {
            add_to(m, &info, now);
            return TC_ACT_UNSPEC;
        }
        count(CNT_INSERT_OTHER);     /* drained in between: spill it */
    } else if (err == -E2BIG || err == -ENOMEM) {
        count(CNT_MAP_FULL);
    } else if (err == -EBUSY) {
        count(CNT_INSERT_BUSY);
    } else {
        count(CNT_INSERT_OTHER);
    }

    struct spill_record *r = spill.ringbuf_reserve(sizeof(struct spill_record));
    if (!r) {
        count(CNT_RINGBUF_FAIL);
        return TC_ACT_UNSPEC;
    }
    __builtin_memcpy(&r->key, &key, sizeof(key));
    r->packets = info.packets;
    r->octets = info.octets;
    r->ts_ns = now;
    r->tcp_flags = info.tcp_flags;
    r->tos = info.tos;
    __builtin_memset(r->pad0, 0, sizeof(r->pad0));
    spill.ringbuf_submit(r, 0);
    count(CNT_SPILLED);
    return TC_ACT_UNSPEC;
}

int ipfixer_ingress(struct __sk_buff *skb)
{
    return account(skb, FLOW_DIR_INGRESS);
}

int ipfixer_egress(struct __sk_buff *skb)
{
    return account(skb, FLOW_DIR_EGRESS);
}
