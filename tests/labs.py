"""The tests' larger topologies, each built on ipfixer.lab's `Namespaces` (every namespace `ipfx` + a unique
suffix, all deleted in close() even when building or the test failed; every command bounded in time).

- `Router`: ns_r holds r1 and r2, each a veth to a host namespace (ns_1, ns_2), static neighbours both
  ways; optional Linux VRFs on the router (issue 16's daemon tests).
- `NatTopo`: client ns -- router ns (masquerade + DNAT, ct zone and mark) -- server ns (the conntrack tests).
The two-namespace veth pair is `ipfixer.lab.Lab` itself (the kernel tests' `netpair` fixture)."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ipfixer.lab import Lab, Namespaces, ip, netns_exec, read_sys, sh, static_neighbour, unique_name

HOST_DEV = "ipfxh8h"  # each host namespace's end of its veth in Router
SEND = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.bind(('',int(sys.argv[2])))\n"
    "for _ in range(int(sys.argv[4])):\n"
    "    s.sendto(b'v'*int(sys.argv[5]),(sys.argv[1],int(sys.argv[3])))\n"
)


def vrf_unsupported() -> str | None:
    """Why this kernel cannot make a VRF device, or None."""
    with Namespaces() as spaces:
        ns = spaces.add(tag="h8c")
        res = ip("-n", ns, "link", "add", "ipfxh8chk", "type", "vrf", "table", "1", check=False)
        if res.returncode != 0:
            return f"kernel cannot create a VRF device (CONFIG_NET_VRF): {res.stderr.strip()}"
        return None


@dataclass
class Router:
    """ns_r holds r1 (10.S.1.1, towards ns_1's h1 10.S.1.2) and r2 (10.S.2.1, towards ns_2's h2)."""

    ns_r: str = field(default_factory=lambda: unique_name("h8R"))
    ns_1: str = field(default_factory=lambda: unique_name("h8H"))
    ns_2: str = field(default_factory=lambda: unique_name("h8H"))
    r1: str = field(default_factory=lambda: unique_name("h8r"))
    r2: str = field(default_factory=lambda: unique_name("h8r"))
    subnet: int = field(default_factory=lambda: os.getpid() % 200 + 20)
    spaces: Namespaces = field(default_factory=Namespaces)

    def addr(self, side: int, host: int) -> str:
        return f"10.{self.subnet}.{side}.{host}"

    def build(self) -> Router:
        try:
            for ns in (self.ns_r, self.ns_1, self.ns_2):
                self.spaces.add(ns)
            for side, (rdev, hns) in enumerate(((self.r1, self.ns_1), (self.r2, self.ns_2)), start=1):
                self.spaces.veth(self.ns_r, rdev, hns, HOST_DEV)
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
        rmac = read_sys(self.ns_r, f"/sys/class/net/{rdev}/address")
        hmac = read_sys(hns, f"/sys/class/net/{HOST_DEV}/address")
        static_neighbour(hns, HOST_DEV, self.addr(side, 1), rmac)
        static_neighbour(self.ns_r, rdev, self.addr(side, 2), hmac)

    def ifindex(self, dev: str) -> int:
        return int(read_sys(self.ns_r, f"/sys/class/net/{dev}/ifindex"))

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
        self.spaces.close()


@dataclass
class NatTopo:
    """client 10.91.1.2 -- r_in 10.91.1.1 | router | r_out 10.91.2.1 -- server 10.91.2.2 (no route back)."""

    client: str
    router: str
    server: str
    r_in: str
    r_out: str
    spaces: Namespaces = field(default_factory=Namespaces)

    CLIENT = "10.91.1.2"
    ROUTER_IN = "10.91.1.1"
    ROUTER_OUT = "10.91.2.1"
    SERVER = "10.91.2.2"

    def teardown(self) -> None:
        self.spaces.close()


def make_nat_topo(zone: int = 7, mark: int = 0x2A) -> NatTopo:
    """Build the three namespaces, veths, addresses, and the router's nft table `ipfxnat`:
    ct zone set <zone> (raw prerouting), ct mark set <mark> on traffic from the client,
    DNAT r_in:8080 -> server:80, masquerade out of r_out. Caller must call teardown()."""
    t = NatTopo(unique_name("c"), unique_name("r"), unique_name("s"), unique_name("ri"), unique_name("ro"))
    try:
        for ns in (t.client, t.router, t.server):
            t.spaces.add(ns)
        c0, s0 = unique_name("c0"), unique_name("s0")
        t.spaces.veth(t.client, c0, t.router, t.r_in)
        t.spaces.veth(t.server, s0, t.router, t.r_out)
        sh("ip", "addr", "add", f"{t.CLIENT}/24", "dev", c0, netns=t.client)
        sh("ip", "addr", "add", f"{t.ROUTER_IN}/24", "dev", t.r_in, netns=t.router)
        sh("ip", "addr", "add", f"{t.ROUTER_OUT}/24", "dev", t.r_out, netns=t.router)
        sh("ip", "addr", "add", f"{t.SERVER}/24", "dev", s0, netns=t.server)
        for ns, dev in ((t.client, c0), (t.router, t.r_in), (t.router, t.r_out), (t.server, s0)):
            sh("ip", "link", "set", dev, "up", netns=ns)
        sh("ip", "route", "add", "default", "via", t.ROUTER_IN, netns=t.client)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=t.router)
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", netns=t.router)
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1", netns=t.router)
        ruleset = f"""
