"""The one row builder and the one carry/merge of flow entries: pure numpy, no clock, no I/O.

A flow is a key (the FLOW_DTYPE key columns) and a leaf (packets, octets, first_ns, last_ns, tcp_flags,
tos; timestamps monotonic ns as bpf_ktime_get_ns). The kernel drain, the ring-buffer spill and the
userspace Accounter all hold flows in that shape, whatever their exact struct layout (the kernel's
struct flow_key has padding; KEY_DTYPE is packed), and all turn them into FLOW_DTYPE rows here.
Fields are matched by name, so any structured dtype with these names works.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ipfixer.model import FLOW_DTYPE, Direction, FlowKey, empty_batch

KEY_FIELDS: tuple[str, ...] = ("ethertype", "direction", "vlan_id", "src_mac", "dst_mac", "src_addr", "dst_addr",
                               "src_port", "dst_port", "protocol", "ifindex")
_FLOW_FIELDS: Any = FLOW_DTYPE.fields
# Key fields only a TUNNEL_DECAP build of the classifier has (bpf/flow_types.h): copied when present.
TUNNEL_FIELDS: tuple[str, ...] = ("tunnel_id", "tunnel_type", "inner_vlan_id", "outer_src_addr", "outer_dst_addr")

# The userspace flow key: FLOW_DTYPE's key columns, packed (58 bytes), hashed as raw bytes.
KEY_DTYPE = np.dtype([(n, _FLOW_FIELDS[n][0]) for n in KEY_FIELDS])
# With tunnels.decap the key holds the tunnel too (the spill of a decap build, NFLOG/pcap decap): 97 bytes.
TUNNEL_KEY_DTYPE = np.dtype([(n, _FLOW_FIELDS[n][0]) for n in KEY_FIELDS + TUNNEL_FIELDS])
# The same layouts for one FlowKey ('=' native order, no alignment, as numpy's packed dtype).
KEY_STRUCT = struct.Struct("=HBH6s6s16s16sHHBI")
TUNNEL_KEY_STRUCT = struct.Struct("=HBH6s6s16s16sHHBIIBH16s16s")
assert KEY_STRUCT.size == KEY_DTYPE.itemsize and TUNNEL_KEY_STRUCT.size == TUNNEL_KEY_DTYPE.itemsize

# The userspace leaf (same names as the kernel's struct flow_metrics; tcp_flags is u64 there).
LEAF_DTYPE = np.dtype([("packets", "u8"), ("octets", "u8"), ("first_ns", "u8"), ("last_ns", "u8"),
                       ("tcp_flags", "u8"), ("tos", "u1")])


def key_dtype(tunnels: bool) -> np.dtype:
    """The userspace key layout: with the tunnel columns when tunnels are decapsulated."""
    return TUNNEL_KEY_DTYPE if tunnels else KEY_DTYPE


def pack_key(k: FlowKey, tunnels: bool = False) -> bytes:
    """One FlowKey as the bytes of a key_dtype(tunnels) row."""
    if tunnels:
        return TUNNEL_KEY_STRUCT.pack(k.ethertype, k.direction, k.vlan_id, k.src_mac, k.dst_mac, k.src_addr,
                                      k.dst_addr, k.src_port, k.dst_port, k.protocol, k.ifindex, k.tunnel_id,
                                      k.tunnel_type, k.inner_vlan_id, k.outer_src_addr, k.outer_dst_addr)
    return KEY_STRUCT.pack(k.ethertype, k.direction, k.vlan_id, k.src_mac, k.dst_mac, k.src_addr, k.dst_addr,
                           k.src_port, k.dst_port, k.protocol, k.ifindex)


def unpack_key(raw: bytes) -> FlowKey:
    """The bytes of a KEY_DTYPE or TUNNEL_KEY_DTYPE row (told apart by length) as a FlowKey."""
    if len(raw) == TUNNEL_KEY_STRUCT.size:
        (ethertype, direction, vlan_id, src_mac, dst_mac, src_addr, dst_addr, src_port, dst_port, protocol,
         ifindex, tunnel_id, tunnel_type, inner_vlan, outer_src, outer_dst) = TUNNEL_KEY_STRUCT.unpack(raw)
        return FlowKey(ethertype, direction, src_mac, dst_mac, src_addr, dst_addr, src_port, dst_port, protocol,
                       ifindex, vlan_id, tunnel_type, tunnel_id, inner_vlan, outer_src, outer_dst)
    (ethertype, direction, vlan_id, src_mac, dst_mac, src_addr, dst_addr, src_port, dst_port, protocol,
     ifindex) = KEY_STRUCT.unpack(raw)
    return FlowKey(ethertype, direction, src_mac, dst_mac, src_addr, dst_addr, src_port, dst_port, protocol,
                   ifindex, vlan_id)


def fields_view(names: tuple[str, ...], layout: np.dtype) -> np.dtype:
    """A dtype with the named fields at their offsets in layout (same itemsize as layout): viewing two
    arrays through such dtypes makes a by-name structured copy one C-level assignment."""
    fields: Any = layout.fields or {}
    spec: dict[str, Any] = {
        "names": list(names),
        "formats": [fields[n][0] for n in names],
        "offsets": [fields[n][1] for n in names],
        "itemsize": layout.itemsize,
    }
    out: np.dtype = np.dtype(spec)  # type: ignore[call-overload]
    return out


_VIEWS: dict[tuple[np.dtype, np.dtype, tuple[str, ...]], tuple[np.dtype, np.dtype]] = {}


def copy_fields(src: np.ndarray, dst: np.ndarray, names: tuple[str, ...] = KEY_FIELDS) -> None:
    """dst[name] = src[name] for every name (both arrays have those fields), in one pass."""
    pair = (src.dtype, dst.dtype, names)
    views = _VIEWS.get(pair)
    if views is None:
        # in the source's field order: numpy copies 3x faster than in any other order
        ordered = tuple(n for n in src.dtype.names or () if n in names)
        views = _VIEWS[pair] = (fields_view(ordered, src.dtype), fields_view(ordered, dst.dtype))
    dst.view(views[1])[...] = np.ascontiguousarray(src).view(views[0])


def to_keys(keys: np.ndarray, layout: np.dtype = KEY_DTYPE) -> np.ndarray:
    """Any array of flow keys (the kernel's struct flow_key, a FLOW_DTYPE batch) in a userspace key
    layout (KEY_DTYPE, or TUNNEL_KEY_DTYPE: tunnel columns a source lacks are zero)."""
    if keys.dtype == layout:
        return keys
    names = keys.dtype.names or ()
    if not set(KEY_FIELDS) <= set(names):
        raise ValueError(f"not an array of flow keys: {keys.dtype}")
    wanted = layout.names or ()
    out = np.empty(len(keys), dtype=layout) if set(wanted) <= set(names) else np.zeros(len(keys), dtype=layout)
    copy_fields(keys, out, tuple(n for n in wanted if n in names))
    return out


def wall_ms(mono_ns: np.ndarray, now_wall_ns: int, now_mono_ns: int) -> np.ndarray:
    """Vectorised clock.mono_to_wall_ms: wall(t) = now_wall - (now_mono - t), in ms."""
    return ((now_wall_ns - (now_mono_ns - mono_ns.astype(np.int64))) // 1_000_000).astype(np.uint64)


def build_rows(keys: np.ndarray, leaves: np.ndarray, reasons: np.ndarray | int, now_wall_ns: int,
               now_mono_ns: int) -> np.ndarray:
    """FLOW_DTYPE rows of flows: keys and leaves by field name, times from monotonic ns to wall ms
    (taken from one pair of clock readings, so a batch is consistent), flowEndReason per row."""
    out = empty_batch(len(keys))
    if len(keys) == 0:
        return out
    copy_fields(keys, out)
    if "tunnel_type" in (keys.dtype.names or ()):
        copy_fields(keys, out, tuple(n for n in TUNNEL_FIELDS if n in (keys.dtype.names or ())))
    out["packets"] = leaves["packets"]
    out["octets"] = leaves["octets"]
    out["start_ms"] = wall_ms(leaves["first_ns"], now_wall_ns, now_mono_ns)
    out["end_ms"] = wall_ms(leaves["last_ns"], now_wall_ns, now_mono_ns)
    out["tcp_flags"] = (leaves["tcp_flags"] & 0xFF).astype(np.uint8)
    out["tos"] = leaves["tos"]
    out["end_reason"] = reasons
    ingress = out["direction"] == Direction.INGRESS
    out["ingress_if"] = np.where(ingress, out["ifindex"], 0)
    out["egress_if"] = np.where(ingress, 0, out["ifindex"])
    return out


# --- carry/merge: two sets of entries for possibly the same keys become one set ------------------


def rows_u8(a: np.ndarray) -> np.ndarray:
    """A structured array as a 2-D uint8 array (row copies are plain memcpy, not per-field)."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(len(a), a.dtype.itemsize)


def select(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """a[mask] (or a[indices]) for a structured array, through its raw rows (no copy when the mask
    selects every row)."""
    if mask.dtype == bool and len(mask) == len(a) and mask.all():
        return a
    out: np.ndarray = rows_u8(a)[mask].reshape(-1).view(a.dtype)
    return out


def concat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.concatenate of two structured arrays of one dtype, through their raw rows."""
    return np.concatenate([rows_u8(a), rows_u8(b)]).reshape(-1).view(a.dtype)


def key_hash(keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each key's raw bytes, over u64 words (collisions: checked by the caller)."""
    raw = rows_u8(keys)
    size = keys.dtype.itemsize
    whole = size // 8 * 8
    cols = [raw[:, i:i + 8].copy().view(np.uint64)[:, 0] for i in range(0, whole, 8)]
    if whole < size:
        tail = np.zeros((len(keys), 8), dtype=np.uint8)
        tail[:, : size - whole] = raw[:, whole:]
        cols.append(tail.view(np.uint64)[:, 0])
    h = np.full(len(keys), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in cols:
            h ^= col
            h *= np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
    return h


def match_keys(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ia, ib): indices of equal keys in a and b (each side's keys unique), by hash verified on bytes."""
    if len(a) == 0 or len(b) == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    _, ia, ib = np.intersect1d(key_hash(a), key_hash(b), assume_unique=False, return_indices=True)
    vkey = f"V{a.dtype.itemsize}"
    same = rows_u8(a).view(vkey)[ia, 0] == rows_u8(b).view(vkey)[ib, 0]  # a hash collision is no match
    return ia[same], ib[same]


def merge_leaves(into: np.ndarray, add: np.ndarray) -> None:
    """into += add, elementwise for equal-length leaf arrays: counters summed, first the earliest, last
    the latest, TCP flags OR-ed, tos the newer entry's."""
    into["packets"] += add["packets"]
    into["octets"] += add["octets"]
    into["first_ns"] = np.minimum(into["first_ns"], add["first_ns"])
    newer = add["last_ns"] >= into["last_ns"]
    into["tos"] = np.where(newer, add["tos"], into["tos"])
    into["last_ns"] = np.maximum(into["last_ns"], add["last_ns"])
    into["tcp_flags"] |= add["tcp_flags"]


def merge(keys_a: np.ndarray, leaves_a: np.ndarray, keys_b: np.ndarray,
          leaves_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of two sets of flows (keys unique within each set): entries of the same key merged."""
    if len(keys_a) == 0:
        return keys_b, leaves_b
    if len(keys_b) == 0:
        return keys_a, leaves_a
    ia, ib = match_keys(keys_a, keys_b)
    la = np.array(leaves_a, copy=True)
    part = la[ia]
    merge_leaves(part, leaves_b[ib])
    la[ia] = part
    rest = np.ones(len(keys_b), dtype=bool)
    rest[ib] = False
    return concat(keys_a, select(keys_b, rest)), concat(la, select(leaves_b, rest))


assert build_rows(np.zeros(1, KEY_DTYPE), np.zeros(1, LEAF_DTYPE), 0, 0, 0).dtype == FLOW_DTYPE
