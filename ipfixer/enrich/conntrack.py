"""Conntrack enrichment: post-NAT addresses/ports, mark, zone and an OVN-style state bitmask for flows.

The kernel side (sockets, dump, event decoding) is ipfixer.enrich.ctnetlink; keeping the table in
step with the kernel off the export loop is ipfixer.enrich.ctsync; the NEW/DESTROY event stream and
NAT event records are ipfixer.enrich.events. This module is the model and the join:

- `CtIndex`: an immutable snapshot of entries (CT_DTYPE rows from one dump) with a sorted 64-bit hash
  index over the four role keys of every entry, so a whole batch of flows is matched with one
  `np.searchsorted` (and verified byte for byte, so a hash collision is a miss, never a wrong match).
- `ConntrackTable`: that snapshot plus a bounded delta of entries learned from events since, joined
  to flow batches by `enrich`, with hit/miss/evict/unmatched counters.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ipfixer.enrich.ctnetlink import (
    CT_DTYPE,
    NETLINK_NETFILTER,
    DumpTimeout,
    ParseStats,
    dump_conntrack,
    get_entries,
    open_ctnetlink,
)
from ipfixer.model import (  # the ct_state flags are re-exported: enrichment code reads them from here
    CT_DNAT as CT_DNAT,
    CT_ESTABLISHED as CT_ESTABLISHED,
    CT_INVALID as CT_INVALID,
    CT_NEW as CT_NEW,
    CT_RELATED as CT_RELATED,
    CT_REPLY as CT_REPLY,
    CT_SNAT as CT_SNAT,
    CT_TRACKED as CT_TRACKED,
    FIVE_TUPLE_STRUCT,
    V4_MAPPED_PREFIX,
    five_tuple_keys,
)

log = logging.getLogger(__name__)

__all__ = ["NETLINK_NETFILTER", "CtIndex", "ConnKey", "ConntrackEntry", "ConntrackTable", "CtTuple"]

# enum ip_conntrack_status (include/uapi/linux/netfilter/nf_conntrack_common.h)
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_UNTRACKED = 1 << 12
_IPS_NAMES = [
    "EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT", "SEQ_ADJUST", "SRC_NAT_DONE",
    "DST_NAT_DONE", "DYING", "FIXED_TIMEOUT", "TEMPLATE", "UNTRACKED", "HELPER", "OFFLOAD", "HW_OFFLOAD",
]  # fmt: skip

# ct_state bitmask (OVN semantics): defined with the flow columns in ipfixer.model, imported above.

_ICMP_PROTOS = (1, 58)
_ICMP_ERROR_TYPES = {1: (3, 4, 5, 11, 12), 58: (1, 2, 3, 4)}  # dest unreach, quench, redirect, time, param
# ICMPv6 types conntrack never tracks (nf_conntrack_proto_icmpv6.c noct_valid_new: MLD query/report/done
# 130-132, RFC 4861 router/neighbour solicitation/advertisement 133-136, MLDv2 report 143 of RFC 9777)
_ICMPV6_NEVER_TRACKED = (130, 131, 132, 133, 134, 135, 136, 143)
HAS_GONE = 0x10  # CT_DTYPE["has"]: carried over from an older snapshot, absent from the latest dump


class ConnKey(NamedTuple):
    """A 5-tuple as flow batches carry it: 16-byte addresses, ICMP as (0, type*256+code)."""

    protocol: int
    src_addr: bytes
    dst_addr: bytes
    src_port: int
    dst_port: int

    def packed(self) -> bytes:
        """The 37-byte form `batch_keys` produces for a batch row."""
        return FIVE_TUPLE_STRUCT.pack(self.protocol, self.src_addr, self.dst_addr, self.src_port, self.dst_port)


batch_keys = five_tuple_keys  # packed ConnKeys of every row of a batch


@dataclass(frozen=True, slots=True)
class CtTuple:
    """CTA_TUPLE_ORIG/REPLY: addresses as 16 bytes (IPv4 mapped), ports or ICMP id/type/code."""

    src: bytes | None = None
    dst: bytes | None = None
    proto: int | None = None
    sport: int | None = None
    dport: int | None = None
    icmp_id: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    @property
    def ports(self) -> tuple[int, int]:
        """Ports as flow rows carry them (ICMP: 0, type*256+code)."""
        if self.proto in _ICMP_PROTOS:
            return 0, ((self.icmp_type or 0) << 8) | (self.icmp_code or 0)
        return self.sport or 0, self.dport or 0

    def key(self) -> ConnKey:
        """This tuple as a flow key."""
        sp, dp = self.ports
        return ConnKey(self.proto or 0, self.src or bytes(16), self.dst or bytes(16), sp, dp)


@dataclass(frozen=True, slots=True)
class CtCounter:
    """CTA_COUNTERS_ORIG/REPLY (needs net.netfilter.nf_conntrack_acct=1)."""

    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """One kernel conntrack entry as an object (events, tests); tables keep CT_DTYPE rows instead."""

    id: int | None = None
    origin: CtTuple | None = None
    reply: CtTuple | None = None
    tcp_state: int | None = None  # enum tcp_conntrack: 3 ESTABLISHED, 7 CLOSE ...
    counter_origin: CtCounter | None = None
    counter_reply: CtCounter | None = None
    timeout_s: int | None = None
    status: int | None = None  # IPS_* bits
    use: int | None = None
    zone: int | None = None
    mark: int | None = None
    timestamp_start_ns: int | None = None  # wall clock, needs nf_conntrack_timestamp=1
    timestamp_stop_ns: int | None = None

    @property
    def status_names(self) -> list[str]:
        """IPS_* bit names, as `conntrack -L` prints them."""
        s = self.status or 0
        return [name for i, name in enumerate(_IPS_NAMES) if s & (1 << i)]

    @property
    def snat(self) -> bool:
        """Source translated: IPS_SRC_NAT, or the reply is not addressed to the origin's source."""
        if (self.status or 0) & IPS_SRC_NAT:
            return True
        if self.origin is None or self.reply is None or self.origin.proto in _ICMP_PROTOS:
            return False
        return (self.reply.dst, self.reply.ports[1]) != (self.origin.src, self.origin.ports[0])

    @property
    def dnat(self) -> bool:
        """Destination translated: IPS_DST_NAT, or the reply does not come from the origin's dest."""
        if (self.status or 0) & IPS_DST_NAT:
            return True
        if self.origin is None or self.reply is None or self.origin.proto in _ICMP_PROTOS:
            return False
        return (self.reply.src, self.reply.ports[0]) != (self.origin.dst, self.origin.ports[1])

    @property
    def ipv6(self) -> bool:
        """True for an IPv6 connection."""
        src = self.origin.src if self.origin else None
        return src is not None and src[:12] != V4_MAPPED_PREFIX

    def ct_state(self, reply_direction: bool) -> int:
        """OVN ct_state bits for a flow of this connection (see ct_state_bits)."""
        row = self.to_row()
        return int(ct_state_bits(np.asarray([row], dtype=CT_DTYPE), np.asarray([reply_direction]))[0])

    def role_keys(self) -> list[tuple[ConnKey, bool]]:
        """The four keys a meter can see for this connection, with 'is reply direction' (see role_keys)."""
        if self.origin is None or self.reply is None:
            return []
        words = role_key_array(np.asarray([self.to_row()], dtype=CT_DTYPE))
        out = []
        for role in range(4):
            raw = words[role, 0].tobytes()[: FIVE_TUPLE_STRUCT.size]
            out.append((ConnKey(*FIVE_TUPLE_STRUCT.unpack(raw)), role in (1, 3)))
        return out

    def to_row(self) -> np.void:
        """This entry as one CT_DTYPE row."""
        row = np.zeros((), dtype=CT_DTYPE)
        o, r = self.origin or CtTuple(), self.reply or CtTuple()
        row["proto"] = o.proto or 0
        row["o_src"] = np.frombuffer(o.src or bytes(16), np.uint8)
        row["o_dst"] = np.frombuffer(o.dst or bytes(16), np.uint8)
        row["o_sport"], row["o_dport"] = o.ports
        row["r_src"] = np.frombuffer(r.src or bytes(16), np.uint8)
        row["r_dst"] = np.frombuffer(r.dst or bytes(16), np.uint8)
        row["r_sport"], row["r_dport"] = r.ports
        row["icmp_id"] = o.icmp_id or 0
        row["status"], row["mark"], row["zone"] = self.status or 0, self.mark or 0, self.zone or 0
        row["id"] = self.id or 0
        row["ts_start"], row["ts_stop"] = self.timestamp_start_ns or 0, self.timestamp_stop_ns or 0
        out: np.void = row[()]  # type: ignore[assignment]
        return out

    @classmethod
    def from_row(cls, row: np.void) -> ConntrackEntry:
        """A CT_DTYPE row (dump or event) as an entry object."""
        proto = int(row["proto"])
        icmp = proto in _ICMP_PROTOS

        def tup(prefix: str, icmp_id: int | None) -> CtTuple:
            sp, dp = int(row[f"{prefix}_sport"]), int(row[f"{prefix}_dport"])
            return CtTuple(
                bytes(row[f"{prefix}_src"]), bytes(row[f"{prefix}_dst"]), proto,
                None if icmp else sp, None if icmp else dp, icmp_id,
                (dp >> 8) if icmp else None, (dp & 0xFF) if icmp else None,
            )  # fmt: skip

        has = int(row["has"])
        counted = bool(has & 1)
        return cls(
            id=int(row["id"]) or None,
            origin=tup("o", int(row["icmp_id"]) if icmp else None),
            reply=tup("r", int(row["icmp_id"]) if icmp else None),
            tcp_state=int(row["tcp_state"]) if proto == 6 else None,
            counter_origin=CtCounter(int(row["o_packets"]), int(row["o_bytes"])) if counted else None,
            counter_reply=CtCounter(int(row["r_packets"]), int(row["r_bytes"])) if counted else None,
            timeout_s=int(row["timeout"]),
            status=int(row["status"]),
            use=int(row["use"]),
            zone=int(row["zone"]),
            mark=int(row["mark"]),
            timestamp_start_ns=int(row["ts_start"]) if has & 2 else None,
            timestamp_stop_ns=int(row["ts_stop"]) if has & 4 else None,
        )


