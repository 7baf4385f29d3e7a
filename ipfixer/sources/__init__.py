"""Every way flows enter ipfixer, behind one shape the daemon consumes: FlowSource.

- ebpf (the default): the tc classifier's kernel flow map plus its ring-buffer spill (sources/kernel/);
- nflog: nftables `log group N` packets accounted in userspace (kernels without eBPF);
- capture: pcap/pcapng files for `ipfixer replay` (read by ipfixer.replay, which has no live loop).

A source yields FLOW_DTYPE batches and reports what it counted as SourceCounters; it never writes
metrics itself (only the daemon does), so it can be driven and checked without a metrics registry.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # only for annotations: a source module is imported only when the config asks for it
    import numpy as np

    from ipfixer.config import Config


@dataclass(frozen=True)
class SourceCounters:
    """Cumulative counts of a source since it started (the daemon turns their increments into metrics).

    `classifier` holds the kernel's own counters by name (empty for userspace sources); `observed_live`
    says whether it includes observed_{packets,octets}_{ingress,egress}, i.e. whether packets and octets
    observed are known before flows are exported."""

    spilled: int = 0
    ring_lost: int = 0
    malformed: int = 0
    accounter_evictions: int = 0
    map_fill_ratio: float | None = None
    classifier: Mapping[str, int] = field(default_factory=dict)
    observed_live: bool = False


class FlowSource(Protocol):
    """What the daemon needs of a flow source, in the daemon's terms."""

    def start(self) -> None:
        """Acquire everything needed before the first packet is counted; undo it all on failure."""

    def interfaces(self) -> list[str]:
        """Names of the interfaces metered now."""

    def poll(self, timeout_ms: int) -> None:
        """The daemon's idle wait: take what arrived (spilled or logged packets, link events)."""

    def drain(self, end_keys: Collection[bytes] = ()) -> list[np.ndarray]:
        """FLOW_DTYPE batches of flows due now; `end_keys` are packed 5-tuples conntrack destroyed."""

    def flush(self) -> list[np.ndarray]:
        """Every flow still held (shutdown)."""

    def ignored_packets(self) -> int:
        """Packets observed but not accounted (ignoredPacketTotalCount, RFC 5102 5.11.13)."""

    def counters(self) -> dict[str, int]:
        """The source's own counters by name, for the final log line and `ipfixer ctl stats`."""

    def source_counters(self) -> SourceCounters:
        """Cumulative counts for metrics."""

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config (what can change without a restart)."""

    def stop(self) -> None:
        """Release everything; safe to call twice."""
