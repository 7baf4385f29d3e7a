"""Pacing against a real slow collector: a loopback UDP receiver with a 64 KiB SO_RCVBUF reading at most
~1,000 datagrams/s.  The same records through the real Exporter and ExportSession: sent in one burst, some
never reach it (the kernel drops what overflows its buffer while ipfixer's counters say all were sent);
paced, every record arrives, counted by decoding what the receiver got."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from ipfixer.export import Exporter, ExportSession, UdpTransport
from ipfixer.export.pacing import PacingParams
from ipfixer.metrics import Metrics
from ipfixer.model import ETH_P_IP, FlowRecord, records_to_batch, to_addr16
from ipfixer.templates import load_templates
from ipfixer.wire.decode import Decoder

TS = load_templates()
DATA = {ETH_P_IP: TS["ipv4_flow"]}
N = 10_000  # flow records per run
WALL = 1_800_000_000_000_000_000


class SlowCollector:
    """Reads one datagram per millisecond at most (a collector busy writing what it got)."""

    def __init__(self, rcvbuf: int = 64 * 1024, pause_s: float = 0.001) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.pause_s = pause_s
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.sock.recv(65535))
            except TimeoutError:
                continue
            time.sleep(self.pause_s)

    def settle(self, timeout_s: float = 20.0) -> None:
        """Wait until nothing has come for 0.5 s (bounded), then stop reading."""
        deadline, seen, quiet_since = time.monotonic() + timeout_s, -1, time.monotonic()
        while time.monotonic() < deadline:
            if len(self.datagrams) != seen:
                seen, quiet_since = len(self.datagrams), time.monotonic()
            elif time.monotonic() - quiet_since > 0.5:
                break
            time.sleep(0.05)
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def flow_ids(self) -> list[int]:
        """packetDeltaCount of every flow record decoded (each record of the test carries its own)."""
        d, out = Decoder(), []
        for data in self.datagrams:
            out += [r.fields["packetDeltaCount"] for r in d.feed(data).records if not r.is_options]
        return out


@pytest.fixture
def collector() -> Iterator[SlowCollector]:
    c = SlowCollector()
    yield c
    c.close()  # idempotent enough: a second join/close of a stopped thread and closed socket is harmless


def batch() -> object:
    now_ms = WALL // 10**6
    return records_to_batch([
        FlowRecord(ethertype=ETH_P_IP, src_addr=to_addr16("10.0.0.1"), dst_addr=to_addr16("10.0.0.2"),
                   src_port=1024 + i % 60000, dst_port=53, protocol=17, packets=1 + i, octets=100 + i,
                   start_ms=now_ms - 5000, end_ms=now_ms - 100, ifindex=2, ingress_if=2)
        for i in range(N)])  # fmt: skip


def export_all(collector: SlowCollector, pacing: PacingParams | None) -> Exporter:
    session = ExportSession("ipfix", 7, DATA, [], boot_wall_ns=WALL - 10**12, template_refresh_s=3600)
    exporter = Exporter([("slow", session, UdpTransport("127.0.0.1", collector.port, pacing=pacing))],
                        metering_process_id=1)
    exporter.export(batch(), WALL)  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while exporter.backlog and time.monotonic() < deadline:  # the daemon's loop, between two polls
        due = exporter.service()
        time.sleep(min(due if due is not None else 0.0, 0.05))
    assert exporter.backlog == 0
    return exporter


def test_unpaced_burst_loses_records_at_a_slow_collector(collector: SlowCollector) -> None:
    """The test's point: without pacing the kernel accepts every message and the collector drops some."""
    exporter = export_all(collector, None)
    collector.settle()
    st = exporter.stats["slow"]
    assert st.flow_records == N and st.not_sent_records == 0 and st.delayed_messages == 0
    got = collector.flow_ids()
    print(f"unpaced: {len(got)} of {N} records arrived in {len(collector.datagrams)} of {st.messages} messages")
    assert len(got) < N  # lost silently at the receiver (its size depends on scheduling: only > 0 asserted)
    exporter.close()


