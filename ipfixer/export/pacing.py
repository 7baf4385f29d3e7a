"""Per-collector export pacing: token buckets deciding how many queued messages may go now (sans-I/O).

A drain of 1M flows is ~53,000 datagrams sent back to back; a collector with a small socket buffer
(nfcapd's default 208 KiB) drops most of such a burst.  A Pacer spreads the messages at a configured rate
in messages and/or bytes per second, with a burst allowance, and keeps what is over the rate in a bounded
queue.  Pure over `now` (nanoseconds, injected) so it is tested with a fake clock; the UDP transport
(export/transport.py) does the sending.

When the queue is full the NEWEST message is refused (tail drop), not the oldest: the queue then stays
an in-order prefix of what the session built, so a message carrying Templates is never dropped from the
head while the Data Records that need it wait behind it, sequence numbers at the collector see one gap
rather than many, and the refusal is known (and counted) when the message is offered, as the kernel's
own full socket buffer and the tcp/tls transport's full queue behave.

Hand-written: a token bucket is a dozen lines and none of the rate-limit libraries take an injected clock
and a byte plus message budget at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")
NS = 1_000_000_000


class TokenBucket:
    """Tokens accrue at `rate_per_s` up to `capacity` (the burst); a full bucket at the start."""

    def __init__(self, rate_per_s: float, capacity: float, now_ns: int) -> None:
        if not rate_per_s > 0 or not capacity > 0:
            raise ValueError(f"token bucket: rate and capacity must be > 0 (got {rate_per_s}, {capacity})")
        self.rate_per_s = float(rate_per_s)
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self._last_ns = now_ns

    def _refill(self, now_ns: int) -> None:
        if now_ns > self._last_ns:  # a clock that steps back adds nothing (and takes nothing)
            self.tokens = min(self.capacity, self.tokens + (now_ns - self._last_ns) * self.rate_per_s / NS)
            self._last_ns = now_ns

    def _cost(self, n: float) -> float:
        return min(float(n), self.capacity)  # a message bigger than the bucket waits for a full one, not forever

    def can_take(self, n: float, now_ns: int) -> bool:
        """True when `n` tokens are there now."""
        self._refill(now_ns)
        return self.tokens >= self._cost(n)

    def take(self, n: float, now_ns: int) -> None:
        """Spend `n` tokens (the caller checked can_take)."""
        self._refill(now_ns)
        self.tokens -= self._cost(n)

    def wait_ns(self, n: float, now_ns: int) -> int:
        """Nanoseconds until `n` tokens are there (0: now)."""
        self._refill(now_ns)
        missing = self._cost(n) - self.tokens
        return 0 if missing <= 0 else math.ceil(missing * NS / self.rate_per_s)


@dataclass(frozen=True)
class PacingParams:
    """A collector's pacing: rates (None: that budget unlimited), burst in messages, the queue bound."""

    messages_per_s: float | None = None
    bytes_per_s: float | None = None
    burst: int = 64  # messages sent back to back at most; the byte bucket holds burst * max_message_size
    queue_messages: int = 65536
    max_message_size: int = 1452

    def __post_init__(self) -> None:
        if self.messages_per_s is None and self.bytes_per_s is None:
            raise ValueError("pacing: set messages_per_s or bytes_per_s (or both)")
        if self.burst < 1 or self.queue_messages < 0:
            raise ValueError(f"pacing: burst >= 1 and queue_messages >= 0 (got {self.burst}, {self.queue_messages})")


class Offer(Enum):
    """What became of an offered message."""

    SEND = "send"  # within the rate: send it now
    QUEUED = "queued"  # over the rate: queued, ready() hands it out later
    DROPPED = "dropped"  # over the rate and the queue full: refused (tail drop)


class Pacer(Generic[T]):
    """Token buckets (messages, bytes) in front of a bounded FIFO; counts what it delayed and dropped."""

    def __init__(self, params: PacingParams, now_ns: int) -> None:
        self.params = params
        self._buckets: list[tuple[TokenBucket, bool]] = []  # (bucket, counts bytes)
        if params.messages_per_s is not None:
            self._buckets.append((TokenBucket(params.messages_per_s, params.burst, now_ns), False))
        if params.bytes_per_s is not None:
            self._buckets.append((TokenBucket(params.bytes_per_s, params.burst * params.max_message_size, now_ns),
                                  True))
        self._queue: deque[tuple[T, int]] = deque()
        self.delayed = 0  # messages that waited in the queue
        self.dropped = 0  # messages refused because the queue was full

    def __len__(self) -> int:
        return len(self._queue)

    def _fits(self, size: int, now_ns: int) -> bool:
        return all(b.can_take(size if by_bytes else 1, now_ns) for b, by_bytes in self._buckets)

    def _take(self, size: int, now_ns: int) -> None:
        for b, by_bytes in self._buckets:
            b.take(size if by_bytes else 1, now_ns)

    def offer(self, item: T, size: int, now_ns: int) -> Offer:
        """A new message of `size` bytes: send now if the buckets allow and nothing waits before it."""
        if not self._queue and self._fits(size, now_ns):
            self._take(size, now_ns)
            return Offer.SEND
        if len(self._queue) >= self.params.queue_messages:
            self.dropped += 1
            return Offer.DROPPED
        self._queue.append((item, size))
        self.delayed += 1
        return Offer.QUEUED

    def ready(self, now_ns: int) -> list[T]:
        """The queued messages that may go now, oldest first (their tokens are spent)."""
        out: list[T] = []
        while self._queue and self._fits(self._queue[0][1], now_ns):
            item, size = self._queue.popleft()
            self._take(size, now_ns)
            out.append(item)
        return out

    def requeue_front(self, items: list[T], sizes: list[int]) -> None:
        """Put back, at the head and in order, messages the socket could not take (tokens stay spent)."""
        for item, size in zip(reversed(items), reversed(sizes), strict=True):
            self._queue.appendleft((item, size))

    def next_due_ns(self, now_ns: int) -> int | None:
        """Nanoseconds until the head of the queue may go (None: queue empty)."""
        if not self._queue:
            return None
        size = self._queue[0][1]
        return max(b.wait_ns(size if by_bytes else 1, now_ns) for b, by_bytes in self._buckets)

    def take_all(self) -> list[T]:
        """Empty the queue (what is left at close: the caller counts it as dropped)."""
        out = [item for item, _ in self._queue]
        self._queue.clear()
        return out
