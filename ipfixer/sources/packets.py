"""Pure parsing of captured frames and IP packets into flow keys, for the userspace sources
(pcap replay, NFLOG). The kernel classifier applies the same rules in bpf/flow_parse.h.

Hand-written with struct rather than scapy dissection: this runs once per packet of a capture
(scapy's dissector is roughly 50x slower per packet), and it must never raise on malformed input:
a short or bad packet is reported as `None` and counted by the caller.

With tunnels.decap the same parser also decapsulates one level of VXLAN, Geneve, GRE/GRETAP and
IPIP/SIT/IPv6-in-IPv6 (`decapsulate`, the rules of bpf/flow_parse.h parse_tunnel), counted in a
DecapCounts under the kernel's counter names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ipfixer.infomodel.types import V4_MAPPED_PREFIX
from ipfixer.model import (  # the IP protocol / IPv6 Next Header names, one set (model.py)
    ETH_P_IP,
    ETH_P_IPV6,
    IPV6_NH_AH,
    IPV6_NH_DSTOPTS,
    IPV6_NH_FRAGMENT,
    IPV6_NH_HIP,
    IPV6_NH_HOPOPTS,
    IPV6_NH_MOBILITY,
    IPV6_NH_ROUTING,
    IPV6_NH_SHIM6,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    FlowKey,
)

ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
# Extension headers in the RFC 8200 4.1 format (next header, length in 8-octet units minus 1), skipped
# to reach the transport header; the fragment header (fixed 8 octets) and AH (RFC 4302 2.2: 4-octet
# units minus 2) are read apart. Userspace also skips mobility/HIP/shim6, which the kernel walk does not.
_IPV6_EXT = {IPV6_NH_HOPOPTS, IPV6_NH_ROUTING, IPV6_NH_DSTOPTS, IPV6_NH_MOBILITY, IPV6_NH_HIP, IPV6_NH_SHIM6}
_MAX_EXT_HEADERS = 8  # bounded walk on hostile input (the kernel's IPV6_MAX_EXT is 6, an unroll budget)
_ZERO16 = b"\x00" * 16
_ZERO6 = b"\x00" * 6

# Tunnels (tunnels.decap), the names and values of bpf/flow_parse.h and bpf/flow_types.h.
ENCAP_IPIP, ENCAP_IPV6, ENCAP_GRE = 4, 41, 47  # IPv4 in IP (RFC 2003), IPv6 in IP (RFC 4213/2473), GRE
UDP_PORT_VXLAN, UDP_PORT_GENEVE = 4789, 6081  # IANA; RFC 7348, RFC 8926
ETH_P_TEB = 0x6558  # Transparent Ethernet Bridging: an Ethernet frame follows (GRETAP, Geneve)
TUNNEL_NONE, TUNNEL_VXLAN, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_IPIP = 0, 1, 2, 3, 4  # flow_key.tunnel_type
KEPT_OUTER = -1  # decapsulate(): a tunnel packet metered as its outer flow
# The kernel's counters of the same events (enum ipfixer_counter CNT_DECAP_*), by outcome.
DECAP_COUNTER_NAMES: dict[int, str] = {TUNNEL_VXLAN: "decap_vxlan", TUNNEL_GENEVE: "decap_geneve",
                                       TUNNEL_GRE: "decap_gre", TUNNEL_IPIP: "decap_ipip",
                                       KEPT_OUTER: "decap_kept_outer"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Tunnel:
    """How a decapsulated packet was carried: the tunnel fields of struct flow_key."""

    type: int  # TUNNEL_*
    id: int  # VNI (VXLAN, Geneve) or GRE key, 0 without one
    inner_vlan_id: int  # the tag of the inner Ethernet frame (VXLAN, Geneve, GRETAP), 0 = none
    outer_src_addr: bytes  # the outer IP header's, 16 bytes (IPv4 as ::ffff:a.b.c.d)
    outer_dst_addr: bytes


@dataclass(frozen=True, slots=True)
class ParsedPacket:
    """What a flow meter keeps of one packet."""

    ethertype: int
    src_addr: bytes
    dst_addr: bytes
    src_port: int
    dst_port: int
    protocol: int
    ip_octets: int
    tcp_flags: int
    tos: int
    tunnel: Tunnel | None = None  # set when this is the inner packet of a tunnel (tunnels.decap)


class DecapCounts:
    """What decapsulation did to the packets parsed with it (cumulative), under the kernel's names."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] = dict.fromkeys(DECAP_COUNTER_NAMES, 0)

    def decapsulate(self, packet: bytes, outer: ParsedPacket, l4_off: int) -> ParsedPacket:
        """`decapsulate`, counted: the inner packet, or `outer` when there is none to meter."""
        outcome, parsed = decapsulate(packet, outer, l4_off)
        if outcome != TUNNEL_NONE:
            self.counts[outcome] += 1
        return parsed

    def as_dict(self) -> dict[str, int]:
        """decap_vxlan, decap_geneve, decap_gre, decap_ipip, decap_kept_outer."""
        return {DECAP_COUNTER_NAMES[k]: v for k, v in self.counts.items()}


