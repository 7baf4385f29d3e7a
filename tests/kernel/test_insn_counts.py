"""Every BPF program ipfixer loads has the size recorded for this kernel in bpf/insn_counts.json
(translated instructions, JITed bytes, instructions the verifier processed), so a change that grows
the verifier's work fails here and shows in review as a diff of that file (issue 11 item 4)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
VERIFIER_LIMIT = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS: processed instructions per program


def recorder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("record_insn_counts", ROOT / "tools" / "record_insn_counts.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recorded_file_is_complete() -> None:
    """Each recorded kernel names what compiled it and every program build the recorder measures."""
    rec = recorder()
    data = rec.load_recorded()
    assert data, f"{rec.COUNTS_FILE} is empty: run tools/record_insn_counts.py"
    names = {f"{build}:{entry}" for build in rec.BUILDS for entry in ("ingress", "egress")}
    for release, entry in data.items():
        assert entry["compiler"].startswith("bcc "), release
        assert set(entry["programs"]) == names, release
        for name, sizes in entry["programs"].items():
            assert set(sizes) == {"xlated_insns", "jited_bytes", "verified_insns"}, (release, name)
            assert 0 < sizes["xlated_insns"] <= sizes["verified_insns"] < VERIFIER_LIMIT, (release, name)


@pytest.mark.root
def test_programs_are_the_recorded_size() -> None:
    rec = recorder()
    release = os.uname().release
    recorded = rec.load_recorded().get(release)
    if recorded is None:
        pytest.skip(f"no instruction counts recorded for kernel {release}: run "
                    "`sudo .venv/bin/python tools/record_insn_counts.py` and commit bpf/insn_counts.json")
    measured = rec.measure()
    diff = rec.differences(recorded, measured)
    assert not diff, (
        f"BPF program sizes changed on kernel {release} (recorded with {recorded['compiler']}, now "
        f"{measured['compiler']}):\n  " + "\n  ".join(diff) + "\nIf the change is meant, record it with "
        "`sudo .venv/bin/python tools/record_insn_counts.py` and commit bpf/insn_counts.json so the review "
        "shows the new cost."
    )
