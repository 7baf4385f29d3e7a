"""Flow records between the meters and the exporter.

A batch of flows is a numpy structured array of FLOW_DTYPE (one row per flow, native byte order):
the kernel drain and the userspace Accounter produce it, enrichment fills its optional columns, and the
exporter's fast path encodes it column-wise. `FlowRecord` is the same row as a frozen dataclass, for
tests, replay and the per-record path. Addresses are always 16 bytes, IPv4 as ::ffff:a.b.c.d (RFC 4038).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any

import numpy as np

from ipfixer.infomodel.types import V4_MAPPED_PREFIX as V4_MAPPED_PREFIX  # re-exported: enrich/ imports it from here

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
# IP protocol / IPv6 Next Header numbers (IANA "Assigned Internet Protocol Numbers"), the names and
# values bpf/flow_parse.h defines for the kernel parser (tests/unit/test_packet_names.py checks both agree);
# used by the userspace parser (sources/packets.py) and the ICMP error matcher (enrich/icmp.py).
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, PROTO_SCTP, PROTO_UDPLITE = 1, 6, 17, 58, 132, 136
IPV6_NH_HOPOPTS, IPV6_NH_ROUTING, IPV6_NH_FRAGMENT, IPV6_NH_AH, IPV6_NH_DSTOPTS = 0, 43, 44, 51, 60
IPV6_NH_MOBILITY, IPV6_NH_HIP, IPV6_NH_SHIM6 = 135, 139, 140  # RFC 6275, RFC 7401, RFC 5533
ETH_P_8021Q = 0x8100


# ctState (ipfixer's enterprise element, ipfixer.csv) bitmask, OVN semantics (ovs-fields(7) ct_state;
# ../shared/reference OVN flags): the ct_state column of FLOW_DTYPE holds these.
CT_NEW = 0x01
CT_ESTABLISHED = 0x02
CT_RELATED = 0x04
CT_REPLY = 0x08
CT_INVALID = 0x10
CT_TRACKED = 0x20
CT_SNAT = 0x40
CT_DNAT = 0x80


class Direction(IntEnum):
    """flowDirection, IANA IE 61."""

    INGRESS = 0
    EGRESS = 1


class EndReason(IntEnum):
    """flowEndReason, IANA IE 136."""

    IDLE_TIMEOUT = 1
    ACTIVE_TIMEOUT = 2
    END_OF_FLOW = 3
    FORCED_END = 4
    LACK_OF_RESOURCES = 5


FLOW_DTYPE = np.dtype(
    [
        # key
        ("ethertype", "u2"),
        ("direction", "u1"),
        ("vlan_id", "u2"),
        ("src_mac", "u1", (6,)),
        ("dst_mac", "u1", (6,)),
        ("src_addr", "u1", (16,)),
        ("dst_addr", "u1", (16,)),
        ("src_port", "u2"),
        ("dst_port", "u2"),  # ICMP: type*256+code, as collectors expect
        ("protocol", "u1"),
        ("ifindex", "u4"),
        # metrics
        ("packets", "u8"),
        ("octets", "u8"),  # IP-layer octets (octetDeltaCount)
        ("start_ms", "u8"),  # wall-clock ms
        ("end_ms", "u8"),
        ("tcp_flags", "u1"),
        ("tos", "u1"),
        ("end_reason", "u1"),
        ("ingress_if", "u4"),
        ("egress_if", "u4"),
        # enrichment (zero when unknown)
        ("post_src_addr", "u1", (16,)),
        ("post_dst_addr", "u1", (16,)),
        ("post_src_port", "u2"),
        ("post_dst_port", "u2"),
        ("ct_mark", "u4"),
        ("ct_zone", "u2"),
        ("ct_state", "u1"),
        ("nat_event", "u1"),
        ("cgroup_id", "u8"),
        # filled at export time (ipfixer/export/annotate.py): VRF table ids of ingress_if / egress_if
        # (0: none) and the packet sampling interval the meter ran with
        ("ingress_vrf", "u4"),
        ("egress_vrf", "u4"),
        ("sampling_interval", "u4"),
        # biflow records (RFC 5103, export/biflow.py): the reverse direction's counters and times,
        # and biflowDirection (239); zero in uniflow records
        ("rev_packets", "u8"),
        ("rev_octets", "u8"),
        ("rev_start_ms", "u8"),
        ("rev_end_ms", "u8"),
        ("rev_tcp_flags", "u1"),
        ("rev_tos", "u1"),
        ("biflow_direction", "u1"),
        # the tunnel of an inner flow (tunnels.decap; bpf/flow_types.h TUNNEL_*), zero otherwise:
        # its type, VNI (VXLAN/Geneve) or GRE key, and the outer IP header's addresses
        ("tunnel_type", "u1"),
        ("tunnel_id", "u4"),
        ("inner_vlan_id", "u2"),  # the VLAN tag of the inner Ethernet frame (VXLAN, Geneve, GRETAP), 0 = none
        ("outer_src_addr", "u1", (16,)),
        ("outer_dst_addr", "u1", (16,)),
    ]
)

_BYTES_FIELDS = {"src_mac", "dst_mac", "src_addr", "dst_addr", "post_src_addr", "post_dst_addr",
                 "outer_src_addr", "outer_dst_addr"}


def empty_batch(n: int = 0) -> np.ndarray:
    """A zeroed batch of n flows."""
    return np.zeros(n, dtype=FLOW_DTYPE)


def to_addr16(addr: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """Any IPv4/IPv6 address as 16 bytes, IPv4 mapped into ::ffff:0:0/96."""
    if isinstance(addr, bytes):
        if len(addr) == 16:
            return addr
        if len(addr) == 4:
            return V4_MAPPED_PREFIX + addr
        raise ValueError(f"address must be 4 or 16 bytes, got {len(addr)}")
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if ip.version == 4:
        return V4_MAPPED_PREFIX + ip.packed
    return ip.packed


def addr16_to_str(raw: bytes) -> str:
    """16-byte address to text, IPv4-mapped shown as dotted quad."""
    if raw[:12] == V4_MAPPED_PREFIX:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One flow as the exporter sees it: key, delta counters, wall-clock ms, enrichment."""

    ethertype: int = ETH_P_IP
    direction: int = Direction.INGRESS
    vlan_id: int = 0
    src_mac: bytes = b"\x00" * 6
    dst_mac: bytes = b"\x00" * 6
    src_addr: bytes = b"\x00" * 16
    dst_addr: bytes = b"\x00" * 16
    src_port: int = 0
    dst_port: int = 0
    protocol: int = 0
    ifindex: int = 0
    packets: int = 0
    octets: int = 0
    start_ms: int = 0
    end_ms: int = 0
    tcp_flags: int = 0
    tos: int = 0
    end_reason: int = 0
    ingress_if: int = 0
    egress_if: int = 0
    post_src_addr: bytes = b"\x00" * 16
    post_dst_addr: bytes = b"\x00" * 16
    post_src_port: int = 0
    post_dst_port: int = 0
    ct_mark: int = 0
    ct_zone: int = 0
    ct_state: int = 0
    nat_event: int = 0
    cgroup_id: int = 0
    ingress_vrf: int = 0
    egress_vrf: int = 0
    sampling_interval: int = 0
    rev_packets: int = 0
    rev_octets: int = 0
    rev_start_ms: int = 0
    rev_end_ms: int = 0
    rev_tcp_flags: int = 0
    rev_tos: int = 0
    biflow_direction: int = 0
    tunnel_type: int = 0
    tunnel_id: int = 0
    inner_vlan_id: int = 0
    outer_src_addr: bytes = b"\x00" * 16
    outer_dst_addr: bytes = b"\x00" * 16
    interface: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class FlowKey:
    """What makes two packets the same flow (the kernel's struct flow_key, as Python)."""

    ethertype: int
    direction: int
    src_mac: bytes
    dst_mac: bytes
    src_addr: bytes  # 16 bytes
    dst_addr: bytes
    src_port: int
    dst_port: int
    protocol: int
    ifindex: int
    vlan_id: int = 0
    # the tunnel of a decapsulated packet (tunnels.decap), as in struct flow_key; zero otherwise
    tunnel_type: int = 0
    tunnel_id: int = 0
    inner_vlan_id: int = 0
    outer_src_addr: bytes = b"\x00" * 16
    outer_dst_addr: bytes = b"\x00" * 16


