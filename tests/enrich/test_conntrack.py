"""Conntrack enrichment against the real kernel: a router netns doing masquerade + DNAT between a client and
a server netns; flows are rows as the meter on the router's interfaces would see them."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ipfixer.enrich.conntrack import (
    CT_DNAT,
    CT_ESTABLISHED,
    CT_NEW,
    CT_RELATED,
    CT_REPLY,
    CT_SNAT,
    CT_TRACKED,
    ConnKey,
    ConntrackEntry,
    ConntrackTable,
    CtTuple,
)
from ipfixer.enrich.events import (
    NAT44_SESSION_CREATE,
    NAT44_SESSION_DELETE,
    ConntrackEvents,
    FlowEvent,
    apply_destroy,
    nat_event_records,
)
from ipfixer.enrich.icmp import IcmpErrors
from ipfixer.lab import ns_socket, sh
from ipfixer.model import EndReason, addr16_to_str, empty_batch, to_addr16
from tests.labs import NatTopo, make_nat_topo

UDP, TCP, ICMP = 17, 6, 1


@pytest.fixture
def topo() -> Iterator[NatTopo]:
    t = make_nat_topo(zone=7, mark=0x2A)
    try:
        yield t
    finally:
        t.teardown()


def rows(*flows: tuple[int, str, str, int, int]) -> np.ndarray:
    """A batch with one row per (protocol, src, dst, sport, dport)."""
    batch = empty_batch(len(flows))
    for i, (proto, src, dst, sp, dp) in enumerate(flows):
        batch[i]["protocol"] = proto
        batch[i]["src_addr"] = np.frombuffer(to_addr16(src), np.uint8)
        batch[i]["dst_addr"] = np.frombuffer(to_addr16(dst), np.uint8)
        batch[i]["src_port"], batch[i]["dst_port"] = sp, dp
    return batch


def post(batch: np.ndarray, i: int) -> tuple[str, int, str, int]:
    r = batch[i]
    return (addr16_to_str(bytes(r["post_src_addr"])), int(r["post_src_port"]),
            addr16_to_str(bytes(r["post_dst_addr"])), int(r["post_dst_port"]))  # fmt: skip


def udp_exchange(t: NatTopo, sport: int, dport: int, payload: bytes, reply: bool = True) -> tuple[str, int]:
    """Client sport -> server dport; server echoes when reply; returns the source the server saw."""
    srv = ns_socket(t.server, socket.SOCK_DGRAM, (t.SERVER, dport))
    cli = ns_socket(t.client, socket.SOCK_DGRAM, (t.CLIENT, sport))
    try:
        cli.sendto(payload, (t.SERVER, dport))
        data, peer = srv.recvfrom(2048)
        assert data == payload
        if reply:
            srv.sendto(data, peer)
            assert cli.recvfrom(2048)[0] == payload
        return peer
    finally:
        cli.close()
        srv.close()


@pytest.mark.root
def test_enrich_fills_post_nat_mark_zone(topo: NatTopo) -> None:
    t = topo
    peer = udp_exchange(t, 40000, 5353, b"ping")
    assert peer == (t.ROUTER_OUT, 40000)  # the kernel really masqueraded
    srv = ns_socket(t.server, socket.SOCK_STREAM, (t.SERVER, 80))
    srv.listen(1)
    cli = ns_socket(t.client, socket.SOCK_STREAM, (t.CLIENT, 40001))
    try:
        cli.connect((t.ROUTER_IN, 8080))
        conn, tcp_peer = srv.accept()
        assert tcp_peer == (t.ROUTER_OUT, 40001)
        cli.sendall(b"hello")
        assert conn.recv(16) == b"hello"
        conn.close()
    finally:
        cli.close()
        srv.close()

    table = ConntrackTable(max_entries=64, netns=t.router)
    try:
        assert table.available
        assert table.refresh() >= 2
        batch = rows(
            (UDP, t.CLIENT, t.SERVER, 40000, 5353),  # inside interface, origin direction
            (UDP, t.SERVER, t.CLIENT, 5353, 40000),  # inside interface, reply (after de-NAT)
            (TCP, t.CLIENT, t.ROUTER_IN, 40001, 8080),  # DNAT'ed connection, pre-NAT
            (UDP, t.ROUTER_OUT, t.SERVER, 40000, 5353),  # outside interface, origin (post-NAT)
            (UDP, t.CLIENT, t.SERVER, 49999, 5353),  # no such connection
        )
        assert table.enrich(batch) == 4
        assert post(batch, 0) == (t.ROUTER_OUT, 40000, t.SERVER, 5353)
        assert post(batch, 1) == (t.SERVER, 5353, t.CLIENT, 40000)
        assert post(batch, 2) == (t.ROUTER_OUT, 40001, t.SERVER, 80)
        assert post(batch, 3) == (t.ROUTER_OUT, 40000, t.SERVER, 5353)
        assert post(batch, 4) == ("::", 0, "::", 0)
        assert batch["ct_mark"].tolist() == [0x2A, 0x2A, 0x2A, 0x2A, 0]
        assert batch["ct_zone"].tolist() == [7, 7, 7, 7, 0]
        est = CT_TRACKED | CT_ESTABLISHED | CT_SNAT
        assert batch["ct_state"].tolist() == [est, est | CT_REPLY, est | CT_DNAT, est, 0]

        hit = table.lookup(ConnKey(UDP, to_addr16(t.CLIENT), to_addr16(t.SERVER), 40000, 5353))
        assert hit is not None
        entry, is_reply = hit
        assert not is_reply and entry.zone == 7 and entry.mark == 0x2A and entry.snat and not entry.dnat
        assert entry.counter_origin is not None and entry.counter_reply is not None
        assert (entry.counter_origin.packets, entry.counter_origin.bytes) == (1, 20 + 8 + 4)
        assert (entry.counter_reply.packets, entry.counter_reply.bytes) == (1, 20 + 8 + 4)
        assert entry.timestamp_start_ns is not None and abs(entry.timestamp_start_ns - time.time_ns()) < 60e9
        assert "SEEN_REPLY" in entry.status_names and "SRC_NAT" in entry.status_names
        tcp = table.lookup(ConnKey(TCP, to_addr16(t.CLIENT), to_addr16(t.ROUTER_IN), 40001, 8080))
        assert tcp is not None and tcp[0].dnat and tcp[0].tcp_state is not None
    finally:
        table.close()


@pytest.mark.root
def test_ct_state_new_related_and_bound(topo: NatTopo) -> None:
    t = topo
    table = ConntrackTable(max_entries=2048, netns=t.router)
    icmp = IcmpErrors(table, netns=t.router)
    try:
        assert icmp.available
        udp_exchange(t, 40010, 7000, b"first", reply=False)  # nobody answers: NEW
        cli = ns_socket(t.client, socket.SOCK_DGRAM, (t.CLIENT, 40011))
        try:  # closed port: the server's ICMP port unreachable is RELATED to this connection
            cli.connect((t.SERVER, 9))
            cli.send(b"x")
            with pytest.raises(ConnectionRefusedError):
                cli.recv(16)
        finally:
            cli.close()
        # the kernel forwarded exactly one RELATED packet: ICMP(20+8) quoting IP(20)+UDP(8)+1 byte
        assert "packets 1 bytes 57" in sh(
            "nft", "list", "counter", "ip", "ipfxnat", "related_seen", netns=t.router
        )
        # an unrelated connection between the same two hosts, with another mark: it must not lend its state
        udp_exchange(t, 40012, 7001, b"other")
        assert table.refresh() == 3
        assert icmp.poll() == 2  # the error as it entered r_out (to the masquerade address) and left r_in
        batch = rows(
            (UDP, t.CLIENT, t.SERVER, 40010, 7000),
            (ICMP, t.SERVER, t.CLIENT, 0, 3 * 256 + 3),  # port unreachable, reply direction, de-NATed
            (ICMP, t.SERVER, t.ROUTER_OUT, 0, 3 * 256 + 3),  # the same error before de-NAT, on r_out
            (ICMP, t.ROUTER_IN, t.CLIENT, 0, 3 * 256 + 1),  # an error nobody sent: unknown
        )
        assert table.enrich(batch) == 1  # ICMP errors are never matched on their own addresses
        assert icmp.enrich(batch) == (2, 1)
        assert batch["ct_state"].tolist() == [
            CT_TRACKED | CT_NEW | CT_SNAT,
            CT_TRACKED | CT_RELATED | CT_REPLY | CT_SNAT,
            CT_TRACKED | CT_RELATED | CT_REPLY | CT_SNAT,
            0,
        ]
        assert batch["ct_mark"].tolist() == [0x2A, 0x2A, 0x2A, 0]
        # translated like the kernel translated the error: de-SNAT of the destination
        assert post(batch, 1) == (t.SERVER, 0, t.CLIENT, 0)
        assert post(batch, 2) == (t.SERVER, 0, t.CLIENT, 0)
    finally:
        icmp.close()
        table.close()

    small = ConntrackTable(max_entries=1, netns=t.router)
    try:
        assert small.refresh() == 3 and len(small) == 1  # bounded: the rest counted as evicted
        assert small.counters.evictions == 2
    finally:
        small.close()


@pytest.mark.root
def test_destroy_event_ends_flow(topo: NatTopo) -> None:
    t = topo
    events = ConntrackEvents(netns=t.router, capacity=16)
    try:
        assert events.available
        before = time.monotonic_ns()
        udp_exchange(t, 40004, 5353, b"12345678")
        sh("conntrack", "-D", "-p", "udp", "--orig-port-src", "40004", netns=t.router)
        got: list[FlowEvent] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(e.kind == "destroy" for e in got):
            events.poll(0.2)
            got.extend(events.drain())
        after = time.monotonic_ns()
        key = ConnKey(UDP, to_addr16(t.CLIENT), to_addr16(t.SERVER), 40004, 5353)
        assert [(e.kind, e.key) for e in got] == [("new", key), ("destroy", key)]
        assert all(before <= e.timestamp_ns <= after for e in got)
        assert events.dropped == 0

        batch = rows(
            (UDP, t.CLIENT, t.SERVER, 40004, 5353),  # inside, origin
            (UDP, t.SERVER, t.ROUTER_OUT, 5353, 40004),  # outside, reply (before de-NAT)
            (UDP, t.CLIENT, t.SERVER, 40005, 5353),  # another flow
            (UDP, t.SERVER, t.CLIENT, 5353, 40004),  # inside, reply, exported on active timeout
        )
        batch["end_reason"] = [EndReason.IDLE_TIMEOUT, 0, EndReason.IDLE_TIMEOUT, EndReason.ACTIVE_TIMEOUT]
        assert apply_destroy(got, batch) == 2
        assert batch["end_reason"].tolist() == [3, 3, 1, 2]

        nat = nat_event_records(got)
        assert nat["nat_event"].tolist() == [NAT44_SESSION_CREATE, NAT44_SESSION_DELETE]
        assert [post(nat, i) for i in range(2)] == [(t.ROUTER_OUT, 40004, t.SERVER, 5353)] * 2
        assert addr16_to_str(bytes(nat[1]["src_addr"])) == t.CLIENT and int(nat[1]["src_port"]) == 40004
        assert (int(nat[1]["packets"]), int(nat[1]["octets"])) == (1, 20 + 8 + 8)
        assert nat["ct_mark"].tolist() == [0x2A, 0x2A]  # NEW is sent at confirmation, after the mark rule
    finally:
        events.close()


@pytest.mark.root
def test_unavailable_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    table = ConntrackTable(netns="/nonexistent/ipfxnone")
    assert not table.available and table.refresh() == 0
    assert table.enrich(rows((UDP, "10.0.0.1", "10.0.0.2", 1, 2))) == 0
    assert "conntrack enrichment disabled" in caplog.text
    events = ConntrackEvents(netns="/nonexistent/ipfxnone")
    assert not events.available and events.poll(0.01) == 0 and events.drain() == []


def test_role_keys_and_state_without_kernel() -> None:
    c, r, s = to_addr16("10.0.0.2"), to_addr16("192.0.2.1"), to_addr16("198.51.100.7")
    e = ConntrackEntry(
        origin=CtTuple(c, s, UDP, 1000, 53), reply=CtTuple(s, r, UDP, 53, 2000), status=(1 << 1) | (1 << 4)
    )
    assert e.snat and not e.dnat
    assert [(k.src_port, k.dst_port, rep) for k, rep in e.role_keys()] == [
        (1000, 53, False), (53, 2000, True), (2000, 53, False), (53, 1000, True)]  # fmt: skip
    assert e.ct_state(True) == CT_TRACKED | CT_ESTABLISHED | CT_REPLY | CT_SNAT
