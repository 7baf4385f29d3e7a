"""Record the size of every BPF program ipfixer loads, per kernel release, in bpf/insn_counts.json.

    sudo .venv/bin/python tools/record_insn_counts.py          # measure this kernel, update its entry
    sudo .venv/bin/python tools/record_insn_counts.py --check  # compare only (exit 1 on a change)

For each program (the tc classifier's two entry points, as built by default, with sampling and with tunnel
decapsulation, and the
cgroup_skb pair) the kernel's own figures after loading it, from BPF_OBJ_GET_INFO_BY_FD: translated
instructions (what runs, bpftool's "xlated"), JITed bytes, and the instructions the verifier processed
(its budget is 1M per program). tests/kernel/test_insn_counts.py compares the running kernel's figures
with the recorded ones, so a change that grows the verifier's work shows in review as a diff of this
file. The figures depend on the kernel (the verifier, helper inlining) and on bcc's clang, both named
in the entry; other kernels' entries are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ipfixer.sources.kernel.program import BPF_DIR, ProgSize, load_program, prog_size  # noqa: E402

COUNTS_FILE = REPO / "bpf" / "insn_counts.json"
SAMPLED = 1000  # a representative -DSAMPLING_INTERVAL (a power of two would compile to a mask, not a modulo)


def _classifier(extra: tuple[str, ...]) -> Callable[[], dict[str, ProgSize]]:
    def measure() -> dict[str, ProgSize]:
        prog = load_program(map_entries=1024, ring_pages=8, extra_cflags=extra)
        try:
            return {"ingress": prog_size(prog.ingress_fd), "egress": prog_size(prog.egress_fd)}
        finally:
            prog.close()
    return measure


def _cgroup() -> dict[str, ProgSize]:
    from bcc import BPF

    source = BPF_DIR / "cgroup_skb.c"
    bpf = BPF(src_file=str(source).encode(), cflags=[f"-I{BPF_DIR}"])  # as ipfixer/enrich/cgroups.py builds it
    try:
        return {name: prog_size(bpf.load_func(f"cgroup_skb_{name}".encode(), BPF.CGROUP_SKB).fd)
                for name in ("ingress", "egress")}
    finally:
        bpf.cleanup()


BUILDS: dict[str, Callable[[], dict[str, ProgSize]]] = {
    "flow_tc.c": _classifier(()),
    f"flow_tc.c -DSAMPLING_INTERVAL={SAMPLED}": _classifier((f"-DSAMPLING_INTERVAL={SAMPLED}",)),
    "flow_tc.c -DTUNNEL_DECAP=1": _classifier(("-DTUNNEL_DECAP=1",)),  # tunnels.decap: true
    "cgroup_skb.c": _cgroup,
}


def compiler() -> str:
    """bcc's version and the LLVM it compiles with (read from this process's mappings once bcc has run)."""
    import bcc

    llvm = "unknown LLVM"
    try:
        maps = Path("/proc/self/maps").read_text()
        libs = sorted({Path(line.split()[-1]).name for line in maps.splitlines() if "libLLVM" in line})
        llvm = libs[0] if libs else llvm
    except OSError:
        pass
    return f"bcc {getattr(bcc, '__version__', '?')}, {llvm}"


def measure() -> dict[str, Any]:
    """This kernel's entry: every program's figures and what built them."""
    programs: dict[str, dict[str, int]] = {}
    for build, run in BUILDS.items():
        for entry, size in run().items():
            programs[f"{build}:{entry}"] = size.as_dict()
    return {"compiler": compiler(), "programs": programs}


def load_recorded(path: Path = COUNTS_FILE) -> dict[str, Any]:
    """kernel release -> entry, as recorded ({} if the file does not exist yet)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected an object keyed by kernel release")
    return data


def differences(recorded: dict[str, Any], measured: dict[str, Any]) -> list[str]:
    """One line per program whose figures changed, appeared or disappeared."""
    old, new = recorded.get("programs", {}), measured["programs"]
    out = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            fields = sorted(set(old.get(name, {})) | set(new.get(name, {})))
            change = ", ".join(f"{f} {old.get(name, {}).get(f, '-')} -> {new.get(name, {}).get(f, '-')}"
                               for f in fields if old.get(name, {}).get(f) != new.get(name, {}).get(f))
            out.append(f"{name}: {change}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the recorded entry, write nothing")
    args = ap.parse_args(argv)
    release = os.uname().release
    data = load_recorded()
    measured = measure()
    diff = differences(data.get(release, {}), measured)
    if args.check:
        for line in diff:
            print(line)
        return 1 if diff else 0
    data[release] = measured
    COUNTS_FILE.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{COUNTS_FILE}: {release} ({measured['compiler']}): {len(measured['programs'])} programs"
          + ("".join(f"\n  {line}" for line in diff) if diff else ", unchanged"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
