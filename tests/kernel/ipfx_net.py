"""Helpers for kernel tests: namespaces, veth pairs, commands in a namespace (all bounded)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass

_seq = itertools.count()


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout, returning its output."""
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=60)


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside a network namespace."""
    return run("ip", "netns", "exec", ns, *args, check=check)


def unique(prefix: str) -> str:
    """A name unique to this process and call, short enough for a 15-character ifname."""
    name = f"{prefix}{os.getpid() % 100000}{next(_seq)}"
    assert len(name) <= 15, name
    return name


@dataclass
class NetPair:
    """ns_a holds veth_a (10.<n>.0.1, fd00:<n>::1), ns_b holds veth_b (.2 / ::2)."""

    ns_a: str
    ns_b: str
    veth_a: str
    veth_b: str
    ifindex_a: int
    v4_a: str
    v4_b: str
    v6_a: str
    v6_b: str
    mac_a: str
    mac_b: str

    def send_udp(self, from_ns: str, dst: str, sport: int, dport: int, sizes: list[int]) -> None:
        """Send UDP datagrams with the given payload sizes from a namespace (bounded, blocking)."""
        script = (
            "import socket,sys\n"
            "fam=socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
            "s=socket.socket(fam,socket.SOCK_DGRAM)\n"
            "s.bind(('',int(sys.argv[2])))\n"
            "for n in sys.argv[4].split(','):\n"
            "    s.sendto(b'x'*int(n),(sys.argv[1],int(sys.argv[3])))\n"
        )
        in_ns(from_ns, sys.executable, "-c", script, dst, str(sport), str(dport),
              ",".join(str(s) for s in sizes))


def _make_pair(ns_a: str, ns_b: str) -> NetPair:
    veth_a, veth_b = unique("ipfxa"), unique("ipfxb")
    n = (os.getpid() + next(_seq)) % 200 + 20
    run("ip", "netns", "add", ns_a)
    run("ip", "netns", "add", ns_b)
    run("ip", "-n", ns_a, "link", "add", veth_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b)
    pair = NetPair(ns_a, ns_b, veth_a, veth_b, 0, f"10.{n}.0.1", f"10.{n}.0.2", f"fd00:{n}::1",
                   f"fd00:{n}::2", "", "")
    for ns, dev, v4, v6 in ((ns_a, veth_a, pair.v4_a, pair.v6_a), (ns_b, veth_b, pair.v4_b, pair.v6_b)):
        run("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
        run("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
    pair.ifindex_a = int(open_in_ns(ns_a, f"/sys/class/net/{veth_a}/ifindex"))
    pair.mac_a = open_in_ns(ns_a, f"/sys/class/net/{veth_a}/address")
    pair.mac_b = open_in_ns(ns_b, f"/sys/class/net/{veth_b}/address")
    # Static neighbours: no ARP/ND in the middle of a test's traffic.
    run("ip", "-n", ns_a, "neigh", "replace", pair.v4_b, "lladdr", pair.mac_b, "dev", veth_a, "nud", "permanent")
    run("ip", "-n", ns_a, "neigh", "replace", pair.v6_b, "lladdr", pair.mac_b, "dev", veth_a, "nud", "permanent")
    run("ip", "-n", ns_b, "neigh", "replace", pair.v4_a, "lladdr", pair.mac_a, "dev", veth_b, "nud", "permanent")
    run("ip", "-n", ns_b, "neigh", "replace", pair.v6_a, "lladdr", pair.mac_a, "dev", veth_b, "nud", "permanent")
    return pair


def open_in_ns(ns: str, path: str) -> str:
    """Read a /sys file as seen from a namespace."""
    return in_ns(ns, "cat", path).stdout.strip()


def delete_netns(*names: str) -> None:
    """Delete namespaces (their veths and qdiscs go with them)."""
    for ns in names:
        run("ip", "netns", "del", ns, check=False)


def wait_until(pred, timeout: float = 5.0, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Poll pred() until true or timeout (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
