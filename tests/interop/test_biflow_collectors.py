"""RFC 5103 biflows at real decoders: the Exporter sends the same uniflows to a uniflow collector and to
biflow collectors (`biflow: true`); nfcapd, tshark and `ipfixer decode` read the biflow records, whose
counts equal the sum of the uniflow pair that nfcapd stored from the uniflow collector."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from ipfixer.export import Exporter, ExportSession, UdpTransport
from ipfixer.export.factory import BIFLOW_TEMPLATES
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, records_to_batch, to_addr16
from ipfixer.templates import load_templates
from tests.collectors import free_udp_port

pytestmark = pytest.mark.interop

T = load_templates()
UNI = {ETH_P_IP: T["ipv4_flow"], ETH_P_IPV6: T["ipv6_flow"]}
BI = {e: T[n] for e, n in BIFLOW_TEMPLATES.items()}


def uniflows(ms: int) -> list[FlowRecord]:
    """A TCP request/response pair (v4), a DNS pair (v6), and a lone UDP uniflow (no answer)."""
    def rec(a: str, b: str, sp: int, dp: int, proto: int, direction: int, packets: int, octets: int, start: int,
            flags: int = 0) -> FlowRecord:
        return FlowRecord(
            ethertype=ETH_P_IPV6 if ":" in a else ETH_P_IP, direction=direction, src_addr=to_addr16(a),
            dst_addr=to_addr16(b), src_port=sp, dst_port=dp, protocol=proto, ifindex=3,
            ingress_if=3 if direction == 0 else 0, egress_if=3 if direction == 1 else 0, packets=packets,
            octets=octets, start_ms=start, end_ms=start + 300, tcp_flags=flags, tos=0x10 * direction, end_reason=3,
        )  # fmt: skip

    return [
        rec("10.5.0.2", "10.5.0.1", 443, 40001, 6, 1, 9, 12000, ms - 1990, 0x1A),  # the response, listed first
        rec("10.5.0.1", "10.5.0.2", 40001, 443, 6, 0, 7, 900, ms - 2000, 0x1B),
        rec("fd00:5::1", "fd00:5::53", 40002, 53, 17, 0, 1, 60, ms - 1500),
        rec("fd00:5::53", "fd00:5::1", 53, 40002, 17, 1, 1, 140, ms - 1499),
        rec("10.5.0.1", "10.5.0.9", 40003, 514, 17, 0, 4, 400, ms - 1000),
    ]


def send(uni_port: int, bi_ports: list[int]) -> None:
    """One batch: uniflows to uni_port, biflows to each bi port; then the lone uniflow's hold ends (flush)."""
    now = time.time_ns()
    cols = [("uni", ExportSession("ipfix", 5, UNI, boot_wall_ns=now - 10**10), UdpTransport("127.0.0.1", uni_port))]
    cols += [(f"bi{i}", ExportSession("ipfix", 5, BI, boot_wall_ns=now - 10**10), UdpTransport("127.0.0.1", p))
             for i, p in enumerate(bi_ports)]
    ex = Exporter(cols, biflow=[n for n, _, _ in cols if n != "uni"], biflow_hold_ns=10**9)
    try:
        ex.export(records_to_batch(uniflows(now // 10**6)), now)
        ex.flush(now + 10**6)
        assert all(c.stats.error_count == 0 for c in ex.collectors)
        assert ex.pairer is not None and (ex.pairer.stats.paired, ex.pairer.stats.unpaired) == (2, 1)
    finally:
        ex.close()


def test_biflow_counts_equal_the_uniflow_pair_at_nfcapd(nfcapd: Any) -> None:
    uni, bi = nfcapd(), nfcapd()
    send(uni.port, [bi.port])
    time.sleep(0.5)
    u, b = uni.stop(), bi.stop()
    assert len(u) == 5 and len(b) == 3
    by_u = {(f["src_port"], f["dst_port"]): f for f in u}
    for f in b:
        fwd = by_u[(f["src_port"], f["dst_port"])]
        rev = by_u.get((f["dst_port"], f["src_port"]))
        assert (f["in_packets"], f["in_bytes"]) == (fwd["in_packets"], fwd["in_bytes"])
        assert (f["out_packets"], f["out_bytes"]) == ((rev["in_packets"], rev["in_bytes"]) if rev else (0, 0))
        assert (f["first"], f["last"], f["tcp_flags"]) == (fwd["first"], fwd["last"], fwd["tcp_flags"])
    assert sorted(f["src_port"] for f in b) == [40001, 40002, 40003]  # the initiator is the source
    assert sum(f["in_packets"] + f["out_packets"] for f in b) == sum(f["in_packets"] for f in u)
    assert sum(f["in_bytes"] + f["out_bytes"] for f in b) == sum(f["in_bytes"] for f in u)


def test_biflow_reverse_elements_and_direction_in_tshark(tshark: Any) -> None:
    cap = tshark(2)  # the batch's message, the flush's message
    send(free_udp_port(), [cap.port])
    recs = {int(r["cflow.srcport"]): r for r in cap.finish()}
    assert set(recs) == {40001, 40002, 40003}
    tcp = recs[40001]
    # tshark names a reverse element (PEN 29305) as its forward one, so the JSON keys repeat in template
    # order: the reverse counters follow the forward ones, the reverse flags and ToS precede theirs
    assert (tcp["cflow.packets"], tcp["cflow.octets"], tcp["cflow.packets#2"], tcp["cflow.octets#2"]) == \
        ("7", "900", "9", "12000")
    assert (tcp["cflow.tcpflags"], tcp["cflow.tcpflags#2"], tcp["cflow.tos"], tcp["cflow.tos#2"]) == \
        ("0x1a", "0x1b", "0x10", "0x00")
    assert tcp["cflow.biflow_direction"] == "1" and recs[40002]["cflow.biflow_direction"] == "1"
    assert (recs[40003]["cflow.packets"], recs[40003]["cflow.packets#2"]) == ("4", "0")


def test_biflow_in_ipfixer_decode() -> None:
    port = free_udp_port()
    proc = subprocess.Popen([sys.executable, "-m", "ipfixer.cli", "decode", "--port", str(port), "--json",
                             "--count", "2", "--timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 10
        line = ""
        while "listening" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
        send(free_udp_port(), [port])
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]  # one line per Data Record (fields + context)
    by_port = {r["sourceTransportPort"]: r for r in records if "sourceTransportPort" in r}
    tcp = by_port[40001]
    assert (tcp["packetDeltaCount"], tcp["reversePacketDeltaCount"], tcp["octetDeltaCount"],
            tcp["reverseOctetDeltaCount"]) == (7, 9, 900, 12000)
    assert (tcp["tcpControlBits"], tcp["reverseTcpControlBits"], tcp["biflowDirection"]) == (0x1B, 0x1A, 1)
    assert (by_port[40003]["reversePacketDeltaCount"], by_port[40003]["biflowDirection"]) == (0, 1)
