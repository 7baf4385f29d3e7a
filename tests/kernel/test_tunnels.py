"""Issue 16 item 2 through the real daemon: tunnelled traffic on a router's underlay interfaces.

tests.labs.Router forwards between two host namespaces, so packets between them cross the router's metered
r1 (ingress) and r2 (egress). VXLAN is a real tunnel device (`ip link add ... type vxlan id 42`) between
the hosts; this kernel has no GRE, IPIP or Geneve devices (CONFIG_NET_IPGRE etc. off), so those packets
are built here byte for byte and sent by h1's own stack: GRE with checksum, key 7 and sequence through a
raw IPPROTO_GRE socket, IPIP through a raw IPPROTO_IPIP socket, Geneve (VNI 0xabcd, one 8-byte option)
through a UDP socket to port 6081; the kernel adds the outer IPv4 header. With
`tunnels.decap: true` every record is the inner flow: counts exact against the datagrams sent (inner
IP-layer octets), the VNI in layer2SegmentId (0x01 << 56 | VNI) / the GRE key in greKey at tshark, the
outer addresses in ipfixer's tunnel*Address elements at `ipfixer decode`, counts again at nfcapd.
With decap off, the same traffic is one outer flow (UDP 4789 / GRE), as before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipfixer.lab import ip, netns_exec, read_sys, static_neighbour
from tests.kernel.test_vrf import Result, run_router
from tests.labs import Router

pytestmark = [pytest.mark.root, pytest.mark.interop]

SEND = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1],int(sys.argv[3])))\n"
    "for _ in range(int(sys.argv[5])):\n"
    "    s.sendto(b't'*int(sys.argv[6]),(sys.argv[2],int(sys.argv[4])))\n"
)
TUN = "ipfxh12t"  # the tunnel device in each host namespace
SENT, SIZE, SPORT, DPORT = 9, 150, 42001, 9042
# Builds the inner IPv4/UDP packet (RFC 791 header checksum, UDP checksum 0) and its encapsulation, sends
# it SENT times: argv = kind, outer destination, inner source, inner destination, count, payload size.
CRAFT = (
    "import socket,struct,sys\n"
    "kind,dst,isrc,idst,n,size=sys.argv[1],sys.argv[2],sys.argv[3],sys.argv[4],int(sys.argv[5]),int(sys.argv[6])\n"
    f"udp=struct.pack('!HHHH',{SPORT},{DPORT},8+size,0)+b't'*size\n"
    "h=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),1,0,64,17,0,socket.inet_aton(isrc),socket.inet_aton(idst))\n"
    "c=sum(struct.unpack('!10H',h)); c=(c&0xffff)+(c>>16); c=(c&0xffff)+(c>>16)\n"
    "pkt=h[:10]+struct.pack('!H',~c&0xffff)+h[12:]+udp\n"
    "if kind=='gre':\n"
    "    s=socket.socket(socket.AF_INET,socket.SOCK_RAW,47); port=0\n"
    "    msg=struct.pack('!BBHHHII',0xB0,0,0x0800,0,0,7,1)+pkt\n"
    "elif kind=='ipip':\n"
    "    s=socket.socket(socket.AF_INET,socket.SOCK_RAW,4); port=0; msg=pkt\n"
    "else:\n"
    "    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); port=6081\n"
    "    eth=b'\\x02'*6+b'\\x04'*6+b'\\x08\\x00'\n"
    "    msg=struct.pack('!BBHI',2,0,0x6558,0xabcd<<8)+struct.pack('!HBBI',0x0101,1,1,0)+eth+pkt\n"
    "for _ in range(n):\n"
    "    s.sendto(msg,(dst,port))\n"
)
# kind -> (tunnelType, VNI or key)
IDENTITY = {"vxlan": (1, 42), "geneve": (2, 0xABCD), "gre": (3, 7), "ipip": (4, 0)}


@pytest.fixture
def router() -> Any:
    r = Router().build()
    try:
        ip("-n", r.ns_r, "link", "set", "lo", "up")
        netns_exec(r.ns_r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for side, other in ((1, 2), (2, 1)):
            hns = r.ns_1 if side == 1 else r.ns_2
            ip("-n", hns, "route", "add", f"10.{r.subnet}.{other}.0/24", "via", r.addr(side, 1))
        yield r
    finally:
        r.close()


def inner(r: Router, side: int) -> str:
    return f"172.31.{r.subnet}.{side}"


def vxlan(r: Router) -> None:
    """A VXLAN tunnel (VNI 42) between h1 and h2 over the router; inner 172.31.S.1 <-> .2, static
    neighbours inside it and no IPv6 (no ARP, ND or MLD: only the counted datagrams cross it)."""
    for side, other in ((1, 2), (2, 1)):
        hns = r.ns_1 if side == 1 else r.ns_2
        ip("-n", hns, "link", "add", TUN, "type", "vxlan", "id", "42", "local", r.addr(side, 2),
           "remote", r.addr(other, 2), "dstport", "4789")
        ip("-n", hns, "addr", "add", f"{inner(r, side)}/24", "dev", TUN)
        # no IPv6 in the tunnel: its neighbour discovery and MLD would be uncounted extra tunnel packets
        netns_exec(hns, "sysctl", "-q", "-w", f"net.ipv6.conf.{TUN}.disable_ipv6=1")
        ip("-n", hns, "link", "set", TUN, "up")
    for side, other in ((1, 2), (2, 1)):
        hns, ons = (r.ns_1, r.ns_2) if side == 1 else (r.ns_2, r.ns_1)
        static_neighbour(hns, TUN, inner(r, other), read_sys(ons, f"/sys/class/net/{TUN}/address"))


def sender(r: Router, kind: str) -> Callable[[], None]:
    """What sends SENT inner datagrams of SIZE bytes from 172.31.S.1 to .2 in the given encapsulation."""
    if kind == "vxlan":
        vxlan(r)
        return lambda: netns_exec(r.ns_1, sys.executable, "-c", SEND, inner(r, 1), inner(r, 2), str(SPORT),
                                  str(DPORT), str(SENT), str(SIZE))
    return lambda: netns_exec(r.ns_1, sys.executable, "-c", CRAFT, kind, r.addr(2, 2), inner(r, 1), inner(r, 2),
                              str(SENT), str(SIZE))


def decoded(tmp_path: Path) -> list[dict[str, Any]]:
    """`ipfixer decode --json` of the capture run_router made: ipfixer's own elements by name."""
    port = yaml.safe_load((tmp_path / "ipfixer.yaml").read_text())["collectors"][0]["port"]
    out = subprocess.run([sys.executable, "-m", "ipfixer.cli", "decode", "--pcap", str(tmp_path / "cap.pcap"),
                          "--port", str(port), "--json"], capture_output=True, text=True, timeout=60, check=True)
    rows: list[dict[str, Any]] = []
    for line in out.stdout.splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def inner_udp(res: Result) -> list[dict[str, Any]]:
    return [t for t in res.tshark if t.get("cflow.protocol") == "17" and t.get("cflow.srcport") == str(SPORT)]


