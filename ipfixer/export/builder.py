"""Packing whole encoded records into size-bounded messages (like aioquic's packet_builder).

Protocol-blind: the dialect supplies header and set lengths, padding and set framing.  A message never
exceeds its size limit (RFC 7011 10.3.3: a message fits the path MTU) and never splits a Data Record
(RFC 7011 3.3.1 / RFC 3954 5.3).  Pure over bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


def padded(n: int, pad_to: int) -> int:
    """`n` rounded up to a multiple of `pad_to` (1: unchanged)."""
    return n + (-n) % pad_to if pad_to > 1 else n


class RecordQueue:
    """Encoded Data Records of one template waiting to be packed: a fixed-length blob or a list."""

    def __init__(self, set_id: int, blob: bytes = b"", length: int = 0, items: Sequence[bytes] = ()) -> None:
        self.set_id = set_id
        self._blob, self._len, self._items = blob, length, list(items)
        self._pos = 0  # next record index

    def remaining(self) -> int:
        """Records not taken yet."""
        if self._len:
            return len(self._blob) // self._len - self._pos
        return len(self._items) - self._pos

    def take(self, budget: int, pad_to: int) -> tuple[bytes, int]:
        """As many whole records as fit in `budget` bytes once padded to `pad_to`, and their count."""
        if self._len:
            n = min(self.remaining(), max(0, budget) // self._len)
            while n > 0 and padded(n * self._len, pad_to) > budget:
                n -= 1
            start = self._pos * self._len
            self._pos += n
            return self._blob[start : start + n * self._len], n
        size = 0
        n = 0
        while self._pos + n < len(self._items):
            nxt = size + len(self._items[self._pos + n])
            if padded(nxt, pad_to) > budget:
                break
            size, n = nxt, n + 1
        out = b"".join(self._items[self._pos : self._pos + n])
        self._pos += n
        return out, n

    def skip_one(self) -> None:
        """Give up on the next record (a variable-length record larger than any message)."""
        self._pos += 1


@dataclass(slots=True)  # not frozen: one per message, and a frozen __init__ costs more
class Filled:
    """The sets of one message (no header yet) and how many Data Records they carry."""

    sets: list[bytes]
    n_records: int
    skipped: int  # records too large for any message, dropped (counted by the caller)


class MessageBuilder:
    """Fills one message at a time from a list of RecordQueues, in order."""

    def __init__(self, max_message_size: int, header_len: int, set_header_len: int, pad_to: int,
                 data_set: Callable[[int, bytes], bytes]) -> None:
        self.max_message_size = max_message_size
        self.header_len = header_len
        self.set_header_len = set_header_len
        self.pad_to = pad_to
        self._data_set = data_set

    def fill(self, queues: Sequence[RecordQueue], lead: Sequence[bytes], *, lead_is_optional: bool = True) -> Filled:
        """`lead` sets (templates) first, then as many whole records of the queues as fit.

        A record that does not fit an otherwise empty message is dropped (counted in `skipped`).  With
        `lead_is_optional` a message holding only the lead counts as empty when the lead could be left
        out of the next one (flow messages); options messages always carry their lead."""
        sets = list(lead)
        size = self.header_len + sum(len(s) for s in sets)
        n_records = skipped = 0
        for q in queues:
            while q.remaining():
                budget = self.max_message_size - size - self.set_header_len
                body, n = q.take(budget, self.pad_to)
                if n:
                    s = self._data_set(q.set_id, body)
                    sets.append(s)
                    size += len(s)
                    n_records += n
                    continue
                if not sets or (n_records == 0 and not lead_is_optional):  # larger than any message: drop it
                    q.skip_one()
                    skipped += 1
                    continue
                return Filled(sets, n_records, skipped)  # message full
        return Filled(sets, n_records, skipped)
