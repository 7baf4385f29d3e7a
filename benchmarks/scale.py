"""Issue 12's figures from one run (root): `sudo .venv/bin/python benchmarks/scale.py`.

Prints lines starting exactly with:
  spill: max lossless rate <N> packets/s
  sustain: <N> concurrent flows, drain cycle <X>% of the drain interval
  drain: 1000000 flows drained and encoded <X> s, kernel lookup-and-delete floor <Y> s, ratio <R>
  datapath: <N> flows, ipfixer <A> ns/packet, softflowd <B> ns/packet, ratio <R>

- spill: a 1-entry kernel map kept full, so every packet of the classifier spills. A child process
  (forked, sharing the program fd) runs the classifier with BPF_PROG_TEST_RUN on 4,096 distinct UDP flows
  at a paced rate; this process serves it as the daemon does (SpillConsumer thread, Accounter, a drain
  and an encode of everything evicted every second). A rate is lossless when the kernel counted no
  ring-buffer failure and every spilled packet was accounted; rates double until one is not.
- sustain: a map of 2N entries holding N flows, half long-lived flows (touched every second) and half churning one-packet
  flows (1/15 of them replaced every second: the default 15 s idle timeout), a drain every second with
  the daemon's sweep (3 drains per map read); drain + encode + send (UDP to a local socket) time per
  cycle. The earlier take_all strategy is measured beside it.
- drain: 1M flows that all go idle between two drains; the kernel's BPF_MAP_LOOKUP_AND_DELETE_BATCH of
  the same map alone (the floor) vs ipfixer's drain (the sweep foresees the mass expiry and takes the
  map whole) plus the IPFIX encode.
- datapath: benchmarks/datapath.py's veth + trafgen + softflowd harness, addresses varied (one source
  address per flow), whole-machine CPU added per packet over no monitor.
The machine may be shared: figures are ratios within this run.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datapath as dp  # noqa: E402

from ipfixer.clock import SystemClock  # noqa: E402
from ipfixer.flows.accounter import Accounter  # noqa: E402
from ipfixer.sources.kernel.drain import Drainer  # noqa: E402
from ipfixer.sources.kernel.program import libbpf, load_program, map_batch, prog_test_run  # noqa: E402
from ipfixer.sources.kernel.spill import SpillConsumer  # noqa: E402

SEC = 1_000_000_000


def _udp_frame(i: int) -> bytes:
    """Ether/IPv4/UDP 10.1.x.y:1024+i -> 10.250.0.99:9, 18 bytes of payload."""
    eth = bytes.fromhex("020000000001020000000002") + b"\x08\x00"
    src = bytes([10, 1, (i >> 8) & 0xFF, i & 0xFF])
    ip = bytes.fromhex("4500002e00004000401100 00".replace(" ", "")) + src + bytes([10, 250, 0, 99])
    udp = (1024 + i).to_bytes(2, "big") + (9).to_bytes(2, "big") + (26).to_bytes(2, "big") + b"\x00\x00"
    return eth + ip + udp + b"A" * 18


def _fill(prog: Any, keys: np.ndarray, first_ns: np.ndarray | int, last_ns: np.ndarray | int) -> None:
    leaves = np.zeros(len(keys), dtype=prog.leaf_dtype)
    leaves["packets"], leaves["octets"] = 1, 100
    leaves["first_ns"], leaves["last_ns"] = first_ns, last_ns
    fn = libbpf().bpf_map_update_batch
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    for i in range(0, len(keys), 65536):
        cnt = ctypes.c_uint32(min(65536, len(keys) - i))
        ret = fn(prog.flows.map_fd, keys.ctypes.data + i * keys.itemsize, leaves.ctypes.data + i * leaves.itemsize,
                 ctypes.byref(cnt), None)
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))


def _keys(prog: Any, start: int, n: int) -> np.ndarray:
    keys = np.zeros(n, dtype=prog.key_dtype)
    keys["ethertype"], keys["protocol"], keys["ifindex"] = 0x0800, 17, 2
    idx = np.arange(start, start + n, dtype=np.uint32)
    keys["src_port"] = (idx & 0xFFFF).astype(np.uint16)
    keys["src_addr"][:, 10:12] = 0xFF
    keys["src_addr"][:, 12:16] = idx.byteswap().view(np.uint8).reshape(n, 4)
    return keys


# --- spill ---------------------------------------------------------------------------------------


def _spill_run(rate: int, seconds: float) -> tuple[bool, int, int, int, float]:
    """(lossless, spilled, ringbuf_fail, accounted, achieved packets/s) offering `rate` spilled
    packets/s for `seconds` (achieved: what the generator really sent, spilled / its run time)."""
    prog = load_program(map_entries=1, ring_pages=1024)
    try:
        prog_test_run(prog.ingress_fd, _udp_frame(4096))  # the one entry: every other flow spills
        clock = SystemClock()
        acc = Accounter(10_000, 15 * SEC, clock, active_timeout_ns=60 * SEC)
        consumer = SpillConsumer(prog.bpf, prog.spill, prog.spill_dtype, acc)
        session = dp._session()
        frames = [_udp_frame(i) for i in range(4096)]
        tick = 0.005
        per_tick = max(1, int(rate * tick))
        t_fork = time.monotonic()
        t_exit = 0.0
        pid = os.fork()
        if pid == 0:  # the "datapath": paced classifier runs, each spilling one record
            try:
                t0 = time.monotonic()
                sent, i = 0, 0
                total = int(rate * seconds)
                while sent < total:
                    n = min(per_tick, total - sent)
                    reps = max(1, n // 64)
                    for _ in range(max(1, n // reps)):
                        prog_test_run(prog.ingress_fd, frames[i % 4096], repeat=reps)
                        i += 1
                        sent += reps
                    ahead = t0 + sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            finally:
                os._exit(0)
        t_end = time.monotonic() + seconds + 0.5
        next_drain = time.monotonic() + 1.0
        evicted: list[np.ndarray] = []
        while True:
            done = os.waitpid(pid, os.WNOHANG)[0] == pid
            if done:
                t_exit = time.monotonic()
            evicted.extend(consumer.poll(50))
            if time.monotonic() >= next_drain or done:
                for b in evicted:
                    if len(b):
                        session.messages(b, clock.wall_ns())
                evicted = []
                next_drain = time.monotonic() + 1.0
            if done or time.monotonic() > t_end + 30:
                break
        evicted.extend(consumer.flush())
        accounted = sum(int(b["packets"].sum()) for b in evicted)
        consumer.close()
        c = prog.counter_values()
        achieved = c["spilled"] / max(t_exit - t_fork, 1e-9)
        return (c["ringbuf_fail"] == 0 and accounted == c["spilled"], c["spilled"], c["ringbuf_fail"], accounted,
                achieved)
    finally:
        prog.close()


def spill(seconds: float, max_rate: int) -> None:
    best = 0.0
    rate = 25_000
    note = "the first rate with a loss ends the search"
    while rate <= max_rate:
        ok, spilled, fail, acc, achieved = _spill_run(rate, seconds)
        print(f"  spill offered {rate} packets/s for {seconds:.0f} s: achieved {achieved:.0f}/s, spilled {spilled}, "
              f"ringbuf_fail {fail}, accounted {acc}: {'lossless' if ok else 'LOSS'}", flush=True)
        if not ok:
            break
        best = max(best, achieved)
        if achieved < 0.9 * rate:
            note = "no loss up to the generator's own limit (a single BPF_PROG_TEST_RUN process)"
            break
        rate *= 2
    print(f"spill: max lossless rate {best:.0f} packets/s (achieved rates, doubling from 25000, {seconds:.0f} s "
          f"each; a 1-entry map so every packet spills; {note})")


# --- sustain -------------------------------------------------------------------------------------


def _sustain(strategy: str, n: int, cycles: int) -> float:
    half = n // 2
    prog = load_program(map_entries=2 * n)  # room for the churn a sweep cycle has not removed yet
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.connect(sink.getsockname())
    out.setblocking(False)
    try:
        clock = SystemClock()
        idle = 15 * SEC
        d = Drainer(prog.flows, clock, 60 * SEC, idle, strategy=strategy, sweep_drains=3)
        session = dp._session()
        now = time.monotonic_ns()
        long_keys = _keys(prog, 0, half)
        _fill(prog, long_keys, now, now)
        churn_per_s = half // 15
        ages = np.arange(half, dtype=np.int64) * idle // half  # staggered: 1/15 expire each second
        _fill(prog, _keys(prog, 10_000_000, half), now - ages, now - ages)
        next_new = 10_000_000 + half
        if strategy == "take_all":  # the carry holds the live flows; take them once before timing
            d.drain()
        times = []
        warmup = 4  # one whole sweep cycle (3-4 slices) first: the setup's backlog of expired flows
        for cycle in range(warmup + cycles):
            time.sleep(0.2)
            now = time.monotonic_ns()
            if strategy == "sweep":
                _fill(prog, long_keys, now - 600 * SEC // 100, now)  # the datapath touches long-lived flows
            else:  # take_all empties the map: the datapath re-creates the long-lived ones
                _fill(prog, long_keys, now, now)
            _fill(prog, _keys(prog, next_new, churn_per_s), now, now)  # new churning flows
            next_new += churn_per_s
            t0 = time.perf_counter()
            batch = d.drain()
            for m in session.messages(batch, clock.wall_ns()):
                try:
                    out.send(m.data)
                except BlockingIOError:
                    pass
            if cycle >= warmup:
                times.append(time.perf_counter() - t0)
            _drop(sink)
        return float(np.median(times))
    finally:
        out.close()
        sink.close()
        prog.close()


def _drop(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65536)
    except BlockingIOError:
        pass


def sustain(n: int, cycles: int) -> None:
    sweep = _sustain("sweep", n, cycles)
    take = _sustain("take_all", n, cycles)
    print(f"sustain: {n} concurrent flows, drain cycle {100 * sweep:.0f}% of the drain interval (1 s; drain + "
          f"encode + send, median of {cycles} after a sweep cycle of warm-up; half long-lived, half churning at the 15 s idle timeout; "
          f"earlier take_all design: {100 * take:.0f}%)")


# --- drain ---------------------------------------------------------------------------------------


def drain(n: int) -> None:
    prog = load_program(map_entries=n)
    try:
        keys = _keys(prog, 0, n)
        _fill(prog, keys, 1, 1)
        t0 = time.perf_counter()
        k, _ = map_batch(prog.flows.map_fd, prog.key_dtype, prog.leaf_dtype, n, delete=True)
        floor = time.perf_counter() - t0
        assert len(k) == n
        idle = 15 * SEC
        now = time.monotonic_ns()
        _fill(prog, keys, now - idle + 5 * SEC, now - idle + 5 * SEC)  # alive for 5 more seconds
        clock = SystemClock()
        d = Drainer(prog.flows, clock, 60 * SEC, idle)
        assert len(d.drain()) == 0  # the drain before: reads the map, nothing expires yet
        time.sleep(max(0.0, (now + 5 * SEC - time.monotonic_ns()) / 1e9 + 0.1))
        session = dp._session()
        t0 = time.perf_counter()
        batch = d.drain()  # every flow went idle
        t1 = time.perf_counter()
        messages = session.messages(batch, clock.wall_ns())
        t2 = time.perf_counter()
        assert len(batch) == n and sum(m.records for m in messages) == n
        print(f"drain: {n} flows drained and encoded {t2 - t0:.2f} s, kernel lookup-and-delete floor {floor:.2f} s, "
              f"ratio {(t2 - t0) / floor:.2f} (drain {t1 - t0:.2f} s, ratio {(t1 - t0) / floor:.2f}; encode "
              f"{t2 - t1:.2f} s into {len(messages)} IPFIX messages)")
    finally:
        prog.close()


# --- datapath ------------------------------------------------------------------------------------


def datapath(sizes: list[int], packets: int, runs: int) -> None:
    for n in sizes:
        r = dp.measure(packets, n, runs, map_entries=max(65536, 1 << (n - 1).bit_length()), vary="addr")
        base, ipfx, soft = r["none"], r["ipfixer"], r["softflowd"]
        a, b = ipfx[1] - base[1], soft[1] - base[1]
        print(f"datapath: {n} flows, ipfixer {a:.0f} ns/packet, softflowd {b:.0f} ns/packet, ratio {a / max(b, 1):.2f} "
              f"(whole-machine CPU added per packet, {packets} 64-byte frames, best of {runs}, a drain every second "
              f"during the ipfixer run)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spill-seconds", type=float, default=5.0)
    ap.add_argument("--spill-max", type=int, default=3_200_000)
    ap.add_argument("--sustain-flows", type=int, default=1_000_000)
    ap.add_argument("--cycles", type=int, default=6)
    ap.add_argument("--drain-flows", type=int, default=1_000_000)
    ap.add_argument("--datapath-flows", default="256,65536,1000000")
    ap.add_argument("--packets", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: spill,sustain,drain,datapath")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if "spill" not in skip:
        spill(args.spill_seconds, args.spill_max)
    if "sustain" not in skip:
        sustain(args.sustain_flows, args.cycles)
    if "drain" not in skip:
        drain(args.drain_flows)
    if "datapath" not in skip:
        datapath([int(x) for x in args.datapath_flows.split(",")], args.packets, args.runs)


if __name__ == "__main__":
    main()