def _ports(proto: int, l4: bytes) -> tuple[int, int, int]:
    """(src_port, dst_port, tcp_flags); ICMP/ICMPv6 as (0, type*256+code) like collectors expect."""
    if proto in (PROTO_TCP, PROTO_UDP, PROTO_SCTP) and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4)
        flags = l4[13] if proto == PROTO_TCP and len(l4) >= 14 else 0
        return sport, dport, flags
    if proto in (PROTO_ICMP, PROTO_ICMPV6) and len(l4) >= 2:
        return 0, l4[0] * 256 + l4[1], 0
    return 0, 0, 0


def parse_ip(packet: bytes, decap: DecapCounts | None = None) -> ParsedPacket | None:
    """Parse an IPv4 or IPv6 packet (as NFLOG hands it over); None if malformed.

    With `decap` (tunnels.decap), a tunnel packet that is a first fragment without anomaly (IPv4 total
    length at least its header, UDP header whole) becomes its inner packet (`decapsulate`), counted there.
    The bytes held may be fewer than the IP length says (a capture's or NFLOG's snaplen), so unlike the
    kernel a length beyond them is no anomaly here: only the headers decapsulation reads must be there."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            return None
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or len(packet) < ihl:
            return None
        tos = packet[1]
        total = struct.unpack_from("!H", packet, 2)[0]
        frag = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF
        proto = packet[9]
        src = V4_MAPPED_PREFIX + packet[12:16]
        dst = V4_MAPPED_PREFIX + packet[16:20]
        sport, dport, flags = (0, 0, 0) if frag else _ports(proto, packet[ihl:])
        parsed = ParsedPacket(ETH_P_IP, src, dst, sport, dport, proto, total, flags, tos)
        if decap is None or frag or total < ihl:
            return parsed
        return decap.decapsulate(packet, parsed, ihl)
    if version == 6:
        if len(packet) < 40:
            return None
        tos = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
        total = struct.unpack_from("!H", packet, 4)[0] + 40
        proto = packet[6]
        src, dst = packet[8:24], packet[24:40]
        off = 40
        fragmented = False
        for _ in range(_MAX_EXT_HEADERS):
            if proto in _IPV6_EXT and len(packet) >= off + 2:
                proto, off = packet[off], off + (packet[off + 1] + 1) * 8
            elif proto == IPV6_NH_FRAGMENT and len(packet) >= off + 8:
                fragmented = fragmented or (struct.unpack_from("!H", packet, off + 2)[0] & 0xFFF8) != 0
                proto, off = packet[off], off + 8
            elif proto == IPV6_NH_AH and len(packet) >= off + 2:
                proto, off = packet[off], off + (packet[off + 1] + 2) * 4
            else:
                break
        sport, dport, flags = (0, 0, 0) if fragmented else _ports(proto, packet[off:])
        parsed = ParsedPacket(ETH_P_IPV6, src, dst, sport, dport, proto, total, flags, tos)
        if decap is None or fragmented:
            return parsed
        return decap.decapsulate(packet, parsed, off)
    return None


def decapsulate(packet: bytes, outer: ParsedPacket, l4_off: int) -> tuple[int, ParsedPacket]:
    """One level of decapsulation of an IP packet parsed as `outer` (its transport header at `l4_off`):
    (TUNNEL_* type, inner packet with its Tunnel), (KEPT_OUTER, outer) for a tunnel packet whose header is
    not understood or cut or whose payload is not IPv4/IPv6, or (TUNNEL_NONE, outer) for any other packet.

    Hand-written, the rules of bpf/flow_parse.h parse_tunnel, so both meters key a packet alike: VXLAN
    (RFC 7348 5) only with the I flag; Geneve (RFC 8926 3.4) version 0 only, options skipped by their
    length; GRE (RFC 2784 2.1, RFC 2890 2) without the RFC 1701 routing bit and version 0 only, checksum,
    key (the tunnel id) and sequence number skipped; IP-in-IP (protocols 4, 41). An inner Ethernet frame
    (VXLAN, Geneve and GRE with protocol 0x6558) may carry one 802.1Q/802.1ad tag (inner_vlan_id). The
    inner IP header must be wholly there; its own payload is never decapsulated again. Every read is
    bounded by len(packet) and at most one tunnel header is walked, so it never raises and never loops.
    """
    proto, n, tid = outer.protocol, len(packet), 0
    if proto == PROTO_UDP and outer.dst_port in (UDP_PORT_VXLAN, UDP_PORT_GENEVE):
        off = l4_off + 8
        if n < off:  # the UDP header itself is cut: the kernel's trunc_l4 anomaly, never a tunnel
            return TUNNEL_NONE, outer
        if n < off + 8:
            return KEPT_OUTER, outer
        if outer.dst_port == UDP_PORT_VXLAN:  # flags, reserved, VNI, reserved
            if not packet[off] & 0x08:  # I flag: the VNI is valid
                return KEPT_OUTER, outer
            ttype, inner, off = TUNNEL_VXLAN, ETH_P_TEB, off + 8
        else:  # version + option length, flags, protocol type, VNI, reserved
            if packet[off] >> 6:
                return KEPT_OUTER, outer
            ttype, inner = TUNNEL_GENEVE, struct.unpack_from("!H", packet, off + 2)[0]
            off += 8 + (packet[off] & 0x3F) * 4
        tid = int.from_bytes(packet[l4_off + 12:l4_off + 15], "big")
    elif proto == ENCAP_GRE:
        off = l4_off
        if n < off + 4:
            return KEPT_OUTER, outer
        flags = packet[off]
        if flags & 0x40 or packet[off + 1] & 0x07:  # RFC 1701 routing, or not version 0 (PPTP's 1)
            return KEPT_OUTER, outer
        ttype, inner = TUNNEL_GRE, struct.unpack_from("!H", packet, off + 2)[0]
        glen = 8 if flags & 0x80 else 4  # checksum + reserved1
        if flags & 0x20:  # key
            if n < off + glen + 4:
                return KEPT_OUTER, outer
            tid = struct.unpack_from("!I", packet, off + glen)[0]
            glen += 4
        if flags & 0x10:  # sequence number
            glen += 4
        off += glen
    elif proto == ENCAP_IPIP:
        ttype, inner, off = TUNNEL_IPIP, ETH_P_IP, l4_off
    elif proto == ENCAP_IPV6:
        ttype, inner, off = TUNNEL_IPIP, ETH_P_IPV6, l4_off
    else:
        return TUNNEL_NONE, outer
    vlan = 0
    if inner == ETH_P_TEB:  # an Ethernet frame: its MACs are not kept (the observed frame's are)
        if n < off + 14:
            return KEPT_OUTER, outer
        inner = struct.unpack_from("!H", packet, off + 12)[0]
        off += 14
        if inner in (ETH_P_8021Q, ETH_P_8021AD):  # one tag (the tenant's)
            if n < off + 4:
                return KEPT_OUTER, outer
            tci, inner = struct.unpack_from("!HH", packet, off)
            vlan, off = tci & 0x0FFF, off + 4
    if inner not in (ETH_P_IP, ETH_P_IPV6) or n < off + (20 if inner == ETH_P_IP else 40):
        return KEPT_OUTER, outer
    tunnel = Tunnel(ttype, tid, vlan, outer.src_addr, outer.dst_addr)
    # The inner packet's bytes: as many as the outer length says, or as are held if more (the kernel's
    # skb length); the inner header's length claim never counts beyond them.
    held = max(outer.ip_octets, n) - off
    version = packet[off] >> 4
    ip = parse_ip(packet[off:]) if version == (4 if inner == ETH_P_IP else 6) else None
    if ip is None and version == 4 and inner == ETH_P_IP and packet[off] & 0x0F >= 5:
        # IPv4 options cut short: the kernel keys by the fixed header (its transport header is cut)
        h = packet[off:off + 20]
        ip = ParsedPacket(ETH_P_IP, V4_MAPPED_PREFIX + h[12:16], V4_MAPPED_PREFIX + h[16:20], 0, 0, h[9],
                          struct.unpack_from("!H", h, 2)[0], 0, h[1])  # fmt: skip
    if ip is None:  # malformed inner header: the kernel meters it too, keyed by the tunnel alone
        return ttype, ParsedPacket(inner, _ZERO16, _ZERO16, 0, 0, 0, held, 0, 0, tunnel)
    octets = ip.ip_octets
    if version == 4:
        octets = held if octets < (packet[off] & 0x0F) * 4 else min(octets, held)
    else:
        octets = held if octets == 40 else min(octets, held)  # payload length 0: jumbogram, the bytes held
    return ttype, ParsedPacket(ip.ethertype, ip.src_addr, ip.dst_addr, ip.src_port, ip.dst_port, ip.protocol,
                               octets, ip.tcp_flags, ip.tos, tunnel)


@dataclass(frozen=True, slots=True)
class ParsedFrame:
    """An Ethernet frame: link-layer fields plus the IP packet (None for non-IP or malformed IP)."""

    src_mac: bytes
    dst_mac: bytes
    vlan_id: int
    ethertype: int
    ip: ParsedPacket | None
    frame_len: int
    outgoing: bool = False  # a Linux cooked capture says the host sent it (PACKET_OUTGOING)


def parse_ethernet(frame: bytes, decap: DecapCounts | None = None) -> ParsedFrame | None:
    """Parse an Ethernet II frame with up to two VLAN tags (outer id kept); None if shorter than a header.
    With `decap`, a tunnel packet's `ip` is its inner packet (parse_ip); MACs and VLAN stay the frame's."""
    if len(frame) < 14:
        return None
    return _after_ethertype(frame[6:12], frame[0:6], frame, 12, decap)


def _after_ethertype(src_mac: bytes, dst_mac: bytes, frame: bytes, at: int,
                     decap: DecapCounts | None = None) -> ParsedFrame | None:
    """The frame from its EtherType field at `at` on: VLAN tags (up to two), then IP or another protocol."""
    ethertype = struct.unpack_from("!H", frame, at)[0]
    off, vlan_id = at + 2, 0
    for _ in range(2):
        if ethertype not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        if len(frame) < off + 4:
            return None
        tci, ethertype = struct.unpack_from("!HH", frame, off)
        vlan_id = vlan_id or (tci & 0x0FFF)
        off += 4
    ip = parse_ip(frame[off:], decap) if ethertype in (ETH_P_IP, ETH_P_IPV6) else None
    return ParsedFrame(src_mac, dst_mac, vlan_id, ethertype, ip, len(frame))


# pcap link types (https://www.tcpdump.org/linktypes.html) that replay reads; ipfixer.sources.capture names them.
LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW_OLD, LINKTYPE_RAW, LINKTYPE_LOOP = 0, 1, 12, 101, 108
LINKTYPE_LINUX_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2 = 113, 228, 229, 276
_ARPHRD_ETHER = 1
# BSD loopback: the address family, in the writer's byte order (NULL) or network order (LOOP);
# AF_INET6 is 10 on Linux, 24 on NetBSD/OpenBSD, 28 on FreeBSD, 30 on macOS.
_AF_INET, _AF_INET6 = 2, frozenset({10, 24, 28, 30})


def _raw_ip(data: bytes, version: int | None = None, frame_len: int | None = None,
            decap: DecapCounts | None = None) -> ParsedFrame | None:
    if version is not None and data[:1] and data[0] >> 4 != version:
        return None  # before parse_ip: a packet refused here is not counted as decapsulated
    ip = parse_ip(data, decap)
    if ip is None:
        return None
    return ParsedFrame(_ZERO6, _ZERO6, 0, ip.ethertype, ip, len(data) if frame_len is None else frame_len)


def _cooked(data: bytes, hatype: int, halen: int, addr_at: int, ethertype_at: int, header: int,
            decap: DecapCounts | None = None) -> ParsedFrame | None:
    """Linux cooked capture (tcpdump -i any): the sender's address, then the EtherType and the packet."""
    if len(data) < header:
        return None
    src = data[addr_at:addr_at + 6] if hatype == _ARPHRD_ETHER and halen == 6 else _ZERO6
    # Rebuilt as `ethertype + payload` so VLAN tags the kernel left in are read like Ethernet's.
    return _after_ethertype(src, _ZERO6, data[ethertype_at:ethertype_at + 2] + data[header:], 0, decap)


