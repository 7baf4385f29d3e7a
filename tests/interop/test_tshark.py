"""ipfixer -> real UDP on lo -> tshark's cflow dissector: every field of every record, and the message
headers (sequence numbers, domain / source id, v9 count and sysUptime), decode to what we sent."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ipfixer.export import Exporter, ExportSession, UdpTransport
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, addr16_to_str, records_to_batch
from ipfixer.templates import load_templates
from tests.collectors import wire
from tests.interop.scenarios import make_session as shipped_session

pytestmark = pytest.mark.interop


def make_session(protocol: str, boot_ms: int, max_message_size: int = 300) -> ExportSession:
    ts = load_templates()
    return ExportSession(
        protocol,  # type: ignore[arg-type]
        7,
        {ETH_P_IP: ts["ipv4_flow"], ETH_P_IPV6: ts["ipv6_flow"]},
        [ts["options_exporter_stats"], ts["options_sampling"]],
        max_message_size=max_message_size,  # 300: the 5 flows span several messages
        boot_wall_ns=boot_ms * 1_000_000,
    )


def tshark_abs_ms(text: str) -> int:
    """'Nov 28, 2026 22:27:58.034000000 UTC' -> Unix ms."""
    day, frac = text.removesuffix(" UTC").rsplit(".", 1)
    dt = datetime.strptime(day, "%b %d, %Y %H:%M:%S").replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1000 + int(frac[:3])


def seconds_to_ms(text: str) -> int:
    return int(Decimal(text) * 1000)


def expected_tshark(r: FlowRecord, protocol: str, boot_ms: int) -> dict[str, Any]:
    v4 = r.ethertype == ETH_P_IP
    exp: dict[str, Any] = {
        ("cflow.srcaddr" if v4 else "cflow.srcaddrv6"): addr16_to_str(r.src_addr),
        ("cflow.dstaddr" if v4 else "cflow.dstaddrv6"): addr16_to_str(r.dst_addr),
        "cflow.srcport": r.src_port, "cflow.dstport": r.dst_port, "cflow.protocol": r.protocol,
        "cflow.tcpflags": r.tcp_flags, "cflow.tos": r.tos, "cflow.octets": r.octets, "cflow.packets": r.packets,
        "cflow.direction": r.direction, "cflow.inputint": r.ingress_if, "cflow.outputint": r.egress_if,
        "cflow.srcmac": r.src_mac.hex(":"), "cflow.dstmac": r.dst_mac.hex(":"),
        "cflow.ethernet_type": r.ethertype, "cflow.vlanid": r.vlan_id, "cflow.flow_end_reason": r.end_reason,
    }  # fmt: skip
    if protocol == "ipfix":  # flowStart/EndMilliseconds: absolute
        exp.update({"abstimestart": r.start_ms, "abstimeend": r.end_ms})
    else:  # FIRST/LAST_SWITCHED: ms since the exporter booted (RFC 3954 8)
        exp.update({"timestart": r.start_ms - boot_ms, "timeend": r.end_ms - boot_ms})
    return exp


def decoded(flow: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """tshark's strings for `keys` turned into the numbers/text we sent."""
    times = flow.get("cflow.timedelta_tree", {})
    out: dict[str, Any] = {}
    for k in keys:
        if k in ("abstimestart", "abstimeend"):
            out[k] = tshark_abs_ms(times[f"cflow.{k}"]) if f"cflow.{k}" in times else "<absent>"
        elif k in ("timestart", "timeend"):
            out[k] = seconds_to_ms(times[f"cflow.{k}"]) if f"cflow.{k}" in times else "<absent>"
        else:
            v = flow.get(k, "<absent>")
            if isinstance(v, str) and not k.endswith(("addr", "addrv6", "mac")):
                v = int(v, 16) if v.startswith("0x") else int(v)
            out[k] = v
    return out


