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
ICMP echo request and reply differ in type (the "port" of the key) and stay two records.

Pure: takes batches and `now`, returns batches.  Hand-written (no library does RFC 5103 pairing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ipfixer.enrich.conntrack import CT_REPLY, CT_TRACKED
from ipfixer.model import empty_batch

BIFLOW_ARBITRARY = 0  # IANA biflowDirection (239) values, RFC 5103 6.3
BIFLOW_INITIATOR = 1
BIFLOW_REVERSE_INITIATOR = 2

_KEY_DTYPE = np.dtype([("e", "<u2"), ("v", "<u2"), ("i", "<u4"), ("p", "u1"), ("a", "u1", (16,)),
                       ("b", "u1", (16,)), ("sp", "<u2"), ("dp", "<u2")])


def pair_keys(rows: np.ndarray, *, reverse: bool) -> list[bytes]:
    """Per row the packed (ethertype, vlan, ifindex, protocol, src, dst, sport, dport) key, or with the
    addresses and ports swapped (the key its reverse uniflow has)."""
    k = np.empty(len(rows), dtype=_KEY_DTYPE)
    k["e"], k["v"], k["i"], k["p"] = rows["ethertype"], rows["vlan_id"], rows["ifindex"], rows["protocol"]
    src, dst, sport, dport = ("dst_addr", "src_addr", "dst_port", "src_port") if reverse else \
        ("src_addr", "dst_addr", "src_port", "dst_port")
    k["a"], k["b"], k["sp"], k["dp"] = rows[src], rows[dst], rows[sport], rows[dport]
    raw, n = k.tobytes(), _KEY_DTYPE.itemsize
    return [raw[i : i + n] for i in range(0, len(raw), n)]


@dataclass
class BiflowStats:
    """What the pairer did: rows joined, rows sent alone (and of those, because held was full)."""

    paired: int = 0  # biflow records of two uniflows
    unpaired: int = 0  # biflow records of one uniflow (partner never came within the hold time)
    overflow: int = 0  # of the unpaired, sent at once because max_held uniflows were already held


def _is_reply(row: np.ndarray) -> bool:
    state = int(row["ct_state"][0])
    return bool(state & CT_TRACKED and state & CT_REPLY)


def orient(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(initiator's uniflow, the reverse one, biflowDirection) of two 1-row uniflow arrays."""
    ta, tb = int(a["ct_state"][0]), int(b["ct_state"][0])
    if ta & CT_TRACKED and tb & CT_TRACKED and _is_reply(a) != _is_reply(b):
        return (b, a, BIFLOW_INITIATOR) if _is_reply(a) else (a, b, BIFLOW_INITIATOR)
    sa, sb = int(a["start_ms"][0]), int(b["start_ms"][0])
    if sa == sb:  # both first seen in the same millisecond (a SYN and its SYN-ACK on a veth): no knowledge
        if int(b["dst_port"][0]) < int(a["dst_port"][0]):  # the lower destination port is likely the service's
            return b, a, BIFLOW_ARBITRARY
        return a, b, BIFLOW_ARBITRARY
    return (a, b, BIFLOW_INITIATOR) if sa < sb else (b, a, BIFLOW_INITIATOR)


def biflow_rows(pairs: list[tuple[np.ndarray, np.ndarray | None]]) -> np.ndarray:
    """One FLOW_DTYPE row per (uniflow, reverse uniflow or None), rev_* and biflow_direction filled."""
    out = empty_batch(len(pairs))
    for i, (a, b) in enumerate(pairs):
        if b is None:
            out[i] = a[0]
            out["biflow_direction"][i] = BIFLOW_REVERSE_INITIATOR if _is_reply(a) else BIFLOW_INITIATOR
            continue
        fwd, rev, direction = orient(a, b)
        out[i] = fwd[0]
        out["rev_packets"][i] = rev["packets"][0]
        out["rev_octets"][i] = rev["octets"][0]
        out["rev_start_ms"][i] = rev["start_ms"][0]
        out["rev_end_ms"][i] = rev["end_ms"][0]
        out["rev_tcp_flags"][i] = rev["tcp_flags"][0]
        out["rev_tos"][i] = rev["tos"][0]
        out["biflow_direction"][i] = direction
        # a biflow ends when its last direction ends; flowEndReason of the one that ended last
        if int(rev["end_ms"][0]) > int(fwd["end_ms"][0]):
            out["end_reason"][i] = rev["end_reason"][0]
        if not out["egress_if"][i]:
            out["egress_if"][i] = rev["egress_if"][0]
        if not out["ingress_if"][i]:
            out["ingress_if"][i] = rev["ingress_if"][0]
    return out


class BiflowPairer:
    """Joins uniflows with their reverse across batches (see the module docstring)."""

    def __init__(self, hold_ns: int, max_held: int = 1 << 18) -> None:
        """hold_ns: how long a uniflow waits for its reverse (one idle timeout); max_held: how many wait."""
        self.hold_ns = hold_ns
        self.max_held = max_held
        self.stats = BiflowStats()
        self._held: dict[bytes, tuple[int, np.ndarray]] = {}  # key -> (deadline ns, 1-row copy)

    def __len__(self) -> int:
        return len(self._held)

    def add(self, batch: np.ndarray, now_ns: int) -> np.ndarray:
        """Biflow rows ready now: pairs completed by this batch, and held uniflows whose time is up."""
        out: list[tuple[np.ndarray, np.ndarray | None]] = []
        if len(batch):
            fwd, rev = pair_keys(batch, reverse=False), pair_keys(batch, reverse=True)
            for i in range(len(batch)):
                row = batch[i : i + 1].copy()
                partner = self._held.pop(rev[i], None)
                if partner is not None and rev[i] != fwd[i]:
                    out.append((partner[1], row))
                    self.stats.paired += 1
                    continue
                if partner is not None:  # its own reverse (same address and port both ways)
                    self._held[rev[i]] = partner
                earlier = self._held.pop(fwd[i], None)
                if earlier is not None:  # the same direction again (an active-timeout record): no partner came
                    out.append((earlier[1], None))
                    self.stats.unpaired += 1
                if len(self._held) >= self.max_held:
                    out.append((row, None))
                    self.stats.unpaired += 1
                    self.stats.overflow += 1
                    continue
                self._held[fwd[i]] = (now_ns + self.hold_ns, row)
        out.extend(self._expire(now_ns))
        return biflow_rows(out)

    def due(self, now_ns: int) -> np.ndarray:
        """Held uniflows whose hold time has passed, alone (an idle drain: no batch to pair with)."""
        return biflow_rows(self._expire(now_ns))

    def flush(self) -> np.ndarray:
        """Everything held, alone (shutdown, reload)."""
        out: list[tuple[np.ndarray, np.ndarray | None]] = [(row, None) for _, row in self._held.values()]
        self.stats.unpaired += len(out)
        self._held.clear()
        return biflow_rows(out)

    def _expire(self, now_ns: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        gone = []
        for k, (deadline, _) in self._held.items():  # insertion order is deadline order (one hold time)
            if deadline > now_ns:
                break
            gone.append(k)
        out: list[tuple[np.ndarray, np.ndarray | None]] = [(self._held.pop(k)[1], None) for k in gone]
        self.stats.unpaired += len(out)
        return out
