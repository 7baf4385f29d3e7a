"""Conntrack at router scale (issue 15), every figure a ratio against a baseline measured in the same run:

1. dump rate: ipfixer's batched ctnetlink parser vs `conntrack -L` (libnetfilter_conntrack, printing
   to /dev/null) vs decoding each message with pyroute2's nfct_msg (the previous path, on a sample);
2. table build and the vectorised join (flows matched per second);
3. event throughput: NEW events read and decoded per second while the kernel creates entries;
4. drain cycle (enrich + encode + send a batch of flows of the table's connections) with enrichment
   on vs off, and on while a resync of the whole table runs in the sync thread.

The table is filled in a namespace of its own (ipfxh5b<pid>) by batched IPCTNL_MSG_CT_NEW requests.
--entries 1000000 raises net.netfilter.nf_conntrack_max (a global sysctl) for the run and restores it.

Run: sudo .venv/bin/python benchmarks/conntrack.py [--entries 100000] [--flows 100000]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from timing import best

from ipfixer.config import Config
from ipfixer.enrich.conntrack import ConntrackTable, CtIndex
from ipfixer.enrich.ctnetlink import (
    NFNL_SUBSYS_CTNETLINK,
    dump_conntrack,
    dump_request,
    insert_entries,
    new_seq,
    open_ctnetlink,
)
from ipfixer.enrich.ctsync import ConntrackSync
from ipfixer.enrich.events import ConntrackEvents
from ipfixer.export.factory import build_exporter
from ipfixer.model import ETH_P_IP, empty_batch

MAX_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_max"




def tuples(n: int, base: int = 0) -> list[tuple[int, bytes, bytes, int, int, int]]:
    """n distinct UDP/TCP IPv4 tuples 10.64.0.0/10 -> 192.0.2.1 (no NAT), SEEN_REPLY on half."""
    out = []
    for j in range(base, base + n):
        src = bytes([10, 64 + ((j >> 24) & 0x3F), (j >> 16) & 0xFF, (j >> 8) & 0xFF])
        out.append((17 if j % 3 else 6, src, bytes([192, 0, 2, 1]), 1024 + (j & 0xFF), 53, 2 * (j & 1)))
    return out


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def pyroute2_rate(ns: str, sample: int) -> float:
    """Entries/s of the previous path: every message of a dump decoded with pyroute2's nfct_msg (on the
    first `sample` messages only: the whole table would take minutes)."""
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    sock = open_ctnetlink(ns)
    try:
        seq = new_seq()
        sock.send(dump_request(seq))
        datagrams: list[bytes] = []
        n = 0
        while n < sample:
            ready, _, _ = __import__("select").select([sock], [], [], 5)
            if not ready:
                break
            data = sock.recv(1 << 20)
            datagrams.append(data)
            n += data.count(bytes([NFNL_SUBSYS_CTNETLINK]))  # rough; exact count below
        t = time.perf_counter()
        decoded = 0
        for data in datagrams:
            off = 0
            while off + 16 <= len(data) and decoded < sample:
                length = int.from_bytes(data[off : off + 4], "little")
                mtype = int.from_bytes(data[off + 4 : off + 6], "little")
                if length < 16:
                    break
                if mtype >> 8 == NFNL_SUBSYS_CTNETLINK:
                    msg = nfct_msg(data[off : off + length])
                    msg.decode()
                    decoded += 1
                off += (length + 3) & ~3
        return decoded / (time.perf_counter() - t)
    finally:
        sock.close()


def flows_of(table_rows: np.ndarray, n: int) -> np.ndarray:
    """A drain batch: n flows, each the origin direction of one of the table's connections."""
    rows = table_rows[:n]
    batch = empty_batch(len(rows))
    batch["ethertype"] = ETH_P_IP
    batch["protocol"] = rows["proto"]
    batch["src_addr"], batch["dst_addr"] = rows["o_src"], rows["o_dst"]
    batch["src_port"], batch["dst_port"] = rows["o_sport"], rows["o_dport"]
    batch["packets"], batch["octets"] = 3, 300
    batch["start_ms"], batch["end_ms"] = 1_700_000_000_000, 1_700_000_001_000
    return batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=50_000)
    args = ap.parse_args()
    ns = f"ipfxh5b{__import__('os').getpid() % 100000}"
    old_max = int(Path(MAX_SYSCTL).read_text())
    print(f"machine: {__import__('os').cpu_count()} CPUs, shared with other work; best of 3 where repeated")
    sh("ip", "netns", "add", ns)
    try:
        if args.entries + args.events > old_max:
            Path(MAX_SYSCTL).write_text(str(args.entries + args.events + 1024))
        filler = open_ctnetlink(ns)
        t = time.perf_counter()
        insert_entries(filler, tuples(args.entries))
        fill_s = time.perf_counter() - t
        dump_sock = open_ctnetlink(ns)
        rows = dump_conntrack(dump_sock, 600)
        n = len(rows)
        print(f"table: {n} entries (filled in {fill_s:.2f}s by batched IPCTNL_MSG_CT_NEW)")

        # 1. dump rate
        ours = best(lambda: dump_conntrack(dump_sock, 600))
        cli = best(lambda: subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-L"], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, check=True, timeout=600))  # fmt: skip
        p2 = pyroute2_rate(ns, min(n, 5000))
        print(f"dump:  ipfixer {n / ours:,.0f} entries/s ({ours:.2f}s) | conntrack -L {n / cli:,.0f} entries/s "
              f"({cli:.2f}s) | ratio ipfixer/conntrack-L {cli / ours:.2f} | pyroute2 nfct_msg {p2:,.0f} entries/s "
              f"(ipfixer {n / ours / p2:.0f}x)")  # fmt: skip

        # 2. index build and vectorised join
        build = best(lambda: CtIndex(rows))
        idx = CtIndex(rows)
        batch = flows_of(rows, min(args.flows, n))
        from ipfixer.enrich.conntrack import flow_key_words

        join = best(lambda: idx.lookup(flow_key_words(batch)))
        found = int((idx.lookup(flow_key_words(batch))[0] >= 0).sum())
        print(f"index: built in {build:.2f}s ({n / build:,.0f} entries/s); join {len(batch) / join:,.0f} flows/s "
              f"({found}/{len(batch)} matched)")  # fmt: skip

        # 3. event throughput
        events = ConntrackEvents(netns=ns, capacity=args.events * 2, kinds=("new",), rcvbuf=64 << 20)
        done = threading.Event()
        got = 0

        def reader() -> None:
            nonlocal got
            while not done.is_set() or events.poll(0.05):
                got += events.poll(0.05)
                events.drain()
                events.take_rows()

        th = threading.Thread(target=reader)
        th.start()
        t = time.perf_counter()
        insert_entries(filler, tuples(args.events, base=args.entries + 1))
        deadline = time.monotonic() + 120
        while got < args.events and time.monotonic() < deadline and events.overruns == 0:
            time.sleep(0.01)
        ev_s = time.perf_counter() - t
        done.set()
        th.join()
        print(f"events: {got} of {args.events} NEW events read in {ev_s:.2f}s ({got / ev_s:,.0f} events/s, "
              f"including the kernel creating them); overruns {events.overruns}")  # fmt: skip
        events.close()

        # 4. drain cycle: enrich + encode + send, enrichment on vs off (vs on during a resync)
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        cfg = Config.model_validate({"collectors": [{"address": "127.0.0.1", "port": sink.getsockname()[1]}],
                                     "templates": {"ipv4": "ipv4_nat_flow", "ipv6": "ipv6_nat_flow"}})  # fmt: skip
        exporter = build_exporter(cfg, time.time_ns())
        table = ConntrackTable(max_entries=4 * n, netns=ns)
        table.refresh()

        def cycle(enrich: bool) -> None:
            b = batch.copy()
            if enrich:
                table.enrich(b)
            exporter.export(b, time.time_ns())

        off = best(lambda: cycle(False))
        on = best(lambda: cycle(True))
        sync = ConntrackSync(table, None, resync_interval_s=0.0)  # back-to-back resyncs: the worst case
        sync.start()
        sync.first_dump.wait(120)  # the worker process is up and has dumped once
        first = sync.resyncs
        during, cpu = [], []
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and (sync.resyncs - first < 3 or len(during) < 5):
            t, c = time.perf_counter(), time.thread_time()
            cycle(True)
            during.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        resyncs = sync.resyncs - first
        sync.stop()
        print(f"drain cycle, {len(batch)} flows: enrichment off {off * 1e3:.0f} ms | on {on * 1e3:.0f} ms "
              f"(x{on / off:.2f}) | on during back-to-back resyncs of {n} entries ({resyncs} meanwhile, dump, "
              f"decode and index in the worker process): median {np.median(during) * 1e3:.0f} ms, max "
              f"{max(during) * 1e3:.0f} ms (x{np.median(during) / on:.2f} of on), the drain thread's own CPU "
              f"median {np.median(cpu) * 1e3:.0f} ms")  # fmt: skip
        exporter.close()
        sink.close()
        table.close()
        filler.close()
        dump_sock.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60, check=False)
        if int(Path(MAX_SYSCTL).read_text()) != old_max:
            Path(MAX_SYSCTL).write_text(str(old_max))
    return 0


if __name__ == "__main__":
    sys.exit(main())
