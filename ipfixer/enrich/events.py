"""Conntrack lifecycle events: NEW/DESTROY subscription, flow ends (flowEndReason 3) and RFC 8158 NAT
session records. Netlink plumbing and the entry model are shared with ipfixer.enrich.conntrack."""

from __future__ import annotations

import collections
import errno
import logging
import select
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ipfixer.clock import Clock, SystemClock, mono_to_wall_ms
from ipfixer.enrich.conntrack import ConnKey, ConntrackEntry, batch_keys, ct_state_bits, role_key_array
from ipfixer.enrich.ctnetlink import (
    CT_DTYPE,
    KIND_DESTROY,
    KIND_NEW,
    KIND_UPDATE,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
    ParseStats,
    open_ctnetlink,
    parse_dump,
)
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FIVE_TUPLE_STRUCT, FLOW_DTYPE, V4_MAPPED_PREFIX, EndReason, empty_batch

log = logging.getLogger(__name__)

# natEvent (IANA IE 230, RFC 8158 section 4.1): 1/2 are the historic generic create/delete
# (kept for NAT66, which has no session value of its own); 4/5 are NAT44 session create/delete.
NAT_EVENT_CREATE = 1
NAT_EVENT_DELETE = 2
NAT44_SESSION_CREATE = 4
NAT44_SESSION_DELETE = 5


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """A connection lifecycle event: key is the origin tuple, timestamp_ns is CLOCK_MONOTONIC (when
    ipfixer read it; the kernel's own wall-clock times are in entry.timestamp_start/stop_ns)."""

    key: ConnKey
    kind: Literal["new", "update", "destroy"]
    timestamp_ns: int
    entry: ConntrackEntry | None = None
    row: np.void | None = None  # the CT_DTYPE row it was decoded into (events read from the kernel)

    def connection(self) -> ConntrackEntry | None:
        """The entry as an object (built from the row on demand: most events never need one)."""
        if self.entry is not None:
            return self.entry
        return ConntrackEntry.from_row(self.row) if self.row is not None else None

    def ct_row(self) -> np.void | None:
        """The entry as a CT_DTYPE row."""
        if self.row is not None:
            return self.row
        if self.entry is not None and self.entry.origin is not None and self.entry.reply is not None:
            return self.entry.to_row()
        return None


_KINDS: dict[int, Literal["new", "update", "destroy"]] = {
    KIND_NEW: "new", KIND_UPDATE: "update", KIND_DESTROY: "destroy",
}  # fmt: skip


