"""NFLOG with tunnels.decap over a real VXLAN device between two namespaces the test creates: the underlay
interface's VXLAN packets become inner flows with their VNI, inner VLAN tag and outer addresses, with exact
packet and octet counts, from the NflogSource itself and from `ipfixer run` (source nflog) at a real UDP
collector; an underlay interface tunnels.interfaces does not name meters the outer flows."""

from __future__ import annotations

import signal
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether

from ipfixer.clock import SystemClock
from ipfixer.flows.accounter import Accounter
from ipfixer.lab import Lab, ip, ns_socket, sh, start_ipfixer, static_neighbour, stop_ipfixer
from ipfixer.metrics import scrape
from ipfixer.model import to_addr16
from ipfixer.netns import in_netns
from ipfixer.sources.nflog_netlink import NflogSource, install_nflog_rules, remove_nflog_rules
from tests.cli.helpers import UdpCollector, cli_env, write_config
from tests.labs import collect

pytestmark = pytest.mark.root

VXLAN_OVERHEAD = 14 + 8 + 8 + 20  # inner Ethernet + VXLAN + UDP + outer IPv4 (the outer IP packet's extra octets)
SIZES = [100, 200, 300, 400, 500]
VLAN_SIZES = [60, 70, 80]
VLAN = 10


@dataclass
class VxlanLab:
    """Lab (veth underlay, 10.S.0.1 <-> 10.S.0.2) + a VXLAN device on each side (VNI, dstport 4789,
    172.31.S.1 <-> .2); static neighbours and IPv6 off on the overlay, so the only tunnelled packets are the
    test's own. (This kernel has no 8021q module: VLAN-tagged inner frames are written to the VXLAN device
    through a packet socket, see send_tagged.)"""

    lab: Lab
    vni: int
    vx: str

    def inner(self, side: int, vlan: bool = False) -> str:
        return f"172.{30 if vlan else 31}.{self.lab.subnet}.{side}"


@pytest.fixture
def vxlan() -> Iterator[VxlanLab]:
    lab = Lab().build()
    try:
        vni = 4000 + lab.subnet
        v = VxlanLab(lab, vni, f"ipfxudx{lab.subnet}")
        sides = ((lab.ns_a, lab.v4_a, lab.v4_b, lab.veth_a, 1), (lab.ns_b, lab.v4_b, lab.v4_a, lab.veth_b, 2))
        for ns, local, remote, dev, side in sides:
            sh("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", netns=ns)
            ip("-n", ns, "link", "add", v.vx, "type", "vxlan", "id", str(vni), "local", local, "remote", remote,
               "dstport", "4789", "dev", dev)  # fmt: skip
            ip("-n", ns, "addr", "add", f"{v.inner(side)}/24", "dev", v.vx)
            ip("-n", ns, "link", "set", v.vx, "up")
        for (ns, *_), (peer, *_), side in ((sides[0], sides[1], 2), (sides[1], sides[0], 1)):
            static_neighbour(ns, v.vx, v.inner(side), lab.mac(peer, v.vx))
        yield v
    finally:
        lab.close()


def send(v: VxlanLab, sport: int, dport: int, sizes: list[int]) -> None:
    """UDP datagrams A -> B over the overlay, each received in B (no ICMP back)."""
    rx = ns_socket(v.lab.ns_b, socket.SOCK_DGRAM, ("0.0.0.0", dport))
    try:
        v.lab.send_udp(v.lab.ns_a, v.inner(2), sport, dport, sizes)
        assert sorted(len(rx.recv(4096)) for _ in sizes) == sorted(sizes)
    finally:
        rx.close()


def send_tagged(v: VxlanLab, sport: int, dport: int, sizes: list[int]) -> None:
    """802.1Q-tagged frames (VLAN) written to A's VXLAN device: encapsulated like any frame it sends."""
    lab = v.lab
    write_frames(v, [bytes(Ether(src=lab.mac(lab.ns_a, v.vx), dst=lab.mac(lab.ns_b, v.vx)) / Dot1Q(vlan=VLAN) /
                           IP(src=v.inner(1, True), dst=v.inner(2, True)) / UDP(sport=sport, dport=dport) /
                           (b"q" * n)) for n in sizes])  # fmt: skip


def write_frames(v: VxlanLab, frames: list[bytes]) -> None:
    """Frames written to A's VXLAN device through a packet socket, each sent whole."""

    def write() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((v.vx, 0))
            for f in frames:
                assert s.send(f) == len(f)

    in_netns(v.lab.ns_a, write)