table ip ipfxnat {{
    counter related_seen {{ }}
    chain ipfxraw {{ type filter hook prerouting priority raw; ct zone set {zone}; }}
    chain ipfxpre {{ type nat hook prerouting priority dstnat;
        iifname "{t.r_in}" ip daddr {t.ROUTER_IN} tcp dport 8080 dnat to {t.SERVER}:80
        iifname "{t.r_in}" ip daddr {t.ROUTER_IN} udp dport 8080 dnat to {t.SERVER}:80
    }}
    chain ipfxfwd {{ type filter hook forward priority filter;
        iifname "{t.r_in}" ct mark set {mark:#x}
        ct state related counter name "related_seen"
    }}
    chain ipfxpost {{ type nat hook postrouting priority srcnat; oifname "{t.r_out}" masquerade; }}
}}
"""
        sh("nft", "-f", "-", netns=t.router, input=ruleset)
    except BaseException:
        t.teardown()
        raise
    return t


@contextmanager
def metered(program: Any, lab: Lab, hooks: str) -> Iterator[tuple[Any, Lab, Any]]:
    """(program, lab, drainer): the loaded classifier attached to lab.veth_a on `hooks` ("ingress",
    "egress", "both") with a Drainer on its map, flushed of what the link-up produced; detached after."""
    from ipfixer.clock import SystemClock
    from ipfixer.sources.kernel.attach import Attacher
    from ipfixer.sources.kernel.drain import Drainer

    hour_ns = 3600 * 10**9
    att = Attacher(program.ingress_fd, program.egress_fd, hooks, netns=lab.ns_a)
    try:
        att.attach(lab.veth_a)
        drainer = Drainer(program.flows, SystemClock(), hour_ns, hour_ns)
        drainer.flush()  # whatever the link-up produced
        yield program, lab, drainer
    finally:
        att.detach_all()
        att.close()


def collect(src: Any, expect: int, settle_s: float = 0.2) -> list[Any]:
    """What an NFLOG source (sources.nflog_netlink.NflogSource) hands over until `expect` packets came
    (at most 5 s), then for settle_s more: nothing more may arrive."""
    got: list[Any] = []
    for _ in range(50):  # bounded: 50 x 0.1 s
        got.extend(src.poll(0.1))
        if len(got) >= expect:
            break
    got.extend(src.poll(settle_s))
    return got


def tcp_rounds(listener: socket.socket, client: socket.socket, dst: tuple[str, int], rounds: int) -> tuple[str, int]:
    """One TCP connection from `client` to dst (reaching `listener`, which is listening): `rounds`
    600-byte requests answered by 300-byte replies, then an orderly close; both sockets are closed.
    Every write is below the MSS and waits for its answer, so no segment is a GSO super-packet (eBPF
    counts those as their wire segments, conntrack and NFLOG as one packet). Returns the peer the
    listener saw (after any NAT)."""
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.connect(dst)
        conn, peer = listener.accept()
        conn.settimeout(5)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            client.sendall(b"t" * 600)
            assert recv_exact(conn, 600)
            conn.sendall(b"r" * 300)
            assert recv_exact(client, 300)
        client.shutdown(socket.SHUT_WR)
        assert conn.recv(10) == b""
        conn.close()
        assert client.recv(10) == b""
    finally:
        client.close()
        listener.close()
    time.sleep(0.3)  # the last ACK crosses the router
    return peer[0], peer[1]


def recv_exact(s: socket.socket, n: int) -> bytes:
    """n bytes from a stream socket (bounded: at least one byte per round)."""
    data = b""
    for _ in range(n):
        if len(data) >= n:
            break
        chunk = s.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def udp_echo_rounds(server: socket.socket, client: socket.socket, dst: tuple[str, int], sizes: list[int]) -> None:
    """One datagram of each size from `client` to dst (reaching `server`), echoed back by the server and
    checked at the client; both sockets are closed."""
    try:
        for n in sizes:
            client.sendto(b"u" * n, dst)
            data, peer = server.recvfrom(65535)
            server.sendto(data, peer)
            assert client.recvfrom(65535)[0] == data
    finally:
        client.close()
        server.close()

