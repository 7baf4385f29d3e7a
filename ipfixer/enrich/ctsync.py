"""Keeping the conntrack table in step with the kernel, off the export loop.

One thread ("ipfixer-conntrack") owns both ctnetlink sockets: it reads events as they come (NEW,
UPDATE, DESTROY into the table's delta; NEW/DESTROY queued for the daemon) and, every
`resync_interval_s` or at once after an event overrun (ENOBUFS: the kernel dropped events, so only a
dump can say what they were), dumps the whole table while still reading events, then swaps the new
snapshot in with one reference assignment. The daemon's drain never waits for any of it: it joins
flows against whichever snapshot is current. A dump that times out has its socket closed and replaced
(the kernel would answer the next request on it with EBUSY, and its tail must not be read as the
next dump's: ctnetlink.dump_conntrack also checks the sequence number of every part and of the
end-of-dump message).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import threading
import time

import numpy as np

from ipfixer.enrich.conntrack import ConntrackTable
from ipfixer.enrich.ctnetlink import (
    CT_DTYPE,
    NLMSG_DONE,
    NetlinkError,
    dump_request,
    new_seq,
    open_ctnetlink,
    parse_dump,
    read_pending,
)
from ipfixer.enrich.events import ConntrackEvents

log = logging.getLogger("ipfixer.enrich")

_REFUSED = (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.ENOENT)


class ConntrackSync:
    """The sync thread of one ConntrackTable (and its ConntrackEvents, when events are wanted)."""

    def __init__(
        self,
        table: ConntrackTable,
        events: ConntrackEvents | None,
        resync_interval_s: float = 60.0,
        dump_timeout_s: float = 60.0,
    ) -> None:
        self.table = table
        self.events = events if events is not None and events.available else None
        self.resync_interval_s = resync_interval_s
        self.dump_timeout_s = dump_timeout_s
        self.resyncs = 0  # completed dumps
        self.overrun_resyncs = 0  # dumps started because events overran
        self.last_dump_s = 0.0  # duration of the last completed dump
        self.first_dump = threading.Event()  # set once the first dump finished (or failed)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_dump = 0.0  # monotonic seconds
        self._dump_sock: socket.socket | None = None

    def start(self) -> None:
        """Start the thread (the first dump begins at once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="ipfixer-conntrack", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and close the dump socket (the table and events are closed by their owner)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._dump_sock is not None:
            self._dump_sock.close()
            self._dump_sock = None

    def request_resync(self) -> None:
        """Dump as soon as the thread gets to it."""
        self._next_dump = 0.0
        self._wake.set()

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                overran = self.events is not None and self.events.overrun_pending
                if overran or time.monotonic() >= self._next_dump:
                    if overran:
                        self.overrun_resyncs += 1
                        assert self.events is not None
                        log.warning("conntrack events overran the socket (%d overruns so far): events were "
                                    "lost, resynchronising with a dump", self.events.overruns)  # fmt: skip
                    self._resync()
                    continue
                wait = max(0.0, min(0.2, self._next_dump - time.monotonic()))
                if self.events is not None:
                    self._read_events(wait)
                else:
                    self._wake.wait(wait)
                    self._wake.clear()
        except Exception:  # noqa: BLE001 - logged; the daemon goes on without fresh conntrack data
            log.exception("conntrack sync thread stopped")
            self.first_dump.set()

    def _read_events(self, timeout_s: float) -> np.ndarray:
        assert self.events is not None
        try:
            self.events.poll(timeout_s)
        except OSError as exc:
            log.warning("conntrack events stopped: %s", exc)
            self.events.close()
            self.events = None
            return np.zeros(0, dtype=CT_DTYPE)
        rows = self.events.take_rows()
        if len(rows):
            self.table.ingest_rows(rows)
        return rows

    def _socket(self) -> socket.socket:
        if self._dump_sock is None:
            self._dump_sock = open_ctnetlink(self.table.netns, rcvbuf=4 << 20)
        return self._dump_sock

    def _drop_socket(self) -> None:
        if self._dump_sock is not None:
            self._dump_sock.close()
            self._dump_sock = None

    def _resync(self) -> None:
        """One dump, reading events meanwhile; the new snapshot replaces the old only when complete."""
        c = self.table.counters
        self._next_dump = time.monotonic() + self.resync_interval_s
        if self.events is not None:
            self.events.overrun_pending = False  # an overrun from now on calls for another dump
        started = time.monotonic()
        try:
            sock = self._socket()
            seq = new_seq()
            sock.send(dump_request(seq))
        except OSError as exc:
            self._failed(exc)
            return
        parts: list[np.ndarray] = []
        during: list[np.ndarray] = []
        pending: list[bytes] = []
        deadline = started + self.dump_timeout_s
        fds: list[socket.socket | int] = [sock]
        if self.events is not None and self.events.fileno() >= 0:
            fds.append(self.events.fileno())
        try:
            while True:
                if self._stop.is_set():
                    self._drop_socket()
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"conntrack dump did not finish within {self.dump_timeout_s:g}s")
                ready, _, _ = select.select(fds, [], [], min(remaining, 0.2))
                if self.events is not None and len(fds) > 1 and fds[1] in ready:
                    rows = self._read_events(0.0)
                    if len(rows):
                        during.append(rows)
                if sock not in ready:
                    continue
                pending.extend(read_pending(sock, 64))
                if len(pending) < 64 and not _maybe_last(pending):
                    continue
                rows, summary = parse_dump(pending, seq, self.table.parse_stats)
                pending = []
                parts.append(rows)
                if summary.error:
                    raise NetlinkError(summary.error, seq)
                if summary.done:
                    break
        except (OSError, TimeoutError) as exc:
            self._drop_socket()  # mid-dump: never reuse it
            self._failed(exc)
            return
        dump = np.concatenate(parts) if parts else np.zeros(0, dtype=CT_DTYPE)
        delta = np.concatenate(during) if during else None
        self.table.install(dump, keep_delta=delta)
        self.last_dump_s = time.monotonic() - started
        c.dumps += 1
        c.dumped_entries += len(dump)
        self.resyncs += 1
        self.first_dump.set()
        log.debug("conntrack dump: %d entries in %.3fs", len(dump), self.last_dump_s)

    def _failed(self, exc: BaseException) -> None:
        c = self.table.counters
        c.dump_errors += 1
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        if code in _REFUSED:
            log.warning("conntrack enrichment disabled: dump refused: %s", exc)
            self.table.available = False
            self._stop.set()
        else:
            # EBUSY (another dump still running on that socket), ENOBUFS, a timeout: retry soon on a
            # fresh socket; the old snapshot keeps serving meanwhile
            log.warning("conntrack dump failed (%s); retrying in 1s with a new socket", exc)
            self._drop_socket()
            self._next_dump = time.monotonic() + 1.0
        self.first_dump.set()


def _maybe_last(datagrams: list[bytes]) -> bool:
    """Whether the last datagram read may end the dump (so parse now rather than waiting for 64): it
    ends with a 20-byte NLMSG_DONE, or it is short (an NLMSG_ERROR, a last part). A false positive
    only parses early; parse_dump decides."""
    if not datagrams:
        return False
    last = datagrams[-1]
    if len(last) < 4096:
        return True
    length, mtype = struct.unpack_from("=IH", last, len(last) - 20)
    return bool(length == 20 and mtype == NLMSG_DONE)
