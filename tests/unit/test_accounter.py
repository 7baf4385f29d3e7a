"""Accounter (userspace aggregation, Go Accounter model) with a fake clock: no root, no sleeping."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfixer.clock import FakeClock, mono_to_wall_ms
from ipfixer.flows.accounter import Accounter
from ipfixer.flows.expiry import expiry_reasons, wall_ms
from ipfixer.model import FLOW_DTYPE, EndReason, FlowKey, RawPacket, to_addr16

SEC = 1_000_000_000


def key(sport: int, direction: int = 0, ifindex: int = 3) -> FlowKey:
    return FlowKey(
        ethertype=0x0800, direction=direction, src_mac=b"\x02" * 6, dst_mac=b"\x04" * 6,
        src_addr=to_addr16("10.0.0.1"), dst_addr=to_addr16("10.0.0.2"), src_port=sport, dst_port=53,
        protocol=17, ifindex=ifindex, vlan_id=7,
    )


def test_aggregates_and_flushes_with_wall_times() -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=10, evict_timeout_ns=5 * SEC, clock=clock)
    t0 = clock.mono
    assert acc.account(RawPacket(key(1), octets=100, mono_ns=t0, tcp_flags=0x02, tos=4)) is None
    assert acc.account(RawPacket(key(1), octets=50, mono_ns=t0 + SEC, tcp_flags=0x10, packets=3)) is None
    assert acc.account(RawPacket(key(2, direction=1), octets=10, mono_ns=t0)) is None
    clock.advance(2 * SEC)
    batch = acc.flush()
    assert batch.dtype == FLOW_DTYPE and len(batch) == 2 and len(acc) == 0
    r = batch[batch["src_port"] == 1][0]
    assert (r["packets"], r["octets"], r["tcp_flags"], r["vlan_id"]) == (4, 150, 0x12, 7)
    assert r["start_ms"] == mono_to_wall_ms(t0, clock.wall, clock.mono)
    assert r["end_ms"] - r["start_ms"] == 1000
    assert (r["end_reason"], r["ingress_if"], r["egress_if"]) == (EndReason.FORCED_END, 3, 0)
    assert bytes(r["src_addr"]) == to_addr16("10.0.0.1")
    e = batch[batch["src_port"] == 2][0]
    assert (e["direction"], e["ingress_if"], e["egress_if"]) == (1, 0, 3)
    assert acc.accounted_packets == 5


def test_evicts_everything_when_full() -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=3, evict_timeout_ns=5 * SEC, clock=clock)
    assert acc.account(RawPacket(key(1), 10, clock.mono)) is None
    assert acc.account(RawPacket(key(1), 10, clock.mono)) is None  # same flow: no new entry
    assert acc.account(RawPacket(key(2), 10, clock.mono)) is None
    out = acc.account(RawPacket(key(3), 10, clock.mono))
    assert out is not None and len(out) == 3 and len(acc) == 0
    assert set(out["end_reason"].tolist()) == {EndReason.LACK_OF_RESOURCES}
    assert int(out["packets"].sum()) == 4
    assert acc.evictions == 1 and acc.evicted_flows == 3


def test_evict_if_due_follows_the_clock() -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=100, evict_timeout_ns=5 * SEC, clock=clock)
    acc.account(RawPacket(key(1), 10, clock.mono))
    clock.advance(4 * SEC)
    assert acc.evict_if_due() is None
    clock.advance(SEC)
    out = acc.evict_if_due()
    assert out is not None and len(out) == 1 and out[0]["end_reason"] == EndReason.ACTIVE_TIMEOUT
    assert acc.evict_if_due() is None  # timer restarted at the eviction
    clock.advance(6 * SEC)
    assert acc.evict_if_due() is None  # due but empty


def test_empty_flush() -> None:
    acc = Accounter(max_entries=1, evict_timeout_ns=SEC, clock=FakeClock())
    assert len(acc.flush()) == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 9000), st.integers(1, 64)), max_size=200),
       st.integers(1, 30))
def test_no_packet_is_ever_lost(pkts: list[tuple[int, int, int]], max_entries: int) -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=max_entries, evict_timeout_ns=SEC, clock=clock)
    batches = []
    for sport, octets, segs in pkts:
        clock.advance(SEC // 7)
        b = acc.account(RawPacket(key(sport), octets, clock.mono, packets=segs))
        if b is not None:
            batches.append(b)
        due = acc.evict_if_due()
        if due is not None:
            batches.append(due)
    batches.append(acc.flush())
    allb = np.concatenate(batches)
    assert int(allb["packets"].sum()) == sum(p[2] for p in pkts)
    assert int(allb["octets"].sum()) == sum(p[1] for p in pkts)


def test_expiry_rules() -> None:
    now = 100 * SEC
    first = np.array([0, 90, 50, 99, 99], dtype=np.uint64) * SEC
    last = np.array([10, 99, 99, 99, 99], dtype=np.uint64) * SEC
    flags = np.array([0, 0, 0, 0x11, 0x04], dtype=np.uint64)
    proto = np.array([17, 17, 17, 6, 6], dtype=np.uint8)
    got = expiry_reasons(first, last, flags, proto, now, idle_timeout_ns=15 * SEC, active_timeout_ns=40 * SEC)
    assert got.tolist() == [EndReason.IDLE_TIMEOUT, 0, EndReason.ACTIVE_TIMEOUT,
                            EndReason.END_OF_FLOW, EndReason.END_OF_FLOW]
    future = expiry_reasons(np.array([now + SEC], dtype=np.uint64), np.array([now + SEC], dtype=np.uint64),
                            np.zeros(1, np.uint64), np.zeros(1, np.uint8), now, 0, 0)
    assert future.tolist() == [0]  # a flow touched after `now` is never expired


def test_wall_ms_matches_scalar() -> None:
    c = FakeClock()
    t = np.array([c.mono - 123456789, c.mono], dtype=np.uint64)
    assert wall_ms(t, c.wall, c.mono).tolist() == [mono_to_wall_ms(int(x), c.wall, c.mono) for x in t]
