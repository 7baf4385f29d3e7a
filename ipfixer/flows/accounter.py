"""Userspace flow aggregation for raw packets (ring-buffer spill, NFLOG, pcap replay).

Modelled on netobserv's Go Accounter: packets accumulate per FlowKey in a dict; when the dict reaches
max_entries, or evict_timeout has passed since the last eviction, everything is evicted as one batch
and the cache starts empty. Time comes from the injected Clock; packet timestamps are monotonic ns
(as bpf_ktime_get_ns) and become wall-clock ms at eviction, as the Go NewRecord does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ipfixer.clock import Clock, mono_to_wall_ms
from ipfixer.model import FLOW_DTYPE, Direction, EndReason, FlowKey, RawPacket, empty_batch

# packets, octets, first_ns, last_ns, tcp_flags, tos
_Metrics = list[int]


class Accounter:
    """Aggregates RawPackets by FlowKey and evicts FLOW_DTYPE batches when full or on a timer."""

    def __init__(
        self,
        max_entries: int,
        evict_timeout_ns: int,
        clock: Clock,
        interface_namer: Callable[[int], str] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.evict_timeout_ns = evict_timeout_ns
        self.clock = clock
        self.interface_namer = interface_namer
        self._cache: dict[FlowKey, _Metrics] = {}
        self._last_evict_mono = clock.mono_ns()
        self.evictions = 0
        self.evicted_flows = 0
        self.accounted_packets = 0

    def __len__(self) -> int:
        return len(self._cache)

    def account(self, pkt: RawPacket) -> np.ndarray | None:
        """Add one packet; returns the evicted batch when this packet filled the cache, else None."""
        m = self._cache.get(pkt.key)
        if m is None:
            self._cache[pkt.key] = [pkt.packets, pkt.octets, pkt.mono_ns, pkt.mono_ns, pkt.tcp_flags, pkt.tos]
        else:
            m[0] += pkt.packets
            m[1] += pkt.octets
            if pkt.mono_ns < m[2]:
                m[2] = pkt.mono_ns
            if pkt.mono_ns > m[3]:
                m[3] = pkt.mono_ns
            m[4] |= pkt.tcp_flags
            m[5] = pkt.tos
        self.accounted_packets += pkt.packets
        if len(self._cache) >= self.max_entries:
            return self._evict(EndReason.LACK_OF_RESOURCES)
        return None

    def account_all(self, pkts: Iterable[RawPacket]) -> list[np.ndarray]:
        """Account many packets; returns the batches evicted along the way (possibly none)."""
        out = []
        for pkt in pkts:
            batch = self.account(pkt)
            if batch is not None:
                out.append(batch)
        return out

    def evict_if_due(self) -> np.ndarray | None:
        """Evict everything if evict_timeout has passed since the last eviction (None if not due or empty)."""
        if self.clock.mono_ns() - self._last_evict_mono < self.evict_timeout_ns:
            return None
        if not self._cache:
            self._last_evict_mono = self.clock.mono_ns()
            return None
        return self._evict(EndReason.ACTIVE_TIMEOUT)

    def flush(self) -> np.ndarray:
        """Evict everything now (shutdown): flowEndReason forced end."""
        return self._evict(EndReason.FORCED_END)

    def _evict(self, reason: int) -> np.ndarray:
        cache, self._cache = self._cache, {}
        now_wall = self.clock.wall_ns()
        now_mono = self.clock.mono_ns()
        self._last_evict_mono = now_mono
        batch = empty_batch(len(cache))
        for i, (k, m) in enumerate(cache.items()):
            row = batch[i]
            row["ethertype"] = k.ethertype
            row["direction"] = k.direction
            row["vlan_id"] = k.vlan_id
            row["src_mac"] = np.frombuffer(k.src_mac, dtype=np.uint8)
            row["dst_mac"] = np.frombuffer(k.dst_mac, dtype=np.uint8)
            row["src_addr"] = np.frombuffer(k.src_addr, dtype=np.uint8)
            row["dst_addr"] = np.frombuffer(k.dst_addr, dtype=np.uint8)
            row["src_port"] = k.src_port
            row["dst_port"] = k.dst_port
            row["protocol"] = k.protocol
            row["ifindex"] = k.ifindex
            row["packets"] = m[0]
            row["octets"] = m[1]
            row["start_ms"] = mono_to_wall_ms(m[2], now_wall, now_mono)
            row["end_ms"] = mono_to_wall_ms(m[3], now_wall, now_mono)
            row["tcp_flags"] = m[4] & 0xFF
            row["tos"] = m[5]
            row["end_reason"] = reason
            if k.direction == Direction.INGRESS:
                row["ingress_if"] = k.ifindex
            else:
                row["egress_if"] = k.ifindex
        if len(cache):
            self.evictions += 1
            self.evicted_flows += len(cache)
        assert batch.dtype == FLOW_DTYPE
        return batch
