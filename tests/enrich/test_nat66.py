"""NAT66 and ICMPv6 conntrack enrichment against the real kernel: a router netns doing IPv6 DNAT +
masquerade (nft `table ip6`) between a client and a server netns, with a ct zone and mark; the same
checks as the IPv4 tests (test_conntrack.py, test_daemon_enrich.py) for TCP, UDP, ICMPv6 echo and an
ICMPv6 error joined on the tuple it quotes, then through the real daemon to nfcapd and ipfixer's decoder.
Every namespace (and with it every nft table and socket) is removed in a finally."""

from __future__ import annotations

import ipaddress
import json
import re
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ipfixer.enrich.conntrack import (
    CT_DNAT,
    CT_ESTABLISHED,
    CT_NEW,
    CT_RELATED,
    CT_REPLY,
    CT_SNAT,
    CT_TRACKED,
    ConnKey,
    ConntrackTable,
)
from ipfixer.enrich.ctnetlink import (
    CT_DTYPE,
    KIND_NEW,
    ParseStats,
    dump_conntrack,
    dump_request,
    insert_entries,
    open_ctnetlink,
    parse_dump,
    parse_entry,
)
from ipfixer.enrich.events import NAT_EVENT_CREATE, NAT_EVENT_DELETE, ConntrackEvents, FlowEvent, nat_event_records
from ipfixer.enrich.icmp import IcmpErrors
from ipfixer.lab import (
    Namespaces,
    ip,
    ns_socket,
    read_sys,
    sh,
    start_ipfixer,
    static_neighbour,
    stop_ipfixer,
    unique_name,
)
from ipfixer.model import ETH_P_IPV6, addr16_to_str, empty_batch, to_addr16
from tests.cli.helpers import cli_env, totals_by_flow, write_config
from tests.cli.test_daemon import collector_in
from tests.collectors import Nfcapd, free_udp_port
from tests.labs import tcp_rounds, udp_echo_rounds

UDP, TCP, ICMP6 = 17, 6, 58
ZONE, MARK = 9, 0x3B
ECHO_REQUEST, ECHO_REPLY, DST_UNREACH, PACKET_TOO_BIG = 128, 129, 1, 2
IPV6_DSTOPTS, IPV6_RECVERR = 59, 25  # linux/in6.h (Python's socket module lacks them)
IP6, UDP_H, ICMP6_H = 40, 8, 8
NAPT_SPORT, NAPT_TO = 41009, 50050  # the one source port the masquerade must translate


@dataclass
class Nat66Topo:
    """client fd91:1::2 -- r_in fd91:1::1 | router | r_out fd91:2::1 -- server fd91:2::2 (no route back)."""

    client: str = field(default_factory=lambda: unique_name("n6c"))
    router: str = field(default_factory=lambda: unique_name("n6r"))
    server: str = field(default_factory=lambda: unique_name("n6s"))
    r_in: str = field(default_factory=lambda: unique_name("n6i"))
    r_out: str = field(default_factory=lambda: unique_name("n6o"))
    c0: str = field(default_factory=lambda: unique_name("n6a"))
    s0: str = field(default_factory=lambda: unique_name("n6b"))
    spaces: Namespaces = field(default_factory=Namespaces)

    CLIENT = "fd91:1::2"
    ROUTER_IN = "fd91:1::1"
    ROUTER_OUT = "fd91:2::1"
    SERVER = "fd91:2::2"

    def teardown(self) -> None:
        self.spaces.close()


