"""Crafted frames through a real veth (scapy sendp in a test namespace): a spoofed IP length never
makes octets exceed the bytes that crossed the wire, and each such frame is counted as bad_length."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ipfixer.lab import Lab, netns_exec
from ipfixer.sources.kernel.drain import Drainer
from tests.labs import metered as metered_on

pytestmark = pytest.mark.root
MS = 1_000_000

# argv: iface src_mac dst_mac src4 dst4 src6 dst6 sport; prints the L3 bytes of every frame it sent.
SEND_SPOOFED = (
    "import struct, sys\n"
    "from scapy.all import Ether, IP, IPv6, UDP, Raw, sendp\n"
    "iface, smac, dmac, s4, d4, s6, d6, sport = sys.argv[1:9]\n"
    "sport = int(sport)\n"
    "def patched(f, off, value):\n"
    "    raw = bytearray(bytes(f)); struct.pack_into('!H', raw, off, value); return bytes(raw)\n"
    "e = Ether(src=smac, dst=dmac)\n"
    "v4 = e / IP(src=s4, dst=d4) / UDP(sport=sport, dport=9) / Raw(b's' * 10)\n"
    "v6 = e / IPv6(src=s6, dst=d6) / UDP(sport=sport + 1, dport=9) / Raw(b's' * 10)\n"
    "short = e / IP(src=s4, dst=d4) / UDP(sport=sport + 2, dport=9) / Raw(b's' * 4)\n"
    "frames = [patched(v4, 16, 1500)] * 5 + [patched(v6, 18, 5000)] * 5 + [patched(short, 16, 10)] * 3\n"
    "sendp([Ether(f) for f in frames], iface=iface, verbose=0)\n"
    "print(','.join(str(len(f) - 14) for f in frames))\n"
)


@pytest.fixture
def metered(program: Any, netpair: Lab) -> Iterator[tuple[Any, Lab, Drainer]]:
    with metered_on(program, netpair, "ingress") as m:
        yield m


def test_spoofed_lengths_through_veth(metered: Any) -> None:
    prog, net, drainer = metered
    before = prog.counter_values()
    out = netns_exec(net.ns_b, sys.executable, "-c", SEND_SPOOFED, net.veth_b, net.mac_b, net.mac_a,
                net.v4_b, net.v4_a, net.v6_b, net.v6_a, "41000").stdout
    sent = [int(n) for n in out.strip().split(",")]
    assert sent == [38] * 5 + [58] * 5 + [32] * 3
    batch = drainer.flush()
    mine = batch[(batch["dst_port"] == 9) & (batch["protocol"] == 17)]
    by_port = {int(r["src_port"]): (int(r["packets"]), int(r["octets"])) for r in mine}
    # v4 and v6 keep their ports (the sender is identified); below-header v4 has no trusted transport.
    assert by_port == {41000: (5, 5 * 38), 41001: (5, 5 * 58)}
    short = batch[(batch["protocol"] == 17) & (batch["src_port"] == 0) & (batch["ethertype"] == 0x0800)]
    assert (int(short["packets"].sum()), int(short["octets"].sum())) == (3, 3 * 32)
    assert int(mine["octets"].sum()) + int(short["octets"].sum()) == sum(sent)  # never above what was sent
    after = prog.counter_values()
    assert after["bad_length"] - before["bad_length"] == 13
    assert np.all(batch["octets"] <= 1500)
