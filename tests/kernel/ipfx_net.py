"""Helpers for kernel tests: namespaces, veth pairs, commands in a namespace (all bounded)."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from dataclasses import dataclass

from ipfixer.lab import Lab

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
    """ns_a holds veth_a (10.<n>.0.1, fd00:<n>::1), ns_b holds veth_b (.2 / ::2): an ipfixer.lab.Lab
    with the facts the kernel tests compare against read once."""

    lab: Lab
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
        self.lab.send_udp(from_ns, dst, sport, dport, sizes)


def _make_pair(ns_a: str, ns_b: str) -> NetPair:
    lab = Lab(ns_a=ns_a, ns_b=ns_b, veth_a=unique("ipfxa"), veth_b=unique("ipfxb")).build()
    return NetPair(lab, lab.ns_a, lab.ns_b, lab.veth_a, lab.veth_b, lab.ifindex(lab.ns_a, lab.veth_a),
                   lab.v4_a, lab.v4_b, lab.v6_a, lab.v6_b, lab.mac(lab.ns_a, lab.veth_a),
                   lab.mac(lab.ns_b, lab.veth_b))


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
