"""RFC 5103 biflows: the pairer joins a uniflow with its reverse, orients it by conntrack or by the first
packet seen, holds a lonely uniflow for a bounded time, and never adds, drops or splits a count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ipfixer.config import load_config
from ipfixer.errors import ConfigError
from ipfixer.export.biflow import (
    BIFLOW_ARBITRARY,
    BIFLOW_INITIATOR,
    BIFLOW_REVERSE_INITIATOR,
    BiflowPairer,
)
from ipfixer.export.factory import build_exporter
from ipfixer.model import (
    CT_ESTABLISHED,
    CT_NEW,
    CT_REPLY,
    CT_TRACKED,
    ETH_P_IP,
    FlowRecord,
    batch_to_records,
    records_to_batch,
    to_addr16,
)
from ipfixer.templates import load_templates
from tests.cli.helpers import write_config

S = 1_000_000_000


def uni(a: str, b: str, sport: int, dport: int, *, packets: int, start: int, proto: int = 6, ifindex: int = 3,
        direction: int = 0, ct: int = 0, flags: int = 0, end_reason: int = 1) -> FlowRecord:
    return FlowRecord(
        ethertype=ETH_P_IP, direction=direction, src_addr=to_addr16(a), dst_addr=to_addr16(b), src_port=sport,
        dst_port=dport, protocol=proto, ifindex=ifindex, ingress_if=ifindex if direction == 0 else 0,
        egress_if=ifindex if direction == 1 else 0, packets=packets, octets=packets * 100 + 1, start_ms=start,
        end_ms=start + 50, tcp_flags=flags, ct_state=ct, end_reason=end_reason,
    )  # fmt: skip


def batch(*recs: FlowRecord) -> np.ndarray:
    return records_to_batch(list(recs))


def test_pair_in_one_batch_oriented_by_first_packet() -> None:
    p = BiflowPairer(hold_ns=10 * S)
    reply = uni("10.0.0.2", "10.0.0.1", 80, 4000, packets=4, start=1005, direction=1, flags=0x12)
    req = uni("10.0.0.1", "10.0.0.2", 4000, 80, packets=5, start=1000, flags=0x02)
    out = p.add(batch(reply, req), now_ns=0)  # the reply listed first: orientation is by start time
    assert len(out) == 1 and len(p) == 0 and p.stats.paired == 1
    r = batch_to_records(out)[0]
    assert (r.src_port, r.dst_port, r.packets, r.octets, r.tcp_flags) == (4000, 80, 5, 501, 0x02)
    assert (r.rev_packets, r.rev_octets, r.rev_tcp_flags, r.rev_start_ms, r.rev_end_ms) == (4, 401, 0x12, 1005, 1055)
    assert r.biflow_direction == BIFLOW_INITIATOR
    assert (r.ingress_if, r.egress_if) == (3, 3)  # the reply left where the request came in


def test_conntrack_initiator_wins_over_first_packet_seen() -> None:
    """The reply direction (ct_state rpl) was seen first, e.g. the request's uniflow started on an
    earlier active-timeout record; conntrack still knows who initiated."""
    p = BiflowPairer(hold_ns=10 * S)
    req = uni("10.0.0.1", "10.0.0.2", 4000, 80, packets=5, start=2000, ct=CT_TRACKED | CT_ESTABLISHED)
    reply = uni("10.0.0.2", "10.0.0.1", 80, 4000, packets=4, start=1000, direction=1,
                ct=CT_TRACKED | CT_ESTABLISHED | CT_REPLY)
    r = batch_to_records(p.add(batch(reply, req), 0))[0]
    assert (r.src_port, r.packets, r.rev_packets, r.biflow_direction) == (4000, 5, 4, BIFLOW_INITIATOR)


def test_equal_start_is_arbitrary_with_the_service_port_as_destination() -> None:
    p = BiflowPairer(hold_ns=10 * S)
    svc = uni("10.0.0.2", "10.0.0.1", 443, 50000, packets=2, start=5, direction=1)  # the answer, held first
    cli = uni("10.0.0.1", "10.0.0.2", 50000, 443, packets=1, start=5)
    r = batch_to_records(p.add(batch(svc, cli), 0))[0]
    assert (r.src_port, r.dst_port, r.packets, r.rev_packets) == (50000, 443, 1, 2)
    assert r.biflow_direction == BIFLOW_ARBITRARY


def test_partner_in_a_later_batch_and_lonely_uniflows_after_the_hold() -> None:
    p = BiflowPairer(hold_ns=10 * S)
    req = uni("10.0.0.1", "10.0.0.2", 4000, 53, packets=1, start=1000, proto=17)
    lone = uni("10.0.0.9", "10.0.0.2", 4001, 53, packets=3, start=1000, proto=17)
    reply_only = uni("10.0.0.2", "10.0.0.7", 53, 4002, packets=2, start=1000, proto=17, direction=1,
                     ct=CT_TRACKED | CT_REPLY | CT_ESTABLISHED)
    assert len(p.add(batch(req, lone, reply_only), now_ns=0)) == 0 and len(p) == 3
    reply = uni("10.0.0.2", "10.0.0.1", 53, 4000, packets=1, start=1001, proto=17, direction=1)
    out = batch_to_records(p.add(batch(reply), now_ns=5 * S))
    assert [(r.src_port, r.packets, r.rev_packets) for r in out] == [(4000, 1, 1)]
    assert len(p.due(9 * S)) == 0
    late = {r.src_port: r for r in batch_to_records(p.due(10 * S))}
    assert set(late) == {4001, 53} and len(p) == 0
    assert (late[4001].packets, late[4001].rev_packets, late[4001].biflow_direction) == (3, 0, BIFLOW_INITIATOR)
    assert late[53].biflow_direction == BIFLOW_REVERSE_INITIATOR  # conntrack: only the reply was seen
    assert (p.stats.paired, p.stats.unpaired) == (1, 2)


def test_different_interfaces_or_protocols_do_not_pair() -> None:
    p = BiflowPairer(hold_ns=S)
    a = uni("10.0.0.1", "10.0.0.2", 1, 2, packets=1, start=1, ifindex=3)
    b = uni("10.0.0.2", "10.0.0.1", 2, 1, packets=1, start=2, ifindex=4)
    c = uni("10.0.0.2", "10.0.0.1", 2, 1, packets=1, start=2, ifindex=3, proto=17)
    assert len(p.add(batch(a, b, c), 0)) == 0 and len(p) == 3
    assert len(p.flush()) == 3 and len(p) == 0


def test_inner_flows_pair_only_within_their_tunnel() -> None:
    """tunnels.decap: two tenants reusing 10.0.0.1/.2 in VNIs 5 and 6 never pair across tenants; a reply
    comes back with the outer addresses swapped and pairs with its request."""
    from dataclasses import replace

    o1, o2 = to_addr16("192.0.2.1"), to_addr16("192.0.2.2")
    p = BiflowPairer(hold_ns=S)

    def tun(rec: FlowRecord, vni: int, reverse: bool) -> FlowRecord:
        return replace(rec, tunnel_type=1, tunnel_id=vni, outer_src_addr=o2 if reverse else o1,
                       outer_dst_addr=o1 if reverse else o2)

    a5 = tun(uni("10.0.0.1", "10.0.0.2", 1000, 80, packets=3, start=1), 5, False)
    b6 = tun(uni("10.0.0.2", "10.0.0.1", 80, 1000, packets=4, start=2), 6, True)  # the other tenant
    assert len(p.add(batch(a5, b6), 0)) == 0 and len(p) == 2
    b5 = tun(uni("10.0.0.2", "10.0.0.1", 80, 1000, packets=2, start=3), 5, True)
    out = batch_to_records(p.add(batch(b5), 0))
    assert [(r.tunnel_id, r.packets, r.rev_packets) for r in out] == [(5, 3, 2)] and len(p) == 1


def test_same_direction_again_releases_the_held_one_and_max_held_bounds() -> None:
    p = BiflowPairer(hold_ns=100 * S, max_held=2)
    first = uni("10.0.0.1", "10.0.0.2", 1, 2, packets=1, start=1)
    again = uni("10.0.0.1", "10.0.0.2", 1, 2, packets=7, start=60_001, end_reason=2)
    out = batch_to_records(p.add(batch(first, again), 0))
    assert [(r.packets, r.rev_packets) for r in out] == [(1, 0)] and len(p) == 1
    x = uni("10.0.0.3", "10.0.0.4", 1, 2, packets=2, start=1)
    y = uni("10.0.0.5", "10.0.0.6", 1, 2, packets=3, start=1)
    out = batch_to_records(p.add(batch(x, y), 0))
    assert [r.packets for r in out] == [3] and p.stats.overflow == 1 and len(p) == 2


def test_a_flow_that_is_its_own_reverse_is_never_paired_with_itself() -> None:
    p = BiflowPairer(hold_ns=S)
    a = uni("10.0.0.1", "10.0.0.1", 7, 7, packets=1, start=1, proto=17)
    b = uni("10.0.0.1", "10.0.0.1", 7, 7, packets=2, start=2, proto=17, direction=1)
    out = batch_to_records(p.add(batch(a, b), 0)) + batch_to_records(p.flush())
    assert sorted((r.packets, r.rev_packets) for r in out) == [(1, 0), (2, 0)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.booleans(), st.integers(1, 1000),
                          st.integers(0, 3), st.integers(0, 30)), max_size=60))
def test_counts_are_conserved_whatever_the_order(spec: list[tuple[int, int, bool, int, int, int]]) -> None:
    """Over any sequence of batches, every uniflow's packets and octets come out exactly once."""
    p = BiflowPairer(hold_ns=5 * S, max_held=8)
    got_p = got_o = 0
    want_p = want_o = 0
    now = 0
    for i, (x, y, rev, packets, ifindex, step) in enumerate(spec):
        a, b = f"10.0.{x}.1", f"10.0.{y}.2"
        r = uni(b, a, 80, 1000 + x, packets=packets, start=i, ifindex=ifindex) if rev else \
            uni(a, b, 1000 + x, 80, packets=packets, start=i, ifindex=ifindex)
        want_p, want_o = want_p + r.packets, want_o + r.octets
        now += step * S // 10
        out = p.add(batch(r), now)
        got_p += int(out["packets"].sum() + out["rev_packets"].sum())
        got_o += int(out["octets"].sum() + out["rev_octets"].sum())
    out = p.flush()
    got_p += int(out["packets"].sum() + out["rev_packets"].sum())
    got_o += int(out["octets"].sum() + out["rev_octets"].sum())
    assert (got_p, got_o) == (want_p, want_o)
    assert p.stats.paired * 2 + p.stats.unpaired == len(spec)