def test_nflog_source_decapsulates_vxlan_with_inner_vlan(vxlan: VxlanLab) -> None:
    """NflogSource on the underlay of B (ingress): one inner flow per overlay flow with the VNI, the inner
    VLAN tag, the outer addresses; counts exact through a tunnel-keyed Accounter."""
    v, lab = vxlan, vxlan.lab
    group = 4300 + lab.subnet
    veth_b = lab.ifindex(lab.ns_b, lab.veth_b)
    install_nflog_rules(group, lab.ns_b, match=f'iifname "{lab.veth_b}"', snaplen=256)
    try:
        src = NflogSource(group, lab.ns_b, copy_range=256, decap=lambda ifindex: ifindex == veth_b)
        try:
            send(v, 41001, 42001, SIZES)
            send_tagged(v, 41002, 42002, VLAN_SIZES)
            arp = bytes(Ether(src=lab.mac(lab.ns_a, v.vx), dst="ff:ff:ff:ff:ff:ff") /
                        ARP(psrc=v.inner(1), pdst="172.31.255.254"))  # nobody answers: not IP, the outer flow
            write_frames(v, [arp, arp])
            pkts = collect(src, len(SIZES) + len(VLAN_SIZES) + 2, settle_s=0.3)
        finally:
            src.close()
    finally:
        remove_nflog_rules(lab.ns_b)
    acc = Accounter(max_entries=64, evict_timeout_ns=10**12, clock=SystemClock(), tunnels=True)
    assert acc.account_all(pkts) == []
    rows = {(int(r["src_port"]), int(r["dst_port"])): r for r in acc.flush() if r["protocol"] == 17}
    outer = (to_addr16(lab.v4_a), to_addr16(lab.v4_b))
    for ports, sizes, vlan, vlan_id in (((41001, 42001), SIZES, False, 0), ((41002, 42002), VLAN_SIZES, True, VLAN)):
        r = rows.pop(ports)
        assert (bytes(r["src_addr"]), bytes(r["dst_addr"])) == (to_addr16(v.inner(1, vlan)), to_addr16(v.inner(2, vlan)))
        assert (int(r["packets"]), int(r["octets"])) == (len(sizes), sum(28 + n for n in sizes))
        assert (int(r["tunnel_type"]), int(r["tunnel_id"]), int(r["inner_vlan_id"])) == (1, v.vni, vlan_id)
        assert (bytes(r["outer_src_addr"]), bytes(r["outer_dst_addr"])) == outer
        assert int(r["ifindex"]) == veth_b and bytes(r["src_mac"]) == bytes.fromhex(lab.mac_a.replace(":", ""))
        assert int(r["vlan_id"]) == 0
    (sport, dport), = rows  # the ARP frames: VXLAN packets kept as their outer flow
    r = rows.pop((sport, dport))
    assert dport == 4789 and int(r["tunnel_type"]) == 0 and bytes(r["outer_src_addr"]) == bytes(16)
    assert (bytes(r["src_addr"]), bytes(r["dst_addr"])) == outer
    assert (int(r["packets"]), int(r["octets"])) == (2, 2 * (20 + 8 + 8 + len(arp)))
    assert src.decap_counts.as_dict() == {"decap_vxlan": len(SIZES) + len(VLAN_SIZES), "decap_geneve": 0,
                                          "decap_gre": 0, "decap_ipip": 0, "decap_kept_outer": 2}
    assert src.unparsed == 0