# -- vectorised keys, hashes and state --------------------------------------------------------------
_KEY_DTYPE = np.dtype([("p", "u1"), ("s", "u1", (16,)), ("d", "u1", (16,)), ("sp", ">u2"), ("dp", ">u2"),
                       ("pad", "u1", (3,))])  # fmt: skip
assert _KEY_DTYPE.itemsize == 40  # the packed 5-tuple (model.FIVE_TUPLE_STRUCT) + 3 zero bytes = 5 words


def _words(proto: np.ndarray, src: np.ndarray, dst: np.ndarray, sp: np.ndarray, dp: np.ndarray) -> np.ndarray:
    keys = np.zeros(len(proto), dtype=_KEY_DTYPE)
    keys["p"], keys["s"], keys["d"], keys["sp"], keys["dp"] = proto, src, dst, sp, dp
    return keys.view("<u8").reshape(len(proto), 5)


def role_key_array(rows: np.ndarray, roles: tuple[int, ...] = (0, 1, 2, 3)) -> np.ndarray:
    """(4, n, 5) key words of every entry's four roles.

    Role 0: origin tuple (origin direction, before NAT); 1: reply tuple (reply direction, before
    de-NAT); 2: reply tuple reversed (origin direction after NAT); 3: origin reversed (reply direction
    after de-NAT). Without NAT 0 == 2 and 1 == 3. ICMP reversed keys take the other tuple's type/code
    (echo vs echo-reply)."""
    p = rows["proto"]
    icmp = np.isin(p, _ICMP_PROTOS)
    out = []
    for role in roles:
        if role == 0:
            out.append(_words(p, rows["o_src"], rows["o_dst"], rows["o_sport"], rows["o_dport"]))
        elif role == 1:
            out.append(_words(p, rows["r_src"], rows["r_dst"], rows["r_sport"], rows["r_dport"]))
        elif role == 2:
            out.append(_words(p, rows["r_dst"], rows["r_src"], np.where(icmp, rows["o_sport"], rows["r_dport"]),
                              np.where(icmp, rows["o_dport"], rows["r_sport"])))  # fmt: skip
        else:
            out.append(_words(p, rows["o_dst"], rows["o_src"], np.where(icmp, rows["r_sport"], rows["o_dport"]),
                              np.where(icmp, rows["r_dport"], rows["o_sport"])))  # fmt: skip
    return np.stack(out)


