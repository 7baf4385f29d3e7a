"""Keeping the conntrack table in step with the kernel, off the export loop.

One thread ("ipfixer-conntrack") reads events as they come (NEW, UPDATE, DESTROY into the table's
delta; NEW/DESTROY queued for the daemon) and, every `resync_interval_s` or at once after an event
overrun (ENOBUFS: the kernel dropped events, so only a dump can say what they were), has the whole
table dumped while it goes on reading events, then swaps the new snapshot in with one reference
assignment. The dump, its decoding and the index build run in a worker process (one, spawned once):
in a thread they would hold the GIL for most of a second per 100,000 entries and slow the daemon's
drains about twofold while they run (benchmarks/conntrack.py measures both). The daemon's drain
never waits for any of it: it joins flows against whichever snapshot is current. A dump that times out has its socket closed and replaced
(the kernel would answer the next request on it with EBUSY, and its tail must not be read as the
next dump's: ctnetlink.dump_conntrack also checks the sequence number of every part and of the
end-of-dump message).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.connection
import select
import signal
import socket
import struct
import threading
import time

import numpy as np

from ipfixer.enrich.conntrack import (
    HAS_GONE,
    IPS_DST_NAT,
    IPS_SRC_NAT,
    ConnKey,
    ConntrackTable,
    CtIndex,
    origin_hashes,
    role_key_array,
)
from ipfixer.enrich.ctnetlink import (
    CT_DTYPE,
    KIND_DESTROY,
    KIND_NEW,
    NLMSG_DONE,
    DumpTimeout,
    NetlinkError,
    ParseStats,
    dump_conntrack,
    dump_request,
    new_seq,
    open_ctnetlink,
    parse_dump,
    read_pending,
)
from ipfixer.enrich.events import ConntrackEvents, FlowEvent
from ipfixer.model import FIVE_TUPLE_STRUCT

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
        use_process: bool = True,
        dumps: bool = True,
    ) -> None:
        """`dumps=False`: events only (NAT events without conntrack enrichment): the table is never dumped."""
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
        self._next_dump = 0.0 if dumps else float("inf")  # monotonic seconds
        self.dumps = dumps
        self._dump_sock: socket.socket | None = None
        self.use_process = use_process
        self._worker: DumpWorker | None = None
        self.recovered_events = 0  # NAT create/delete events rebuilt from a dump after an overrun
        self._overruns_at_start = 0  # event overruns when the running dump started
        self._overruns_at_prev_start = 0  # ... and when the last completed one had
        self._last_overrun = -1e9  # monotonic seconds
        self._seen: dict[int, set[int]] = {KIND_NEW: set(), KIND_DESTROY: set()}  # since the last dump

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
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    @property
    def stale(self) -> bool:
        """Events were lost lately and the dump that repairs it may not be in yet: the table can miss
        connections, so drains ask the kernel about the flows it does not know."""
        if self.dumps and self.resyncs == 0:
            return True  # the first dump is not in yet (a large table takes seconds)
        return time.monotonic() - self._last_overrun < max(5.0, 3 * self.last_dump_s)

    def request_resync(self) -> None:
        """Dump as soon as the thread gets to it."""
        if self.dumps:
            self._next_dump = 0.0
        self._wake.set()

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                overran = self.dumps and self.events is not None and self.events.overrun_pending
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
            overruns = self.events.overruns
            self.events.poll(timeout_s)
            if self.events.overruns != overruns:
                self._last_overrun = time.monotonic()
        except OSError as exc:
            log.warning("conntrack events stopped: %s", exc)
            self.events.close()
            self.events = None
            return np.zeros(0, dtype=CT_DTYPE)
        rows = self.events.take_rows()
        if len(rows):
            self.table.ingest_rows(rows)
            for kind, seen in self._seen.items():
                sel = rows["kind"] == kind
                if sel.any():
                    seen.update(origin_hashes(rows[sel]).tolist())
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
        self._next_dump = time.monotonic() + self.resync_interval_s
        if self.events is not None:
            self.events.overrun_pending = False  # an overrun from now on calls for another dump
            self._overruns_at_start = self.events.overruns
        if self.use_process:
            try:
                if self._worker is None:
                    self._worker = DumpWorker(self.table.netns)
                self._resync_in_worker(self._worker)
                return
            except (OSError, EOFError) as exc:  # the worker died or could not start: dump here
                log.warning("conntrack dump worker unavailable (%s); dumping in the sync thread", exc)
                if self._worker is not None:
                    self._worker.close()
                self._worker = None
                self.use_process = False
        self._resync_here()

    def _resync_in_worker(self, worker: DumpWorker) -> None:
        started = time.monotonic()
        worker.request(self.dump_timeout_s)
        during: list[np.ndarray] = []
        deadline = started + self.dump_timeout_s + 10.0
        while True:
            if self._stop.is_set():
                return
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "conntrack dump worker did not answer")
            fds = [worker.fileno()]
            if self.events is not None and self.events.fileno() >= 0:
                fds.append(self.events.fileno())
            ready, _, _ = select.select(fds, [], [], 0.2)
            if self.events is not None and len(fds) > 1 and fds[1] in ready:
                rows = self._read_events(0.0)
                if len(rows):
                    during.append(rows)
            if worker.fileno() in ready:
                reply = worker.reply()
                break
        if reply[0] != "ok":
            _, code, text = reply
            self._failed(_WorkerError(int(str(code)), str(text)))
            return
        _, raw_rows, raw_hashes, raw_refs, malformed = reply
        assert isinstance(raw_rows, bytes) and isinstance(raw_hashes, bytes) and isinstance(raw_refs, bytes)
        rows = np.frombuffer(raw_rows, dtype=CT_DTYPE)
        index = CtIndex.from_arrays(rows, np.frombuffer(raw_hashes, np.uint64), np.frombuffer(raw_refs, np.int64))
        self.table.parse_stats.malformed += int(str(malformed))
        self._installed(rows, index, during, started)

    def _installed(self, dump: np.ndarray, index: CtIndex | None, during: list[np.ndarray], started: float) -> None:
        delta = np.concatenate(during) if during else None
        # events lost since the previous dump *started* may belong to connections that dump missed
        now_overruns = self.events.overruns if self.events is not None else 0
        lost = now_overruns != self._overruns_at_prev_start
        self._overruns_at_prev_start = self._overruns_at_start
        if lost and self.resyncs > 0 and self.events is not None:
            self._recover(dump, index if index is not None else CtIndex(dump))
        self.table.install(dump, keep_delta=delta, index=index)
        # what the next dump must be compared with: the events seen while this one ran
        for kind, seen in self._seen.items():
            seen.clear()
            if delta is not None:
                sel = delta["kind"] == kind
                seen.update(origin_hashes(delta[sel]).tolist())
        self.last_dump_s = time.monotonic() - started
        c = self.table.counters
        c.dumps += 1
        c.dumped_entries += len(dump)
        self.resyncs += 1
        self.first_dump.set()
        log.debug("conntrack dump: %d entries in %.3fs", len(dump), self.last_dump_s)

    def _recover(self, dump: np.ndarray, new: CtIndex) -> None:
        """After an overrun, the NAT session events it swallowed, rebuilt from the dump: a NAT'd
        connection the table never heard of was created (its NEW lost), one the table held that the
        dump no longer has was destroyed (its DESTROY lost, unless seen). Kernel timestamps, when on,
        still give their times (nat_event_records)."""
        assert self.events is not None
        nat_bits = IPS_SRC_NAT | IPS_DST_NAT
        fresh = dump[(dump["status"] & nat_bits) != 0]
        if len(fresh):
            fresh = fresh[~self.table.knows(fresh, delta=False)]  # an UPDATE may have reached the delta
            fresh = fresh[~np.isin(origin_hashes(fresh), np.fromiter(self._seen[KIND_NEW], np.uint64))]
        held = np.concatenate([self.table.snapshot.rows, self.table.delta_rows()])
        held = held[((held["status"] & nat_bits) != 0) & ((held["has"] & HAS_GONE) == 0)]
        gone = held[new.lookup(role_key_array_origin(held))[0] < 0] if len(held) else held
        if len(gone):
            gone = gone[~np.isin(origin_hashes(gone), np.fromiter(self._seen[KIND_DESTROY], np.uint64))]
            _, first = np.unique(origin_hashes(gone), return_index=True)
            gone = gone[np.sort(first)]
        now = time.monotonic_ns()
        for rows, kind in ((fresh, "new"), (gone, "destroy")):
            for i in range(len(rows)):
                row = rows[i].copy()
                row["kind"] = KIND_NEW if kind == "new" else KIND_DESTROY
                if kind == "destroy":
                    row["has"] &= ~np.uint8(4)  # its stop time is unknown: the read time stands in
                ev = FlowEvent(ConnKey(*FIVE_TUPLE_STRUCT.unpack(role_key_array_origin(rows[i : i + 1]).tobytes()[:37])),
                               kind, now, None, row)  # type: ignore[arg-type]  # fmt: skip
                self.events.inject(ev)
        self.recovered_events += len(fresh) + len(gone)
        if len(fresh) or len(gone):
            log.warning("conntrack: rebuilt %d NAT session creates and %d deletes lost to the overrun from the "
                        "dump", len(fresh), len(gone))  # fmt: skip

    def _resync_here(self) -> None:
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
        self._installed(dump, None, during, started)

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


def role_key_array_origin(rows: np.ndarray) -> np.ndarray:
    """(n, 5) origin key words."""
    out: np.ndarray = role_key_array(rows, roles=(0,))[0]
    return out


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


class _WorkerError(OSError):
    """A dump failure the worker process reported (errno and text)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code


