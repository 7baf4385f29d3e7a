"""Consume the ring-buffer spill (packets that did not fit in the kernel flow map) into an Accounter.

The ring is served by its own thread, so it keeps being emptied while the daemon drains and encodes:
the thread only copies whole records out (one numpy copy per wake-up) and advances the consumer
position; the daemon's thread decodes and aggregates them in vectorised batches (Accounter.account_batch)
at its next poll. A spill never triggers a map drain, so an undersized map cannot feed a drain/spill
runaway (netobserv's lesson). What cannot be taken is counted: the kernel counts ringbuf_fail when the
ring is full; the userspace queue is bounded (max_pending records) and, when the daemon falls that far
behind, the thread stops reading so the kernel's counter still counts every lost packet.

Hand-written ring reader (RingReader): bcc calls a Python callback per record (~2 us each, and only while
the caller polls); here the ring's pages are mmap'd as the kernel's BPF ring buffer ABI lays them out
(kernel/bpf/ringbuf.c: consumer page, producer page, data pages mapped twice so a record never wraps;
each record an 8-byte header {u32 len with BUSY/DISCARD bits, u32 pg_off}, padded to 8 bytes) and read
with numpy. Reading the headers before the records relies on loads not being reordered with loads
(x86-64 TSO); elsewhere bcc's own consumer is used.
"""

from __future__ import annotations

import logging
import mmap
import platform
import select
import threading
import weakref
from typing import Any

import numpy as np

from ipfixer.flows.accounter import Accounter

log = logging.getLogger("ipfixer.spill")

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_TSO = platform.machine() in ("x86_64", "AMD64")


class RingReader:
    """Fixed-size records straight from a BPF ring buffer's mmap'd pages (see the module docstring)."""

    def __init__(self, map_fd: int, data_size: int, record_dtype: np.dtype) -> None:
        page = mmap.PAGESIZE
        if data_size % page or data_size & (data_size - 1):
            raise ValueError(f"ring data size must be a power-of-two number of pages, got {data_size}")
        self.size = data_size
        self.mask = data_size - 1
        self.slot = (record_dtype.itemsize + _HDR + 7) // 8 * 8
        self.record_dtype = record_dtype
        self._slot_dtype = np.dtype({"names": ["len", "rec"], "formats": ["<u4", record_dtype],
                                     "offsets": [0, _HDR], "itemsize": self.slot})
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._cons = np.frombuffer(self._cons_map, dtype=np.uint64, count=1)
        self._prod = np.frombuffer(self._prod_map, dtype=np.uint64, count=1)
        self._data = np.frombuffer(self._prod_map, dtype=np.uint8, offset=page)
        self.fd = map_fd
        self.odd = 0  # records of another size or discarded (never made by flow_tc.c): skipped

    def read(self, max_records: int) -> np.ndarray:
        """Copy out up to max_records committed records and release their space to the kernel."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        n = min((prod - cons) // self.slot, max_records)
        if n <= 0:
            return np.empty(0, dtype=self.record_dtype)
        off = cons & self.mask
        view = self._data[off:off + n * self.slot].view(self._slot_dtype)
        lens = view["len"]
        busy = np.flatnonzero(lens & _BUSY)
        if len(busy):
            n = int(busy[0])  # not yet submitted: stop before it
            view, lens = view[:n], lens[:n]
        size = lens & ~np.uint32(_BUSY | _DISCARD)
        good = ((lens & _DISCARD) == 0) & (size == self.record_dtype.itemsize)
        if not good.all():
            return self._read_odd(cons, prod, max_records)
        out = np.array(view["rec"])  # copied before the space is released
        self._cons[0] = cons + n * self.slot
        return out

    def _read_odd(self, cons: int, prod: int, max_records: int) -> np.ndarray:
        """Record by record (a record of another size or a discarded one is in the ring)."""
        out: list[np.ndarray] = []
        while cons < prod and len(out) < max_records:
            off = cons & self.mask
            ln = int(self._data[off:off + 4].view("<u4")[0])
            if ln & _BUSY:
                break
            size = ln & ~(_BUSY | _DISCARD)
            if not ln & _DISCARD and size == self.record_dtype.itemsize:
                out.append(self._data[off + _HDR:off + _HDR + size].copy())
            else:
                self.odd += 1
            cons += (size + _HDR + 7) // 8 * 8
        self._cons[0] = cons
        if not out:
            return np.empty(0, dtype=self.record_dtype)
        return np.concatenate(out).view(self.record_dtype)

    def close(self) -> None:
        """Unmap the ring's pages (the numpy views must be gone first)."""
        del self._cons, self._prod, self._data
        self._cons_map.close()
        self._prod_map.close()