_PACKET_OUTGOING = 4  # linux/if_packet.h


def parse_link(linktype: int, data: bytes, decap: DecapCounts | None = None) -> ParsedFrame | None:
    """Parse one captured frame by its pcap link type; None if malformed (or the link type is unknown).
    With `decap`, tunnel packets are decapsulated (parse_ip)."""
    if linktype == LINKTYPE_ETHERNET:
        return parse_ethernet(data, decap)
    if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_OLD):
        return _raw_ip(data, decap=decap)
    if linktype == LINKTYPE_IPV4:
        return _raw_ip(data, 4, decap=decap)
    if linktype == LINKTYPE_IPV6:
        return _raw_ip(data, 6, decap=decap)
    if linktype == LINKTYPE_LINUX_SLL:  # packet type, ARPHRD, address length, 8-byte address, protocol
        if len(data) < 16:
            return None
        hatype, halen = struct.unpack_from("!HH", data, 2)
        frame = _cooked(data, hatype, halen, 6, 14, 16, decap)
        outgoing = struct.unpack_from("!H", data)[0] == _PACKET_OUTGOING
    elif linktype == LINKTYPE_LINUX_SLL2:  # protocol, reserved, ifindex, ARPHRD, packet type, addr len, addr
        if len(data) < 20:
            return None
        hatype, halen = struct.unpack_from("!H", data, 8)[0], data[11]
        frame = _cooked(data, hatype, halen, 12, 0, 20, decap)
        outgoing = data[10] == _PACKET_OUTGOING
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if len(data) < 4:
            return None
        family = struct.unpack_from("!I", data)[0]
        if linktype == LINKTYPE_NULL and family > 0xFFFF:  # the writer was little-endian: families are small
            family = struct.unpack_from("<I", data)[0]
        if family == _AF_INET:
            return _raw_ip(data[4:], 4, len(data), decap)
        if family in _AF_INET6:
            return _raw_ip(data[4:], 6, len(data), decap)
        return None
    else:
        return None
    if frame is None:
        return None
    return ParsedFrame(frame.src_mac, frame.dst_mac, frame.vlan_id, frame.ethertype, frame.ip, len(data), outgoing)


