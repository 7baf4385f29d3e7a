"""Timing shared by the benchmarks (run as scripts: `python benchmarks/X.py` puts this folder on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best(fn: Callable[[], object], runs: int = 3) -> float:
    """Best wall time of `runs` calls: the machine may be shared, and the minimum is the least disturbed."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
