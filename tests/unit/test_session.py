"""ExportSession / Exporter / UdpTransport: message size, packing, sequence numbers, template refresh,
options records and a dead collector, checked by decoding what was produced (ipfixer.wire.decode)
and, for the transport, with real UDP sockets on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Any

import pytest

from ipfixer.clock import FakeClock
from ipfixer.errors import EncodeError, TransportError
from ipfixer.export import Exporter, ExportSession, UdpTransport, flow_columns, flow_values
from ipfixer.infomodel import InfoModel
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, addr16_to_str, records_to_batch, to_addr16
from ipfixer.templates import Template, TemplateField, load_templates
from ipfixer.wire.decode import DecodedMessage, Decoder
from tests.collectors import wire

TEMPLATES = load_templates()
V4, V6 = TEMPLATES["ipv4_flow"], TEMPLATES["ipv6_flow"]
STATS, SAMPLING = TEMPLATES["options_exporter_stats"], TEMPLATES["options_sampling"]
PROTOCOLS = ["ipfix", "netflow9"]
HEADER = {"ipfix": 16, "netflow9": 20}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall=1_800_000_000_250_000_000)  # .25 s past a whole second


def boot_of(clock: FakeClock) -> int:
    return clock.wall_ns() - 3_600_123_000_000  # booted an hour (and 123 ms) ago


def session(protocol: str, clock: FakeClock, **kw: Any) -> ExportSession:
    kw.setdefault("options_templates", [STATS, SAMPLING])
    proto: Any = protocol
    return ExportSession(proto, 7, {ETH_P_IP: V4, ETH_P_IPV6: V6}, boot_wall_ns=boot_of(clock), **kw)


def flows(n: int, now_ms: int) -> list[FlowRecord]:
    """n distinct flows, alternating IPv4 TCP / IPv6 UDP; packets = 1000 + i identifies each."""
    out = []
    for i in range(n):
        v6 = i % 2 == 1
        out.append(
            FlowRecord(
                ethertype=ETH_P_IPV6 if v6 else ETH_P_IP, direction=i % 2, vlan_id=i % 4095,
                src_mac=bytes([2, 0, 0, 0, i >> 8 & 255, i & 255]), dst_mac=bytes([2, 1, 0, 0, 0, i & 255]),
                src_addr=to_addr16(f"2001:db8::{i:x}" if v6 else f"10.0.{i >> 8 & 255}.{i & 255}"),
                dst_addr=to_addr16("2001:db8:1::1" if v6 else "192.0.2.1"),
                src_port=1024 + i, dst_port=443, protocol=17 if v6 else 6, packets=1000 + i, octets=64 * (i + 1),
                start_ms=now_ms - 10_000 + i, end_ms=now_ms - 1_000 + i, tcp_flags=0 if v6 else 0x12,
                tos=i & 0xFC, end_reason=1 + i % 4, ingress_if=2, egress_if=3 + i % 5,
            )
        )
    return out


def expected(r: FlowRecord, protocol: str, boot_ms: int) -> dict[str, Any]:
    """The decoded fields of a record, written independently of export/mapping.py."""
    v6 = r.ethertype == ETH_P_IPV6
    fam = "IPv6" if v6 else "IPv4"
    addr = ipaddress.IPv6Address if v6 else ipaddress.IPv4Address
    e = {
        f"source{fam}Address": addr(addr16_to_str(r.src_addr)),
        f"destination{fam}Address": addr(addr16_to_str(r.dst_addr)),
        "sourceTransportPort": r.src_port, "destinationTransportPort": r.dst_port,
        "protocolIdentifier": r.protocol, "tcpControlBits": r.tcp_flags, "ipClassOfService": r.tos,
        "octetDeltaCount": r.octets, "packetDeltaCount": r.packets, "flowDirection": r.direction,
        "ingressInterface": r.ingress_if, "egressInterface": r.egress_if,
        "sourceMacAddress": r.src_mac.hex(":"), "destinationMacAddress": r.dst_mac.hex(":"),
        "ethernetType": r.ethertype, "vlanId": r.vlan_id, "flowEndReason": r.end_reason,
    }  # fmt: skip
    icmp = r.dst_port if r.protocol in (1, 58) else 0  # type*256+code, 0 for other protocols
    if protocol == "ipfix":
        e.update(flowStartMilliseconds=r.start_ms, flowEndMilliseconds=r.end_ms)
        e[f"icmpTypeCode{fam}"] = icmp
    else:  # RFC 3954 8: FIRST/LAST_SWITCHED relative to sysUptime
        e.update(flowStartSysUpTime=r.start_ms - boot_ms, flowEndSysUpTime=r.end_ms - boot_ms)
        e["icmpTypeCodeIPv4"] = icmp  # v9 has one ICMP_TYPE element (32) for both families
    return e


def decode_all(datagrams: list[bytes]) -> list[DecodedMessage]:
    d = Decoder()
    return [d.feed(x, source="exporter") for x in datagrams]


def data_records(msgs: list[DecodedMessage]) -> list[Any]:
    return [r for m in msgs for r in m.records if not r.is_options]


# -- size limit, no split, exact values ---------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("max_size", [300, 577, 1452, 8972])
def test_messages_never_exceed_limit_and_every_record_arrives_intact(
    clock: FakeClock, protocol: str, max_size: int
) -> None:
    s = session(protocol, clock, max_message_size=max_size)
    recs = flows(1000, clock.wall_ns() // 1_000_000)
    datagrams = wire(s.messages(records_to_batch(recs), clock.wall_ns()))
    assert max(len(d) for d in datagrams) <= max_size
    msgs = decode_all(datagrams)  # the decoder raises on any record cut across a boundary
    got = {r.fields["packetDeltaCount"]: r.fields for r in data_records(msgs)}
    assert len(got) == len(recs) == len(data_records(msgs))
    boot_ms = boot_of(clock) // 1_000_000
    for r in recs:
        assert got[r.packets] == expected(r, protocol, boot_ms)
    assert s.stats.records == s.stats.flow_records == 1000
    assert s.stats.messages == len(datagrams) and s.stats.bytes == sum(map(len, datagrams))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_message_holds_as_many_records_as_fit(clock: FakeClock, protocol: str) -> None:
    """Only IPv4 flows, one template: every message but the last is full to within one record."""
    s = session(protocol, clock, max_message_size=1452, options_templates=[])
    recs = [r for r in flows(600, clock.wall_ns() // 1_000_000) if r.ethertype == ETH_P_IP]
    datagrams = wire(s.messages(records_to_batch(recs), clock.wall_ns()))
    length = s.data_templates[V4.template_id].record_length
    assert length is not None
    msgs = decode_all(datagrams)
    per_msg = [len(m.records) for m in msgs]
    first_free = 1452 - HEADER[protocol] - (len(datagrams[0]) - HEADER[protocol] - 4 - per_msg[0] * length) - 4
    assert per_msg[0] == first_free // length  # after the template set
    full = (1452 - HEADER[protocol] - 4) // length
    assert per_msg[1:-1] == [full] * (len(per_msg) - 2)
    assert 1 <= per_msg[-1] <= full and sum(per_msg) == len(recs)


# -- sequence numbers ---------------------------------------------------------------------------------
def test_ipfix_sequence_counts_data_records_before_the_message(clock: FakeClock) -> None:
    """RFC 7011 3.1 / 10.3.2: options data records count, template records do not."""
    s = session("ipfix", clock, max_message_size=512)
    out = wire(s.messages(records_to_batch(flows(50, clock.wall_ns() // 1_000_000)), clock.wall_ns()))
    out += wire(s.options_messages([("options_sampling", [{"observationDomainId": 7, "samplingInterval": 1}])], clock.wall_ns()))
    out += wire(s.messages(records_to_batch(flows(7, clock.wall_ns() // 1_000_000)), clock.wall_ns()))
    msgs = decode_all(out)
    before = 0
    for m in msgs:
        assert (m.version, m.domain_id, m.sequence) == (10, 7, before)
        assert m.export_time == clock.wall_ns() // 1_000_000_000
        before += len(m.records)
    assert before == 58 and s.sequence == 58


def test_ipfix_sequence_wraps_modulo_2_32(clock: FakeClock) -> None:
    s = session("ipfix", clock)
    s._sequence = 2**32 - 3  # white-box: reaching it honestly takes 4 billion records
    msgs = decode_all(wire(s.messages(records_to_batch(flows(5, clock.wall_ns() // 10**6)), clock.wall_ns())))
    assert msgs[0].sequence == 2**32 - 3 and s.sequence == 2


def test_netflow9_sequence_counts_packets_and_count_includes_templates(clock: FakeClock) -> None:
    """RFC 3954 5.1: sequence = packets sent before; count = template + data records in the packet."""
    s = session("netflow9", clock, max_message_size=512)
    now_ms = clock.wall_ns() // 1_000_000
    out = wire(s.messages(records_to_batch(flows(40, now_ms)), clock.wall_ns()))
    out += wire(s.options_messages([("options_sampling", [{"observationDomainId": 7, "samplingInterval": 1}])], clock.wall_ns()))
    msgs = decode_all(out)
    assert [m.sequence for m in msgs] == list(range(len(out)))
    assert [m.count for m in msgs] == [len(m.records) + len(m.templates) for m in msgs]
    # data templates with the first flow packet; options templates only with the options data (last)
    assert [t.template_id for t in msgs[0].templates] == [256, 257] and all(not m.templates for m in msgs[1:-1])
    assert [t.template_id for t in msgs[-1].templates] == [258, 259] and msgs[-1].records[0].is_options
    boot_ms = boot_of(clock) // 1_000_000
    for m in msgs:  # RFC 3954 5.1: the instant of leaving, rounded up to whole seconds; sysUptime at it
        assert m.export_time == -(-clock.wall_ns() // 1_000_000_000)
        assert m.sys_uptime == m.export_time * 1000 - boot_ms


# -- template refresh ---------------------------------------------------------------------------------
def templates_per_message(s: ExportSession, clock: FakeClock, n_messages: int, step_ns: int) -> list[bool]:
    """Send one single-record message per step; which ones carried the Template Sets?"""
    d = Decoder()
    out = []
    for rec in flows(n_messages, clock.wall_ns() // 1_000_000):
        (dgram,) = wire(s.messages(records_to_batch([dataclasses.replace(rec, ethertype=ETH_P_IP)]), clock.wall_ns()))
        out.append(bool(d.feed(dgram).templates))
        clock.advance(step_ns)
    return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_template_refresh_by_time(clock: FakeClock, protocol: str) -> None:
    s = session(protocol, clock, template_refresh_s=30.0, template_refresh_messages=0)
    got = templates_per_message(s, clock, 10, 10_000_000_000)  # one message every 10 s
    assert got == [True, False, False, True, False, False, True, False, False, True]
    assert s.stats.template_refreshes == 4


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_template_refresh_by_message_count(clock: FakeClock, protocol: str) -> None:
    s = session(protocol, clock, template_refresh_s=0, template_refresh_messages=4)
    got = templates_per_message(s, clock, 10, 1_000_000)
    assert got == [True, False, False, False, True, False, False, False, True, False]


def test_template_only_message_when_idle_and_refresh_due(clock: FakeClock) -> None:
    s = session("ipfix", clock, template_refresh_s=5.0)
    assert len(wire(s.template_messages(clock.wall_ns()))) == 1  # nothing sent yet: due
    assert wire(s.template_messages(clock.wall_ns())) == []
    clock.advance(5_000_000_000)
    (msg,) = decode_all(wire(s.template_messages(clock.wall_ns())))
    # data templates only: options templates travel with options data (see test_options_*)
    assert {t.template_id for t in msg.templates} == {256, 257} and msg.records == []


# -- options records ------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_options_datagrams_decode(clock: FakeClock, protocol: str) -> None:
    s = session(protocol, clock)
    values = {"observationDomainId": 7, "samplingInterval": 100, "samplingAlgorithm": 1,
              "samplingPacketInterval": 1, "samplingPacketSpace": 99}  # fmt: skip
    (msg,) = decode_all(wire(s.options_messages([("options_sampling", [values, values])], clock.wall_ns())))
    assert len(msg.records) == 2 and all(r.is_options for r in msg.records)
    f = msg.records[0].fields
    assert (f["samplingInterval"], f["samplingAlgorithm"], f["samplingPacketInterval"], f["samplingPacketSpace"]) == (
        100, 1, 1, 99)  # fmt: skip
    assert s.stats.options_records == 2
    with pytest.raises(EncodeError, match="no options template 'nope'"):
        wire(s.options_messages([("nope", [values])], clock.wall_ns()))


# -- mapping and set-up errors ----------------------------------------------------------------------
def test_unmapped_element_is_an_error_at_construction(clock: FakeClock) -> None:
    e = InfoModel.load_default().by_name("bgpSourceAsNumber")
    bad = dataclasses.replace(V4, fields=(*V4.fields, TemplateField(e, 4)))
    with pytest.raises(EncodeError, match="'bgpSourceAsNumber'"):
        ExportSession("ipfix", 1, {ETH_P_IP: bad}, [], boot_wall_ns=0)


def test_rows_without_a_template_are_counted_not_exported(clock: FakeClock) -> None:
    s = ExportSession("ipfix", 1, {ETH_P_IP: V4}, [], boot_wall_ns=0)
    msgs = decode_all(wire(s.messages(records_to_batch(flows(10, 10**6)), clock.wall_ns())))
    assert len(data_records(msgs)) == 5 and s.stats.records_not_exported == 5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fast_path_and_record_path_give_identical_bytes(clock: FakeClock, protocol: str) -> None:
    recs = flows(300, clock.wall_ns() // 1_000_000)
    a = wire(session(protocol, clock).messages(records_to_batch(recs), clock.wall_ns()))
    b = wire(session(protocol, clock).record_messages(recs, clock.wall_ns()))
    assert a == b
    t: Template = session(protocol, clock).data_templates[V6.template_id]
    cols = flow_columns(records_to_batch(recs[1:2]), t, sys_boot_ms=boot_of(clock) // 1_000_000)
    vals = flow_values(recs[1], t, sys_boot_ms=boot_of(clock) // 1_000_000)
    assert {k: (bytes(v[0].tobytes()) if v.ndim == 2 else int(v[0])) for k, v in cols.items()} == vals


def test_netflow9_template_drops_enterprise_fields_and_reports_them(clock: FakeClock) -> None:
    s = ExportSession("netflow9", 1, {ETH_P_IP: TEMPLATES["ipv4_nat_flow"]}, [], boot_wall_ns=0)
    assert s.v9_dropped == {260: ["ctState", "ctMark", "ctZone", "cgroupId"]}
    names = [f.name for f in s.data_templates[260].fields]
    assert "flowStartSysUpTime" in names and "flowStartMilliseconds" not in names


# -- transport and fan-out over real sockets -----------------------------------------------------------
def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def receive_all(sock: socket.socket) -> list[bytes]:
    out = []
    sock.settimeout(1.0)
    while True:
        try:
            out.append(sock.recv(65535))
        except TimeoutError:
            return out


def test_unresolvable_collector_names_it() -> None:
    with pytest.raises(TransportError, match="no-such-host.invalid:4739"):
        UdpTransport("no-such-host.invalid", 4739)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dead_collector_counts_econnrefused_and_live_one_gets_everything(clock: FakeClock, protocol: str) -> None:
    live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    live.bind(("127.0.0.1", 0))
    live.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    dead_port = unused_udp_port()  # nothing listens: the kernel answers ICMP port unreachable
    boot_ms = boot_of(clock) // 1_000_000
    exporter = Exporter(
        [
            ("dead", session(protocol, clock), UdpTransport("127.0.0.1", dead_port)),
            ("live", session(protocol, clock), UdpTransport("127.0.0.1", live.getsockname()[1])),
        ],
        metering_process_id=4242,
    )
    try:
        sent = 0
        for _ in range(5):
            batch = records_to_batch(flows(100, clock.wall_ns() // 1_000_000))
            exporter.export(batch, clock.wall_ns())
            sent += len(batch)
            clock.advance(1_000_000_000)
        exporter.export_stats(clock.wall_ns(), ignored_packets=3)
        got = receive_all(live)
        msgs = decode_all(got)
        assert len(data_records(msgs)) == sent
        dead, ok = exporter.stats["dead"], exporter.stats["live"]
        assert dead.errors["ECONNREFUSED"] >= 1 and dead.error_count == dead.not_sent_messages
        assert dead.messages + dead.not_sent_messages == exporter.collectors[0].session.stats.messages
        assert ok.error_count == 0 and ok.messages == len(got) and ok.flow_records == sent
        stats_rec = next(r for m in msgs for r in m.records if r.is_options).fields
        assert stats_rec["exportedFlowRecordTotalCount"] == sent
        assert stats_rec["exportedMessageTotalCount"] == len(got) - 1  # the stats message itself not yet
        assert stats_rec["exportedOctetTotalCount"] == sum(map(len, got[:-1]))
        assert stats_rec["ignoredPacketTotalCount"] == 3 and stats_rec["notSentFlowTotalCount"] == 0
        values = exporter.stats_records(clock.wall_ns())["dead"][0]
        assert values["notSentFlowTotalCount"] == dead.not_sent_records > 0
        assert values["systemInitTimeMilliseconds"] == boot_ms
    finally:
        exporter.close()
        live.close()


def test_send_after_close_is_counted_not_raised() -> None:
    t = UdpTransport("127.0.0.1", unused_udp_port())
    t.close()
    assert t.send(b"x") is False and t.errors["ECLOSED"] == 1
    t.close()  # idempotent: still counted, never raised
    assert t.send(b"y") is False and t.errors["ECLOSED"] == 2 and t.last_error == "ECLOSED"
