"""Cost of issue 16's export-time work, as ratios to encoding the same uniflow batch into IPFIX messages
(the baseline, measured in the same run): VRF/sampling annotation, and biflow pairing + encoding.

Run: .venv/bin/python benchmarks/export_extras.py [uniflows]
"""

from __future__ import annotations

import sys

import numpy as np
from timing import best

from ipfixer.export.annotate import annotate
from ipfixer.export.biflow import BiflowPairer
from ipfixer.export.factory import BIFLOW_TEMPLATES
from ipfixer.export.session import ExportSession
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, VrfTable, empty_batch
from ipfixer.templates import load_templates


def uniflows(n: int) -> np.ndarray:
    """n IPv4 TCP uniflows on 64 interfaces: n/2 connections, both directions, reply 1 ms later."""
    b = empty_batch(n)
    i = np.arange(n)
    conn, reply = i // 2, i % 2 == 1
    b["ethertype"], b["protocol"], b["ifindex"] = ETH_P_IP, 6, conn % 64 + 1
    b["ingress_if"] = np.where(reply, 0, b["ifindex"])
    b["egress_if"] = np.where(reply, b["ifindex"], 0)
    b["src_addr"][:, 10:12] = 0xFF
    b["dst_addr"][:, 10:12] = 0xFF
    client = (conn.astype(np.uint32) + 0x0A000000).view(np.uint8).reshape(n, 4)[:, ::-1]
    server = np.tile(np.array([192, 0, 2, 1], np.uint8), (n, 1))
    b["src_addr"][:, 12:] = np.where(reply[:, None], server, client)
    b["dst_addr"][:, 12:] = np.where(reply[:, None], client, server)
    b["src_port"] = np.where(reply, 443, 1024 + conn % 60000)
    b["dst_port"] = np.where(reply, 1024 + conn % 60000, 443)
    b["packets"], b["octets"] = 10, 5000
    b["start_ms"] = 1_790_000_000_000 + conn + reply
    b["end_ms"] = b["start_ms"] + 100
    return b




def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    t = load_templates()
    now = 1_790_000_001 * 10**9
    uni = {ETH_P_IP: t["ipv4_flow"], ETH_P_IPV6: t["ipv6_flow"]}
    bi = {e: t[name] for e, name in BIFLOW_TEMPLATES.items()}
    batch = uniflows(n)
    vrfs = VrfTable({i: 1000 + i % 4 for i in range(1, 65)}, {})

    def encode_uni() -> None:
        s = ExportSession("ipfix", 1, uni, boot_wall_ns=now - 10**9)
        sum(len(m.data) for m in s.iter_messages(batch, now))

    def annotate_vrf() -> None:
        annotate(batch, vrfs=vrfs, sampling_interval=1)

    def pair_and_encode() -> None:
        s = ExportSession("ipfix", 1, bi, boot_wall_ns=now - 10**9)
        out = BiflowPairer(15 * 10**9).add(batch, now)
        assert len(out) == n // 2
        sum(len(m.data) for m in s.iter_messages(out, now))

    base = best(encode_uni)
    print(f"{n:,} uniflows; machine shared with other jobs: ratios are of one run")
    print(f"baseline: encode as uniflow IPFIX      {base * 1e3:8.1f} ms  ({n / base / 1e6:.2f} M records/s)")
    for name, fn in (("VRF + sampling annotation", annotate_vrf), ("biflow pairing + encode", pair_and_encode)):
        dt = best(fn)
        print(f"{name:38s} {dt * 1e3:8.1f} ms  ratio to baseline {dt / base:.2f}")


if __name__ == "__main__":
    main()
