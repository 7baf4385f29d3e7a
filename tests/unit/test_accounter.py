"""Accounter (userspace aggregation, Go Accounter model) with a fake clock: no root, no sleeping."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings, strategies as st

from ipfixer.clock import FakeClock, mono_to_wall_ms
from ipfixer.flows.accounter import Accounter
from ipfixer.flows.expiry import expiry_reasons, wall_ms
from ipfixer.flows.rows import KEY_DTYPE, KEY_STRUCT, pack_key, unpack_key
from ipfixer.model import FIVE_TUPLE_STRUCT, FLOW_DTYPE, EndReason, FlowKey, RawPacket, to_addr16

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


def test_full_cache_evicts_the_least_recently_seen_flow() -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=3, evict_timeout_ns=50 * SEC, clock=clock)
    t = clock.mono
    for i, sport in enumerate((1, 2, 3)):
        assert acc.account(RawPacket(key(sport), 10, t + i)) is None
    assert acc.account(RawPacket(key(1), 10, t + 3)) is None  # same flow: no new entry, now the newest
    assert len(acc) == 3
    out = acc.account(RawPacket(key(4), 10, t + 4))
    assert out is None  # buffered: applied at the next call that needs the cache
    assert len(acc) == 3
    out = acc.evict_if_due()
    assert out is not None and out["src_port"].tolist() == [2]  # flow 2 was seen least recently
    assert out["end_reason"].tolist() == [EndReason.LACK_OF_RESOURCES]
    assert acc.evictions == 1 and acc.evicted_flows == 1 and len(acc) == 3
    rest = acc.flush()
    assert sorted(rest["src_port"].tolist()) == [1, 3, 4]
    assert rest[rest["src_port"] == 1]["packets"].tolist() == [2]
    assert set(rest["end_reason"].tolist()) == {EndReason.FORCED_END}


def test_each_flow_leaves_by_its_own_idle_and_active_timeout() -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=100, evict_timeout_ns=5 * SEC, clock=clock, active_timeout_ns=20 * SEC)
    t0 = clock.mono
    acc.account(RawPacket(key(1), 10, t0))  # one packet, then silence
    got: list[np.ndarray] = []
    for _ in range(30):  # flow 2: one packet a second for 30 s
        acc.account(RawPacket(key(2), 100, clock.mono))
        out = acc.evict_if_due()
        if out is not None:
            got.append(out)
        clock.advance(SEC)
    allb = np.concatenate(got)
    idle = allb[allb["src_port"] == 1]
    assert idle["end_reason"].tolist() == [EndReason.IDLE_TIMEOUT] and idle["packets"].tolist() == [1]
    busy = allb[allb["src_port"] == 2]
    assert busy["end_reason"].tolist() == [EndReason.ACTIVE_TIMEOUT]  # cut once, at 20 s, not every 5 s
    assert busy["packets"].tolist() == [21]  # 0 s .. 20 s inclusive
    assert busy[0]["end_ms"] - busy[0]["start_ms"] == 20_000
    rest = acc.flush()
    assert rest["src_port"].tolist() == [2] and rest["packets"].tolist() == [9]


def test_short_flows_are_idle_not_active_timeouts() -> None:
    """The issue's case: 0.35 s flows went out as active timeouts; they are idle timeouts."""
    clock = FakeClock()
    acc = Accounter(max_entries=1000, evict_timeout_ns=SEC, clock=clock, active_timeout_ns=60 * SEC)
    for sport in range(285):
        acc.account(RawPacket(key(sport + 1), 10, clock.mono))
        acc.account(RawPacket(key(sport + 1), 10, clock.mono + 350_000_000))
    clock.advance(SEC)
    assert acc.evict_if_due() is None  # 1 s after the first packet, 0.65 s after the last
    clock.advance(SEC // 2)
    out = acc.evict_if_due()
    assert out is not None and len(out) == 285
    assert set(out["end_reason"].tolist()) == {EndReason.IDLE_TIMEOUT}
    assert set((out["end_ms"] - out["start_ms"]).tolist()) == {350}


def test_tcp_fin_or_rst_ends_a_flow_at_the_next_check() -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=10, evict_timeout_ns=50 * SEC, clock=clock)
    tcp = dataclasses.replace(key(80), protocol=6)
    acc.account(RawPacket(tcp, 60, clock.mono, tcp_flags=0x02))
    acc.account(RawPacket(key(81), 60, clock.mono, tcp_flags=0x01))  # UDP: flags mean nothing
    assert acc.evict_if_due() is None
    acc.account(RawPacket(tcp, 60, clock.mono, tcp_flags=0x11))
    out = acc.evict_if_due()
    assert out is not None and out["src_port"].tolist() == [80]
    assert (out[0]["end_reason"], out[0]["packets"], out[0]["tcp_flags"]) == (EndReason.END_OF_FLOW, 2, 0x13)
    assert len(acc) == 1


