"""Userspace tunnel decapsulation (ipfixer.sources.packets.decapsulate, tunnels.decap) on frames built with
scapy: every tunnel type the kernel decapsulates (bpf/flow_parse.h parse_tunnel), the inner VLAN tag, GRE
options, Geneve options, and hostile input (cut at every offset, unknown flags/versions, non-IP payloads,
arbitrary bytes) that must keep the outer flow, be counted, and never raise."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from scapy.contrib.geneve import GENEVE, GeneveOptions
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, GRE, Dot1AD, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN

from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowKey, to_addr16
from ipfixer.sources import packets
from ipfixer.sources.packets import (
    KEPT_OUTER,
    LINKTYPE_ETHERNET,
    TUNNEL_GENEVE,
    TUNNEL_GRE,
    TUNNEL_IPIP,
    TUNNEL_NONE,
    TUNNEL_VXLAN,
    DecapCounts,
    decapsulate,
    frame_key,
    packet_key,
    parse_ethernet,
    parse_ip,
    parse_link,
)

O4S, O4D = "192.0.2.1", "192.0.2.2"  # outer (underlay) addresses
O6S, O6D = "2001:db8:ff::1", "2001:db8:ff::2"
I4S, I4D = "10.7.0.1", "10.7.0.2"  # inner (overlay) addresses
I6S, I6D = "fd00:7::1", "fd00:7::2"
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
INNER_ETH = Ether(src="02:00:00:00:aa:01", dst="02:00:00:00:aa:02")


def inner_tcp(payload: int = 100) -> Any:
    return IP(src=I4S, dst=I4D, tos=0x28) / TCP(sport=1234, dport=80, flags="PA") / (b"t" * payload)


def inner_udp6(payload: int = 30) -> Any:
    return IPv6(src=I6S, dst=I6D, tc=0x10) / UDP(sport=5353, dport=53) / (b"u" * payload)


def key_of(frame: Any, decap: DecapCounts | None) -> tuple[FlowKey, int, int, int]:
    parsed = parse_ethernet(bytes(frame), decap)
    assert parsed is not None
    return frame_key(parsed, 0, 3)


def counts(decap: DecapCounts) -> dict[str, int]:
    return {k: v for k, v in decap.as_dict().items() if v}


def assert_inner_tcp(key: FlowKey, octets: int, flags: int, tos: int, payload: int = 100) -> None:
    assert (key.src_addr, key.dst_addr) == (to_addr16(I4S), to_addr16(I4D))
    assert (key.src_port, key.dst_port, key.protocol, key.ethertype) == (1234, 80, 6, ETH_P_IP)
    assert (octets, flags, tos) == (20 + 20 + payload, 0x18, 0x28)


def assert_inner_udp6(key: FlowKey, octets: int, flags: int, tos: int, payload: int = 30) -> None:
    assert (key.src_addr, key.dst_addr) == (to_addr16(I6S), to_addr16(I6D))
    assert (key.src_port, key.dst_port, key.protocol, key.ethertype) == (5353, 53, 17, ETH_P_IPV6)
    assert (octets, flags, tos) == (40 + 8 + payload, 0, 0x10)


def outer4(proto: int | None = None) -> Any:
    return IP(src=O4S, dst=O4D) if proto is None else IP(src=O4S, dst=O4D, proto=proto)


def test_vxlan_inner_tcp_keeps_observed_macs_and_vlan() -> None:
    frame = ETH / Dot1Q(vlan=7) / outer4() / UDP(sport=49152, dport=4789) / VXLAN(vni=0xABCDE) / INNER_ETH / \
        inner_tcp()
    decap = DecapCounts()
    key, octets, flags, tos = key_of(frame, decap)
    assert_inner_tcp(key, octets, flags, tos)
    assert (key.tunnel_type, key.tunnel_id, key.inner_vlan_id) == (TUNNEL_VXLAN, 0xABCDE, 0)
    assert (key.outer_src_addr, key.outer_dst_addr) == (to_addr16(O4S), to_addr16(O4D))
    assert key.outer_src_addr[:12] == packets.V4_MAPPED_PREFIX
    assert (key.src_mac, key.dst_mac, key.vlan_id) == (bytes.fromhex("020000000001"), bytes.fromhex("020000000002"), 7)
    assert counts(decap) == {"decap_vxlan": 1}


@pytest.mark.parametrize("tag", [Dot1Q, Dot1AD])
def test_vxlan_inner_vlan_over_ipv6(tag: Any) -> None:
    frame = ETH / IPv6(src=O6S, dst=O6D) / UDP(sport=40000, dport=4789) / VXLAN(vni=42) / INNER_ETH / \
        tag(vlan=0x123, prio=5) / inner_udp6()
    decap = DecapCounts()
    key, octets, flags, tos = key_of(frame, decap)
    assert_inner_udp6(key, octets, flags, tos)
    assert (key.tunnel_type, key.tunnel_id, key.inner_vlan_id, key.vlan_id) == (TUNNEL_VXLAN, 42, 0x123, 0)
    assert (key.outer_src_addr, key.outer_dst_addr) == (to_addr16(O6S), to_addr16(O6D))
    assert counts(decap) == {"decap_vxlan": 1}


@pytest.mark.parametrize("n_options", [0, 1, 3])
def test_geneve_options_skipped_by_length(n_options: int) -> None:
    opts = [GeneveOptions(classid=0x0102, type=i, data=b"\x00" * (4 * i)) for i in range(n_options)]
    decap = DecapCounts()
    teb = outer4() / UDP(dport=6081) / GENEVE(vni=0x777, proto=0x6558, options=opts) / INNER_ETH / \
        Dot1Q(vlan=9) / inner_tcp()
    key, octets, flags, tos = key_of(ETH / teb, decap)
    assert_inner_tcp(key, octets, flags, tos)
    assert (key.tunnel_type, key.tunnel_id, key.inner_vlan_id) == (TUNNEL_GENEVE, 0x777, 9)
    # Geneve straight to IP (protocol type 0x0800 / 0x86DD): no inner Ethernet
    for inner, check in ((inner_tcp(), assert_inner_tcp), (inner_udp6(), assert_inner_udp6)):
        proto = 0x0800 if inner.name == "IP" else 0x86DD
        frame = ETH / outer4() / UDP(dport=6081) / GENEVE(vni=5, proto=proto, options=opts) / inner
        key, octets, flags, tos = key_of(frame, decap)
        check(key, octets, flags, tos)
        assert (key.tunnel_type, key.tunnel_id, key.inner_vlan_id) == (TUNNEL_GENEVE, 5, 0)
    assert counts(decap) == {"decap_geneve": 3}


@pytest.mark.parametrize(("chksum", "key_present", "seq"), [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1),
                                                            (1, 0, 1), (0, 1, 1)])  # fmt: skip
def test_gre_checksum_key_sequence(chksum: int, key_present: int, seq: int) -> None:
    gre = GRE(chksum_present=chksum, key_present=key_present, seqnum_present=seq, key=0xDEADBEEF,
              sequence_number=77)  # fmt: skip
    decap = DecapCounts()
    key, octets, flags, tos = key_of(ETH / outer4() / gre / inner_tcp(), decap)
    assert_inner_tcp(key, octets, flags, tos)
    assert (key.tunnel_type, key.tunnel_id) == (TUNNEL_GRE, 0xDEADBEEF if key_present else 0)
    # GRETAP (Transparent Ethernet Bridging) with an inner tag, over IPv6
    gre.proto = 0x6558
    frame = ETH / IPv6(src=O6S, dst=O6D) / gre / INNER_ETH / Dot1Q(vlan=4094) / inner_udp6()
    key, octets, flags, tos = key_of(frame, decap)
    assert_inner_udp6(key, octets, flags, tos)
    assert (key.tunnel_type, key.inner_vlan_id, key.outer_dst_addr) == (TUNNEL_GRE, 4094, to_addr16(O6D))
    assert counts(decap) == {"decap_gre": 2}


@pytest.mark.parametrize(("outer", "inner", "check"), [
    (outer4(), inner_tcp(), assert_inner_tcp),                                  # IPIP
    (outer4(), inner_udp6(), assert_inner_udp6),                                # SIT
    (IPv6(src=O6S, dst=O6D), inner_udp6(), assert_inner_udp6),                  # IPv6-in-IPv6
    (IPv6(src=O6S, dst=O6D), inner_tcp(), assert_inner_tcp),                    # IPv4-in-IPv6
])  # fmt: skip
def test_ip_in_ip(outer: Any, inner: Any, check: Any) -> None:
    decap = DecapCounts()
    key, octets, flags, tos = key_of(ETH / outer / inner, decap)
    check(key, octets, flags, tos)
    assert (key.tunnel_type, key.tunnel_id, key.inner_vlan_id) == (TUNNEL_IPIP, 0, 0)
    src = O4S if outer.name == "IP" else O6S
    assert key.outer_src_addr == to_addr16(src)
    assert counts(decap) == {"decap_ipip": 1}


def test_ip_path_nflog_packet_key() -> None:
    """NFLOG hands over the IP packet: parse_ip + packet_key carry the tunnel the same way."""
    pkt = bytes(outer4() / UDP(dport=4789) / VXLAN(vni=1000) / INNER_ETH / Dot1Q(vlan=33) / inner_tcp())
    decap = DecapCounts()
    ip = parse_ip(pkt, decap)
    assert ip is not None and ip.tunnel is not None
    key = packet_key(ip, 1, 9)
    assert_inner_tcp(key, ip.ip_octets, ip.tcp_flags, ip.tos)
    assert (key.tunnel_type, key.tunnel_id, key.inner_vlan_id, key.ifindex, key.direction) == (1, 1000, 33, 9, 1)
    assert (key.outer_src_addr, key.outer_dst_addr) == (to_addr16(O4S), to_addr16(O4D))
    # the raw IP link types of a capture too
    frame = parse_link(101, pkt, decap)
    assert frame is not None and frame_key(frame, 0, 0)[0].tunnel_id == 1000
    assert counts(decap) == {"decap_vxlan": 2}


TUNNEL_FRAMES = {
    "vxlan": ETH / outer4() / UDP(dport=4789) / VXLAN(vni=3) / INNER_ETH / inner_tcp(),
    "geneve": ETH / outer4() / UDP(dport=6081) / GENEVE(vni=3, proto=0x6558,
                                                          options=[GeneveOptions(data=b"abcd")]) / INNER_ETH / inner_tcp(),
    "gre": ETH / outer4() / GRE(key_present=1, key=3, chksum_present=1, seqnum_present=1) / inner_tcp(),
    "gretap_vlan": ETH / IPv6(src=O6S, dst=O6D) / GRE(key_present=1, key=3, proto=0x6558) / INNER_ETH /
    Dot1Q(vlan=5) / inner_tcp(),
    "ipip": ETH / outer4() / inner_tcp(),
    "sit6": ETH / IPv6(src=O6S, dst=O6D) / inner_udp6(),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TUNNEL_FRAMES))
def test_decap_off_is_the_outer_flow(name: str) -> None:
    """Without a DecapCounts (tunnels.decap off) a tunnel packet is its outer flow, as before."""
    key, octets, _, _ = key_of(TUNNEL_FRAMES[name], None)
    assert key.tunnel_type == key.tunnel_id == 0 and key.outer_src_addr == bytes(16)
    assert key.src_addr in (to_addr16(O4S), to_addr16(O6S))
    assert octets == len(bytes(TUNNEL_FRAMES[name])) - 14


def _inner_ip_end(frame: bytes) -> int:
    """Offset just past the inner IP header (the last byte decapsulation needs), found by its source address."""
    for src, hlen, at in ((to_addr16(I4S)[12:], 20, 12), (to_addr16(I6S), 40, 8)):
        i = frame.rfind(src)
        if i > 0 and frame.find(src) == i:
            return i - at + hlen
    raise AssertionError("no inner header")


@pytest.mark.parametrize("name", sorted(TUNNEL_FRAMES))
def test_cut_at_every_offset_keeps_outer_and_counts(name: str) -> None:
    """Every prefix of the frame that still holds the outer headers but not the whole inner IP header is
    the outer flow, counted decap_kept_outer; one that holds it is decapsulated. Never raises."""
    data = bytes(TUNNEL_FRAMES[name])
    end = _inner_ip_end(data)
    whole = key_of(TUNNEL_FRAMES[name], DecapCounts())[0]
    outer = key_of(TUNNEL_FRAMES[name], None)[0]
    l4 = 14 + (20 if data[14] >> 4 == 4 else 40)
    first_kept = l4 + 8 if outer.protocol == 17 else l4  # a cut UDP header is no tunnel (trunc_l4)
    kept = 0
    for cut in range(len(data) + 1):
        decap = DecapCounts()
        frame = parse_ethernet(data[:cut], decap)
        if frame is None or frame.ip is None:
            assert sum(decap.counts.values()) == 0
            continue
        key = frame_key(frame, 0, 3)[0]
        got = counts(decap)
        if cut >= end:
            assert key.tunnel_type == whole.tunnel_type and key.src_addr == whole.src_addr, cut
            assert (key.tunnel_id, key.inner_vlan_id) == (whole.tunnel_id, whole.inner_vlan_id)
            assert sum(got.values()) == 1 and "decap_kept_outer" not in got
        else:
            assert key.tunnel_type == 0 and (key.src_addr, key.dst_addr, key.protocol) == \
                (outer.src_addr, outer.dst_addr, outer.protocol), cut
            assert got == ({"decap_kept_outer": 1} if cut >= first_kept else {}), (cut, got)
            kept += bool(got)
    assert kept == end - first_kept > 0


def test_cut_udp_header_is_no_tunnel() -> None:
    """A UDP header cut short is the kernel's trunc_l4 anomaly: never decapsulated, not counted as kept."""
    pkt = bytes(outer4() / UDP(dport=4789) / VXLAN(vni=3) / INNER_ETH / inner_tcp())
    for cut in range(24, 28):
        decap = DecapCounts()
        ip = parse_ip(pkt[:cut], decap)
        assert ip is not None and ip.tunnel is None and counts(decap) == {}
    decap = DecapCounts()
    assert parse_ip(pkt[:28], decap) is not None and counts(decap) == {"decap_kept_outer": 1}


