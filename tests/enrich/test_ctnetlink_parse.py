"""The bulk ctnetlink decoder (ctnetlink.parse_dump) against the per-message reference decoder
(ctnetlink.parse_entry): equal rows for real kernel dumps and for crafted, truncated and randomly
corrupted messages (corrupt input is counted, never raised); the table's delta and snapshot agree."""

from __future__ import annotations

import random
import select
import struct

import numpy as np
import pytest

from ipfixer.enrich.conntrack import ConnKey, ConntrackEntry, ConntrackTable, CtTuple
from ipfixer.enrich.ctnetlink import (
    CT_DTYPE,
    KIND_NEW,
    ParseStats,
    dump_conntrack,
    dump_request,
    insert_entries,
    insert_entries_request,
    open_ctnetlink,
    parse_dump,
    parse_entry,
)
from ipfixer.lab import Namespaces, sh
from ipfixer.model import to_addr16


def reference(data: bytes, stats: ParseStats) -> np.ndarray:
    """Every ctnetlink message of a datagram through parse_entry, as event rows."""
    out = []
    off = 0
    while off + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        if length < 16 or off + length > len(data):
            break
        if mtype >> 8 == 1 and length >= 20:
            try:
                out.append(parse_entry(data, off + 20, off + length, KIND_NEW))
            except ValueError:
                stats.malformed += 1
        off += (length + 3) & ~3
    return np.frombuffer(b"".join(out), dtype=CT_DTYPE) if out else np.zeros(0, dtype=CT_DTYPE)


def crafted(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    rows = [(rng.choice((6, 17)), bytes(rng.randrange(256) for _ in range(4)), bytes([192, 0, 2, rng.randrange(256)]),
             rng.randrange(65536), rng.randrange(65536), rng.choice((0, 2, 0x30))) for _ in range(n)]  # fmt: skip
    return insert_entries_request(rows, 1, 600, zone=rng.choice((0, 7)))


def test_bulk_equals_reference_on_crafted_messages() -> None:
    data = crafted(300, 1) + crafted(200, 2)  # two shapes (with and without CTA_ZONE)
    bulk, _ = parse_dump([data], None, ParseStats())
    ref = reference(data, ParseStats())
    assert len(bulk) == 500 and bulk.tobytes() == ref.tobytes()
    assert set(bulk["kind"].tolist()) == {KIND_NEW}


def test_corrupt_and_truncated_input_is_counted_not_raised() -> None:
    base = bytearray(crafted(50, 3))
    rng = random.Random(4)
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = bytes(data[: rng.randrange(len(data) + 1)])
        st_bulk, st_ref = ParseStats(), ParseStats()
        bulk, _ = parse_dump([cut], None, st_bulk)
        ref = reference(cut, st_ref)
        assert bulk.tobytes() == ref.tobytes()


def test_delta_and_snapshot_find_every_role_key() -> None:
    c, r, s = to_addr16("10.0.0.2"), to_addr16("192.0.2.1"), to_addr16("198.51.100.7")
    e = ConntrackEntry(origin=CtTuple(c, s, 17, 1000, 53), reply=CtTuple(s, r, 17, 53, 2000), status=0x12,
                       mark=5, zone=3)  # fmt: skip
    delta = ConntrackTable(open_socket=False)
    delta.ingest(e)
    snap = ConntrackTable(open_socket=False)
    snap.install(np.asarray([e.to_row()], dtype=CT_DTYPE))
    keys = [ConnKey(17, c, s, 1000, 53), ConnKey(17, s, r, 53, 2000), ConnKey(17, r, s, 2000, 53),
            ConnKey(17, s, c, 53, 1000)]  # fmt: skip
    for table in (delta, snap):
        got = [table.lookup(k) for k in keys]
        assert [g is not None and g[1] for g in got] == [False, True, False, True]
        assert all(g is not None and (g[0].mark, g[0].zone) == (5, 3) for g in got)
        assert table.lookup(ConnKey(17, c, s, 1001, 53)) is None


@pytest.mark.root
def test_bulk_equals_reference_on_a_real_dump() -> None:
    with Namespaces() as spaces:
        ns = spaces.add(tag="h10p")
        sock = open_ctnetlink(ns)
        rows = [(17 if i % 2 else 6, bytes([10, 9, i >> 8, i & 0xFF]), bytes([192, 0, 2, 9]), 2000 + i, 443, 2)
                for i in range(3000)]  # fmt: skip
        insert_entries(sock, rows)
        # UDP + TCP entries, counters and timestamps on: several shapes in one dump
        for s in ("net.netfilter.nf_conntrack_acct=1", "net.netfilter.nf_conntrack_timestamp=1"):
            sh("sysctl", "-qw", s, netns=ns)
        insert_entries(sock, [(17, bytes([10, 8, 0, i]), bytes([192, 0, 2, 8]), 3000 + i, 53, 0) for i in range(50)])
        table = dump_conntrack(sock)
        assert len(table) == 3050
        seen = {(int(r["proto"]), bytes(r["o_src"]), int(r["o_sport"])) for r in table}
        assert (17, to_addr16("10.9.0.1"), 2001) in seen and (6, to_addr16("10.9.0.0"), 2000) in seen
        # the same dump read raw, decoded in bulk and message by message
        seq = 4242
        sock.send(dump_request(seq))
        datagrams: list[bytes] = []
        while not parse_dump(datagrams[-1:], seq, ParseStats())[1].done if datagrams else True:
            select.select([sock], [], [], 5)
            datagrams.append(sock.recv(1 << 20))
        bulk, summary = parse_dump(datagrams, seq, ParseStats())
        ref = np.concatenate([reference(d, ParseStats()) for d in datagrams])
        ref["kind"] = 0
        assert summary.done and len(bulk) == 3050 and bulk.tobytes() == ref.tobytes()
        assert (table["o_dport"][table["proto"] == 6] == 443).all()
        assert (table["r_sport"][table["proto"] == 6] == 443).all()
        assert ((table["has"] & 1) != 0).sum() == 50  # counters only on the entries made after acct=1
        sock.close()
