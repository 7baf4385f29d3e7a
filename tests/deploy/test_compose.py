"""docker-compose.yml with Debian 12's own Docker (docker.io 20.10, docker-compose 1.29), end to end.

A private dockerd (tests/deploy/engine.py: no iptables, no bridge, no forwarding, everything under a temp
directory) builds the images from a base made by deploy/base-image.sh (debootstrap from this machine's apt
sources: no registry needed; cached per day), pip trusting the machine's CA bundle through the documented
build secret. `docker-compose up` runs ipfixer and nfcapd on the host network; the test sends known UDP
flows over a veth of its own, finds exactly those flows with nfdump inside the nfcapd container, checks
that `docker-compose down` leaves none of ipfixer's tc filters or qdiscs behind, and that the host's
forwarding/bridge-netfilter sysctls, iptables tables and nftables tables are as they were.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ipfixer.lab import Namespaces, ip, read_sys, sh, static_neighbour
from ipfixer.netns import socket_in_netns
from tests.cli.helpers import IPFIXER, cli_env, ctl_socket
from tests.collectors import free_udp_port
from tests.conftest import REQUIRE
from tests.deploy.engine import COMPOSE, Engine, EngineUnavailable, host_firewall_state, private_engine

pytestmark = [pytest.mark.root, pytest.mark.timeout(540)]

ROOT = Path(__file__).resolve().parents[2]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SUFFIX = f"h7{os.getpid() % 10000}"
NS, HOST_DEV, PEER_DEV = f"ipfx{SUFFIX}N", f"ipfx{SUFFIX}h", f"ipfx{SUFFIX}p"


def _free_subnet() -> int:
    """A 10.247.N.0/30 that no route on the host uses yet."""
    routes = ip("-4", "route", "show", "table", "all").stdout
    for n in range(7, 250):
        if f"10.247.{n}." not in routes:
            return n
    raise AssertionError("no free 10.247.N.0/30 on this host")


@contextmanager
def engine_or_skip() -> Iterator[Engine]:
    """The private engine; a skip only where none can start (never in CI: IPFIXER_REQUIRE_KERNEL_TESTS)."""
    try:
        with private_engine() as eng:
            yield eng
    except EngineUnavailable as exc:
        if REQUIRE:
            raise
        pytest.skip(f"no docker engine can start here: {exc.reason}")


@pytest.fixture
def veth() -> Iterator[tuple[str, str]]:
    """(host address, namespace address) on a veth pair: HOST_DEV in the host's namespace, its peer in a
    namespace of the test's own; IPv6 off and static neighbours, so the only packets are the test's."""
    n = _free_subnet()
    host_ip, peer_ip = f"10.247.{n}.1", f"10.247.{n}.2"
    spaces = Namespaces()
    try:
        spaces.add(NS)
        ip("link", "add", HOST_DEV, "type", "veth", "peer", "name", PEER_DEV, "netns", NS)
        Path(f"/proc/sys/net/ipv6/conf/{HOST_DEV}/disable_ipv6").write_text("1")
        sh("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1", netns=NS)
        ip("addr", "add", f"{host_ip}/30", "dev", HOST_DEV)
        ip("-n", NS, "addr", "add", f"{peer_ip}/30", "dev", PEER_DEV)
        ip("link", "set", HOST_DEV, "up")
        ip("-n", NS, "link", "set", PEER_DEV, "up")
        host_mac = Path(f"/sys/class/net/{HOST_DEV}/address").read_text().strip()
        peer_mac = read_sys(NS, f"/sys/class/net/{PEER_DEV}/address")
        ip("neigh", "replace", peer_ip, "lladdr", peer_mac, "dev", HOST_DEV, "nud", "permanent")
        static_neighbour(NS, PEER_DEV, host_ip, host_mac)
        yield host_ip, peer_ip
    finally:
        spaces.close()  # takes the veth pair with it
        ip("link", "del", HOST_DEV, check=False)


def _compose(eng: Engine, env: dict[str, str], *args: str, timeout: float = 120) -> str:
    res = subprocess.run([COMPOSE, "--no-ansi", "-p", f"ipfx{SUFFIX}", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"docker-compose {' '.join(args)}:\n{res.stdout}{res.stderr}"
    return res.stdout


def _send(host_ip: str, peer_ip: str) -> dict[tuple[str, str, int, int], tuple[int, int]]:
    """Two UDP flows, one each way, received by real sockets (no ICMP errors); the expected
    (packets, IP-layer octets) of each."""
    sport, dport = 40000 + os.getpid() % 1000, 9000 + os.getpid() % 1000
    far = socket_in_netns(NS, socket.AF_INET, socket.SOCK_DGRAM)
    near = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        far.bind((peer_ip, dport))
        near.bind((host_ip, sport))
        far.settimeout(5)
        near.settimeout(5)
        for _ in range(5):
            near.sendto(b"o" * 100, (peer_ip, dport))
        for _ in range(3):
            far.sendto(b"i" * 300, (host_ip, sport))
        for _ in range(5):
            far.recv(2048)
        for _ in range(3):
            near.recv(2048)
    finally:
        far.close()
        near.close()
    return {(host_ip, peer_ip, sport, dport): (5, 5 * 128), (peer_ip, host_ip, dport, sport): (3, 3 * 328)}


def _ipfixer_tc_state(dev: str) -> str:
    out = []
    for what in (("qdisc", "show", "dev", dev), ("filter", "show", "dev", dev, "ingress"),
                 ("filter", "show", "dev", dev, "egress")):
        out.append(subprocess.run(["tc", *what], capture_output=True, text=True, timeout=10).stdout)
    return "\n".join(out)


def test_compose_up_meters_exports_and_cleans_up(veth: tuple[str, str], tmp_path: Path) -> None:
    before = host_firewall_state()
    with engine_or_skip() as engine:
        during = _compose_run(engine, veth, tmp_path)
    after = host_firewall_state()  # and once the engine is gone
    for state in (during, after):
        changed = {k: (before[k], state[k]) for k in before if before[k] != state[k]}
        assert not changed, changed


def _compose_run(engine: Engine, veth: tuple[str, str], tmp_path: Path) -> dict[str, str]:
    """Build, up, traffic, exact flows at nfdump, down, nothing left on the veth; the host's firewall
    state while the engine still runs."""
    host_ip, peer_ip = veth
    env = dict(engine.env)
    res = subprocess.run([str(ROOT / "deploy/base-image.sh"), "ipfixer-base:bookworm"], capture_output=True,
                         text=True, timeout=420, env={**env, "DOCKER": "/usr/bin/docker"})
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(ROOT / "deploy/build-images.sh")], capture_output=True, text=True, timeout=420,
                         env={**env, "DOCKER": "/usr/bin/docker", "BASE_IMAGE": "ipfixer-base:bookworm",
                              "IPFIXER_PIP_CA": CA_BUNDLE})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    port = free_udp_port()
    (tmp_path / "run").mkdir()
    (tmp_path / "flows").mkdir()
    cfg = tmp_path / "ipfixer.yaml"
    cfg.write_text(json.dumps({
        "collectors": [{"address": "127.0.0.1", "port": port}], "metrics": {"listen": None},
        "interfaces": {"include": [HOST_DEV], "exclude": []},
        "timeouts": {"active": "60s", "idle": "30s", "drain_interval": "500ms"},
    }))
    cenv = {**env, "IPFIXER_CONFIG": str(cfg), "IPFIXER_RUN_DIR": str(tmp_path / "run"),
            "IPFIXER_FLOWS_DIR": str(tmp_path / "flows"), "IPFIXER_NFCAPD_PORT": str(port)}
    try:
        _compose(engine, cenv, "up", "-d")
        deadline = time.monotonic() + 120
        logs = ""
        while time.monotonic() < deadline:
            logs = _compose(engine, cenv, "logs", "ipfixer", "nfcapd")
            if "msg=started" in logs and "Startup nfcapd" in logs:
                break
            time.sleep(0.5)
        assert "msg=started" in logs and "Startup nfcapd" in logs, logs[-3000:]
        assert "ipfixer" in _ipfixer_tc_state(HOST_DEV)  # attached from inside the container
        expected = _send(host_ip, peer_ip)
        # the container's control socket, in the run directory it shares with the host: ipfixer ctl from here
        res = subprocess.run([*IPFIXER, "ctl", "--socket", str(ctl_socket(tmp_path / "run")), "flows", "--json"],
                             capture_output=True, text=True, timeout=60, env=cli_env())
        assert res.returncode == 0, res.stderr
        held = {(f["src"], f["dst"], f["src_port"], f["dst_port"]): (f["packets"], f["octets"])
                for f in json.loads(res.stdout)["flows"]}
        assert held == expected  # held in the kernel map now, before anything is exported
        _compose(engine, cenv, "stop", "ipfixer")  # SIGTERM: every flow flushed to nfcapd, filters removed
        state = engine.docker("inspect", "-f", "{{.State.ExitCode}}", f"ipfx{SUFFIX}_ipfixer_1").stdout.strip()
        assert state == "0", _compose(engine, cenv, "logs", "ipfixer")[-3000:]
        # nfcapd writes its current file out when it stops; the same container is started again to read it
        _compose(engine, cenv, "stop", "nfcapd")
        _compose(engine, cenv, "start", "nfcapd")
        out = _compose(engine, cenv, "exec", "-T", "nfcapd", "nfdump", "-R", "/flows", "-o", "json")
        parsed: Any = json.loads(out) if out.strip() else []
        flows = [f for f in (parsed if isinstance(parsed, list) else [parsed]) if f.get("type") == "FLOW"]
        got: dict[tuple[str, str, int, int], tuple[int, int]] = {}
        for f in flows:
            assert f["proto"] == 17, f
            key = (f["src4_addr"], f["dst4_addr"], f["src_port"], f["dst_port"])
            pkts, octets = got.get(key, (0, 0))
            got[key] = (pkts + f["in_packets"], octets + f["in_bytes"])
        assert got == expected
    finally:
        _compose(engine, cenv, "down", "--remove-orphans", timeout=180)
    tc_after = _ipfixer_tc_state(HOST_DEV)
    assert "ipfixer" not in tc_after and "clsact" not in tc_after, tc_after
    assert engine.docker("ps", "-aq").stdout.strip() == ""
    return host_firewall_state()