@pytest.mark.parametrize("kind", ["vxlan", "geneve", "gre", "ipip"])
def test_decap_meters_inner_flow_with_tunnel_identity(tmp_path: Path, router: Router, kind: str) -> None:
    r = router
    res = run_router(tmp_path, r, sender(r, kind), tunnels={"decap": True})
    if1, if2 = r.ifindex(r.r1), r.ifindex(r.r2)
    data = inner_udp(res)
    # one inner flow per observation point: ingress on r1, egress on r2, each with every datagram
    by_dir: dict[str, tuple[int, int]] = {}
    for t in data:
        p, o = by_dir.get(t["cflow.direction"], (0, 0))
        by_dir[t["cflow.direction"]] = (p + int(t["cflow.packets"]), o + int(t["cflow.octets"]))
    assert by_dir == {"0": (SENT, SENT * (SIZE + 28)), "1": (SENT, SENT * (SIZE + 28))}, data
    assert {(t["cflow.srcaddr"], t["cflow.dstaddr"], t["cflow.dstport"]) for t in data} == {
        (inner(r, 1), inner(r, 2), str(DPORT))}
    ttype, tid = IDENTITY[kind]
    segment = (0x01 << 56) | tid if kind == "vxlan" else 0  # IANA's segment types: VxLAN 0x01 (none for Geneve)
    assert {int(t["cflow.layer2_segment_id"]) for t in data} == {segment}
    assert {int(t["cflow.gre_key"]) for t in data} == {tid if kind == "gre" else 0}
    # the outer addresses and tunnel type in ipfixer's enterprise elements
    rows = [d for d in decoded(tmp_path) if d.get("sourceTransportPort") == SPORT and d.get("protocolIdentifier") == 17]
    assert rows and {(d["tunnelType"], d["tunnelSourceIPv4Address"], d["tunnelDestinationIPv4Address"],
                      d["tunnelVirtualNetworkId"]) for d in rows} == {
        (ttype, r.addr(1, 2), r.addr(2, 2), tid if kind in ("vxlan", "geneve") else 0)}
    assert {(d["tunnelSourceIPv6Address"], d["tunnelDestinationIPv6Address"]) for d in rows} == {("::", "::")}
    assert {d["ingressInterface"] or d["egressInterface"] for d in rows} == {if1, if2}
    # nfcapd: the same exact inner counts
    fl = [f for f in res.flows if f.get("proto") == 17 and f.get("src_port") == SPORT]
    assert (sum(f["in_packets"] for f in fl), sum(f["in_bytes"] for f in fl)) == (2 * SENT, 2 * SENT * (SIZE + 28))
    assert "Traceback" not in res.log