class DumpWorker:
    """A spawned process that dumps the netns' conntrack table on request and sends back the rows and
    their sorted hash index (CtIndex arrays) as bytes."""

    def __init__(self, netns: str | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_worker_main, args=(child, netns), name="ipfixer-ctdump", daemon=True)
        self._proc.start()
        child.close()

    def fileno(self) -> int:
        """The pipe's fd, readable when a reply is there."""
        return self._conn.fileno()

    def request(self, timeout_s: float) -> None:
        """Ask for one dump."""
        if not self._proc.is_alive():
            raise OSError(errno.ESRCH, "conntrack dump worker exited")
        self._conn.send(("dump", timeout_s))

    def reply(self) -> tuple[object, ...]:
        """("ok", rows, hashes, refs, malformed) or ("error", errno, text)."""
        answer = self._conn.recv()
        assert isinstance(answer, tuple)
        return answer

    def close(self) -> None:
        """Stop the process (asked, then terminated)."""
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._proc.join(2.0)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(2.0)
        self._conn.close()


def _worker_main(conn: multiprocessing.connection.Connection, netns: str | None) -> None:
    """The worker process: one dump per request, on a socket replaced after any failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when to stop
    try:  # PR_SET_PDEATHSIG: go when the daemon goes, however it goes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    sock: socket.socket | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        _, timeout_s = msg
        try:
            if sock is None:
                sock = open_ctnetlink(netns, rcvbuf=4 << 20)
            stats = ParseStats()
            rows = dump_conntrack(sock, timeout_s, stats)
            index = CtIndex(rows)
            conn.send(("ok", rows.tobytes(), index.hashes.tobytes(), index.refs.tobytes(), stats.malformed))
        except (OSError, TimeoutError) as exc:
            if sock is not None and (isinstance(exc, DumpTimeout) or getattr(exc, "errno", None) == errno.EBUSY):
                sock.close()  # mid-dump: never reused
                sock = None
            code = getattr(exc, "code", None) or getattr(exc, "errno", None) or errno.EIO
            conn.send(("error", int(code), str(exc)))
