"""The TUNNEL_DECAP classifier on crafted frames (BPF_PROG_TEST_RUN on the real loaded program): inner
keys, tunnel identity and inner octets for each encapsulation; malformed or cut tunnel headers keep the
outer flow (cut ones counted trunc_l4), never a lost packet."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from ipfixer.sources.kernel.program import load_program, prog_test_run

pytestmark = pytest.mark.root
ETH = b"\x02" * 6 + b"\x04" * 6
LO = socket.if_nametoindex("lo")


@pytest.fixture
def decap() -> Iterator[Any]:
    prog = load_program(map_entries=1024, ring_pages=8, extra_cflags=("-DTUNNEL_DECAP=1",))
    try:
        # BPF_PROG_TEST_RUN gives the skb the loopback device: the interface that decapsulates here
        assert prog.set_decap_interfaces({LO}) == set()
        yield prog
    finally:
        prog.close()


def v4(proto: int, payload: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + payload


def v6(nh: int, payload: bytes, src: str = "fd00::1", dst: str = "fd00::2") -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, 64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 1024, 0, 0)


INNER4 = v4(17, udp(1111, 2222, b"i" * 50), "172.16.0.1", "172.16.0.2")  # 78 octets
INNER6 = v6(6, tcp(3333, 4444), "fd01::1", "fd01::2")  # 60 octets


def flows(prog: Any) -> dict[tuple[Any, ...], tuple[int, int]]:
    """(ethertype, protocol, src, dst, sport, dport, tunnel_type, tunnel_id, outer src, outer dst) ->
    (packets, octets) of every entry of the kernel map."""
    out = {}
    for k, v in prog.flows.items():
        key = (k.ethertype, k.protocol, bytes(k.src_addr), bytes(k.dst_addr), k.src_port, k.dst_port,
               k.tunnel_type, k.tunnel_id, bytes(k.outer_src_addr), bytes(k.outer_dst_addr))
        out[key] = (v.packets, v.octets)
    return out


def m4(a: str) -> bytes:
    return b"\x00" * 10 + b"\xff\xff" + ipaddress.IPv4Address(a).packed


def m6(a: str) -> bytes:
    return ipaddress.IPv6Address(a).packed


def run(prog: Any, frame: bytes) -> None:
    assert prog_test_run(prog.ingress_fd, frame)[0] == -1  # TC_ACT_UNSPEC: observe only


def test_inner_flows_of_each_encapsulation(decap: Any) -> None:
    vxlan = ETH + b"\x08\x00" + v4(17, udp(5000, 4789, struct.pack("!BBHI", 0x08, 0, 0, 42 << 8)
                                             + ETH + b"\x08\x00" + INNER4))
    geneve_opts = struct.pack("!HBB", 0x0101, 1, 2) + b"\x00" * 8  # one option of 8 data bytes: 12 bytes
    geneve = ETH + b"\x08\x00" + v4(17, udp(5001, 6081, struct.pack("!BBHI", 3, 0, 0x86DD, 0xABCD << 8)
                                              + geneve_opts + INNER6))
    gre = ETH + b"\x08\x00" + v4(47, struct.pack("!BBHHHII", 0xB0, 0, 0x6558, 0, 0, 7, 99)
                                 + ETH + b"\x86\xdd" + INNER6)
    ipip6 = ETH + b"\x86\xdd" + v6(4, INNER4, "fd00::a", "fd00::b")
    sit = ETH + b"\x08\x00" + v4(41, INNER6)
    for frame, n in ((vxlan, 2), (geneve, 3), (gre, 1), (ipip6, 4), (sit, 5)):
        for _ in range(n):
            run(decap, frame)
    i4 = (0x0800, 17, m4("172.16.0.1"), m4("172.16.0.2"), 1111, 2222)
    i6 = (0x86DD, 6, m6("fd01::1"), m6("fd01::2"), 3333, 4444)
    o4 = (m4("10.0.0.1"), m4("10.0.0.2"))
    assert flows(decap) == {
        (*i4, 1, 42, *o4): (2, 2 * 78),
        (*i6, 2, 0xABCD, *o4): (3, 3 * 60),
        (*i6, 3, 7, *o4): (1, 60),
        (*i4, 4, 0, m6("fd00::a"), m6("fd00::b")): (4, 4 * 78),
        (*i6, 4, 0, *o4): (5, 5 * 60),
    }
    c = decap.counter_values()
    assert c["trunc_l4"] == 0
    assert (c["decap_vxlan"], c["decap_geneve"], c["decap_gre"], c["decap_ipip"], c["decap_kept_outer"]) == (2, 3, 1, 9, 0)


def test_bad_tunnel_headers_keep_the_outer_flow(decap: Any) -> None:
    cut_vxlan = ETH + b"\x08\x00" + v4(17, udp(6000, 4789, b"\x08\x00\x00"))  # 3 of 8 VXLAN bytes
    no_vni = ETH + b"\x08\x00" + v4(17, udp(6001, 4789, struct.pack("!BBHI", 0, 0, 0, 42 << 8)
                                              + ETH + b"\x08\x00" + INNER4))  # I flag clear
    arp = ETH + b"\x08\x00" + v4(17, udp(6002, 4789, struct.pack("!BBHI", 0x08, 0, 0, 5 << 8)
                                           + ETH + b"\x08\x06" + b"\x00" * 28))  # not IP inside
    huge_opts = ETH + b"\x08\x00" + v4(17, udp(6003, 6081, struct.pack("!BBHI", 63, 0, 0x0800, 1 << 8)
                                                 + b"\x00" * 40))  # 252 option bytes claimed, 40 there
    routed_gre = ETH + b"\x08\x00" + v4(47, struct.pack("!BBH", 0x40, 0, 0x0800) + INNER4)  # RFC 1701 R bit
    cases = ((cut_vxlan, 6000, 4789), (no_vni, 6001, 4789), (arp, 6002, 4789), (huge_opts, 6003, 6081))
    for frame, _, _ in cases:
        run(decap, frame)
    run(decap, routed_gre)
    got = flows(decap)
    zero = b"\x00" * 16
    for frame, sport, dport in cases:
        key = (0x0800, 17, m4("10.0.0.1"), m4("10.0.0.2"), sport, dport, 0, 0, zero, zero)
        assert got[key] == (1, len(frame) - 14), key
    assert got[(0x0800, 47, m4("10.0.0.1"), m4("10.0.0.2"), 0, 0, 0, 0, zero, zero)] == (1, len(routed_gre) - 14)
    assert len(got) == 5
    c = decap.counter_values()
    assert c["trunc_l4"] == 2  # the cut VXLAN header, the Geneve options past the end
    assert c["decap_kept_outer"] == 5 and c["decap_vxlan"] + c["decap_geneve"] + c["decap_gre"] == 0


def test_inner_vlan_tag_of_the_inner_frame(decap: Any) -> None:
    """One 802.1Q or 802.1ad tag in the inner Ethernet frame: its VLAN id in the key, the IP packet after it
    metered; a tag cut short keeps the outer flow."""
    hdr = struct.pack("!BBHI", 0x08, 0, 0, 77 << 8)
    tagged = ETH + b"\x08\x00" + v4(17, udp(5100, 4789, hdr + ETH + b"\x81\x00" + struct.pack("!HH", 0x2000 | 123, 0x0800)
                                             + INNER4))
    qinq = ETH + b"\x08\x00" + v4(47, struct.pack("!BBH", 0, 0, 0x6558) + ETH + b"\x88\xa8"
                                   + struct.pack("!HH", 456, 0x86DD) + INNER6)
    cut = ETH + b"\x08\x00" + v4(17, udp(5101, 4789, hdr + ETH + b"\x81\x00\x00"))
    for frame in (tagged, tagged, qinq, cut):
        run(decap, frame)
    vlans = {(k.tunnel_type, k.tunnel_id, k.inner_vlan_id, k.protocol): (v.packets, v.octets)
             for k, v in decap.flows.items()}
    assert vlans == {(1, 77, 123, 17): (2, 2 * 78), (3, 0, 456, 6): (1, 60), (0, 0, 0, 17): (1, len(cut) - 14)}
    c = decap.counter_values()
    assert (c["decap_vxlan"], c["decap_gre"], c["decap_kept_outer"], c["trunc_l4"]) == (2, 1, 1, 1)


def test_interfaces_that_do_not_decapsulate_meter_the_outer_flow(decap: Any) -> None:
    """tunnels.interfaces: a tunnel packet on an interface missing from the classifier's decap_ifaces map
    is its outer flow, as in a build without decap (and not counted as kept outer)."""
    frame = ETH + b"\x08\x00" + v4(17, udp(5200, 4789, struct.pack("!BBHI", 0x08, 0, 0, 9 << 8) + ETH + b"\x08\x00"
                                             + INNER4))
    run(decap, frame)
    assert decap.set_decap_interfaces(set()) == set()
    run(decap, frame)
    run(decap, frame)
    got = flows(decap)
    zero = b"\x00" * 16
    assert got[(0x0800, 17, m4("10.0.0.1"), m4("10.0.0.2"), 5200, 4789, 0, 0, zero, zero)] == (2, 2 * (len(frame) - 14))
    assert got[(0x0800, 17, m4("172.16.0.1"), m4("172.16.0.2"), 1111, 2222, 1, 9, m4("10.0.0.1"), m4("10.0.0.2"))] == (1, 78)
    c = decap.counter_values()
    assert (c["decap_vxlan"], c["decap_kept_outer"]) == (1, 0)
