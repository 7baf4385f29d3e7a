"""MessageBuilder (export/builder.py): whole records only, never over the size limit, order kept, a record
larger than any message dropped and counted, never a loop that makes no progress."""

from __future__ import annotations

import struct

from hypothesis import assume, given, strategies as st

from ipfixer.export.builder import MessageBuilder, RecordQueue, padded


def data_set(set_id: int, body: bytes) -> bytes:
    return struct.pack("!HH", set_id, 4 + len(body)) + body


@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=60),
    max_size=st.integers(40, 700),
    pad_to=st.sampled_from([1, 4]),
    lead=st.integers(0, 30),
)
def test_records_packed_whole_in_order_within_the_limit(sizes: list[int], max_size: int, pad_to: int, lead: int) -> None:
    assume(16 + 4 + lead <= max_size)  # the session checks its templates fit a message (ExportSession)
    items = [bytes([i % 251 + 1]) * n for i, n in enumerate(sizes)]  # each record recognisable
    b = MessageBuilder(max_size, 16, 4, pad_to, data_set)
    q = RecordQueue(300, items=items)
    lead_sets = [b"\x00\x02" + struct.pack("!H", 4 + lead) + bytes(lead)] if lead else []
    got: list[bytes] = []
    skipped = 0
    for _ in range(len(items) + 1):  # bounded: each round takes or drops at least one record
        if not q.remaining():
            break
        f = b.fill([q], lead_sets, lead_is_optional=False)
        skipped += f.skipped
        assert f.sets[: len(lead_sets)] == lead_sets
        data = f.sets[len(lead_sets) :]
        # the size once the dialect pads each set (RFC 3954 5.3) is within the limit
        assert 16 + sum(map(len, lead_sets)) + sum(4 + padded(len(s) - 4, pad_to) for s in data) <= max_size
        got.extend(s[4:] for s in data)
    assert q.remaining() == 0
    budget = max_size - 16 - sum(len(s) for s in lead_sets) - 4
    fits = [it for it in items if padded(len(it), pad_to) <= budget]
    assert skipped == len(items) - len(fits)
    assert b"".join(got) == b"".join(fits)  # whole records, in order (padding is not added by data_set here)