def flow_key_words(batch: np.ndarray) -> np.ndarray:
    """(n, 5) key words of a FLOW_DTYPE batch (the same bytes as model.five_tuple_keys)."""
    return _words(batch["protocol"], batch["src_addr"], batch["dst_addr"], batch["src_port"], batch["dst_port"])


_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
_S31, _S29 = np.uint64(31), np.uint64(29)


def hash_words(words: np.ndarray) -> np.ndarray:
    """64-bit hash per row of (..., 5) key words (multiply-xorshift; collisions are verified away)."""
    with np.errstate(over="ignore"):
        h = np.zeros(words.shape[:-1], dtype=np.uint64)
        for i in range(words.shape[-1]):
            h = (h ^ words[..., i]) * _M1
            h ^= h >> _S29
        h = (h ^ (h >> _S31)) * _M2
        out: np.ndarray = h ^ (h >> _S29)
        return out


def ct_state_bits(rows: np.ndarray, reply: np.ndarray) -> np.ndarray:
    """OVN ct_state of flows matched to `rows` (CT_DTYPE), `reply` = matched in the reply direction.

    A flow row aggregates many packets, so the state summarises the connection as last known:
      0x20 trk  - an entry was found (IPS_UNTRACKED entries give 0: not tracked, no other bit);
      0x02 est  - IPS_SEEN_REPLY, or the flow is reply-direction traffic (its packets are the reply);
      0x01 new  - otherwise: only the origin direction has been seen;
      0x04 rel  - IPS_EXPECTED: the connection was expected by a helper (e.g. FTP data); ICMP errors
                  are joined by IcmpErrors, on the tuple they quote;
      0x08 rpl  - matched on the reply tuple or the reversed origin tuple;
      0x40 snat / 0x80 dnat - IPS_SRC_NAT / IPS_DST_NAT, or the tuples disagree on that side;
      0x10 inv  - not from an entry: see IcmpErrors (an ICMP error quoting no connection).
    """
    status = rows["status"].astype(np.uint32)
    est = ((status & IPS_SEEN_REPLY) != 0) | reply
    state = np.full(len(rows), CT_TRACKED, dtype=np.uint8)
    state |= np.where(est, CT_ESTABLISHED, CT_NEW).astype(np.uint8)
    state |= np.where((status & IPS_EXPECTED) != 0, CT_RELATED, 0).astype(np.uint8)
    state |= np.where(reply, CT_REPLY, 0).astype(np.uint8)
    icmp = np.isin(rows["proto"], _ICMP_PROTOS)
    snat_t = ~icmp & ((rows["r_dst"] != rows["o_src"]).any(axis=1) | (rows["r_dport"] != rows["o_sport"]))
    dnat_t = ~icmp & ((rows["r_src"] != rows["o_dst"]).any(axis=1) | (rows["r_sport"] != rows["o_dport"]))
    state |= np.where(((status & IPS_SRC_NAT) != 0) | snat_t, CT_SNAT, 0).astype(np.uint8)
    state |= np.where(((status & IPS_DST_NAT) != 0) | dnat_t, CT_DNAT, 0).astype(np.uint8)
    state[(status & IPS_UNTRACKED) != 0] = 0
    return state