# -- config and templates ------------------------------------------------------------------------
def test_biflow_templates_carry_reverse_elements_with_pen_29305() -> None:
    t = load_templates()["ipv4_biflow"]
    rev = {f.name: f.element.pen for f in t.fields if f.name.startswith("reverse")}
    assert rev == dict.fromkeys(["reverseFlowStartMilliseconds", "reverseFlowEndMilliseconds", "reverseTcpControlBits",
                                 "reverseIpClassOfService", "reverseOctetDeltaCount", "reversePacketDeltaCount"], 29305)
    ids = {f.name: f.element.element_id for f in t.fields}
    assert ids["reverseOctetDeltaCount"] == ids["octetDeltaCount"] == 1 and ids["biflowDirection"] == 239
    assert load_templates()["ipv6_biflow"].template_id == 269 and t.template_id == 268


def test_biflow_is_opt_in_per_collector_and_ipfix_only(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": 9},
                                                         {"address": "127.0.0.1", "port": 10, "biflow": True}]))
    ex = build_exporter(cfg, 0)
    try:
        assert [c.biflow for c in ex.collectors] == [False, True] and ex.pairer is not None
        assert ex.pairer.hold_ns == int(cfg.timeouts.idle * 1e9)
        assert ex.pairer.max_held == cfg.cache.kernel_map_entries + cfg.cache.accounter_max_entries
        names = [[t.name for t in c.session.data_templates.values()] for c in ex.collectors]
        assert names == [["ipv4_flow", "ipv6_flow"], ["ipv4_biflow", "ipv6_biflow"]]
    finally:
        ex.close()
    with pytest.raises(ConfigError, match=r"collectors\[0\]: biflow: .*NetFlow v9.*netflow9"):
        load_config(write_config(tmp_path / "d.yaml", [{"address": "127.0.0.1", "port": 9, "biflow": True,
                                                        "protocol": "netflow9"}]))


