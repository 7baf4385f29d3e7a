"""Pure flow-expiry rules on arrays, shared by the kernel drain and tests: no clock, no I/O."""

from __future__ import annotations

import numpy as np

from ipfixer.model import EndReason

TCP_FIN = 0x01
TCP_RST = 0x04
IPPROTO_TCP = 6


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

    Timestamps are monotonic ns; a timestamp in the future (taken after `now`) never expires."""
    first = first_ns.astype(np.int64)
    last = last_ns.astype(np.int64)
    reasons = np.zeros(len(first), dtype=np.uint8)
    active = (now_ns - first) >= active_timeout_ns
    reasons[active] = EndReason.ACTIVE_TIMEOUT
    idle = (now_ns - last) >= idle_timeout_ns
    reasons[idle] = EndReason.IDLE_TIMEOUT
    fin = (protocol == IPPROTO_TCP) & ((tcp_flags.astype(np.uint64) & (TCP_FIN | TCP_RST)) != 0)
    reasons[fin] = EndReason.END_OF_FLOW
    return reasons


def wall_ms(mono_ns: np.ndarray, now_wall_ns: int, now_mono_ns: int) -> np.ndarray:
    """Vectorised clock.mono_to_wall_ms: wall(t) = now_wall - (now_mono - t), in ms."""
    return ((now_wall_ns - (now_mono_ns - mono_ns.astype(np.int64))) // 1_000_000).astype(np.uint64)