def fill_matches(batch: np.ndarray, pos: np.ndarray, rows: np.ndarray, reply: np.ndarray) -> None:
    """Write the conntrack columns of batch[pos] from the matched entries `rows`.

    Origin-direction flow: post-NAT source = reply tuple's dst, post-NAT dest = reply tuple's src
    (ports likewise). Reply-direction flow: post-NAT source = origin's dst, dest = origin's src. ICMP
    post ports stay 0."""
    if len(pos) == 0:
        return
    rep = reply[:, None]
    batch["post_src_addr"][pos] = np.where(rep, rows["o_dst"], rows["r_dst"])
    batch["post_dst_addr"][pos] = np.where(rep, rows["o_src"], rows["r_src"])
    icmp = np.isin(rows["proto"], _ICMP_PROTOS)
    batch["post_src_port"][pos] = np.where(icmp, 0, np.where(reply, rows["o_dport"], rows["r_dport"]))
    batch["post_dst_port"][pos] = np.where(icmp, 0, np.where(reply, rows["o_sport"], rows["r_sport"]))
    batch["ct_mark"][pos] = rows["mark"]
    batch["ct_zone"][pos] = rows["zone"]
    batch["ct_state"][pos] = ct_state_bits(rows, reply)


class CtIndex:
    """Immutable: CT_DTYPE rows and a sorted hash index over their role keys (4 per entry)."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        n = len(rows)
        words = role_key_array(rows)  # (4, n, 5)
        hashes = hash_words(words).reshape(4 * n)  # role-major: earlier roles win among equal hashes
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.refs = order.astype(np.int64)  # role * n + entry

    @classmethod
    def from_arrays(cls, rows: np.ndarray, hashes: np.ndarray, refs: np.ndarray) -> CtIndex:
        """An index built elsewhere (the dump worker process) from the same rows."""
        idx = cls.__new__(cls)
        idx.rows, idx.hashes, idx.refs = rows, hashes, refs
        return idx

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(entry index or -1, is reply direction) per row of (m, 5) key words; exact match only."""
        m, n = len(words), len(self.rows)
        entry = np.full(m, -1, dtype=np.int64)
        reply = np.zeros(m, dtype=bool)
        if n == 0 or m == 0:
            return entry, reply
        h = hash_words(words)
        at = np.searchsorted(self.hashes, h)
        at[at >= len(self.hashes)] = 0
        cand = np.flatnonzero(self.hashes[at] == h)
        if len(cand) == 0:
            return entry, reply
        ref = self.refs[at[cand]]
        role, ent = ref // n, ref % n
        exact = np.zeros(len(cand), dtype=bool)
        for r in range(4):  # verify byte for byte: a hash collision is a miss, never a wrong match
            sel = np.flatnonzero(role == r)
            if len(sel):
                keys = role_key_array(self.rows[ent[sel]], roles=(r,))[0]
                exact[sel] = (keys == words[cand[sel]]).all(axis=1)
        cand, role, ent = cand[exact], role[exact], ent[exact]
        entry[cand] = ent
        reply[cand] = (role == 1) | (role == 3)
        return entry, reply


