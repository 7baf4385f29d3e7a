"""The enrichment stage of the daemon: conntrack table, conntrack NEW/DESTROY events and cgroup
attribution behind the five calls the loop makes (start, poll, enrich, nat_event_batch, close).

Everything runs on the daemon's single thread: poll() is non-blocking and only moves pending
events into bounded queues; the conntrack dump happens in enrich() (at most once per drain interval),
never per packet. A missing conntrack (no module, no permission) is logged once and enrichment goes
on without it: flows are still exported, with their conntrack columns zero ("unknown").
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import numpy as np

from ipfixer.clock import Clock
from ipfixer.config import Config
from ipfixer.enrich.conntrack import ConnKey, ConntrackTable
from ipfixer.enrich.events import ConntrackEvents, FlowEvent, apply_destroy, destroyed_keys, nat_event_records
from ipfixer.model import empty_batch

log = logging.getLogger("ipfixer.enrich")

MAX_EVENTS = 65536  # NAT event rows and DESTROY keys held between two drains (oldest dropped beyond)


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
        self.cgroups: Any = None
        self.refresh_interval_ns = int(config.timeouts.drain_interval * 1e9)
        # a destroyed connection's flow may still be in the kernel map for up to idle (+ one drain)
        self.destroy_retention_ns = int((config.timeouts.idle + 2 * config.timeouts.drain_interval) * 1e9)
        self._last_refresh_ns: int | None = None
        self._nat_pending: collections.deque[FlowEvent] = collections.deque(maxlen=MAX_EVENTS)
        self._destroys: collections.OrderedDict[ConnKey, FlowEvent] = collections.OrderedDict()
        self._destroyed_since: set[ConnKey] = set()
        self._to_ingest: collections.deque[FlowEvent] = collections.deque(maxlen=MAX_EVENTS)
        self._warned: set[str] = set()
        self.dropped_events = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Open what the config asks for; whatever is unavailable is logged once and skipped."""
        max_entries = max(self.config.cache.accounter_max_entries, 65536)
        # each part logs its own warning (once) when it cannot start, then stays unavailable
        if self.want_conntrack:
            self.table = ConntrackTable(max_entries=max_entries)
        if self.want_conntrack or self.want_nat_events:
            self.events = ConntrackEvents(capacity=MAX_EVENTS, clock=self.clock)
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
        for part in (self.table, self.events, self.cgroups):
            if part is not None:
                try:
                    part.close()
                except OSError as exc:
                    log.warning("closing enrichment part failed: %s", exc)
        self.table = self.events = self.cgroups = None

    # -- per loop iteration ----------------------------------------------------------------------
    def poll(self) -> None:
        """Non-blocking: move pending conntrack events and cgroup ring-buffer records into queues."""
        if self.events is not None and self.events.available:
            try:
                self.events.poll(0.0)
            except OSError as exc:
                self._warn_once("events-poll", f"conntrack events stopped: {exc}")
                self.events.close()
            self._take_events(self.events.drain())
        if self.cgroups is not None and self.cgroups.available:
            self.cgroups.poll(0)

    def _take_events(self, events: list[FlowEvent]) -> None:
        now = self.clock.mono_ns()
        for ev in events:
            if self.table is not None:
                self._to_ingest.append(ev)
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
            for ev in self._to_ingest:
                if ev.entry is not None:
                    self.table.ingest(ev.entry)
            self._to_ingest.clear()
            now = self.clock.mono_ns()
            if self._last_refresh_ns is None or now - self._last_refresh_ns >= self.refresh_interval_ns:
                self._last_refresh_ns = now
                self.table.refresh()  # a refused dump logs once and closes the table: enrichment goes on
            if self.table.available:
                self.table.enrich(rows)
                enriched |= rows["ct_state"] != 0
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

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s", message)
