"""Pure parsing of captured frames and IP packets into flow keys, for the userspace sources
(pcap replay, NFLOG). The kernel classifier applies the same rules in bpf/flow_parse.h.

Hand-written with struct rather than scapy dissection: this runs once per packet of a capture
(scapy's dissector is roughly 50x slower per packet), and it must never raise on malformed input:
a short or bad packet is reported as `None` and counted by the caller.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ipfixer.model import ETH_P_IP, ETH_P_IPV6, V4_MAPPED_PREFIX, FlowKey

ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, PROTO_SCTP = 1, 6, 17, 58, 132
# IPv6 extension headers skipped to reach the transport header (RFC 8200 4.1).
_IPV6_EXT = {0, 43, 60, 135, 139, 140}
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_MAX_EXT_HEADERS = 8
_ZERO16 = b"\x00" * 16
_ZERO6 = b"\x00" * 6


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


def _ports(proto: int, l4: bytes) -> tuple[int, int, int]:
    """(src_port, dst_port, tcp_flags); ICMP/ICMPv6 as (0, type*256+code) like collectors expect."""
    if proto in (PROTO_TCP, PROTO_UDP, PROTO_SCTP) and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4)
        flags = l4[13] if proto == PROTO_TCP and len(l4) >= 14 else 0
        return sport, dport, flags
    if proto in (PROTO_ICMP, PROTO_ICMPV6) and len(l4) >= 2:
        return 0, l4[0] * 256 + l4[1], 0
    return 0, 0, 0


def parse_ip(packet: bytes) -> ParsedPacket | None:
    """Parse an IPv4 or IPv6 packet (as NFLOG hands it over); None if malformed."""
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
        return ParsedPacket(ETH_P_IP, src, dst, sport, dport, proto, total, flags, tos)
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
            elif proto == _IPV6_FRAGMENT and len(packet) >= off + 8:
                fragmented = fragmented or (struct.unpack_from("!H", packet, off + 2)[0] & 0xFFF8) != 0
                proto, off = packet[off], off + 8
            elif proto == _IPV6_AH and len(packet) >= off + 2:
                proto, off = packet[off], off + (packet[off + 1] + 2) * 4
            else:
                break
        sport, dport, flags = (0, 0, 0) if fragmented else _ports(proto, packet[off:])
        return ParsedPacket(ETH_P_IPV6, src, dst, sport, dport, proto, total, flags, tos)
    return None


@dataclass(frozen=True, slots=True)
class ParsedFrame:
    """An Ethernet frame: link-layer fields plus the IP packet (None for non-IP or malformed IP)."""

    src_mac: bytes
    dst_mac: bytes
    vlan_id: int
    ethertype: int
    ip: ParsedPacket | None
    frame_len: int


def parse_ethernet(frame: bytes) -> ParsedFrame | None:
    """Parse an Ethernet II frame with up to two VLAN tags (outer id kept); None if shorter than a header."""
    if len(frame) < 14:
        return None
    dst_mac, src_mac = frame[0:6], frame[6:12]
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    off, vlan_id = 14, 0
    for _ in range(2):
        if ethertype not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        if len(frame) < off + 4:
            return None
        tci, ethertype = struct.unpack_from("!HH", frame, off)
        vlan_id = vlan_id or (tci & 0x0FFF)
        off += 4
    ip = parse_ip(frame[off:]) if ethertype in (ETH_P_IP, ETH_P_IPV6) else None
    return ParsedFrame(src_mac, dst_mac, vlan_id, ethertype, ip, len(frame))


def frame_key(frame: ParsedFrame, direction: int, ifindex: int) -> tuple[FlowKey, int, int, int]:
    """(key, octets, tcp_flags, tos) for a frame; non-IP frames are keyed by ethertype, octets = frame length."""
    ip = frame.ip
    if ip is None:
        key = FlowKey(frame.ethertype, direction, frame.src_mac, frame.dst_mac, _ZERO16, _ZERO16, 0, 0, 0,
                      ifindex, frame.vlan_id)
        return key, frame.frame_len, 0, 0
    key = FlowKey(ip.ethertype, direction, frame.src_mac, frame.dst_mac, ip.src_addr, ip.dst_addr,
                  ip.src_port, ip.dst_port, ip.protocol, ifindex, frame.vlan_id)
    return key, ip.ip_octets, ip.tcp_flags, ip.tos


def packet_key(ip: ParsedPacket, direction: int, ifindex: int) -> FlowKey:
    """Key for an IP packet seen without its link layer (NFLOG): MACs are zero."""
    return FlowKey(ip.ethertype, direction, _ZERO6, _ZERO6, ip.src_addr, ip.dst_addr, ip.src_port,
                   ip.dst_port, ip.protocol, ifindex, 0)
