"""Consume the ring-buffer spill (packets that did not fit in the kernel flow map) into an Accounter.

Records are copied out in the bcc callback, then decoded in one numpy pass. Work per poll is bounded
(max_records): past it the callback stops consumption and the rest waits in the ring for the next
poll; when the ring is full the kernel counts ringbuf_fail. A spill never triggers a map drain, so an
undersized map cannot feed a drain/spill runaway (netobserv's lesson).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ipfixer.flows.accounter import Accounter
from ipfixer.model import FlowKey, RawPacket


def decode_spill(raw: bytes, spill_dtype: np.dtype) -> list[RawPacket]:
    """Concatenated struct spill_record bytes -> RawPackets."""
    recs = np.frombuffer(raw, dtype=spill_dtype)
    keys = recs["key"]
    out = []
    for i in range(len(recs)):
        k = keys[i]
        key = FlowKey(
            ethertype=int(k["ethertype"]),
            direction=int(k["direction"]),
            src_mac=k["src_mac"].tobytes(),
            dst_mac=k["dst_mac"].tobytes(),
            src_addr=k["src_addr"].tobytes(),
            dst_addr=k["dst_addr"].tobytes(),
            src_port=int(k["src_port"]),
            dst_port=int(k["dst_port"]),
            protocol=int(k["protocol"]),
            ifindex=int(k["ifindex"]),
            vlan_id=int(k["vlan_id"]),
        )
        r = recs[i]
        out.append(
            RawPacket(
                key=key,
                octets=int(r["octets"]),
                mono_ns=int(r["ts_ns"]),
                tcp_flags=int(r["tcp_flags"]),
                tos=int(r["tos"]),
                packets=int(r["packets"]),
            )
        )
    return out


class SpillConsumer:
    """Polls the program's spill ring buffer in batches and feeds an Accounter."""

    def __init__(self, bpf: Any, ring: Any, spill_dtype: np.dtype, accounter: Accounter,
                 max_records: int = 65536) -> None:
        self.bpf = bpf
        self.accounter = accounter
        self.spill_dtype = spill_dtype
        self.max_records = max_records
        self.records = 0  # spilled records consumed
        self.packets = 0  # packets they carried
        self.polls = 0
        self._chunks: list[bytes] = []
        self._size = spill_dtype.itemsize
        ring.open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        self._chunks.append(ctypes.string_at(data, self._size))
        return -1 if len(self._chunks) >= self.max_records else 0  # <0: stop after this record

    def poll(self, timeout_ms: int = 0) -> list[np.ndarray]:
        """Take up to max_records spilled packets (waiting up to timeout_ms), account them, and return
        the batches the Accounter evicted (full cache or its timer)."""
        if timeout_ms > 0:
            self.bpf.ring_buffer_poll(timeout_ms)
        else:
            self.bpf.ring_buffer_consume()
        self.polls += 1
        out: list[np.ndarray] = []
        if self._chunks:
            pkts = decode_spill(b"".join(self._chunks), self.spill_dtype)
            self._chunks = []
            self.records += len(pkts)
            self.packets += sum(p.packets for p in pkts)
            out.extend(self.accounter.account_all(pkts))
        due = self.accounter.evict_if_due()
        if due is not None:
            out.append(due)
        return out

    def flush(self) -> list[np.ndarray]:
        """Consume what is left in the ring and flush the Accounter (shutdown)."""
        out = self.poll(0)
        out.append(self.accounter.flush())
        return out
