"""UDP transport to one Collector (RFC 7011 10.3 / RFC 3954): the only socket in the exporting process.

The socket is connect()ed so the kernel reports an ICMP port-unreachable from the collector as
ECONNREFUSED on a later send (Linux udp(7)); a send error is counted by errno name and the next message
is simply tried again, so a collector that is down never stops the exporter or the other collectors.

With `pacing` (export/pacing.py) messages go through submit(): what is over the collector's rate waits in a
bounded queue that poll() sends as tokens accrue; every message's fate (sent, refused, dropped) is reported
to `on_result`, so the Exporter counts records only once they actually left.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from ipfixer.errors import TransportError
from ipfixer.export.pacing import Offer, Pacer, PacingParams

log = logging.getLogger("ipfixer.export")

# Errors a UDP send can hit while the exporter must keep going; anything else is counted as well.
EXPECTED_SEND_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAGAIN, errno.EMSGSIZE, errno.ENOBUFS}
)


# The local socket buffer is full: a paced message is kept (at the head) and tried again, not lost.
RETRY_SEND_ERRORS = frozenset({"EAGAIN", "ENOBUFS"})
QUEUE_FULL = "EQUEUEFULL"  # paced: refused because the pacing queue was full
CLOSED_UNSENT = "ECLOSED"  # paced: still queued when the transport closed


@dataclass(frozen=True)
class SendResult:
    """The fate of one submitted message: error None when it left; `delayed` when it waited for tokens."""

    size: int
    records: int
    flow_records: int
    error: str | None = None
    delayed: bool = False


@dataclass(frozen=True)
class _Queued:
    data: bytes
    records: int
    flow_records: int


class UdpTransport:
    """A non-blocking, connected UDP socket to host:port; send() never raises."""

    def __init__(self, host: str, port: int, *, pacing: PacingParams | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        """Resolve the collector now so a wrong name fails at start-up, naming the collector.  `pacing`:
        rate-limit submit()ted messages (None: every message is sent at once, as the kernel takes it)."""
        self.host = host
        self.port = port
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 literal: RFC 3986 3.2.2
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
        except (socket.gaierror, UnicodeError, OverflowError) as e:
            raise TransportError(f"collector {self.name}: cannot resolve {host!r}: {e}") from None
        if not infos:
            raise TransportError(f"collector {self.name}: {host!r} resolves to no address")
        family, type_, proto, _, sockaddr = infos[0]
        self.address: tuple[str, int] = (str(sockaddr[0]), int(sockaddr[1]))
        try:
            self._sock: socket.socket | None = socket.socket(family, type_, proto)
            self._sock.setblocking(False)
            self._sock.connect(sockaddr)
        except OSError as e:
            raise TransportError(f"collector {self.name}: cannot open UDP socket to {sockaddr}: {e}") from None
        self.sent = 0
        self.bytes_sent = 0
        self.errors: Counter[str] = Counter()  # errno name -> count, e.g. {"ECONNREFUSED": 2}
        self.last_error: str | None = None  # errno name of the latest failed send
        self._clock_ns = clock_ns
        self.pacer: Pacer[_Queued] | None = Pacer(pacing, clock_ns()) if pacing is not None else None
        self.on_result: Callable[[SendResult], None] = lambda result: None  # the Exporter's accounting

    @property
    def backlog(self) -> int:
        """Paced messages waiting for tokens (0 without pacing)."""
        return len(self.pacer) if self.pacer is not None else 0

    def next_due_s(self) -> float | None:
        """Seconds until the next queued message may go (None: nothing queued)."""
        if self.pacer is None:
            return None
        ns = self.pacer.next_due_ns(self._clock_ns())
        return None if ns is None else ns / 1e9

    @property
    def error_count(self) -> int:
        """Total failed sends."""
        return sum(self.errors.values())

    def send(self, datagram: bytes) -> bool:
        """Send one message; False (and counted by errno name) when the kernel refused it."""
        if self._sock is None:
            self.last_error = "ECLOSED"
            self.errors["ECLOSED"] += 1
            return False
        try:
            n = self._sock.send(datagram)
        except OSError as e:
            code = e.errno if e.errno is not None else 0
            self.last_error = errno.errorcode.get(code, f"errno{code}")
            self.errors[self.last_error] += 1
            return False
        self.sent += 1
        self.bytes_sent += n
        return True

    def submit(self, datagram: bytes, records: int, flow_records: int) -> None:
        """Send one message through the pacer (or at once without one); its fate goes to on_result."""
        if self.pacer is None:
            ok = self.send(datagram)
            self.on_result(SendResult(len(datagram), records, flow_records, None if ok else self.last_error))
            return
        self.poll()  # what waited goes first
        item = _Queued(datagram, records, flow_records)
        offer = self.pacer.offer(item, len(datagram), self._clock_ns())
        if offer is Offer.SEND:
            self._send_paced([item], delayed=False)
        elif offer is Offer.DROPPED:
            self.last_error = QUEUE_FULL
            self.errors[QUEUE_FULL] += 1
            self.on_result(SendResult(len(datagram), records, flow_records, QUEUE_FULL))

    def poll(self) -> None:
        """Send the queued messages the tokens allow now (never waits)."""
        if self.pacer is not None and len(self.pacer):
            self._send_paced(self.pacer.ready(self._clock_ns()), delayed=True)

    def _send_paced(self, items: list[_Queued], *, delayed: bool) -> None:
        for i, item in enumerate(items):
            ok = self.send(item.data)
            if not ok and self.last_error in RETRY_SEND_ERRORS and self.pacer is not None:
                rest = items[i:]  # the local buffer is full: keep them, in order, for the next poll
                self.pacer.requeue_front(rest, [len(q.data) for q in rest])
                return
            self.on_result(SendResult(len(item.data), item.records, item.flow_records,
                                      None if ok else self.last_error, delayed))

    def drain(self, timeout_s: float) -> int:
        """Send what is queued at the paced rate for at most `timeout_s` (shutdown, reload); how many are left."""
        deadline = time.monotonic() + timeout_s
        while self.backlog and self._sock is not None:
            self.poll()
            wait = self.next_due_s()
            left = deadline - time.monotonic()
            if not self.backlog or left <= 0:
                break
            time.sleep(min(max(wait or 0.0, 0.0005), left, 0.05))
        return self.backlog

    def close(self) -> None:
        """Close the socket (idempotent); paced messages still queued are reported dropped and logged."""
        if self.pacer is not None and len(self.pacer):
            left = self.pacer.take_all()
            self.errors[CLOSED_UNSENT] += len(left)
            log.warning("collector=%s closing with %d paced messages (%d records, %d of them flow records) unsent: "
                        "dropped", self.name, len(left), sum(q.records for q in left),
                        sum(q.flow_records for q in left))
            for q in left:
                self.on_result(SendResult(len(q.data), q.records, q.flow_records, CLOSED_UNSENT, True))
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UdpTransport({self.host!r}, {self.port})"
