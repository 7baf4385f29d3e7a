"""Fan-out of flow batches and options records to every configured Collector.

Each collector has its own ExportSession (own sequence numbers and template refresh) and UdpTransport.
A collector that is down or refuses a message only raises its own error counters: the loop never
blocks on it (the sockets are non-blocking) and never stops for it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ipfixer.errors import EncodeError
from ipfixer.export.session import ExportSession, Message
from ipfixer.export.transport import UdpTransport
from ipfixer.model import FlowRecord
from ipfixer.templates import Template

log = logging.getLogger("ipfixer.export")

STATS_FIELD = "exportedMessageTotalCount"  # an options template carrying this is the statistics one
SAMPLING_FIELDS = ("samplingInterval", "samplingPacketInterval")  # ... and these, the sampling one


@dataclass
class CollectorStats:
    """What actually left for one collector (sent) and what did not (errors, not_sent_*)."""

    messages: int = 0
    records: int = 0  # Data Records in sent messages (flow + options)
    flow_records: int = 0
    bytes: int = 0
    not_sent_messages: int = 0
    not_sent_records: int = 0  # flow records in messages the kernel refused
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


class Exporter:
    """Sends every batch to every collector; per-collector statistics feed the stats options records."""

    def __init__(
        self, collectors: Sequence[tuple[str, ExportSession, UdpTransport]], *, metering_process_id: int | None = None
    ) -> None:
        """`collectors`: (name, session, transport) triples; names must be unique."""
        names = [c[0] for c in collectors]
        if len(set(names)) != len(names):
            raise EncodeError(f"collector names must be unique: {names}")
        self.collectors = [Collector(n, s, t) for n, s, t in collectors]
        # RFC 5102 meteringProcessId: the process id identifies this Metering Process instance.
        self.metering_process_id = os.getpid() if metering_process_id is None else metering_process_id

    @property
    def stats(self) -> dict[str, CollectorStats]:
        """Per-collector statistics by collector name."""
        return {c.name: c.stats for c in self.collectors}

    # -- sending -------------------------------------------------------------------------------
    def _run(self, c: Collector, build: Callable[[], list[Message]], *, flows: bool) -> None:
        """Encode with the collector's own session, then send; errors stay with that collector."""
        try:
            messages = build()
        except EncodeError as e:
            c.stats.errors["EncodeError"] += 1
            log.warning("collector=%s encode failed: %s", c.name, e)
            return
        st = c.stats
        for m in messages:
            if c.transport.send(m.data):
                st.messages += 1
                st.records += m.records
                st.bytes += len(m.data)
                if flows:
                    st.flow_records += m.records
            else:
                st.errors[c.transport.last_error or "unknown"] += 1
                st.not_sent_messages += 1
                if flows:
                    st.not_sent_records += m.records

    def export(self, batch: np.ndarray, now_wall_ns: int) -> None:
        """Encode a FLOW_DTYPE batch once per collector (its own protocol/sequence) and send it."""
        if len(batch) == 0:
            self.refresh_templates(now_wall_ns)
            return
        for c in self.collectors:
            self._run(c, partial(c.session.messages, batch, now_wall_ns), flows=True)

    def export_records(self, records: Sequence[FlowRecord], now_wall_ns: int) -> None:
        """The per-record path (templates with variable-length fields)."""
        for c in self.collectors:
            self._run(c, partial(_record_messages, c.session, records, now_wall_ns), flows=True)

    def export_options(
        self, template: str | int | Template, values_list: Sequence[Mapping[str, Any]], now_wall_ns: int
    ) -> None:
        """The same options records to every collector whose session has that options template."""
        for c in self.collectors:
            try:
                c.session.options_template(template)
            except EncodeError:
                continue
            self._run(c, partial(c.session.options_messages, template, values_list, now_wall_ns), flows=False)

    def refresh_templates(self, now_wall_ns: int) -> None:
        """Send a templates-only message to each collector whose refresh is due (idle periods)."""
        for c in self.collectors:
            self._run(c, partial(c.session.template_messages, now_wall_ns), flows=False)

    # -- statistics options records (RFC 7011 4.1 / 4.2) ---------------------------------------
    def stats_values(self, name: str, ignored_packets: int = 0, ignored_octets: int = 0) -> dict[str, Any]:
        """Exporting Process statistics for one collector, keyed by IANA element name."""
        c = next((c for c in self.collectors if c.name == name), None)
        if c is None:
            raise EncodeError(f"no collector named {name!r}")
        st, ss = c.stats, c.session.stats
        return {
            "observationDomainId": c.session.domain_id,
            "meteringProcessId": self.metering_process_id,
            "exportedMessageTotalCount": st.messages,
            "exportedFlowRecordTotalCount": st.flow_records,
            "exportedOctetTotalCount": st.bytes,
            "notSentFlowTotalCount": st.not_sent_records + ss.records_not_exported,
            "ignoredPacketTotalCount": ignored_packets,
            "ignoredOctetTotalCount": ignored_octets,
            "systemInitTimeMilliseconds": c.session.boot_wall_ns // 1_000_000,
        }

    def stats_records(
        self, now_wall_ns: int, ignored_packets: int = 0, ignored_octets: int = 0
    ) -> dict[str, list[dict[str, Any]]]:
        """Per collector, the statistics options records to send it (one record: its own counters)."""
        del now_wall_ns  # the counters are totals; the message's Export Time carries `now`
        return {c.name: [self.stats_values(c.name, ignored_packets, ignored_octets)] for c in self.collectors}

    def export_stats(self, now_wall_ns: int, ignored_packets: int = 0, ignored_octets: int = 0) -> None:
        """Send each collector its own statistics record, if its session has a statistics template."""
        records = self.stats_records(now_wall_ns, ignored_packets, ignored_octets)
        for c in self.collectors:
            t = _find_options(c.session, lambda names: STATS_FIELD in names)
            if t is not None:
                build = partial(c.session.options_messages, t, records[c.name], now_wall_ns)
                self._run(c, build, flows=False)

    def export_sampling(self, now_wall_ns: int, values: Mapping[str, Any]) -> None:
        """Send the sampling configuration record to collectors whose session has a sampling template."""
        for c in self.collectors:
            t = _find_options(c.session, lambda names: any(s in names for s in SAMPLING_FIELDS))
            if t is not None:
                v = [{"observationDomainId": c.session.domain_id, **values}]
                self._run(c, partial(c.session.options_messages, t, v, now_wall_ns), flows=False)

    def close(self) -> None:
        """Close every transport."""
        for c in self.collectors:
            c.transport.close()


def _find_options(session: ExportSession, pred: Callable[[set[str]], bool]) -> Template | None:
    for t in session.options_templates.values():
        if pred({f.name for f in t.fields}):
            return t
    return None


def _record_messages(session: ExportSession, records: Sequence[FlowRecord], now_wall_ns: int) -> list[Message]:
    return session.record_messages(records, now_wall_ns)
