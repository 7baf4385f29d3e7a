"""ipfixer -> real UDP -> nfcapd -> nfdump -o json: every field nfdump can show has the value we sent.

nfdump 1.7.1 has no output for ethernetType and flowEndReason (they are checked with tshark instead).
Its NetFlow v9 path takes ICMP type/code only from ICMP_TYPE (32), never from the destination port, which
is why the shipped templates carry icmpTypeCodeIPv4/IPv6 (ExportSession sends 139 as 32 in v9).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import pytest

from ipfixer.export import ExportSession, UdpTransport
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, addr16_to_str, records_to_batch
from ipfixer.templates import load_templates
from ipfixer.wire.decode import Decoder
from tests.collectors import wire
from tests.interop.scenarios import (
    INTERFACES,
    SAMPLING,
    make_exporter,
    make_session as scenario_session,
    restart_round,
    send_refresh_then_flows,
    tagged,
)

pytestmark = pytest.mark.interop

DELIVERY_S = 0.5  # loopback datagrams are queued at once; give nfcapd time to read them before SIGTERM


def make_session(protocol: str, boot_ms: int, **kw: Any) -> ExportSession:
    """Flow templates only (the options ones: tests.interop.scenarios)."""
    ts = load_templates()
    data = {
        ETH_P_IP: ts["ipv4_flow"],
        ETH_P_IPV6: ts["ipv6_flow"],
    }
    return ExportSession(protocol, 7, data, [], boot_wall_ns=boot_ms * 1_000_000, **kw)  # type: ignore[arg-type]


def mac_text(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def expected_nfdump(r: FlowRecord) -> dict[str, Any]:
    """What `nfdump -o json` must show for a flow we sent."""
    v4 = r.ethertype == ETH_P_IP
    exp: dict[str, Any] = {
        "in_packets": r.packets, "in_bytes": r.octets, "proto": r.protocol, "src_tos": r.tos,
        "first": r.start_ms, "last": r.end_ms, "direction": r.direction,
        "input_snmp": r.ingress_if, "output_snmp": r.egress_if, "src_vlan": r.vlan_id,
        "in_src_mac": mac_text(r.src_mac), "in_dst_mac": mac_text(r.dst_mac),
        ("src4_addr" if v4 else "src6_addr"): addr16_to_str(r.src_addr),
        ("dst4_addr" if v4 else "dst6_addr"): addr16_to_str(r.dst_addr),
    }  # fmt: skip
    if r.protocol in (1, 58):
        exp.update(icmp_type=r.dst_port >> 8, icmp_code=r.dst_port & 0xFF)
    else:
        exp.update(src_port=r.src_port, dst_port=r.dst_port, tcp_flags=r.tcp_flags)
    return exp


def shown(flow: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """nfdump's values for `keys` (absent ones marked)."""
    return {k: flow.get(k, "<absent>") for k in keys}


def send_all(port: int, datagrams: list[bytes]) -> None:
    with UdpTransport("127.0.0.1", port) as t:
        for d in datagrams:
            assert t.send(d), t.errors


