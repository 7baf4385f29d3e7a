"""What goes in which message, for collectors seen to fail otherwise (issue 13):

- one Options Template Record per set (pmacct nfacctd 1.7.7 misreads a set holding several);
- options templates and options data never share a message with flow data sets, and the options records
  of one refresh travel together (python-netflow: no tiny stand-alone options message);
- no datagram is valid UTF-8 (python-netflow 0.12 parses a UTF-8 datagram as a hex dump and stops), built
  on purpose with a fixed clock so every byte of the worst case is ASCII;
- NetFlow v9: sysUptime >= every LAST_SWITCHED >= FIRST_SWITCHED in every packet (RFC 3954 5.1);
- after a failed send (ECONNREFUSED) the next message carries the templates (real UDP sockets).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from netflow.utils import parse_packet

from ipfixer.clock import FakeClock
from ipfixer.export import Exporter, ExportSession, UdpTransport
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, records_to_batch, to_addr16
from ipfixer.templates import load_templates
from ipfixer.wire.decode import Decoder
from tests.collectors import wire

TS = load_templates()
DATA = {ETH_P_IP: TS["ipv4_flow"], ETH_P_IPV6: TS["ipv6_flow"]}
OPTIONS = [TS["options_exporter_stats"], TS["options_sampling"], TS["options_interfaces"]]
PROTOCOLS = ["ipfix", "netflow9"]


def sets_of(msg: bytes) -> list[tuple[int, bytes]]:
    """(set id, body) of every set / FlowSet, walked independently of ipfixer's decoder."""
    version = struct.unpack_from("!H", msg)[0]
    off = 16 if version == 10 else 20
    out = []
    while off < len(msg):
        sid, length = struct.unpack_from("!HH", msg, off)
        assert length >= 4, (sid, length)
        out.append((sid, msg[off + 4 : off + length]))
        off += length
    assert off == len(msg)
    return out


def flow(i: int, now_ms: int, **kw: Any) -> FlowRecord:
    v6 = i % 2 == 1
    base: dict[str, Any] = dict(
        ethertype=ETH_P_IPV6 if v6 else ETH_P_IP, src_addr=to_addr16("2001:db8::1" if v6 else "10.0.0.1"),
        dst_addr=to_addr16("2001:db8::2" if v6 else "10.0.0.2"), src_port=1000 + i, dst_port=53, protocol=17,
        packets=100 + i, octets=1000 + i, start_ms=now_ms - 5000, end_ms=now_ms - 100, ifindex=2, ingress_if=2,
    )  # fmt: skip
    base.update(kw)
    return FlowRecord(**base)


def session(protocol: str, boot_ns: int, **kw: Any) -> ExportSession:
    kw.setdefault("options_templates", OPTIONS)
    return ExportSession(protocol, 7, DATA, boot_wall_ns=boot_ns, **kw)  # type: ignore[arg-type]


def refresh(s: ExportSession, now_ns: int, n_interfaces: int = 2) -> list[bytes]:
    """One options refresh as the daemon sends it: statistics, sampling and the interface table."""
    stats = {"observationDomainId": 7, "meteringProcessId": 42, "exportedMessageTotalCount": 3}
    sampling = {"observationDomainId": 7, "samplingInterval": 1, "samplingAlgorithm": 1}
    ifaces = [{"ingressInterface": i + 1, "interfaceName": f"veth{i}"} for i in range(n_interfaces)]
    return wire(s.options_messages([("options_exporter_stats", [stats]), ("options_sampling", [sampling]),
                                    ("options_interfaces", ifaces)], now_ns))  # fmt: skip


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_options_template_record_per_set_and_never_beside_flow_data(protocol: str) -> None:
    clock = FakeClock(wall=1_800_000_000_250_000_000)
    s = session(protocol, clock.wall_ns() - 10**12)
    now_ms = clock.wall_ns() // 10**6
    flow_msgs = wire(s.messages(records_to_batch([flow(i, now_ms) for i in range(300)]), clock.wall_ns()))
    opt_msgs = refresh(s, clock.wall_ns())
    options_tpl_set = 3 if protocol == "ipfix" else 1
    data_tpl_set = 2 if protocol == "ipfix" else 0
    option_ids = {t.template_id for t in OPTIONS}
    assert len(opt_msgs) == 1  # the whole refresh in one message
    for m in flow_msgs:
        ids = [sid for sid, _ in sets_of(m)]
        assert options_tpl_set not in ids and not option_ids & set(ids)
    assert sets_of(flow_msgs[0])[0][0] == data_tpl_set and all(
        sid >= 256 for m in flow_msgs[1:] for sid, _ in sets_of(m))  # fmt: skip
    opt_sets = sets_of(opt_msgs[0])
    assert not {sid for sid, _ in opt_sets} & set(DATA_IDS)  # no flow data set beside options data
    tpl_bodies = [body for sid, body in opt_sets if sid == options_tpl_set]
    assert len(tpl_bodies) == 3  # one set per options template ...
    for body, t in zip(tpl_bodies, OPTIONS, strict=True):  # ... holding exactly that one record
        if protocol == "ipfix":  # RFC 7011 3.4.2.2: id, field count, scope count, 4 bytes per field
            tid, count, scope = struct.unpack_from("!HHH", body)
            assert (tid, count, scope, len(body)) == (t.template_id, len(t.fields), t.scope_count, 6 + 4 * count)
        else:  # RFC 3954 6.1: id, scope length, option length (bytes), then padding to 32 bits
            tid, scope_len, opt_len = struct.unpack_from("!HHH", body)
            assert (tid, scope_len + opt_len) == (t.template_id, 4 * len(t.fields))
            assert body[6 + scope_len + opt_len :] == bytes(len(body) - 6 - scope_len - opt_len) and len(body) % 4 == 0
    msgs = [Decoder().feed(m) for m in opt_msgs]
    assert sorted(r.template_id for r in msgs[0].records) == [258, 259, 262, 262]


