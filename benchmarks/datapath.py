"""Datapath and drain benchmarks (root): run `.venv/bin/python benchmarks/datapath.py`.

1. Packet cost through a veth pair between two namespaces: trafgen in ns B sends N small UDP frames to
   veth_b; they are received on veth_a (ns A) and dropped by IP (not for a local address). Measured
   with no monitor, with ipfixer on veth_a ingress+egress, and with softflowd (libpcap) on veth_a.
   Reported: wall ns/packet and CPU ns/packet (all CPUs' busy time from /proc/stat / packets).
2. The classifier alone: BPF_PROG_TEST_RUN with repeat on an existing flow (kernel-measured ns/run),
   and what tunnel decapsulation costs (plain and VXLAN frames, default and decap builds).
3. Drain time for 100k and 1M flows filled with bpf_map_update_batch: flush (lookup_and_delete
   batch), a drain where every flow expires and one where none does, for the sweep and take_all
   strategies (kernel/drain.py). benchmarks/scale.py measures the issue-12 figures.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipfixer.clock import SystemClock  # noqa: E402
from ipfixer.export.session import ExportSession  # noqa: E402
from ipfixer.model import ETH_P_IP, ETH_P_IPV6  # noqa: E402
from ipfixer.sources.kernel.attach import Attacher  # noqa: E402
from ipfixer.sources.kernel.drain import Drainer  # noqa: E402
from ipfixer.sources.kernel.program import libbpf, load_program, prog_test_run  # noqa: E402
from ipfixer.templates import load_templates  # noqa: E402

SUFFIX = str(os.getpid() % 100000)
NS_A, NS_B = f"ipfxbA{SUFFIX}", f"ipfxbB{SUFFIX}"
VA, VB = f"ipfxba{SUFFIX}", f"ipfxbb{SUFFIX}"


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=300).stdout


def ns(name: str, *args: str, check: bool = True) -> str:
    return sh("ip", "netns", "exec", name, *args, check=check)


def setup() -> tuple[str, str]:
    sh("ip", "netns", "add", NS_A)
    sh("ip", "netns", "add", NS_B)
    sh("ip", "-n", NS_A, "link", "add", VA, "type", "veth", "peer", "name", VB, "netns", NS_B)
    for n, dev, ip in ((NS_A, VA, "10.250.0.1"), (NS_B, VB, "10.250.0.2")):
        sh("ip", "-n", n, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", n, "link", "set", dev, "up")
        sh("ip", "-n", n, "link", "set", "lo", "up")
    mac_a = ns(NS_A, "cat", f"/sys/class/net/{VA}/address").strip()
    mac_b = ns(NS_B, "cat", f"/sys/class/net/{VB}/address").strip()
    return mac_a, mac_b


def teardown() -> None:
    sh("ip", "netns", "del", NS_A, check=False)
    sh("ip", "netns", "del", NS_B, check=False)


def cpu_busy_ns() -> tuple[int, int]:
    """(busy, softirq) ns over all CPUs. Busy includes anything else running on the machine; softirq is
    where received packets (and the tc ingress hook) are processed."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return (sum(vals[:8]) - vals[3] - vals[4]) * tick, vals[6] * tick


def rx_packets() -> int:
    return int(ns(NS_A, "cat", f"/sys/class/net/{VA}/statistics/rx_packets"))


def prog_run_ns(fd: int) -> int:
    """Kernel-measured run time of a BPF program (kernel.bpf_stats_enabled=1), from its fdinfo."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("run_time_ns:"):
            return int(line.split()[1])
    return 0


def process_cpu_ns(pid: int) -> int:
    """utime + stime of a process, in ns."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))