@pytest.mark.parametrize("kind", ["vxlan", "gre"])
def test_decap_off_meters_the_outer_flow(tmp_path: Path, router: Router, kind: str) -> None:
    r = router
    res = run_router(tmp_path, r, sender(r, kind))
    assert not inner_udp(res)  # no inner flow
    if kind == "vxlan":
        outer = [t for t in res.tshark if t.get("cflow.protocol") == "17" and t.get("cflow.dstport") == "4789"]
        size = SIZE + 28 + 8 + 8 + 14 + 20  # inner IP + VXLAN/UDP + inner Ethernet + outer IP
    else:
        outer = [t for t in res.tshark if t.get("cflow.protocol") == "47"]
        size = SIZE + 28 + 16 + 20  # inner IP + GRE with checksum, key, sequence + outer IP
    outer = [t for t in outer if t["cflow.srcaddr"] == r.addr(1, 2)]  # not h2's answers (ICMP in the tunnel)
    assert sum(int(t["cflow.packets"]) for t in outer) == 2 * SENT
    assert sum(int(t["cflow.octets"]) for t in outer) == 2 * SENT * size
    assert "Traceback" not in res.log


def final_counters(log: str) -> dict[str, int]:
    """The kernel counters the daemon logs at shutdown ("final counters name=value ...")."""
    line = next(ln for ln in log.splitlines() if "final counters" in ln)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split("final counters", 1)[1].split())}


def test_decap_on_the_chosen_interfaces_only(tmp_path: Path, router: Router) -> None:
    """tunnels.interfaces: r1 (the underlay in) decapsulates, r2 does not: the same datagrams are the
    inner flow at r1's ingress and the outer VXLAN flow at r2's egress, counts exact for both."""
    r = router
    res = run_router(tmp_path, r, sender(r, "vxlan"), tunnels={"decap": True, "interfaces": [r.r1]})
    data = inner_udp(res)
    assert {t["cflow.direction"] for t in data} == {"0"}
    assert (sum(int(t["cflow.packets"]) for t in data), sum(int(t["cflow.octets"]) for t in data)) == (
        SENT, SENT * (SIZE + 28))
    outer = [t for t in res.tshark if t.get("cflow.protocol") == "17" and t.get("cflow.dstport") == "4789"
             and t["cflow.srcaddr"] == r.addr(1, 2)]
    assert {t["cflow.direction"] for t in outer} == {"1"}
    assert sum(int(t["cflow.packets"]) for t in outer) == SENT
    assert sum(int(t["cflow.octets"]) for t in outer) == SENT * (SIZE + 28 + 8 + 8 + 14 + 20)
    # the counter counts every decapsulated packet: the datagrams and h2's answers in the tunnel (ICMP)
    c = final_counters(res.log)
    rows = [d for d in decoded(tmp_path) if d.get("tunnelType") == 1]
    assert c["decap_vxlan"] == sum(d["packetDeltaCount"] for d in rows) >= SENT and c["decap_kept_outer"] == 0
    assert {d["ingressInterface"] or d["egressInterface"] for d in rows} == {r.ifindex(r.r1)}


FLOWS, EACH = 120, 3  # inner flows (source ports) and datagrams of each
SEND_MANY = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "for port in range(int(sys.argv[3]),int(sys.argv[3])+int(sys.argv[4])):\n"
    "    for _ in range(int(sys.argv[5])):\n"
    "        s.sendto(b't'*64,(sys.argv[2],port))\n"
)