DATA_IDS = (256, 257)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_large_refresh_spans_messages_each_with_its_templates(protocol: str) -> None:
    clock = FakeClock(wall=1_800_000_000_000_000_000)
    s = session(protocol, clock.wall_ns() - 10**12, max_message_size=300)
    msgs = refresh(s, clock.wall_ns(), n_interfaces=40)
    assert len(msgs) > 1 and all(len(m) <= 300 for m in msgs)
    decoded = [Decoder().feed(m) for m in msgs]  # a fresh decoder per message: each stands alone
    assert all({t.template_id for t in d.templates} >= {258, 259, 262} for d in decoded)
    names = [r.fields["interfaceName"] for d in decoded for r in d.records if r.template_id == 262]
    assert names == [f"veth{i}" for i in range(40)]


# -- no valid UTF-8 datagram ------------------------------------------------------------------------
ASCII_WALL_S = 0x6B494A30  # 2027-01-..: every byte of the export time below 0x80


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_worst_case_all_ascii_messages_are_made_not_utf8(protocol: str) -> None:
    """A fixed clock whose export-time bytes are ASCII, sequence 0, an all-ASCII options template and
    record (the interface table alone) and an all-ASCII flow record: each would be a valid UTF-8 datagram,
    which python-netflow's collector parses as a hex dump; ipfixer adds the data Template Sets instead."""
    now_ns = ASCII_WALL_S * 10**9
    boot_ns = now_ns - 0x30303030 * 10**6  # v9 sysUptime bytes ASCII too
    s = session(protocol, boot_ns, options_templates=[TS["options_interfaces"]], template_refresh_s=0,
                template_refresh_messages=0)  # fmt: skip
    assert s.options_messages([], now_ns) == []
    body = s.dialect.options_template_sets([s.options_template("options_interfaces")])[0]
    assert body.decode("ascii")  # the options template set alone is pure ASCII
    (opt,) = s.options_messages([("options_interfaces", [{"ingressInterface": 2, "interfaceName": "eth0"}])], now_ns)
    assert not _utf8(opt.data) and opt.has_templates and opt.options
    data_tpl_set = 2 if protocol == "ipfix" else 0
    rest = b"".join(b for sid, b in sets_of(opt.data) if sid != data_tpl_set)
    header = opt.data[4 : 16 if protocol == "ipfix" else 20]  # time, sequence, domain: all ASCII here
    assert rest.decode("ascii") and header.decode("ascii")  # without the data templates: all ASCII
    # flow data: first message carries templates anyway; then one all-ASCII record without them
    ascii_ms = 0x0000_0030_3030_3030 + (boot_ns // 10**6 if protocol == "netflow9" else 0)
    ascii_ms = min(ascii_ms, now_ns // 10**6)
    rec = flow(0, 0, src_port=0x3030, dst_port=0x3030, packets=0x30, octets=0x30, start_ms=ascii_ms, end_ms=ascii_ms,
               ingress_if=0x30, egress_if=0x30, src_mac=b"000000", dst_mac=b"000000", vlan_id=0x30, end_reason=1)
    s.messages(records_to_batch([rec]), now_ns)  # templates go out (first message)
    (m,) = s.messages(records_to_batch([rec]), now_ns)
    assert m.has_templates and not _utf8(m.data)
    assert s.stats.utf8_messages == 0
    templates: dict[str, Any] = {"netflow": {}, "ipfix": {}}  # as netflow.collector passes it
    for d in (opt.data, m.data):  # python-netflow's own parser reads them as binary
        parsed = parse_packet(d, templates)
        assert parsed.header.version == (10 if protocol == "ipfix" else 9)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- v9 record times never after the packet's sysUptime --------------------------------------------
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    now_ms=st.integers(1_600_000_000_000, 1_900_000_000_000),
    sub_ns=st.integers(0, 999_999),
    uptime_ms=st.integers(0, 40 * 86_400_000),
    times=st.lists(st.tuples(st.integers(-10_000_000, 5_000), st.integers(-10_000_000, 5_000)), min_size=1,
                   max_size=40),
)
def test_v9_sysuptime_is_never_before_any_record_time(
    now_ms: int, sub_ns: int, uptime_ms: int, times: list[tuple[int, int]]
) -> None:
    """RFC 3954 5.1: in every packet sysUptime >= LAST_SWITCHED >= FIRST_SWITCHED, including flows whose
    clock runs up to 5 s ahead of `now` and hostile rows with start after end."""
    now_ns = now_ms * 10**6 + sub_ns
    boot_ns = now_ns - uptime_ms * 10**6
    s = session("netflow9", boot_ns, max_message_size=512)
    recs = [flow(i, now_ms, start_ms=max(0, now_ms + a), end_ms=max(0, now_ms + b)) for i, (a, b) in enumerate(times)]
    d = Decoder()
    n = 0
    for m in s.messages(records_to_batch(recs), now_ns):
        msg = d.feed(m.data)
        assert msg.sys_uptime is not None and msg.export_time * 1000 >= now_ms
        assert msg.sys_uptime == max(0, msg.export_time * 1000 - boot_ns // 10**6)  # same instant
        for r in msg.records:
            first, last = r.fields["flowStartSysUpTime"], r.fields["flowEndSysUpTime"]
            assert first <= last <= msg.sys_uptime
            n += 1
    assert n == len(recs)


# -- templates with the next message after a failed send ------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_collector_back_after_econnrefused_gets_templates_with_the_next_message(protocol: str) -> None:
    clock = FakeClock(wall=1_800_000_000_000_000_000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens, the kernel answers port unreachable
    s = session(protocol, clock.wall_ns() - 10**12, template_refresh_s=3600, template_refresh_messages=0)
    exporter = Exporter([("c", s, UdpTransport("127.0.0.1", port))], metering_process_id=1)
    now_ms = clock.wall_ns() // 10**6
    try:
        for _ in range(4):  # the first send succeeds, the ICMP error fails a later one
            exporter.export(records_to_batch([flow(0, now_ms)]), clock.wall_ns())
            clock.advance(10**9)
        assert exporter.stats["c"].errors["ECONNREFUSED"] >= 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as back:  # the collector restarts
            back.bind(("127.0.0.1", port))
            back.settimeout(5)
            exporter.export(records_to_batch([flow(1, now_ms)]), clock.wall_ns())
            first = Decoder().feed(back.recv(65535))  # a fresh decoder: the restarted collector knows nothing
        assert {t.template_id for t in first.templates} == {256, 257}
        assert [r.fields["packetDeltaCount"] for r in first.records] == [101]
        assert s.stats.template_refreshes >= 2  # refresh interval not due: only the failure caused it
    finally:
        exporter.close()


# -- interfaceName (IE 82) in data records -----------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_example_template_fills_interface_name_from_the_observation_interface(protocol: str) -> None:
    from pathlib import Path

    ex = load_templates(Path(__file__).resolve().parents[2] / "templates" / "examples")
    data = {ETH_P_IP: ex["ipv4_flow_ifname"], ETH_P_IPV6: ex["ipv6_flow_ifname"]}
    now_ns = 1_800_000_000_000_000_000
    s = ExportSession(protocol, 7, data, boot_wall_ns=now_ns - 10**12)  # type: ignore[arg-type]
    recs = [flow(i, now_ns // 10**6, ifindex=2 + i % 3) for i in range(9)]
    names = {2: "eth0", 3: "veth-ipfx-h1", 4: "a" * 15}  # 15: the longest Linux name (IFNAMSIZ 16)
    d = Decoder()
    got = [(r.fields["packetDeltaCount"], r.fields["interfaceName"])
           for m in s.messages(records_to_batch(recs), now_ns, names) for r in d.feed(m.data).records]
    exp = sorted((r.packets, names[r.ifindex]) for r in recs)
    assert sorted(got) == exp
    via_records = [(r.fields["packetDeltaCount"], r.fields["interfaceName"])
                   for m in s.record_messages(recs, now_ns, names.__getitem__) for r in d.feed(m.data).records]
    assert sorted(via_records) == exp
    unnamed = [r.fields["interfaceName"] for m in s.messages(records_to_batch(recs), now_ns)
               for r in d.feed(m.data).records]  # no table yet: empty names, every record still sent
    assert unnamed == [""] * len(recs)
