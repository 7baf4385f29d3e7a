"""Reading a capture: ipfixer.sources.capture (validate the whole file, then iterate) vs scapy's RawPcapReader
(what replay used before), and the config loader's refusal of a YAML bomb vs loading the shipped config.
Ratios in the same run, best of several; the machine may be shared, so compare ratios, not times.

Run: .venv/bin/python benchmarks/capture_read.py [packets]
"""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

from timing import best

from ipfixer.config import load_config
from ipfixer.errors import ConfigLimitError
from ipfixer.sources.capture import CaptureFile


def write_pcap(path: Path, packets: int) -> None:
    """A µs pcap of `packets` 60-byte Ethernet/IPv4/UDP frames."""
    frame = bytes.fromhex("020000000002020000000001" "0800" "45000024000100004011f8c00a0000010a000002"
                          "13881389001000000000000000000000") + b"\x00" * 6
    rec = bytearray()
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for i in range(packets):
        rec = struct.pack("<IIII", 1_700_000_000 + i // 1000, (i % 1000) * 1000, len(frame), len(frame))
        out += rec + frame
    path.write_bytes(bytes(out))




def main() -> None:
    packets = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.pcap"
        write_pcap(path, packets)

        def ours() -> int:
            with CaptureFile(path) as cap:
                return sum(len(p.data) for p in cap)

        def scapy_reader() -> int:
            from scapy.utils import RawPcapReader

            with RawPcapReader(str(path)) as r:
                return sum(len(data) for data, _ in r)

        assert ours() == scapy_reader()
        t_ours, t_scapy = best(ours), best(scapy_reader)
        print(f"read {packets} packets: ipfixer.sources.capture {packets / t_ours / 1e6:.2f} M/s (validation included), "
              f"scapy RawPcapReader {packets / t_scapy / 1e6:.2f} M/s; ratio {t_scapy / t_ours:.2f}x")

        shipped = Path(__file__).resolve().parents[1] / "config" / "ipfixer.yaml"
        bomb = Path(d) / "bomb.yaml"
        levels = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        levels += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
        bomb.write_text("collectors: [{address: 127.0.0.1}]\n" + "\n".join(levels) + "\nx: *l8\n")

        def refuse() -> None:
            try:
                load_config(bomb, env={})
            except ConfigLimitError:
                return
            raise AssertionError("the bomb loaded")

        t_good, t_bomb = best(lambda: load_config(shipped, env={}), 5), best(refuse, 5)
        print(f"config: shipped file loads in {t_good * 1e3:.1f} ms, a 1.1 KB billion-laughs file is refused in "
              f"{t_bomb * 1e3:.1f} ms (ratio {t_bomb / t_good:.2f})")


if __name__ == "__main__":
    main()