class SpillConsumer:
    """Serves the spill ring from a thread and feeds an Accounter in vectorised batches at each poll."""

    def __init__(self, bpf: Any, ring: Any, spill_dtype: np.dtype, accounter: Accounter,
                 max_records: int = 1 << 20, max_pending: int = 1 << 22, data_size: int | None = None,
                 threaded: bool = True, mmap_reader: bool = _TSO) -> None:
        self.bpf = bpf
        self.accounter = accounter
        self.spill_dtype = spill_dtype
        self.max_records = max_records  # accounted per poll (the rest waits for the next poll)
        self.max_pending = max_pending  # copied out but not yet accounted: the userspace bound
        self.records = 0  # spilled records accounted
        self.packets = 0  # packets they carried
        self.polls = 0
        self.stalls = 0  # times the thread stopped reading because max_pending records were waiting
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._lock = threading.Lock()  # the pending queue
        self._ring_lock = threading.Lock()  # one reader of the ring at a time
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._reader: RingReader | None = None
        self._chunks: list[bytes] = []
        if mmap_reader:
            size = int(ring.max_entries) if data_size is None else data_size  # a ringbuf's size in bytes
            self._reader = RingReader(int(ring.map_fd), size, spill_dtype)
        else:  # bcc's consumer: a callback per record
            import ctypes

            size = spill_dtype.itemsize

            def on_record(_ctx: Any, data: Any, _size: int) -> int:
                self._chunks.append(ctypes.string_at(data, size))
                return 0

            ring.open_ring_buffer(on_record)
        self._thread: threading.Thread | None = None
        if threaded:
            # The thread holds the consumer weakly: one that is dropped without close() still stops.
            self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._stop),
                                            name="ipfixer-spill", daemon=True)
            self._thread.start()

    def _take_from_ring(self, limit: int) -> int:
        """Move up to `limit` records from the ring to the pending queue; returns how many."""
        with self._ring_lock:
            if self._reader is not None:
                recs = self._reader.read(limit)
            else:
                self.bpf.ring_buffer_consume()
                raw, self._chunks = b"".join(self._chunks), []
                recs = np.frombuffer(raw, dtype=self.spill_dtype)
            if len(recs):
                with self._lock:
                    self._pending.append(recs)
                    self._pending_n += len(recs)
                self._ready.set()
        return len(recs)

    def _serve_once(self, poller: select.poll) -> None:
        """One turn of the ring thread: move what the ring holds to the queue, or wait for more."""
        room = self.max_pending - self._pending_n
        if room <= 0:
            self.stalls += 1
            self._stop.wait(0.005)  # the daemon is behind: let the ring fill (the kernel counts)
        elif self._take_from_ring(room) == 0:
            if self._reader is not None:
                poller.poll(5)  # woken by the kernel's ring buffer notification
            else:
                with self._ring_lock:
                    self.bpf.ring_buffer_poll(5)

    def poll(self, timeout_ms: int = 0) -> list[np.ndarray]:
        """Wait up to timeout_ms for spilled packets, account up to max_records of them, and return the
        batches the Accounter evicted (its full cache, or flows whose timeouts passed)."""
        room = self.max_pending - self._pending_n
        if room > 0:
            self._take_from_ring(room)  # what the ring holds now (the thread may not have run yet)
        if self._thread is not None and timeout_ms > 0 and not self._pending_n:
            self._ready.wait(timeout_ms / 1000.0)
        self.polls += 1
        out = self._account(self.max_records)
        due = self.accounter.evict_if_due()
        if due is not None:
            out.append(due)
        return out

    def _account(self, limit: int) -> list[np.ndarray]:
        with self._lock:
            taken: list[np.ndarray] = []
            n = 0
            while self._pending and n < limit:
                a = self._pending[0]
                if n + len(a) > limit:
                    self._pending[0] = a[limit - n:]
                    a = a[:limit - n]
                else:
                    self._pending.pop(0)
                taken.append(a)
                n += len(a)
            self._pending_n -= n
            if not self._pending:
                self._ready.clear()
        if not taken:
            return []
        recs = taken[0] if len(taken) == 1 else np.concatenate(taken)
        self.records += len(recs)
        self.packets += int(recs["packets"].sum(dtype=np.uint64))
        return self.accounter.account_batch(recs["key"], recs["packets"], recs["octets"], recs["ts_ns"],
                                            recs["tcp_flags"], recs["tos"])

    def flush(self) -> list[np.ndarray]:
        """Consume what is left in the ring and flush the Accounter (shutdown)."""
        self._take_from_ring(1 << 30)
        out = self._account(1 << 62)
        out.append(self.accounter.flush())
        return out

    def close(self) -> None:
        """Stop the thread and unmap the ring (the program's unload frees the ring itself)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._ring_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


def _serve(ref: weakref.ref[SpillConsumer], stop: threading.Event) -> None:
    """The ring thread's loop, until close() or the consumer is gone."""
    poller = select.poll()
    consumer = ref()
    if consumer is not None and consumer._reader is not None:
        poller.register(consumer._reader.fd, select.POLLIN)
    del consumer
    while not stop.is_set():
        consumer = ref()
        if consumer is None:
            return
        consumer._serve_once(poller)
        del consumer
