"""The kernel meter as one unit for the daemon: program, attachments, link watcher, drain, spill path.

It owns the instance lock (ipfixer.instance: one ipfixer per network namespace, since stale-filter
cleanup and the link watcher act on every matching interface of the namespace) and reports the kernel's
counters as SourceCounters (the daemon turns them into metrics). Every batch it returns is a FLOW_DTYPE array, from the kernel map or from the Accounter.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Collection
from typing import Any

import numpy as np

from ipfixer.caps import check_capabilities
from ipfixer.clock import Clock
from ipfixer.config import Config
from ipfixer.instance import NamespaceLock
from ipfixer.sources import SourceCounters

__all__ = ["Meter", "NamespaceLock", "interface_name", "sampling_cflags", "tunnel_cflags"]  # NamespaceLock: the NFLOG meter's too

log = logging.getLogger("ipfixer.sources.ebpf")
# Kernel counters of packets the classifier could not parse as they claim to be (malformed_packets).
MALFORMED_COUNTERS = ("trunc_l2", "trunc_l3", "trunc_l4", "malformed", "bad_length")


def interface_name(ifindex: int) -> str:
    """Name of an interface of this namespace by index ('' when it has gone)."""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return ""


class Meter:
    """Loads the classifier, attaches it, and yields flow batches from the map and the spill path."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._lock = NamespaceLock(config.lock_dir)
        self._prog: Any = None
        self._attacher: Any = None
        self._watcher: Any = None
        self._drainer: Any = None
        self._spill: Any = None
        self._pending: list[np.ndarray] = []
        self._last_counters: dict[str, int] = {}
        self._decap_ifindexes: set[int] = set()  # what the classifier's decap_ifaces map holds
        self._decap_basis: tuple[frozenset[int], Any] | None = None  # (attached ifindexes, tunnels config) of it

    def start(self) -> None:
        """Everything needed before the first packet is counted; undone on failure."""
        from ipfixer.flows.accounter import Accounter
        from ipfixer.sources.kernel.attach import Attacher, InterfaceSelector, LinkWatcher
        from ipfixer.sources.kernel.drain import Drainer
        from ipfixer.sources.kernel.program import COUNTER_NAMES, load_program
        from ipfixer.sources.kernel.spill import SpillConsumer

        cfg = self.config
        check_capabilities()
        self._lock.acquire()
        try:
            self._prog = load_program(cfg.cache.kernel_map_entries, cfg.cache.ring_buffer_pages,
                                      sampling_cflags(cfg.sampling.interval) + tunnel_cflags(cfg.tunnels.decap))
            self._attacher = Attacher(self._prog.ingress_fd, self._prog.egress_fd, cfg.interfaces.direction,
                                      namespace_locked=True)
            stale = self._attacher.remove_stale()
            if stale:
                log.warning("removed %d stale ipfixer filter(s) left by an earlier run", stale)
            selector = InterfaceSelector(tuple(cfg.interfaces.include), tuple(cfg.interfaces.exclude))
            self._watcher = LinkWatcher(self._attacher, selector)
            self._watcher.start()
            self._sync_decap()
            accounter = Accounter(cfg.cache.accounter_max_entries, int(cfg.timeouts.idle * 1e9), self.clock,
                                  interface_name, active_timeout_ns=int(cfg.timeouts.active * 1e9),
                                  tunnels=cfg.tunnels.decap)
            self._spill = SpillConsumer(self._prog.bpf, self._prog.spill, self._prog.spill_dtype, accounter)
            self._drainer = Drainer(self._prog.flows, self.clock, int(cfg.timeouts.active * 1e9),
                                    int(cfg.timeouts.idle * 1e9), interface_name, sweep_drains=sweep_drains(cfg))
            self._last_counters = dict.fromkeys(COUNTER_NAMES, 0)  # every series exists at zero
        except BaseException:
            self.stop()
            raise

    def interfaces(self) -> list[str]:
        """Names of the interfaces currently metered."""
        if self._attacher is None:
            return []
        return sorted(a.ifname for a in self._attacher.attached.values())

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for spilled packets and account them (the daemon's idle wait); apply
        link events (new interfaces that match are attached, vanished ones forgotten)."""
        self._watcher.poll(0.0)
        self._sync_decap()
        self._lock.answer_probes()
        self._pending.extend(self._spill.poll(timeout_ms))

    def drain(self, end_keys: Collection[bytes] = ()) -> list[np.ndarray]:
        """Flows due for export: expired kernel entries (and those of `end_keys`, connections conntrack
        destroyed) plus whatever the Accounter evicted."""
        out, self._pending = self._pending, []
        out.append(self._drainer.drain(end_keys=end_keys))
        self._read_counters()
        return out

    def flush(self) -> list[np.ndarray]:
        """Every flow still held, kernel map and Accounter (shutdown)."""
        out, self._pending = self._pending, []
        if self._spill is not None:
            out.extend(self._spill.flush())
        if self._drainer is not None:
            out.append(self._drainer.flush())
        self._read_counters()
        return out

    def ignored_packets(self) -> int:
        """Packets observed but not accounted (ring buffer full): ignoredPacketTotalCount."""
        return self._last_counters.get("ringbuf_fail", 0)

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: timeouts and the interface selection (map sizes need a restart)."""
        from ipfixer.sources.kernel.attach import InterfaceSelector, directions

        old = self.config
        self.config = config
        self._drainer.active_timeout_ns = int(config.timeouts.active * 1e9)
        self._drainer.idle_timeout_ns = int(config.timeouts.idle * 1e9)
        self._drainer.sweep_drains = sweep_drains(config)
        self._spill.accounter.evict_timeout_ns = int(config.timeouts.idle * 1e9)
        self._spill.accounter.active_timeout_ns = int(config.timeouts.active * 1e9)
        if (config.cache.kernel_map_entries, config.cache.ring_buffer_pages, config.sampling.interval,
                config.tunnels.decap) != (old.cache.kernel_map_entries, old.cache.ring_buffer_pages,
                                          old.sampling.interval, old.tunnels.decap):
            log.warning("cache sizes, sampling and tunnels.decap change only at restart; keeping the running ones")
        selector = InterfaceSelector(tuple(config.interfaces.include), tuple(config.interfaces.exclude))
        hooks = directions(config.interfaces.direction)
        for att in list(self._attacher.attached.values()):
            if not selector.matches(att.ifname) or tuple(self._attacher.hooks) != hooks:
                self._attacher.detach(att.ifindex)
        self._attacher.hooks = hooks
        self._watcher.selector = selector
        self._attacher.attach_selected(selector)
        self._sync_decap()

    def _sync_decap(self) -> None:
        """Tell the classifier which attached interfaces decapsulate tunnels (tunnels.interfaces); cheap when
        nothing changed (every poll: link events attach and forget interfaces)."""
        if self._prog.decap_ifaces is None:
            return
        basis = (frozenset(self._attacher.attached), self.config.tunnels)
        if basis == self._decap_basis:  # no interface came or went, no reload: nothing to match again
            return
        self._decap_basis = basis
        want = {a.ifindex for a in self._attacher.attached.values() if self.config.tunnels.decapsulates(a.ifname)}
        if want == self._decap_ifindexes:
            return
        refused = self._prog.set_decap_interfaces(want)
        if refused:
            log.warning("tunnels.interfaces: %d interface(s) beyond the classifier's limit meter outer flows only: "
                        "%s", len(refused), ", ".join(interface_name(i) or str(i) for i in sorted(refused)))
        self._decap_ifindexes = want

    def _read_counters(self) -> None:
        """Read the kernel's counters (summed over CPUs) once per drain; say so when the ring lost packets."""
        counters: dict[str, int] = self._prog.counter_values()
        lost = max(0, counters.get("ringbuf_fail", 0) - self._last_counters.get("ringbuf_fail", 0))
        self._last_counters = counters
        if lost:
            log.warning("spill ring buffer full: %d packets lost since the last drain (%d in all; counted in "
                        "ignoredPacketTotalCount); raise cache.kernel_map_entries or cache.ring_buffer_pages",
                        lost, counters.get("ringbuf_fail", 0))

    def source_counters(self) -> SourceCounters:
        """The kernel's counters as of the last drain, plus the Accounter's evictions and the map fill."""
        c = self._last_counters
        return SourceCounters(
            spilled=c.get("spilled", 0), ring_lost=c.get("ringbuf_fail", 0),
            malformed=sum(c.get(n, 0) for n in MALFORMED_COUNTERS),
            accounter_evictions=self._spill.accounter.evictions if self._spill is not None else 0,
            map_fill_ratio=(self._drainer.kernel_entries / max(1, self._prog.map_entries)
                            if self._drainer is not None and self._prog is not None else None),
            classifier=dict(c), observed_live=True)

    def counters(self) -> dict[str, int]:
        """The kernel's counters (summed over CPUs) as of the last drain."""
        return dict(self._last_counters)

    def stop(self) -> None:
        """Detach our filters, unload the program, release the lock. Safe to call twice."""
        try:
            if self._spill is not None:
                self._spill.close()
                self._spill = None
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            if self._attacher is not None:
                self._attacher.detach_all()
                self._attacher.close()
                self._attacher = None
            if self._prog is not None:
                self._prog.close()
                self._prog = None
        finally:
            self._lock.release()


def sweep_drains(cfg: Config) -> int:
    """Drains over which the drainer reads the whole kernel map: an expired flow is found within a
    quarter of the idle timeout (kernel/drain.py)."""
    t = cfg.timeouts
    return max(1, int(t.idle / (4 * t.drain_interval)))


def sampling_cflags(interval: int) -> tuple[str, ...]:
    """The classifier meters 1 in `interval` packets (random), a compile-time constant."""
    return (f"-DSAMPLING_INTERVAL={int(interval)}",) if interval > 1 else ()


def tunnel_cflags(decap: bool) -> tuple[str, ...]:
    """The classifier meters the inner flow of one level of encapsulation (bpf/flow_parse.h
    parse_tunnel), a compile-time constant: builds without it carry no tunnel fields in the key."""
    return ("-DTUNNEL_DECAP=1",) if decap else ()
