"""The daemon: the one module that wires the stages, owns the loop and handles signals.

kernel map / ring buffer -> Accounter -> FLOW_DTYPE batches -> enrichment -> Exporter -> UDP.
Everything runs in one thread: the ring buffer is polled with a timeout that ends at the next drain,
so no lock is needed and SIGHUP/SIGTERM are acted on between two polls.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import numpy as np

from ipfixer.caps import check_capabilities
from ipfixer.clock import Clock, SystemClock
from ipfixer.config import Config, load_config
from ipfixer.errors import ConfigError, IpfixerError
from ipfixer.export.factory import build_exporter, load_config_templates, sampling_values
from ipfixer.sources import FlowSource

if TYPE_CHECKING:  # imported where they are built: each pulls in what only its feature needs
    from ipfixer.control import ControlServer
    from ipfixer.enrich.pipeline import Enrichment
    from ipfixer.export.exporter import Exporter
    from ipfixer.metrics import Metrics
    from ipfixer.sources.kernel.vrf import VrfWatcher

log = logging.getLogger("ipfixer")
PACED_DRAIN_S = 5.0  # shutdown/reload: how long paced collectors' queues may still drain at their rate


def collector_urls(cfg: Config) -> str:
    """`ipfix://10.0.0.9:4739,netflow9://[::1]:2055`: IPv6 literals in brackets (RFC 3986 3.2.2)."""
    return ",".join(
        f"{c.protocol}://{f'[{c.address}]' if ':' in c.address else c.address}:{c.port}" for c in cfg.collectors
    )


def setup_logging(level: str) -> None:
    """Structured (key=value) logs on stderr."""
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )


@dataclass
class _Signals:
    """Flags set by signal handlers and acted on by the loop between two polls."""

    stop: bool = False
    reload: bool = False

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stop = True


class Daemon:
    """ipfixer's exporting appliance, configured by a validated Config."""

    def __init__(self, config: Config, config_path: Path | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.signals = _Signals()
        self.boot_wall_ns = self.clock.wall_ns()
        self._metrics: Metrics | None = None
        self._meter: FlowSource | None = None
        self._exporter: Exporter | None = None
        self._enrichment: Enrichment | None = None
        self._next_stats_ns = 0
        self._interface_table: dict[int, str] = {}
        self._control: ControlServer | None = None  # `ipfixer ctl` commands, run by the loop
        self._vrfs: VrfWatcher | None = None  # while a data template carries VRF ids
        self._vrf_names: dict[int, str] = {}

    @property
    def _src(self) -> FlowSource:
        """The running source: the loop, a drain and a reload only run after _start has set it."""
        if self._meter is None:
            raise IpfixerError("the daemon has no flow source: it was not started")
        return self._meter

    @property
    def _out(self) -> Exporter:
        """The running exporter (set by _start before the loop, replaced by a reload)."""
        if self._exporter is None:
            raise IpfixerError("the daemon has no exporter: it was not started")
        return self._exporter

    @property
    def _m(self) -> Metrics:
        """The daemon's metrics (set first thing in _start)."""
        if self._metrics is None:
            raise IpfixerError("the daemon has no metrics: it was not started")
        return self._metrics

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self, duration_s: float | None = None) -> int:
        """Run until SIGTERM/SIGINT (or `duration_s`), then flush every flow and detach."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.signals.handler)
        try:
            self._start()
            deadline = None if duration_s is None else time.monotonic() + duration_s
            self._loop(deadline)
        finally:
            self._shutdown()  # undoes whatever part of _start succeeded
        return 0

    def _start(self) -> None:
        from ipfixer.metrics import Metrics

        cfg = self.config
        # Capabilities first: a missing one is refused before anything listens (metrics port) or is
        # subscribed to, with a message naming it (not an EADDRINUSE or EPERM from a later step).
        check_capabilities(need_bpf=cfg.source != "nflog")
        self._metrics = Metrics([c.name for c in cfg.collectors])
        if cfg.metrics.listen:
            self._metrics.start_http(cfg.metrics.listen)
            log.info("metrics listen=%s", cfg.metrics.listen)
        self._exporter = build_exporter(cfg, self.boot_wall_ns)
        e = cfg.enrichment
        if e.conntrack or e.nat_events or e.cgroups:
            from ipfixer.enrich.pipeline import Enrichment

            self._enrichment = Enrichment(cfg, self.clock)
            self._enrichment.start()
        meter: FlowSource
        if cfg.source == "nflog":
            from ipfixer.sources.nflog import NflogMeter

            meter = NflogMeter(cfg, self.clock)
        else:
            from ipfixer.sources.ebpf import Meter

            meter = Meter(cfg, self.clock)
        meter.start()  # undoes itself on failure
        self._meter = meter
        self._metrics.update_source(meter.source_counters())  # every series exists from the start
        self._follow_vrfs()
        self._send_options(force=True)
        from ipfixer.control import ControlServer, socket_path

        self._control = ControlServer(socket_path(cfg))
        self._control.start()
        self._warn_if_nothing_metered("yet")
        log.info("started interfaces=%s collectors=%s", ",".join(self._meter.interfaces()),
                 collector_urls(cfg))

    def _warn_if_nothing_metered(self, when: str) -> None:
        """A selection that matches no interface meters nothing: say so (at start and after a reload)."""
        if not self._src.interfaces():
            inc, exc = list(self.config.interfaces.include), list(self.config.interfaces.exclude)
            log.warning("no interface matches interfaces.include=%s exclude=%s %s; metering nothing until one "
                        "appears", inc, exc, when)

    def _loop(self, deadline: float | None) -> None:
        interval_ns = int(self.config.timeouts.drain_interval * 1e9)
        next_drain = self.clock.mono_ns() + interval_ns
        while not self.signals.stop:
            now = self.clock.mono_ns()
            if deadline is not None and time.monotonic() >= deadline:
                break
            if now >= next_drain:
                self._cycle()
                next_drain = now + interval_ns
            if self.signals.reload:
                self.signals.reload = False
                self._reload()
            wait_ms = max(0, min(250, (next_drain - self.clock.mono_ns()) // 1_000_000))
            due = self._out.service()  # paced collectors: what their rate allows now, never waiting
            if due is not None:  # a queue waits: wake when its next message is due
                wait_ms = min(wait_ms, max(1, math.ceil(due * 1000)))  # 1 ms at least: never a busy loop
            self._src.poll(int(wait_ms))
            if self._enrichment is not None:
                self._enrichment.poll()
            if self._control is not None:
                self._control.serve_pending(self)  # between two polls: export never waits for a client

    def _cycle(self) -> None:
        """One drain: expired kernel flows + Accounter evictions -> enrichment -> export."""
        started = time.perf_counter()
        ended = {k.packed() for k in self._enrichment.destroyed_keys()} if self._enrichment else set()
        batches = self._src.drain(end_keys=ended)
        self._m.update_source(self._src.source_counters())
        if self._enrichment is not None:
            batches.append(self._enrichment.nat_event_batch())
        self._export(batches)
        self._m.observe_drain(time.perf_counter() - started)
        self._send_options(force=False)

    def _export(self, batches: list[np.ndarray]) -> None:
        batches = [b for b in batches if len(b)]
        if not batches:
            self._out.refresh_templates(self.clock.wall_ns())  # idle: templates still go out on time
            return
        batch = np.concatenate(batches) if len(batches) > 1 else batches[0]
        if self._enrichment is not None:
            try:
                self._m.count_enriched(self._enrichment.enrich(batch))
                self._m.update_enrichment(self._enrichment.counters())
            except IpfixerError as exc:
                log.warning("enrichment failed: %s", exc)
        self._poll_vrfs()  # VRF ids are looked up at export time (export/annotate.py)
        now = self.clock.wall_ns()
        self._out.export(batch, now)
        self._m.count_flows(batch)
        self._m.update_exporter(self._exporter)

    def _send_options(self, force: bool) -> None:
        """Statistics, sampling and interface-table options records: every stats_interval, and the
        interface table also as soon as the metered interfaces change (a new veth appeared)."""
        now = self.clock.wall_ns()
        table = self._current_interfaces()
        if table != self._interface_table:
            self._interface_table = table
            force = True
        self._poll_vrfs()
        vrf_names = dict(self._vrfs.table.names) if self._vrfs is not None else {}
        if vrf_names != self._vrf_names:  # a VRF appeared, went or was renamed: its names at once
            self._vrf_names = vrf_names
            force = True
        if not force and now < self._next_stats_ns:
            return
        self._next_stats_ns = now + int(self.config.templates.stats_interval * 1e9)
        # One refresh, one message per collector (statistics + sampling + interface table together).
        self._out.export_options_refresh(now, sampling=sampling_values(self.config), interfaces=table,
                                              vrfs=vrf_names,
                                              ignored_packets=self._meter.ignored_packets() if self._meter else 0)

    def _follow_vrfs(self) -> None:
        """Follow the VRF table (kernel/vrf.py) while some collector's data template carries VRF ids."""
        from ipfixer.export.annotate import templates_use_vrf

        wanted = any(templates_use_vrf(c.session.data_templates.values()) for c in self._out.collectors)
        if wanted and self._vrfs is None:
            from ipfixer.sources.kernel.vrf import VrfWatcher

            self._vrfs = VrfWatcher()
        elif not wanted and self._vrfs is not None:
            self._vrfs.close()
            self._vrfs = None
        self._out.vrfs = self._vrfs.table if self._vrfs is not None else None

    def _poll_vrfs(self) -> None:
        """Apply VRF enslave/release events seen since the last poll (never waits)."""
        if self._vrfs is not None:
            self._vrfs.poll()
            self._out.vrfs = self._vrfs.table

    def _current_interfaces(self) -> dict[int, str]:
        table = {}
        for name in self._meter.interfaces() if self._meter else []:
            try:
                table[socket.if_nametoindex(name)] = name
            except OSError:  # vanished since the meter listed it
                continue
        return table

    def _reload(self) -> None:
        """SIGHUP: re-read the config; collectors, timeouts and interfaces change, no packet is lost:
        flows still in the kernel map stay there and go to the new collectors at the next drain."""
        if self.config_path is None:
            log.warning("reload requested but no config file to reload")
            return
        try:
            new = load_config(self.config_path)
            new_exporter = build_exporter(new, self.boot_wall_ns)
            load_config_templates(new)
        except (ConfigError, IpfixerError) as exc:
            log.error("reload rejected, keeping the running config: %s", str(exc).replace("\n", "; "))
            return
        if new.source != self.config.source or new.enrichment != self.config.enrichment:
            log.warning("source and enrichment change only at restart; keeping source=%s", self.config.source)
        self._cycle()  # what was due goes out on the old collectors before they change
        old_exporter, self._exporter = self._out, new_exporter
        old_exporter.flush(self.clock.wall_ns())  # uniflows waiting for their reverse (biflow collectors)
        if old_exporter.backlog:  # paced collectors: what still waits goes out first (bounded)
            old_exporter.drain(PACED_DRAIN_S)
        old_exporter.close()
        self._follow_vrfs()
        self.config = new
        before = set(self._src.interfaces())
        self._src.reconfigure(new)
        gone = sorted(before - set(self._src.interfaces()))
        if gone:
            log.warning("reload: stopped metering %s (no longer selected)", ",".join(gone))
        self._warn_if_nothing_metered("after the reload")
        self._send_options(force=True)
        log.info("reloaded config=%s collectors=%s", self.config_path, collector_urls(new))

    def _drain_paced(self) -> None:
        """Send what paced collectors still queue, at their rate, for at most PACED_DRAIN_S; close() counts
        and logs what is left as dropped."""
        if self._out.backlog:
            left = self._out.drain(PACED_DRAIN_S)
            if left:
                log.warning("paced export: %d messages still queued after %.0f s: dropped", left, PACED_DRAIN_S)
            self._m.update_exporter(self._exporter)

    def _shutdown(self) -> None:
        """Flush everything still in the kernel map and the Accounter, then detach."""
        try:
            if self._meter is not None and self._exporter is not None:
                batches = self._meter.flush()
                self._m.update_source(self._meter.source_counters())
                if self._enrichment is not None:
                    self._enrichment.poll()
                    batches.append(self._enrichment.nat_event_batch())
                self._export(batches)
                self._exporter.flush(self.clock.wall_ns())  # biflow collectors: what still waits for a partner
                self._send_options(force=True)
                self._drain_paced()
                counters = " ".join(f"{k}={v}" for k, v in sorted(self._meter.counters().items()))
                log.info("flushed remaining flows; final counters %s", counters)
        finally:
            if self._control is not None:
                self._control.close()
            if self._meter is not None:
                self._meter.stop()
            if self._enrichment is not None:
                self._enrichment.close()
            if self._exporter is not None:
                self._exporter.close()
            if self._vrfs is not None:
                self._vrfs.close()
            if self._metrics is not None:
                self._metrics.stop_http()
            log.info("stopped")


