"""Flow enrichment: conntrack (NAT, mark, zone, state, lifecycle events), cgroup/container attribution,
and NFLOG as a packet source for kernels without eBPF."""

from ipfixer.enrich.conntrack import ConnKey, ConntrackEntry, ConntrackTable
from ipfixer.enrich.events import ConntrackEvents, FlowEvent, apply_destroy, destroyed_keys, nat_event_records

__all__ = [
    "ConnKey",
    "ConntrackEntry",
    "ConntrackEvents",
    "ConntrackTable",
    "FlowEvent",
    "apply_destroy",
    "destroyed_keys",
    "nat_event_records",
]
