"""Export expired kernel flow-map entries as FLOW_DTYPE batches, removing exactly what is exported.

Never read-then-delete blindly (it loses the packets counted in between). Costs measured on this VM
(1M entries, a bpf() syscall ~1.5 us; benchmarks/scale.py): BPF_MAP_LOOKUP_BATCH 0.58 s,
BPF_MAP_LOOKUP_AND_DELETE_BATCH 0.76 s, BPF_MAP_LOOKUP_AND_DELETE_ELEM 1.6 us per key.

"sweep" (default): flows stay in the kernel map while they live, so a packet of a known flow is an
update, not an insert, and a drain costs what changed plus a cheap read of the rest:
- each drain reads a slice of the map with BPF_MAP_LOOKUP_BATCH (no delete), resuming where the last
  one stopped; `sweep_drains` drains cover the whole map (the daemon picks it so an expired flow is
  found within a quarter of the idle timeout; 1 = the whole map every drain). A drain given end_keys
  (conntrack DESTROY) reads the whole map, so those flows end at this drain;
- the expiry rule (flows/expiry.py) picks idle, active-timeout and FIN/RST flows; each is removed with
  BPF_MAP_LOOKUP_AND_DELETE_ELEM, atomic under its bucket lock, and what that returns is exported, so
  packets that arrived since the read are in the record, not lost;
- when more than 3/4 of the map expires at once, per-key deletes would cost more than taking
  everything: BPF_MAP_LOOKUP_AND_DELETE_BATCH takes the map, expiring flows are exported and the rest
  are put back with BPF_NOEXIST. The deadlines of the last read (sorted) show such a drain coming,
  which then skips its read. A survivor the datapath re-created meanwhile (EEXIST) is carried in
  userspace and merged (flows/rows.py) with the kernel's entry, taken atomically, at the next drain.
"take_all" (the earlier design, kept for benchmarks/scale.py's comparison): every drain takes every
entry and carries the live ones in userspace, re-merging all of them each time.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from ipfixer.clock import Clock
from ipfixer.errors import KernelError
from ipfixer.flows.expiry import expiry_reasons, flow_deadlines
from ipfixer.flows.rows import build_rows, concat, match_keys, merge, merge_leaves, select
from ipfixer.model import EndReason, empty_batch, five_tuple_keys
from ipfixer.sources.kernel.program import libbpf, map_batch

BPF_NOEXIST = 1
# Expiring share of a whole-map read above which the map is taken whole: taking costs ~0.8 us per
# entry plus ~1.5 us per survivor put back, per-key deletes ~1.6 us per expiring flow.
_MASS_SHARE = 0.75
_MASS_MIN = 1024  # ...if that is more than this many flows (fewer cost milliseconds either way)


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def _lib() -> ctypes.CDLL:
    lib = libbpf()
    vp = ctypes.c_void_p
    lib.bpf_map_update_elem.argtypes = [ctypes.c_int, vp, vp, ctypes.c_uint64]
    lib.bpf_map_update_elem.restype = ctypes.c_int
    lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, vp, vp, vp, vp, ctypes.POINTER(ctypes.c_uint32), vp]
    lib.bpf_map_lookup_batch.restype = ctypes.c_int
    return lib


def _err(ret: int) -> int:
    return ctypes.get_errno() or -ret


def _join(batches: list[np.ndarray]) -> np.ndarray:
    out = [b for b in batches if len(b)]
    if not out:
        return empty_batch(0)
    return out[0] if len(out) == 1 else np.concatenate(out)


class Drainer:
    """Exports idle, active-timeout and finished (FIN/RST, conntrack-destroyed) flows of the kernel map."""

    def __init__(
        self,
        flows: Any,
        clock: Clock,
        active_timeout_ns: int,
        idle_timeout_ns: int,
        interface_namer: Callable[[int], str] | None = None,
        strategy: str = "sweep",
        sweep_drains: int = 1,
    ) -> None:
        if strategy not in ("sweep", "take_all"):
            raise ValueError(f"strategy must be sweep or take_all, not {strategy!r}")
        if sweep_drains < 1:
            raise ValueError(f"sweep_drains must be >= 1, got {sweep_drains}")
        self.strategy = strategy
        self.flows = flows  # bcc HashTable (flow_key -> flow_metrics)
        self.clock = clock
        self.active_timeout_ns = active_timeout_ns
        self.idle_timeout_ns = idle_timeout_ns
        self.sweep_drains = sweep_drains
        self.interface_namer = interface_namer
        self.key_dtype = np.dtype(flows.Key)
        self.leaf_dtype = np.dtype(flows.Leaf)
        self.capacity = int(flows.max_entries)
        self.map_fd = int(flows.map_fd)
        self._lib = _lib()
        self._carry_keys = np.empty(0, dtype=self.key_dtype)
        self._carry_leaves = np.empty(0, dtype=self.leaf_dtype)
        self._token = ctypes.create_string_buffer(64)  # where the sweep resumes (a bucket index)
        self._resume = False
        self._swept = 0  # entries read in the current sweep cycle
        self._counted = False  # kernel_entries counted by a whole read or a finished cycle
        self._deadlines = np.empty(0, dtype=np.int64)  # when the flows of the last sweep cycle expire
        self._cycle_deadlines: list[np.ndarray] = []
        self.drains = 0
        self.kernel_entries = 0  # the map's fill as of the last whole read (what the fill-ratio metric shows)
        self.exported_flows = 0
        self.read_entries = 0  # entries read by the last drain (its vectorised pass)
        self.deleted_keys = 0  # per-key lookup-and-deletes so far
        self.mass_drains = 0  # drains that took the whole map
        self.put_back = 0  # survivors of a mass drain put back into the kernel map
        self.vanished = 0  # expiring keys already gone when deleted: not exported twice

    def interface_name(self, ifindex: int) -> str:
        """Name of an observation interface for enrichment (empty when no namer is set)."""
        return self.interface_namer(ifindex) if self.interface_namer else ""

    @property
    def carried(self) -> int:
        """Flows held in userspace between drains."""
        return len(self._carry_keys)

    def drain(self, now_mono_ns: int | None = None, end_keys: Collection[bytes] = ()) -> np.ndarray:
        """Export and remove flows that are idle, past the active timeout, or ended (FIN/RST, or a
        connection conntrack destroyed: `end_keys`, packed 5-tuples as model.five_tuple_keys makes).
        `now_mono_ns` is when expiry is decided (default: the clock's now)."""
        now_wall = self.clock.wall_ns()
        now_mono = self.clock.mono_ns()
        at = now_mono if now_mono_ns is None else now_mono_ns
        if self.strategy == "take_all":
            batch = self._drain_take_all(at, end_keys, now_wall, now_mono)
        else:
            batch = self._drain_sweep(at, end_keys, now_wall, now_mono)
        self.drains += 1
        self.exported_flows += len(batch)
        return batch

    def _reasons(self, keys: np.ndarray, leaves: np.ndarray, at: int, end_keys: Collection[bytes]) -> np.ndarray:
        reasons = expiry_reasons(leaves["first_ns"], leaves["last_ns"], leaves["tcp_flags"], keys["protocol"], at,
                                 self.idle_timeout_ns, self.active_timeout_ns)
        if end_keys and len(keys) and not reasons.all():
            hit = np.fromiter((k in end_keys for k in five_tuple_keys(keys)), dtype=bool, count=len(keys))
            reasons[hit & (reasons == 0)] = EndReason.END_OF_FLOW
        return reasons

    # -- sweep ------------------------------------------------------------------------------------
    def _drain_sweep(self, at: int, end_keys: Collection[bytes], now_wall: int, now_mono: int) -> np.ndarray:
        out = [self._drain_carry(at, end_keys, now_wall, now_mono)] if len(self._carry_keys) else []
        due = int(np.searchsorted(self._deadlines, at, side="right"))
        if due > _MASS_SHARE * len(self._deadlines) and due > _MASS_MIN:
            # The last read foresaw most of the map expiring by now: take it whole without reading first.
            out.append(self._drain_mass(at, end_keys, now_wall, now_mono))
            return _join(out)
        whole = self.sweep_drains == 1 or bool(end_keys)
        if whole:
            keys, leaves = map_batch(self.map_fd, self.key_dtype, self.leaf_dtype, self.capacity, delete=False)
            self.kernel_entries = len(keys)
            self._counted = True
            self._resume, self._swept = False, 0
        else:
            # a share of the entries the last cycle found (+25% for growth), not of the capacity
            # (the capacity until a first cycle has counted them)
            est = max(self.kernel_entries * 5 // 4, self.capacity // 16, 1024) if self._counted else self.capacity
            keys, leaves = self._read_slice(-(-est // self.sweep_drains))
        self.read_entries = len(keys)
        reasons = self._reasons(keys, leaves, at, end_keys)
        go = np.flatnonzero(reasons)
        if whole and len(go) > _MASS_SHARE * max(len(keys), 1) and len(go) > _MASS_MIN:
            out.append(self._drain_mass(at, end_keys, now_wall, now_mono))
            return _join(out)
        if len(go):
            k, lv, r = self._take_keys(select(keys, go), reasons[go])
            out.append(build_rows(k, lv, r, now_wall, now_mono))
        self._note_deadlines(keys, leaves, reasons == 0, whole)
        return _join(out)

    def _note_deadlines(self, keys: np.ndarray, leaves: np.ndarray, kept: np.ndarray, whole: bool) -> None:
        """Remember when the flows just read will expire (sorted), per sweep cycle, so a drain can see
        a mass expiry coming without reading the map first."""
        d = flow_deadlines(leaves["first_ns"][kept], leaves["last_ns"][kept], leaves["tcp_flags"][kept],
                           keys["protocol"][kept], self.idle_timeout_ns, self.active_timeout_ns)
        if whole:
            self._deadlines, self._cycle_deadlines = np.sort(d), []
            return
        self._cycle_deadlines.append(d)
        if not self._resume:  # this slice finished a cycle
            self._deadlines = np.sort(np.concatenate(self._cycle_deadlines))
            self._cycle_deadlines = []

    def _read_slice(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to about `limit` entries with BPF_MAP_LOOKUP_BATCH, from where the last slice ended;
        a finished cycle updates kernel_entries and starts over at the next drain."""
        keys = np.empty(limit + 4096, dtype=self.key_dtype)
        leaves = np.empty(limit + 4096, dtype=self.leaf_dtype)
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        out_tok = ctypes.create_string_buffer(64)
        n, floor = 0, 1
        while n < limit:
            ask = max(min(4096, limit - n), floor)
            if n + ask > len(keys):
                keys = np.resize(keys, n + ask)
                leaves = np.resize(leaves, n + ask)
            count = ctypes.c_uint32(ask)
            ret = self._lib.bpf_map_lookup_batch(
                self.map_fd, self._token if self._resume else None, out_tok,
                keys.ctypes.data + n * self.key_dtype.itemsize, leaves.ctypes.data + n * self.leaf_dtype.itemsize,
                ctypes.byref(count), ctypes.byref(opts))
            n += count.value
            if ret < 0:
                err = _err(ret)
                if err == errno.ENOENT:  # end of the map: the cycle is complete
                    self._swept += n
                    self.kernel_entries = self._swept
                    self._counted = True
                    self._resume, self._swept = False, 0
                    return keys[:n], leaves[:n]
                if err == errno.ENOSPC and count.value == 0:  # one bucket holds more than we asked for
                    floor = ask * 2
                    continue
                raise KernelError(f"bpf map batch lookup: {os.strerror(err)}")
            ctypes.memmove(self._token, out_tok, 64)
            self._resume = True
        self._swept += n
        self.kernel_entries = max(self.kernel_entries, self._swept)
        return keys[:n], leaves[:n]

    def _take_keys(self, keys: np.ndarray, reasons: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BPF_MAP_LOOKUP_AND_DELETE_ELEM per key: (keys, leaves as taken, reasons) of those still there."""
        keys = np.ascontiguousarray(keys)
        taken = np.empty(len(keys), dtype=self.leaf_dtype)
        found = np.ones(len(keys), dtype=bool)
        fn = libbpf().bpf_map_lookup_and_delete_elem  # argtypes set: plain ints are pointers
        kbase, ksize = keys.ctypes.data, self.key_dtype.itemsize
        vbase, vsize = taken.ctypes.data, self.leaf_dtype.itemsize
        fd = self.map_fd
        for i in range(len(keys)):
            if fn(fd, kbase + i * ksize, vbase + i * vsize) < 0:
                found[i] = False
        self.deleted_keys += len(keys)
        self.vanished += int(len(found) - found.sum())
        return keys[found], taken[found], reasons[found]

    def _drain_mass(self, at: int, end_keys: Collection[bytes], now_wall: int, now_mono: int) -> np.ndarray:
        """Most of the map expires: take it whole, export the expiring, put the rest back."""
        self.mass_drains += 1
        keys, leaves = map_batch(self.map_fd, self.key_dtype, self.leaf_dtype, self.capacity, delete=True)
        reasons = self._reasons(keys, leaves, at, end_keys)
        go = reasons != 0
        batch = build_rows(select(keys, go), select(leaves, go), reasons[go], now_wall, now_mono)
        kept_keys, kept_leaves = select(keys, ~go), select(leaves, ~go)
        self._put_back(kept_keys, kept_leaves)
        self._note_deadlines(kept_keys, kept_leaves, np.ones(len(kept_keys), dtype=bool), True)
        self._resume, self._swept = False, 0
        self.kernel_entries, self._counted = len(kept_keys), True
        return batch

    def _put_back(self, keys: np.ndarray, leaves: np.ndarray) -> None:
        """Insert entries with BPF_NOEXIST, one bpf() call each (the batch update accepts no NOEXIST);
        those the datapath re-created meanwhile (EEXIST), or that no longer fit, go to the carry and are
        merged with the kernel's entry at the next drain."""
        keys, leaves = np.ascontiguousarray(keys), np.ascontiguousarray(leaves)
        fn = self._lib.bpf_map_update_elem
        kbase, ksize = keys.ctypes.data, keys.itemsize
        vbase, vsize = leaves.ctypes.data, leaves.itemsize
        fd = self.map_fd
        failed = [i for i in range(len(keys)) if fn(fd, kbase + i * ksize, vbase + i * vsize, BPF_NOEXIST) < 0]
        self.put_back += len(keys) - len(failed)
        if failed:
            idx = np.array(failed, dtype=np.intp)
            self._carry_keys = concat(self._carry_keys, select(keys, idx))
            self._carry_leaves = concat(self._carry_leaves, select(leaves, idx))

    def _drain_carry(self, at: int, end_keys: Collection[bytes], now_wall: int, now_mono: int) -> np.ndarray:
        """Carried flows: merge the kernel's entry for the same key (taken atomically), then export the
        expired and try to put the rest back."""
        ck, cl = self._carry_keys, np.array(self._carry_leaves, copy=True)
        self._carry_keys = np.empty(0, dtype=self.key_dtype)
        self._carry_leaves = np.empty(0, dtype=self.leaf_dtype)
        k, lv, _ = self._take_keys(ck, np.zeros(len(ck), np.uint8))
        ia, ib = match_keys(ck, k)
        part = cl[ia]
        merge_leaves(part, lv[ib])
        cl[ia] = part
        reasons = self._reasons(ck, cl, at, end_keys)
        go = reasons != 0
        self._put_back(select(ck, ~go), select(cl, ~go))
        return build_rows(select(ck, go), select(cl, go), reasons[go], now_wall, now_mono)

    # -- take_all ---------------------------------------------------------------------------------
    def _drain_take_all(self, at: int, end_keys: Collection[bytes], now_wall: int, now_mono: int) -> np.ndarray:
        keys, leaves = self._take_everything()
        reasons = self._reasons(keys, leaves, at, end_keys)
        go = reasons != 0
        self._carry_keys, self._carry_leaves = select(keys, ~go), select(leaves, ~go)
        return build_rows(select(keys, go), select(leaves, go), reasons[go], now_wall, now_mono)

    def _take_everything(self) -> tuple[np.ndarray, np.ndarray]:
        """Every flow: the kernel map's entries (atomically removed) merged with the carry."""
        keys, leaves = map_batch(self.map_fd, self.key_dtype, self.leaf_dtype, self.capacity, delete=True)
        self.kernel_entries = self.read_entries = len(keys)
        ck, cl = self._carry_keys, self._carry_leaves
        self._carry_keys = np.empty(0, dtype=self.key_dtype)
        self._carry_leaves = np.empty(0, dtype=self.leaf_dtype)
        return merge(ck, cl, keys, leaves)

    def flush(self) -> np.ndarray:
        """Export and remove every flow (shutdown): flowEndReason forced end."""
        now_wall = self.clock.wall_ns()
        now_mono = self.clock.mono_ns()
        keys, leaves = self._take_everything()
        self._resume, self._swept = False, 0
        self._deadlines, self._cycle_deadlines = np.empty(0, dtype=np.int64), []
        batch = build_rows(keys, leaves, EndReason.FORCED_END, now_wall, now_mono)
        self.exported_flows += len(batch)
        return batch