class ConntrackEvents:
    """NEW/UPDATE/DESTROY subscription of one netns, read with a bounded poll into a bounded queue.

    The reading thread calls poll(); any thread takes events with drain(). Events that do not fit the
    queue are counted in `dropped`; kernel-side losses (the socket overran: ENOBUFS) in `overruns`, and
    `overrun_pending` stays set until the owner resynchronises with a dump (ConntrackSync does).
    The rows of every event read are also kept for the table (take_rows).
    """

    def __init__(
        self,
        netns: str | None = None,
        capacity: int = 65536,
        clock: Clock | None = None,
        kinds: Iterable[str] = ("new", "destroy"),
        rcvbuf: int = 8 << 20,
    ) -> None:
        self.netns = netns
        self.clock: Clock = clock or SystemClock()
        self.dropped = 0
        self.overruns = 0
        self.overrun_pending = False
        self.received = 0
        self.available = False
        self.parse_stats = ParseStats()
        self._queue: collections.deque[FlowEvent] = collections.deque()
        self._rows: collections.deque[np.ndarray] = collections.deque()
        self._capacity = capacity
        groups = [{"new": NFNLGRP_CONNTRACK_NEW, "update": NFNLGRP_CONNTRACK_UPDATE,
                   "destroy": NFNLGRP_CONNTRACK_DESTROY}[k] for k in kinds]  # fmt: skip
        self._sock: socket.socket | None = None
        try:
            self._sock = open_ctnetlink(netns, groups, rcvbuf=rcvbuf)
            self.available = True
        except OSError as exc:
            log.warning("conntrack events disabled (netns %s): %s", netns or "host", exc)

    def fileno(self) -> int:
        """The netlink fd, for a selector (-1 when unavailable)."""
        return self._sock.fileno() if self._sock is not None else -1

    def poll(self, timeout_s: float = 0.0, max_datagrams: int = 10000) -> int:
        """Wait up to timeout_s for events, then read what is pending (bounded); events read."""
        if self._sock is None:
            return 0
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout_s))
        if not ready:
            return 0
        datagrams: list[bytes] = []
        for _ in range(max_datagrams):
            try:
                datagrams.append(self._sock.recv(1 << 16))
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped events: only a dump can tell which
                    self.overruns += 1
                    self.overrun_pending = True
                    continue
                raise
        if not datagrams:
            return 0
        rows, _summary = parse_dump(datagrams, None, self.parse_stats)
        if len(rows) == 0:
            return 0
        self.received += len(rows)
        self._rows.append(rows)
        now = self.clock.mono_ns()
        lifecycle = np.flatnonzero(rows["kind"] != KIND_UPDATE)
        if len(lifecycle):
            origin = role_key_array(rows[lifecycle], roles=(0,))[0]
            raw = origin.tobytes()
            for j, i in enumerate(lifecycle):
                if len(self._queue) >= self._capacity:
                    self.dropped += 1
                    continue
                key = ConnKey(*FIVE_TUPLE_STRUCT.unpack_from(raw, j * 40))
                self._queue.append(FlowEvent(key, _KINDS[int(rows["kind"][i])], now, None, rows[i]))
        return len(rows)

    def inject(self, event: FlowEvent) -> None:
        """Queue an event rebuilt elsewhere (ConntrackSync, from a dump after an overrun)."""
        if len(self._queue) >= self._capacity:
            self.dropped += 1
            return
        self._queue.append(event)

    def take_rows(self) -> np.ndarray:
        """CT_DTYPE rows of every event read since the last call (for the table's delta)."""
        parts = []
        while self._rows:
            parts.append(self._rows.popleft())
        if not parts:
            return np.zeros(0, dtype=CT_DTYPE)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def drain(self) -> list[FlowEvent]:
        """Take every queued NEW/DESTROY event, oldest first (safe against a concurrent poll)."""
        out = []
        for _ in range(len(self._queue)):
            out.append(self._queue.popleft())
        return out

    def close(self) -> None:
        """Release the netlink socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.available = False


def destroyed_keys(events: Iterable[FlowEvent]) -> set[ConnKey]:
    """Every flow key (both directions, pre- and post-NAT) of connections that DESTROY events ended."""
    out: set[ConnKey] = set()
    rows = []
    for ev in events:
        if ev.kind != "destroy":
            continue
        row = ev.ct_row()
        if row is not None:
            rows.append(row)
        else:
            out.add(ev.key)
    if rows:
        words = role_key_array(np.asarray(rows, dtype=CT_DTYPE))  # (4, n, 5), all at once
        raw = words.tobytes()
        out.update(ConnKey(*FIVE_TUPLE_STRUCT.unpack_from(raw, off)) for off in range(0, len(raw), 40))
    return out


def apply_destroy(events: Iterable[FlowEvent], batch: np.ndarray) -> int:
    """Mark rows of connections conntrack destroyed as flowEndReason 3 (end of Flow detected, RFC 5102,
    as for a TCP FIN); rows already ended for another reason than idle timeout are left alone. The
    drain calls it on the batch it is about to export (and can use destroyed_keys to expire those
    flows early); returns rows marked."""
    keys = {k.packed() for k in destroyed_keys(events)}
    if not keys or len(batch) == 0:
        return 0
    hit = np.fromiter((k in keys for k in batch_keys(batch)), dtype=bool, count=len(batch))
    hit &= (batch["end_reason"] == 0) | (batch["end_reason"] == EndReason.IDLE_TIMEOUT)
    batch["end_reason"][hit] = EndReason.END_OF_FLOW
    return int(hit.sum())


def nat_event_records(events: Iterable[FlowEvent], clock: Clock | None = None) -> np.ndarray:
    """RFC 8158-style NAT session records (natEvent 4/5 for NAT44, 1/2 otherwise) for NATed connections:
    pre-NAT key in src/dst, translated values in post_*, counters when nf_conntrack_acct is on.
    Vectorised over the events' CT_DTYPE rows."""
    clk: Clock = clock or SystemClock()
    now_wall, now_mono = clk.wall_ns(), clk.mono_ns()
    evs = [(ev, ev.ct_row()) for ev in events if ev.kind in ("new", "destroy")]
    evs = [(ev, row) for ev, row in evs if row is not None]
    if not evs:
        return empty_batch(0)
    ct = np.asarray([row for _, row in evs], dtype=CT_DTYPE)
    create = np.fromiter((ev.kind == "new" for ev, _ in evs), dtype=bool, count=len(evs))
    read_ms = np.fromiter((mono_to_wall_ms(ev.timestamp_ns, now_wall, now_mono) for ev, _ in evs),
                          dtype=np.uint64, count=len(evs))  # fmt: skip
    state = ct_state_bits(ct, np.zeros(len(ct), dtype=bool))
    nat = (state & 0xC0) != 0  # CT_SNAT | CT_DNAT
    ct, create, read_ms, state = ct[nat], create[nat], read_ms[nat], state[nat]
    batch = empty_batch(len(ct))
    v6 = (ct["o_src"][:, :12] != np.frombuffer(V4_MAPPED_PREFIX, np.uint8)).any(axis=1)
    batch["ethertype"] = np.where(v6, ETH_P_IPV6, ETH_P_IP)
    batch["protocol"] = ct["proto"]
    batch["src_addr"], batch["dst_addr"] = ct["o_src"], ct["o_dst"]
    batch["src_port"], batch["dst_port"] = ct["o_sport"], ct["o_dport"]
    batch["post_src_addr"], batch["post_dst_addr"] = ct["r_dst"], ct["r_src"]
    icmp = np.isin(ct["proto"], (1, 58))
    batch["post_src_port"] = np.where(icmp, 0, ct["r_dport"])
    batch["post_dst_port"] = np.where(icmp, 0, ct["r_sport"])
    batch["nat_event"] = np.where(v6, np.where(create, NAT_EVENT_CREATE, NAT_EVENT_DELETE),
                                  np.where(create, NAT44_SESSION_CREATE, NAT44_SESSION_DELETE))  # fmt: skip
    # The event time (end_ms, exported as flowEndMilliseconds and observationTimeMilliseconds, RFC 8158
    # section 4.2) is the kernel's (CTA_TIMESTAMP, nf_conntrack_timestamp=1): connection start for a
    # create, its stop for a delete; ipfixer's read time only when the kernel gives none.
    has_start, has_stop = (ct["has"] & 2) != 0, (ct["has"] & 4) != 0
    start_ms = ct["ts_start"] // 1_000_000
    stop_ms = ct["ts_stop"] // 1_000_000
    event_ms = np.where(create, np.where(has_start, start_ms, read_ms), np.where(has_stop, stop_ms, read_ms))
    batch["end_ms"] = event_ms
    batch["start_ms"] = np.where(has_start, start_ms, event_ms)
    counted = (ct["has"] & 1) != 0
    batch["packets"] = np.where(counted, ct["o_packets"], 0)
    batch["octets"] = np.where(counted, ct["o_bytes"], 0)
    batch["ct_mark"], batch["ct_zone"], batch["ct_state"] = ct["mark"], ct["zone"], state
    assert batch.dtype == FLOW_DTYPE
    return batch
