"""Drainer on a real kernel map filled through BPF_PROG_TEST_RUN: expiry reasons, deltas, flush."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether

from ipfixer.clock import SystemClock
from ipfixer.kernel.drain import Drainer
from ipfixer.kernel.program import prog_test_run
from ipfixer.model import EndReason

pytestmark = pytest.mark.root
MS = 1_000_000


def udp(sport: int) -> bytes:
    return bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=9))


STRATEGIES = pytest.mark.parametrize("strategy", ["take_all", "per_key"])


@STRATEGIES
def test_idle_fin_active_and_flush(program: Any, strategy: str) -> None:
    clock = SystemClock()
    d = Drainer(program.flows, clock, active_timeout_ns=3600_000 * MS, idle_timeout_ns=30 * MS,
                strategy=strategy)
    wall0 = clock.wall_ns() // MS
    prog_test_run(program.ingress_fd, udp(1))
    time.sleep(0.05)
    t_mid = clock.mono_ns()
    prog_test_run(program.ingress_fd, udp(2))
    prog_test_run(program.ingress_fd, udp(2))
    fin = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=3, dport=4, flags="FA"))
    prog_test_run(program.ingress_fd, fin)
    batch = d.drain(now_mono_ns=t_mid + 10 * MS)
    got = sorted((int(r["src_port"]), int(r["packets"]), int(r["end_reason"])) for r in batch)
    assert got == [(1, 1, EndReason.IDLE_TIMEOUT), (3, 1, EndReason.END_OF_FLOW)]
    wall1 = clock.wall_ns() // MS
    assert np.all((batch["start_ms"] >= wall0 - 1) & (batch["end_ms"] <= wall1 + 1))
    assert np.all(batch["ingress_if"] == 1) and np.all(batch["egress_if"] == 0)
    assert int(batch[batch["src_port"] == 3]["tcp_flags"][0]) == 0x11

    # Active timeout: exported as a delta and removed; the next packet starts a new delta.
    d.active_timeout_ns = 0
    d.idle_timeout_ns = 3600_000 * MS
    batch = d.drain()
    assert [(int(r["src_port"]), int(r["packets"]), int(r["end_reason"])) for r in batch] == [
        (2, 2, EndReason.ACTIVE_TIMEOUT)
    ]
    prog_test_run(program.ingress_fd, udp(2))
    batch = d.flush()
    assert [(int(r["src_port"]), int(r["packets"]), int(r["end_reason"])) for r in batch] == [
        (2, 1, EndReason.FORCED_END)
    ]
    assert len(d.flush()) == 0


@STRATEGIES
@pytest.mark.parametrize("timeout_ns", [0, 3600_000 * MS])
def test_drain_never_loses_counts_under_traffic(program: Any, strategy: str, timeout_ns: int) -> None:
    """Drain repeatedly while packets keep arriving: the sum of exported deltas is every packet."""
    d = Drainer(program.flows, SystemClock(), active_timeout_ns=timeout_ns, idle_timeout_ns=timeout_ns,
                strategy=strategy)
    frames = [udp(p) for p in range(1, 6)]
    total = 0
    exported = 0
    for _ in range(40):
        for f in frames:
            prog_test_run(program.ingress_fd, f)
            total += 1
        exported += int(d.drain()["packets"].sum())
    exported += int(d.flush()["packets"].sum())
    assert exported == total


def test_take_all_carries_live_flows_into_one_record(program: Any) -> None:
    d = Drainer(program.flows, SystemClock(), 3600_000 * MS, 3600_000 * MS, strategy="take_all")
    prog_test_run(program.ingress_fd, udp(1))
    prog_test_run(program.ingress_fd, udp(2))
    assert len(d.drain()) == 0 and d.carried == 2
    assert len(program.flows.items()) == 0  # taken out of the kernel map, held in userspace
    prog_test_run(program.ingress_fd, udp(1))
    prog_test_run(program.ingress_fd, udp(3))
    assert len(d.drain()) == 0 and d.carried == 3
    batch = d.flush()
    got = sorted((int(r["src_port"]), int(r["packets"]), int(r["octets"])) for r in batch)
    assert got == [(1, 2, 56), (2, 1, 28), (3, 1, 28)]
    r1 = batch[batch["src_port"] == 1][0]
    assert r1["start_ms"] <= r1["end_ms"] and d.carried == 0
