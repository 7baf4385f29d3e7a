"""Prometheus metrics of the running daemon, and the client side used by `ipfixer stats`.

Everything lives on a private CollectorRegistry owned by one `Metrics` object (created by the daemon), so
tests and several instances in one process never collide on the global default registry. All names start
with `ipfixer_`; counters are exposed with the `_total` suffix.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from ipfixer.config import split_host_port
from ipfixer.errors import ConfigError, IpfixerError
from ipfixer.sources import SourceCounters

DIRECTIONS = ("ingress", "egress")
ENRICHMENT_COUNTERS = {
    "hits": "Flow rows matched to a conntrack entry",
    "misses": "Flow rows (not ICMP errors) that matched no conntrack entry",
    "unmatched": "Flow rows left without conntrack data (misses and unmatched ICMP errors)",
    "evictions": "Conntrack entries dropped because ipfixer's table was full",
    "event_overruns": "Times the conntrack event socket overran (ENOBUFS: events lost, resync follows)",
    "overrun_resyncs": "Conntrack re-dumps started because events were lost",
    "recovered_events": "NAT session events lost to an overrun and rebuilt from the next dump",
    "kernel_queries": "Flow tuples looked up in the kernel directly while the table was stale after an overrun",
    "dumps": "Complete conntrack table dumps",
    "dump_errors": "Conntrack dumps that failed or timed out",
    "events": "Conntrack events read",
    "dropped_events": "Conntrack events dropped because a bounded queue was full",
    "parse_errors": "Malformed ctnetlink messages skipped",
}
# Drains take from well under a millisecond (idle box) to a large fraction of a second (full map).
DRAIN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0)


class Metrics:
    """The daemon's metrics; components update the attributes directly (they are thread-safe)."""

    def __init__(self, collectors: Iterable[str] = ()) -> None:
        """`collectors`: names to pre-create at zero so every series exists before its first event."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.packets_observed = Counter(
            "ipfixer_packets_observed",
            "Packets metered (wire packets, GSO expanded): the kernel's counters at each drain", ["direction"],
            registry=r,
        )
        self.octets_observed = Counter(
            "ipfixer_octets_observed", "IP-layer octets metered, as they crossed the wire (kernel, each drain)",
            ["direction"], registry=r,
        )
        self.classifier_packets = Counter(
            "ipfixer_classifier_packets",
            "Packets the classifier counted, by kernel counter (non_ip, fragment, ipv6_ext_limit, bad_length, "
            "trunc_*, map_full, spilled, ...)", ["counter"], registry=r,
        )
        # True once a meter feeds packets/octets_observed from its own live counters (the kernel meter);
        # otherwise they follow the exported flows (count_flows).
        self.observed_live = False
        self.flows_exported = Counter(
            "ipfixer_flows_exported", "Flow records handed to the exporter", registry=r
        )
        self.collector_records = Counter(
            "ipfixer_collector_records", "Data records sent to a collector", ["collector"], registry=r
        )
        self.collector_messages = Counter(
            "ipfixer_collector_messages", "Export messages sent to a collector", ["collector"], registry=r
        )
        self.collector_bytes = Counter(
            "ipfixer_collector_bytes", "UDP payload bytes sent to a collector", ["collector"], registry=r
        )
        self.collector_errors = Counter(
            "ipfixer_collector_errors", "Send or resolve failures for a collector", ["collector"], registry=r
        )
        # pacing (export/pacing.py): messages that waited for the collector's rate, and what was dropped
        self.collector_delayed_messages = Counter(
            "ipfixer_collector_delayed_messages", "Messages paced: queued until the collector's rate allowed them",
            ["collector"], registry=r,
        )
        self.collector_dropped_messages = Counter(
            "ipfixer_collector_dropped_messages", "Paced messages dropped (pacing queue full, or left at shutdown)",
            ["collector"], registry=r,
        )
        self.collector_dropped_records = Counter(
            "ipfixer_collector_dropped_records", "Data records in paced messages dropped", ["collector"], registry=r,
        )
        self.template_refreshes = Counter(
            "ipfixer_template_refreshes", "Template (re)sends to a collector", ["collector"], registry=r
        )
        self.kernel_map_fill_ratio = Gauge(
            "ipfixer_kernel_map_fill_ratio", "Used / max entries of the kernel flow map at the last drain",
            registry=r,
        )
        self.overflow_packets = Counter(
            "ipfixer_overflow_packets", "Packets spilled to the ring buffer because the flow map was full",
            registry=r,
        )
        self.ringbuf_losses = Counter(
            "ipfixer_ringbuf_losses", "Packets lost because the ring buffer was full", registry=r
        )
        self.accounter_evictions = Counter(
            "ipfixer_accounter_evictions", "Flows evicted early from the userspace Accounter (table full)",
            registry=r,
        )
        self.drain_duration = Histogram(
            "ipfixer_drain_duration_seconds", "Time to drain the kernel flow map", buckets=DRAIN_BUCKETS,
            registry=r,
        )
        self.malformed_packets = Counter(
            "ipfixer_malformed_packets", "Packets the meter could not parse", registry=r
        )
        self.conntrack_enrichments = Counter(
            "ipfixer_conntrack_enrichments", "Flows enriched with conntrack / NAT data", registry=r
        )
        # enrichment counters (ipfixer/enrich/pipeline.py Enrichment.counters): name -> Counter
        self.enrichment = {
            name: Counter(f"ipfixer_conntrack_{name}", help_, registry=r)
            for name, help_ in ENRICHMENT_COUNTERS.items()
        }
        self._enrichment_seen: dict[str, int] = {}
        for direction in DIRECTIONS:
            self.packets_observed.labels(direction)
            self.octets_observed.labels(direction)
        for name in collectors:
            self.add_collector(name)
        self._server: WSGIServer | None = None
        self._exporter: Any = None  # the exporter update_exporter last saw, and its cumulative stats
        self._seen: dict[str, dict[str, int]] = {}
        self._source_last: SourceCounters | None = None  # what update_source last saw

    def add_collector(self, name: str) -> None:
        """Create a collector's series at zero, so a silent collector still shows up in a scrape."""
        for counter in (
            self.collector_records, self.collector_messages, self.collector_bytes, self.collector_errors,
            self.template_refreshes, self.collector_delayed_messages, self.collector_dropped_messages,
            self.collector_dropped_records,
        ):
            counter.labels(name)

    # -- daemon-facing helpers ------------------------------------------------------------------
    def observe_drain(self, seconds: float) -> None:
        """One drain cycle took `seconds`."""
        self.drain_duration.observe(seconds)

    def count_enriched(self, rows: int) -> None:
        """An enricher filled `rows` flows (its enrich() return value)."""
        if rows > 0:
            self.conntrack_enrichments.inc(rows)

    def update_enrichment(self, totals: dict[str, int]) -> None:
        """Turn the enrichment's cumulative counters into counter increments (unknown names ignored)."""
        for name, value in totals.items():
            counter = self.enrichment.get(name)
            delta = value - self._enrichment_seen.get(name, 0)
            if counter is not None and delta > 0:
                counter.inc(delta)
            self._enrichment_seen[name] = value

    def count_flows(self, batch: np.ndarray) -> None:
        """Flows handed to the exporter (a FLOW_DTYPE batch), and, unless a meter reports them live
        (observed_live), the packets/octets they carry."""
        n = len(batch)
        if n == 0:
            return
        self.flows_exported.inc(n)
        if self.observed_live:
            return
        for value, direction in enumerate(DIRECTIONS):  # model.Direction: 0 ingress, 1 egress
            rows = batch["direction"] == value
            if rows.any():
                self.packets_observed.labels(direction).inc(int(batch["packets"][rows].sum()))
                self.octets_observed.labels(direction).inc(int(batch["octets"][rows].sum()))

    def update_exporter(self, exporter: Any) -> None:
        """Turn the exporter's cumulative per-collector stats into counter increments.

        A new exporter object (config reload) starts its own totals at zero, so nothing is lost or
        counted twice across a reload.
        """
        if exporter is not self._exporter:
            self._exporter, self._seen = exporter, {}
        for c in exporter.collectors:
            st, session = c.stats, getattr(c.session, "stats", None)
            now = {
                "records": st.records,
                "messages": st.messages,
                "bytes": st.bytes,
                "errors": st.error_count,
                "refreshes": getattr(session, "template_refreshes", 0),
                "delayed": getattr(st, "delayed_messages", 0),
                "dropped_messages": getattr(st, "dropped_messages", 0),
                "dropped_records": getattr(st, "dropped_records", 0),
            }
            last = self._seen.get(c.name, {})
            counters = {
                "records": self.collector_records, "messages": self.collector_messages,
                "bytes": self.collector_bytes, "errors": self.collector_errors,
                "refreshes": self.template_refreshes, "delayed": self.collector_delayed_messages,
                "dropped_messages": self.collector_dropped_messages, "dropped_records": self.collector_dropped_records,
            }
            for key, counter in counters.items():
                delta = now[key] - last.get(key, 0)
                child = counter.labels(c.name)
                if delta > 0:
                    child.inc(delta)
            self._seen[c.name] = now

    def update_source(self, now: SourceCounters) -> None:
        """Follow a flow source's cumulative counters: their increments since the last call become
        metric increments (a source never writes metrics itself)."""
        last = self._source_last or SourceCounters()
        self._source_last = now
        self.observed_live = now.observed_live
        self.overflow_packets.inc(max(0, now.spilled - last.spilled))
        self.ringbuf_losses.inc(max(0, now.ring_lost - last.ring_lost))
        self.malformed_packets.inc(max(0, now.malformed - last.malformed))
        self.accounter_evictions.inc(max(0, now.accounter_evictions - last.accounter_evictions))
        if now.map_fill_ratio is not None:
            self.kernel_map_fill_ratio.set(now.map_fill_ratio)
        self.count_classifier({k: max(0, v - last.classifier.get(k, 0)) for k, v in now.classifier.items()})

    def count_classifier(self, deltas: dict[str, int]) -> None:
        """Increments of the kernel's counters since the last drain, by counter name: observed_* feed
        packets/octets_observed by direction, the rest ipfixer_classifier_packets_total."""
        for name, delta in deltas.items():
            kind, _, direction = name.rpartition("_")
            if kind in ("observed_packets", "observed_octets") and direction in DIRECTIONS:
                counter = self.packets_observed if kind == "observed_packets" else self.octets_observed
                if delta > 0:
                    counter.labels(direction).inc(delta)
                continue
            child = self.classifier_packets.labels(name)  # created at zero on the first call
            if delta > 0:
                child.inc(delta)

    # -- HTTP ------------------------------------------------------------------------------------
    def start_http(self, listen: str) -> None:
        """Serve /metrics on `host:port` (metrics.listen) from a daemon thread."""
        try:
            host, port = split_host_port(listen)
        except ValueError as e:
            raise ConfigError(f"metrics.listen: {e} (got {listen!r})") from None
        if self._server is not None:
            raise RuntimeError("metrics HTTP server already started")
        try:
            self._server, _thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"metrics.listen: cannot listen on {listen}: {e.strerror or e}") from None

    @property
    def http_address(self) -> tuple[str, int] | None:
        """(host, port) actually bound, or None when not serving."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop_http(self) -> None:
        """Stop serving (daemon shutdown, tests)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def render(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def sample_key(name: str, labels: dict[str, str]) -> str:
    """`name{a="x",b="y"}` (labels sorted), or bare `name`: the keys of `parse`/`scrape` results."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def parse(text: str) -> dict[str, float]:
    """Text exposition -> {sample_key: value}, without the `_created` timestamps."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[sample_key(sample.name, dict(sample.labels))] = float(sample.value)
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Fetch and parse a running daemon's metrics; `url` may also be a bare metrics.listen `host:port`."""
    if "://" not in url:
        url = f"http://{url}/metrics"
    if not url.startswith(("http://", "https://")):
        raise IpfixerError(f"cannot scrape {url}: only http:// and https:// URLs")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # http(s) only, checked above
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        hint = "is ipfixer running, with metrics.listen set?"
        raise IpfixerError(f"cannot scrape {url}: {reason} ({hint})") from None
    try:
        return parse(text)
    except ValueError as e:
        raise IpfixerError(f"{url}: not Prometheus text format: {e}") from None