def blast(mac_a: str, mac_b: str, count: int, flows: int, vary: str = "port",
          probe: Callable[[], int] | None = None) -> tuple[float, float, int, float, float]:
    """trafgen count frames over `flows` flows (distinct UDP source ports, or with vary="addr" distinct
    source addresses from 10.1.0.0); returns (wall ns/pkt, cpu ns/pkt, packets received, softirq ns/pkt,
    probe ns/pkt) where probe is a monitor's own cost counter (BPF run time, process CPU time)."""
    if vary == "addr" and flows > 1:
        base = 0x0A010000
        src, sport = f"dinc({base}, {base + flows - 1})", "1024"
    else:
        src, sport = "10.250.0.2", f"dinc(1024, {1023 + flows}, 1)" if flows > 1 else "1024"
    cfg = (f"{{ eth(da={mac_a}, sa={mac_b}), ipv4(saddr={src}, daddr=10.250.0.99, ttl=64), "
           f"udp(sp={sport}, dp=9), fill(0x41, 18) }}")
    p0 = probe() if probe else 0
    rx0, cpu0, t0 = rx_packets(), cpu_busy_ns(), time.monotonic_ns()
    _trafgen(cfg, count)
    time.sleep(0.2)  # let the receive backlog drain
    t1, cpu1, rx1 = time.monotonic_ns(), cpu_busy_ns(), rx_packets()
    p1 = probe() if probe else 0
    got = max(rx1 - rx0, 1)
    return ((t1 - t0 - 200_000_000) / got, (cpu1[0] - cpu0[0]) / got, rx1 - rx0, (cpu1[1] - cpu0[1]) / got,
            (p1 - p0) / got)


def _trafgen(cfg: str, count: int) -> None:
    path = Path(f"/tmp/ipfx-trafgen-{SUFFIX}.cfg")
    path.write_text(cfg + "\n")
    try:
        subprocess.run(["ip", "netns", "exec", NS_B, "trafgen", "-o", VB, "--cpus", "1", "-n", str(count),
                        "-c", str(path)], check=True, capture_output=True, timeout=300)
    finally:
        path.unlink(missing_ok=True)


def best_of(runs: int, mac_a: str, mac_b: str, count: int, flows: int, vary: str = "port",
            probe: Callable[[], int] | None = None) -> tuple[float, float, int, float, float]:
    res = [blast(mac_a, mac_b, count, flows, vary, probe=probe) for _ in range(runs)]
    return min(res, key=lambda r: r[1])


def datapath(count: int, flows: int, runs: int) -> None:
    r = measure(count, flows, runs)
    base, bare, ipfx, soft, metered = r["none"], r["clsact only"], r["ipfixer"], r["softflowd"], r["metered"]
    print(f"datapath: {count} x 64-byte UDP frames, {flows} flows, trafgen -> veth, best of {runs}")
    print(f"  {'mode':<12}{'wall ns/pkt':>12}{'cpu ns/pkt':>12}{'softirq ns':>11}{'received':>10}"
          f"{'cpu ratio':>10}")
    for name, x in (("none", base), ("clsact only", bare), ("ipfixer", ipfx), ("softflowd", soft)):
        print(f"  {name:<12}{x[0]:>12.0f}{x[1]:>12.0f}{x[3]:>11.0f}{x[2]:>10}{x[1] / base[1]:>10.2f}")
    print("  (cpu = all CPUs' busy time / packets: includes anything else running on the machine)")
    print(f"  ipfixer added {ipfx[1] - base[1]:.0f} cpu ns/pkt, softflowd {soft[1] - base[1]:.0f}; "
          f"ipfixer metered {metered[0]:.0f} packets (all runs share the map)")
    print(f"  own cost per packet: ipfixer classifier in the datapath {ipfx[4]:.0f} ns (kernel bpf_stats "
          f"run_time_ns), softflowd process {soft[4]:.0f} ns (utime+stime; its AF_PACKET copy in the "
          f"kernel comes on top); ratio ipfixer/softflowd {ipfx[4] / max(soft[4], 1):.2f}")
    print(f"  throughput loss with ipfixer: wall {100 * (ipfx[0] / base[0] - 1):.1f}% per packet "
          f"(trafgen offered load, single sender)")
    prog = load_program(map_entries=1024)
    try:
        frame = bytes.fromhex("02" * 12 + "0800") + bytes.fromhex(
            "4500002e000040004011000" + "0" + "0afa00020afa0063") + bytes(8) + b"A" * 18
        prog_test_run(prog.ingress_fd, frame)
        _, dur = prog_test_run(prog.ingress_fd, frame, repeat=1_000_000)
    finally:
        prog.close()
    print(f"  classifier alone (BPF_PROG_TEST_RUN, existing flow): {dur} ns/run")
    print(f"  shared hash vs per-CPU hash: {atomic_cost(frame)}")


