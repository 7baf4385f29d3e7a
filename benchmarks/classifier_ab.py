"""The classifier of another git revision against this checkout's, side by side under BPF_PROG_TEST_RUN.

    sudo .venv/bin/python benchmarks/classifier_ab.py [--decap] REV [REV...]

Each revision's bpf/ is compiled into a temporary directory and loaded next to the working tree's; the
programs are measured interleaved (a shared machine drifts) on an existing IPv4 and IPv6 UDP flow.
Reports the translated (xlated) instruction count, the verifier's processed instructions and the median
ns/run, so a parser change shows its cost as a ratio against the baseline measured in the same run.
--decap: the TUNNEL_DECAP builds (loopback, BPF_PROG_TEST_RUN's device, decapsulating) and a VXLAN frame too.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ipfixer.sources.kernel.program as program  # noqa: E402

V4 = (bytes.fromhex("02" * 12 + "0800") + bytes.fromhex("4500002e00004000401100000afa00020afa0063") + bytes(8)
      + b"A" * 18)
V6 = (bytes.fromhex("02" * 12 + "86dd") + bytes.fromhex("6000000000121140") + bytes(15) + b"\x01" + bytes(15)
      + b"\x02" + bytes.fromhex("0001000200120000") + b"B" * 10)
# VXLAN (VNI 42) carrying an Ethernet frame with V4's IPv4/UDP packet
VXLAN = (bytes.fromhex("02" * 12 + "0800") + bytes.fromhex("4500006000004000401100000afa00020afa0063")
         + bytes.fromhex("9c4012b5004c0000") + bytes.fromhex("0800000000002a00") + V4)
BPF_FILES = ("flow_tc.c", "flow_parse.h", "flow_types.h")


def prog_info(fd: int) -> tuple[int, int]:
    """(xlated instructions, verified instructions) from struct bpf_prog_info."""
    buf = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(256)
    if program.libbpf().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)) != 0:
        return 0, 0
    return struct.unpack_from("<I", buf.raw, 20)[0] // 8, struct.unpack_from("<I", buf.raw, 216)[0]


def counter_count(bpf_dir: Path) -> int:
    """Entries of enum ipfixer_counter before CNT_MAX in that revision's flow_types.h."""
    text = (bpf_dir / "flow_types.h").read_text()
    body = text[text.index("enum ipfixer_counter"):text.index("CNT_MAX")]
    return sum(1 for line in body.splitlines() if line.strip().startswith("CNT_"))


def load_from(bpf_dir: Path, decap: bool = False) -> program.LoadedProgram:
    names = program.COUNTER_NAMES
    program.BPF_DIR, program.PROGRAM_FILE = bpf_dir, bpf_dir / "flow_tc.c"
    try:
        program.COUNTER_NAMES = names[: counter_count(bpf_dir)]
        flags = ("-DTUNNEL_DECAP=1",) if decap else ()
        prog = program.load_program(map_entries=1024, ring_pages=8, extra_cflags=flags)
        if decap and "decap_ifaces" in (bpf_dir / "flow_tc.c").read_text():
            prog.set_decap_interfaces({socket.if_nametoindex("lo")})  # else that revision decapsulates everywhere
        return prog
    finally:
        program.COUNTER_NAMES = names


def main(revs: list[str], rounds: int = 9, repeat: int = 1_000_000, decap: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="ipfx-ab-") as tmp:
        dirs = {}
        for rev in revs:
            d = Path(tmp) / rev.replace("/", "_")
            d.mkdir()
            for f in BPF_FILES:
                src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:bpf/{f}"], capture_output=True,
                                     check=True, timeout=30).stdout
                (d / f).write_bytes(src)
            dirs[rev] = d
        dirs["working tree"] = REPO / "bpf"
        progs = {name: load_from(d, decap) for name, d in dirs.items()}
        frames = {"v4": V4, "v6": V6, **({"vxlan": VXLAN} if decap else {})}
        try:
            times: dict[tuple[str, str], list[int]] = {(n, f): [] for n in progs for f in frames}
            for _ in range(rounds):
                for fname, frame in frames.items():
                    for name, p in progs.items():
                        program.prog_test_run(p.ingress_fd, frame)
                        times[(name, fname)].append(program.prog_test_run(p.ingress_fd, frame, repeat=repeat)[1])
            base = revs[0]
            print(f"classifier under BPF_PROG_TEST_RUN, median of {rounds} x {repeat} runs, interleaved")
            for name, p in progs.items():
                xl, verified = prog_info(p.ingress_fd)
                meds = {f: sorted(times[(name, f)])[rounds // 2] for f in frames}
                ratio = {f: meds[f] / max(1, sorted(times[(base, f)])[rounds // 2]) for f in meds}
                cols = "  ".join(f"{f} {meds[f]:>4} ns ({ratio[f]:.2f}x)" for f in frames)
                print(f"  {name:<14} {xl:>5} insns ({verified:>6} verified)  {cols}")
        finally:
            for p in progs.values():
                p.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    with_decap = "--decap" in args
    args = [a for a in args if a != "--decap"]
    if not args:
        sys.exit(__doc__)
    main(args, decap=with_decap)
