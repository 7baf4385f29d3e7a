"""A small lab of network namespaces for `ipfixer demo`, the daemon tests and the benchmarks.

Two namespaces joined by a veth pair, every name prefixed `ipfx` with a unique suffix; `close()`
deletes the namespaces, which takes their veths, qdiscs and filters with them. Built with iproute2's
`ip` (namespace creation needs a bind mount that `ip netns add` does the standard way).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ipfixer.errors import KernelError

_seq = itertools.count()


def unique_name(tag: str) -> str:
    """`ipfx<tag><pid><n>`, at most 15 characters (an interface name's limit)."""
    name = f"ipfx{tag}{os.getpid() % 100000}{next(_seq)}"
    if len(name) > 15:
        name = f"ipfx{tag[:2]}{os.getpid() % 10000}{next(_seq) % 100}"
    return name[:15]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ...` bounded in time; KernelError with its message on failure."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise KernelError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def netns_exec(ns: str, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace, bounded in time."""
    res = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and res.returncode != 0:
        raise KernelError(f"{' '.join(cmd)} in {ns}: {res.stderr.strip()}")
    return res


@dataclass
class Lab:
    """ns_a (veth_a, 10.N.0.1, fd00:N::1) <-> ns_b (veth_b, 10.N.0.2, fd00:N::2)."""

    ns_a: str = field(default_factory=lambda: unique_name("A"))
    ns_b: str = field(default_factory=lambda: unique_name("B"))
    veth_a: str = field(default_factory=lambda: unique_name("a"))
    veth_b: str = field(default_factory=lambda: unique_name("b"))
    subnet: int = field(default_factory=lambda: (os.getpid() + next(_seq)) % 200 + 20)
    _made: list[str] = field(default_factory=list)

    @property
    def v4_a(self) -> str:
        return f"10.{self.subnet}.0.1"

    @property
    def v4_b(self) -> str:
        return f"10.{self.subnet}.0.2"

    @property
    def v6_a(self) -> str:
        return f"fd00:{self.subnet}::1"

    @property
    def v6_b(self) -> str:
        return f"fd00:{self.subnet}::2"

    def build(self) -> Lab:
        """Create both namespaces, the veth pair, addresses and static neighbours."""
        try:
            for ns in (self.ns_a, self.ns_b):
                ip("netns", "add", ns)
                self._made.append(ns)
            ip("-n", self.ns_a, "link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b,
               "netns", self.ns_b)
            for ns, dev, v4, v6 in ((self.ns_a, self.veth_a, self.v4_a, self.v6_a),
                                    (self.ns_b, self.veth_b, self.v4_b, self.v6_b)):
                ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
                ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
            # Static neighbours: no ARP/ND packets in the middle of counted traffic.
            mac_a, mac_b = self.mac(self.ns_a, self.veth_a), self.mac(self.ns_b, self.veth_b)
            for ns, dev, addrs, mac in ((self.ns_a, self.veth_a, (self.v4_b, self.v6_b), mac_b),
                                        (self.ns_b, self.veth_b, (self.v4_a, self.v6_a), mac_a)):
                for addr in addrs:
                    ip("-n", ns, "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent")
        except BaseException:
            self.close()
            raise
        return self

    def mac(self, ns: str, dev: str) -> str:
        return netns_exec(ns, "cat", f"/sys/class/net/{dev}/address").stdout.strip()

    def ifindex(self, ns: str, dev: str) -> int:
        return int(netns_exec(ns, "cat", f"/sys/class/net/{dev}/ifindex").stdout.strip())

    def send_udp(self, from_ns: str, dst: str, sport: int, dport: int, sizes: list[int]) -> None:
        """Send UDP datagrams of the given payload sizes from a namespace (blocking, bounded)."""
        script = (
            "import socket,sys\n"
            "fam=socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
            "s=socket.socket(fam,socket.SOCK_DGRAM)\n"
            "s.bind(('',int(sys.argv[2])))\n"
            "for n in sys.argv[4].split(','):\n"
            "    s.sendto(b'x'*int(n),(sys.argv[1],int(sys.argv[3])))\n"
        )
        netns_exec(from_ns, sys.executable, "-c", script, dst, str(sport), str(dport),
                 ",".join(str(s) for s in sizes))

    def close(self) -> None:
        """Delete the namespaces (their interfaces, qdiscs and filters go with them)."""
        while self._made:
            ip("netns", "del", self._made.pop(), check=False)

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def start_ipfixer(ns: str, config: Path, log: Path, *args: str, timeout_s: float = 90.0,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`ipfixer run` inside a namespace, returned once it logged that it started (attached)."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "ipfixer.cli", "run", "--config", str(config), *args],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if b"msg=started" in log.read_bytes():
            return proc
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    raise KernelError(f"ipfixer did not start in {ns}: {log.read_text(errors='replace')[-2000:]}")


def stop_ipfixer(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM (flush and detach), wait bounded, kill if it hangs; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return -9