def test_evict_ended_by_five_tuple() -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=10, evict_timeout_ns=50 * SEC, clock=clock)
    for sport in (1, 2, 3):
        acc.account(RawPacket(key(sport), 10, clock.mono))
    k = key(2)
    gone = FIVE_TUPLE_STRUCT.pack(k.protocol, k.src_addr, k.dst_addr, k.src_port, k.dst_port)
    out = acc.evict_ended({gone})
    assert out is not None and out["src_port"].tolist() == [2] and out["end_reason"].tolist() == [3]
    assert acc.evict_ended({gone}) is None and len(acc) == 2


def test_batch_path_equals_packet_path() -> None:
    rng = np.random.default_rng(7)
    n = 5000
    sports = rng.integers(1, 400, n)
    octets = rng.integers(40, 1500, n)
    tos = rng.integers(0, 256, n)
    flags = rng.integers(0, 64, n)
    c1, c2 = FakeClock(), FakeClock()
    a = Accounter(max_entries=128, evict_timeout_ns=SEC, clock=c1)
    b = Accounter(max_entries=128, evict_timeout_ns=SEC, clock=c2)
    pkts = [RawPacket(key(int(s)), int(o), c1.mono + i * 1000, int(f), int(t))
            for i, (s, o, t, f) in enumerate(zip(sports, octets, tos, flags, strict=True))]
    out_a = [x for x in [a.account(p) for p in pkts] if x is not None]
    keys = np.frombuffer(b"".join(pack_key(p.key) for p in pkts), dtype=KEY_DTYPE)
    out_b = b.account_batch(keys, np.ones(n, np.uint64), octets, np.array([p.mono_ns for p in pkts]),
                            flags, tos)
    out_a.append(a.flush())
    out_b.append(b.flush())
    ra, rb = np.concatenate(out_a), np.concatenate(out_b)
    assert int(ra["packets"].sum()) == int(rb["packets"].sum()) == n
    assert int(ra["octets"].sum()) == int(rb["octets"].sum()) == int(octets.sum())
    assert a.evictions == b.evictions > 0  # both evicted the least recently seen flows when full


def test_empty_flush() -> None:
    acc = Accounter(max_entries=1, evict_timeout_ns=SEC, clock=FakeClock())
    assert len(acc.flush()) == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 9000), st.integers(1, 64)), max_size=200),
       st.integers(1, 30))
def test_no_packet_is_ever_lost(pkts: list[tuple[int, int, int]], max_entries: int) -> None:
    clock = FakeClock()
    acc = Accounter(max_entries=max_entries, evict_timeout_ns=SEC, clock=clock, active_timeout_ns=2 * SEC)
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


def test_key_bytes_round_trip() -> None:
    k = key(4242, direction=1, ifindex=70000)
    raw = pack_key(k)
    assert len(raw) == KEY_STRUCT.size == KEY_DTYPE.itemsize
    assert unpack_key(raw) == k
    row = np.frombuffer(raw, dtype=KEY_DTYPE)[0]
    assert (row["src_port"], row["ifindex"], row["vlan_id"], bytes(row["src_addr"])) == (
        4242, 70000, 7, to_addr16("10.0.0.1"))


def test_tunnel_key_bytes_round_trip_field_by_field() -> None:
    """TUNNEL_KEY_STRUCT and TUNNEL_KEY_DTYPE lay the fields out alike (not only the same size)."""
    from dataclasses import replace

    from ipfixer.flows.rows import TUNNEL_KEY_DTYPE, TUNNEL_KEY_STRUCT

    k = replace(key(4242, direction=1, ifindex=70000), tunnel_type=3, tunnel_id=0xDEADBEEF, inner_vlan_id=123,
                outer_src_addr=to_addr16("192.0.2.1"), outer_dst_addr=to_addr16("2001:db8::2"))
    raw = pack_key(k, tunnels=True)
    assert len(raw) == TUNNEL_KEY_STRUCT.size == TUNNEL_KEY_DTYPE.itemsize
    assert unpack_key(raw) == k
    row = np.frombuffer(raw, dtype=TUNNEL_KEY_DTYPE)[0]
    assert (row["src_port"], row["ifindex"], row["tunnel_type"], row["tunnel_id"], row["inner_vlan_id"],
            bytes(row["outer_src_addr"]), bytes(row["outer_dst_addr"])) == (
        4242, 70000, 3, 0xDEADBEEF, 123, to_addr16("192.0.2.1"), to_addr16("2001:db8::2"))