def make_nat66_topo(zone: int = ZONE, mark: int = MARK) -> Nat66Topo:
    """Namespaces, veths, IPv6 addresses (no DAD), static neighbours (no ND in counted traffic), and the
    router's nft `table ip6 ipfxnat6`: ct zone set <zone> (raw prerouting), ct mark set <mark> on traffic
    from the client, DNAT [r_in]:8080 -> [server]:80 (TCP and UDP), masquerade out of r_out (UDP source
    port NAPT_SPORT to NAPT_TO, others keep theirs), and a counter of forwarded RELATED packets. Caller must call teardown()."""
    t = Nat66Topo()
    try:
        for ns in (t.client, t.router, t.server):
            t.spaces.add(ns)
        t.spaces.veth(t.client, t.c0, t.router, t.r_in)
        t.spaces.veth(t.server, t.s0, t.router, t.r_out)
        links = ((t.client, t.c0, t.CLIENT), (t.router, t.r_in, t.ROUTER_IN),
                 (t.router, t.r_out, t.ROUTER_OUT), (t.server, t.s0, t.SERVER))  # fmt: skip
        for ns, dev, addr in links:
            sh("sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_ra=0", netns=ns)
            sh("sysctl", "-qw", f"net.ipv6.conf.{dev}.router_solicitations=0", netns=ns)
            ip("-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        for (ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b) in ((links[0], links[1]), (links[2], links[3])):
            static_neighbour(ns_a, dev_a, addr_b, read_sys(ns_b, f"/sys/class/net/{dev_b}/address"))
            static_neighbour(ns_b, dev_b, addr_a, read_sys(ns_a, f"/sys/class/net/{dev_a}/address"))
        ip("-n", t.client, "-6", "route", "add", "default", "via", t.ROUTER_IN)
        sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", netns=t.router)
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", netns=t.router)
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1", netns=t.router)
        ruleset = f"""
table ip6 ipfxnat6 {{
    counter related_seen {{ }}
    chain ipfxraw {{ type filter hook prerouting priority raw; ct zone set {zone}; }}
    chain ipfxpre {{ type nat hook prerouting priority dstnat;
        iifname "{t.r_in}" ip6 daddr {t.ROUTER_IN} tcp dport 8080 dnat to [{t.SERVER}]:80
        iifname "{t.r_in}" ip6 daddr {t.ROUTER_IN} udp dport 8080 dnat to [{t.SERVER}]:80
    }}
    chain ipfxfwd {{ type filter hook forward priority filter;
        iifname "{t.r_in}" ct mark set {mark:#x}
        ct state related counter name "related_seen"
    }}
    chain ipfxpost {{ type nat hook postrouting priority srcnat;
        oifname "{t.r_out}" udp sport {NAPT_SPORT} masquerade to :{NAPT_TO}
        oifname "{t.r_out}" masquerade
    }}
}}
"""
        sh("nft", "-f", "-", netns=t.router, input=ruleset)
    except BaseException:
        t.teardown()
        raise
    return t


@pytest.fixture
def topo() -> Iterator[Nat66Topo]:
    t = make_nat66_topo()
    try:
        yield t
    finally:
        t.teardown()


def sock6(ns: str, type_: int, bind: tuple[str, int], proto: int = 0) -> socket.socket:
    if proto:  # a raw ICMPv6 socket (ping): ns_socket makes only stream/datagram sockets
        from ipfixer.netns import in_netns

        s = in_netns(ns, lambda: socket.socket(socket.AF_INET6, type_, proto))
        s.settimeout(5)
        return s
    return ns_socket(ns, type_, bind, family=socket.AF_INET6)


def rows(*flows: tuple[int, str, str, int, int]) -> np.ndarray:
    """A batch with one IPv6 row per (protocol, src, dst, sport, dport)."""
    batch = empty_batch(len(flows))
    for i, (proto, src, dst, sp, dp) in enumerate(flows):
        batch[i]["protocol"], batch[i]["ethertype"] = proto, ETH_P_IPV6
        batch[i]["src_addr"] = np.frombuffer(to_addr16(src), np.uint8)
        batch[i]["dst_addr"] = np.frombuffer(to_addr16(dst), np.uint8)
        batch[i]["src_port"], batch[i]["dst_port"] = sp, dp
    return batch


def post(batch: np.ndarray, i: int) -> tuple[str, int, str, int]:
    r = batch[i]
    return (addr16_to_str(bytes(r["post_src_addr"])), int(r["post_src_port"]),
            addr16_to_str(bytes(r["post_dst_addr"])), int(r["post_dst_port"]))  # fmt: skip


def udp_exchange(t: Nat66Topo, sport: int, dport: int, payload: bytes, via_dnat: bool = False,
                 reply: bool = True) -> tuple[str, int]:  # fmt: skip
    """Client sport -> server dport (or router:8080 DNATed to server:80); the server echoes when reply;
    returns the source the server saw."""
    srv = sock6(t.server, socket.SOCK_DGRAM, ("::", 80 if via_dnat else dport))
    cli = sock6(t.client, socket.SOCK_DGRAM, (t.CLIENT, sport))
    try:
        cli.sendto(payload, (t.ROUTER_IN, 8080) if via_dnat else (t.SERVER, dport))
        data, peer = srv.recvfrom(2048)
        assert data == payload
        if reply:
            srv.sendto(data, peer)
            assert cli.recvfrom(2048)[0] == payload
        return peer[0], peer[1]
    finally:
        cli.close()
        srv.close()


def tcp_exchange(t: Nat66Topo, sport: int, rounds: int = 1) -> tuple[str, int]:
    """One TCP connection client -> [r_in]:8080 (DNAT to [server]:80), `rounds` request/reply pairs
    (labs.tcp_rounds); returns the peer the server saw."""
    listener = sock6(t.server, socket.SOCK_STREAM, ("::", 80))
    listener.listen(1)
    return tcp_rounds(listener, sock6(t.client, socket.SOCK_STREAM, (t.CLIENT, sport)), (t.ROUTER_IN, 8080), rounds)


def ping6(t: Nat66Topo, ident: int, count: int, size: int) -> None:
    """`count` ICMPv6 echo requests (identifier `ident`, `size` bytes of data) client -> server through
    the masquerade, each answered (the raw socket: the kernel fills the ICMPv6 checksum, RFC 3542 3.1)."""
    s = sock6(t.client, socket.SOCK_RAW, ("", 0), proto=socket.IPPROTO_ICMPV6)
    try:
        for seq in range(count):
            s.sendto(struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq) + b"p" * size, (t.SERVER, 0))
            for _ in range(16):  # bounded: skip anything else the raw socket sees
                data, _peer = s.recvfrom(2048)
                if data[0] == ECHO_REPLY and struct.unpack_from("!HH", data, 4) == (ident, seq):
                    break
            else:
                raise AssertionError("no echo reply")
    finally:
        s.close()


def port_unreachable(t: Nat66Topo, sport: int, dport: int) -> None:
    """A UDP datagram to a closed port of the server: its ICMPv6 port unreachable (type 1 code 4) comes
    back through the router, RELATED to the datagram's connection."""
    cli = sock6(t.client, socket.SOCK_DGRAM, (t.CLIENT, sport))
    try:
        cli.connect((t.SERVER, dport))
        cli.send(b"x")
        with pytest.raises(ConnectionRefusedError):
            cli.recv(16)
    finally:
        cli.close()