def test_paced_export_delivers_every_record_to_a_slow_collector(collector: SlowCollector) -> None:
    exporter = export_all(collector, PacingParams(messages_per_s=250, burst=8, queue_messages=65536))
    collector.settle()
    st = exporter.stats["slow"]
    got = collector.flow_ids()
    print(f"paced: {len(got)} of {N} records arrived in {len(collector.datagrams)} of {st.messages} messages, "
          f"{st.delayed_messages} delayed")
    assert sorted(got) == list(range(1, N + 1))  # every record, once
    assert st.flow_records == N and st.messages == len(collector.datagrams)
    assert st.delayed_messages == st.messages - 8  # all but the first burst waited for tokens
    assert st.dropped_messages == st.dropped_records == st.not_sent_records == 0
    exporter.close()


def test_paced_queue_full_drops_are_counted_as_records(collector: SlowCollector) -> None:
    """A queue too small for the burst: what is refused is counted, message and records, and the rest
    arrives: decoded + dropped == all."""
    exporter = export_all(collector, PacingParams(messages_per_s=250, burst=8, queue_messages=16))
    collector.settle()
    st = exporter.stats["slow"]
    got = collector.flow_ids()
    assert st.messages == len(collector.datagrams)
    assert st.delayed_messages == st.messages - 8 >= 16  # the burst, the queue, and what tokens freed meanwhile
    assert st.dropped_messages > 0 and st.errors["EQUEUEFULL"] == st.dropped_messages
    assert len(got) == st.flow_records and len(set(got)) == len(got)
    assert st.dropped_records == st.not_sent_records == N - len(got)
    metrics = Metrics(["slow"])  # the daemon's metrics follow the same counts
    metrics.update_exporter(exporter)
    sample = metrics.registry.get_sample_value
    assert sample("ipfixer_collector_dropped_records_total", {"collector": "slow"}) == st.dropped_records
    assert sample("ipfixer_collector_dropped_messages_total", {"collector": "slow"}) == st.dropped_messages
    assert sample("ipfixer_collector_delayed_messages_total", {"collector": "slow"}) == st.delayed_messages
    assert sample("ipfixer_collector_records_total", {"collector": "slow"}) == len(got)
    exporter.close()


def test_close_counts_what_is_still_queued_as_dropped(collector: SlowCollector) -> None:
    session = ExportSession("ipfix", 7, DATA, [], boot_wall_ns=WALL - 10**12, template_refresh_s=3600)
    exporter = Exporter([("slow", session, UdpTransport("127.0.0.1", collector.port,
                                                        pacing=PacingParams(messages_per_s=1, burst=2)))],
                        metering_process_id=1)
    exporter.export(batch(), WALL)  # type: ignore[arg-type]
    queued = exporter.backlog
    assert queued > 0 and exporter.drain(0.2) == queued  # 1 message/s: nothing more may go in 0.2 s
    exporter.close()
    collector.settle()
    st = exporter.stats["slow"]
    assert st.messages == 2 and st.dropped_messages == queued and st.errors["ECLOSED"] == queued
    assert st.flow_records + st.dropped_records == N == len(collector.flow_ids()) + st.not_sent_records


def test_drain_serves_every_paced_collector_at_once() -> None:
    """Shutdown's bounded drain shares its time: each collector goes on at its own rate, none waits for
    another's queue to empty."""
    receivers = [SlowCollector(pause_s=0.0) for _ in range(2)]
    try:
        exporter = Exporter([(f"c{i}", ExportSession("ipfix", 7, DATA, [], boot_wall_ns=WALL - 10**12),
                              UdpTransport("127.0.0.1", r.port, pacing=PacingParams(messages_per_s=40, burst=1)))
                             for i, r in enumerate(receivers)], metering_process_id=1)
        exporter.export(batch(), WALL)  # type: ignore[arg-type]
        exporter.drain(0.5)  # ~20 messages each at 40/s: neither queue empties
        sent = [exporter.stats[f"c{i}"].messages for i in range(2)]
        assert all(n >= 5 for n in sent), sent
        exporter.close()
        for r in receivers:
            r.settle()
        assert [len(r.datagrams) for r in receivers] == sent
    finally:
        for r in receivers:
            r.close()
