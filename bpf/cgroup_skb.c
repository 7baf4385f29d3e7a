/* cgroup_skb.c — per-packet container attribution (BPF_PROG_TYPE_CGROUP_SKB, ingress and egress).
 *
 * Attached to a cgroup v2 directory (the root, or a test cgroup); every IPv4 packet sent or received by a
 * socket of a process in that cgroup subtree emits one 32-byte event into a ring buffer. Observe only:
 * both programs always return 1 (allow). IPv6 is counted but not emitted (the event has 4-byte
 * addresses). The event, struct cgroup_flow_event, is declared in flow_types.h with the other layouts
 * shared with userspace (read by ipfixer/enrich/cgroups.py); bcc finds that header next to this file.
 *
 * Byte order: for cgroup_skb the skb data starts at the network header; addresses are copied from the
 * packet as they are, i.e. in NETWORK order (the first octet is the lowest-addressed byte; read as a
 * little-endian u32 it lands in the LSB: 10.0.0.5 == 0x0500000A). Ports and packet_len are converted
 * to HOST order here. For ICMP, src_port = 0 and dst_port = type << 8 | code, the flow-key convention
 * of ipfixer's batches. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include "flow_types.h"        /* struct cgroup_flow_event, FLOW_DIR_* */


/* Indices of cgroup_counters, in the order cgroups.py names them (emitted, ring_full, not_ipv4). */
enum { CGROUP_CNT_EMITTED, CGROUP_CNT_RING_FULL, CGROUP_CNT_NOT_IPV4, CGROUP_CNT_MAX };

BPF_RINGBUF_OUTPUT(cgroup_events, 64);
BPF_PERCPU_ARRAY(cgroup_counters, u64, CGROUP_CNT_MAX);

static __always_inline void count(u32 idx)
{
    u64 *v = cgroup_counters.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline int emit(struct __sk_buff *skb, u8 direction)
{
    struct iphdr iph;
    if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_load_bytes(skb, 0, &iph, sizeof(iph)) < 0) {
        count(CGROUP_CNT_NOT_IPV4);
        return 1;
    }
    struct cgroup_flow_event *ev = cgroup_events.ringbuf_reserve(sizeof(struct cgroup_flow_event));
    if (!ev) {
        count(CGROUP_CNT_RING_FULL);
        return 1;
    }
    ev->timestamp_ns = bpf_ktime_get_ns();
    ev->cgroup_id = bpf_skb_cgroup_id(skb);
    ev->src_ip = iph.saddr;
    ev->dst_ip = iph.daddr;
    ev->src_port = 0;
    ev->dst_port = 0;
    ev->protocol = iph.protocol;
    ev->direction = direction;
    ev->packet_len = bpf_ntohs(iph.tot_len);
    /* transport header only on the first fragment */
    if ((iph.frag_off & bpf_htons(0x1FFF)) == 0) {
        u32 l4 = (u32)iph.ihl * 4;
        u16 hdr[2] = {};   /* ports, or ICMP type+code in hdr[0]; network order */
        if (bpf_skb_load_bytes(skb, l4, hdr, sizeof(hdr)) == 0) {
            if (iph.protocol == IPPROTO_TCP || iph.protocol == IPPROTO_UDP || iph.protocol == IPPROTO_SCTP) {
                ev->src_port = bpf_ntohs(hdr[0]);
                ev->dst_port = bpf_ntohs(hdr[1]);
            } else if (iph.protocol == IPPROTO_ICMP) {
                ev->dst_port = bpf_ntohs(hdr[0]);   /* type << 8 | code */
            }
        }
    }
    cgroup_events.ringbuf_submit(ev, 0);
    count(CGROUP_CNT_EMITTED);
    return 1;
}

int cgroup_skb_ingress(struct __sk_buff *skb)
{
    return emit(skb, FLOW_DIR_INGRESS);
}

int cgroup_skb_egress(struct __sk_buff *skb)
{
    return emit(skb, FLOW_DIR_EGRESS);
}
