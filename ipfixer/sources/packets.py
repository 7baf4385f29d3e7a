"""Pure parsing of captured frames and IP packets into flow keys, for the userspace sources
(pcap replay, NFLOG). The kernel classifier applies the same rules in bpf/flow_parse.h.

Hand-written with struct rather than scapy dissection: this runs once per packet of a capture
(scapy's dissector is roughly 50x slower per packet), and it must never raise on malformed input:
a short or bad packet is reported as `None` and counted by the caller.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ipfixer.infomodel.types import V4_MAPPED_PREFIX
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowKey

ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
# IP protocol / IPv6 Next Header numbers (IANA "Assigned Internet Protocol Numbers"), the names and
# values bpf/flow_parse.h defines for the kernel parser (tests/unit/test_packet_names.py checks both agree).
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, PROTO_SCTP, PROTO_UDPLITE = 1, 6, 17, 58, 132, 136
IPV6_NH_HOPOPTS, IPV6_NH_ROUTING, IPV6_NH_FRAGMENT, IPV6_NH_AH, IPV6_NH_DSTOPTS = 0, 43, 44, 51, 60
IPV6_NH_MOBILITY, IPV6_NH_HIP, IPV6_NH_SHIM6 = 135, 139, 140  # RFC 6275, RFC 7401, RFC 5533
# Extension headers in the RFC 8200 4.1 format (next header, length in 8-octet units minus 1), skipped
# to reach the transport header; the fragment header (fixed 8 octets) and AH (RFC 4302 2.2: 4-octet
# units minus 2) are read apart. Userspace also skips mobility/HIP/shim6, which the kernel walk does not.
_IPV6_EXT = {IPV6_NH_HOPOPTS, IPV6_NH_ROUTING, IPV6_NH_DSTOPTS, IPV6_NH_MOBILITY, IPV6_NH_HIP, IPV6_NH_SHIM6}
_MAX_EXT_HEADERS = 8  # bounded walk on hostile input (the kernel's IPV6_MAX_EXT is 6, an unroll budget)
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
            elif proto == IPV6_NH_FRAGMENT and len(packet) >= off + 8:
                fragmented = fragmented or (struct.unpack_from("!H", packet, off + 2)[0] & 0xFFF8) != 0
                proto, off = packet[off], off + 8
            elif proto == IPV6_NH_AH and len(packet) >= off + 2:
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
    outgoing: bool = False  # a Linux cooked capture says the host sent it (PACKET_OUTGOING)


def parse_ethernet(frame: bytes) -> ParsedFrame | None:
    """Parse an Ethernet II frame with up to two VLAN tags (outer id kept); None if shorter than a header."""
    if len(frame) < 14:
        return None
    return _after_ethertype(frame[6:12], frame[0:6], frame, 12)


def _after_ethertype(src_mac: bytes, dst_mac: bytes, frame: bytes, at: int) -> ParsedFrame | None:
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
    ip = parse_ip(frame[off:]) if ethertype in (ETH_P_IP, ETH_P_IPV6) else None
    return ParsedFrame(src_mac, dst_mac, vlan_id, ethertype, ip, len(frame))


# pcap link types (https://www.tcpdump.org/linktypes.html) that replay reads; ipfixer.sources.capture names them.
LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW_OLD, LINKTYPE_RAW, LINKTYPE_LOOP = 0, 1, 12, 101, 108
LINKTYPE_LINUX_SLL, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL2 = 113, 228, 229, 276
_ARPHRD_ETHER = 1
# BSD loopback: the address family, in the writer's byte order (NULL) or network order (LOOP);
# AF_INET6 is 10 on Linux, 24 on NetBSD/OpenBSD, 28 on FreeBSD, 30 on macOS.
_AF_INET, _AF_INET6 = 2, frozenset({10, 24, 28, 30})


def _raw_ip(data: bytes, version: int | None = None, frame_len: int | None = None) -> ParsedFrame | None:
    ip = parse_ip(data)
    if ip is None or (version is not None and data[0] >> 4 != version):
        return None
    return ParsedFrame(_ZERO6, _ZERO6, 0, ip.ethertype, ip, len(data) if frame_len is None else frame_len)


def _cooked(data: bytes, hatype: int, halen: int, addr_at: int, ethertype_at: int, header: int) -> ParsedFrame | None:
    """Linux cooked capture (tcpdump -i any): the sender's address, then the EtherType and the packet."""
    if len(data) < header:
        return None
    src = data[addr_at:addr_at + 6] if hatype == _ARPHRD_ETHER and halen == 6 else _ZERO6
    # Rebuilt as `ethertype + payload` so VLAN tags the kernel left in are read like Ethernet's.
    return _after_ethertype(src, _ZERO6, data[ethertype_at:ethertype_at + 2] + data[header:], 0)


_PACKET_OUTGOING = 4  # linux/if_packet.h


def parse_link(linktype: int, data: bytes) -> ParsedFrame | None:
    """Parse one captured frame by its pcap link type; None if malformed (or the link type is unknown)."""
    if linktype == LINKTYPE_ETHERNET:
        return parse_ethernet(data)
    if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_OLD):
        return _raw_ip(data)
    if linktype == LINKTYPE_IPV4:
        return _raw_ip(data, 4)
    if linktype == LINKTYPE_IPV6:
        return _raw_ip(data, 6)
    if linktype == LINKTYPE_LINUX_SLL:  # packet type, ARPHRD, address length, 8-byte address, protocol
        if len(data) < 16:
            return None
        hatype, halen = struct.unpack_from("!HH", data, 2)
        frame = _cooked(data, hatype, halen, 6, 14, 16)
        outgoing = struct.unpack_from("!H", data)[0] == _PACKET_OUTGOING
    elif linktype == LINKTYPE_LINUX_SLL2:  # protocol, reserved, ifindex, ARPHRD, packet type, addr len, addr
        if len(data) < 20:
            return None
        hatype, halen = struct.unpack_from("!H", data, 8)[0], data[11]
        frame = _cooked(data, hatype, halen, 12, 0, 20)
        outgoing = data[10] == _PACKET_OUTGOING
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        if len(data) < 4:
            return None
        family = struct.unpack_from("!I", data)[0]
        if linktype == LINKTYPE_NULL and family > 0xFFFF:  # the writer was little-endian: families are small
            family = struct.unpack_from("<I", data)[0]
        if family == _AF_INET:
            return _raw_ip(data[4:], 4, len(data))
        if family in _AF_INET6:
            return _raw_ip(data[4:], 6, len(data))
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
    key = FlowKey(ip.ethertype, direction, frame.src_mac, frame.dst_mac, ip.src_addr, ip.dst_addr,
                  ip.src_port, ip.dst_port, ip.protocol, ifindex, frame.vlan_id)
    return key, ip.ip_octets, ip.tcp_flags, ip.tos


def packet_key(ip: ParsedPacket, direction: int, ifindex: int) -> FlowKey:
    """Key for an IP packet seen without its link layer (NFLOG): MACs are zero."""
    return FlowKey(ip.ethertype, direction, _ZERO6, _ZERO6, ip.src_addr, ip.dst_addr, ip.src_port,
                   ip.dst_port, ip.protocol, ifindex, 0)
