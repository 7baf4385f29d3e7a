"""`ipfixer replay` with tunnels.decap of a capture of tunnelled traffic the test writes: the inner flows, their
tunnel (type, VNI / GRE key, outer addresses) and exact packet/octet counts as a real UDP collector decodes
them, and the summary's decap counts."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from scapy.contrib.geneve import GENEVE, GeneveOptions
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import wrpcap

from tests.cli.helpers import IPFIXER, UdpCollector, cli_env, write_config

T0 = 1_700_000_000.0
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
INNER = Ether(src="02:00:00:00:aa:01", dst="02:00:00:00:aa:02")
O4 = IP(src="192.0.2.1", dst="192.0.2.2")
O6 = IPv6(src="2001:db8:ff::1", dst="2001:db8:ff::2")

# inner 5-tuple -> (packets, inner IP octets per packet, tunnelType, VNI, GRE key, outer src, outer dst)
Flow = tuple[str, str, int, int, int]


def _capture(path: Path) -> tuple[dict[Flow, tuple[int, int, int, int, int, str, str]], dict[str, int]]:
    pkts: list[Any] = []
    expected: dict[Flow, tuple[int, int, int, int, int, str, str]] = {}
    decap: dict[str, int] = defaultdict(int)

    def add(pkt: Any, n: int, key: Flow, ip_len: int, tunnel: tuple[int, int, int, str, str], counter: str) -> None:
        for _ in range(n):
            p = pkt.copy()
            p.time = T0 + len(pkts) * 0.001
            pkts.append(p)
        expected[key] = (n, n * ip_len, *tunnel)
        decap[counter] += n

    add(ETH / O4 / UDP(sport=50001, dport=4789) / VXLAN(vni=5000) / INNER / Dot1Q(vlan=10) /
        IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=1111, dport=2222) / (b"v" * 100),
        6, ("10.1.0.1", "10.1.0.2", 1111, 2222, 17), 20 + 8 + 100, (1, 5000, 0, "192.0.2.1", "192.0.2.2"),
        "decap_vxlan")
    add(ETH / O4 / UDP(sport=50002, dport=6081) / GENEVE(vni=77, proto=0x6558, options=[GeneveOptions(data=b"abcd")]) /
        INNER / IPv6(src="fd00:1::1", dst="fd00:1::2") / TCP(sport=3333, dport=443, flags="A") / (b"g" * 60),
        4, ("fd00:1::1", "fd00:1::2", 3333, 443, 6), 40 + 20 + 60, (2, 77, 0, "192.0.2.1", "192.0.2.2"),
        "decap_geneve")
    add(ETH / O6 / GRE(key_present=1, key=0x1234, seqnum_present=1) / IP(src="10.2.0.1", dst="10.2.0.2") /
        ICMP(type=8) / (b"i" * 56),
        3, ("10.2.0.1", "10.2.0.2", 0, 8 * 256, 1), 20 + 8 + 56, (3, 0, 0x1234, "2001:db8:ff::1", "2001:db8:ff::2"),
        "decap_gre")
    add(ETH / O4 / IP(src="10.3.0.1", dst="10.3.0.2") / UDP(sport=4444, dport=5555) / (b"p" * 10),
        5, ("10.3.0.1", "10.3.0.2", 4444, 5555, 17), 20 + 8 + 10, (4, 0, 0, "192.0.2.1", "192.0.2.2"), "decap_ipip")
    # VXLAN without the I flag: not understood, the outer flow (50 = VXLAN + inner Ethernet + 28 bytes)
    add(ETH / O4 / UDP(sport=50003, dport=4789) / VXLAN(flags=0, vni=9) / INNER / IP() / UDP() / b"",
        2, ("192.0.2.1", "192.0.2.2", 50003, 4789, 17), 20 + 8 + 8 + 14 + 28, (0, 0, 0, "", ""), "decap_kept_outer")
    # plain traffic next to it: no tunnel
    add(ETH / IP(src="10.4.0.1", dst="10.4.0.2") / UDP(sport=6666, dport=7777) / (b"n" * 30),
        7, ("10.4.0.1", "10.4.0.2", 6666, 7777, 17), 20 + 8 + 30, (0, 0, 0, "", ""), "")
    decap.pop("")
    wrpcap(str(path), pkts)
    return expected, dict(decap)


def _by_flow(records: list[dict[str, Any]]) -> dict[Flow, tuple[int, int, int, int, int, str, str]]:
    out: dict[Flow, list[Any]] = {}
    for r in records:
        src = r.get("sourceIPv4Address", r.get("sourceIPv6Address"))
        dst = r.get("destinationIPv4Address", r.get("destinationIPv6Address"))
        key = (str(src), str(dst), r["sourceTransportPort"], r["destinationTransportPort"], r["protocolIdentifier"])
        ttype = r["tunnelType"]
        outer_v4 = str(r["tunnelSourceIPv4Address"]) != "0.0.0.0"
        outer = (str(r["tunnelSourceIPv4Address"]), str(r["tunnelDestinationIPv4Address"])) if outer_v4 else \
            (str(r["tunnelSourceIPv6Address"]), str(r["tunnelDestinationIPv6Address"]))
        if ttype == 0:
            assert outer == ("::", "::"), r
            outer = ("", "")
        tunnel = [ttype, r["tunnelVirtualNetworkId"], r["greKey"], *outer]
        if ttype == 1:  # VXLAN: layer2SegmentId is segment type 0x01 (RFC 7348) << 56 | VNI
            assert r["layer2SegmentId"] == (1 << 56) | r["tunnelVirtualNetworkId"], r
        else:
            assert r["layer2SegmentId"] == 0, r
        got = out.setdefault(key, [0, 0, *tunnel])
        assert got[2:] == tunnel, (got, r)  # one tunnel per flow
        got[0] += r["packetDeltaCount"]
        got[1] += r["octetDeltaCount"]
    return {k: tuple(v) for k, v in out.items()}  # type: ignore[misc]


def _replay(tmp_path: Path, **settings: Any) -> tuple[UdpCollector, dict[str, Any]]:
    """The real `ipfixer replay` of tunnels.pcap to a collector: (the collector, closed after receiving,
    and replay's JSON summary)."""
    coll = UdpCollector()
    try:
        cfg = write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": coll.port}], **settings)
        res = subprocess.run([*IPFIXER, "replay", str(tmp_path / "tunnels.pcap"), "--config", str(cfg), "-q"],
                             capture_output=True, text=True, timeout=120, env=cli_env())
        assert res.returncode == 0, res.stderr
        summary: dict[str, Any] = json.loads(res.stdout)
        coll.receive(5, until_idle=1.0)
    finally:
        coll.close()
    return coll, summary


def test_replay_decapsulates_every_tunnel_type(tmp_path: Path) -> None:
    expected, decap = _capture(tmp_path / "tunnels.pcap")
    # evictions mid-file (2 entries): the sums stay exact
    coll, summary = _replay(tmp_path, tunnels={"decap": True, "interfaces": ["ipfxud-no-such-interface"]},
                            cache={"accounter_max_entries": 2})
    assert summary["packets"] == sum(v[0] for v in expected.values()) == 27 and summary["malformed"] == 0
    # tunnels.interfaces names live interfaces: a capture has none, the whole file is decapsulated
    assert summary["decap"] == {"decap_vxlan": 6, "decap_geneve": 4, "decap_gre": 3, "decap_ipip": 5,
                                "decap_kept_outer": 2} == {**dict.fromkeys(summary["decap"], 0), **decap}
    records = coll.flow_records()
    assert _by_flow(records) == expected
    assert all(r["flowStartMilliseconds"] >= int(T0 * 1000) for r in records)


def test_replay_without_decap_meters_outer_flows(tmp_path: Path) -> None:
    """The same file with tunnels.decap off (the default): outer flows only, no decap summary."""
    expected, _ = _capture(tmp_path / "tunnels.pcap")
    coll, summary = _replay(tmp_path)
    assert "decap" not in summary and summary["packets"] == 27
    records = coll.flow_records()
    assert not any("tunnelType" in r for r in records)
    flows = {(str(r.get("sourceIPv4Address", r.get("sourceIPv6Address"))), r["destinationTransportPort"],
              r["protocolIdentifier"]) for r in records}  # fmt: skip
    assert flows == {("192.0.2.1", 4789, 17), ("192.0.2.1", 6081, 17), ("2001:db8:ff::1", 0, 47),
                     ("192.0.2.1", 0, 4), ("10.4.0.1", 7777, 17)}
    assert sum(r["packetDeltaCount"] for r in records) == 27
    assert len(expected) == 6
