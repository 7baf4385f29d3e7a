"""NFLOG source: exact per-flow packet and octet counts for UDP traffic the test sent, with and without
the Accounter."""

from __future__ import annotations

import socket
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ipfixer.clock import SystemClock
from ipfixer.lab import Namespaces, ns_socket
from ipfixer.model import Direction, RawPacket, to_addr16
from ipfixer.sources.nflog_netlink import NflogSource, install_nflog_rules, remove_nflog_rules
from ipfixer.sources.packets import parse_ip
from tests.labs import collect

SIZES = (10, 200, 1000, 1400)
IP_UDP = 20 + 8


@pytest.fixture
def netns() -> Iterator[str]:
    with Namespaces() as spaces:
        ns = spaces.add(tag="l")
        try:
            yield ns
        finally:
            remove_nflog_rules(ns)


def send_and_collect(ns: str, src: NflogSource, expect: int) -> list[RawPacket]:
    rx = ns_socket(ns, socket.SOCK_DGRAM, ("127.0.0.1", 46002))
    tx = ns_socket(ns, socket.SOCK_DGRAM, ("127.0.0.1", 46001))
    try:
        for size in SIZES:
            tx.sendto(b"y" * size, ("127.0.0.1", 46002))
        assert [len(rx.recv(4096)) for _ in SIZES] == list(SIZES)
    finally:
        tx.close()
        rx.close()
    return collect(src, expect)


def logged_packets(netns: str, group: int) -> tuple[list[RawPacket], NflogSource]:
    """The test's UDP datagrams as logged to `group` (the source is closed, its counters kept)."""
    install_nflog_rules(group, netns, match="udp dport 46002")
    src = NflogSource(group, netns)
    try:
        return send_and_collect(netns, src, expect=2 * len(SIZES)), src
    finally:
        src.close()


@pytest.mark.root
def test_nflog_counts_exact(netns: str) -> None:
    pkts, src = logged_packets(netns, 4000 + (len(netns) % 100))
    lo = to_addr16("127.0.0.1")
    assert {
        (p.key.src_addr, p.key.dst_addr, p.key.src_port, p.key.dst_port, p.key.protocol) for p in pkts
    } == {(lo, lo, 46001, 46002, 17)}
    per_dir = Counter()
    octets = Counter()
    for p in pkts:
        per_dir[p.key.direction] += p.packets
        octets[p.key.direction] += p.octets
        assert p.key.ifindex == 1  # lo
    assert per_dir == {Direction.INGRESS: len(SIZES), Direction.EGRESS: len(SIZES)}
    assert octets[Direction.EGRESS] == octets[Direction.INGRESS] == sum(SIZES) + IP_UDP * len(SIZES)
    assert src.unparsed == 0 and src.overruns == 0


@pytest.mark.root
def test_nflog_through_accounter(netns: str) -> None:
    from ipfixer.flows.accounter import Accounter

    pkts, _ = logged_packets(netns, 4100 + (len(netns) % 100))
    acc = Accounter(max_entries=1024, evict_timeout_ns=10**12, clock=SystemClock())
    assert acc.account_all(pkts) == []
    batch = acc.flush()
    assert len(batch) == 2
    assert sorted(batch["direction"].tolist()) == [0, 1]
    assert batch["packets"].tolist() == [len(SIZES)] * 2
    assert batch["octets"].tolist() == [sum(SIZES) + IP_UDP * len(SIZES)] * 2
    assert batch["src_port"].tolist() == [46001] * 2 and batch["ifindex"].tolist() == [1, 1]


def test_parse_ip_v6_and_icmp() -> None:
    v6 = bytes([0x60, 0x00, 0, 0, 0, 12, 17, 64]) + bytes(15) + b"\x01" + bytes(15) + b"\x02"
    v6 += (
        (5353).to_bytes(2, "big") + (53).to_bytes(2, "big") + (12).to_bytes(2, "big") + b"\x00\x00" + b"abcd"
    )
    h = parse_ip(v6)
    assert h is not None and (h.src_port, h.dst_port, h.protocol, h.ip_octets) == (5353, 53, 17, 52)
    icmp = (
        bytes([0x45, 0, 0, 28])
        + bytes(5)
        + b"\x01"
        + bytes(2)
        + bytes([10, 0, 0, 1, 10, 0, 0, 2])
        + b"\x03\x03"
    )
    h = parse_ip(icmp + bytes(6))
    assert h is not None and (h.src_port, h.dst_port, h.protocol, h.ip_octets) == (0, 0x0303, 1, 28)
