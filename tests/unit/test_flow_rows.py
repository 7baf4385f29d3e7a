"""The one row builder and carry/merge (ipfixer.flows.rows) and the expiry deadlines, without root:
plain arrays in, FLOW_DTYPE rows out, checked against a per-flow Python reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from ipfixer.clock import FakeClock, mono_to_wall_ms
from ipfixer.flows.expiry import expiry_reasons, flow_deadlines
from ipfixer.flows.rows import KEY_DTYPE, LEAF_DTYPE, build_rows, match_keys, merge, select, to_keys
from ipfixer.model import FLOW_DTYPE, Direction, EndReason, empty_batch

SEC = 1_000_000_000


def flows(ports: list[int], first: int, last: int, packets: int = 1) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(ports), KEY_DTYPE)
    keys["ethertype"], keys["protocol"], keys["ifindex"] = 0x0800, 17, 5
    keys["src_port"] = ports
    keys["direction"] = [p % 2 for p in ports]
    leaves = np.zeros(len(ports), LEAF_DTYPE)
    leaves["packets"], leaves["octets"] = packets, 100 * packets
    leaves["first_ns"], leaves["last_ns"] = first, last
    leaves["tcp_flags"], leaves["tos"] = 0x10, 4
    return keys, leaves


def test_build_rows_maps_every_column() -> None:
    c = FakeClock(mono=100 * SEC)
    keys, leaves = flows([2, 3], c.mono - 3 * SEC, c.mono - SEC, packets=7)
    leaves["tcp_flags"][1] = 0x1FF  # only the low 8 bits are tcpControlBits here
    rows = build_rows(keys, leaves, np.array([1, 2], np.uint8), c.wall, c.mono)
    assert rows.dtype == FLOW_DTYPE
    assert rows["src_port"].tolist() == [2, 3] and rows["packets"].tolist() == [7, 7]
    assert rows["start_ms"][0] == mono_to_wall_ms(c.mono - 3 * SEC, c.wall, c.mono)
    assert rows["end_ms"][0] - rows["start_ms"][0] == 2000
    assert rows["tcp_flags"].tolist() == [0x10, 0xFF] and rows["end_reason"].tolist() == [1, 2]
    ingress = rows[rows["direction"] == Direction.INGRESS][0]
    egress = rows[rows["direction"] == Direction.EGRESS][0]
    assert (ingress["ingress_if"], ingress["egress_if"]) == (5, 0)
    assert (egress["ingress_if"], egress["egress_if"]) == (0, 5)


def test_to_keys_from_a_flow_batch() -> None:
    batch = empty_batch(3)
    batch["src_port"] = [7, 8, 9]
    batch["packets"] = 99
    keys = to_keys(batch)
    assert keys.dtype == KEY_DTYPE and keys["src_port"].tolist() == [7, 8, 9]


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(1, 300), max_size=60), st.sets(st.integers(1, 300), max_size=60))
def test_merge_equals_a_dict_of_flows(a: set[int], b: set[int]) -> None:
    ka, la = flows(sorted(a), 10 * SEC, 20 * SEC, packets=2)
    kb, lb = flows(sorted(b), 5 * SEC, 30 * SEC, packets=3)
    lb["tos"] = 9
    keys, leaves = merge(ka, la, kb, lb)
    got = {int(k["src_port"]): (int(v["packets"]), int(v["first_ns"]), int(v["last_ns"]), int(v["tos"]))
           for k, v in zip(keys, leaves, strict=True)}
    want = {}
    for p in a | b:
        if p in a and p in b:
            want[p] = (5, 5 * SEC, 30 * SEC, 9)  # counters summed, earliest first, latest last and its tos
        elif p in a:
            want[p] = (2, 10 * SEC, 20 * SEC, 4)
        else:
            want[p] = (3, 5 * SEC, 30 * SEC, 9)
    assert got == want and len(keys) == len(a | b)


def test_match_keys_checks_bytes_not_only_hashes() -> None:
    ka, _ = flows([1, 2, 3], 0, 0)
    kb, _ = flows([3, 4, 1], 0, 0)
    ia, ib = match_keys(ka, kb)
    assert sorted(zip(ka["src_port"][ia].tolist(), kb["src_port"][ib].tolist(), strict=True)) == [(1, 1), (3, 3)]


def test_select_keeps_order_and_skips_the_copy_of_all() -> None:
    k, _ = flows([5, 6, 7], 0, 0)
    assert select(k, np.array([True, False, True]))["src_port"].tolist() == [5, 7]
    assert select(k, np.ones(3, bool)) is k


def test_deadlines_are_when_the_rule_first_fires() -> None:
    first = np.array([0, 90, 50], dtype=np.uint64) * SEC
    last = np.array([10, 99, 99], dtype=np.uint64) * SEC
    flags = np.array([0, 0, 0x01], dtype=np.uint64)
    proto = np.array([17, 17, 6], dtype=np.uint8)
    d = flow_deadlines(first, last, flags, proto, 15 * SEC, 40 * SEC)
    assert d.tolist() == [25 * SEC, 114 * SEC, 0]  # idle, idle (before active at 130), FIN: now
    for i, t in enumerate(d.tolist()):
        before = expiry_reasons(first[i:i + 1], last[i:i + 1], flags[i:i + 1], proto[i:i + 1], t - 1, 15 * SEC,
                                40 * SEC)
        at = expiry_reasons(first[i:i + 1], last[i:i + 1], flags[i:i + 1], proto[i:i + 1], t, 15 * SEC, 40 * SEC)
        assert at[0] != 0 and (before[0] == 0 or at[0] == EndReason.END_OF_FLOW)
