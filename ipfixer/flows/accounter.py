"""Userspace flow cache for raw packets (ring-buffer spill, NFLOG, pcap replay).

Packets aggregate per flow key in numpy columns (a dict maps each key's bytes to its slot). Each flow
leaves by its own clock, with the reason a collector expects (RFC 5102 flowEndReason, IANA IE 136):
- idle: no packet for `evict_timeout_ns` (the idle timeout) -> 1;
- active: first packet more than `active_timeout_ns` ago -> 2 (a later packet starts a new record);
- TCP FIN/RST seen -> 3 (the same rule as the kernel drain, flows/expiry.py);
- the cache is full and a new flow arrives: the least recently seen flows go first -> 5. To keep the
  cost per packet flat, a full cache evicts 1/16 of itself at once (at least what the new flows need).
Packets are applied in vectorised batches: `account_batch` takes arrays (the spill path), `account`
buffers single packets and applies them 256 at a time. Time comes only from the injected Clock;
packet timestamps are monotonic ns (as bpf_ktime_get_ns) and become wall-clock ms at eviction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import numpy as np

from ipfixer.clock import Clock
from ipfixer.flows.expiry import ends_flow, expiry_reasons, flow_deadlines
from ipfixer.flows.rows import LEAF_DTYPE, build_rows, key_dtype, merge_leaves, pack_key, to_keys, unpack_key
from ipfixer.model import EndReason, FlowKey, RawPacket, empty_batch, five_tuple_keys

_SCALAR_BUFFER = 256
_NEVER = np.iinfo(np.int64).max
DEFAULT_ACTIVE_TIMEOUT_NS = 60 * 1_000_000_000


class Accounter:
    """Aggregates packets by flow key; evicts FLOW_DTYPE batches per flow (idle, active, FIN/RST, full)."""

    def __init__(
        self,
        max_entries: int,
        evict_timeout_ns: int,
        clock: Clock,
        interface_namer: Callable[[int], str] | None = None,
        active_timeout_ns: int = DEFAULT_ACTIVE_TIMEOUT_NS,
        tunnels: bool = False,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.evict_timeout_ns = evict_timeout_ns  # the idle timeout
        self.active_timeout_ns = active_timeout_ns
        self.clock = clock
        self.interface_namer = interface_namer
        # tunnels.decap: flows are keyed by their tunnel too, and the rows carry it (rows.TUNNEL_FIELDS)
        self.tunnels = tunnels
        self.key_dtype = key_dtype(tunnels)
        cap = min(max_entries, 1024)
        self._keys = np.zeros(cap, dtype=self.key_dtype)
        self._leaves = np.zeros(cap, dtype=LEAF_DTYPE)
        self._used = np.zeros(cap, dtype=bool)
        self._slots: dict[bytes, int] = {}
        self._free: list[int] = list(range(cap - 1, -1, -1))
        self._buffer: list[tuple[bytes, int, int, int, int, int]] = []
        self._buffer_first = _NEVER  # earliest packet time in the buffer
        self._evicted: list[np.ndarray] = []  # evicted by a full cache, not yet returned
        self._next_due = _NEVER  # no flow can expire before this monotonic time
        self.evictions = 0  # flows evicted because the cache was full (flowEndReason 5)
        self.evicted_flows = 0
        self.accounted_packets = 0
        self.by_reason: dict[int, int] = {int(r): 0 for r in EndReason}

    def __len__(self) -> int:
        self._apply_buffer()
        return len(self._slots)

    # -- adding packets ---------------------------------------------------------------------------
    def account(self, pkt: RawPacket) -> np.ndarray | None:
        """Add one packet (buffered); returns flows a full cache evicted meanwhile, else None."""
        self._buffer.append((pack_key(pkt.key, self.tunnels), pkt.packets, pkt.octets, pkt.mono_ns, pkt.tcp_flags, pkt.tos))
        if pkt.mono_ns < self._buffer_first:
            self._buffer_first = pkt.mono_ns
        if ends_flow(pkt.tcp_flags, pkt.key.protocol):
            self._buffer_first = -_NEVER  # due at the next check
        if len(self._buffer) >= _SCALAR_BUFFER:
            self._apply_buffer()
        return self._take_evicted()

    def account_all(self, pkts: Iterable[RawPacket]) -> list[np.ndarray]:
        """Account many packets; returns the batches evicted along the way (possibly none)."""
        for pkt in pkts:
            self._buffer.append((pack_key(pkt.key, self.tunnels), pkt.packets, pkt.octets, pkt.mono_ns, pkt.tcp_flags, pkt.tos))
        self._apply_buffer()
        out = self._take_evicted()
        return [] if out is None else [out]

    def account_batch(self, keys: np.ndarray, packets: np.ndarray, octets: np.ndarray, ts_ns: np.ndarray,
                      tcp_flags: np.ndarray, tos: np.ndarray) -> list[np.ndarray]:
        """Account n packets given as arrays (keys: any flow-key dtype, e.g. the kernel's spill record
        key); returns the batches a full cache evicted (possibly none)."""
        self._apply_buffer()
        self._apply(to_keys(keys, self.key_dtype), packets, octets, ts_ns, tcp_flags, tos)
        out = self._take_evicted()
        return [] if out is None else [out]

    def _apply_buffer(self) -> None:
        if not self._buffer:
            return
        buf, self._buffer = self._buffer, []
        self._buffer_first = _NEVER
        keys = np.frombuffer(b"".join(b[0] for b in buf), dtype=self.key_dtype)
        cols = np.array([b[1:] for b in buf], dtype=np.uint64)
        self._apply(keys, cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3], cols[:, 4])

    def _apply(self, keys: np.ndarray, packets: np.ndarray, octets: np.ndarray, ts_ns: np.ndarray,
               tcp_flags: np.ndarray, tos: np.ndarray) -> None:
        """Merge packet arrays into the cache, at most max_entries at a time (so at most that many
        new flows need room at once)."""
        step = max(1, self.max_entries)
        for i in range(0, len(keys), step):
            s = slice(i, i + step)
            self._apply_chunk(keys[s], packets[s], octets[s], ts_ns[s], tcp_flags[s], tos[s])

    def _apply_chunk(self, keys: np.ndarray, packets: np.ndarray, octets: np.ndarray, ts_ns: np.ndarray,
                     tcp_flags: np.ndarray, tos: np.ndarray) -> None:
        n = len(keys)
        if n == 0:
            return
        # 1. aggregate the chunk per key (sorting raw key bytes)
        size = self.key_dtype.itemsize
        raw = np.ascontiguousarray(keys).view(f"V{size}").reshape(n)
        uniq, inv = np.unique(raw, return_inverse=True)
        m = len(uniq)
        inv = inv.reshape(n)
        agg = np.zeros(m, dtype=LEAF_DTYPE)
        ts = np.asarray(ts_ns, dtype=np.uint64)
        p = np.zeros(m, np.uint64)
        o = np.zeros(m, np.uint64)
        np.add.at(p, inv, np.asarray(packets, dtype=np.uint64))
        np.add.at(o, inv, np.asarray(octets, dtype=np.uint64))
        first = np.full(m, np.iinfo(np.uint64).max, np.uint64)
        last = np.zeros(m, np.uint64)
        np.minimum.at(first, inv, ts)
        np.maximum.at(last, inv, ts)
        flags = np.zeros(m, np.uint64)
        np.bitwise_or.at(flags, inv, np.asarray(tcp_flags, dtype=np.uint64))
        order = np.argsort(ts, kind="stable")  # tos of each flow's latest packet
        t = np.zeros(m, np.uint8)
        t[inv[order]] = np.asarray(tos, dtype=np.uint8)[order]
        agg["packets"], agg["octets"], agg["first_ns"], agg["last_ns"] = p, o, first, last
        agg["tcp_flags"], agg["tos"] = flags, t
        self.accounted_packets += int(p.sum())
        # 2. which keys are cached already (one dict lookup per distinct key)
        ub = uniq.tobytes()
        kb = [ub[i * size:(i + 1) * size] for i in range(m)]
        get = self._slots.get
        found = [get(k, -1) for k in kb]
        slot = np.array(found, dtype=np.int64)
        old = slot >= 0
        if old.any():
            s = slot[old]
            cur = self._leaves[s]
            merge_leaves(cur, agg[old])
            self._leaves[s] = cur
        new = np.flatnonzero(~old)
        if len(new):
            self._make_room(len(new))
            slots = self._alloc(len(new))
            self._keys[slots] = uniq[new].view(self.key_dtype).reshape(len(new))
            self._leaves[slots] = agg[new]
            self._used[slots] = True
            for j, sl in zip(new.tolist(), slots.tolist(), strict=True):
                self._slots[kb[j]] = sl
        # 3. the earliest time any of these flows can expire
        d = flow_deadlines(agg["first_ns"], agg["last_ns"], agg["tcp_flags"], uniq.view(self.key_dtype)["protocol"],
                           self.evict_timeout_ns, self.active_timeout_ns)
        self._next_due = min(self._next_due, int(d.min()))

    def _make_room(self, need: int) -> None:
        """Evict the least recently seen flows (flowEndReason 5) so `need` new ones fit."""
        over = len(self._slots) + need - self.max_entries
        if over <= 0:
            return
        count = min(len(self._slots), max(over, self.max_entries // 16))
        used = np.flatnonzero(self._used)
        oldest = used[np.argpartition(self._leaves["last_ns"][used], count - 1)[:count]] if count < len(used) else used
        self._evicted.append(self._evict_slots(oldest, EndReason.LACK_OF_RESOURCES))

    def _alloc(self, n: int) -> np.ndarray:
        if len(self._free) < n:
            cap = len(self._keys)
            grow = max(cap, n - len(self._free))
            self._keys = np.concatenate([self._keys, np.zeros(grow, self.key_dtype)])
            self._leaves = np.concatenate([self._leaves, np.zeros(grow, LEAF_DTYPE)])
            self._used = np.concatenate([self._used, np.zeros(grow, bool)])
            self._free[:0] = range(cap + grow - 1, cap - 1, -1)
        taken = self._free[-n:]
        del self._free[-n:]
        return np.array(taken, dtype=np.int64)

    # -- evicting ---------------------------------------------------------------------------------
    def evict_if_due(self) -> np.ndarray | None:
        """Flows whose own idle or active timeout has passed, or that saw TCP FIN/RST, plus any a full
        cache evicted; None when there are none. Cheap when nothing can be due yet: buffered packets are
        applied only then (or when 256 are waiting, or one carries a TCP FIN/RST)."""
        now = self.clock.mono_ns()
        buffered_due = self._buffer_first + min(self.evict_timeout_ns, self.active_timeout_ns)
        if now < self._next_due and now < buffered_due:
            return self._take_evicted()
        self._apply_buffer()
        if now >= self._next_due and self._slots:
            used = np.flatnonzero(self._used)
            lv = self._leaves[used]
            protocol = self._keys["protocol"][used]
            reasons = expiry_reasons(lv["first_ns"], lv["last_ns"], lv["tcp_flags"], protocol, now,
                                     self.evict_timeout_ns, self.active_timeout_ns)
            go = reasons != 0
            if go.any():
                self._evicted.append(self._evict_slots(used[go], reasons[go]))
            keep = ~go
            d = flow_deadlines(lv["first_ns"][keep], lv["last_ns"][keep], lv["tcp_flags"][keep], protocol[keep],
                               self.evict_timeout_ns, self.active_timeout_ns)
            self._next_due = int(d.min()) if len(d) else _NEVER
        elif not self._slots:
            self._next_due = _NEVER
        return self._take_evicted()

    def evict_ended(self, end_keys: Collection[bytes]) -> np.ndarray | None:
        """Flows whose connection ended elsewhere (conntrack DESTROY: packed 5-tuples as
        model.five_tuple_keys makes), flowEndReason 3; None if none."""
        self._apply_buffer()
        if not end_keys or not self._slots:
            return None
        used = np.flatnonzero(self._used)
        hit = np.fromiter((k in end_keys for k in five_tuple_keys(self._keys[used])), dtype=bool, count=len(used))
        if not hit.any():
            return None
        return self._evict_slots(used[hit], EndReason.END_OF_FLOW)

    def evict_where(self, pred: Callable[[FlowKey, int], bool], reason: int) -> np.ndarray | None:
        """Flows for which pred(key, tcp_flags seen) holds, with the given end reason; None if none.
        Builds a FlowKey per cached flow: for small caches (evict_ended is the vectorised form)."""
        self._apply_buffer()
        used = np.flatnonzero(self._used)
        raw = self._keys[used].tobytes()
        size = self.key_dtype.itemsize
        flags = self._leaves["tcp_flags"][used].tolist()
        hit = [i for i in range(len(used)) if pred(unpack_key(raw[i * size:(i + 1) * size]), flags[i])]
        if not hit:
            return None
        return self._evict_slots(used[hit], reason)

    def flush(self) -> np.ndarray:
        """Evict everything now (shutdown): flowEndReason forced end (with what a full cache evicted)."""
        self._apply_buffer()
        self._evicted.append(self._evict_slots(np.flatnonzero(self._used), EndReason.FORCED_END))
        self._next_due = _NEVER
        out = self._take_evicted()
        return out if out is not None else empty_batch(0)

    def _take_evicted(self) -> np.ndarray | None:
        if not self._evicted:
            return None
        out, self._evicted = self._evicted, []
        out = [b for b in out if len(b)]
        if not out:
            return None
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _evict_slots(self, slots: np.ndarray, reasons: np.ndarray | int) -> np.ndarray:
        now_wall = self.clock.wall_ns()
        now_mono = self.clock.mono_ns()
        keys = self._keys[slots]
        batch = build_rows(keys, self._leaves[slots], reasons, now_wall, now_mono)
        raw = keys.tobytes()
        size = self.key_dtype.itemsize
        for i in range(len(slots)):
            del self._slots[raw[i * size:(i + 1) * size]]
        self._used[slots] = False
        self._free.extend(slots.tolist())
        n = len(slots)
        self.evicted_flows += n
        if isinstance(reasons, np.ndarray):
            for r, c in zip(*np.unique(reasons, return_counts=True), strict=True):
                self.by_reason[int(r)] = self.by_reason.get(int(r), 0) + int(c)
        else:
            self.by_reason[int(reasons)] = self.by_reason.get(int(reasons), 0) + n
            if reasons == EndReason.LACK_OF_RESOURCES:
                self.evictions += n
        return batch