def test_spilled_tunnel_packets_keep_their_tunnel(tmp_path: Path, router: Router) -> None:
    """A 16-entry kernel map and 2 x 120 inner flows: most packets spill through the ring buffer to the
    Accounter, and every inner flow still arrives once per direction, with its VNI and outer addresses."""
    r = router

    def traffic() -> None:
        vxlan(r)
        netns_exec(r.ns_1, sys.executable, "-c", SEND_MANY, inner(r, 1), inner(r, 2), "20000", str(FLOWS), str(EACH))

    res = run_router(tmp_path, r, traffic, tunnels={"decap": True}, cache={"kernel_map_entries": 16})
    c = final_counters(res.log)
    assert c["spilled"] > FLOWS and c["ringbuf_fail"] == 0, c
    assert c["decap_vxlan"] >= 2 * FLOWS * EACH  # and h2's ICMP answers in the tunnel
    rows = [d for d in decoded(tmp_path) if d.get("protocolIdentifier") == 17
            and 20000 <= d.get("destinationTransportPort", 0) < 20000 + FLOWS]
    got: dict[tuple[int, int], int] = {}
    for d in rows:
        assert (d["tunnelType"], d["tunnelVirtualNetworkId"], d["tunnelSourceIPv4Address"],
                d["tunnelDestinationIPv4Address"]) == (1, 42, r.addr(1, 2), r.addr(2, 2)), d
        assert d["sourceIPv4Address"] == inner(r, 1) and d["octetDeltaCount"] == d["packetDeltaCount"] * (64 + 28)
        key = (d["destinationTransportPort"], d["flowDirection"])
        got[key] = got.get(key, 0) + d["packetDeltaCount"]
    assert got == {(p, d): EACH for p in range(20000, 20000 + FLOWS) for d in (0, 1)}


# Sends SENT Ethernet frames tagged VLAN 5 into the VXLAN device (AF_PACKET): the device encapsulates them
# as they are, so the underlay carries VXLAN with a tagged inner frame. argv = device, dst MAC, inner src, dst.
SEND_TAGGED = (
    "import socket,struct,sys\n"
    "dev,dmac,isrc,idst=sys.argv[1],bytes.fromhex(sys.argv[2].replace(':','')),sys.argv[3],sys.argv[4]\n"
    f"udp=struct.pack('!HHHH',{SPORT},{DPORT},8+{SIZE},0)+b't'*{SIZE}\n"
    "h=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),1,0,64,17,0,socket.inet_aton(isrc),socket.inet_aton(idst))\n"
    "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW); s.bind((dev,0))\n"
    "smac=s.getsockname()[4]\n"
    "frame=dmac+smac+struct.pack('!HHH',0x8100,0x2005,0x0800)+h+udp\n"
    f"for _ in range({SENT}):\n"
    "    s.send(frame)\n"
)


def test_inner_vlan_tag_through_a_real_vxlan(tmp_path: Path, router: Router) -> None:
    """A VLAN-tagged frame inside VXLAN: the inner IPv4 flow is metered with its tag in dot1qCustomerVlanId."""
    r = router

    def traffic() -> None:
        vxlan(r)
        dmac = read_sys(r.ns_2, f"/sys/class/net/{TUN}/address")
        netns_exec(r.ns_1, sys.executable, "-c", SEND_TAGGED, TUN, dmac, inner(r, 1), inner(r, 2))

    res = run_router(tmp_path, r, traffic, tunnels={"decap": True})
    rows = [d for d in decoded(tmp_path) if d.get("sourceTransportPort") == SPORT and d.get("protocolIdentifier") == 17]
    assert {(d["dot1qCustomerVlanId"], d["tunnelVirtualNetworkId"], d["sourceIPv4Address"]) for d in rows} == {
        (5, 42, inner(r, 1))}
    assert sum(d["packetDeltaCount"] for d in rows) == 2 * SENT  # r1 ingress and r2 egress
    assert sum(d["octetDeltaCount"] for d in rows) == 2 * SENT * (SIZE + 28)
    assert final_counters(res.log)["decap_kept_outer"] == 0


def test_decap_over_netflow_v9(tmp_path: Path, router: Router) -> None:
    """NetFlow v9 (RFC 3954) with the tunnel templates: the enterprise elements are dropped, the IANA ones
    stay; nfcapd counts the inner flow exactly and tshark reads the VNI in layer2SegmentId."""
    r = router
    res = run_router(tmp_path, r, sender(r, "vxlan"), protocol="netflow9", tunnels={"decap": True})
    fl = [f for f in res.flows if f.get("proto") == 17 and f.get("src_port") == SPORT]
    assert (sum(f["in_packets"] for f in fl), sum(f["in_bytes"] for f in fl)) == (2 * SENT, 2 * SENT * (SIZE + 28))
    data = inner_udp(res)
    assert data and {int(t["cflow.layer2_segment_id"]) for t in data} == {(0x01 << 56) | 42}
    assert {t["cflow.srcaddr"] for t in data} == {inner(r, 1)}
    assert "Traceback" not in res.log