def origin_hashes(rows: np.ndarray) -> np.ndarray:
    """A connection's identity across events and dumps: hash of its origin tuple and zone."""
    words = role_key_array(rows, roles=(0,))[0].copy()
    words[:, 4] ^= rows["zone"].astype(np.uint64) << np.uint64(40)
    return hash_words(words)


def missing_from(old: CtIndex, new: CtIndex) -> np.ndarray:
    """Rows of `old` whose connection (origin tuple) `new` does not hold and that were not carried
    already: what one generation of carry-over keeps (vectorised lookup, no per-entry work)."""
    if len(old) == 0:
        return old.rows[:0]
    keep = (old.rows["has"] & HAS_GONE) == 0
    cand = old.rows[keep]
    ent, _ = new.lookup(role_key_array(cand, roles=(0,))[0])
    gone: np.ndarray = cand[ent < 0].copy()
    gone["has"] |= HAS_GONE
    return gone


@dataclass
class TableCounters:
    """Cumulative counts for metrics (read by the daemon, written by the table and its sync)."""

    hits: int = 0  # flow rows matched to an entry
    misses: int = 0  # flow rows (not ICMP errors) matched to none
    evictions: int = 0  # entries dropped because the table was full
    dumps: int = 0
    dump_errors: int = 0
    dumped_entries: int = 0
    kernel_queries: int = 0  # tuples asked of the kernel directly (after overruns)