def test_ct_state_new_alone_is_the_initiator() -> None:
    p = BiflowPairer(hold_ns=S)
    p.add(batch(uni("10.0.0.1", "10.0.0.2", 5, 6, packets=1, start=1, ct=CT_TRACKED | CT_NEW)), 0)
    assert batch_to_records(p.flush())[0].biflow_direction == BIFLOW_INITIATOR


def test_exporter_close_sends_what_still_waits_for_a_partner() -> None:
    """A caller that never flushes (replay) loses no uniflow: close() sends the held ones, alone."""
    import socket

    from ipfixer.export import Exporter, ExportSession, UdpTransport
    from ipfixer.export.factory import BIFLOW_TEMPLATES
    from ipfixer.wire.decode import Decoder

    t = load_templates()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    now = 1_790_000_000 * S
    s = ExportSession("ipfix", 1, {e: t[n] for e, n in BIFLOW_TEMPLATES.items()}, boot_wall_ns=now - S)
    ex = Exporter([("b", s, UdpTransport("127.0.0.1", rx.getsockname()[1]))], biflow=["b"], biflow_hold_ns=60 * S)
    try:
        ex.export(batch(uni("10.0.0.1", "10.0.0.2", 9, 10, packets=3, start=now // 10**6 - 10)), now)
        assert ex.pairer is not None and len(ex.pairer) == 1
    finally:
        ex.close()
    d, recs = Decoder(), []
    try:
        for _ in range(2):  # the templates (sent when the batch left nothing to pair), then the data
            recs += d.feed(rx.recv(65535)).records
    finally:
        rx.close()
    assert [(r.fields["packetDeltaCount"], r.fields["reversePacketDeltaCount"]) for r in recs] == [(3, 0)]


def test_icmp_echo_request_and_reply_pair_other_icmp_does_not() -> None:
    p = BiflowPairer(hold_ns=S)
    req = uni("10.0.0.1", "10.0.0.2", 0, 8 << 8, packets=3, start=10, proto=1)
    rep = uni("10.0.0.2", "10.0.0.1", 0, 0, packets=3, start=11, proto=1, direction=1)
    unreach = uni("10.0.0.2", "10.0.0.1", 0, (3 << 8) | 3, packets=1, start=12, proto=1, direction=1)
    v6req = uni("fd00::1", "fd00::2", 0, 128 << 8, packets=2, start=10, proto=58)
    v6rep = uni("fd00::2", "fd00::1", 0, 129 << 8, packets=2, start=10, proto=58, direction=1)
    out = batch_to_records(p.add(records_to_batch([req, rep, unreach, v6req, v6rep]), 0))
    assert [(r.dst_port >> 8, r.packets, r.rev_packets, r.biflow_direction) for r in out] == [
        (8, 3, 3, BIFLOW_INITIATOR), (128, 2, 2, BIFLOW_ARBITRARY)]
    assert len(p) == 1  # the port unreachable waits, and goes alone
    assert batch_to_records(p.flush())[0].dst_port == (3 << 8) | 3


def test_exporter_logs_uniflows_sent_without_waiting_when_held_is_full(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from ipfixer.export import Exporter, ExportSession, UdpTransport
    from ipfixer.export.factory import BIFLOW_TEMPLATES

    t = load_templates()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    now = 1_790_000_000 * S
    s = ExportSession("ipfix", 1, {e: t[n] for e, n in BIFLOW_TEMPLATES.items()}, boot_wall_ns=now - S)
    ex = Exporter([("b", s, UdpTransport("127.0.0.1", rx.getsockname()[1]))], biflow=["b"], biflow_hold_ns=60 * S,
                  biflow_max_held=1)
    try:
        with caplog.at_level("WARNING", logger="ipfixer.export"):
            ex.export(batch(uni("10.0.0.1", "10.0.0.2", 1, 2, packets=1, start=1),
                            uni("10.0.0.3", "10.0.0.4", 1, 2, packets=1, start=1),
                            uni("10.0.0.5", "10.0.0.6", 1, 2, packets=1, start=1)), now)
        assert ex.pairer is not None and ex.pairer.stats.overflow == 2 and len(ex.pairer) == 1
        assert "biflow: 2 uniflows sent without waiting for their reverse (1 held" in caplog.text
        assert ex.collectors[0].stats.flow_records == 2
    finally:
        ex.close()
        rx.close()