NOT_UNDERSTOOD = {
    "vxlan_without_i_flag": outer4() / UDP(dport=4789) / VXLAN(flags=0, vni=3) / INNER_ETH / inner_tcp(),
    "geneve_version_1": outer4() / UDP(dport=6081) / GENEVE(version=1, proto=0x6558) / INNER_ETH / inner_tcp(),
    "gre_routing": outer4() / GRE(routing_present=1) / inner_tcp(),
    "gre_version_1": outer4() / GRE(version=1) / inner_tcp(),
    "arp_in_vxlan": outer4() / UDP(dport=4789) / VXLAN(vni=3) / INNER_ETH / ARP(),
    "mpls_in_gre": outer4() / GRE(proto=0x8847) / MPLS(label=16) / inner_tcp(),
    "qinq_in_vxlan": outer4() / UDP(dport=4789) / VXLAN(vni=3) / INNER_ETH / Dot1AD(vlan=1) / Dot1Q(vlan=2) /
    inner_tcp(),
    "geneve_unknown_protocol": outer4() / UDP(dport=6081) / GENEVE(proto=0x88CC) / (b"\x00" * 60),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NOT_UNDERSTOOD))
def test_not_understood_keeps_outer(name: str) -> None:
    pkt = bytes(NOT_UNDERSTOOD[name])
    decap = DecapCounts()
    ip = parse_ip(pkt, decap)
    plain = parse_ip(pkt)
    assert ip is not None and ip == plain and ip.tunnel is None
    assert counts(decap) == {"decap_kept_outer": 1}