Result = tuple[float, float, int, float, float]


def measure(count: int, flows: int, runs: int, map_entries: int = 65536, vary: str = "port",
            drain_s: float = 1.0) -> dict[str, Result]:
    """Best-of-runs figures with no monitor, a bare clsact hook, ipfixer (its drainer draining the map
    every drain_s in a thread, as the daemon does) and softflowd; "metered": ipfixer's packet count."""
    import threading

    mac_a, mac_b = setup()
    prog = load_program(map_entries=map_entries)
    try:
        base = best_of(runs, mac_a, mac_b, count, flows, vary)
        ns(NS_A, "tc", "qdisc", "add", "dev", VA, "clsact")
        try:
            bare = best_of(runs, mac_a, mac_b, count, flows, vary)  # the hook without any filter
        finally:
            ns(NS_A, "tc", "qdisc", "del", "dev", VA, "clsact")
        att = Attacher(prog.ingress_fd, prog.egress_fd, "both", netns=NS_A)
        try:
            att.attach(VA)
            stats_was = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
            Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")  # the kernel times each run
            d = Drainer(prog.flows, SystemClock(), 60 * 10**9, 15 * 10**9, sweep_drains=3)
            stop = threading.Event()

            def drainer() -> None:
                while not stop.wait(drain_s):
                    d.drain()

            th = threading.Thread(target=drainer, daemon=True)
            th.start()
            try:
                ipfx = best_of(runs, mac_a, mac_b, count, flows, vary, probe=lambda: prog_run_ns(prog.ingress_fd))
            finally:
                stop.set()
                th.join()
                Path("/proc/sys/kernel/bpf_stats_enabled").write_text(stats_was)
            metered = int(d.flush()["packets"].sum())
        finally:
            att.detach_all()
            att.close()
        pid, ctl = f"/tmp/ipfx-sf-{SUFFIX}.pid", f"/tmp/ipfx-sf-{SUFFIX}.ctl"
        sf = subprocess.Popen(["ip", "netns", "exec", NS_A, "softflowd", "-i", VA, "-n", "127.0.0.1:9999", "-d",
                               "-p", pid, "-c", ctl], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            soft = best_of(runs, mac_a, mac_b, count, flows, vary, probe=lambda: process_cpu_ns(sf.pid))
        finally:
            sf.terminate()
            try:
                sf.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sf.kill()
                sf.wait(timeout=10)
            for p in (pid, ctl):
                Path(p).unlink(missing_ok=True)
        return {"none": base, "clsact only": bare, "ipfixer": ipfx, "softflowd": soft,
                "metered": (float(metered), 0.0, 0, 0.0, 0.0)}
    finally:
        prog.close()
        teardown()


def atomic_cost(frame: bytes, repeat: int = 2_000_000, rounds: int = 5) -> str:
    """What the shared map's locked adds cost per packet: the same program with plain adds (what a
    per-CPU hash would allow) under BPF_PROG_TEST_RUN, median of `rounds`."""
    med = {}
    for name, flags in (("atomic", ()), ("plain", ("-DIPFIXER_BENCH_PLAIN_ADDS",))):
        p = load_program(map_entries=1024, extra_cflags=flags)
        try:
            prog_test_run(p.ingress_fd, frame)
            med[name] = sorted(prog_test_run(p.ingress_fd, frame, repeat=repeat)[1] for _ in range(rounds))[rounds // 2]
        finally:
            p.close()
    return (f"atomic adds {med['atomic']} ns/run, plain adds {med['plain']} ns/run (median of {rounds}); a "
            f"per-CPU hash would save the difference but copy {os.cpu_count()}x the values at every drain")


def fill(prog: Any, n: int, old: bool) -> None:
    p = prog
    keys = np.zeros(n, dtype=p.key_dtype)
    keys["ethertype"] = 0x0800
    keys["protocol"] = 17
    keys["ifindex"] = 2
    idx = np.arange(n, dtype=np.uint32)
    keys["src_port"] = idx & 0xFFFF
    keys["src_addr"][:, 12:16] = idx.view(np.uint8).reshape(n, 4)
    leaves = np.zeros(n, dtype=p.leaf_dtype)
    now = time.monotonic_ns()
    leaves["packets"] = 1
    leaves["octets"] = 100
    leaves["first_ns"] = leaves["last_ns"] = 1 if old else now  # 1 ns after boot: long idle
    lib = libbpf()
    fn = lib.bpf_map_update_batch
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    chunk = 65536
    for i in range(0, n, chunk):
        cnt = ctypes.c_uint32(min(chunk, n - i))
        ret = fn(p.flows.map_fd, keys.ctypes.data + i * keys.itemsize,
                 leaves.ctypes.data + i * leaves.itemsize, ctypes.byref(cnt), None)
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))


