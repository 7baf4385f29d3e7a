"""Injected clocks: the core never reads time itself (as the Go Accounter takes its clocks)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

NS_PER_SECOND = 1_000_000_000


def seconds_to_ns(seconds: float) -> int:
    """A duration in seconds (config values) -> integer nanoseconds, the clocks' unit.  Rounded, not
    truncated: int(2.01 * 1e9) is 2009999999."""
    return round(seconds * NS_PER_SECOND)


class Clock(Protocol):
    """Wall-clock and monotonic time in nanoseconds."""

    def wall_ns(self) -> int: ...

    def mono_ns(self) -> int: ...


class SystemClock:
    """The real clocks; CLOCK_MONOTONIC is what bpf_ktime_get_ns() reads in the kernel."""

    def wall_ns(self) -> int:
        return time.time_ns()

    def mono_ns(self) -> int:
        return time.monotonic_ns()


@dataclass
class FakeClock:
    """A clock tests advance by hand instead of sleeping."""

    wall: int = 1_700_000_000_000_000_000
    mono: int = 1_000_000_000

    def wall_ns(self) -> int:
        return self.wall

    def mono_ns(self) -> int:
        return self.mono

    def advance(self, ns: int) -> None:
        self.wall += ns
        self.mono += ns


def mono_to_wall_ms(mono_ns: int, now_wall_ns: int, now_mono_ns: int) -> int:
    """Convert a monotonic timestamp to wall-clock ms, as the Go agent's NewRecord does:
    wall(t) = now_wall - (now_mono - t)."""
    return (now_wall_ns - (now_mono_ns - mono_ns)) // 1_000_000
