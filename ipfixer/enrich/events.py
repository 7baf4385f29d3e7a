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
from ipfixer.enrich.conntrack import (
    _ICMP_PROTOS,
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_NEW,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    ConnKey,
    ConntrackEntry,
    batch_keys,
    open_ctnetlink,
    parse_messages,
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
    """A connection lifecycle event: key is the origin tuple, timestamp_ns is CLOCK_MONOTONIC."""

    key: ConnKey
    kind: Literal["new", "destroy"]
    timestamp_ns: int
    entry: ConntrackEntry | None = None


class ConntrackEvents:
    """NEW/DESTROY subscription of one netns, read with a bounded poll into a bounded queue.

    The daemon calls poll() from the thread it chooses and drain() at drain time. Events that do not
    fit the queue are counted in `dropped`; kernel-side losses (socket overrun, ENOBUFS) in `overruns`.
    """

    def __init__(
        self,
        netns: str | None = None,
        capacity: int = 65536,
        clock: Clock | None = None,
        kinds: Iterable[str] = ("new", "destroy"),
    ) -> None:
        self.netns = netns
        self.clock: Clock = clock or SystemClock()
        self.dropped = 0
        self.overruns = 0
        self.available = False
        self._queue: collections.deque[FlowEvent] = collections.deque()
        self._capacity = capacity
        groups = [{"new": NFNLGRP_CONNTRACK_NEW, "destroy": NFNLGRP_CONNTRACK_DESTROY}[k] for k in kinds]
        self._sock: socket.socket | None = None
        try:
            self._sock = open_ctnetlink(netns, groups)
            self.available = True
        except OSError as exc:
            log.warning("conntrack events disabled (netns %s): %s", netns or "host", exc)

    def fileno(self) -> int:
        """The netlink fd, for the daemon's selector (-1 when unavailable)."""
        return self._sock.fileno() if self._sock is not None else -1

    def poll(self, timeout_s: float = 0.0) -> int:
        """Wait up to timeout_s for events, then read everything pending; events queued."""
        if self._sock is None:
            return 0
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout_s))
        if not ready:
            return 0
        queued = 0
        for _ in range(10000):  # bounded: at most this many datagrams per call
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            now = self.clock.mono_ns()
            for mtype, _err, msg in parse_messages(data):
                if msg is None:
                    continue
                kind: Literal["new", "destroy"]
                if mtype & 0xFF == IPCTNL_MSG_CT_NEW:
                    kind = "new"
                elif mtype & 0xFF == IPCTNL_MSG_CT_DELETE:
                    kind = "destroy"
                else:
                    continue
                entry = ConntrackEntry.from_netlink(msg)
                if entry.origin is None:
                    continue
                if len(self._queue) >= self._capacity:
                    self.dropped += 1
                    continue
                self._queue.append(FlowEvent(entry.origin.key(), kind, now, entry))
                queued += 1
        return queued

    def drain(self) -> list[FlowEvent]:
        """Take every queued event, oldest first."""
        out = list(self._queue)
        self._queue.clear()
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
        ms = mono_to_wall_ms(ev.timestamp_ns, now_wall, now_mono)
        row["start_ms"] = row["end_ms"] = ms
        if e.timestamp_start_ns:
            row["start_ms"] = e.timestamp_start_ns // 1_000_000
        if e.counter_origin is not None:
            row["packets"], row["octets"] = e.counter_origin.packets, e.counter_origin.bytes
        row["ct_mark"] = e.mark or 0
        row["ct_zone"] = e.zone or 0
        row["ct_state"] = e.ct_state(False)
    assert batch.dtype == FLOW_DTYPE
    return batch