@dataclass(frozen=True, slots=True)
class RawPacket:
    """One observed packet (or GSO super-packet) before aggregation: ring-buffer spill, NFLOG, pcap."""

    key: FlowKey
    octets: int  # IP-layer octets
    mono_ns: int  # CLOCK_MONOTONIC, as bpf_ktime_get_ns()
    tcp_flags: int = 0
    tos: int = 0
    packets: int = 1


_ROW_FIELDS = [f.name for f in fields(FlowRecord) if f.name != "interface"]
assert _ROW_FIELDS == list(FLOW_DTYPE.names or ()), "FlowRecord and FLOW_DTYPE must list the same columns"


def records_to_batch(records: list[FlowRecord]) -> np.ndarray:
    """FlowRecords -> FLOW_DTYPE array."""
    batch = empty_batch(len(records))
    for i, rec in enumerate(records):
        row = batch[i]
        for name in _ROW_FIELDS:
            value = getattr(rec, name)
            if name in _BYTES_FIELDS:
                row[name] = np.frombuffer(value, dtype=np.uint8)
            else:
                row[name] = value
    return batch


def batch_to_records(batch: np.ndarray, interface_names: dict[int, str] | None = None) -> list[FlowRecord]:
    """FLOW_DTYPE array -> FlowRecords (interface names resolved from ifindex when given)."""
    names = interface_names or {}
    out = []
    for row in batch:
        kw: dict[str, Any] = {}
        for name in _ROW_FIELDS:
            value = row[name]
            kw[name] = bytes(value) if name in _BYTES_FIELDS else int(value)
        kw["interface"] = names.get(kw["ifindex"], "")
        out.append(FlowRecord(**kw))
    return out


