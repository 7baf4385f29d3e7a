"""Export pacing (ipfixer/export/pacing.py): token buckets and the bounded queue, with a fake clock; the
paced UDP transport with a fake clock against a real loopback socket; the collector `pacing:` config."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ipfixer.config import load_config
from ipfixer.errors import ConfigError
from ipfixer.export.pacing import NS, Offer, Pacer, PacingParams, TokenBucket
from ipfixer.export.transport import CLOSED_UNSENT, QUEUE_FULL, SendResult, UdpTransport

T0 = 5 * NS


# -- the token bucket ------------------------------------------------------------------------------
def test_bucket_starts_full_and_refills_at_its_rate_up_to_capacity() -> None:
    b = TokenBucket(rate_per_s=1000, capacity=10, now_ns=T0)
    for _ in range(10):
        assert b.can_take(1, T0)
        b.take(1, T0)
    assert not b.can_take(1, T0)
    assert b.wait_ns(1, T0) == 1_000_000  # 1 token at 1000/s: 1 ms
    assert not b.can_take(1, T0 + 999_999)
    assert b.can_take(1, T0 + 1_000_000)
    assert b.wait_ns(4, T0 + 1_000_000) == 3_000_000
    b.take(10, T0 + 60 * NS)  # a minute idle fills the bucket to its capacity, no more
    assert not b.can_take(1, T0 + 60 * NS)
    assert not b.can_take(1, T0 + 59 * NS)  # a clock stepping back adds nothing


def test_bucket_charges_an_oversized_item_a_full_bucket_instead_of_starving_it() -> None:
    b = TokenBucket(rate_per_s=100, capacity=50, now_ns=T0)
    assert b.can_take(500, T0)  # bigger than the bucket: goes when the bucket is full
    b.take(500, T0)
    assert b.wait_ns(500, T0) == NS // 2  # 50 tokens at 100/s


@pytest.mark.parametrize(("rate", "cap"), [(0, 1), (-1, 1), (1, 0), (float("nan"), 1)])
def test_bucket_rejects_a_rate_or_capacity_that_is_not_positive(rate: float, cap: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        TokenBucket(rate, cap, T0)


# -- the pacer ---------------------------------------------------------------------------------------
def test_pacer_sends_the_burst_then_queues_and_releases_at_the_message_rate_in_order() -> None:
    p: Pacer[int] = Pacer(PacingParams(messages_per_s=100, burst=3, queue_messages=1000), T0)
    offers = [p.offer(i, 1000, T0) for i in range(10)]
    assert offers == [Offer.SEND] * 3 + [Offer.QUEUED] * 7
    assert (len(p), p.delayed, p.dropped) == (7, 7, 0)
    assert p.ready(T0) == []
    assert p.next_due_ns(T0) == 10_000_000  # 100/s: one every 10 ms
    assert p.ready(T0 + 10_000_000) == [3]
    assert p.ready(T0 + 30_000_000) == [4, 5]
    assert p.offer(99, 1000, T0 + 30_000_000) is Offer.QUEUED  # never overtakes what waits
    released = p.ready(T0 + 10 * NS)  # a long pause: at most one burst at once
    assert released == [6, 7, 8]
    assert p.ready(T0 + 20 * NS) == [9, 99]
    assert p.next_due_ns(T0 + 20 * NS) is None


def test_pacer_byte_rate_spaces_messages_by_their_size() -> None:
    p: Pacer[str] = Pacer(PacingParams(bytes_per_s=10_000, burst=1, max_message_size=1000), T0)
    assert p.offer("a", 1000, T0) is Offer.SEND
    assert p.offer("b", 500, T0) is Offer.QUEUED
    assert p.offer("c", 1000, T0) is Offer.QUEUED
    assert p.next_due_ns(T0) == 50_000_000  # 500 bytes at 10 kB/s
    assert p.ready(T0 + 50_000_000) == ["b"]
    assert p.ready(T0 + 149_999_999) == []
    assert p.ready(T0 + 150_000_000) == ["c"]


def test_pacer_both_rates_the_slower_one_decides() -> None:
    p: Pacer[int] = Pacer(PacingParams(messages_per_s=1000, bytes_per_s=100_000, burst=1, max_message_size=1000),
                          T0)
    assert p.offer(0, 1000, T0) is Offer.SEND
    assert p.offer(1, 1000, T0) is Offer.QUEUED
    assert p.next_due_ns(T0) == 10_000_000  # bytes: 1000 B at 100 kB/s = 10 ms (messages alone: 1 ms)


def test_pacer_full_queue_refuses_the_newest_and_counts_it() -> None:
    p: Pacer[int] = Pacer(PacingParams(messages_per_s=10, burst=1, queue_messages=2), T0)
    assert [p.offer(i, 100, T0) for i in range(5)] == [Offer.SEND, Offer.QUEUED, Offer.QUEUED,
                                                       Offer.DROPPED, Offer.DROPPED]
    assert (p.delayed, p.dropped) == (2, 2)
    assert p.ready(T0 + NS) == [1]  # the queue kept the oldest, in order
    assert p.take_all() == [2] and len(p) == 0


def test_pacer_zero_queue_drops_whatever_is_over_the_rate() -> None:
    p: Pacer[int] = Pacer(PacingParams(messages_per_s=10, burst=2, queue_messages=0), T0)
    assert [p.offer(i, 100, T0) for i in range(3)] == [Offer.SEND, Offer.SEND, Offer.DROPPED]


def test_pacing_params_need_a_rate() -> None:
    with pytest.raises(ValueError, match="messages_per_s or bytes_per_s"):
        PacingParams()


# -- the paced transport, a fake clock, a real loopback socket ------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.ns = T0

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    yield s
    s.close()


def received(s: socket.socket) -> list[bytes]:
    out = []
    for _ in range(100_000):
        try:
            out.append(s.recv(65535))
        except BlockingIOError:
            return out
    raise AssertionError("receiver never ran dry")


def test_paced_transport_sends_queues_drops_and_reports_every_message(receiver: socket.socket) -> None:
    clock = Clock()
    t = UdpTransport("127.0.0.1", receiver.getsockname()[1], clock_ns=clock,
                     pacing=PacingParams(messages_per_s=1000, burst=2, queue_messages=3))
    results: list[SendResult] = []
    t.on_result = results.append
    try:
        for i in range(7):
            t.submit(b"m%d" % i, records=10, flow_records=10)
        assert received(receiver) == [b"m0", b"m1"]
        assert t.backlog == 3
        assert [r.error for r in results] == [None, None, QUEUE_FULL, QUEUE_FULL]
        assert t.next_due_s() == pytest.approx(0.001)
        clock.ns += 2_000_000
        t.poll()
        assert received(receiver) == [b"m2", b"m3"]
        assert [(r.error, r.delayed) for r in results[-2:]] == [(None, True), (None, True)]
        assert t.backlog == 1 and t.errors[QUEUE_FULL] == 2
    finally:
        t.close()  # m4 still waits: reported dropped at close, not silently lost
    assert [(r.size, r.records, r.error) for r in results[-1:]] == [(2, 10, CLOSED_UNSENT)]
    assert len(results) == 7 and t.backlog == 0


def test_unpaced_transport_submit_sends_at_once(receiver: socket.socket) -> None:
    results: list[SendResult] = []
    with UdpTransport("127.0.0.1", receiver.getsockname()[1]) as t:
        t.on_result = results.append
        for i in range(50):
            t.submit(b"x%d" % i, 1, 1)
        assert t.backlog == 0 and t.next_due_s() is None
    assert len(received(receiver)) == 50 and all(r.error is None for r in results)


# -- config ----------------------------------------------------------------------------------------------
def _cfg(tmp_path: Path, collector: dict[str, object]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"collectors": [{"address": "127.0.0.1", **collector}]}))
    return path


def test_config_pacing_is_off_by_default_and_parsed_when_set(tmp_path: Path) -> None:
    assert load_config(_cfg(tmp_path, {}), env={}).collectors[0].pacing is None
    cfg = load_config(_cfg(tmp_path, {"pacing": {"messages_per_s": 20000, "burst": 32}}), env={})
    p = cfg.collectors[0].pacing
    assert p is not None and (p.messages_per_s, p.bytes_per_s, p.burst, p.queue_messages) == (20000, None, 32, 65536)


@pytest.mark.parametrize(("pacing", "extra", "needle"), [
    ({}, {}, "collectors[0].pacing: set messages_per_s or bytes_per_s"),
    ({"messages_per_s": 0}, {}, "collectors[0].pacing.messages_per_s"),
    ({"bytes_per_s": -5}, {}, "collectors[0].pacing.bytes_per_s"),
    ({"messages_per_s": 10, "burst": 0}, {}, "collectors[0].pacing.burst"),
    ({"messages_per_s": 10, "queue_messages": -1}, {}, "collectors[0].pacing.queue_messages"),
    ({"messages_per_s": 10, "rate": 3}, {}, "collectors[0].pacing.rate"),
    ({"messages_per_s": 10}, {"transport": "tcp"}, "pacing: only with transport: udp"),
])  # fmt: skip
def test_config_pacing_errors_name_the_key(tmp_path: Path, pacing: dict[str, object], extra: dict[str, object],
                                           needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_cfg(tmp_path, {"pacing": pacing, **extra}), env={})
    assert needle in str(info.value)