def timed(fn: object) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    out = fn()  # type: ignore[operator]
    return time.perf_counter() - t, out


def _session() -> ExportSession:
    """The daemon's default IPFIX session (shipped templates, 1452-byte messages)."""
    t = load_templates()
    opts = [t["options_exporter_stats"], t["options_sampling"], t["options_interfaces"]]
    return ExportSession("ipfix", 1, {ETH_P_IP: t["ipv4_flow"], ETH_P_IPV6: t["ipv6_flow"]}, opts,
                         boot_wall_ns=time.time_ns())


def drains(sizes: list[int]) -> None:
    print("drain: kernel map -> FLOW_DTYPE batch (map filled with bpf_map_update_batch)")
    for n in sizes:
        prog = load_program(map_entries=n)
        try:
            clock = SystemClock()
            take = Drainer(prog.flows, clock, 600 * 10**9, 60 * 10**9, strategy="take_all")
            per = Drainer(prog.flows, clock, 600 * 10**9, 60 * 10**9, strategy="sweep")
            fill(prog, n, old=True)
            t_flush, b = timed(take.flush)
            assert len(b) == n and int(b["packets"].sum()) == n
            res = {}
            for name, d in (("take_all", take), ("sweep", per)):
                fill(prog, n, old=True)
                res[name, "all"], b = timed(d.drain)
                assert len(b) == n
                fill(prog, n, old=False)
                res[name, "none"], b = timed(d.drain)
                assert len(b) == 0
                if name == "take_all":  # n carried + n new entries for the same keys: merge
                    fill(prog, n, old=False)
                    res[name, "merge"], b = timed(d.drain)
                    assert len(b) == 0 and d.carried == n
                    t, b = timed(d.flush)
                    assert int(b["packets"].sum()) == 2 * n
                else:
                    d.flush()
                    take.flush()
            fill(prog, n, old=True)  # the target: n flows drained and encoded into IPFIX messages
            session = _session()
            t0 = time.perf_counter()
            batch = take.drain()
            t1 = time.perf_counter()
            messages = session.messages(batch, clock.wall_ns())
            t2 = time.perf_counter()
            assert sum(m.records for m in messages) == n
            print(f"  {n:>8} flows drained and encoded: {t2 - t0:.2f} s (drain {t1 - t0:.2f} s + encode "
                  f"{t2 - t1:.2f} s into {len(messages)} IPFIX messages of <= 1452 bytes)")
            print(f"  {n:>8} flows: flush {t_flush:.2f} s | take_all: all expire {res['take_all', 'all']:.2f} s, "
                  f"none expire {res['take_all', 'none']:.2f} s, merge {n} carried + {n} new "
                  f"{res['take_all', 'merge']:.2f} s | sweep: all expire {res['sweep', 'all']:.2f} s, "
                  f"none expire (whole-map read) {res['sweep', 'none']:.2f} s")
        finally:
            prog.close()