def test_fragments_and_bad_lengths_are_not_decapsulated() -> None:
    """Only a first fragment without anomaly is decapsulated (as in the kernel); others are not counted."""
    inner = inner_tcp()
    later = IP(src=O4S, dst=O4D, proto=4, frag=100) / inner
    first = IP(src=O4S, dst=O4D, proto=4, flags="MF") / inner
    short_total = bytearray(bytes(outer4() / inner))
    short_total[2:4] = (12).to_bytes(2, "big")  # IPv4 total length below its header: bad_length
    v6_later = IPv6(src=O6S, dst=O6D) / packets_fragment(100) / inner
    v6_first = IPv6(src=O6S, dst=O6D) / IPv6ExtHdrFragment(offset=0, m=1, nh=4) / inner
    for pkt, expect in ((later, {}), (first, {"decap_ipip": 1}), (short_total, {}), (v6_later, {}),
                        (v6_first, {"decap_ipip": 1})):
        decap = DecapCounts()
        ip = parse_ip(bytes(pkt), decap)
        assert ip is not None and counts(decap) == expect, pkt
        assert (ip.tunnel is not None) == bool(expect)


def packets_fragment(offset: int) -> Any:
    return IPv6ExtHdrFragment(offset=offset, nh=4)


def test_inner_length_never_beyond_the_outer_packet() -> None:
    """An inner length claim beyond what the outer packet carries counts what it carries (the kernel's
    bytes held); an inner header of the wrong version is metered keyed by the tunnel alone."""
    inner = bytearray(bytes(inner_tcp(10)))
    inner[2:4] = (60000).to_bytes(2, "big")
    pkt = bytes(outer4() / GRE(key_present=1, key=9, proto=0x0800)) + bytes(inner)
    pkt = pkt[:2] + len(pkt).to_bytes(2, "big") + pkt[4:]
    ip = parse_ip(pkt, DecapCounts())
    assert ip is not None and ip.tunnel is not None and ip.ip_octets == len(inner) == 50
    wrong = bytes(outer4() / GRE(proto=0x0800)) + bytes(inner_udp6())
    wrong = wrong[:2] + len(wrong).to_bytes(2, "big") + wrong[4:]
    ip = parse_ip(wrong, DecapCounts())
    assert ip is not None and ip.tunnel is not None and ip.tunnel.type == TUNNEL_GRE
    assert (ip.src_addr, ip.protocol, ip.ethertype, ip.ip_octets) == (bytes(16), 0, ETH_P_IP, 40 + 8 + 30)


