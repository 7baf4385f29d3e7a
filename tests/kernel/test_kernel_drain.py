"""Drainer on a real kernel map filled through BPF_PROG_TEST_RUN: expiry reasons, deltas, flush."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether

from ipfixer.clock import SystemClock
from ipfixer.model import EndReason
from ipfixer.sources.kernel.drain import Drainer
from ipfixer.sources.kernel.program import map_batch, prog_test_run

pytestmark = pytest.mark.root
MS = 1_000_000


def udp(sport: int) -> bytes:
    return bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=9))


STRATEGIES = pytest.mark.parametrize("strategy", ["take_all", "sweep"])


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


def fill_map(prog: Any, n: int, first_ns: int, base: int = 0) -> None:
    """n UDP flows straight into the kernel map (bpf_map_update_batch), one packet of 100 octets each."""
    import ctypes

    from ipfixer.sources.kernel.program import libbpf

    keys = np.zeros(n, dtype=prog.key_dtype)
    keys["ethertype"], keys["protocol"], keys["ifindex"] = 0x0800, 17, 2
    idx = np.arange(base, base + n, dtype=np.uint32)
    keys["src_port"] = idx & 0xFFFF
    keys["src_addr"][:, 12:16] = idx.view(np.uint8).reshape(n, 4)
    leaves = np.zeros(n, dtype=prog.leaf_dtype)
    leaves["packets"], leaves["octets"] = 1, 100
    leaves["first_ns"] = leaves["last_ns"] = first_ns
    fn = libbpf().bpf_map_update_batch
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    count = ctypes.c_uint32(n)
    assert fn(prog.flows.map_fd, keys.ctypes.data, leaves.ctypes.data, ctypes.byref(count), None) == 0


def test_sweep_keeps_live_flows_in_the_kernel_map(program: Any) -> None:
    d = Drainer(program.flows, SystemClock(), 3600_000 * MS, 3600_000 * MS)
    for p in (1, 2, 3):
        prog_test_run(program.ingress_fd, udp(p))
    assert len(d.drain()) == 0 and d.carried == 0
    assert len(program.flows.items()) == 3  # an update for their next packet, not an insert
    prog_test_run(program.ingress_fd, udp(1))
    got = sorted((int(r["src_port"]), int(r["packets"])) for r in d.flush())
    assert got == [(1, 2), (2, 1), (3, 1)]


def test_sliced_sweep_finds_every_expired_flow_once(program: Any) -> None:
    """sweep_drains=4: each drain reads about a quarter of the map; after a full cycle every idle flow has
    been exported exactly once and the live ones are still in the map."""
    now = time.monotonic_ns()
    fill_map(program, 3000, first_ns=1)  # idle since boot
    fill_map(program, 1000, first_ns=now, base=100_000)  # live
    d = Drainer(program.flows, SystemClock(), 3600_000 * MS, 60_000 * MS, sweep_drains=4)
    out, reads = [], []
    for _ in range(5):
        out.append(d.drain())
        reads.append(d.read_entries)
    assert max(reads) < 1100 and sum(reads) >= 4000  # one slice per drain (a bucket may overshoot)
    allb = np.concatenate(out)
    ports = allb["src_port"].tolist()
    assert len(ports) == len(set(ports)) == 3000 and set(allb["end_reason"].tolist()) == {EndReason.IDLE_TIMEOUT}
    assert len(out[0]) < 3000  # the first drain read only part of the map
    assert d.kernel_entries >= 1000 and len(program.flows.items()) == 1000
    assert int(d.flush()["packets"].sum()) == 1000


def test_mass_expiry_takes_the_map_and_puts_survivors_back(program: Any) -> None:
    now = time.monotonic_ns()
    fill_map(program, 3000, first_ns=1)
    fill_map(program, 500, first_ns=now, base=100_000)
    fill_map(program, 500, first_ns=1, base=200_000)  # 3500 of 4000 expire: over 3/4 and over 1024
    d = Drainer(program.flows, SystemClock(), 3600_000 * MS, 60_000 * MS)
    batch = d.drain()
    assert d.mass_drains == 1 and len(batch) == 3500 and d.put_back + d.carried == 500
    assert d.deleted_keys == 0 and len(program.flows.items()) == d.put_back
    total = int(batch["packets"].sum()) + int(d.flush()["packets"].sum())
    assert total == 4000


def test_a_put_back_flow_recreated_meanwhile_is_carried_and_merged(program: Any) -> None:
    """The race of a mass drain: the datapath re-creates a survivor before it is put back. Its counts
    are carried and merged with the kernel's new entry (taken atomically) at the next drain."""
    d = Drainer(program.flows, SystemClock(), 3600_000 * MS, 3600_000 * MS)
    prog_test_run(program.ingress_fd, udp(7))
    prog_test_run(program.ingress_fd, udp(7))
    keys, leaves = map_batch(program.flows.map_fd, d.key_dtype, d.leaf_dtype, d.capacity, delete=True)
    prog_test_run(program.ingress_fd, udp(7))  # re-created by the datapath before the put-back
    d._put_back(keys, leaves)
    assert d.carried == 1 and d.put_back == 0
    assert len(d.drain()) == 0 and d.carried == 0  # merged and now back in the kernel map
    prog_test_run(program.ingress_fd, udp(7))
    assert [(int(r["src_port"]), int(r["packets"])) for r in d.flush()] == [(7, 4)]


def test_a_foreseen_mass_expiry_takes_the_map_without_reading_it_first(program: Any) -> None:
    idle = 500 * MS
    now = time.monotonic_ns()
    fill_map(program, 3000, first_ns=now - idle + 150 * MS)  # alive now, idle in 150 ms
    fill_map(program, 100, first_ns=now, base=100_000)
    d = Drainer(program.flows, SystemClock(), 3600_000 * MS, idle)
    assert len(d.drain()) == 0 and d.read_entries == 3100 and d.mass_drains == 0
    time.sleep(0.2)
    d.read_entries = -1
    batch = d.drain()
    assert d.mass_drains == 1 and d.read_entries == -1  # taken whole, no read first
    assert len(batch) == 3000 and set(batch["end_reason"].tolist()) == {EndReason.IDLE_TIMEOUT}
    assert len(program.flows.items()) + d.carried == 100
    assert int(d.flush()["packets"].sum()) == 100
