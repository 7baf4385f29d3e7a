"""`ipfixer replay`: offline export of the flows in a capture file (like softflowd -r or YAF on a file).

Packets go through the same parser rules, the same Accounter and the same Exporter as live traffic;
time is the capture's own (a clock driven by packet timestamps), so flowStart/End are when the
packets were captured, not when the file was replayed.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ipfixer.config import Config
from ipfixer.errors import IpfixerError
from ipfixer.export.factory import build_exporter, sampling_values
from ipfixer.flows.accounter import Accounter
from ipfixer.model import Direction, RawPacket
from ipfixer.packets import ParsedFrame, frame_key, parse_ethernet, parse_ip

log = logging.getLogger("ipfixer.replay")

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_OLD = 12
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229


@dataclass
class CaptureClock:
    """A Clock that reads the capture: both wall and monotonic time are the current packet's timestamp."""

    now_ns: int = 0

    def wall_ns(self) -> int:
        return self.now_ns

    def mono_ns(self) -> int:
        return self.now_ns


def _frame(linktype: int, data: bytes) -> ParsedFrame | None:
    """Parse one captured frame by link type (Ethernet, raw IP, Linux cooked)."""
    if linktype == LINKTYPE_ETHERNET:
        return parse_ethernet(data)
    if linktype == LINKTYPE_LINUX_SLL:
        if len(data) < 16:
            return None
        # SLL: packet type, ARPHRD, addr len, 8-byte addr, protocol; rebuild as Ethernet-like.
        proto = struct.unpack_from("!H", data, 14)[0]
        return parse_ethernet(b"\x00" * 6 + data[6:12] + struct.pack("!H", proto) + data[16:])
    if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_OLD, LINKTYPE_IPV4, LINKTYPE_IPV6):
        ip = parse_ip(data)
        if ip is None:
            return None
        return ParsedFrame(b"\x00" * 6, b"\x00" * 6, 0, ip.ethertype, ip, len(data))
    return None


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
    """Export every flow of `path` to the configured collectors; returns a summary of what was done."""
    from scapy.utils import RawPcapReader

    if not path.is_file():
        raise IpfixerError(f"{path}: no such capture file")
    try:
        reader = RawPcapReader(str(path))
    except Exception as exc:  # scapy raises Scapy_Exception for anything it cannot read
        raise IpfixerError(f"{path}: not a pcap/pcapng file: {exc}") from None
    clock = CaptureClock()
    exporter = None
    accounter = Accounter(config.cache.accounter_max_entries, int(config.cache.accounter_evict_timeout * 1e9),
                          clock)
    bar = _Progress(os.path.getsize(path), progress)
    packets = malformed = flows = 0
    try:
        with reader:
            linktype = getattr(reader, "linktype", LINKTYPE_ETHERNET)
            for data, meta in reader:
                ts_ns = _timestamp_ns(meta)
                clock.now_ns = max(clock.now_ns, ts_ns)
                if exporter is None:
                    exporter = build_exporter(config, ts_ns)
                    exporter.export_sampling(ts_ns, sampling_values(config))
                packets += 1
                frame = _frame(linktype, data)
                if frame is None:
                    malformed += 1
                    continue
                if frame.ip is None and frame.ethertype in (0x0800, 0x86DD):
                    malformed += 1
                    continue
                key, octets, flags, tos = frame_key(frame, Direction.INGRESS, ifindex)
                evicted = accounter.account(RawPacket(key, octets, ts_ns, flags, tos))
                if evicted is None:
                    evicted = accounter.evict_if_due()
                if evicted is not None:
                    flows += _export(exporter, evicted, clock.now_ns)
                if packets % 4096 == 0:
                    bar.update(_offset(reader), packets)
            if exporter is not None:
                flows += _export(exporter, accounter.flush(), clock.now_ns)
                exporter.export_stats(clock.now_ns, malformed)
    finally:
        bar.done()
        if exporter is not None:
            exporter.close()
    stats = exporter.stats if exporter is not None else {}
    return {
        "file": str(path),
        "packets": packets,
        "malformed": malformed,
        "flows": flows,
        "collectors": {name: {"messages": s.messages, "records": s.records, "errors": s.error_count}
                       for name, s in stats.items()},
    }


def _export(exporter: Any, batch: np.ndarray, now_ns: int) -> int:
    if len(batch):
        exporter.export(batch, now_ns)
    return len(batch)


def _timestamp_ns(meta: Any) -> int:
    """Capture timestamp of a packet in ns, for pcap (sec/usec) and pcapng (tshigh/tslow/resolution)."""
    if hasattr(meta, "sec"):
        return int(meta.sec) * 1_000_000_000 + int(meta.usec) * 1_000
    ts = (int(meta.tshigh) << 32) | int(meta.tslow)
    res = int(getattr(meta, "tsresol", 1_000_000))
    return ts * 1_000_000_000 // res


def _offset(reader: Any) -> int:
    try:
        return int(reader.f.tell())
    except (AttributeError, OSError, ValueError):
        return 0