def _v4(proto: int, payload: bytes, src: bytes, dst: bytes) -> bytes:
    return (bytes.fromhex("4500") + (20 + len(payload)).to_bytes(2, "big") + bytes.fromhex("00004000")
            + bytes([64, proto]) + b"\x00\x00" + src + dst + payload)


def _udp(sport: int, dport: int, payload: bytes) -> bytes:
    return sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\x00\x00" + payload


def tunnel_cost(repeat: int = 1_000_000, rounds: int = 5) -> None:
    """Issue 16: what decapsulation costs per packet, BPF_PROG_TEST_RUN on an existing flow (median of
    `rounds` kernel-timed runs): a plain UDP frame and a VXLAN frame (inner UDP), through the default
    build, the decap build on an interface that decapsulates, and the decap build on one that does not."""
    eth = b"\x02" * 12 + b"\x08\x00"
    a, b = bytes([10, 250, 0, 2]), bytes([10, 250, 0, 99])
    plain = eth + _v4(17, _udp(4000, 5000, b"A" * 50), a, b)
    inner = eth + _v4(17, _udp(4000, 5000, b"A" * 50), bytes([172, 16, 0, 1]), bytes([172, 16, 0, 2]))
    vxlan = eth + _v4(17, _udp(40000, 4789, b"\x08\x00\x00\x00\x00\x00\x2a\x00" + inner), a, b)
    lo = socket.if_nametoindex("lo")  # BPF_PROG_TEST_RUN's skb device
    builds = (("default build", (), None), ("decap, interface decapsulates", ("-DTUNNEL_DECAP=1",), {lo}),
              ("decap, interface does not", ("-DTUNNEL_DECAP=1",), set()))
    print(f"tunnels: classifier cost per packet (BPF_PROG_TEST_RUN, existing flow, median of {rounds} x {repeat:,})")
    print(f"  {'build':<32}{'plain UDP ns':>14}{'VXLAN ns':>10}")
    base = 0.0
    for name, flags, decap in builds:
        p = load_program(map_entries=1024, extra_cflags=flags)
        try:
            if decap is not None:
                p.set_decap_interfaces(decap)
            med = []
            for frame in (plain, vxlan):
                prog_test_run(p.ingress_fd, frame)
                med.append(sorted(prog_test_run(p.ingress_fd, frame, repeat=repeat)[1] for _ in range(rounds))[rounds // 2])
        finally:
            p.close()
        base = base or med[0]
        print(f"  {name:<32}{med[0]:>14}{med[1]:>10}   (x{med[0] / base:.2f} / x{med[1] / base:.2f} of default plain)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--packets", type=int, default=2_000_000)
    ap.add_argument("--flows", type=int, default=256, help="distinct UDP source ports (1-65535)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-datapath", action="store_true")
    ap.add_argument("--skip-drain", action="store_true")
    ap.add_argument("--skip-tunnels", action="store_true")
    args = ap.parse_args()
    if not args.skip_datapath:
        datapath(args.packets, args.flows, args.runs)
    if not args.skip_tunnels:
        tunnel_cost()
    if not args.skip_drain:
        drains([100_000, 1_000_000])


if __name__ == "__main__":
    main()