def test_decapsulate_outcomes_direct() -> None:
    outer_only = bytes(outer4() / UDP(sport=1, dport=53) / b"x")
    ip = parse_ip(outer_only)
    assert ip is not None
    assert decapsulate(outer_only, ip, 20) == (TUNNEL_NONE, ip)
    kept = bytes(outer4() / GRE(version=1) / b"x")
    ip = parse_ip(kept)
    assert ip is not None and decapsulate(kept, ip, 20) == (KEPT_OUTER, ip)
    icmp = bytes(outer4() / ICMP())
    decap = DecapCounts()
    assert parse_ip(icmp, decap) == parse_ip(icmp) and counts(decap) == {}


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([1, 101, 228, 229, 113, 276, 0, 108]))
def test_arbitrary_bytes_never_raise(data: bytes, linktype: int) -> None:
    decap = DecapCounts()
    parse_ip(data, decap)
    parse_link(linktype, data, decap)
    assert sum(decap.counts.values()) <= 2


PREFIXES = [bytes(ETH / outer4() / UDP(dport=4789)), bytes(ETH / outer4() / UDP(dport=6081)),
            bytes(ETH / outer4(47)), bytes(ETH / IPv6(src=O6S, dst=O6D, nh=47)), bytes(ETH / outer4(4)),
            bytes(ETH / IPv6(src=O6S, dst=O6D, nh=41))]  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=400), st.integers(0, 0xFFFF))