def _daemon_records(tmp: Path, v: VxlanLab, tunnel_globs: list[str], sport: int, dport: int,
                    metrics: dict[str, float] | None = None) -> tuple[list[dict[str, Any]], str]:
    """`ipfixer run` (source nflog, tunnels.decap) in B metering its underlay veth; the test's traffic; the
    records a collector in B decoded, and the daemon's log. `metrics`: filled with a scrape of the running
    daemon's decap_* metrics once the traffic was drained."""
    lab = v.lab
    coll = UdpCollector(netns=lab.ns_b)
    with in_netns(lab.ns_b, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    try:
        cfg = write_config(tmp / "ipfixer.yaml", [{"address": "127.0.0.1", "port": coll.port}], source="nflog",
                           interfaces={"include": [lab.veth_b], "exclude": [], "direction": "ingress"},
                           tunnels={"decap": True, "interfaces": tunnel_globs},
                           timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"},
                           lock_dir=str(tmp / "lock"), enrichment={"nflog_group": 4400 + lab.subnet},
                           metrics={"listen": f"127.0.0.1:{port}"})  # fmt: skip
        log = tmp / "ipfixer.log"
        proc = start_ipfixer(lab.ns_b, cfg, log, env=cli_env())
        try:
            send(v, sport, dport, SIZES)
            time.sleep(0.5)
            for _ in range(40):  # bounded: until a drain (every 500 ms) passed the counters on
                values = in_netns(lab.ns_b, lambda: scrape(f"127.0.0.1:{port}"))
                decap = {k: values.get(f'ipfixer_classifier_packets_total{{counter="{k}"}}')
                         for k in ("decap_vxlan", "decap_geneve", "decap_gre", "decap_ipip", "decap_kept_outer")}
                if metrics is None or (decap["decap_vxlan"] or 0) >= len(SIZES):
                    break
                time.sleep(0.25)
            if metrics is not None:
                metrics.update(decap)
        finally:
            assert stop_ipfixer(proc) == 0, log.read_text()
        coll.receive(5, until_idle=1.0)
    finally:
        coll.close()
    text = log.read_text()
    assert "Traceback" not in text, text
    return coll.flow_records(), text


def test_daemon_nflog_exports_inner_flows_with_vni(tmp_path: Path, vxlan: VxlanLab) -> None:
    v, lab = vxlan, vxlan.lab
    metrics: dict[str, float] = {}
    records, log = _daemon_records(tmp_path, v, ["ipfxb*", lab.veth_b], 43001, 44001, metrics)
    mine = [r for r in records if r.get("destinationTransportPort") == 44001]
    assert mine and all(r["tunnelType"] == 1 for r in mine), mine
    assert {(str(r["sourceIPv4Address"]), str(r["destinationIPv4Address"]), r["sourceTransportPort"],
             r["tunnelVirtualNetworkId"], r["layer2SegmentId"], str(r["tunnelSourceIPv4Address"]),
             str(r["tunnelDestinationIPv4Address"]), r["ingressInterface"]) for r in mine} == {
        (v.inner(1), v.inner(2), 43001, v.vni, (1 << 56) | v.vni, lab.v4_a, lab.v4_b,
         lab.ifindex(lab.ns_b, lab.veth_b))}  # fmt: skip
    assert sum(r["packetDeltaCount"] for r in mine) == len(SIZES)
    assert sum(r["octetDeltaCount"] for r in mine) == sum(28 + n for n in SIZES)
    assert not [r for r in records if r.get("destinationTransportPort") == 4789]  # no outer flow
    assert f"decap_vxlan={len(SIZES)}" in log and "decap_kept_outer=0" in log, log
    assert metrics == {"decap_vxlan": len(SIZES), "decap_geneve": 0, "decap_gre": 0, "decap_ipip": 0,
                       "decap_kept_outer": 0}  # the kernel's counter names, as the eBPF meter exposes them


def test_daemon_nflog_other_interface_meters_outer_flows(tmp_path: Path, vxlan: VxlanLab) -> None:
    """tunnels.interfaces does not name the metered veth: its VXLAN packets are one outer flow, uncounted."""
    v, lab = vxlan, vxlan.lab
    records, log = _daemon_records(tmp_path, v, ["ipfxud-not-this-one"], 43002, 44002)
    assert not [r for r in records if r.get("destinationTransportPort") == 44002]
    outer: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        if r.get("destinationTransportPort") == 4789:
            assert r["tunnelType"] == 0 and r["tunnelVirtualNetworkId"] == 0, r
            k = (str(r["sourceIPv4Address"]), str(r["destinationIPv4Address"]), r["protocolIdentifier"])
            outer[k][0] += r["packetDeltaCount"]
            outer[k][1] += r["octetDeltaCount"]
    assert dict(outer) == {(lab.v4_a, lab.v4_b, 17): [len(SIZES), sum(28 + n + VXLAN_OVERHEAD for n in SIZES)]}
    assert "decap_vxlan=0" in log and "decap_kept_outer=0" in log, log


def test_daemon_nflog_tunnel_interfaces_follow_reload(tmp_path: Path, vxlan: VxlanLab) -> None:
    """tunnels.interfaces changed by a SIGHUP reload applies to the next packet: outer flows before it,
    inner flows after it, no packet lost or counted twice."""
    v, lab = vxlan, vxlan.lab
    coll = UdpCollector(netns=lab.ns_b)
    log = tmp_path / "ipfixer.log"

    def cfg(globs: list[str]) -> Path:
        return write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": coll.port}],
                            source="nflog", interfaces={"include": [lab.veth_b], "exclude": [], "direction": "ingress"},
                            tunnels={"decap": True, "interfaces": globs},
                            timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"},
                            lock_dir=str(tmp_path / "lock"), enrichment={"nflog_group": 4500 + lab.subnet})  # fmt: skip

    try:
        proc = start_ipfixer(lab.ns_b, cfg(["ipfxud-none"]), log, env=cli_env())
        try:
            send(v, 43005, 44005, SIZES)
            cfg([lab.veth_b])
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while b"msg=reloaded" not in log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert b"msg=reloaded" in log.read_bytes(), log.read_text()
            send(v, 43006, 44006, SIZES[:3])
            time.sleep(0.5)
        finally:
            assert stop_ipfixer(proc) == 0, log.read_text()
        coll.receive(5, until_idle=1.0)
    finally:
        coll.close()
    records = coll.flow_records()
    outer = [r for r in records if r.get("destinationTransportPort") == 4789]
    inner = [r for r in records if r.get("destinationTransportPort") == 44006]
    assert not [r for r in records if r.get("destinationTransportPort") == 44005]
    assert (sum(r["packetDeltaCount"] for r in outer), sum(r["octetDeltaCount"] for r in outer)) == (
        len(SIZES), sum(28 + n + VXLAN_OVERHEAD for n in SIZES))
    assert (sum(r["packetDeltaCount"] for r in inner), sum(r["octetDeltaCount"] for r in inner)) == (
        3, sum(28 + n for n in SIZES[:3]))
    assert {(r["tunnelType"], r["tunnelVirtualNetworkId"]) for r in inner} == {(1, v.vni)}
    assert "decap_vxlan=3" in log.read_text()