# The packed 5-tuple (protocol, addresses, ports) by which conntrack entries, cgroup events and flow rows
# are matched: one layout for a single key (struct) and for a whole batch (numpy).
FIVE_TUPLE_STRUCT = struct.Struct("!B16s16sHH")
_FIVE_TUPLE_DTYPE = np.dtype([("p", "u1"), ("s", "u1", (16,)), ("d", "u1", (16,)), ("sp", ">u2"), ("dp", ">u2")])
assert _FIVE_TUPLE_DTYPE.itemsize == FIVE_TUPLE_STRUCT.size


def five_tuple_keys(rows: np.ndarray) -> list[bytes]:
    """Packed 5-tuples of every row of an array with protocol, src_addr, dst_addr, src_port and dst_port
    fields (a FLOW_DTYPE batch or the kernel's flow keys): one vectorised copy, then slicing."""
    keys = np.empty(len(rows), dtype=_FIVE_TUPLE_DTYPE)
    keys["p"] = rows["protocol"]
    keys["s"] = rows["src_addr"]
    keys["d"] = rows["dst_addr"]
    keys["sp"] = rows["src_port"]
    keys["dp"] = rows["dst_port"]
    raw = keys.tobytes()
    n = _FIVE_TUPLE_DTYPE.itemsize
    return [raw[i : i + n] for i in range(0, len(raw), n)]


@dataclass(frozen=True, slots=True)
class VrfTable:
    """ifindex -> VRF table id of every interface in a VRF, and table id -> VRF (device) name: what the
    link watcher (sources/kernel/vrf.py) learns and the exporter annotates records with."""

    table_of: Mapping[int, int] = field(default_factory=dict)
    names: Mapping[int, str] = field(default_factory=dict)
