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


@pytest.mark.root
def test_capabilities_are_checked_before_the_metrics_port_opens(tmp_path: Path) -> None:
    """`ipfixer run` without its capabilities is refused for that reason before it listens on anything:
    with the metrics port taken, the message names the capability, not the port."""
    import socket

    from ipfixer.lab import Namespaces
    from ipfixer.netns import in_netns
    from tests.cli.helpers import IPFIXER, cli_env, write_config

    if subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("setpriv (util-linux) not installed")
    with Namespaces() as spaces:
        ns = spaces.add(tag="h3c")
        taken = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": 9}],
                           metrics={"listen": f"127.0.0.1:{port}"}, lock_dir=str(tmp_path / "lock"))
        res = subprocess.run(
            ["ip", "netns", "exec", ns, "setpriv", "--inh-caps=-all", "--bounding-set=-net_admin,-bpf,-sys_admin",
             *IPFIXER, "run", "--config", str(cfg)],
            capture_output=True, text=True, timeout=60, env=cli_env())
        taken.close()
        assert res.returncode == 1, res.stderr
        assert "missing capabilities" in res.stderr and "CAP_NET_ADMIN" in res.stderr
        assert "metrics.listen" not in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "lock").exists()  # refused before the lock, the port or anything else


def test_nflog_source_needs_only_net_admin() -> None:
    assert missing_caps(1 << CAP_NET_ADMIN, need_bpf=False) == []
    assert [m.split()[0] for m in missing_caps(0, need_bpf=False)] == ["CAP_NET_ADMIN"]