@pytest.mark.root
def test_nat66_tcp_udp_post_nat_mark_zone(topo: Nat66Topo) -> None:
    t = topo
    assert udp_exchange(t, 41000, 5353, b"ping") == (t.ROUTER_OUT, 41000)  # the kernel really masqueraded
    assert udp_exchange(t, 41001, 0, b"dnat", via_dnat=True) == (t.ROUTER_OUT, 41001)
    assert tcp_exchange(t, 41002) == (t.ROUTER_OUT, 41002)
    assert udp_exchange(t, NAPT_SPORT, 0, b"napt", via_dnat=True) == (t.ROUTER_OUT, NAPT_TO)
    table = ConntrackTable(max_entries=64, netns=t.router)
    try:
        assert table.available
        assert table.refresh() == 4  # no ND/MLD entry: nothing else was tracked
        napt = rows((UDP, t.CLIENT, t.ROUTER_IN, NAPT_SPORT, 8080), (UDP, t.SERVER, t.ROUTER_OUT, 80, NAPT_TO),
                    (UDP, t.ROUTER_OUT, t.SERVER, NAPT_TO, 80), (UDP, t.ROUTER_IN, t.CLIENT, 8080, NAPT_SPORT))
        assert table.enrich(napt) == 4  # source and destination ports both translated, all four roles
        assert [post(napt, i) for i in range(4)] == [(t.ROUTER_OUT, NAPT_TO, t.SERVER, 80),
                                                     (t.ROUTER_IN, 8080, t.CLIENT, NAPT_SPORT)] * 2
        batch = rows(
            (UDP, t.CLIENT, t.SERVER, 41000, 5353),  # inside interface, origin direction
            (UDP, t.SERVER, t.CLIENT, 5353, 41000),  # inside interface, reply (after de-NAT)
            (UDP, t.ROUTER_OUT, t.SERVER, 41000, 5353),  # outside interface, origin (after NAT)
            (UDP, t.SERVER, t.ROUTER_OUT, 5353, 41000),  # outside interface, reply (before de-NAT)
            (UDP, t.CLIENT, t.ROUTER_IN, 41001, 8080),  # DNAT'ed, pre-NAT
            (UDP, t.SERVER, t.ROUTER_OUT, 80, 41001),  # DNAT'ed, reply before de-NAT
            (TCP, t.CLIENT, t.ROUTER_IN, 41002, 8080),  # DNAT'ed TCP, origin
            (TCP, t.SERVER, t.ROUTER_OUT, 80, 41002),  # DNAT'ed TCP, reply before de-NAT
            (TCP, t.ROUTER_IN, t.CLIENT, 8080, 41002),  # DNAT'ed TCP, reply after de-NAT
            (UDP, t.CLIENT, t.SERVER, 41999, 5353),  # no such connection
            (ICMP6, "fe80::1", "ff02::1:ff00:2", 0, 135 * 256),  # neighbour solicitation: never tracked
            (ICMP6, "fe80::1", "ff02::16", 0, 143 * 256),  # MLDv2 report: never tracked
        )
        assert table.enrich(batch) == 9
        assert table.counters.misses == 1  # ND and MLD are no sign of a missing entry
        assert batch["ct_state"][10:].tolist() == [0, 0]
        assert [post(batch, i) for i in range(12)] == [
            (t.ROUTER_OUT, 41000, t.SERVER, 5353),
            (t.SERVER, 5353, t.CLIENT, 41000),
            (t.ROUTER_OUT, 41000, t.SERVER, 5353),
            (t.SERVER, 5353, t.CLIENT, 41000),
            (t.ROUTER_OUT, 41001, t.SERVER, 80),
            (t.ROUTER_IN, 8080, t.CLIENT, 41001),
            (t.ROUTER_OUT, 41002, t.SERVER, 80),
            (t.ROUTER_IN, 8080, t.CLIENT, 41002),
            (t.ROUTER_IN, 8080, t.CLIENT, 41002),
        ] + [("::", 0, "::", 0)] * 3
        assert batch["ct_mark"].tolist() == [MARK] * 9 + [0] * 3
        assert batch["ct_zone"].tolist() == [ZONE] * 9 + [0] * 3
        est = CT_TRACKED | CT_ESTABLISHED | CT_SNAT
        dn = est | CT_DNAT
        assert batch["ct_state"].tolist() == [
            est, est | CT_REPLY, est, est | CT_REPLY, dn, dn | CT_REPLY, dn, dn | CT_REPLY, dn | CT_REPLY, 0, 0, 0]
        # after an event overrun the daemon asks the kernel per tuple (IPv6 CTA_IP_V6_* GET requests)
        fresh = ConntrackTable(max_entries=64, netns=t.router)
        try:
            asked = rows((UDP, t.CLIENT, t.SERVER, 41000, 5353), (TCP, t.SERVER, t.ROUTER_OUT, 80, 41002),
                         (UDP, t.CLIENT, t.SERVER, 41999, 5353))  # fmt: skip
            assert fresh.query_kernel(asked, zones=(ZONE,)) == 2
            assert fresh.enrich(asked) == 2
            assert [post(asked, i) for i in range(3)] == [
                (t.ROUTER_OUT, 41000, t.SERVER, 5353), (t.ROUTER_IN, 8080, t.CLIENT, 41002), ("::", 0, "::", 0)]
            assert asked["ct_zone"].tolist() == [ZONE, ZONE, 0]
        finally:
            fresh.close()

        hit = table.lookup(ConnKey(UDP, to_addr16(t.CLIENT), to_addr16(t.SERVER), 41000, 5353))
        assert hit is not None
        entry, is_reply = hit
        assert entry.ipv6 and not is_reply and entry.snat and not entry.dnat
        assert (entry.zone, entry.mark) == (ZONE, MARK)
        assert entry.counter_origin is not None and entry.counter_reply is not None
        assert (entry.counter_origin.packets, entry.counter_origin.bytes) == (1, IP6 + UDP_H + 4)
        assert (entry.counter_reply.packets, entry.counter_reply.bytes) == (1, IP6 + UDP_H + 4)
        assert entry.timestamp_start_ns is not None and abs(entry.timestamp_start_ns - time.time_ns()) < 60e9
        tcp = table.lookup(ConnKey(TCP, to_addr16(t.CLIENT), to_addr16(t.ROUTER_IN), 41002, 8080))
        assert tcp is not None and tcp[0].dnat and tcp[0].snat and tcp[0].tcp_state is not None
    finally:
        table.close()


