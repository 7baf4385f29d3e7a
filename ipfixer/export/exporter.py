"""Fan-out of flow batches and options records to every configured Collector.

Each collector has its own ExportSession (own sequence numbers and template refresh) and UdpTransport.
A collector that is down or refuses a message only raises its own error counters: the loop never
blocks on it (the sockets are non-blocking) and never stops for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ipfixer.errors import EncodeError
from ipfixer.export.annotate import annotate, vrf_values
from ipfixer.export.biflow import BiflowPairer
from ipfixer.export.options import DEFAULT_ROLES, OptionsRole, interface_values, stats_values
from ipfixer.export.session import ExportSession, Message
from ipfixer.export.transport import CLOSED_UNSENT, QUEUE_FULL, SendResult, UdpTransport
from ipfixer.model import VrfTable
from ipfixer.templates import Template

log = logging.getLogger("ipfixer.export")

# A send refused for one of these may mean the collector restarted and lost the templates, so the next
# message carries them.  A full socket buffer (EAGAIN, ENOBUFS) says nothing of the collector: resending
# templates then would only add bytes when there is least room for them.
UNREACHABLE_ERRORS = frozenset({"ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH"})


@dataclass
class CollectorStats:
    """What actually left for one collector (sent) and what did not (errors, not_sent_*)."""

    messages: int = 0
    records: int = 0  # Data Records in sent messages (flow + options)
    flow_records: int = 0
    bytes: int = 0
    not_sent_messages: int = 0
    not_sent_records: int = 0  # flow records in messages the kernel refused (or pacing dropped)
    # pacing (export/pacing.py): messages that waited for the collector's rate; messages and records (flow +
    # options) dropped because the pacing queue was full or still held them at close (also in not_sent_*)
    delayed_messages: int = 0
    dropped_messages: int = 0
    dropped_records: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # errno name (or "EncodeError") -> count

    @property
    def error_count(self) -> int:
        """Total send and encode errors."""
        return sum(self.errors.values())


@dataclass
class Collector:
    """One configured collector: a name for logs and metrics, its session and its transport."""

    name: str
    session: ExportSession
    transport: UdpTransport
    stats: CollectorStats = field(default_factory=CollectorStats)
    biflow: bool = False  # gets RFC 5103 biflow records (export/biflow.py) instead of uniflows


class Exporter:
    """Sends every batch to every collector; per-collector statistics feed the stats options records."""

    def __init__(
        self,
        collectors: Sequence[tuple[str, ExportSession, UdpTransport]],
        *,
        metering_process_id: int | None = None,
        options_roles: Mapping[OptionsRole, str] | None = None,
        sampling_interval: int = 1,
        biflow: Collection[str] = (),
        biflow_hold_ns: int = 15_000_000_000,
        biflow_max_held: int = 1 << 18,
    ) -> None:
        """`collectors`: (name, session, transport) triples; names must be unique.  `options_roles`: the
        options template (by name) of each role, as the config names them (default: the shipped ones)."""
        names = [c[0] for c in collectors]
        if len(set(names)) != len(names):
            raise EncodeError(f"collector names must be unique: {names}")
        self.collectors = [Collector(n, s, t, biflow=n in biflow) for n, s, t in collectors]
        for c in self.collectors:
            if getattr(c.transport, "pacer", None) is not None:  # paced UDP: results come as messages leave
                c.transport.on_result = partial(self._account, c)
        # biflow collectors: uniflows joined with their reverse, held up to biflow_hold_ns for it
        self.pairer = (BiflowPairer(biflow_hold_ns, biflow_max_held) if any(c.biflow for c in self.collectors)
                       else None)
        self._overflow_logged = 0
        self._last_now_ns = 0  # the latest `now` seen: close() flushes held biflows with it
        # RFC 5102 meteringProcessId: the process id identifies this Metering Process instance.
        self.metering_process_id = os.getpid() if metering_process_id is None else metering_process_id
        self.options_roles: dict[OptionsRole, str] = dict(DEFAULT_ROLES if options_roles is None else options_roles)
        self.interface_names: dict[int, str] = {}  # the latest interface table (fills interfaceName, IE 82)
        # export-time columns (export/annotate.py): the meter's sampling interval, the VRF table (the
        # daemon's VrfWatcher keeps it current; None: VRF columns left as they are)
        self.sampling_interval = sampling_interval
        self.vrfs: VrfTable | None = None

    @property
    def stats(self) -> dict[str, CollectorStats]:
        """Per-collector statistics by collector name."""
        return {c.name: c.stats for c in self.collectors}

    # -- sending -------------------------------------------------------------------------------
    def _run(self, c: Collector, build: Callable[[], Iterable[Message]], *, flows: bool) -> None:
        """Encode with the collector's own session, then send one message at a time; errors stay with that
        collector.  After a send the collector refused (UNREACHABLE_ERRORS) the session is reset, so the next
        message built carries the templates: that collector may be one that restarted without them."""
        st = c.stats
        paced = getattr(c.transport, "pacer", None) is not None
        try:
            for m in build():
                fr = m.records if flows else 0
                if paced:  # queued over the rate; _account runs when it leaves (or is dropped)
                    c.transport.submit(m.data, m.records, fr)
                elif c.transport.send(m.data):
                    self._count(c, len(m.data), m.records, fr, None, False)
                else:
                    self._count(c, len(m.data), m.records, fr, c.transport.last_error or "unknown", False)
        except EncodeError as e:
            st.errors["EncodeError"] += 1
            log.warning("collector=%s encode failed: %s", c.name, e)

    def _account(self, c: Collector, r: SendResult) -> None:
        """A paced message's fate, reported by its transport when it left (or was dropped)."""
        self._count(c, r.size, r.records, r.flow_records, r.error, r.delayed)

    @staticmethod
    def _count(c: Collector, size: int, records: int, flow_records: int, error: str | None, delayed: bool) -> None:
        """Count one message's fate in the collector's stats (plain arguments: ~53,000 calls per 1M-flow drain)."""
        st = c.stats
        if delayed:
            st.delayed_messages += 1
        if error is None:
            st.messages += 1
            st.records += records
            st.bytes += size
            st.flow_records += flow_records
            return
        st.errors[error] += 1
        st.not_sent_messages += 1
        st.not_sent_records += flow_records
        if error in (QUEUE_FULL, CLOSED_UNSENT):
            st.dropped_messages += 1
            st.dropped_records += records
        if error in UNREACHABLE_ERRORS:
            c.session.reset()

    # -- pacing (export/pacing.py) -------------------------------------------------------------
    def service(self) -> float | None:
        """Send what each paced collector's rate allows now (never waits); seconds until the next queued
        message is due (None: nothing queued), so the daemon's loop wakes for it."""
        due: float | None = None
        for c in self.collectors:
            if getattr(c.transport, "pacer", None) is None:
                continue
            c.transport.poll()
            d = c.transport.next_due_s()
            if d is not None:
                due = d if due is None else min(due, d)
        return due

    @property
    def backlog(self) -> int:
        """Paced messages waiting, over every collector."""
        return sum(getattr(c.transport, "backlog", 0) for c in self.collectors)

    def drain(self, timeout_s: float) -> int:
        """Send what paced collectors still queue, for at most `timeout_s` in all; how many are left (close()
        counts them as dropped and logs them)."""
        deadline = time.monotonic() + timeout_s
        while self.backlog and (left := deadline - time.monotonic()) > 0:  # every collector at once, each at its rate
            due = self.service()
            if not self.backlog:
                break
            time.sleep(min(max(due or 0.0, 0.0005), left, 0.05))
        return self.backlog

    def export(self, batch: np.ndarray, now_wall_ns: int, interface_names: Mapping[int, str] | None = None) -> None:
        """Encode a FLOW_DTYPE batch once per collector (its own protocol/sequence) and send it.
        `interface_names` (default: the latest interface table sent) fills interfaceName fields."""
        if len(batch) == 0:
            self.refresh_templates(now_wall_ns)
            return
        names = self.interface_names if interface_names is None else interface_names
        batch = annotate(batch, vrfs=self.vrfs, sampling_interval=self.sampling_interval)
        for c in self.collectors:
            if not c.biflow:
                self._run(c, partial(c.session.iter_messages, batch, now_wall_ns, names), flows=True)
        if self.pairer is not None:
            self._last_now_ns = now_wall_ns
            self._send_biflows(self.pairer.add(batch, now_wall_ns), now_wall_ns)

    def refresh_templates(self, now_wall_ns: int) -> None:
        """Send a templates-only message to each collector whose refresh is due (idle periods); biflow
        collectors get the held uniflows whose partner did not come in time."""
        for c in self.collectors:
            if not c.biflow:
                self._run(c, partial(c.session.template_messages, now_wall_ns), flows=False)
        if self.pairer is not None:
            self._last_now_ns = now_wall_ns
            self._send_biflows(self.pairer.due(now_wall_ns), now_wall_ns)

    def flush(self, now_wall_ns: int) -> None:
        """Send every uniflow still waiting for its reverse, alone (shutdown, reload)."""
        if self.pairer is not None and len(self.pairer):
            self._send_biflows(self.pairer.flush(), now_wall_ns)

    def _send_biflows(self, batch: np.ndarray, now_wall_ns: int) -> None:
        if self.pairer is not None and self.pairer.stats.overflow != self._overflow_logged:
            log.warning("biflow: %d uniflows sent without waiting for their reverse (%d held, the most that may "
                        "wait; %d in all)", self.pairer.stats.overflow - self._overflow_logged, len(self.pairer),
                        self.pairer.stats.overflow)
            self._overflow_logged = self.pairer.stats.overflow
        for c in self.collectors:
            if not c.biflow:
                continue
            if len(batch):
                self._run(c, partial(c.session.iter_messages, batch, now_wall_ns, self.interface_names), flows=True)
            else:
                self._run(c, partial(c.session.template_messages, now_wall_ns), flows=False)

    # -- options records (RFC 7011 4), chosen by role ------------------------------------------
    def role_template(self, c: Collector, role: OptionsRole) -> str | None:
        """The name of the options template this collector's session uses for `role`, if it has one."""
        name = self.options_roles.get(role)
        return name if name is not None and c.session.has_options_template(name) else None

    def export_options_refresh(
        self,
        now_wall_ns: int,
        *,
        sampling: Mapping[str, Any] | None = None,
        interfaces: Mapping[int, str] | None = None,
        vrfs: Mapping[int, str] | None = None,
        ignored_packets: int = 0,
        ignored_octets: int = 0,
        stats: bool = True,
    ) -> None:
        """One refresh of the options records, together in one message per collector (never a tiny
        stand-alone one, never beside flow data): statistics (its own counters), sampling, interface
        table, each to collectors whose session has the template of that role."""
        if interfaces is not None:
            self.interface_names = dict(interfaces)
        for c in self.collectors:
            items: list[tuple[str | int | Template, Sequence[Mapping[str, Any]]]] = []
            if stats and (t := self.role_template(c, OptionsRole.STATS)) is not None:
                items.append((t, [self.stats_values(c.name, ignored_packets, ignored_octets)]))
            if sampling is not None and (t := self.role_template(c, OptionsRole.SAMPLING)) is not None:
                items.append((t, [{"observationDomainId": c.session.domain_id, **sampling}]))
            if interfaces is not None and (t := self.role_template(c, OptionsRole.INTERFACES)) is not None:
                items.append((t, interface_values(interfaces)))
            if vrfs and (t := self.role_template(c, OptionsRole.VRFS)) is not None:  # VRF table id -> name
                items.append((t, vrf_values(c.session.domain_id, vrfs)))
            if items:
                self._run(c, partial(c.session.options_messages, items, now_wall_ns), flows=False)

    def export_options(
        self, template: str | int | Template, values_list: Sequence[Mapping[str, Any]], now_wall_ns: int
    ) -> None:
        """The same options records to every collector whose session has that options template."""
        for c in self.collectors:
            if c.session.has_options_template(template):
                self._run(c, partial(c.session.options_messages, [(template, values_list)], now_wall_ns), flows=False)

    def export_stats(self, now_wall_ns: int, ignored_packets: int = 0, ignored_octets: int = 0) -> None:
        """Send each collector its own statistics record (stats role only)."""
        self.export_options_refresh(now_wall_ns, ignored_packets=ignored_packets, ignored_octets=ignored_octets)

    def export_sampling(self, now_wall_ns: int, values: Mapping[str, Any]) -> None:
        """Send the sampling configuration record (sampling role only)."""
        self.export_options_refresh(now_wall_ns, sampling=values, stats=False)

    # -- statistics options records (RFC 7011 4.1 / 4.2) ---------------------------------------
    def stats_values(self, name: str, ignored_packets: int = 0, ignored_octets: int = 0) -> dict[str, Any]:
        """Exporting Process statistics for one collector, keyed by IANA element name."""
        c = next((c for c in self.collectors if c.name == name), None)
        if c is None:
            raise EncodeError(f"no collector named {name!r}")
        st, ss = c.stats, c.session.stats
        return stats_values(
            domain_id=c.session.domain_id, metering_process_id=self.metering_process_id, messages=st.messages,
            flow_records=st.flow_records, octets=st.bytes, not_sent=st.not_sent_records + ss.records_not_exported,
            ignored_packets=ignored_packets, ignored_octets=ignored_octets, boot_wall_ns=c.session.boot_wall_ns,
        )  # fmt: skip

    def stats_records(
        self, now_wall_ns: int, ignored_packets: int = 0, ignored_octets: int = 0
    ) -> dict[str, list[dict[str, Any]]]:
        """Per collector, the statistics options records to send it (one record: its own counters)."""
        del now_wall_ns  # the counters are totals; the message's Export Time carries `now`
        return {c.name: [self.stats_values(c.name, ignored_packets, ignored_octets)] for c in self.collectors}

    def close(self) -> None:
        """Close every transport, after sending what biflow collectors still wait for (a caller that
        never called flush() loses nothing: replay, tests)."""
        if self.pairer is not None and len(self.pairer):
            self.flush(self._last_now_ns)
        for c in self.collectors:
            c.transport.close()
