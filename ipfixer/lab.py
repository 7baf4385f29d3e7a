"""The one namespace lab for `ipfixer demo`, every test and the benchmarks.

`Namespaces` makes network namespaces (every name `ipfx` + a unique suffix) and deletes every one it made in
`close()` / on leaving its `with` block, even when building or the test failed; deleting a namespace takes
its veths, qdiscs, filters and nft tables with it. `Lab` is the common shape on top of it: two namespaces
joined by a veth pair with static neighbours. Every command is bounded in time. Hand-written over iproute2's
`ip` (namespace creation needs the bind mount that `ip netns add` does the standard way; pyroute2's netns
module does the same through a forked helper, and `ip` is what an operator would type to reproduce a failure).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import TracebackType

from ipfixer.errors import KernelError
from ipfixer.netns import in_netns

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


def netns_exec(ns: str | None, *cmd: str, timeout: float = 60, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace (None: this one), bounded in time; KernelError on failure."""
    argv = ["ip", "netns", "exec", ns, *cmd] if ns is not None else list(cmd)
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise KernelError(f"{' '.join(cmd)} in {ns or 'this namespace'}: {res.returncode} {res.stderr.strip()}")
    return res


def sh(*cmd: str, netns: str | None = None, input: str | None = None, check: bool = True,
       timeout: float = 60) -> str:
    """`netns_exec` for callers that want only stdout."""
    return netns_exec(netns, *cmd, timeout=timeout, check=check, input=input).stdout


def wait_until(pred: Callable[[], object], timeout: float = 5.0, step: float = 0.05) -> bool:
    """Poll pred() until true or `timeout` seconds passed (bounded); its last truth value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def ns_socket(netns: str, type_: int, bind: tuple[str, int] | None = None,
              family: int = socket.AF_INET) -> socket.socket:
    """A socket living in `netns` (usable from any thread), 5 s timeout."""

    def make() -> socket.socket:
        s = socket.socket(family, type_)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind is not None:
            s.bind(bind)
        return s

    s = in_netns(netns, make)
    s.settimeout(5)
    return s


class Namespaces:
    """Network namespaces made for a lab; `close()` deletes every one, newest first, even after a failure."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def add(self, name: str | None = None, tag: str = "N") -> str:
        """Create a namespace (named `name`, else `unique_name(tag)`) with its loopback up."""
        ns = name if name is not None else unique_name(tag)
        if not ns.startswith("ipfx"):
            raise KernelError(f"lab namespace {ns!r} must be named ipfx...")
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        """A veth pair, dev_a in ns_a and dev_b in ns_b (both left down)."""
        ip("-n", ns_a, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)

    def close(self) -> None:
        """Delete the namespaces (their interfaces, qdiscs, filters and nft tables go with them)."""
        while self.made:
            ip("netns", "del", self.made.pop(), check=False)

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_sys(ns: str, path: str) -> str:
    """A /sys (or /proc) file as seen from a namespace."""
    return netns_exec(ns, "cat", path).stdout.strip()


def static_neighbour(ns: str, dev: str, addr: str, mac: str) -> None:
    """A permanent neighbour entry: no ARP/ND packets in the middle of counted traffic."""
    ip("-n", ns, "neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent")


@dataclass
class Lab:
    """ns_a (veth_a, 10.N.0.1, fd00:N::1) <-> ns_b (veth_b, 10.N.0.2, fd00:N::2)."""

    ns_a: str = field(default_factory=lambda: unique_name("A"))
    ns_b: str = field(default_factory=lambda: unique_name("B"))
    veth_a: str = field(default_factory=lambda: unique_name("a"))
    veth_b: str = field(default_factory=lambda: unique_name("b"))
    subnet: int = field(default_factory=lambda: (os.getpid() + next(_seq)) % 200 + 20)
    spaces: Namespaces = field(default_factory=Namespaces)

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
                self.spaces.add(ns)
            self.spaces.veth(self.ns_a, self.veth_a, self.ns_b, self.veth_b)
            for ns, dev, v4, v6 in ((self.ns_a, self.veth_a, self.v4_a, self.v6_a),
                                    (self.ns_b, self.veth_b, self.v4_b, self.v6_b)):
                ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
                ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                ip("-n", ns, "link", "set", dev, "up")
            for ns, dev, addrs, mac in ((self.ns_a, self.veth_a, (self.v4_b, self.v6_b), self.mac_b),
                                        (self.ns_b, self.veth_b, (self.v4_a, self.v6_a), self.mac_a)):
                for addr in addrs:
                    static_neighbour(ns, dev, addr, mac)
        except BaseException:
            self.close()
            raise
        return self

    def mac(self, ns: str, dev: str) -> str:
        return read_sys(ns, f"/sys/class/net/{dev}/address")

    def ifindex(self, ns: str, dev: str) -> int:
        return int(read_sys(ns, f"/sys/class/net/{dev}/ifindex"))

    @cached_property
    def mac_a(self) -> str:
        return self.mac(self.ns_a, self.veth_a)

    @cached_property
    def mac_b(self) -> str:
        return self.mac(self.ns_b, self.veth_b)

    @cached_property
    def ifindex_a(self) -> int:
        return self.ifindex(self.ns_a, self.veth_a)

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
        self.spaces.close()

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
