import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipfixer.caps import CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN, effective_caps, missing_caps


def test_missing_caps_named() -> None:
    assert missing_caps((1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN)) == []
    assert missing_caps((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)) == []
    missing = missing_caps(1 << CAP_BPF)
    assert [m.split()[0] for m in missing] == ["CAP_PERFMON", "CAP_NET_ADMIN"]


def test_effective_caps_of_this_process() -> None:
    caps = effective_caps(Path("/proc/self/status").read_text())
    if os.geteuid() == 0:
        assert caps & (1 << CAP_NET_ADMIN)


@pytest.mark.root
def test_capsh_drop_reports_missing() -> None:
    """A process without CAP_NET_ADMIN/CAP_BPF is told which capability is missing."""
    if subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("setpriv (util-linux) not installed")
    code = "from ipfixer.caps import check_capabilities; check_capabilities()"
    res = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin,-bpf,-sys_admin", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode != 0
    assert "CAP_NET_ADMIN" in res.stderr and "CAP_BPF" in res.stderr