@pytest.mark.root
def test_icmpv6_echo_and_error_quoted_tuple(topo: Nat66Topo) -> None:
    t = topo
    table = ConntrackTable(max_entries=256, netns=t.router)
    icmp = IcmpErrors(table, netns=t.router)
    try:
        assert icmp.available
        ping6(t, ident=0x1234, count=3, size=24)
        udp_exchange(t, 41010, 7000, b"first", reply=False)  # nobody answers: NEW
        port_unreachable(t, 41011, 9)
        # the kernel forwarded exactly one RELATED packet: ICMPv6(40+8) quoting IPv6(40)+UDP(8)+1 byte
        assert "packets 1 bytes 97" in sh("nft", "list", "counter", "ip6", "ipfxnat6", "related_seen",
                                          netns=t.router)  # fmt: skip
        udp_exchange(t, 41012, 7001, b"other")  # an unrelated connection between the same two hosts
        assert table.refresh() == 4  # echo, NEW udp, the refused udp, the other udp
        assert icmp.poll() == 2  # the error as it entered r_out (to the masquerade address) and left r_in
        unreach = DST_UNREACH * 256 + 4
        batch = rows(
            (ICMP6, t.CLIENT, t.SERVER, 0, ECHO_REQUEST * 256),  # echo request, inside, origin
            (ICMP6, t.SERVER, t.CLIENT, 0, ECHO_REPLY * 256),  # echo reply, inside, after de-NAT
            (ICMP6, t.ROUTER_OUT, t.SERVER, 0, ECHO_REQUEST * 256),  # echo request, outside, after NAT
            (ICMP6, t.SERVER, t.ROUTER_OUT, 0, ECHO_REPLY * 256),  # echo reply, outside, before de-NAT
            (UDP, t.CLIENT, t.SERVER, 41010, 7000),
            (ICMP6, t.SERVER, t.CLIENT, 0, unreach),  # the port unreachable, de-NATed, on r_in
            (ICMP6, t.SERVER, t.ROUTER_OUT, 0, unreach),  # the same error before de-NAT, on r_out
            (ICMP6, t.ROUTER_IN, t.CLIENT, 0, DST_UNREACH * 256 + 3),  # an error nobody sent
        )
        assert table.enrich(batch) == 5  # ICMPv6 errors are never matched on their own addresses
        assert icmp.enrich(batch) == (2, 1)
        est = CT_TRACKED | CT_ESTABLISHED | CT_SNAT
        rel = CT_TRACKED | CT_RELATED | CT_REPLY | CT_SNAT
        assert batch["ct_state"].tolist() == [
            est, est | CT_REPLY, est, est | CT_REPLY, CT_TRACKED | CT_NEW | CT_SNAT, rel, rel, 0]
        assert batch["ct_mark"].tolist() == [MARK] * 7 + [0]
        assert batch["ct_zone"].tolist() == [ZONE] * 7 + [0]
        # ICMP post ports stay 0; the addresses are translated like the packets were
        assert [post(batch, i) for i in range(4)] == [
            (t.ROUTER_OUT, 0, t.SERVER, 0), (t.SERVER, 0, t.CLIENT, 0)] * 2
        assert post(batch, 5) == post(batch, 6) == (t.SERVER, 0, t.CLIENT, 0)
        hit = table.lookup(ConnKey(ICMP6, to_addr16(t.CLIENT), to_addr16(t.SERVER), 0, ECHO_REQUEST * 256))
        assert hit is not None and hit[0].ipv6 and hit[0].origin is not None
        assert hit[0].origin.icmp_id == 0x1234
        assert hit[0].counter_origin is not None
        assert (hit[0].counter_origin.packets, hit[0].counter_origin.bytes) == (3, 3 * (IP6 + ICMP6_H + 24))
    finally:
        icmp.close()
        table.close()


