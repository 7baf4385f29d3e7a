"""The one flow-expiry rule, on arrays: shared by the kernel drain and the Accounter. No clock, no I/O.

RFC 5102 flowEndReason (IANA IE 136): end of flow detected (TCP FIN/RST) before idle timeout before
active timeout. Timestamps are monotonic ns (bpf_ktime_get_ns); `now` is given by the caller.
"""

from __future__ import annotations

import numpy as np

from ipfixer.flows.rows import wall_ms
from ipfixer.model import EndReason

TCP_FIN = 0x01
TCP_RST = 0x04
IPPROTO_TCP = 6

__all__ = ["ended", "ends_flow", "expiry_reasons", "flow_deadlines", "wall_ms"]


def ends_flow(tcp_flags: int, protocol: int) -> bool:
    """ended() for one packet."""
    return protocol == IPPROTO_TCP and bool(tcp_flags & (TCP_FIN | TCP_RST))


def ended(tcp_flags: np.ndarray, protocol: np.ndarray) -> np.ndarray:
    """Flows a TCP FIN or RST ended (end of flow detected, flowEndReason 3)."""
    out: np.ndarray = (protocol == IPPROTO_TCP) & ((tcp_flags.astype(np.uint64) & (TCP_FIN | TCP_RST)) != 0)
    return out


def expiry_reasons(
    first_ns: np.ndarray,
    last_ns: np.ndarray,
    tcp_flags: np.ndarray,
    protocol: np.ndarray,
    now_ns: int,
    idle_timeout_ns: int,
    active_timeout_ns: int,
) -> np.ndarray:
    """flowEndReason per flow (0 = keep): end of flow (TCP FIN/RST) before idle before active timeout.

    A timestamp in the future (taken after `now`) never expires."""
    first = first_ns.astype(np.int64)
    last = last_ns.astype(np.int64)
    reasons = np.zeros(len(first), dtype=np.uint8)
    active = (now_ns - first) >= active_timeout_ns
    reasons[active] = EndReason.ACTIVE_TIMEOUT
    idle = (now_ns - last) >= idle_timeout_ns
    reasons[idle] = EndReason.IDLE_TIMEOUT
    reasons[ended(tcp_flags, protocol)] = EndReason.END_OF_FLOW
    return reasons


def flow_deadlines(first_ns: np.ndarray, last_ns: np.ndarray, tcp_flags: np.ndarray, protocol: np.ndarray,
                   idle_timeout_ns: int, active_timeout_ns: int) -> np.ndarray:
    """The monotonic time at which expiry_reasons first gives each flow a reason (0: already ended), so
    a cache can skip its scan until the earliest one."""
    first = first_ns.astype(np.int64)
    last = last_ns.astype(np.int64)
    d: np.ndarray = np.minimum(first + np.int64(active_timeout_ns), last + np.int64(idle_timeout_ns))
    d[ended(tcp_flags, protocol)] = 0
    return d
