"""The userspace packet parser (pcap replay, NFLOG) on frames crafted with scapy."""

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether

from ipfixer.model import ETH_P_IP, ETH_P_IPV6, to_addr16
from ipfixer.sources.packets import frame_key, parse_ethernet, parse_ip


def test_ipv4_tcp_frame() -> None:
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.1", dst="10.1.0.2", tos=0x28) / \
        TCP(sport=1234, dport=80, flags="SA") / (b"x" * 100)
    frame = parse_ethernet(bytes(pkt))
    assert frame is not None and frame.ip is not None
    key, octets, flags, tos = frame_key(frame, 1, 7)
    assert (key.src_addr, key.dst_addr) == (to_addr16("10.1.0.1"), to_addr16("10.1.0.2"))
    assert (key.src_port, key.dst_port, key.protocol, key.direction, key.ifindex) == (1234, 80, 6, 1, 7)
    assert key.src_mac == bytes.fromhex("020000000001")
    assert octets == 20 + 20 + 100 and flags == 0x12 and tos == 0x28


def test_vlan_ipv6_icmp_and_ext_headers() -> None:
    pkt = Ether() / Dot1Q(vlan=42) / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / \
        ICMPv6EchoRequest()
    frame = parse_ethernet(bytes(pkt))
    assert frame is not None and frame.ip is not None
    key, octets, _, _ = frame_key(frame, 0, 1)
    assert key.vlan_id == 42 and key.ethertype == ETH_P_IPV6 and key.protocol == 58
    assert key.dst_port == 128 * 256 and octets == len(bytes(pkt)) - 18


def test_icmp_type_code_and_fragments() -> None:
    ip = parse_ip(bytes(IP(src="1.1.1.1", dst="2.2.2.2") / ICMP(type=3, code=3)))
    assert ip is not None and (ip.src_port, ip.dst_port) == (0, 3 * 256 + 3)
    frag = parse_ip(bytes(IP(src="1.1.1.1", dst="2.2.2.2", frag=10, proto=17) / (b"y" * 30)))
    assert frag is not None and (frag.src_port, frag.dst_port, frag.protocol) == (0, 0, 17)
    frag6 = parse_ip(bytes(IPv6() / IPv6ExtHdrFragment(offset=5, nh=17) / (b"z" * 16)))
    assert frag6 is not None and frag6.protocol == 17 and frag6.dst_port == 0


def test_malformed_never_raises() -> None:
    assert parse_ethernet(b"\x00" * 5) is None
    assert parse_ip(b"") is None and parse_ip(b"\x45\x00") is None and parse_ip(b"\x4f" + b"\x00" * 30) is None
    assert parse_ip(b"\x60" + b"\x00" * 10) is None
    arp = parse_ethernet(bytes(Ether(type=0x0806) / (b"\x00" * 28)))
    assert arp is not None and arp.ip is None and arp.ethertype == 0x0806
    for n in range(0, 80):
        parse_ethernet(bytes(Ether() / IPv6() / IPv6ExtHdrHopByHop() / UDP())[:n])
    plain = parse_ip(bytes(IP() / UDP()))
    assert plain is not None and plain.ethertype == ETH_P_IP


def test_parse_link_every_supported_link_type() -> None:
    """The same IP packet under each link-layer header replay reads gives the same key and octets."""
    from ipfixer.sources.packets import parse_link

    ip4 = bytes(IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=1000, dport=2000) / (b"y" * 30))
    ip6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1000, dport=2000) / (b"y" * 30))
    mac = bytes.fromhex("020000000009")
    sll = bytes.fromhex("0000 0001 0006") + mac + b"\x00\x00"  # to us, ARPHRD_ETHER, 6-byte address

    def sll2(proto: bytes) -> bytes:  # protocol, reserved, ifindex 3, ARPHRD_ETHER, to us, 6-byte address
        return proto + bytes.fromhex("0000 00000003 0001 00 06") + mac + b"\x00\x00"

    cases = [
        (1, bytes(Ether(src="02:00:00:00:00:09") / IP(ip4)), ip4, mac),
        (101, ip4, ip4, None), (101, ip6, ip6, None), (12, ip4, ip4, None), (228, ip4, ip4, None),
        (229, ip6, ip6, None),
        (113, sll + b"\x08\x00" + ip4, ip4, mac), (113, sll + b"\x86\xdd" + ip6, ip6, mac),
        (113, sll + b"\x81\x00\x00\x2a\x08\x00" + ip4, ip4, mac),  # a VLAN tag the kernel left in
        (276, sll2(b"\x08\x00") + ip4, ip4, mac), (276, sll2(b"\x86\xdd") + ip6, ip6, mac),
        (0, b"\x02\x00\x00\x00" + ip4, ip4, None), (0, b"\x00\x00\x00\x02" + ip4, ip4, None),
        (0, b"\x1e\x00\x00\x00" + ip6, ip6, None), (0, b"\x00\x00\x00\x18" + ip6, ip6, None),
        (108, b"\x00\x00\x00\x02" + ip4, ip4, None), (108, b"\x00\x00\x00\x1c" + ip6, ip6, None),
    ]
    for linktype, data, ip, src_mac in cases:
        frame = parse_link(linktype, data)
        assert frame is not None and frame.ip is not None, linktype
        assert frame.ip == parse_ip(ip), linktype
        assert frame.ip.ip_octets == len(ip) and frame.frame_len == len(data)
        assert frame.src_mac == (src_mac or b"\x00" * 6), linktype
    assert parse_link(113, sll + b"\x81\x00\x00\x2a\x08\x00" + ip4).vlan_id == 42  # type: ignore[union-attr]
    # PACKET_OUTGOING (4): the capturing host sent it; every other link type cannot tell
    assert not any(parse_link(t, d).outgoing for t, d, _, _ in cases)  # type: ignore[union-attr]
    sent_sll = parse_link(113, b"\x00\x04" + sll[2:] + b"\x08\x00" + ip4)
    sent_sll2 = parse_link(276, sll2(b"\x08\x00")[:10] + b"\x04" + sll2(b"\x08\x00")[11:] + ip4)
    assert sent_sll is not None and sent_sll.outgoing and sent_sll2 is not None and sent_sll2.outgoing


def test_parse_link_malformed_is_none() -> None:
    from ipfixer.sources.packets import parse_link

    ip4 = bytes(IP() / UDP())
    ip6 = bytes(IPv6() / UDP())
    for linktype, data in [(228, ip6), (229, ip4), (0, b"\x07\x00\x00\x00" + ip4), (108, b"\x02\x00"),
                           (113, b"\x00" * 15), (276, b"\x00" * 19), (101, b""), (147, ip4), (1, b"\x00" * 13)]:
        assert parse_link(linktype, data) is None, linktype
