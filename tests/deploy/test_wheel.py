"""`pip install .` (not editable) gives a working ipfixer: the wheel carries templates/, bpf/ and config/.

The wheel is built from this checkout, installed into a fresh venv (its dependencies are taken from the
test venv's site-packages through a .pth file, so no index is needed for them; building uses pip's
isolated build environment) and run from a directory outside the checkout: `check`, `templates`, and
`run` in a namespace lab with exact counts at a real UDP socket, which needs the packaged C sources.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfixer.lab import Lab
from tests.cli.helpers import UdpCollector, cli_env, totals_by_flow, write_config

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    env = cli_env()
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(venv, an empty working directory outside the checkout) with the freshly built wheel installed."""
    base = tmp_path_factory.mktemp("h7wheel")
    wheels, venv, work = base / "wheels", base / "venv", base / "work"
    work.mkdir()
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], base)
    assert res.returncode == 0, res.stderr
    (wheel,) = wheels.glob("ipfixer-*.whl")
    res = _run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], base)
    assert res.returncode == 0, res.stderr
    # Dependencies from the test venv, after the new venv's own site-packages (a plain path line: the test
    # venv's editable-install hook is a .pth there and is not processed from a path added this way).
    site = Path(_run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     base).stdout.strip())
    (site / "zz_ipfixer_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    res = _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], base)
    assert res.returncode == 0, res.stderr
    yield venv, work


def test_wheel_carries_and_uses_the_shared_directories(installed: tuple[Path, Path]) -> None:
    venv, work = installed
    code = ("import ipfixer, ipfixer.cli as c, ipfixer.templates as t, ipfixer.sources.kernel.program as p;"
            "print(ipfixer.__file__); print(c.DEFAULT_CONFIG); print(t.DEFAULT_TEMPLATES_DIR); print(p.PROGRAM_FILE)")
    res = _run([str(venv / "bin/python"), "-c", code], work)
    assert res.returncode == 0, res.stderr
    pkg, config, templates, program = (Path(line) for line in res.stdout.split())
    assert venv in pkg.parents and ROOT not in pkg.parents  # the wheel's ipfixer, not the checkout's
    share = pkg.parent / "_share"
    assert config == share / "config" / "ipfixer.yaml" and config.is_file()
    assert templates == share / "templates" and (templates / "ipv4_flow.yaml").is_file()
    assert program == share / "bpf" / "flow_tc.c" and (share / "bpf" / "flow_types.h").is_file()
    for name in ("templates", "bpf", "config"):  # the copies are exactly the checkout's files
        ours = sorted(p.relative_to(ROOT / name) for p in (ROOT / name).rglob("*") if p.is_file())
        theirs = sorted(p.relative_to(share / name) for p in (share / name).rglob("*") if p.is_file())
        assert theirs == ours
        for rel in ours:
            assert (share / name / rel).read_bytes() == (ROOT / name / rel).read_bytes()


def test_check_and_templates_outside_the_checkout(installed: tuple[Path, Path]) -> None:
    venv, work = installed
    res = _run([str(venv / "bin/ipfixer"), "check"], work)  # the packaged default config
    assert res.returncode == 0, res.stderr
    res = _run([str(venv / "bin/ipfixer"), "templates"], work)
    assert res.returncode == 0, res.stderr
    for name, tid in (("ipv4_flow", 256), ("ipv6_flow", 257)):
        assert any(name in line and str(tid) in line for line in res.stdout.splitlines()), res.stdout
    bad = work / "bad.yaml"
    bad.write_text("collectors: [{address: 127.0.0.1, port: 99999}]\n")
    res = _run([str(venv / "bin/ipfixer"), "check", str(bad)], work)
    assert res.returncode == 2 and "port" in res.stderr and "99999" in res.stderr


@pytest.mark.root
def test_run_from_the_wheel_exports_exact_counts(installed: tuple[Path, Path], tmp_path: Path) -> None:
    venv, work = installed
    with Lab(ns_a=f"ipfxh7A{os.getpid() % 10000}", ns_b=f"ipfxh7B{os.getpid() % 10000}",
             veth_a=f"ipfxh7a{os.getpid() % 10000}", veth_b=f"ipfxh7b{os.getpid() % 10000}") as lab:
        coll = UdpCollector(netns=lab.ns_a)
        cfg = write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": coll.port}],
                           interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(tmp_path / "lock"),
                           timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"})
        log = tmp_path / "ipfixer.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(["ip", "netns", "exec", lab.ns_a, str(venv / "bin/ipfixer"), "run", "--config",
                                     str(cfg)], cwd=work, stdout=subprocess.DEVNULL, stderr=err, env=_env())
        try:
            deadline = time.monotonic() + 90
            while b"msg=started" not in log.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert b"msg=started" in log.read_bytes(), log.read_text(errors="replace")
            lab.send_udp(lab.ns_b, lab.v4_a, 40071, 9071, [100] * 5 + [20] * 2)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait(5)
        assert rc == 0, log.read_text(errors="replace")
        coll.receive(5, until_idle=1.0)
        coll.close()
        totals = totals_by_flow(coll.flow_records())
        assert totals[(lab.v4_b, lab.v4_a, 40071, 9071, 17)] == [7, 5 * 128 + 2 * 48]
