"""Biflow records (RFC 5103): the two directions of a connection in one Data Record.

The meter keeps uniflows (one per direction and observation interface).  For collectors that asked for
biflows, the Exporter passes every exported batch through a BiflowPairer, which joins a uniflow with
its reverse (addresses and ports swapped, same interface, ethertype, VLAN and protocol) into one row:
the initiator's direction in the ordinary columns, the other in the rev_* columns that the reverse
Information Elements (PEN 29305, RFC 5103 6.1) carry, and biflowDirection (239, RFC 5103 6.3):

- conntrack knows the initiator where enrichment is on: the uniflow that matched the reply tuple
  (ct_state "rpl", 0x08, with "trk", 0x20) is the reverse direction; biflowDirection 1 (initiator);
- otherwise the direction whose first packet was seen first (earlier flowStart) is the initiator (1);
  both first seen in the same millisecond: 0 (arbitrary), the source being the side whose destination
  port is lower (the likely service port), as collectors guess when they pair uniflows themselves;
- a uniflow whose partner does not come within the hold time (one idle timeout) is exported alone,
  reverse counters zero, biflowDirection 1, or 2 (reverseInitiator) when conntrack says it is the
  reply direction.

The two uniflows expire on their own (one idle timeout each), so the first is held until its partner
arrives or the hold time passes; everything held is bounded (max_held; beyond it a uniflow goes out
alone at once, counted) and flushed at shutdown.  Counters are never summed across records or split:
each biflow carries exactly the two uniflow records' counts, so the totals equal the uniflow export.
ICMP echo request and reply pair with each other (other ICMP messages go alone).

Pure: takes batches and `now`, returns batches.  Hand-written (no library does RFC 5103 pairing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ipfixer.model import CT_REPLY, CT_TRACKED, empty_batch

BIFLOW_ARBITRARY = 0  # IANA biflowDirection (239) values, RFC 5103 6.3
BIFLOW_INITIATOR = 1
BIFLOW_REVERSE_INITIATOR = 2

ECHO_MARK = 0xFFFF  # the "ports" of an ICMP echo request or reply in a pair key
_KEY_DTYPE = np.dtype([("e", "<u2"), ("v", "<u2"), ("i", "<u4"), ("p", "u1"), ("a", "u1", (16,)),
                       ("b", "u1", (16,)), ("sp", "<u2"), ("dp", "<u2"), ("tt", "u1"), ("ti", "<u4"),
                       ("iv", "<u2"), ("oa", "u1", (16,)), ("ob", "u1", (16,))])


def pair_keys(rows: np.ndarray, *, reverse: bool) -> list[bytes]:
    """Per row the packed (ethertype, vlan, ifindex, protocol, src, dst, sport, dport, tunnel) key, or
    with the addresses and ports swapped (the key its reverse uniflow has). The tunnel (tunnels.decap:
    type, VNI/key, inner VLAN, outer addresses, swapped too) keeps tenants that reuse addresses apart."""
    k = np.empty(len(rows), dtype=_KEY_DTYPE)
    k["e"], k["v"], k["i"], k["p"] = rows["ethertype"], rows["vlan_id"], rows["ifindex"], rows["protocol"]
    src, dst, sport, dport = ("dst_addr", "src_addr", "dst_port", "src_port") if reverse else \
        ("src_addr", "dst_addr", "src_port", "dst_port")
    k["a"], k["b"], k["sp"], k["dp"] = rows[src], rows[dst], rows[sport], rows[dport]
    k["tt"], k["ti"], k["iv"] = rows["tunnel_type"], rows["tunnel_id"], rows["inner_vlan_id"]
    k["oa"], k["ob"] = (rows["outer_dst_addr"], rows["outer_src_addr"]) if reverse else \
        (rows["outer_src_addr"], rows["outer_dst_addr"])
    # ICMP echo request and reply (types 8/0, ICMPv6 128/129; dst_port is type*256+code): the same
    # exchange, so both get one marker in place of the type, and pair like a request and its response
    proto, t = rows["protocol"], rows["dst_port"] >> 8
    echo = ((proto == 1) & ((t == 8) | (t == 0))) | ((proto == 58) & ((t == 128) | (t == 129)))
    k["sp"][echo] = ECHO_MARK
    k["dp"][echo] = ECHO_MARK
    raw, n = k.tobytes(), _KEY_DTYPE.itemsize
    return [raw[i : i + n] for i in range(0, len(raw), n)]


@dataclass
class BiflowStats:
    """What the pairer did: rows joined, rows sent alone (and of those, because held was full)."""

    paired: int = 0  # biflow records of two uniflows
    unpaired: int = 0  # biflow records of one uniflow (partner never came within the hold time)
    overflow: int = 0  # of the unpaired, sent at once because max_held uniflows were already held


def take_rows(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """rows[idx] through a byte view: numpy gathers a wide structured dtype field by field, bytes at once."""
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), rows.dtype.itemsize)
    out: np.ndarray = raw[idx].reshape(-1).view(rows.dtype)
    return out


def biflow_rows(src: np.ndarray, a_idx: np.ndarray, b_idx: np.ndarray) -> np.ndarray:
    """One FLOW_DTYPE row per (src[a], src[b]) uniflow pair, b = -1 for a uniflow alone: oriented,
    rev_* and biflow_direction filled.  Vectorised over the whole batch."""
    paired = b_idx >= 0
    b_or_a = np.where(paired, b_idx, a_idx)
    sa, sb = src["ct_state"][a_idx], src["ct_state"][b_or_a]
    start_a, start_b = src["start_ms"][a_idx], src["start_ms"][b_or_a]
    reply_a = ((sa & CT_TRACKED) != 0) & ((sa & CT_REPLY) != 0)
    reply_b = ((sb & CT_TRACKED) != 0) & ((sb & CT_REPLY) != 0)
    ct_known = ((sa & CT_TRACKED) != 0) & ((sb & CT_TRACKED) != 0) & (reply_a != reply_b)
    tie = start_a == start_b
    dport = src["dst_port"]
    swap = paired & ((ct_known & reply_a)
                     | (~ct_known & ~tie & (start_b < start_a))
                     # both first seen in the same millisecond: the lower destination port is the service's
                     | (~ct_known & tie & (dport[b_or_a] < dport[a_idx])))
    fwd_idx = np.where(swap, b_or_a, a_idx)
    rev_idx = np.where(swap, a_idx, b_or_a)
    out = take_rows(src, fwd_idx)

    def rev(col: str) -> np.ndarray:  # a column of the reverse uniflows (never the whole wide row)
        return np.asarray(src[col][rev_idx])

    for to, frm in (("rev_packets", "packets"), ("rev_octets", "octets"), ("rev_start_ms", "start_ms"),
                    ("rev_end_ms", "end_ms"), ("rev_tcp_flags", "tcp_flags"), ("rev_tos", "tos")):
        out[to] = np.where(paired, rev(frm), 0)
    direction = np.where(ct_known | ~tie, BIFLOW_INITIATOR, BIFLOW_ARBITRARY)
    alone = np.where(reply_a, BIFLOW_REVERSE_INITIATOR, BIFLOW_INITIATOR)
    out["biflow_direction"] = np.where(paired, direction, alone)
    # a biflow ends when its last direction ends: flowEndReason of the one that ended last
    later = paired & (rev("end_ms") > out["end_ms"])
    out["end_reason"] = np.where(later, rev("end_reason"), out["end_reason"])
    for col in ("ingress_if", "egress_if"):  # the reply left where the request came in
        out[col] = np.where(paired & (out[col] == 0), rev(col), out[col])
    return out


class BiflowPairer:
    """Joins uniflows with their reverse across batches (see the module docstring).

    The matching walks the rows once with a dict of held keys (integers only: positions); every row
    copy, orientation and column fill is vectorised (biflow_rows)."""

    def __init__(self, hold_ns: int, max_held: int = 1 << 18) -> None:
        """hold_ns: how long a uniflow waits for its reverse (one idle timeout); max_held: how many wait."""
        self.hold_ns = hold_ns
        self.max_held = max_held
        self.stats = BiflowStats()
        self._rows = empty_batch(0)  # uniflows waiting for their reverse
        self._deadline = np.empty(0, dtype=np.int64)  # wall ns until which each waits
        self._index: dict[bytes, int] = {}  # pair key -> position in _rows

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, batch: np.ndarray, now_ns: int) -> np.ndarray:
        """Biflow rows ready now: pairs completed by this batch, and held uniflows whose time is up."""
        nh = len(self._rows)
        index = self._index  # key -> position in src = held rows, then this batch's rows
        pa: list[int] = []
        pb: list[int] = []
        lone: list[int] = []
        if len(batch):
            fwd, rev = pair_keys(batch, reverse=False), pair_keys(batch, reverse=True)
            for i in range(len(batch)):
                pos, k, r = nh + i, fwd[i], rev[i]
                if r != k:  # a flow that is its own reverse is never paired with itself
                    j = index.pop(r, None)
                    if j is not None:
                        pa.append(j)
                        pb.append(pos)
                        continue
                j = index.pop(k, None)
                if j is not None:  # the same direction again (an active-timeout record): no partner came
                    lone.append(j)
                if len(index) >= self.max_held:
                    lone.append(pos)
                    self.stats.overflow += 1
                    continue
                index[k] = pos
            src = np.concatenate([self._rows, batch]) if nh else batch
            deadline = np.concatenate([self._deadline, np.full(len(batch), now_ns + self.hold_ns, np.int64)])
        else:
            src, deadline = self._rows, self._deadline
        keys = list(index)
        positions = np.fromiter(index.values(), dtype=np.int64, count=len(keys))
        expired = deadline[positions] <= now_ns
        lone.extend(positions[expired].tolist())
        keep = positions[~expired]
        self._rows, self._deadline = take_rows(src, keep), deadline[keep]
        self._index = {k: n for n, k in enumerate(k for k, e in zip(keys, expired.tolist(), strict=True) if not e)}
        self.stats.paired += len(pa)
        self.stats.unpaired += len(lone)
        a = np.asarray(pa + lone, dtype=np.int64)
        b = np.asarray(pb + [-1] * len(lone), dtype=np.int64)
        return biflow_rows(src, a, b) if len(a) else empty_batch(0)

    def due(self, now_ns: int) -> np.ndarray:
        """Held uniflows whose hold time has passed, alone (an idle drain: no batch to pair with)."""
        return self.add(empty_batch(0), now_ns)

    def flush(self) -> np.ndarray:
        """Everything held, alone (shutdown, reload)."""
        n = len(self._rows)
        rows = self._rows
        self._rows, self._deadline, self._index = empty_batch(0), np.empty(0, dtype=np.int64), {}
        self.stats.unpaired += n
        return biflow_rows(rows, np.arange(n, dtype=np.int64), np.full(n, -1, np.int64)) if n else empty_batch(0)
