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
from ipfixer.enrich.conntrack import _ICMP_PROTOS, ConnKey, ConntrackEntry, batch_keys
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
    parse_datagram,
)
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FLOW_DTYPE, EndReason, empty_batch

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
        records: list[bytes] = []
        for _ in range(max_datagrams):
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped events: only a dump can tell which
                    self.overruns += 1
                    self.overrun_pending = True
                    continue
                raise
            records.extend(parse_datagram(data, self.parse_stats).records)
        if not records:
            return 0
        rows = np.frombuffer(b"".join(records), dtype=CT_DTYPE).copy()
        self.received += len(rows)
        self._rows.append(rows)
        now = self.clock.mono_ns()
        for i in np.flatnonzero(rows["kind"] != KIND_UPDATE):
            if len(self._queue) >= self._capacity:
                self.dropped += 1
                continue
            entry = ConntrackEntry.from_row(rows[i])
            assert entry.origin is not None
            self._queue.append(FlowEvent(entry.origin.key(), _KINDS[int(rows[i]["kind"])], now, entry))
        return len(rows)

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
    for ev in events:
        if ev.kind != "destroy":
            continue
        if ev.entry is not None and ev.entry.reply is not None:
            out.update(key for key, _ in ev.entry.role_keys())
        else:
            out.add(ev.key)
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
    pre-NAT key in src/dst, translated values in post_*, counters when nf_conntrack_acct is on."""
    clk: Clock = clock or SystemClock()
    now_wall, now_mono = clk.wall_ns(), clk.mono_ns()
    rows = []
    for ev in events:
        e = ev.entry
        if e is None or e.origin is None or e.reply is None or not (e.snat or e.dnat):
            continue
        rows.append((ev, e))
    batch = empty_batch(len(rows))
    for i, (ev, e) in enumerate(rows):
        assert e.origin is not None and e.reply is not None
        o = e.origin.key()
        v6 = e.ipv6
        create = ev.kind == "new"
        row = batch[i]
        row["ethertype"] = ETH_P_IPV6 if v6 else ETH_P_IP
        row["protocol"] = o.protocol
        row["src_addr"] = np.frombuffer(o.src_addr, np.uint8)
        row["dst_addr"] = np.frombuffer(o.dst_addr, np.uint8)
        row["src_port"], row["dst_port"] = o.src_port, o.dst_port
        row["post_src_addr"] = np.frombuffer(e.reply.dst or bytes(16), np.uint8)
        row["post_dst_addr"] = np.frombuffer(e.reply.src or bytes(16), np.uint8)
        if o.protocol not in _ICMP_PROTOS:
            row["post_src_port"], row["post_dst_port"] = e.reply.ports[1], e.reply.ports[0]
        if v6:
            row["nat_event"] = NAT_EVENT_CREATE if create else NAT_EVENT_DELETE
        else:
            row["nat_event"] = NAT44_SESSION_CREATE if create else NAT44_SESSION_DELETE
        # The event time (end_ms, exported as flowEndMilliseconds and observationTimeMilliseconds, RFC
        # 8158 section 4.2) is the kernel's (CTA_TIMESTAMP, nf_conntrack_timestamp=1): connection start
        # for a create, its stop for a delete; ipfixer's read time only when the kernel gives none.
        ms = mono_to_wall_ms(ev.timestamp_ns, now_wall, now_mono)
        if create and e.timestamp_start_ns:
            ms = e.timestamp_start_ns // 1_000_000
        elif not create and e.timestamp_stop_ns:
            ms = e.timestamp_stop_ns // 1_000_000
        row["end_ms"] = ms
        row["start_ms"] = e.timestamp_start_ns // 1_000_000 if e.timestamp_start_ns else ms
        if e.counter_origin is not None:
            row["packets"], row["octets"] = e.counter_origin.packets, e.counter_origin.bytes
        row["ct_mark"] = e.mark or 0
        row["ct_zone"] = e.zone or 0
        row["ct_state"] = e.ct_state(False)
    assert batch.dtype == FLOW_DTYPE
    return batch
