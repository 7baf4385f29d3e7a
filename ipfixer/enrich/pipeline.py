"""The enrichment stage of the daemon: conntrack table, conntrack NEW/DESTROY events and cgroup
attribution behind the five calls the loop makes (start, poll, enrich, nat_event_batch, close).

Conntrack I/O runs in its own thread (ipfixer.enrich.ctsync): events are read as they come and the
table is re-dumped every `enrichment.conntrack_resync_interval` and after any event overrun, so a
drain never waits for conntrack; the daemon's thread only joins batches against the current snapshot
(vectorised) and takes queued NEW/DESTROY events. A missing conntrack (no module, no permission) is
logged once and enrichment goes on without it: flows are still exported, with their conntrack columns
zero ("unknown"). Flows that match no entry are counted (`unmatched`) and logged at most once a minute.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import numpy as np

from ipfixer.clock import Clock
from ipfixer.config import Config
from ipfixer.enrich.conntrack import CT_INVALID, CT_TRACKED, ConnKey, ConntrackTable, never_tracked_rows
from ipfixer.enrich.ctsync import ConntrackSync
from ipfixer.enrich.events import ConntrackEvents, FlowEvent, apply_destroy, destroyed_keys, nat_event_records
from ipfixer.model import empty_batch

log = logging.getLogger("ipfixer.enrich")

MAX_EVENTS = 65536  # NAT event rows and DESTROY keys held between two drains (oldest dropped beyond)
UNMATCHED_LOG_INTERVAL_NS = 60_000_000_000
FIRST_DUMP_WAIT_S = 2.0  # start() waits this long for the first dump (a 100k table takes well under)


class Enrichment:
    """Conntrack + NAT events + cgroups for the daemon, each part optional and each bounded.

    DESTROY events are remembered (bounded, per connection, until a NEW of the same tuple or until
    `destroy_retention_ns` passes) so that a flow the kernel drainer exports at its idle timeout after
    its connection was destroyed still gets flowEndReason 3.
    """

    def __init__(self, config: Config, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        e = config.enrichment
        self.want_conntrack = e.conntrack
        self.want_nat_events = e.nat_events
        self.want_cgroups = e.cgroups
        self.table: ConntrackTable | None = None
        self.events: ConntrackEvents | None = None
        self.sync: ConntrackSync | None = None
        self.icmp: Any = None
        self.unmatched = 0  # flow rows that found no conntrack entry (ICMP errors included, ND/MLD not)
        self._unmatched_logged_ns: int | None = None
        self._unmatched_since_log = 0
        self.cgroups: Any = None
        # a destroyed connection's flow may still be in the kernel map for up to idle (+ one drain)
        self.destroy_retention_ns = int((config.timeouts.idle + 2 * config.timeouts.drain_interval) * 1e9)
        self._nat_pending: collections.deque[FlowEvent] = collections.deque(maxlen=MAX_EVENTS)
        self._destroys: collections.OrderedDict[ConnKey, FlowEvent] = collections.OrderedDict()
        self._destroyed_since: set[ConnKey] = set()
        self._warned: set[str] = set()
        self.dropped_events = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Open what the config asks for; whatever is unavailable is logged once and skipped."""
        e = self.config.enrichment
        max_entries = max(self.config.cache.accounter_max_entries, 65536)
        # each part logs its own warning (once) when it cannot start, then stays unavailable
        if self.want_conntrack:
            self.table = ConntrackTable(max_entries=e.conntrack_max_entries, open_socket=False)
        if self.want_conntrack or self.want_nat_events:
            kinds = ("new", "update", "destroy") if self.want_conntrack else ("new", "destroy")
            self.events = ConntrackEvents(capacity=MAX_EVENTS, clock=self.clock, kinds=kinds,
                                          rcvbuf=e.conntrack_events_buffer)  # fmt: skip
        if self.table is not None:
            self.sync = ConntrackSync(self.table, self.events, resync_interval_s=e.conntrack_resync_interval)
            self.sync.start()
            self.sync.first_dump.wait(FIRST_DUMP_WAIT_S)
            from ipfixer.enrich.icmp import IcmpErrors

            self.icmp = IcmpErrors(self.table)
        elif self.events is not None and self.events.available:
            self.sync = ConntrackSync(ConntrackTable(open_socket=False), self.events, dumps=False)
            self.sync.start()
        if self.want_cgroups:
            from ipfixer.enrich.cgroups import CgroupAttributor

            self.cgroups = CgroupAttributor(max_entries=max_entries)
        log.info("enrichment conntrack=%s nat_events=%s cgroups=%s", self.conntrack_available,
                 self.events is not None and self.events.available,
                 self.cgroups is not None and self.cgroups.available)  # fmt: skip

    @property
    def conntrack_available(self) -> bool:
        """Whether flows are being joined to conntrack right now."""
        return self.table is not None and self.table.available

    def close(self) -> None:
        """Release every socket and BPF program (idempotent)."""
        if self.sync is not None:
            self.sync.stop()
            self.sync = None
        for part in (self.table, self.events, self.cgroups, self.icmp):
            if part is not None:
                try:
                    part.close()
                except OSError as exc:
                    log.warning("closing enrichment part failed: %s", exc)
        self.table = self.events = self.cgroups = self.icmp = None

    # -- per loop iteration ----------------------------------------------------------------------
    def poll(self) -> None:
        """Non-blocking: take the events the sync thread queued, and cgroup ring-buffer records."""
        if self.events is not None:
            self._take_events(self.events.drain())
        if self.icmp is not None:
            self.icmp.poll()
        if self.cgroups is not None and self.cgroups.available:
            self.cgroups.poll(0)

    def counters(self) -> dict[str, int]:
        """Cumulative enrichment counters for metrics (name -> total)."""
        out = {"unmatched": self.unmatched, "dropped_events": self.dropped_events}
        if self.table is not None:
            c = self.table.counters
            out.update(hits=c.hits, misses=c.misses, evictions=c.evictions, dumps=c.dumps, kernel_queries=c.kernel_queries,
                       dump_errors=c.dump_errors, parse_errors=self.table.parse_stats.malformed)  # fmt: skip
        if self.events is not None:
            out.update(event_overruns=self.events.overruns, events=self.events.received,
                       dropped_events=self.dropped_events + self.events.dropped)  # fmt: skip
        if self.sync is not None:
            out["overrun_resyncs"] = self.sync.overrun_resyncs
            out["recovered_events"] = self.sync.recovered_events
        return out

    def _take_events(self, events: list[FlowEvent]) -> None:
        now = self.clock.mono_ns()
        for ev in events:
            if self.want_nat_events:
                if len(self._nat_pending) == self._nat_pending.maxlen:
                    self.dropped_events += 1
                self._nat_pending.append(ev)
            if ev.kind == "new":
                self._destroys.pop(ev.key, None)  # the tuple is alive again
                continue
            self._destroys[ev.key] = ev
            self._destroys.move_to_end(ev.key)
            if len(self._destroyed_since) < MAX_EVENTS:
                self._destroyed_since.update(destroyed_keys([ev]))
            else:
                self.dropped_events += 1
        while self._destroys:
            first = next(iter(self._destroys.values()))
            if len(self._destroys) <= MAX_EVENTS and now - first.timestamp_ns <= self.destroy_retention_ns:
                break
            self._destroys.popitem(last=False)

    # -- per drain -------------------------------------------------------------------------------
    def enrich(self, batch: np.ndarray) -> int:
        """Join a batch about to be exported (in place); rows enriched by conntrack or cgroups.

        NAT event rows (nat_event != 0) are left as built: they already carry their translation and
        must not be re-stated or given a flow end reason.
        """
        if len(batch) == 0:
            return 0
        self.poll()  # events that arrived since the last loop iteration count for this batch
        flows_idx = np.flatnonzero(batch["nat_event"] == 0)
        if len(flows_idx) == 0:
            return 0
        whole = len(flows_idx) == len(batch)
        rows = batch if whole else batch[flows_idx]
        enriched = np.zeros(len(rows), dtype=bool)
        if self.table is not None and self.table.available:
            self.table.enrich(rows)  # vectorised against the sync thread's current snapshot
            if self.sync is not None and self.sync.stale:
                miss = np.flatnonzero(rows["ct_state"] == 0)
                budget = 0.4 * self.config.timeouts.drain_interval  # the drain keeps its interval
                if len(miss) and self.table.query_kernel(rows[miss], self.table.zones(), budget):
                    c = self.table.counters
                    hits, misses = c.hits, c.misses
                    sub = rows[miss]
                    self.table.enrich(sub)
                    rows[miss] = sub
                    c.misses = misses - (c.hits - hits)  # misses that the kernel answered became hits
            if self.icmp is not None:
                self.icmp.enrich(rows)  # ICMP errors, on the tuple they quote
            matched = (rows["ct_state"] != 0) & (rows["ct_state"] != CT_TRACKED | CT_INVALID)
            enriched |= matched
            self._count_unmatched(int((~matched & ~never_tracked_rows(rows)).sum()), len(rows))
        if self.cgroups is not None and self.cgroups.available:
            self.cgroups.enrich(rows)
            enriched |= rows["cgroup_id"] != 0
        if self._destroys:
            apply_destroy(self._destroys.values(), rows)
        if not whole:
            batch[flows_idx] = rows
        return int(enriched.sum())

    def nat_event_batch(self) -> np.ndarray:
        """NAT session create/delete rows (FLOW_DTYPE) since the last call; empty when nat_events is off."""
        if not self.want_nat_events:
            return empty_batch(0)
        self.poll()
        events, self._nat_pending = list(self._nat_pending), collections.deque(maxlen=MAX_EVENTS)
        if not events:
            return empty_batch(0)
        rows = nat_event_records(events, self.clock)
        # These rows share the flow templates, where packet/octet counts are *delta* counts that
        # collectors add up: a session's cumulative conntrack counters there would count its traffic
        # twice (once in the flows, once in the event), so an event row carries no counters.
        rows["packets"] = 0
        rows["octets"] = 0
        return rows

    def destroyed_keys(self) -> set[ConnKey]:
        """Flow keys (every direction, pre- and post-NAT) of connections destroyed since the last call:
        what a drainer needs to end those flows early instead of waiting for their idle timeout."""
        self.poll()
        out, self._destroyed_since = self._destroyed_since, set()
        return out

    def _count_unmatched(self, missed: int, total: int) -> None:
        """Count flows no conntrack entry matched; say so in the log at most once a minute."""
        if missed <= 0:
            return
        self.unmatched += missed
        self._unmatched_since_log += missed
        now = self.clock.mono_ns()
        if self._unmatched_logged_ns is not None and now - self._unmatched_logged_ns < UNMATCHED_LOG_INTERVAL_NS:
            return
        self._unmatched_logged_ns = now
        size = len(self.table) if self.table is not None else 0
        log.warning("conntrack: %d flows matched no conntrack entry (%d in this drain of %d; table holds %d "
                    "entries): untracked (notrack) traffic, conntrack not loaded where the traffic passes, or "
                    "entries gone before the flow was exported", self._unmatched_since_log, missed, total,
                    size)  # fmt: skip
        self._unmatched_since_log = 0

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)