@pytest.mark.root
def test_icmpv6_errors_quoting_extension_headers_and_packet_too_big(topo: Nat66Topo) -> None:
    """A port unreachable quoting a datagram that carried a Destination Options header (RFC 8200 4.6:
    the quoted UDP header follows it, and nf_conntrack_icmpv6 skips it to find the tuple), and a Packet
    Too Big the router itself sends (r_out's MTU 1280 < a 1400-byte datagram of an answered UDP
    connection through the DNAT), which leaves r_in translated back to the client's own tuple (RFC 4443
    3.2)."""
    t = topo
    table = ConntrackTable(max_entries=256, netns=t.router)
    icmp = IcmpErrors(table, netns=t.router)
    try:
        assert icmp.available
        cli = sock6(t.client, socket.SOCK_DGRAM, (t.CLIENT, 41030))
        try:
            cli.setsockopt(socket.IPPROTO_IPV6, IPV6_DSTOPTS, b"\x00\x00\x01\x04\x00\x00\x00\x00")  # PadN
            cli.connect((t.SERVER, 9))
            cli.send(b"x")
            with pytest.raises(ConnectionRefusedError):
                cli.recv(16)
        finally:
            cli.close()
        srv = sock6(t.server, socket.SOCK_DGRAM, ("::", 80))
        cli = sock6(t.client, socket.SOCK_DGRAM, (t.CLIENT, 41031))
        try:
            cli.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            cli.connect((t.ROUTER_IN, 8080))
            cli.send(b"small")  # answered: the connection is confirmed before the big datagram
            data, peer = srv.recvfrom(2048)
            srv.sendto(data, peer)
            assert cli.recv(2048) == b"small"
            ip("-n", t.router, "link", "set", t.r_out, "mtu", "1280")
            cli.send(b"b" * 1400)
            _data, anc, _flags, _addr = cli.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
            assert len(anc) == 1  # struct sock_extended_err: errno, origin 3 (ICMP6), type, code, pad, info
            _errno, origin, typ, _code, _pad, info = struct.unpack_from("=IBBBBI", anc[0][2])
            assert (origin, typ, info) == (3, PACKET_TOO_BIG, 1280)  # the PTB reached the client
        finally:
            cli.close()
            srv.close()
        # forwarded RELATED: the unreachable, ICMPv6(40+8) quoting IPv6(40)+DSTOPTS(8)+UDP(8)+1 byte; the
        # router's own PTB is not forwarded
        assert "packets 1 bytes 105" in sh("nft", "list", "counter", "ip6", "ipfxnat6", "related_seen",
                                           netns=t.router)  # fmt: skip
        assert table.refresh() == 2
        assert icmp.poll() == 3, list(icmp._pending)  # unreachable in at r_out and out of r_in; the PTB out of r_in
        batch = rows(
            (ICMP6, t.SERVER, t.ROUTER_OUT, 0, DST_UNREACH * 256 + 4),  # before de-NAT, on r_out
            (ICMP6, t.SERVER, t.CLIENT, 0, DST_UNREACH * 256 + 4),  # de-NATed, on r_in
            (ICMP6, t.ROUTER_IN, t.CLIENT, 0, PACKET_TOO_BIG * 256),  # the router's own, on r_in
        )
        assert icmp.enrich(batch) == (3, 0)
        rel = CT_TRACKED | CT_RELATED | CT_REPLY
        assert batch["ct_state"].tolist() == [rel | CT_SNAT, rel | CT_SNAT, rel | CT_SNAT | CT_DNAT]
        assert batch["ct_mark"].tolist() == [MARK] * 3 and batch["ct_zone"].tolist() == [ZONE] * 3
        assert [post(batch, i) for i in range(3)] == [(t.SERVER, 0, t.CLIENT, 0)] * 2 + [
            (t.ROUTER_IN, 0, t.CLIENT, 0)]
    finally:
        icmp.close()
        table.close()


@pytest.mark.root
def test_nat66_events(topo: Nat66Topo) -> None:
    """NEW/DESTROY events of an IPv6 connection, and its NAT66 records (natEvent 1/2: RFC 8158 defines
    session create/delete for NAT44 and NAT64 only)."""
    t = topo
    events = ConntrackEvents(netns=t.router, capacity=16)
    try:
        assert events.available
        udp_exchange(t, 41020, 0, b"12345678", via_dnat=True)
        sh("conntrack", "-D", "-f", "ipv6", "-p", "udp", "--orig-port-src", "41020", netns=t.router)
        got: list[FlowEvent] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(e.kind == "destroy" for e in got):
            events.poll(0.2)
            got.extend(events.drain())
        key = ConnKey(UDP, to_addr16(t.CLIENT), to_addr16(t.ROUTER_IN), 41020, 8080)
        assert [(e.kind, e.key) for e in got] == [("new", key), ("destroy", key)]
        nat = nat_event_records(got)
        assert nat["nat_event"].tolist() == [NAT_EVENT_CREATE, NAT_EVENT_DELETE]
        assert nat["ethertype"].tolist() == [ETH_P_IPV6] * 2
        assert [post(nat, i) for i in range(2)] == [(t.ROUTER_OUT, 41020, t.SERVER, 80)] * 2
        assert (int(nat[1]["packets"]), int(nat[1]["octets"])) == (1, IP6 + UDP_H + 8)
        assert nat["ct_mark"].tolist() == [MARK] * 2 and nat["ct_zone"].tolist() == [ZONE] * 2
    finally:
        events.close()


@pytest.mark.root
def test_bulk_decoder_on_a_mixed_ipv4_ipv6_dump(topo: Nat66Topo) -> None:
    """The batched dump decoder (ctnetlink.parse_dump) against the per-message reference (parse_entry) on
    a real dump mixing NAT66 TCP/UDP/ICMPv6 entries (with counters, timestamps, zone, mark) and plain
    IPv4 entries: several message shapes in one dump, equal rows."""
    t = topo
    udp_exchange(t, 41040, 0, b"dnat", via_dnat=True)
    tcp_exchange(t, 41041)
    ping6(t, ident=0x77, count=2, size=8)
    sock = open_ctnetlink(t.router)
    try:
        insert_entries(sock, [(17, bytes([10, 9, 0, i]), bytes([192, 0, 2, 9]), 2000 + i, 53, 0) for i in range(40)])
        rows4_6 = dump_conntrack(sock)
        assert len(rows4_6) == 43
        seq = 4243
        sock.send(dump_request(seq))
        datagrams: list[bytes] = []
        for _ in range(1000):  # bounded: a 43-entry dump is a few datagrams
            if datagrams and parse_dump(datagrams[-1:], seq, ParseStats())[1].done:
                break
            select.select([sock], [], [], 5)
            datagrams.append(sock.recv(1 << 20))
        bulk, summary = parse_dump(datagrams, seq, ParseStats())
        ref = np.concatenate([reference_rows(d) for d in datagrams])
        ref["kind"] = 0
        assert summary.done and len(bulk) == 43 and bulk.tobytes() == ref.tobytes()
        v6rows = bulk[np.isin(bulk["proto"], (TCP, ICMP6)) | (bulk["o_sport"] == 41040)]
        assert len(v6rows) == 3
        assert (v6rows["zone"] == ZONE).all() and (v6rows["mark"] == MARK).all() and (v6rows["has"] & 3 == 3).all()
        assert {addr16_to_str(bytes(a)) for a in v6rows["r_dst"]} == {t.ROUTER_OUT}
    finally:
        sock.close()


