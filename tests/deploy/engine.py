"""A private docker engine for tests: Debian's dockerd started so that it leaves the host as it found it.

dockerd by default loads br_netfilter, sets net.bridge.bridge-nf-call-iptables=1, turns on IP forwarding,
sets the iptables FORWARD policy to DROP and adds a docker0 bridge: that silently breaks every namespace
lab on the machine that bridges traffic. Here it runs with --iptables=false --ip6tables=false
--bridge=none --ip-forward=false --ip-masq=false (containers use the host network anyway), with its own
data-root, exec-root, pidfile, socket and an empty config file under one temp directory, and
`host_firewall_state()` lets a test prove that nothing of the host's changed.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # Debian's CLI (20.10), not whatever else is first on PATH
COMPOSE = "/usr/bin/docker-compose"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv4/conf/all/forwarding",
           "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
           "net/bridge/bridge-nf-call-arptables")


class EngineUnavailable(Exception):
    """No docker engine can run here (binaries missing, or dockerd refused to start); carries why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _cmd(*args: str, timeout: float = 30) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    return f"rc={res.returncode}\n{res.stdout}{res.stderr}"


def host_firewall_state() -> dict[str, str]:
    """What dockerd is known to change on a host: forwarding and bridge-netfilter sysctls, whether
    br_netfilter is loaded, every iptables/ip6tables table (policies and rules), the nftables tables
    and the set of bridge interfaces."""
    state: dict[str, str] = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        state[f"sysctl {name}"] = path.read_text().strip() if path.exists() else "(absent)"
    state["br_netfilter loaded"] = str(os.path.isdir("/sys/module/br_netfilter"))
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            state[f"{tool} -t {table}"] = _cmd(tool, "-w", "5", "-t", table, "-S") if shutil.which(tool) else "-"
    state["nft list tables"] = _cmd("nft", "list", "tables")
    state["bridges"] = " ".join(sorted(os.path.basename(p) for p in glob.glob("/sys/class/net/*/bridge")))
    return state


@dataclass
class Engine:
    """A running private dockerd: `env` points docker, docker-compose (and DOCKER_HOST users) at it."""

    root: Path
    pid: int
    env: dict[str, str]
    log: Path

    def docker(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=self.env,
                             check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        return res


def _missing() -> str | None:
    for path in (DOCKERD, DOCKER, COMPOSE, "/usr/sbin/debootstrap"):
        if not os.access(path, os.X_OK):
            return f"{path} not installed (setup.sh installs docker.io, docker-compose, debootstrap)"
    if os.geteuid() != 0:
        return "dockerd needs root"
    return None


def _unmount_under(root: Path) -> None:
    """Lazily unmount whatever dockerd left mounted under its temp directory (overlays, shm, netns)."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mnt in sorted((m for m in mounts if m.startswith(str(root) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=10, check=False)


@contextmanager
def private_engine() -> Iterator[Engine]:
    """Start dockerd under a temp directory without touching the host's firewall; stop it (by its own
    pid), unmount and remove everything on exit. EngineUnavailable if it cannot start here."""
    reason = _missing()
    if reason:
        raise EngineUnavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="ipfxh7dk.", dir="/tmp"))
    config = root / "daemon.json"
    config.write_text("{}\n")
    sock = root / "docker.sock"
    log = root / "dockerd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env.update({"DOCKER_HOST": f"unix://{sock}", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "DOCKER_CONFIG": str(root / "client")})
    cmd = [DOCKERD, "--config-file", str(config), "--data-root", str(root / "data"),
           "--exec-root", str(root / "exec"), "--pidfile", str(root / "docker.pid"), "--host", f"unix://{sock}",
           "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-forward=false", "--ip-masq=false",
           "--userland-proxy=false", "--log-level=warn"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    engine = Engine(root, proc.pid, env, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise EngineUnavailable(f"dockerd exited {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
            if sock.exists() and engine.docker("version", timeout=10, check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise EngineUnavailable(f"dockerd not ready in {START_TIMEOUT_S}s: {log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.2)
        yield engine
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # dockerd stops its containers and its managed containerd
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