def send_all(port: int, datagrams: list[bytes]) -> None:
    with UdpTransport("127.0.0.1", port) as t:
        for d in datagrams:
            assert t.send(d), t.errors


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_every_field_and_header_decodes_in_tshark(
    tshark: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    boot_ms = base_ms - 3_600_000 + 123
    session = make_session(protocol, boot_ms)
    now_ms = base_ms + 2_345
    datagrams = wire(session.messages(records_to_batch(known_flows), now_ms * 1_000_000))
    assert len(datagrams) >= 3 and all(len(d) <= 300 for d in datagrams)
    cap = tshark(len(datagrams))
    send_all(cap.port, datagrams)
    flows = cap.finish()
    assert len(cap.packets) == len(datagrams)

    assert len(flows) == len(known_flows)
    for r, f in zip(known_flows, flows, strict=True):  # one template per family, in template order: v4 first
        exp = expected_tshark(r, protocol, boot_ms)
        assert decoded(f, list(exp)) == exp

    # headers: IPFIX sequence = data records before (RFC 7011 3.1); v9 = packets before (RFC 3954 5.1)
    per_packet = []
    for p in cap.packets:
        n = [0]

        def count(node: Any, n: list[int] = n) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    n[0] += k.startswith("Flow ") and isinstance(v, dict)
                    count(v)

        count(p)
        per_packet.append(n[0])
    assert sum(per_packet) == len(known_flows)
    seqs = [int(p["cflow.sequence"]) for p in cap.packets]
    if protocol == "ipfix":
        assert seqs == [sum(per_packet[:i]) for i in range(len(per_packet))]
        assert {p["cflow.od_id"] for p in cap.packets} == {"7"}
        assert {int(p["cflow.timestamp_tree"]["cflow.exporttime"]) for p in cap.packets} == {now_ms // 1000}
    else:
        assert seqs == list(range(len(datagrams)))
        assert {p["cflow.source_id"] for p in cap.packets} == {"7"}
        # count = template records (the 2 data templates in the first packet; options templates travel
        # with options data only) + data records
        assert [int(p["cflow.count"]) for p in cap.packets] == [per_packet[0] + 2] + per_packet[1:]
        # RFC 3954 5.1: the instant of leaving, rounded up to the whole second UNIX Secs states
        uptime = {seconds_to_ms(p["cflow.sysuptime"]) for p in cap.packets}
        assert uptime == {-(-now_ms // 1000) * 1000 - boot_ms}
        assert {int(p["cflow.timestamp_tree"]["cflow.unix_secs"]) for p in cap.packets} == {-(-now_ms // 1000)}


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_options_records_decode_in_tshark(tshark: Any, base_ms: int, protocol: str) -> None:
    session = make_session(protocol, base_ms - 60_000, max_message_size=1452)
    now = base_ms * 1_000_000
    stats = {
        "observationDomainId": 7, "meteringProcessId": 4242, "exportedMessageTotalCount": 11,
        "exportedFlowRecordTotalCount": 222, "exportedOctetTotalCount": 3333, "ignoredPacketTotalCount": 4,
        "ignoredOctetTotalCount": 5, "notSentFlowTotalCount": 6, "systemInitTimeMilliseconds": base_ms - 60_000,
    }  # fmt: skip
    sampling = {"observationDomainId": 7, "samplingInterval": 100, "samplingAlgorithm": 1,
                "samplingPacketInterval": 1, "samplingPacketSpace": 99}  # fmt: skip
    datagrams = wire(session.options_messages([("options_exporter_stats", [stats])], now))
    datagrams += wire(session.options_messages([("options_sampling", [sampling])], now))
    cap = tshark(len(datagrams))
    send_all(cap.port, datagrams)
    flows = cap.finish()
    assert len(flows) == 2
    s, smp = flows
    assert {k: s[k] for k in ("cflow.packetsexp", "cflow.flowsexp", "cflow.octetsexp", "cflow.ignore_packets",
                              "cflow.ignore_octets", "cflow.notsent_flows")} == {
        "cflow.packetsexp": "11", "cflow.flowsexp": "222", "cflow.octetsexp": "3333",
        "cflow.ignore_packets": "4", "cflow.ignore_octets": "5", "cflow.notsent_flows": "6",
    }  # fmt: skip
    assert tshark_abs_ms(s["cflow.sys_init_time"]) == base_ms - 60_000
    assert {k: smp[k] for k in ("cflow.sampling_interval", "cflow.sampling_algorithm",
                                "cflow.sampling_packet_interval", "cflow.sampling_packet_space")} == {
        "cflow.sampling_interval": "100", "cflow.sampling_algorithm": "1",
        "cflow.sampling_packet_interval": "1", "cflow.sampling_packet_space": "99",
    }  # fmt: skip
    if protocol == "ipfix":  # scope fields as IPFIX elements (RFC 7011 3.4.2.2)
        assert (s["cflow.od_id"], s["cflow.mp_id"], smp["cflow.od_id"]) == ("7", "4242", "7")
    else:  # v9 scope: observationDomainId and meteringProcessId both as System scope (RFC 3954 6.1)
        assert (s["cflow.scope_system"], s["cflow.scope_system#2"]) == ("00:00:00:07", "00:00:10:92")
        assert smp["cflow.scope_system"] == "00:00:00:07"
    # options data records count in the IPFIX sequence number (RFC 7011 3.1); v9 counts packets
    assert [int(p["cflow.sequence"]) for p in cap.packets] == [0, 1]


# -- the example template with interfaceName (IE 82) filled from the observation interface ------------
EXAMPLES = Path(__file__).resolve().parents[2] / "templates" / "examples"


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_interface_name_in_data_records_decodes_in_tshark(
    tshark: Any, known_flows: list[FlowRecord], base_ms: int, protocol: str
) -> None:
    """templates/examples/ipv*_flow_ifname.yaml through the Exporter as the daemon drives it: the names of
    its interface table fill each record's interfaceName from the record's observation ifindex."""
    ex = load_templates(EXAMPLES)
    session = shipped_session(protocol, base_ms - 60_000,
                              data={ETH_P_IP: ex["ipv4_flow_ifname"], ETH_P_IPV6: ex["ipv6_flow_ifname"]})
    names = {2: "lo-ipfx-h1", 3: "eth0", 4: "veth0ipfxh1"}
    records = [dataclasses.replace(r, ifindex=2 + i % 3) for i, r in enumerate(known_flows)]
    cap = tshark(2)  # the options refresh, then one flow message
    exporter = Exporter([("t", session, UdpTransport("127.0.0.1", cap.port))], metering_process_id=1)
    try:
        exporter.export_options_refresh(base_ms * 1_000_000, interfaces=names)
        exporter.export(records_to_batch(records), base_ms * 1_000_000)
    finally:
        exporter.close()
    flows = [f for f in cap.finish() if "cflow.packets" in f]
    assert [(int(f["cflow.packets"]), f["cflow.if_name"]) for f in flows] == [
        (r.packets, names[r.ifindex]) for r in records]  # fmt: skip


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_one_refresh_in_one_message_decodes_in_tshark(tshark: Any, base_ms: int, protocol: str) -> None:
    """The daemon's options refresh (statistics, sampling, interface table) is one message holding one
    Options Template Set per template and the three kinds of records, each field as sent."""
    session = shipped_session(protocol, base_ms - 60_000)
    cap = tshark(1)
    exporter = Exporter([("t", session, UdpTransport("127.0.0.1", cap.port))], metering_process_id=4242)
    names = {3: "eth0", 17: "veth-ipfx-h1"}
    sampling = {"samplingInterval": 64, "samplingAlgorithm": 2, "samplingPacketInterval": 1, "samplingPacketSpace": 63}
    try:
        exporter.export_options_refresh(base_ms * 1_000_000, sampling=sampling, interfaces=names, ignored_packets=9)
    finally:
        exporter.close()
    records = cap.finish()
    assert len(cap.packets) == 1 and len(records) == 4
    stats, smp, *ifaces = records
    assert (stats["cflow.packetsexp"], stats["cflow.flowsexp"], stats["cflow.ignore_packets"]) == ("0", "0", "9")
    assert tshark_abs_ms(stats["cflow.sys_init_time"]) == base_ms - 60_000
    assert (smp["cflow.sampling_interval"], smp["cflow.sampling_algorithm"], smp["cflow.sampling_packet_space"]) == (
        "64", "2", "63")  # fmt: skip
    assert [f["cflow.if_name"] for f in ifaces] == ["eth0", "veth-ipfx-h1"]
    if protocol == "ipfix":
        assert [int(f["cflow.inputint"]) for f in ifaces] == [3, 17]
    else:  # v9 interface scope (RFC 3954 6.1)
        assert [int(f["cflow.scope_interface"]) for f in ifaces] == [3, 17]