class ConntrackTable:
    """The current CtIndex snapshot plus a bounded delta of entries from events, joined to flow batches.

    Entries missing from a later dump stay one generation (missing_from) and DESTROYed ones stay in the
    delta until the next resync, so flows exported after their connection ended still enrich. A tuple
    present in two zones maps to either (flow rows carry no zone). `refresh()` dumps synchronously
    (tests, tools); the daemon uses ctsync.ConntrackSync, which swaps snapshots in from its own thread.
    """

    def __init__(
        self, max_entries: int = 1 << 20, netns: str | None = None, dump_timeout_s: float = 60.0,
        open_socket: bool = True,
    ) -> None:  # fmt: skip
        self.max_entries = max_entries
        self.max_delta = max(1024, max_entries // 4)
        self.netns = netns
        self.dump_timeout_s = dump_timeout_s
        self.available = False
        self.counters = TableCounters()
        self.parse_stats = ParseStats()
        self.snapshot = CtIndex(np.zeros(0, dtype=CT_DTYPE))
        self.leftovers = CtIndex(np.zeros(0, dtype=CT_DTYPE))  # one generation of entries gone since
        self._lock = threading.Lock()  # writers only (sync thread vs ingest callers); readers take refs
        self._delta_rows: dict[bytes, np.void] = {}  # identity (origin key + zone) -> row
        self._delta_index: dict[bytes, tuple[bytes, bool]] = {}  # packed role key -> (identity, reply)
        self._sock: socket.socket | None = None
        self._get_sock: socket.socket | None = None
        if open_socket:
            try:
                self._sock = open_ctnetlink(netns)
                self.available = True
            except OSError as exc:
                log.warning("conntrack enrichment disabled (netns %s): cannot open ctnetlink: %s",
                            netns or "host", exc)  # fmt: skip
        else:
            self.available = True

    @property
    def errors(self) -> int:
        """Failed dumps so far."""
        return self.counters.dump_errors

    def __len__(self) -> int:
        return len(self.snapshot) + len(self.leftovers) + len(self._delta_rows)

    def close(self) -> None:
        """Release the netlink sockets."""
        for sock in (self._sock, self._get_sock):
            if sock is not None:
                sock.close()
        self._sock = self._get_sock = None
        self.available = False

    # -- writing ---------------------------------------------------------------------------------
    def install(self, rows: np.ndarray, keep_delta: np.ndarray | None = None, index: CtIndex | None = None) -> None:
        """Make a dump the new snapshot (bounded); what the old snapshot and delta held and the dump no
        longer does stays one generation (leftovers, and the delta's gone entries); the delta then
        takes `keep_delta` (events seen while the dump ran, which it may predate). `index`: the
        dump's CtIndex when built elsewhere (ctsync's worker process)."""
        if len(rows) > self.max_entries:
            self.counters.evictions += len(rows) - self.max_entries
            rows, index = rows[: self.max_entries], None
        snap = index if index is not None else CtIndex(rows)
        gone = missing_from(self.snapshot, snap)
        if len(gone) > self.max_delta:
            self.counters.evictions += len(gone) - self.max_delta
            gone = gone[-self.max_delta :]
        leftovers = CtIndex(gone)
        old_delta = list(self._delta_rows.values())
        with self._lock:
            self.snapshot, self.leftovers = snap, leftovers
            self._delta_rows, self._delta_index = {}, {}
            if old_delta:
                d = np.asarray(old_delta, dtype=CT_DTYPE)
                ent, _ = snap.lookup(role_key_array(d, roles=(0,))[0])
                d = d[(ent < 0) & ((d["has"] & HAS_GONE) == 0)]
                d["has"] |= HAS_GONE
                self._ingest_rows(d)
            if keep_delta is not None and len(keep_delta):
                self._ingest_rows(keep_delta)

    def ingest_rows(self, rows: np.ndarray) -> None:
        """Entries from events (NEW/UPDATE/DESTROY) into the delta, newest state winning."""
        if len(rows) == 0:
            return
        with self._lock:
            self._ingest_rows(rows)

    def _ingest_rows(self, rows: np.ndarray) -> None:
        n = len(rows)
        raw = role_key_array(rows).tobytes()  # (4, n, 5) words: role r of row i at (r * n + i) * 40
        zones = rows["zone"].astype(">u2").tobytes()
        drows, dindex = self._delta_rows, self._delta_index
        for i in range(n):
            k0 = raw[i * 40 : i * 40 + 37]
            ident = k0 + zones[2 * i : 2 * i + 2]
            drows.pop(ident, None)  # re-insert: newest last, for eviction order
            drows[ident] = rows[i]
            for r in (3, 2, 1):  # earlier roles win where keys coincide
                off = (r * n + i) * 40
                dindex[raw[off : off + 37]] = (ident, r != 2)
            dindex[k0] = (ident, False)
        while len(self._delta_rows) > self.max_delta:
            ident = next(iter(self._delta_rows))
            old = self._delta_rows.pop(ident)
            self.counters.evictions += 1
            for r in range(4):
                k = role_key_array(np.asarray([old], dtype=CT_DTYPE))[r, 0].tobytes()[:37]
                if self._delta_index.get(k, (None,))[0] == ident:
                    del self._delta_index[k]

    def knows(self, rows: np.ndarray, delta: bool = True) -> np.ndarray:
        """Per CT_DTYPE row: is its connection (origin tuple) in the snapshot, the leftovers (or the delta)?"""
        words = role_key_array(rows, roles=(0,))[0]
        known = self.snapshot.lookup(words)[0] >= 0
        if len(self.leftovers):
            known |= self.leftovers.lookup(words)[0] >= 0
        index = self._delta_index
        if index and delta:
            raw = words.tobytes()
            known |= np.fromiter((raw[i * 40 : i * 40 + 37] in index for i in range(len(rows))), dtype=bool,
                                 count=len(rows))  # fmt: skip
        return known

    def delta_rows(self) -> np.ndarray:
        """The delta's entries (events since the snapshot) as CT_DTYPE rows."""
        rows = list(self._delta_rows.values())
        return np.asarray(rows, dtype=CT_DTYPE) if rows else np.zeros(0, dtype=CT_DTYPE)

    def query_kernel(self, batch: np.ndarray, zones: tuple[int, ...] = (0,), budget_s: float = 0.4) -> int:
        """Ask the kernel for the connections of these flow rows (TCP/UDP/SCTP tuples, as seen and
        reversed, in each zone) and put what it knows into the delta; entries found. Used after event
        overruns, for rows no snapshot knows yet: a GET per tuple instead of waiting for the resync."""
        sel = batch[np.isin(batch["protocol"], (6, 17, 132, 136))]
        if len(sel) == 0:
            return 0
        if self._get_sock is None:
            try:
                self._get_sock = open_ctnetlink(self.netns, rcvbuf=8 << 20)
            except OSError:
                return 0
        # a tuple as the meter saw it before NAT (ingress) is the connection's origin or reply tuple,
        # which the kernel looks up directly; post-NAT forms (egress metering) are not asked for
        keys = sel
        found = []
        deadline = time.monotonic() + budget_s
        for zone in zones:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                found.append(get_entries(self._get_sock, keys, zone, left, self.parse_stats))
            except OSError:
                self._get_sock.close()
                self._get_sock = None
                break
        rows = np.concatenate(found) if found else np.zeros(0, dtype=CT_DTYPE)
        if len(rows):
            self.ingest_rows(rows)
        self.counters.kernel_queries += len(keys) * len(zones)
        return len(rows)

    def zones(self, limit: int = 4) -> tuple[int, ...]:
        """The conntrack zones the snapshot holds entries of (most first), for query_kernel."""
        z, n = np.unique(self.snapshot.rows["zone"], return_counts=True)
        out = tuple(int(v) for v in z[np.argsort(-n)][:limit])
        return out or (0,)

    def ingest(self, entry: ConntrackEntry) -> None:
        """One entry object into the delta (tests and tools)."""
        if entry.origin is not None and entry.reply is not None:
            self.ingest_rows(np.asarray([entry.to_row()], dtype=CT_DTYPE))

    def refresh(self) -> int:
        """Dump the kernel table synchronously into a new snapshot; entries seen (0 on failure)."""
        if self._sock is None:
            return 0
        try:
            rows = dump_conntrack(self._sock, self.dump_timeout_s, self.parse_stats)
        except (OSError, TimeoutError) as exc:
            self.counters.dump_errors += 1
            if isinstance(exc, DumpTimeout) or getattr(exc, "errno", None) == errno.EBUSY:
                self._reopen()
            if isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP,
                                                            errno.EPROTONOSUPPORT, errno.ENOENT):  # fmt: skip
                log.warning("conntrack enrichment disabled: dump refused: %s", exc)
                self.close()
            else:
                log.warning("conntrack dump failed: %s", exc)
            return 0
        self.counters.dumps += 1
        self.counters.dumped_entries += len(rows)
        self.install(rows)
        return len(rows)

    def _reopen(self) -> None:
        """A socket left mid-dump answers the next dump with EBUSY: replace it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            self._sock = open_ctnetlink(self.netns)
        except OSError as exc:
            log.warning("conntrack enrichment disabled: cannot reopen ctnetlink: %s", exc)
            self.available = False

    # -- reading ---------------------------------------------------------------------------------
    def lookup(self, key: ConnKey) -> tuple[ConntrackEntry, bool] | None:
        """(entry, is_reply_direction) for a flow key, or None."""
        hit = self._delta_index.get(key.packed())
        if hit is not None:
            row = self._delta_rows.get(hit[0])
            if row is not None:
                return ConntrackEntry.from_row(row), hit[1]
        snap = self.snapshot
        words = _words(np.asarray([key.protocol]), np.frombuffer(key.src_addr, np.uint8)[None],
                       np.frombuffer(key.dst_addr, np.uint8)[None], np.asarray([key.src_port]),
                       np.asarray([key.dst_port]))  # fmt: skip
        ent, rep = snap.lookup(words)
        if ent[0] < 0:
            return None
        return ConntrackEntry.from_row(snap.rows[ent[0]]), bool(rep[0])

    def match(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions in batch, their CT_DTYPE entries, reply flags) of every row with an exact match;
        the delta (newer) wins over the snapshot."""
        snap, left = self.snapshot, self.leftovers
        words = flow_key_words(batch)
        ent, rep = snap.lookup(words)
        old_pos = np.zeros(0, dtype=np.int64)
        old_rows = snap.rows[:0]
        old_rep = np.zeros(0, dtype=bool)
        if len(left):
            miss = np.flatnonzero(ent < 0)
            lent, lrep = left.lookup(words[miss])
            hit = lent >= 0
            old_pos, old_rows, old_rep = miss[hit], left.rows[lent[hit]], lrep[hit]
            ent[old_pos] = -3  # served from the leftovers below
        index, drows = self._delta_index, self._delta_rows
        newer: dict[int, tuple[np.void, bool]] = {}
        if index:
            for i, packed in enumerate(batch_keys(batch)):
                dhit = index.get(packed)
                if dhit is not None:
                    row = drows.get(dhit[0])
                    if row is not None:
                        newer[i] = (row, dhit[1])
        if newer:
            at = np.fromiter(newer, dtype=np.int64, count=len(newer))
            ent[at] = -2  # served from the delta below
        if len(old_pos) and newer:
            fresh = ent[old_pos] == -3
            old_pos, old_rows, old_rep = old_pos[fresh], old_rows[fresh], old_rep[fresh]
        pos = np.flatnonzero(ent >= 0)
        rows, reply = snap.rows[ent[pos]], rep[pos]
        if len(old_pos):
            pos = np.concatenate([pos, old_pos])
            rows = np.concatenate([rows, old_rows])
            reply = np.concatenate([reply, old_rep])
        if newer:
            drow = np.asarray([v[0] for v in newer.values()], dtype=CT_DTYPE)
            drep = np.fromiter((v[1] for v in newer.values()), dtype=bool, count=len(newer))
            pos = np.concatenate([pos, at])
            rows = np.concatenate([rows, drow])
            reply = np.concatenate([reply, drep])
        return pos, rows, reply

    def enrich(self, batch: np.ndarray) -> int:
        """Fill post-NAT address/ports, ct_mark, ct_zone, ct_state of matching rows; rows enriched.

        ICMP error rows are never matched on their own addresses (that would borrow another connection's
        state): IcmpErrors joins them on the tuple they quote. Rows with no entry are left zero."""
        if len(batch) == 0:
            return 0
        pos, rows, rep = self.match(batch)
        err = icmp_error_rows(batch)
        keep = ~err[pos]
        pos, rows, rep = pos[keep], rows[keep], rep[keep]
        if rep.any() and not rep.all():
            # a reply metered in this batch means the connection saw its reply, whatever the entry's
            # status says yet (an UPDATE event still on its way, or lost to an overrun until the resync)
            ident = _words(rows["proto"], rows["o_src"], rows["o_dst"], rows["o_sport"], rows["o_dport"])
            h = hash_words(ident)
            answered = ~rep & np.isin(h, h[rep])
            if answered.any():
                rows = rows.copy()
                rows["status"][answered] |= IPS_SEEN_REPLY
        fill_matches(batch, pos, rows, rep)
        self.counters.hits += len(pos)
        self.counters.misses += int((~err & ~never_tracked_rows(batch)).sum()) - len(pos)
        return len(pos)


def icmp_error_rows(batch: np.ndarray) -> np.ndarray:
    """Which rows are ICMP / ICMPv6 error messages (dest unreachable, time exceeded, ...)."""
    proto = batch["protocol"]
    typ = batch["dst_port"] >> 8
    v4 = (proto == 1) & np.isin(typ, _ICMP_ERROR_TYPES[1])
    v6 = (proto == 58) & np.isin(typ, _ICMP_ERROR_TYPES[58])
    out: np.ndarray = v4 | v6
    return out


def never_tracked_rows(batch: np.ndarray) -> np.ndarray:
    """Which rows are ICMPv6 neighbour discovery / MLD, which the kernel never gives a conntrack entry: on
    every IPv6 link, they are no sign of a missing or lagging table, so they are not counted as misses."""
    out: np.ndarray = (batch["protocol"] == 58) & np.isin(batch["dst_port"] >> 8, _ICMPV6_NEVER_TRACKED)
    return out
