"""A router namespace for issue 16's daemon tests: ns_r holds r1 and r2, each a veth to a host namespace
(ns_1, ns_2), static neighbours both ways; optional Linux VRFs on the router.  Everything is removed in
close(), every command is bounded (ipfixer.lab.ip / netns_exec)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from ipfixer.lab import ip, netns_exec, unique_name

HOST_DEV = "ipfxh8h"  # each host namespace's end of its veth
SEND = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.bind(('',int(sys.argv[2])))\n"
    "for _ in range(int(sys.argv[4])):\n"
    "    s.sendto(b'v'*int(sys.argv[5]),(sys.argv[1],int(sys.argv[3])))\n"
)


def vrf_unsupported() -> str | None:
    """Why this kernel cannot make a VRF device, or None."""
    ns = unique_name("h8c")
    try:
        ip("netns", "add", ns)
        res = ip("-n", ns, "link", "add", "ipfxh8chk", "type", "vrf", "table", "1", check=False)
        if res.returncode != 0:
            return f"kernel cannot create a VRF device (CONFIG_NET_VRF): {res.stderr.strip()}"
        return None
    finally:
        ip("netns", "del", ns, check=False)


@dataclass
class Router:
    """ns_r holds r1 (10.S.1.1, towards ns_1's h1 10.S.1.2) and r2 (10.S.2.1, towards ns_2's h2)."""

    ns_r: str = field(default_factory=lambda: unique_name("h8R"))
    ns_1: str = field(default_factory=lambda: unique_name("h8H"))
    ns_2: str = field(default_factory=lambda: unique_name("h8H"))
    r1: str = field(default_factory=lambda: unique_name("h8r"))
    r2: str = field(default_factory=lambda: unique_name("h8r"))
    subnet: int = field(default_factory=lambda: os.getpid() % 200 + 20)
    _made: list[str] = field(default_factory=list)

    def addr(self, side: int, host: int) -> str:
        return f"10.{self.subnet}.{side}.{host}"

    def build(self) -> Router:
        try:
            for ns in (self.ns_r, self.ns_1, self.ns_2):
                ip("netns", "add", ns)
                self._made.append(ns)
                ip("-n", ns, "link", "set", "lo", "up")
            for side, (rdev, hns) in enumerate(((self.r1, self.ns_1), (self.r2, self.ns_2)), start=1):
                ip("-n", self.ns_r, "link", "add", rdev, "type", "veth", "peer", "name", HOST_DEV, "netns", hns)
                ip("-n", self.ns_r, "addr", "add", f"{self.addr(side, 1)}/24", "dev", rdev)
                ip("-n", hns, "addr", "add", f"{self.addr(side, 2)}/24", "dev", HOST_DEV)
                for ns, dev in ((self.ns_r, rdev), (hns, HOST_DEV)):
                    ip("-n", ns, "link", "set", dev, "up")
                self.neighbours(side)
        except BaseException:
            self.close()
            raise
        return self

    def neighbours(self, side: int) -> None:
        """Static neighbours both ways (again after a VRF move, which cycles the device): no ARP."""
        rdev, hns = (self.r1, self.ns_1) if side == 1 else (self.r2, self.ns_2)
        rmac = netns_exec(self.ns_r, "cat", f"/sys/class/net/{rdev}/address").stdout.strip()
        hmac = netns_exec(hns, "cat", f"/sys/class/net/{HOST_DEV}/address").stdout.strip()
        ip("-n", hns, "neigh", "replace", self.addr(side, 1), "lladdr", rmac, "dev", HOST_DEV, "nud", "permanent")
        ip("-n", self.ns_r, "neigh", "replace", self.addr(side, 2), "lladdr", hmac, "dev", rdev, "nud", "permanent")

    def ifindex(self, dev: str) -> int:
        return int(netns_exec(self.ns_r, "cat", f"/sys/class/net/{dev}/ifindex").stdout.strip())

    def add_vrf(self, name: str, table: int) -> None:
        ip("-n", self.ns_r, "link", "add", name, "type", "vrf", "table", str(table))
        ip("-n", self.ns_r, "link", "set", name, "up")

    def enslave(self, side: int, vrf: str | None) -> None:
        """Release r<side> from its VRF, then enslave it to `vrf` (if any)."""
        dev = self.r1 if side == 1 else self.r2
        ip("-n", self.ns_r, "link", "set", dev, "nomaster")
        if vrf is not None:
            ip("-n", self.ns_r, "link", "set", dev, "master", vrf)
        ip("-n", self.ns_r, "link", "set", dev, "up")
        self.neighbours(side)

    def send(self, side: int, sport: int, dport: int, count: int, size: int = 100) -> None:
        """`count` UDP datagrams from h<side> to the router's address on that side."""
        netns_exec(self.ns_1 if side == 1 else self.ns_2, sys.executable, "-c", SEND, self.addr(side, 1),
                   str(sport), str(dport), str(count), str(size))

    def close(self) -> None:
        while self._made:
            ip("netns", "del", self._made.pop(), check=False)