def frame_key(frame: ParsedFrame, direction: int, ifindex: int) -> tuple[FlowKey, int, int, int]:
    """(key, octets, tcp_flags, tos) for a frame; non-IP frames are keyed by ethertype, octets = frame length."""
    ip = frame.ip
    if ip is None:
        key = FlowKey(frame.ethertype, direction, frame.src_mac, frame.dst_mac, _ZERO16, _ZERO16, 0, 0, 0,
                      ifindex, frame.vlan_id)
        return key, frame.frame_len, 0, 0
    t = ip.tunnel
    if t is None:
        key = FlowKey(ip.ethertype, direction, frame.src_mac, frame.dst_mac, ip.src_addr, ip.dst_addr,
                      ip.src_port, ip.dst_port, ip.protocol, ifindex, frame.vlan_id)
    else:
        key = FlowKey(ip.ethertype, direction, frame.src_mac, frame.dst_mac, ip.src_addr, ip.dst_addr,
                      ip.src_port, ip.dst_port, ip.protocol, ifindex, frame.vlan_id, t.type, t.id,
                      t.inner_vlan_id, t.outer_src_addr, t.outer_dst_addr)  # fmt: skip
    return key, ip.ip_octets, ip.tcp_flags, ip.tos


def packet_key(ip: ParsedPacket, direction: int, ifindex: int, src_mac: bytes = _ZERO6,
               dst_mac: bytes = _ZERO6) -> FlowKey:
    """Key for an IP packet seen without its link layer (NFLOG): MACs are zero unless given; a
    decapsulated packet's key holds its tunnel."""
    t = ip.tunnel
    if t is None:
        return FlowKey(ip.ethertype, direction, src_mac, dst_mac, ip.src_addr, ip.dst_addr, ip.src_port,
                       ip.dst_port, ip.protocol, ifindex, 0)
    return FlowKey(ip.ethertype, direction, src_mac, dst_mac, ip.src_addr, ip.dst_addr, ip.src_port,
                   ip.dst_port, ip.protocol, ifindex, 0, t.type, t.id, t.inner_vlan_id, t.outer_src_addr,
                   t.outer_dst_addr)
