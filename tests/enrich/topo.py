"""Test topology: client ns -- router ns (masquerade + DNAT) -- server ns, all named ipfx*, torn down always."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
from dataclasses import dataclass, field

from ipfixer.netns import in_netns

_counter = itertools.count()


def unique(tag: str) -> str:
    """ipfx<tag><pid%10000><n>: unique per test, short enough for an interface name."""
    name = f"ipfx{tag}{os.getpid() % 10000}{next(_counter)}"
    assert len(name) <= 15, name
    return name


def sh(*args: str, netns: str | None = None, input: str | None = None, check: bool = True) -> str:
    """Run a command (inside netns when given), bounded in time; stdout."""
    cmd = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{cmd}: {res.returncode} {res.stderr.strip()}")
    return res.stdout


def ns_socket(netns: str, type_: int, bind: tuple[str, int] | None = None) -> socket.socket:
    """An IPv4 socket living in netns, usable from any thread."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, type_)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind is not None:
            s.bind(bind)
        return s

    s = in_netns(netns, make)
    s.settimeout(5)
    return s


@dataclass
class NatTopo:
    """client 10.91.1.2 -- r_in 10.91.1.1 | router | r_out 10.91.2.1 -- server 10.91.2.2 (no route back)."""

    client: str
    router: str
    server: str
    r_in: str
    r_out: str
    created: list[str] = field(default_factory=list)

    CLIENT = "10.91.1.2"
    ROUTER_IN = "10.91.1.1"
    ROUTER_OUT = "10.91.2.1"
    SERVER = "10.91.2.2"

    def teardown(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def make_nat_topo(zone: int = 7, mark: int = 0x2A) -> NatTopo:
    """Build the three namespaces, veths, addresses, and the router's nft table `ipfxnat`:
    ct zone set <zone> (raw prerouting), ct mark set <mark> on traffic from the client,
    DNAT r_in:8080 -> server:80, masquerade out of r_out. Caller must call teardown()."""
    t = NatTopo(unique("c"), unique("r"), unique("s"), unique("ri"), unique("ro"))
    try:
        for ns in (t.client, t.router, t.server):
            sh("ip", "netns", "add", ns)
            t.created.append(ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        c0, s0 = unique("c0"), unique("s0")
        sh("ip", "link", "add", c0, "netns", t.client, "type", "veth", "peer", t.r_in, "netns", t.router)
        sh("ip", "link", "add", s0, "netns", t.server, "type", "veth", "peer", t.r_out, "netns", t.router)
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