def test_tunnel_headers_with_arbitrary_bytes_never_raise(prefix: bytes, tail: bytes, ip_len: int) -> None:
    """A real outer header of each tunnel kind, then arbitrary bytes (and an arbitrary outer IP length):
    never raises, at most one outcome counted, a decapsulated key always carries its tunnel."""
    frame = bytearray(prefix + tail)
    at = 16 if frame[14] >> 4 == 4 else 18  # IPv4 total length / IPv6 payload length
    frame[at:at + 2] = ip_len.to_bytes(2, "big")
    decap = DecapCounts()
    parsed = parse_link(LINKTYPE_ETHERNET, bytes(frame), decap)
    assert sum(decap.counts.values()) <= 1
    if parsed is None or parsed.ip is None or parsed.ip.tunnel is None:  # not decapsulated: as with decap off
        assert parsed == parse_link(LINKTYPE_ETHERNET, bytes(frame))
    if parsed is not None and parsed.ip is not None and parsed.ip.tunnel is not None:
        key, octets, _, _ = frame_key(parsed, 0, 1)
        assert key.tunnel_type in (TUNNEL_VXLAN, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_IPIP) and octets >= 0
        assert key.outer_src_addr in (to_addr16(O4S), to_addr16(O6S))


def test_outer_ip_options_and_ipv6_extension_headers() -> None:
    """The tunnel header is found after IPv4 options and IPv6 extension headers (the transport offset)."""
    opts = IP(src=O4S, dst=O4D, options=[IPOption_RR(routers=["192.0.2.9"] * 3)])
    ext = IPv6(src=O6S, dst=O6D) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    for outer, tunnel in ((opts / UDP(dport=4789) / VXLAN(vni=8) / INNER_ETH, TUNNEL_VXLAN),
                          (ext / GRE(key_present=1, key=8), TUNNEL_GRE)):
        decap = DecapCounts()
        key, octets, flags, tos = key_of(ETH / outer / inner_tcp(), decap)
        assert_inner_tcp(key, octets, flags, tos)
        assert (key.tunnel_type, key.tunnel_id) == (tunnel, 8)
        assert sum(decap.counts.values()) == 1


def test_inner_options_cut_keep_the_fixed_header() -> None:
    """An inner IPv4 header whose options are cut (a snaplen): decapsulated, keyed by its fixed header
    with no ports, as the kernel does (its transport header is cut)."""
    inner = IP(src=I4S, dst=I4D, tos=4, options=[IPOption_RR(routers=["10.9.9.9"] * 4)]) / UDP(sport=1, dport=2)
    pkt = bytes(outer4() / UDP(dport=4789) / VXLAN(vni=6) / INNER_ETH / inner)
    inner_at = 20 + 8 + 8 + 14
    for cut in range(inner_at + 20, inner_at + len(bytes(inner))):
        ip = parse_ip(pkt[:cut], DecapCounts())
        assert ip is not None and ip.tunnel is not None and ip.tunnel.id == 6
        assert (ip.src_addr, ip.dst_addr, ip.protocol, ip.tos) == (to_addr16(I4S), to_addr16(I4D), 17, 4)
        assert ip.ip_octets == len(bytes(inner))
        ihl = bytes(inner)[0] & 0x0F
        assert (ip.src_port, ip.dst_port) == ((1, 2) if cut >= inner_at + ihl * 4 + 4 else (0, 0)), cut
