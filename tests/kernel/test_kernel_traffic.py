"""Real traffic between two namespaces through a veth pair, metered on the veth in namespace A:
exact packets and octets per flow, direction, ports, protocol, ifindex, VLAN and timestamps."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ipfixer.clock import SystemClock
from ipfixer.flows.accounter import Accounter
from ipfixer.lab import Lab, netns_exec
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, Direction, to_addr16
from ipfixer.sources.kernel.attach import Attacher
from ipfixer.sources.kernel.drain import Drainer
from ipfixer.sources.kernel.program import load_program
from ipfixer.sources.kernel.spill import SpillConsumer
from tests.labs import metered as metered_on

pytestmark = pytest.mark.root
MS = 1_000_000


@pytest.fixture
def metered(program: Any, netpair: Lab) -> Iterator[tuple[Any, Lab, Drainer]]:
    with metered_on(program, netpair, "both") as m:
        yield m


def rows(batch: np.ndarray, **match: Any) -> np.ndarray:
    sel = np.ones(len(batch), dtype=bool)
    for k, v in match.items():
        if isinstance(v, bytes):
            sel &= np.all(batch[k] == np.frombuffer(v, dtype=np.uint8), axis=1)
        else:
            sel &= batch[k] == v
    return batch[sel]


def one(batch: np.ndarray, **match: Any) -> np.void:
    got = rows(batch, **match)
    assert len(got) == 1, (match, got)
    return got[0]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_both_directions_exact(metered: Any, v6: bool) -> None:
    prog, net, drainer = metered
    a, b = (net.v6_a, net.v6_b) if v6 else (net.v4_a, net.v4_b)
    iphdr = 40 if v6 else 20
    to_a, to_b = [10, 100, 1000, 1400, 1], [50, 60, 70]
    wall0 = time.time_ns() // MS
    net.send_udp(net.ns_b, a, 5001, 6001, to_a)
    net.send_udp(net.ns_a, b, 6001, 5001, to_b)
    wall1 = time.time_ns() // MS
    batch = drainer.flush()
    et = ETH_P_IPV6 if v6 else ETH_P_IP
    ing = one(batch, protocol=17, src_port=5001, dst_port=6001, ethertype=et)
    assert (int(ing["packets"]), int(ing["octets"])) == (len(to_a), sum(to_a) + len(to_a) * (iphdr + 8))
    assert ing["direction"] == Direction.INGRESS and ing["ifindex"] == net.ifindex_a
    assert (ing["ingress_if"], ing["egress_if"]) == (net.ifindex_a, 0)
    assert bytes(ing["src_addr"]) == to_addr16(b) and bytes(ing["dst_addr"]) == to_addr16(a)
    assert bytes(ing["src_mac"]).hex() == net.mac_b.replace(":", "")
    eg = one(batch, protocol=17, src_port=6001, dst_port=5001, ethertype=et)
    assert (int(eg["packets"]), int(eg["octets"])) == (len(to_b), sum(to_b) + len(to_b) * (iphdr + 8))
    assert eg["direction"] == Direction.EGRESS and (eg["ingress_if"], eg["egress_if"]) == (0, net.ifindex_a)
    for r in (ing, eg):
        assert wall0 - 2 <= r["start_ms"] <= r["end_ms"] <= wall1 + 2


def test_ping_count_and_icmp_type_code(metered: Any) -> None:
    prog, net, drainer = metered
    netns_exec(net.ns_b, "ping", "-c", "5", "-i", "0.01", "-s", "56", "-W", "2", net.v4_a)
    netns_exec(net.ns_b, "ping", "-6", "-c", "3", "-i", "0.01", "-s", "56", "-W", "2", net.v6_a)
    batch = drainer.flush()
    req = one(batch, protocol=1, direction=0, dst_port=8 * 256)
    rep = one(batch, protocol=1, direction=1, dst_port=0)
    assert (int(req["packets"]), int(req["octets"])) == (5, 5 * 84)
    assert (int(rep["packets"]), int(rep["octets"])) == (5, 5 * 84)
    req6 = one(batch, protocol=58, direction=0, dst_port=128 * 256)
    rep6 = one(batch, protocol=58, direction=1, dst_port=129 * 256)
    assert (int(req6["packets"]), int(req6["octets"])) == (3, 3 * 104)
    assert (int(rep6["packets"]), int(rep6["octets"])) == (3, 3 * 104)


SERVER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])));s.listen(1);print('ready',flush=True)\n"
    "c,_=s.accept();n=0\n"
    "while True:\n"
    "    d=c.recv(1<<20)\n"
    "    if not d: break\n"
    "    n+=len(d)\n"
    "c.close();print(n,flush=True)\n"
)
CLIENT = (
    "import socket,sys\n"
    "c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=20)\n"
    "c.sendall(b'y'*int(sys.argv[3]));c.shutdown(socket.SHUT_WR);c.recv(1);c.close()\n"
)


def tcp_transfer(net: Lab, nbytes: int, port: int) -> None:
    srv = subprocess.Popen(["ip", "netns", "exec", net.ns_a, sys.executable, "-c", SERVER, net.v4_a, str(port)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        netns_exec(net.ns_b, sys.executable, "-c", CLIENT, net.v4_a, str(port), str(nbytes))
        assert int(srv.stdout.readline()) == nbytes
        srv.wait(timeout=10)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(timeout=10)


def set_offloads(net: Lab, on: bool) -> None:
    state = "on" if on else "off"
    for ns, dev in ((net.ns_a, net.veth_a), (net.ns_b, net.veth_b)):
        netns_exec(ns, "ethtool", "-K", dev, "tso", state, "gso", state, "gro", state, check=False)


def test_tcp_without_offloads_matches_tcpdump_exactly(metered: Any, tmp_path: Any) -> None:
    from scapy.all import IP, rdpcap

    prog, net, drainer = metered
    set_offloads(net, False)
    pcap = tmp_path / "tcp.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", net.ns_a, "tcpdump", "-i", net.veth_a, "-U", "--immediate-mode",
                             "-n", "-w",
                             str(pcap), "tcp port 7001"], stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None and "listening" in dump.stderr.readline()
        tcp_transfer(net, 300_000, 7001)
        sizes = [-1]
        for _ in range(50):  # bounded: until tcpdump has written everything it received
            time.sleep(0.1)
            sizes.append(pcap.stat().st_size if pcap.exists() else 0)
            if sizes[-1] == sizes[-2] == sizes[-3] and sizes[-1] > 0:
                break
    finally:
        dump.send_signal(signal.SIGTERM)
        dump.wait(timeout=10)
    pkts = [p for p in rdpcap(str(pcap)) if IP in p]
    batch = drainer.flush()
    for direction, dport in ((0, 7001), (1, None)):
        sel = [p for p in pkts if (p[IP].dst == net.v4_a) == (direction == 0)]
        r = one(batch, protocol=6, direction=direction, **({"dst_port": 7001} if dport else {"src_port": 7001}))
        assert int(r["packets"]) == len(sel)
        assert int(r["octets"]) == sum(p[IP].len for p in sel)
    up = one(batch, protocol=6, direction=0, dst_port=7001)
    assert int(up["tcp_flags"]) & 0x13 == 0x13  # SYN, ACK, FIN seen


def test_tcp_with_offloads_counts_wire_segments(metered: Any) -> None:
    prog, net, drainer = metered
    set_offloads(net, True)
    nbytes = 2_000_000
    tcp_transfer(net, nbytes, 7002)
    batch = drainer.flush()
    up = one(batch, protocol=6, direction=0, dst_port=7002)
    packets, octets = int(up["packets"]), int(up["octets"])
    # GSO super-packets are counted as the segments the wire carries (MSS 1448 on a 1500 MTU).
    assert packets >= math.ceil(nbytes / 1448)
    assert 40 * packets <= octets - nbytes <= 60 * packets


SENDP = (
    "import sys\n"
    "from scapy.all import Ether, Dot1Q, Dot1AD, IP, UDP, Raw, sendp\n"
    "src, dst, vids, sport, dport = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])\n"
    "tags = [int(v) for v in vids.split('.')]\n"
    "frames = []\n"
    "for n in sys.argv[7].split(','):\n"
    "    f = Ether(src=src, dst=dst)\n"
    "    f = f / (Dot1AD(vlan=tags[0]) / Dot1Q(vlan=tags[1]) if len(tags) == 2 else Dot1Q(vlan=tags[0]))\n"
    "    frames.append(f / IP(src='192.168.123.9', dst='192.168.123.8') / UDP(sport=sport, dport=dport) / Raw(b'v' * int(n)))\n"
    "sendp(frames, iface=sys.argv[1], verbose=0)\n"
)


def test_vlan_tagged_frames(metered: Any) -> None:
    # This kernel has no 8021q module, so tagged frames are injected with packet sockets: through
    # veth_b they reach veth_a's ingress (the receive path moves the tag to skb metadata), and sent
    # on veth_a they pass its tc egress with the tag in the frame.
    prog, net, drainer = metered
    netns_exec(net.ns_b, sys.executable, "-c", SENDP, net.veth_b, net.mac_b, net.mac_a, "123", "5101", "6101", "20,30,40")
    netns_exec(net.ns_b, sys.executable, "-c", SENDP, net.veth_b, net.mac_b, net.mac_a, "300.7", "5102", "6102", "10")
    netns_exec(net.ns_a, sys.executable, "-c", SENDP, net.veth_a, net.mac_a, net.mac_b, "124", "6101", "5101", "200")
    batch = drainer.flush()
    ing = one(batch, src_port=5101, dst_port=6101)
    assert (ing["vlan_id"], ing["ethertype"], ing["direction"]) == (123, ETH_P_IP, 0)
    assert (int(ing["packets"]), int(ing["octets"])) == (3, 90 + 3 * 28)
    qinq = one(batch, src_port=5102, dst_port=6102)
    assert (qinq["vlan_id"], qinq["ethertype"], int(qinq["packets"]), int(qinq["octets"])) == (300, ETH_P_IP, 1, 38)
    eg = one(batch, src_port=6101, dst_port=5101)
    assert (eg["vlan_id"], eg["ethertype"], eg["direction"]) == (124, ETH_P_IP, 1)
    assert (int(eg["packets"]), int(eg["octets"])) == (1, 228)


MANY = (
    "import socket,sys\n"
    "base,n,per=int(sys.argv[2]),int(sys.argv[3]),int(sys.argv[4])\n"
    "for p in range(base,base+n):\n"
    "    s=socket.socket();s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('',p))\n"
    "    for _ in range(per): s.sendto(b'm'*10,(sys.argv[1],9999))\n"
    "    s.close()\n"
)


@pytest.mark.parametrize("mmap_reader", [True, False], ids=["mmap-reader", "bcc-callback"])
def test_tiny_map_spills_without_losing_packets(netpair: Lab, mmap_reader: bool) -> None:
    """Both ring consumers (the mmap reader, and bcc's callback used where loads may be reordered)."""
    net = netpair
    prog = load_program(map_entries=8, ring_pages=64)
    att = Attacher(prog.ingress_fd, prog.egress_fd, "ingress", netns=net.ns_a)
    try:
        att.attach(net.veth_a)
        clock = SystemClock()
        drainer = Drainer(prog.flows, clock, 3600_000 * MS, 3600_000 * MS)
        acc = Accounter(max_entries=64, evict_timeout_ns=3600_000 * MS, clock=clock)
        consumer = SpillConsumer(prog.bpf, prog.spill, prog.spill_dtype, acc, max_records=100,
                                 mmap_reader=mmap_reader)
        drainer.flush()
        consumer.flush()
        netns_exec(net.ns_b, sys.executable, "-c", MANY, net.v4_a, "20000", "200", "3")
        batches = [drainer.flush()]
        seen = [-1]
        for _ in range(50):  # bounded: at most 100 records per poll, stop when nothing new twice
            batches.extend(consumer.poll(10))
            seen.append(consumer.records)
            if len(seen) > 3 and seen[-1] == seen[-2] == seen[-3]:
                break
        batches.extend(consumer.flush())
        allb = np.concatenate(batches)
        mine = allb[(allb["dst_port"] == 9999) & (allb["protocol"] == 17)]
        assert int(mine["packets"].sum()) == 600
        assert int(mine["octets"].sum()) == 600 * 38
        assert set(mine["src_port"].tolist()) == set(range(20000, 20200))
        c = prog.counter_values()
        assert c["spilled"] > 0 and c["map_full"] > 0 and c["ringbuf_fail"] == 0
        assert consumer.packets == c["spilled"]
        assert acc.evictions >= 2  # max_entries 64 < 192 spilled flows
        consumer.close()
    finally:
        att.detach_all()
        att.close()
        prog.close()