def reference_rows(data: bytes) -> np.ndarray:
    """Every conntrack message of a datagram through the per-message decoder (parse_entry)."""
    out = []
    off = 0
    for _ in range(len(data) // 16 + 1):  # bounded: each message is at least 16 bytes
        if off + 16 > len(data):
            break
        length, mtype = struct.unpack_from("=IH", data, off)
        if length < 16 or off + length > len(data):
            break
        if mtype >> 8 == 1 and length >= 20:
            out.append(parse_entry(data, off + 20, off + length, KIND_NEW))
        off += (length + 3) & ~3
    return np.frombuffer(b"".join(out), dtype=CT_DTYPE) if out else np.zeros(0, dtype=CT_DTYPE)


# -- through the daemon -------------------------------------------------------------------------------
CT_TRK, CT_EST, CT_REL, CT_RPL, CT_SNAT_, CT_DNAT_ = 0x20, 0x02, 0x04, 0x08, 0x40, 0x80
UDP_SIZES = [100, 200, 300, 400, 500]


def ct_counters(t: Nat66Topo, proto: str, sport: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((orig packets, bytes), (reply packets, bytes)) of an IPv6 connection, per conntrack."""
    out = sh("conntrack", "-L", "-f", "ipv6", "-p", proto, "--orig-port-src", str(sport), "-o", "extended",
             netns=t.router)  # fmt: skip
    line = next(x for x in out.splitlines() if f"sport={sport} " in x)
    pk = [int(v) for v in re.findall(r"packets=(\d+)", line)]
    by = [int(v) for v in re.findall(r"bytes=(\d+)", line)]
    return (pk[0], by[0]), (pk[1], by[1])


def nfdump_records(nfc: Nfcapd) -> list[dict[str, Any]]:
    """Every record nfcapd stored (after stop), as nfdump -o json prints it. Nfcapd.stop keeps "FLOW"
    records only, and nfdump 1.7.1 types every NetFlow v9 record of a template with natEvent "EVENT"."""
    out: list[dict[str, Any]] = []
    for path in sorted(nfc.dir.glob("nfcapd.[0-9]*")):
        res = subprocess.run(["nfdump", "-r", str(path), "-o", "json"], capture_output=True, text=True,
                             timeout=30, check=True)  # fmt: skip
        if res.stdout.strip():
            out.extend(json.loads(res.stdout))
    return out


def v6(a: Any) -> str:
    return str(ipaddress.IPv6Address(str(a)))


@pytest.mark.root
@pytest.mark.interop
@pytest.mark.parametrize("source", ["ebpf", "nflog"])
def test_nat66_at_nfdump_and_decoder(tmp_path: Path, topo: Nat66Topo, source: str) -> None:
    t = topo
    coll = collector_in(t.router)
    nfc = Nfcapd(tmp_path / "nfcapd", free_udp_port(), netns=t.router)
    udp_sport, tcp_sport, ping_id, ping_n, ping_size = 41101, 41102, 0x4321, 4, 56
    counters: dict[str, Any] = {}
    try:
        cfg = write_config(
            tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": coll.port},
                                        {"address": "127.0.0.1", "port": nfc.port, "protocol": "netflow9"}],
            source=source, interfaces={"include": [t.r_in, t.r_out], "exclude": [], "direction": "ingress"},
            timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"}, lock_dir=str(tmp_path / "lock"),
            templates={"ipv4": "ipv4_nat_flow", "ipv6": "ipv6_nat_flow"},
            enrichment={"conntrack": True, "nat_events": True, "nflog_group": 17},
        )  # fmt: skip
        log = tmp_path / "ipfixer.log"
        proc = start_ipfixer(t.router, cfg, log, env=cli_env())
        try:
            server = sock6(t.server, socket.SOCK_DGRAM, ("::", 80))
            udp_echo_rounds(server, sock6(t.client, socket.SOCK_DGRAM, ("::", udp_sport)), (t.ROUTER_IN, 8080),
                            UDP_SIZES)
            tcp_exchange(t, tcp_sport, rounds=3)
            ping6(t, ping_id, ping_n, ping_size)
            port_unreachable(t, 41103, 9)
            counters["tcp"] = ct_counters(t, "tcp", tcp_sport)
            counters["udp"] = ct_counters(t, "udp", udp_sport)
            time.sleep(1.5)  # the NAT events of this traffic go out at the next drain
        finally:
            assert stop_ipfixer(proc) == 0, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()
        # every flow found its entry; the links' MLD reports (never tracked by the kernel) are no miss
        assert "matched no conntrack entry" not in log.read_text(), log.read_text()
        coll.receive(5, until_idle=1.0)
        nfc.stop()
        nf = nfdump_records(nfc)
    finally:
        coll.close()
        nfc.kill()

    udp_octets = sum(IP6 + UDP_H + n for n in UDP_SIZES)
    assert counters["udp"] == ((5, udp_octets), (5, udp_octets))
    (tcp_o, tcp_r) = counters["tcp"]
    ping_octets = ping_n * (IP6 + ICMP6_H + ping_size)
    every = coll.flow_records()
    recs = [r for r in every if not r.get("natEvent")]
    for r in recs:
        for k in ("sourceIPv6Address", "destinationIPv6Address", "postNATSourceIPv6Address",
                  "postNATDestinationIPv6Address"):  # fmt: skip
            if k in r:
                r[k] = v6(r[k])
    totals = totals_by_flow(recs)
    # origin direction seen entering r_in before DNAT; reply direction seen entering r_out before de-NAT
    assert totals[(t.CLIENT, t.ROUTER_IN, udp_sport, 8080, UDP)] == [5, udp_octets]
    assert totals[(t.SERVER, t.ROUTER_OUT, 80, udp_sport, UDP)] == [5, udp_octets]
    assert totals[(t.CLIENT, t.ROUTER_IN, tcp_sport, 8080, TCP)] == list(tcp_o)
    assert totals[(t.SERVER, t.ROUTER_OUT, 80, tcp_sport, TCP)] == list(tcp_r)

    def match(**kv: Any) -> list[dict[str, Any]]:
        return [r for r in recs if all(r.get(k) == v for k, v in kv.items())]

    def xlat(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["postNATSourceIPv6Address"], r["postNATDestinationIPv6Address"],
                r["postNAPTSourceTransportPort"], r["postNAPTDestinationTransportPort"],
                r["ctState"], r["ctMark"], r["ctZone"])  # fmt: skip

    nat2 = CT_TRK | CT_EST | CT_SNAT_ | CT_DNAT_
    for proto, sport in ((UDP, udp_sport), (TCP, tcp_sport)):
        orig = match(sourceTransportPort=sport, destinationTransportPort=8080, protocolIdentifier=proto)
        reply = match(sourceTransportPort=80, destinationTransportPort=sport, protocolIdentifier=proto)
        assert orig and reply
        assert {xlat(r) for r in orig} == {(t.ROUTER_OUT, t.SERVER, sport, 80, nat2, MARK, ZONE)}
        assert {xlat(r) for r in reply} == {(t.ROUTER_IN, t.CLIENT, 8080, sport, nat2 | CT_RPL, MARK, ZONE)}
    # ICMPv6 echo: request entering r_in, reply entering r_out (to the masquerade address)
    req = match(sourceIPv6Address=t.CLIENT, protocolIdentifier=ICMP6, icmpTypeCodeIPv6=ECHO_REQUEST * 256)
    rep = match(sourceIPv6Address=t.SERVER, protocolIdentifier=ICMP6, icmpTypeCodeIPv6=ECHO_REPLY * 256)
    assert [sum(r["packetDeltaCount"] for r in req), sum(r["octetDeltaCount"] for r in req)] == [ping_n, ping_octets]
    assert [sum(r["packetDeltaCount"] for r in rep), sum(r["octetDeltaCount"] for r in rep)] == [ping_n, ping_octets]
    snat = CT_TRK | CT_EST | CT_SNAT_
    assert {xlat(r) for r in req} == {(t.ROUTER_OUT, t.SERVER, 0, 0, snat, MARK, ZONE)}
    assert {xlat(r) for r in rep} == {(t.SERVER, t.CLIENT, 0, 0, snat | CT_RPL, MARK, ZONE)}

    # the server's port unreachable entering r_out (to the masquerade address): joined on its quoted tuple
    unreach = match(sourceIPv6Address=t.SERVER, protocolIdentifier=ICMP6, icmpTypeCodeIPv6=DST_UNREACH * 256 + 4)
    assert [(r["packetDeltaCount"], r["octetDeltaCount"]) for r in unreach] == [(1, IP6 + ICMP6_H + IP6 + UDP_H + 1)]
    assert xlat(unreach[0]) == (t.SERVER, t.CLIENT, 0, 0, CT_TRK | CT_REL | CT_RPL | CT_SNAT_, MARK, ZONE)

    # NAT66 session create records (natEvent 1: NAT44's 4 is for IPv4 only), without counters
    events = [r for r in every if r.get("natEvent")]
    for r in events:
        for k in ("sourceIPv6Address", "destinationIPv6Address", "postNATSourceIPv6Address",
                  "postNATDestinationIPv6Address"):  # fmt: skip
            if k in r:
                r[k] = v6(r[k])
    for proto, sport, pdst, pdport in ((UDP, udp_sport, t.SERVER, 80), (TCP, tcp_sport, t.SERVER, 80)):
        ev = [r for r in events if r.get("sourceTransportPort") == sport and r["protocolIdentifier"] == proto
              and r["natEvent"] == NAT_EVENT_CREATE]  # fmt: skip
        assert len(ev) == 1, events
        assert (ev[0]["sourceIPv6Address"], ev[0]["destinationIPv6Address"], ev[0]["destinationTransportPort"],
                ev[0]["postNATSourceIPv6Address"], ev[0]["postNATDestinationIPv6Address"],
                ev[0]["postNAPTSourceTransportPort"], ev[0]["postNAPTDestinationTransportPort"],
                ev[0]["packetDeltaCount"]) == (t.CLIENT, t.ROUTER_IN, 8080, t.ROUTER_OUT, pdst, sport, pdport, 0)

    # nfdump (NetFlow v9: nfdump's IPFIX reader, 1.7.1 to 1.7.8, has no entry for IEs 281/282 and drops
    # them; its v9 reader maps them): the translations under src6_xlt_ip/dst6_xlt_ip/src_xlt_port/dst_xlt_port
    def nf_flows(sa: str, sp: int, proto: int) -> list[dict[str, Any]]:
        return [f for f in nf if f.get("src6_addr") and v6(f["src6_addr"]) == sa and f.get("src_port") == sp
                and f.get("proto") == proto and f.get("nat_event_id") == "0"]  # fmt: skip

    for proto, sport, (opk, oby), (rpk, rby) in ((UDP, udp_sport, (5, udp_octets), (5, udp_octets)),
                                                 (TCP, tcp_sport, tcp_o, tcp_r)):  # fmt: skip
        orig = nf_flows(t.CLIENT, sport, proto)
        reply = [f for f in nf_flows(t.SERVER, 80, proto) if f.get("dst_port") == sport]
        assert orig and reply, json.dumps(nf)[:3000]
        assert (sum(f["in_packets"] for f in orig), sum(f["in_bytes"] for f in orig)) == (opk, oby)
        assert (sum(f["in_packets"] for f in reply), sum(f["in_bytes"] for f in reply)) == (rpk, rby)
        for f in orig:
            assert (v6(f["src6_xlt_ip"]), v6(f["dst6_xlt_ip"]), f["src_xlt_port"], f["dst_xlt_port"]) == (
                t.ROUTER_OUT, t.SERVER, str(sport), "80"), f  # fmt: skip
        for f in reply:
            assert (v6(f["src6_xlt_ip"]), v6(f["dst6_xlt_ip"]), f["src_xlt_port"], f["dst_xlt_port"]) == (
                t.ROUTER_IN, t.CLIENT, "8080", str(sport)), f  # fmt: skip
    nf_req = [f for f in nf if f.get("proto") == ICMP6 and f.get("icmp_type") == ECHO_REQUEST
              and f.get("nat_event_id") == "0" and v6(f.get("src6_addr", "::")) == t.CLIENT]  # fmt: skip
    assert (sum(f["in_packets"] for f in nf_req), sum(f["in_bytes"] for f in nf_req)) == (ping_n, ping_octets)
    for f in nf_req:
        assert (v6(f["src6_xlt_ip"]), v6(f["dst6_xlt_ip"])) == (t.ROUTER_OUT, t.SERVER), f
    nf_events = [f for f in nf if f.get("nat_event_id") == str(NAT_EVENT_CREATE) and f.get("src6_addr")]
    for proto, sport in ((UDP, udp_sport), (TCP, tcp_sport)):
        ev = [f for f in nf_events if f["proto"] == proto and f["src_port"] == sport]
        assert len(ev) == 1, json.dumps([f for f in nf if f.get("nat_event_id") != "0"])[:3000]
        assert (v6(ev[0]["src6_addr"]), v6(ev[0]["src6_xlt_ip"]), v6(ev[0]["dst6_xlt_ip"]), ev[0]["src_xlt_port"],
                ev[0]["dst_xlt_port"], ev[0]["in_packets"]) == (
            t.CLIENT, t.ROUTER_OUT, t.SERVER, str(sport), "80", 0)  # fmt: skip


def icmp6_error(inner: bytes) -> bytes:
    """An ICMPv6 port unreachable from the server to the client quoting `inner` (RFC 4443 3.1)."""
    body = struct.pack("!BBHI", DST_UNREACH, 4, 0, 0) + inner
    return (struct.pack("!IHBB", 6 << 28, len(body), ICMP6, 64) + to_addr16("fd91:2::2") + to_addr16("fd91:1::2")
            + body)  # fmt: skip


def quoted6(next_header: int, ext: bytes, l4: bytes) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(ext) + len(l4), next_header, 64) + to_addr16("fd91:1::2")
            + to_addr16("fd91:2::2") + ext + l4)  # fmt: skip


def test_quoted_ipv6_extension_headers_without_kernel() -> None:
    """The quoted packet's hop-by-hop, destination options, routing, first-fragment and AH headers are
    skipped to its UDP ports; a non-first fragment, a chain cut short or longer than the bounded walk
    quotes no tuple (None), never an exception or a wrong port pair."""
    from ipfixer.enrich.icmp import quoted_tuple

    udp = struct.pack("!HHHH", 41030, 9, 9, 0) + b"x"
    hop = bytes([60, 0]) + bytes(6)  # -> dstopts
    dst = bytes([43, 0, 1, 4]) + bytes(4)  # -> routing
    rt = bytes([44, 0, 0, 0]) + bytes(4)  # -> fragment (segments left 0)
    frag0 = bytes([51, 0]) + struct.pack("!HI", 0x0001, 7)  # offset 0, more fragments -> AH
    ah = bytes([UDP, 2]) + bytes(14)  # (2 + 2) * 4 = 16 octets -> UDP
    pkt = icmp6_error(quoted6(0, hop + dst + rt + frag0 + ah, udp))
    got = quoted_tuple(pkt, ETH_P_IPV6)
    assert got is not None and got[5:] == (UDP, 41030, 9)
    assert got[3] == to_addr16("fd91:1::2") and got[4] == to_addr16("fd91:2::2")
    later = bytes([UDP, 0]) + struct.pack("!HI", 0x0008, 7)  # offset 1 (8 octets): no UDP header here
    assert quoted_tuple(icmp6_error(quoted6(44, later, udp)), ETH_P_IPV6) is None
    assert quoted_tuple(icmp6_error(quoted6(60, bytes([UDP, 3]) + bytes(6), udp)), ETH_P_IPV6) is None  # cut
    chain = b"".join(bytes([60, 0]) + bytes(6) for _ in range(9)) + bytes([UDP, 0]) + bytes(6)
    assert quoted_tuple(icmp6_error(quoted6(60, chain, udp)), ETH_P_IPV6) is None  # beyond the walk
    plain = quoted_tuple(icmp6_error(quoted6(UDP, b"", udp)), ETH_P_IPV6)
    assert plain is not None and plain[5:] == (UDP, 41030, 9)
