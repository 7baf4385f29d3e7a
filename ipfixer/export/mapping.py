"""The one table saying which FLOW_DTYPE column (and transform) each Information Element carries.

Both encoding paths read it: `flow_columns` feeds the vectorised BatchEncoder (fast path) and
`flow_values` feeds the per-record construct encoder.  `flow_values` is computed by running the same
vectorised transform on a one-row batch, so the two paths cannot disagree.  IANA names are spelled as
IANA spells them (RFC 7012 / the registry); enterprise names as in infomodel/data/ipfixer.csv.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ipfixer.errors import EncodeError
from ipfixer.model import ETH_P_IPV6, FLOW_DTYPE, FlowRecord, records_to_batch

if TYPE_CHECKING:
    from ipfixer.templates import Template

IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
UINT32_MOD = 1 << 32
# flow_key.tunnel_type codes (bpf/flow_types.h TUNNEL_*), exported as ipfixer's tunnelType
TUNNEL_VXLAN = 1
TUNNEL_GENEVE = 2
TUNNEL_GRE = 3
TUNNEL_IPIP = 4
# layer2SegmentId (IE 351) segment types, the registry's description of the element: 0x01 VxLAN
# (RFC 7348), 0x02 NVGRE (RFC 7637). Geneve has none, so a Geneve row's layer2SegmentId is 0 and its
# VNI is in tunnelVirtualNetworkId only.
L2_SEGMENT_VXLAN = 0x01
_V4_PREFIX = np.array([0] * 10 + [0xFF, 0xFF], dtype=np.uint8)


class Transform(Enum):
    """How a column becomes an element value (all vectorised over the batch)."""

    INT = "int"  # the integer column as is
    IPV4 = "ipv4"  # 16-byte ::ffff:a.b.c.d column -> its last 4 bytes
    BYTES = "bytes"  # (n, k) uint8 column as is: IPv6 addresses, MAC addresses
    ICMP = "icmp"  # dst_port (type*256+code) on ICMP/ICMPv6 rows, else 0 (IE 32 / IE 139)
    IP_VERSION = "ip_version"  # 4 or 6 from ethertype (IE 60)
    SECONDS = "seconds"  # wall-clock ms column -> dateTimeSeconds
    SYS_UPTIME = "sys_uptime"  # wall-clock ms column -> ms since exporter boot, mod 2^32 (RFC 3954 8)
    SYS_UPTIME_START = "sys_uptime_start"  # the same for the start, never after the end (min(start, end))
    RECORD_ATTR = "record_attr"  # FlowRecord attribute with no batch column (per-record path only)
    OUTER_IPV4 = "outer_ipv4"  # 16-byte outer address -> its last 4 bytes when IPv4-mapped, else 0.0.0.0
    OUTER_IPV6 = "outer_ipv6"  # 16-byte outer address as is when IPv6, else :: (an IPv4 outer header)
    L2_SEGMENT = "l2_segment"  # layer2SegmentId (IE 351): segment type in the top byte, VNI below
    VNI = "vni"  # tunnel_id of a VXLAN/Geneve row, else 0
    GRE_KEY = "gre_key"  # tunnel_id of a GRE row, else 0 (greKey, IE 296)


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """One row of the table: element name -> column + transform."""

    element: str
    column: str
    transform: Transform


def _m(element: str, column: str, transform: Transform = Transform.INT) -> tuple[str, ColumnMapping]:
    return element, ColumnMapping(element, column, transform)


T = Transform
# Element name -> column.  The one place this meaning lives.
ELEMENT_COLUMNS: Mapping[str, ColumnMapping] = MappingProxyType(
    dict(
        [
            _m("sourceIPv4Address", "src_addr", T.IPV4),
            _m("destinationIPv4Address", "dst_addr", T.IPV4),
            _m("sourceIPv6Address", "src_addr", T.BYTES),
            _m("destinationIPv6Address", "dst_addr", T.BYTES),
            _m("sourceTransportPort", "src_port"),
            _m("destinationTransportPort", "dst_port"),
            _m("protocolIdentifier", "protocol"),
            _m("tcpControlBits", "tcp_flags"),
            _m("ipClassOfService", "tos"),
            _m("octetDeltaCount", "octets"),
            _m("packetDeltaCount", "packets"),
            _m("flowStartMilliseconds", "start_ms"),
            _m("flowEndMilliseconds", "end_ms"),
            _m("flowStartSeconds", "start_ms", T.SECONDS),
            _m("flowEndSeconds", "end_ms", T.SECONDS),
            # NetFlow v9 FIRST_SWITCHED (22) / LAST_SWITCHED (21): sysUptime-relative ms (RFC 3954 8).
            _m("flowStartSysUpTime", "start_ms", T.SYS_UPTIME_START),
            _m("flowEndSysUpTime", "end_ms", T.SYS_UPTIME),
            _m("flowDirection", "direction"),
            _m("ingressInterface", "ingress_if"),
            _m("egressInterface", "egress_if"),
            _m("sourceMacAddress", "src_mac", T.BYTES),
            _m("destinationMacAddress", "dst_mac", T.BYTES),
            _m("ethernetType", "ethertype"),
            _m("vlanId", "vlan_id"),
            _m("flowEndReason", "end_reason"),
            _m("ipVersion", "ethertype", T.IP_VERSION),
            # The template's address family picks 32 or 139; v9 sends both as ICMP_TYPE (32), see
            # session.V9_SUBSTITUTES, so the transform accepts ICMP and ICMPv6 rows alike.
            _m("icmpTypeCodeIPv4", "dst_port", T.ICMP),
            _m("icmpTypeCodeIPv6", "dst_port", T.ICMP),
            _m("postNATSourceIPv4Address", "post_src_addr", T.IPV4),
            _m("postNATDestinationIPv4Address", "post_dst_addr", T.IPV4),
            _m("postNATSourceIPv6Address", "post_src_addr", T.BYTES),
            _m("postNATDestinationIPv6Address", "post_dst_addr", T.BYTES),
            _m("postNAPTSourceTransportPort", "post_src_port"),
            _m("postNAPTDestinationTransportPort", "post_dst_port"),
            _m("natEvent", "nat_event"),
            # RFC 8158 4.2: a NAT event record's event time (events.nat_event_records puts it in end_ms);
            # on a flow record, when it was last observed
            _m("observationTimeMilliseconds", "end_ms"),
            # ipfixer enterprise elements (PEN in infomodel/data/ipfixer.csv)
            _m("ctState", "ct_state"),
            _m("ctMark", "ct_mark"),
            _m("ctZone", "ct_zone"),
            _m("cgroupId", "cgroup_id"),
            # filled at export time (export/annotate.py): VRF table ids, the meter's sampling interval
            _m("ingressVRFID", "ingress_vrf"),
            _m("egressVRFID", "egress_vrf"),
            _m("samplingInterval", "sampling_interval"),
            # biflow records (RFC 5103, export/biflow.py): reverse elements (PEN 29305), biflowDirection
            _m("reverseOctetDeltaCount", "rev_octets"),
            _m("reversePacketDeltaCount", "rev_packets"),
            _m("reverseFlowStartMilliseconds", "rev_start_ms"),
            _m("reverseFlowEndMilliseconds", "rev_end_ms"),
            _m("reverseTcpControlBits", "rev_tcp_flags"),
            _m("reverseIpClassOfService", "rev_tos"),
            _m("biflowDirection", "biflow_direction"),
            # tunnels.decap: the tunnel of an inner flow (IANA has no outer-address elements: ipfixer's)
            _m("layer2SegmentId", "tunnel_id", T.L2_SEGMENT),
            _m("greKey", "tunnel_id", T.GRE_KEY),
            _m("dot1qCustomerVlanId", "inner_vlan_id"),  # the inner frame's VLAN tag: the tenant's C-TAG
            _m("tunnelType", "tunnel_type"),
            _m("tunnelVirtualNetworkId", "tunnel_id", T.VNI),
            _m("tunnelSourceIPv4Address", "outer_src_addr", T.OUTER_IPV4),
            _m("tunnelDestinationIPv4Address", "outer_dst_addr", T.OUTER_IPV4),
            _m("tunnelSourceIPv6Address", "outer_src_addr", T.OUTER_IPV6),
            _m("tunnelDestinationIPv6Address", "outer_dst_addr", T.OUTER_IPV6),
            # variable-length string, per-record path only (RFC 7011 7)
            _m("interfaceName", "interface", T.RECORD_ATTR),
        ]
    )
)
del T

assert all(
    m.column in (FLOW_DTYPE.names or ()) for m in ELEMENT_COLUMNS.values() if m.transform is not Transform.RECORD_ATTR
), "every mapped column must exist in FLOW_DTYPE"


def field_names(template: Template) -> list[str]:
    """The element names of a template's fields, in order."""
    return [f.element.name for f in template.fields]


