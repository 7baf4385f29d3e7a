"""`ipfixer replay`: offline export of the flows in a capture file (like softflowd -r or YAF on a file).

Packets go through the same parser rules, the same Accounter and the same Exporter as live traffic;
time is the capture's own (a clock driven by packet timestamps), so flowStart/End are when the
packets were captured, not when the file was replayed.

With `tunnels.decap: true` every tunnel packet of the file is decapsulated (VXLAN, Geneve, GRE/GRETAP,
IPIP/SIT: ipfixer.sources.packets.decapsulate) and its flow is the inner one with the tunnel's identity.
A capture holds no interface names, so `tunnels.interfaces` (which names the underlay interfaces of a
live meter) does not apply here: the whole file is decapsulated, or none of it. The summary's "decap"
counts what was done (decap_vxlan ... decap_kept_outer, the kernel's counter names).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ipfixer.config import Config
from ipfixer.errors import CaptureError
from ipfixer.export.factory import build_exporter, sampling_values
from ipfixer.flows.accounter import Accounter
from ipfixer.model import Direction, RawPacket
from ipfixer.sources.capture import CaptureFile, linktype_name
from ipfixer.sources.packets import DecapCounts, frame_key, parse_link

log = logging.getLogger("ipfixer.replay")

# The exporter's "boot" lies this long before the first packet: NetFlow v9 times are ms since boot
# (RFC 3954 5.1, FIRST_SWITCHED), and a first flow at uptime 0 is read by nfdump as 1970-01-01.
# Never before 1970 (systemInitTimeMilliseconds is unsigned): a capture from 1970 is shown as 1970.
BOOT_BEFORE_FIRST_PACKET_NS = 1_000_000_000


@dataclass
class CaptureClock:
    """A Clock that reads the capture: both wall and monotonic time are the current packet's timestamp."""

    now_ns: int = 0

    def wall_ns(self) -> int:
        return self.now_ns

    def mono_ns(self) -> int:
        return self.now_ns


class _Progress:
    """A one-line progress bar on stderr, driven by the byte offset in the file."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(total, 1)
        self.enabled = enabled and (sys.stderr.isatty() or total > 50_000_000)
        self.shown = -1

    def update(self, offset: int, packets: int) -> None:
        if not self.enabled:
            return
        pct = min(100, offset * 100 // self.total)
        if pct != self.shown:
            self.shown = pct
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            sys.stderr.write(f"\rreplay [{bar}] {pct:3d}% {packets} packets")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")


def replay_pcap(path: Path, config: Config, progress: bool = True, ifindex: int = 0) -> dict[str, Any]:
    """Export every flow of `path` to the configured collectors; returns a summary of what was done.

    The file is validated first (CaptureError: not a capture, truncated, unsupported link type), so a
    file that cannot be replayed exactly exports nothing."""
    if not path.is_file():
        raise CaptureError(str(path), "no such capture file")
    capture = CaptureFile(path)
    clock = CaptureClock()
    exporter = None
    decap = DecapCounts() if config.tunnels.decap else None  # every packet: no interface names in a capture
    accounter = Accounter(config.cache.accounter_max_entries, int(config.cache.accounter_evict_timeout * 1e9),
                          clock, tunnels=config.tunnels.decap)
    bar = _Progress(os.path.getsize(path), progress)
    packets = malformed = flows = 0
    try:
        with capture:
            for pkt in capture:
                ts_ns = pkt.ts_ns
                clock.now_ns = max(clock.now_ns, ts_ns)
                if exporter is None:
                    exporter = build_exporter(config, max(0, ts_ns - BOOT_BEFORE_FIRST_PACKET_NS))
                    exporter.export_sampling(ts_ns, sampling_values(config))
                packets += 1
                frame = parse_link(pkt.linktype, pkt.data, decap)
                if frame is None or (frame.ip is None and frame.ethertype in (0x0800, 0x86DD)):
                    malformed += 1
                    continue
                direction = Direction.EGRESS if frame.outgoing else Direction.INGRESS  # known from SLL/SLL2 only
                key, octets, flags, tos = frame_key(frame, direction, ifindex)
                evicted = accounter.account(RawPacket(key, octets, ts_ns, flags, tos))
                if evicted is None:
                    evicted = accounter.evict_if_due()
                if evicted is not None:
                    flows += _export(exporter, evicted, clock.now_ns)
                if packets % 4096 == 0:
                    bar.update(capture.offset, packets)
            if exporter is not None:
                flows += _export(exporter, accounter.flush(), clock.now_ns)
                exporter.export_stats(clock.now_ns, malformed)
    finally:
        bar.done()
        if exporter is not None:
            exporter.close()
    stats = exporter.stats if exporter is not None else {}
    summary: dict[str, Any] = {
        "file": str(path),
        "format": capture.format,
        "link_types": sorted(linktype_name(t) for t in capture.layout.linktypes),
        "packets": packets,
        "malformed": malformed,
        "flows": flows,
        "collectors": {name: {"messages": s.messages, "records": s.records, "errors": s.error_count}
                       for name, s in stats.items()},
    }
    if decap is not None:
        summary["decap"] = decap.as_dict()
    return summary


def _export(exporter: Any, batch: np.ndarray, now_ns: int) -> int:
    if len(batch):
        exporter.export(batch, now_ns)
    return len(batch)