def icmpv6_extra(records: list[FlowRecord]) -> list[FlowRecord]:
    """Add an ICMPv6 echo request (type 128 code 0) to the known flows."""
    return [*records, dataclasses.replace(records[4], protocol=58, src_port=0, dst_port=128 * 256, packets=99)]


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_every_field_decodes_in_nfdump(nfcapd: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str) -> None:
    records = icmpv6_extra(known_flows)
    boot_ms = base_ms - 3_600_000 + 123  # odd boot time: v9 uptime arithmetic must still be exact
    session = make_session(protocol, boot_ms)
    collector = nfcapd()
    send_all(collector.port, wire(session.messages(records_to_batch(records), (base_ms + 2_345) * 1_000_000)))
    time.sleep(DELIVERY_S)
    flows = collector.stop()
    assert len(flows) == len(records), collector.log_text()
    by_packets = {f["in_packets"]: f for f in flows}
    for r in records:
        exp = expected_nfdump(r)
        assert shown(by_packets[r.packets], list(exp)) == exp
    assert "Sequence Errors: 0" in collector.log_text()


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_many_messages_all_records_arrive(nfcapd: Any, flow_factory: Any, base_ms: int, protocol: str) -> None:
    """3000 flows -> many MTU-sized messages; nfcapd counts no sequence error and stores them all."""
    template_flows = flow_factory(base_ms)
    records = [dataclasses.replace(template_flows[i % 5], packets=1000 + i) for i in range(3000)]
    session = make_session(protocol, base_ms - 60_000)
    collector = nfcapd()
    datagrams = wire(session.messages(records_to_batch(records), base_ms * 1_000_000))
    assert len(datagrams) > 30 and max(len(d) for d in datagrams) <= 1452
    with UdpTransport("127.0.0.1", collector.port) as t:
        for d in datagrams:
            assert t.send(d)
            time.sleep(0.0005)  # stay under nfcapd's default socket buffer
    time.sleep(DELIVERY_S)
    flows = collector.stop()
    assert sorted(f["in_packets"] for f in flows) == [1000 + i for i in range(3000)]
    assert "Sequence Errors: 0" in collector.log_text()


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_restarted_nfcapd_decodes_again_after_template_refresh(
    nfcapd: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    """RFC 7011 8.4 / RFC 3954 7: over UDP a restarted collector has lost the templates; data sent
    before the next refresh is undecodable, data after it decodes."""
    session = make_session(protocol, base_ms - 60_000, template_refresh_s=10.0, template_refresh_messages=0)
    t0 = base_ms * 1_000_000
    first = nfcapd()
    port = first.port

    def batch(tag: int) -> Any:
        return records_to_batch([dataclasses.replace(r, packets=tag + i) for i, r in enumerate(known_flows)])

    send_all(port, wire(session.messages(batch(100), t0)))  # templates + data
    time.sleep(DELIVERY_S)
    assert sorted(f["in_packets"] for f in first.stop()) == [100, 101, 102, 103, 104]

    second = nfcapd(port=port)  # same port: the exporter does not know the collector restarted
    before = wire(session.messages(batch(200), t0 + 5_000_000_000))  # refresh not due: data only
    assert session.stats.template_refreshes == 1
    send_all(port, before)
    after = wire(session.messages(batch(300), t0 + 10_000_000_000))  # refresh due: templates first
    assert session.stats.template_refreshes == 2
    send_all(port, after)
    time.sleep(DELIVERY_S)
    assert sorted(f["in_packets"] for f in second.stop()) == [300, 301, 302, 303, 304]


# -- the daemon's arrangement: options refresh + flows, and nfdump's sequence rule ---------------------
def sequence_errors(log: str) -> int:
    m = re.search(r"Sequence Errors: (\d+)", log)
    assert m, log
    return int(m.group(1))


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_refresh_then_flows_every_field_and_no_sequence_error(
    nfcapd: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    """Start-up as the daemon does it: the options refresh first, then flows."""
    records = icmpv6_extra(known_flows)
    boot_ms = base_ms - 3_600_000 + 123
    collector = nfcapd()
    exporter = make_exporter(protocol, boot_ms, collector.port)
    try:
        send_refresh_then_flows(exporter, records, (base_ms + 2_345) * 1_000_000)
    finally:
        exporter.close()
    time.sleep(DELIVERY_S)
    flows = collector.stop()
    by_packets = {f["in_packets"]: f for f in flows}
    assert len(flows) == len(by_packets) == len(records), collector.log_text()
    for r in records:
        exp = expected_nfdump(r)
        assert shown(by_packets[r.packets], list(exp)) == exp
    assert sequence_errors(collector.log_text()) == 0


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_nfdump_sequence_check_leaves_options_records_out(
    nfcapd: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    """nfdump 1.7 (src/netflow/ipfix.c, v1.7.1 to master) adds only flow Data Records to its expected
    IPFIX sequence (Process_ipfix_data: PacketSequence++), never options records, and reports a mismatch
    once it has seen flow data.  RFC 7011 3.1 counts options records too, as ipfixer does (checked with
    ipfixer's decoder): so every options refresh after the first flow data is one nfcapd 'sequence error',
    and no flow is lost.  NetFlow v9 numbers packets, and nfcapd counts none there."""
    collector = nfcapd()
    exporter = make_exporter(protocol, base_ms - 60_000, collector.port)
    decoder_view = scenario_session(protocol, base_ms - 60_000)  # the same arrangement, decoded here
    now_ns = base_ms * 1_000_000
    refreshes = 3
    try:
        for i in range(refreshes):
            exporter.export(records_to_batch(tagged(known_flows, 100 * (i + 1))), now_ns)
            exporter.export_options_refresh(now_ns, sampling=SAMPLING, interfaces=INTERFACES)
        exporter.export(records_to_batch(tagged(known_flows, 1000)), now_ns)
    finally:
        exporter.close()
    time.sleep(DELIVERY_S)
    flows = collector.stop()
    assert len(flows) == 5 * (refreshes + 1)
    errors = sequence_errors(collector.log_text())
    assert errors == (refreshes if protocol == "ipfix" else 0)
    if protocol == "ipfix":  # and ipfixer's numbers are RFC 7011 3.1's: options records counted
        d = Decoder()
        msgs = []
        for _ in range(refreshes):
            msgs += [d.feed(m.data) for m in decoder_view.messages(records_to_batch(known_flows), now_ns)]
            msgs += [d.feed(m.data) for m in decoder_view.options_messages(
                [("options_sampling", [{"observationDomainId": 7, **SAMPLING}])], now_ns)]  # fmt: skip
        before = 0
        for m in msgs:
            assert m.sequence == before
            before += len(m.records)


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_restarted_nfcapd_decodes_the_next_message_after_econnrefused(
    nfcapd: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    """The refresh interval is long: only the failed send can make the next message carry templates."""
    first = nfcapd()
    port = first.port
    exporter = make_exporter(protocol, base_ms - 60_000, port, template_refresh_s=3600, template_refresh_messages=0)
    now_ns = base_ms * 1_000_000
    try:
        send_refresh_then_flows(exporter, tagged(known_flows, 100), now_ns)
        time.sleep(DELIVERY_S)
        assert sorted(f["in_packets"] for f in first.stop()) == [100, 101, 102, 103, 104]
        second = restart_round(exporter, known_flows, now_ns, lambda: None, lambda: nfcapd(port=port))
    finally:
        exporter.close()
    time.sleep(DELIVERY_S)
    assert sorted(f["in_packets"] for f in second.stop()) == [900, 901, 902, 903, 904]