def check_mapped(template: Template, *, fast_path: bool = True) -> None:
    """Raise EncodeError naming the first field the table cannot fill (done once, at session set-up)."""
    for i, name in enumerate(field_names(template)):
        m = ELEMENT_COLUMNS.get(name)
        if m is None:
            raise EncodeError(
                f"template {template.template_id} ({template.name}) field {i}: no flow column is mapped to "
                f"element {name!r} (ipfixer/export/mapping.py ELEMENT_COLUMNS)"
            )
        if fast_path and m.transform is Transform.RECORD_ATTR:
            raise EncodeError(
                f"template {template.template_id} ({template.name}) field {i}: element {name!r} is only "
                "available on the per-record path (ExportSession.record_messages)"
            )


def fast_path_ok(template: Template) -> bool:
    """True when every field has a batch column (no per-record attribute such as interfaceName)."""
    return all(
        (m := ELEMENT_COLUMNS.get(name)) is not None and m.transform is not Transform.RECORD_ATTR
        for name in field_names(template)
    )


def _column(batch: np.ndarray, m: ColumnMapping, sys_boot_ms: int | None, sys_now_ms: int | None = None) -> np.ndarray:
    """Apply one transform to a whole batch."""
    t = m.transform
    if t is Transform.INT or t is Transform.BYTES:
        col: np.ndarray = batch[m.column]  # a strided view: the encoder copies it once, into place
        return col
    if t is Transform.IPV4:
        col = batch[m.column][:, 12:16]
        return col
    if t is Transform.ICMP:
        icmp = np.isin(batch["protocol"], (IPPROTO_ICMP, IPPROTO_ICMPV6))
        return np.where(icmp, batch[m.column], 0).astype(np.uint16)
    if t is Transform.IP_VERSION:
        return np.where(batch[m.column] == ETH_P_IPV6, 6, 4).astype(np.uint8)
    if t is Transform.OUTER_IPV4 or t is Transform.OUTER_IPV6:
        addr = batch[m.column]
        v4 = (addr[:, :12] == _V4_PREFIX).all(axis=1)
        if t is Transform.OUTER_IPV4:
            return np.where(v4[:, None], addr[:, 12:16], 0).astype(np.uint8)
        return np.where(v4[:, None], 0, addr).astype(np.uint8)
    if t is Transform.L2_SEGMENT:
        vxlan = batch["tunnel_type"] == TUNNEL_VXLAN
        seg = (np.uint64(L2_SEGMENT_VXLAN) << np.uint64(56)) | (batch[m.column].astype(np.uint64) & np.uint64(0xFFFFFF))
        return np.where(vxlan, seg, np.uint64(0)).astype(np.uint64)
    if t is Transform.VNI:
        vni = np.isin(batch["tunnel_type"], (TUNNEL_VXLAN, TUNNEL_GENEVE))
        return np.where(vni, batch[m.column], 0).astype(np.uint32)
    if t is Transform.GRE_KEY:
        return np.where(batch["tunnel_type"] == TUNNEL_GRE, batch[m.column], 0).astype(np.uint32)
    if t is Transform.SECONDS:
        return (batch[m.column] // 1000).astype(np.uint32)
    if t is Transform.SYS_UPTIME or t is Transform.SYS_UPTIME_START:
        if sys_boot_ms is None:
            raise EncodeError(f"element {m.element!r} needs the exporter's boot time (sys_boot_ms)")
        wall = batch[m.column].astype(np.int64)
        if t is Transform.SYS_UPTIME_START:  # FIRST_SWITCHED <= LAST_SWITCHED even for a hostile row
            wall = np.minimum(wall, batch["end_ms"].astype(np.int64))
        if sys_now_ms is not None:  # RFC 3954 5.1: no record time after the packet's sysUptime
            wall = np.minimum(wall, np.int64(sys_now_ms))
        # A flow seen before the exporter booted is clamped to uptime 0; uptime wraps at 2^32 ms
        # (49.7 days) exactly as a router's sysUpTime does (RFC 3954 5.1).
        rel: np.ndarray = wall - np.int64(sys_boot_ms)
        uptime: np.ndarray = (np.maximum(rel, 0) % UINT32_MOD).astype(np.uint32)
        return uptime
    raise EncodeError(f"element {m.element!r} has no batch column (per-record path only)")


def flow_columns(
    batch: np.ndarray, template: Template, *, sys_boot_ms: int | None = None, sys_now_ms: int | None = None
) -> dict[str, np.ndarray]:
    """Columns for BatchEncoder keyed by element name: ints length n, addresses/MACs (n, k) uint8.

    `sys_now_ms` (wall ms of the v9 packet's sysUptime) caps the sysUptime-relative times."""
    if batch.dtype != FLOW_DTYPE:
        raise EncodeError(f"batch dtype is not FLOW_DTYPE: {batch.dtype}")
    check_mapped(template, fast_path=True)
    return {name: _column(batch, ELEMENT_COLUMNS[name], sys_boot_ms, sys_now_ms) for name in field_names(template)}


def flow_values(
    record: FlowRecord, template: Template, *, sys_boot_ms: int | None = None, sys_now_ms: int | None = None,
    interface_namer: Callable[[int], str] | None = None,
) -> dict[str, Any]:
    """Values for the construct encoder keyed by element name: int, or bytes for addresses/MACs.

    Computed through the same vectorised transforms on a one-row batch, so both paths agree.
    `interface_namer` names the record's observation interface (ifindex) for interfaceName (IE 82)
    when the record itself carries no name."""
    check_mapped(template, fast_path=False)
    batch = records_to_batch([record])
    out: dict[str, Any] = {}
    for name in field_names(template):
        m = ELEMENT_COLUMNS[name]
        if m.transform is Transform.RECORD_ATTR:
            value = getattr(record, m.column)
            if name == "interfaceName" and not value and interface_namer is not None:
                value = interface_namer(record.ifindex)
            out[name] = value
            continue
        col = _column(batch, m, sys_boot_ms, sys_now_ms)
        out[name] = bytes(col[0].tobytes()) if col.ndim == 2 else int(col[0])
    return out
