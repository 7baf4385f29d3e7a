"""ipfixer -> real UDP -> pmacct nfacctd 1.7.7 (Debian 12 `pmacct`, print plugin, JSON): every record of
every data template with every field nfacctd prints equal to what was sent, after an options refresh
(statistics, sampling, interface table) as the daemon sends it, its sampling record read back (nfacctd's
sampling_rate primitive), nothing logged as malformed, and a restarted nfacctd decoding again with the
next message.

Two pmacct 1.7.7 readings, from its source (src/pkt_handlers.c, tag v1.7.7), are part of the expectation:
- NetFlow v9 times are whole seconds: time_start.tv_sec = unix_secs - (SysUptime - FIRST_SWITCHED) / 1000
  (integer division, no milliseconds); IPFIX flowStart/EndMilliseconds keep the milliseconds.
- NF_vlan_handler reads vlanId (58) only for ingress records (flowDirection 0); for egress ones it reads
  postVlanId (59), which ipfixer does not send, so those show vlan 0.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from ipfixer.export import ExportSession, UdpTransport
from ipfixer.model import FlowRecord, addr16_to_str
from ipfixer.templates import load_templates
from ipfixer.wire import ipfix
from tests.collectors import wire
from tests.interop.scenarios import make_exporter, restart_scenario, send_refresh_then_flows

pytestmark = pytest.mark.interop

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}
SAMPLING_64 = {"samplingInterval": 64, "samplingAlgorithm": 2, "samplingPacketInterval": 1, "samplingPacketSpace": 63}


def v9_seconds(ms: int, export_secs: int, boot_ms: int) -> int:
    """pmacct 1.7.7's v9 arithmetic on the header ipfixer sends (sysUptime at export_secs)."""
    uptime = export_secs * 1000 - boot_ms
    return export_secs - (uptime - (ms - boot_ms)) // 1000


def expected_pmacct(r: FlowRecord, protocol: str, export_secs: int, boot_ms: int) -> dict[str, Any]:
    if protocol == "ipfix":
        start, end = f"{r.start_ms / 1000:.6f}", f"{r.end_ms / 1000:.6f}"
    else:
        start = f"{v9_seconds(r.start_ms, export_secs, boot_ms)}.000000"
        end = f"{v9_seconds(r.end_ms, export_secs, boot_ms)}.000000"
    return {
        "mac_src": r.src_mac.hex(":"), "mac_dst": r.dst_mac.hex(":"),
        "vlan": r.vlan_id if r.direction == 0 else 0, "etype": f"{r.ethertype:x}",
        "iface_in": r.ingress_if, "iface_out": r.egress_if,
        "ip_src": addr16_to_str(r.src_addr), "ip_dst": addr16_to_str(r.dst_addr),
        "port_src": r.src_port, "port_dst": r.dst_port, "tcp_flags": str(r.tcp_flags),
        "ip_proto": PROTO_NAMES[r.protocol], "tos": r.tos, "timestamp_start": start, "timestamp_end": end,
        "packets": r.packets, "bytes": r.octets,
    }  # fmt: skip


def with_icmpv6(records: list[FlowRecord]) -> list[FlowRecord]:
    import dataclasses

    return [*records, dataclasses.replace(records[4], protocol=58, src_port=0, dst_port=128 * 256, packets=99)]


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_every_field_at_nfacctd_after_an_options_refresh(
    nfacctd: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    records = with_icmpv6(known_flows)
    boot_ms = base_ms - 3_600_000 + 123
    now_ms = base_ms + 2_345
    collector = nfacctd()
    exporter = make_exporter(protocol, boot_ms, collector.port)
    try:
        send_refresh_then_flows(exporter, records, now_ms * 1_000_000, sampling=SAMPLING_64)
        rows = collector.flows(len(records))
    finally:
        exporter.close()
    export_secs = -(-now_ms // 1000)
    by_packets = {row["packets"]: row for row in rows}
    assert len(rows) == len(by_packets) == len(records), (rows, collector.log_text())
    for r in records:
        exp = expected_pmacct(r, protocol, export_secs, boot_ms)
        exp["sampling_rate"] = 64  # from the options refresh's sampling record: options data decoded
        assert {k: by_packets[r.packets].get(k, "<absent>") for k in exp} == exp
    log = collector.log_text()
    assert "malformed" not in log and "ERROR" not in log and "WARN" not in log, log


def test_nfacctd_1_7_7_misreads_a_set_of_several_options_templates(nfacctd: Any, base_ms: int) -> None:
    """Evidence for one-record-per-set: the form RFC 7011 3.4.2.2 also allows (two Options Template
    Records in one set) is logged as malformed by this nfacctd, the form ipfixer sends is not."""
    ts = load_templates()
    opts = [ts["options_exporter_stats"], ts["options_sampling"]]
    collector = nfacctd()
    both = ipfix.encode_message(base_ms // 1000, 0, 9, [ipfix.encode_options_template_set(opts)])
    with UdpTransport("127.0.0.1", collector.port) as t:
        assert t.send(both)
        deadline = time.monotonic() + 10
        while "malformed" not in collector.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "unable to read Options Template Flowset (malformed)" in collector.log_text()
        session = ExportSession("ipfix", 10, {}, opts, boot_wall_ns=0)
        before = collector.log_text().count("malformed")
        for m in wire(session.options_messages([(opts[1], [{"observationDomainId": 10, "samplingInterval": 1}])],
                                               base_ms * 1_000_000)):  # fmt: skip
            assert t.send(m)
        time.sleep(1.5)
    assert collector.log_text().count("malformed") == before


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_restarted_nfacctd_decodes_the_next_message(
    nfacctd: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    before, rows, second = restart_scenario(protocol, known_flows, base_ms, nfacctd,
                                            lambda c, n: [r["packets"] for r in c.flows(n)])
    assert sorted(before) == [100, 101, 102, 103, 104]
    assert sorted(rows) == [900, 901, 902, 903, 904], second.log_text()
