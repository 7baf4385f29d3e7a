"""The classifier on crafted frames through BPF_PROG_TEST_RUN: frame in, exact map contents out."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from scapy.all import ARP, ICMP, IP, SCTP, TCP, UDP, Dot1AD, Dot1Q, Ether, ICMPv6EchoRequest, IPv6, Raw
from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

from ipfixer.model import to_addr16
from ipfixer.sources.kernel.program import map_batch, prog_test_run

pytestmark = pytest.mark.root

MAC_S, MAC_D = "02:00:00:00:00:01", "02:00:00:00:00:02"
TC_ACT_UNSPEC = -1
SKB_CTX_SIZE = 192  # struct __sk_buff
GSO_SEGS_OFF, GSO_SIZE_OFF = 164, 176


def eth() -> Any:
    return Ether(src=MAC_S, dst=MAC_D)


def entries(prog: Any) -> list[tuple[dict[str, Any], dict[str, int]]]:
    keys, leaves = map_batch(prog.flows.map_fd, prog.key_dtype, prog.leaf_dtype, prog.map_entries, delete=False)
    out = []
    for k, v in zip(keys, leaves, strict=True):
        key = {n: (bytes(k[n]) if k[n].shape else int(k[n])) for n in prog.key_dtype.names}
        out.append((key, {n: int(v[n]) for n in ("packets", "octets", "tcp_flags", "tos")}))
    return out


def only(prog: Any) -> tuple[dict[str, Any], dict[str, int]]:
    got = entries(prog)
    assert len(got) == 1, got
    return got[0]


def run_frame(prog: Any, frame: Any, egress: bool = False, ctx: bytes | None = None) -> None:
    ret, _ = prog_test_run(prog.egress_fd if egress else prog.ingress_fd, bytes(frame), ctx)
    assert ret == TC_ACT_UNSPEC  # observe only: let the next filter decide


def test_ipv4_udp_exact(program: Any) -> None:
    frame = eth() / IP(src="10.1.2.3", dst="10.9.8.7", tos=0xB8) / UDP(sport=4321, dport=53) / Raw(b"q" * 100)
    for _ in range(3):
        run_frame(program, frame)
    key, m = only(program)
    assert key["ethertype"] == 0x0800 and key["direction"] == 0 and key["protocol"] == 17
    assert (key["src_port"], key["dst_port"], key["vlan_id"]) == (4321, 53, 0)
    assert key["src_mac"] == bytes.fromhex("020000000001") and key["dst_mac"] == bytes.fromhex("020000000002")
    assert key["src_addr"] == to_addr16("10.1.2.3") and key["dst_addr"] == to_addr16("10.9.8.7")
    assert key["pad0"] == b"\0\0" and key["ifindex"] == 1  # test runs happen on lo
    assert m == {"packets": 3, "octets": 3 * 128, "tcp_flags": 0, "tos": 0xB8}
    assert program.counter_values()["packets"] == 3


def test_egress_direction_and_ipv6_tcp_flags(program: Any) -> None:
    base = eth() / IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0x28)
    run_frame(program, base / TCP(sport=40000, dport=443, flags="S"), egress=True)
    run_frame(program, base / TCP(sport=40000, dport=443, flags="PA") / Raw(b"z" * 10), egress=True)
    key, m = only(program)
    assert key["ethertype"] == 0x86DD and key["direction"] == 1 and key["protocol"] == 6
    assert key["src_addr"] == to_addr16("2001:db8::1") and (key["src_port"], key["dst_port"]) == (40000, 443)
    assert m == {"packets": 2, "octets": 60 + 70, "tcp_flags": 0x02 | 0x18, "tos": 0x28}


def test_ipv6_extension_headers_are_skipped(program: Any) -> None:
    frame = (eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop()
             / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=2) / Raw(b"a" * 4))
    run_frame(program, frame)
    key, m = only(program)
    assert (key["protocol"], key["src_port"], key["dst_port"]) == (17, 1, 2)
    assert m["octets"] == len(bytes(frame)) - 14


def test_ipv6_non_first_fragment_has_no_ports(program: Any) -> None:
    frame = (eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=10, nh=17)
             / Raw(b"b" * 16))
    run_frame(program, frame)
    key, m = only(program)
    assert (key["protocol"], key["src_port"], key["dst_port"]) == (17, 0, 0)
    assert program.counter_values()["fragment"] == 1


def test_ipv4_fragments_ports_only_on_first(program: Any) -> None:
    first = eth() / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", frag=0, proto=17) / UDP(sport=7, dport=9)
    later = eth() / IP(src="10.0.0.1", dst="10.0.0.2", frag=100, proto=17) / Raw(b"c" * 30)
    run_frame(program, first)
    run_frame(program, later)
    got = sorted((k["src_port"], k["dst_port"], m["packets"], m["octets"]) for k, m in entries(program))
    assert got == [(0, 0, 1, 50), (7, 9, 1, 28)]
    assert program.counter_values()["fragment"] == 1


@pytest.mark.parametrize(
    ("frame", "dst_port", "proto"),
    [
        (IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, code=0), 8 * 256, 1),
        (IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=3, code=3), 3 * 256 + 3, 1),
        (IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(), 128 * 256, 58),
    ],
)
def test_icmp_type_code_in_dst_port(program: Any, frame: Any, dst_port: int, proto: int) -> None:
    run_frame(program, eth() / frame)
    key, _ = only(program)
    assert (key["src_port"], key["dst_port"], key["protocol"]) == (0, dst_port, proto)


def test_sctp_ports(program: Any) -> None:
    run_frame(program, eth() / IP(src="10.0.0.1", dst="10.0.0.2") / SCTP(sport=3868, dport=2905))
    key, m = only(program)
    assert (key["protocol"], key["src_port"], key["dst_port"]) == (132, 3868, 2905)
    assert m["octets"] == 20 + 12


def test_vlan_and_qinq_record_outer_id(program: Any) -> None:
    inner = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=6)
    run_frame(program, eth() / Dot1Q(vlan=42) / inner)
    run_frame(program, eth() / Dot1AD(vlan=300) / Dot1Q(vlan=7) / inner)
    got = sorted((k["vlan_id"], k["ethertype"], k["src_port"], m["octets"]) for k, m in entries(program))
    assert got == [(42, 0x0800, 5, 28), (300, 0x0800, 5, 28)]




def test_truncated_and_malformed_are_counted_never_lost(program: Any) -> None:
    udp = eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"d" * 20)
    run_frame(program, bytes(udp)[:14 + 20 + 4])  # UDP header cut
    run_frame(program, bytes(eth() / Dot1Q(vlan=9) / IP(src="10.0.0.1", dst="10.0.0.2"))[:14 + 4 + 12])
    run_frame(program, bytes(eth() / Dot1Q(vlan=9))[:14 + 2])  # VLAN tag cut
    bad = bytearray(bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP()))
    bad[14] = 0x43  # version 4, IHL 3
    run_frame(program, bytes(bad))
    c = program.counter_values()
    assert (c["trunc_l4"], c["trunc_l3"], c["trunc_l2"], c["malformed"]) == (1, 1, 1, 1)
    assert c["packets"] == 4
    assert sum(m["packets"] for _, m in entries(program)) == 4
    by_kind = {(k["ethertype"], k["vlan_id"], k["protocol"]): m["octets"] for k, m in entries(program)}
    assert by_kind[(0x0800, 0, 17)] == 24  # the cut UDP packet's bytes, not its tot_len of 48
    assert by_kind[(0x0800, 9, 0)] == 12  # what is left of the cut IP header
    assert by_kind[(0x8100, 0, 0)] == 2  # the tag itself was cut: no VLAN id, 2 bytes left


def with_len(frame: Any, offset: int, value: int) -> bytes:
    """The frame with a 16-bit big-endian length field at `offset` replaced (checksums left as sent:
    the classifier never checks them)."""
    raw = bytearray(bytes(frame))
    struct.pack_into("!H", raw, offset, value)
    return bytes(raw)


def test_spoofed_ip_length_counts_wire_octets_and_bad_length(program: Any) -> None:
    """A length field larger than the packet never inflates octets: the flow gets the bytes the frame
    carried (ports kept, so the sender is still identified) and bad_length counts each frame."""
    v4 = eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1111, dport=2222) / Raw(b"s" * 10)
    v6 = eth() / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=3333, dport=4444) / Raw(b"s" * 10)
    assert len(bytes(v4)) == 52 and len(bytes(v6)) == 72
    for _ in range(5):
        run_frame(program, with_len(v4, 14 + 2, 1500))  # IPv4 total length 1500 in a 52-byte frame
        run_frame(program, with_len(v6, 14 + 4, 5000))  # IPv6 payload length 5000
    got = {(k["src_port"], k["dst_port"]): (m["packets"], m["octets"]) for k, m in entries(program)}
    assert got == {(1111, 2222): (5, 5 * 38), (3333, 4444): (5, 5 * 58)}
    c = program.counter_values()
    assert c["bad_length"] == 10 and c["packets"] == 10
    assert c["malformed"] == c["trunc_l4"] == 0


@pytest.mark.parametrize("tot_len", [0, 10, 19])
def test_ipv4_total_length_below_header_is_bad_length(program: Any, tot_len: int) -> None:
    """Total length below the 20-byte header (0 outside a GSO super-packet too) is malformed, not a
    normal UDP flow; the octets are the bytes the frame carried."""
    frame = eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=6) / Raw(b"x" * 4)
    run_frame(program, with_len(frame, 14 + 2, tot_len))
    key, m = only(program)
    assert (key["protocol"], key["src_port"], key["dst_port"]) == (17, 0, 0)  # transport not trusted
    assert (m["packets"], m["octets"]) == (1, 32)
    assert program.counter_values()["bad_length"] == 1


def test_honest_lengths_and_padding_are_not_bad_length(program: Any) -> None:
    """Ethernet padding (frame longer than the IP length) is normal, counted at the IP length, and an
    IPv4 total length of 0 in a GSO super-packet (BIG TCP) is measured from the skb."""
    run_frame(program, bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=7, dport=8)) + bytes(18))
    payload = 3 * 1000
    big = eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="A") / Raw(b"e" * payload)
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, GSO_SEGS_OFF, 3)
    struct.pack_into("<I", ctx, GSO_SIZE_OFF, 1000)
    run_frame(program, with_len(big, 14 + 2, 0), ctx=bytes(ctx))
    got = {k["protocol"]: (m["packets"], m["octets"]) for k, m in entries(program)}
    assert got == {17: (1, 28), 6: (3, payload + 3 * 40)}
    assert program.counter_values()["bad_length"] == 0


def test_non_ip_keyed_by_ethertype(program: Any) -> None:
    run_frame(program, eth() / ARP(psrc="10.0.0.1", pdst="10.0.0.2"))
    run_frame(program, Ether(src=MAC_S, dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\0" * 30))
    got = sorted((k["ethertype"], k["src_addr"], m["octets"]) for k, m in entries(program))
    assert got == [(0x0806, b"\0" * 16, 28), (0x88CC, b"\0" * 16, 30)]
    assert program.counter_values()["non_ip"] == 2


def test_gso_super_packet_counts_wire_packets(program: Any) -> None:
    payload = 3 * 1000
    frame = eth() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="A") / Raw(b"e" * payload)
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, GSO_SEGS_OFF, 3)
    struct.pack_into("<I", ctx, GSO_SIZE_OFF, 1000)
    run_frame(program, frame, ctx=bytes(ctx))
    _, m = only(program)
    assert m["packets"] == 3
    assert m["octets"] == payload + 3 * 40  # every segment carries its own IP+TCP header


def test_full_map_spills_to_ring_buffer() -> None:
    from ipfixer.clock import SystemClock
    from ipfixer.flows.accounter import Accounter
    from ipfixer.sources.kernel.program import load_program
    from ipfixer.sources.kernel.spill import SpillConsumer

    prog = load_program(map_entries=8, ring_pages=8)
    try:
        acc = Accounter(max_entries=1000, evict_timeout_ns=10**12, clock=SystemClock())
        consumer = SpillConsumer(prog.bpf, prog.spill, prog.spill_dtype, acc)
        for port in range(20):
            for _ in range(2):
                run_frame(prog, eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=port + 1, dport=9))
        assert len(entries(prog)) == 8
        c = prog.counter_values()
        assert c["map_full"] == 24 and c["spilled"] == 24 and c["ringbuf_fail"] == 0
        assert consumer.poll(100) == []
        batch = acc.flush()
        assert len(batch) == 12 and int(batch["packets"].sum()) == 24
        assert set(batch["src_port"].tolist()) | {k["src_port"] for k, _ in entries(prog)} == set(range(1, 21))
        assert np.all(batch["octets"] == 2 * 28)
    finally:
        prog.close()


def test_sampling_one_in_n_counts_every_skipped_packet() -> None:
    """SAMPLING_INTERVAL=4: metered + not_sampled == every frame, exactly; about a quarter metered."""
    from ipfixer.sources.ebpf import sampling_cflags
    from ipfixer.sources.kernel.program import load_program

    prog = load_program(map_entries=64, ring_pages=8, extra_cflags=sampling_cflags(4))
    try:
        frame = eth() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2)
        ret, _ = prog_test_run(prog.ingress_fd, bytes(frame), repeat=4000)
        assert ret == TC_ACT_UNSPEC
        metered = sum(m["packets"] for _, m in entries(prog))
        c = prog.counter_values()
        assert c["packets"] == 4000 and metered + c["not_sampled"] == 4000
        # Binomial(4000, 1/4): mean 1000, sd 27; 8 sd either side fails with probability < 1e-14.
        assert 1000 - 8 * 27 < metered < 1000 + 8 * 27
    finally:
        prog.close()


def _mixed_frames() -> list[tuple[bytes, bytes | None]]:
    """Frames covering every parser branch, as (frame, ctx): complete, truncated at each layer, malformed."""
    v4 = IP(src="10.0.0.1", dst="10.0.0.2", tos=0x10)
    v6 = IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0x20)
    full = [
        eth() / v4 / UDP(sport=1, dport=2) / Raw(b"u" * 30),
        eth() / v4 / TCP(sport=3, dport=4, flags="SA") / Raw(b"t" * 5),
        eth() / v4 / SCTP(sport=5, dport=6),
        eth() / v4 / ICMP(type=3, code=1),
        eth() / IP(src="10.0.0.1", dst="10.0.0.2", frag=50, proto=17) / Raw(b"f" * 12),
        eth() / Dot1Q(vlan=11) / v4 / UDP(sport=7, dport=8),
        eth() / Dot1AD(vlan=12) / Dot1Q(vlan=13) / v6 / UDP(sport=9, dport=10),
        eth() / v6 / TCP(sport=11, dport=12, flags="F"),
        eth() / v6 / ICMPv6EchoRequest(),
        eth() / v6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=13, dport=14),
        eth() / v6 / IPv6ExtHdrFragment(offset=3, nh=17) / Raw(b"g" * 8),
        eth() / v6 / IPv6ExtHdrFragment(offset=0, nh=17) / UDP(sport=15, dport=16),
        eth() / ARP(psrc="10.0.0.1", pdst="10.0.0.2"),
    ]
    frames: list[tuple[bytes, bytes | None]] = [(bytes(f), None) for f in full]
    for f in full[:12]:  # every truncation point of every frame
        raw = bytes(f)
        frames += [(raw[:n], None) for n in range(15, min(len(raw), 80), 3)]  # test runs need > 14 bytes
    bad = bytearray(bytes(eth() / v4 / UDP()))
    bad[14] = 0x46  # IHL 6 but header bytes present: options read as such
    frames.append((bytes(bad), None))
    bad[14] = 0x43  # IHL 3
    frames.append((bytes(bad), None))
    for f in full[:4]:  # IPv4 lengths: too large, below the header
        frames += [(with_len(f, 16, n), None) for n in (0, 12, 4000)]
    for f in full[6:10]:
        off = 26 if Dot1AD in f else 18  # IPv6 payload length, after 0 or 2 VLAN tags
        frames += [(with_len(f, off, 3000), None)]
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, GSO_SEGS_OFF, 4)
    struct.pack_into("<I", ctx, GSO_SIZE_OFF, 100)
    frames.append((bytes(eth() / v6 / TCP(sport=17, dport=18, flags="A") / Raw(b"h" * 400)), bytes(ctx)))
    return frames


@pytest.mark.parametrize("max_off", [0, 14, 30, 54])
def test_direct_access_matches_load_bytes_fallback(program: Any, max_off: int) -> None:
    """Headers read in place from the linear area must give exactly what bpf_skb_load_bytes gives.
    PKT_DIRECT_MAX_OFF=N sends every header past offset N through the bpf_skb_load_bytes pass (as a
    non-linear skb would), after a partial direct pass: same map contents, same counters."""
    from ipfixer.errors import KernelError
    from ipfixer.sources.kernel.program import load_program

    other = load_program(map_entries=4096, extra_cflags=(f"-DPKT_DIRECT_MAX_OFF={max_off}",))
    try:
        ran = 0
        for frame, ctx in _mixed_frames():
            for egress in (False, True):
                try:  # the test run refuses some short frames (e.g. IPv4 ethertype, < 20 bytes of IP)
                    run_frame(program, frame, egress=egress, ctx=ctx)
                except KernelError:
                    with pytest.raises(KernelError):
                        run_frame(other, frame, egress=egress, ctx=ctx)
                    continue
                run_frame(other, frame, egress=egress, ctx=ctx)
                ran += 1
        assert ran > 200
        direct = sorted((sorted(k.items()), sorted(m.items())) for k, m in entries(program))
        fallback = sorted((sorted(k.items()), sorted(m.items())) for k, m in entries(other))
        assert len(direct) > 40
        assert direct == fallback
        assert program.counter_values() == other.counter_values()
        c = program.counter_values()
        assert min(c["trunc_l2"], c["trunc_l3"], c["trunc_l4"], c["malformed"], c["fragment"], c["non_ip"],
                   c["bad_length"]) > 0
        # every frame that ran was seen once and accounted, anomalies included (they are flows too): the
        # map holds exactly the observed packets (GSO expanded), the same both ways, and nothing was lost
        assert c["packets"] == ran
        observed = c["observed_packets_ingress"] + c["observed_packets_egress"]
        assert c["observed_packets_ingress"] == c["observed_packets_egress"] >= ran // 2
        assert sum(m["packets"] for _, m in entries(program)) == observed
        assert c["map_full"] == c["insert_other"] == c["spilled"] == c["ringbuf_fail"] == 0
    finally:
        other.close()
