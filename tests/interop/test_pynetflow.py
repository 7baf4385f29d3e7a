"""ipfixer -> real UDP -> python-netflow's own collector (PyPI `netflow` 0.12, `python -m netflow.collector`):
every record of every data template, and the options records it reports (IPFIX), with every field equal
to what was sent; no traceback and no undecodable packet in its log; a restarted collector decodes the
next message.

What python-netflow 0.12 does with what it gets (its netflow/ipfix.py and v9.py), part of the expectation:
- IPFIX addresses and MAC addresses come out as integers, strings (interfaceName) with their zero padding;
- NetFlow v9 names fields by its own v9 table, which has no name for ethernetType (256) or flowEndReason
  (136): both land on the key UNKNOWN_FIELD_TYPE, the later field (flowEndReason) winning;
- its collector writes only the flows of v9 packets, never v9 options records, so those are not checked;
- it takes any datagram that decodes as UTF-8 for a hex dump and stops (see test_export_arrangement).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ipfixer.model import ETH_P_IP, FlowRecord, addr16_to_str
from tests.interop.scenarios import INTERFACES, SAMPLING, make_exporter, restart_scenario, send_refresh_then_flows

pytestmark = pytest.mark.interop


def _int(addr16: bytes) -> int:
    return int(ipaddress.ip_address(addr16_to_str(addr16)))


def expected_ipfix(r: FlowRecord) -> dict[str, Any]:
    fam = "IPv4" if r.ethertype == ETH_P_IP else "IPv6"
    return {
        f"source{fam}Address": _int(r.src_addr), f"destination{fam}Address": _int(r.dst_addr),
        "sourceTransportPort": r.src_port, "destinationTransportPort": r.dst_port,
        f"icmpTypeCode{fam}": r.dst_port if r.protocol in (1, 58) else 0, "protocolIdentifier": r.protocol,
        "tcpControlBits": r.tcp_flags, "ipClassOfService": r.tos, "octetDeltaCount": r.octets,
        "packetDeltaCount": r.packets, "flowStartMilliseconds": r.start_ms, "flowEndMilliseconds": r.end_ms,
        "flowDirection": r.direction, "ingressInterface": r.ingress_if, "egressInterface": r.egress_if,
        "sourceMacAddress": int.from_bytes(r.src_mac, "big"), "destinationMacAddress": int.from_bytes(r.dst_mac, "big"),
        "ethernetType": r.ethertype, "vlanId": r.vlan_id, "flowEndReason": r.end_reason,
    }  # fmt: skip


def expected_v9(r: FlowRecord, boot_ms: int) -> dict[str, Any]:
    fam = "IPV4" if r.ethertype == ETH_P_IP else "IPV6"
    return {
        f"{fam}_SRC_ADDR": addr16_to_str(r.src_addr), f"{fam}_DST_ADDR": addr16_to_str(r.dst_addr),
        "L4_SRC_PORT": r.src_port, "L4_DST_PORT": r.dst_port, "ICMP_TYPE": r.dst_port if r.protocol in (1, 58) else 0,
        "PROTOCOL": r.protocol, "TCP_FLAGS": r.tcp_flags, "SRC_TOS": r.tos, "IN_BYTES": r.octets, "IN_PKTS": r.packets,
        "FIRST_SWITCHED": r.start_ms - boot_ms, "LAST_SWITCHED": r.end_ms - boot_ms, "DIRECTION": r.direction,
        "INPUT_SNMP": r.ingress_if, "OUTPUT_SNMP": r.egress_if, "IN_SRC_MAC": int.from_bytes(r.src_mac, "big"),
        "IN_DST_MAC": int.from_bytes(r.dst_mac, "big"), "SRC_VLAN": r.vlan_id, "UNKNOWN_FIELD_TYPE": r.end_reason,
    }  # fmt: skip


def clean_log(text: str) -> bool:
    return not any(s in text for s in ("Traceback", "Error", "ERROR", "WARNING", "Failed to decode", "Dropping"))


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_every_record_and_field_at_python_netflow(
    pynetflow: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    boot_ms = base_ms - 3_600_000 + 123
    now_ms = base_ms + 2_345
    collector = pynetflow()
    exporter = make_exporter(protocol, boot_ms, collector.port)
    try:
        send_refresh_then_flows(exporter, known_flows, now_ms * 1_000_000)
        sent = exporter.stats["c"].messages
        n_options = 3 + len(INTERFACES) if protocol == "ipfix" else 0
        packets = collector.packets(len(known_flows) + n_options)
    finally:
        exporter.close()
    assert len(packets) == sent and clean_log(collector.log_text()), collector.log_text()
    flows = [f for p in packets for f in p["flows"]]
    data = [f for f in flows if "packetDeltaCount" in f or "IN_PKTS" in f]
    assert len(data) == len(known_flows)
    by_packets = {f.get("packetDeltaCount", f.get("IN_PKTS")): f for f in data}
    for r in known_flows:
        exp = expected_ipfix(r) if protocol == "ipfix" else expected_v9(r, boot_ms)
        assert by_packets[r.packets] == exp
    if protocol == "ipfix":  # options records, as the first refresh carries them
        options = [f for f in flows if f not in data]
        stats = {"observationDomainId": 7, "meteringProcessId": 4242, "exportedMessageTotalCount": 0,
                 "exportedFlowRecordTotalCount": 0, "exportedOctetTotalCount": 0, "notSentFlowTotalCount": 0,
                 "ignoredPacketTotalCount": 3, "ignoredOctetTotalCount": 0, "systemInitTimeMilliseconds": boot_ms}
        ifaces = [{"ingressInterface": i, "interfaceName": n.ljust(16, "\0")} for i, n in sorted(INTERFACES.items())]
        assert options == [stats, {"observationDomainId": 7, **SAMPLING}, *ifaces]  # fmt: skip
        seqs = [p["header"]["sequence_number"] for p in packets]
        counts = [len(p["flows"]) for p in packets]
        assert seqs == [sum(counts[:i]) for i in range(len(packets))]  # RFC 7011 3.1, options included
    else:
        assert [p["header"]["sequence"] for p in packets] == list(range(len(packets)))
        export_secs = -(-now_ms // 1000)
        assert {(p["header"]["timestamp"], p["header"]["uptime"]) for p in packets} == {
            (export_secs, export_secs * 1000 - boot_ms)}  # fmt: skip


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_restarted_python_netflow_decodes_the_next_message(
    pynetflow: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    key = "packetDeltaCount" if protocol == "ipfix" else "IN_PKTS"
    n_options = 3 + len(INTERFACES) if protocol == "ipfix" else 0  # v9 options are not written
    def read(c: Any, n: int) -> list[int]:
        return [f[key] for p in c.packets(n) for f in p["flows"] if key in f]

    got, rows, second = restart_scenario(protocol, known_flows, base_ms, pynetflow, read, first_extra=n_options)
    assert sorted(got) == [100, 101, 102, 103, 104]
    assert sorted(rows) == [900, 901, 902, 903, 904], second.log_text()
    assert clean_log(second.log_text()), second.log_text()
