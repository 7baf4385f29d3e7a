"""The enrichment layer inside the real daemon: `ipfixer run` in the router namespace of the NAT topology
(client -- router with masquerade + DNAT -- server), real conntrack and nftables, real collectors
(nfcapd/nfdump and a UDP socket decoded with ipfixer's Decoder). Exact values and counts of the traffic
each test sends; every namespace, process and nft table is removed in a finally."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfixer.lab import ns_socket, sh, start_ipfixer, stop_ipfixer
from tests.cli.helpers import cli_env, totals_by_flow, write_config
from tests.cli.test_daemon import collector_in
from tests.collectors import Nfcapd, free_udp_port
from tests.labs import NatTopo, make_nat_topo, tcp_rounds, udp_echo_rounds

pytestmark = pytest.mark.root

ZONE, MARK = 7, 0x2A
UDP_SPORT = 40001
UDP_SIZES = [100, 200, 300, 400, 500]
CT_TRK, CT_EST, CT_RPL, CT_SNAT, CT_DNAT = 0x20, 0x02, 0x08, 0x40, 0x80


@pytest.fixture
def topo() -> Iterator[NatTopo]:
    t = make_nat_topo(zone=ZONE, mark=MARK)
    try:
        yield t
    finally:
        sh("nft", "delete", "table", "inet", "ipfixer", netns=t.router, check=False)
        t.teardown()


def config(
    tmp: Path, t: NatTopo, ports: list[int], source: str = "ebpf", idle: str = "30s", include: list[str] | None = None
) -> Path:
    return write_config(
        tmp / f"ipfixer-{source}.yaml", [{"address": "127.0.0.1", "port": p} for p in ports],
        source=source, interfaces={"include": include or [t.r_in, t.r_out], "exclude": [], "direction": "ingress"},
        timeouts={"active": "60s", "idle": idle, "drain_interval": "500ms"}, lock_dir=str(tmp / "lock"),
        templates={"ipv4": "ipv4_nat_flow", "ipv6": "ipv6_nat_flow"},
        enrichment={"conntrack": True, "nat_events": True, "nflog_group": 17},
    )  # fmt: skip


def udp_echo(t: NatTopo, sport: int, sizes: list[int]) -> None:
    """Client -> router:8080 (DNAT to server:80), the server echoes every datagram back."""
    server = ns_socket(t.server, socket.SOCK_DGRAM, ("0.0.0.0", 80))
    udp_echo_rounds(server, ns_socket(t.client, socket.SOCK_DGRAM, ("0.0.0.0", sport)), (t.ROUTER_IN, 8080), sizes)


def tcp_exchange(t: NatTopo, sport: int) -> None:
    """One TCP connection through the DNAT: three 600-byte requests answered by 300-byte replies, then
    an orderly close (labs.tcp_rounds)."""
    listener = ns_socket(t.server, socket.SOCK_STREAM, ("0.0.0.0", 80))
    listener.listen(1)
    tcp_rounds(listener, ns_socket(t.client, socket.SOCK_STREAM, ("0.0.0.0", sport)), (t.ROUTER_IN, 8080), 3)


def ct_counters(t: NatTopo, proto: str, sport: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """((orig packets, bytes), (reply packets, bytes), masquerade port) of a connection, per conntrack."""
    out = sh("conntrack", "-L", "-p", proto, "--orig-port-src", str(sport), "-o", "extended", netns=t.router)
    line = next(x for x in out.splitlines() if f"sport={sport} " in x)
    pk = [int(v) for v in re.findall(r"packets=(\d+)", line)]
    by = [int(v) for v in re.findall(r"bytes=(\d+)", line)]
    dports = [int(v) for v in re.findall(r"dport=(\d+)", line)]
    return (pk[0], by[0]), (pk[1], by[1]), dports[1]  # reply tuple's dport = the masqueraded source port


def flows_only(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("natEvent")]


def one(records: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def run_daemon(tmp: Path, t: NatTopo, cfg: Path, traffic: Any, tag: str) -> None:
    log = tmp / f"ipfixer-{tag}.log"
    proc = start_ipfixer(t.router, cfg, log, env=cli_env())
    try:
        traffic()
        time.sleep(1.5)  # the NAT events of this traffic go out at the next drain (not at shutdown)
    finally:
        assert stop_ipfixer(proc) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.interop
def test_post_nat_values_at_nfdump_and_decoder(tmp_path: Path, topo: NatTopo) -> None:
    t = topo
    coll = collector_in(t.router)
    nfc = Nfcapd(tmp_path / "nfcapd", free_udp_port(), netns=t.router)
    try:
        counters: dict[str, Any] = {}

        def traffic() -> None:
            udp_echo(t, UDP_SPORT, UDP_SIZES)
            tcp_exchange(t, 40002)
            counters["tcp"] = ct_counters(t, "tcp", 40002)
            counters["udp"] = ct_counters(t, "udp", UDP_SPORT)

        run_daemon(tmp_path, t, config(tmp_path, t, [coll.port, nfc.port]), traffic, "ebpf")
        coll.receive(5, until_idle=1.0)
        nf = nfc.stop()
    finally:
        coll.close()
        nfc.kill()
    (tcp_o, tcp_r, tcp_masq), (udp_o, udp_r, udp_masq) = counters["tcp"], counters["udp"]
    assert udp_masq == UDP_SPORT and tcp_masq == 40002  # masquerade keeps free ports
    udp_octets = sum(28 + n for n in UDP_SIZES)
    assert udp_o == udp_r == (5, udp_octets)
    recs = flows_only(coll.flow_records())
    totals = totals_by_flow(recs)
    # origin direction, seen entering r_in before DNAT; reply direction, seen entering r_out before de-NAT
    assert totals[(t.CLIENT, t.ROUTER_IN, UDP_SPORT, 8080, 17)] == [5, udp_octets]
    assert totals[(t.SERVER, t.ROUTER_OUT, 80, UDP_SPORT, 17)] == [5, udp_octets]
    assert totals[(t.CLIENT, t.ROUTER_IN, 40002, 8080, 6)] == list(tcp_o)
    assert totals[(t.SERVER, t.ROUTER_OUT, 80, 40002, 6)] == list(tcp_r)
    for proto, sport in ((17, UDP_SPORT), (6, 40002)):
        orig = one(recs, sourceTransportPort=sport, destinationTransportPort=8080, protocolIdentifier=proto)
        reply = one(recs, sourceTransportPort=80, destinationTransportPort=sport, protocolIdentifier=proto)
        assert orig and reply
        for r in orig:
            assert (str(r["postNATSourceIPv4Address"]), str(r["postNATDestinationIPv4Address"]),
                    r["postNAPTSourceTransportPort"], r["postNAPTDestinationTransportPort"]) == (
                t.ROUTER_OUT, t.SERVER, sport, 80)  # fmt: skip
            assert (r["ctState"], r["ctMark"], r["ctZone"]) == (CT_TRK | CT_EST | CT_SNAT | CT_DNAT, MARK, ZONE)
        for r in reply:
            assert (str(r["postNATSourceIPv4Address"]), str(r["postNATDestinationIPv4Address"]),
                    r["postNAPTSourceTransportPort"], r["postNAPTDestinationTransportPort"]) == (
                t.ROUTER_IN, t.CLIENT, 8080, sport)  # fmt: skip
            assert (r["ctState"], r["ctMark"], r["ctZone"]) == (
                CT_TRK | CT_EST | CT_RPL | CT_SNAT | CT_DNAT, MARK, ZONE)  # fmt: skip
    # NAT44 session create events, through the same template, without counters
    events = [r for r in coll.flow_records() if r.get("natEvent")]
    for proto, sport in ((17, UDP_SPORT), (6, 40002)):
        ev = one(events, sourceTransportPort=sport, protocolIdentifier=proto, natEvent=4)
        assert len(ev) == 1, events
        assert (str(ev[0]["sourceIPv4Address"]), str(ev[0]["destinationIPv4Address"]),
                ev[0]["destinationTransportPort"], str(ev[0]["postNATSourceIPv4Address"]),
                str(ev[0]["postNATDestinationIPv4Address"]), ev[0]["postNAPTSourceTransportPort"],
                ev[0]["postNAPTDestinationTransportPort"], ev[0]["packetDeltaCount"]) == (
            t.CLIENT, t.ROUTER_IN, 8080, t.ROUTER_OUT, t.SERVER, sport, 80, 0)  # fmt: skip

    # nfdump 1.7.1: the same translations under src4_xlt_ip/dst4_xlt_ip/src_xlt_port/dst_xlt_port (ports
    # and nat_event_id printed as strings; nat_event as text, "Reserved" for 0)
    def nf_flows(sa: str, sp: int, proto: int) -> list[dict[str, Any]]:
        return [f for f in nf if f.get("src4_addr") == sa and f.get("src_port") == sp and f.get("proto") == proto
                and f.get("nat_event_id") == "0"]  # fmt: skip

    for proto, sport, (opk, oby), (rpk, rby) in ((17, UDP_SPORT, udp_o, udp_r), (6, 40002, tcp_o, tcp_r)):
        orig, reply = nf_flows(t.CLIENT, sport, proto), nf_flows(t.SERVER, 80, proto)
        reply = [f for f in reply if f.get("dst_port") == sport]
        assert orig and reply, json.dumps(nf)[:3000]
        assert (sum(f["in_packets"] for f in orig), sum(f["in_bytes"] for f in orig)) == (opk, oby)
        assert (sum(f["in_packets"] for f in reply), sum(f["in_bytes"] for f in reply)) == (rpk, rby)
        for f in orig:
            assert (f["src4_xlt_ip"], f["dst4_xlt_ip"], f["src_xlt_port"], f["dst_xlt_port"]) == (
                t.ROUTER_OUT, t.SERVER, str(sport), "80"), f  # fmt: skip
        for f in reply:
            assert (f["src4_xlt_ip"], f["dst4_xlt_ip"], f["src_xlt_port"], f["dst_xlt_port"]) == (
                t.ROUTER_IN, t.CLIENT, "8080", str(sport)), f  # fmt: skip
    nf_events = [f for f in nf if f.get("nat_event_id") == "4"]
    for proto, sport in ((17, UDP_SPORT), (6, 40002)):
        ev = [f for f in nf_events if f["proto"] == proto and f["src_port"] == sport]
        assert len(ev) == 1 and ev[0]["nat_event"] == "NAT44 session create", nf_events
        assert (ev[0]["src4_addr"], ev[0]["dst4_addr"], ev[0]["dst_port"], ev[0]["src4_xlt_ip"], ev[0]["dst4_xlt_ip"],
                ev[0]["src_xlt_port"], ev[0]["dst_xlt_port"], ev[0]["in_packets"]) == (
            t.CLIENT, t.ROUTER_IN, 8080, t.ROUTER_OUT, t.SERVER, str(sport), "80", 0)  # fmt: skip


@pytest.mark.parametrize("source", ["ebpf", "nflog"])
def test_conntrack_destroy_ends_flow(tmp_path: Path, topo: NatTopo, source: str) -> None:
    """`conntrack -D` before the idle timeout (30 s): the flow reaches the collector at the next drain
    with flowEndReason 3, from the kernel drainer (eBPF) or the Accounter (NFLOG)."""
    t = topo
    coll = collector_in(t.router)
    idle = "30s"
    sport = 40101
    log = tmp_path / "ipfixer.log"
    proc = start_ipfixer(t.router, config(tmp_path, t, [coll.port], source, idle), log, env=cli_env())
    try:
        udp_echo(t, sport, [120, 130, 140])
        time.sleep(0.5)
        sh("conntrack", "-D", "-p", "udp", "--orig-port-src", str(sport), netns=t.router)
        destroyed = time.monotonic()
        key = (t.CLIENT, t.ROUTER_IN, sport, 8080, 17)
        deadline = destroyed + 6
        while time.monotonic() < deadline and key not in totals_by_flow(flows_only(coll.flow_records())):
            coll.receive(0.5)
        arrived = time.monotonic() - destroyed
    finally:
        assert stop_ipfixer(proc) == 0, log.read_text()
    coll.receive(3, until_idle=1.0)
    coll.close()
    recs = flows_only(coll.flow_records())
    for k, n in ((key, 3), ((t.SERVER, t.ROUTER_OUT, 80, sport, 17), 3)):
        assert totals_by_flow(recs)[k][0] == n
    for r in one(recs, sourceTransportPort=sport) + one(recs, destinationTransportPort=sport):
        assert r["flowEndReason"] == 3, r
    assert arrived < 5, arrived  # ended by the DESTROY, not by the 30 s idle timeout
    deletes = [r for r in coll.flow_records() if r.get("natEvent") == 5 and r.get("sourceTransportPort") == sport]
    assert len(deletes) == 1


def test_nflog_counts_equal_ebpf(tmp_path: Path, topo: NatTopo) -> None:
    """Same traffic metered twice, once per source: identical per-flow packet and octet totals, equal to
    what was sent (UDP) and to conntrack's own counters (TCP)."""
    t = topo
    sizes = [64, 128, 256, 512, 1024, 1400]
    results: dict[str, dict[str, list[int]]] = {}
    for run, source in enumerate(("ebpf", "nflog")):
        udp, tcp = 40201 + 10 * run, 40202 + 10 * run  # fresh ports: no conntrack entry left from run 1
        coll = collector_in(t.router)
        ct: dict[str, Any] = {}
        try:

            def traffic(udp: int = udp, tcp: int = tcp, ct: dict[str, Any] = ct) -> None:
                udp_echo(t, udp, sizes)
                tcp_exchange(t, tcp)
                ct["tcp"] = ct_counters(t, "tcp", tcp)

            # a glob: nft's wildcard set on the NFLOG path, fnmatch on the eBPF path; both select r_in, r_out
            cfg = config(tmp_path, t, [coll.port], source, include=["ipfxr*"])
            run_daemon(tmp_path, t, cfg, traffic, source)
            coll.receive(5, until_idle=1.0)
        finally:
            coll.close()
        totals = totals_by_flow(flows_only(coll.flow_records()))
        got = {
            "udp_orig": totals[(t.CLIENT, t.ROUTER_IN, udp, 8080, 17)],
            "udp_reply": totals[(t.SERVER, t.ROUTER_OUT, 80, udp, 17)],
            "tcp_orig": totals[(t.CLIENT, t.ROUTER_IN, tcp, 8080, 6)],
            "tcp_reply": totals[(t.SERVER, t.ROUTER_OUT, 80, tcp, 6)],
        }
        udp_octets = sum(28 + n for n in sizes)
        assert got["udp_orig"] == got["udp_reply"] == [6, udp_octets], (source, got)
        assert (got["tcp_orig"], got["tcp_reply"]) == (list(ct["tcp"][0]), list(ct["tcp"][1])), (source, got)
        results[source] = got
    assert results["nflog"] == results["ebpf"]


CONNTRACK_ABSENT = """
import json, logging, sys
from ipfixer.clock import SystemClock
from ipfixer.config import Config
from ipfixer.enrich.pipeline import Enrichment
from ipfixer.model import empty_batch
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
cfg = Config.model_validate({"collectors": [{"address": "127.0.0.1"}],
                             "enrichment": {"conntrack": True, "nat_events": True}})
e = Enrichment(cfg, SystemClock())
e.start()
batch = empty_batch(3)
batch["packets"] = 7
got = [e.enrich(batch) for _ in range(3)]
e.poll()
print(json.dumps({"enriched": got, "nat": len(e.nat_event_batch()), "destroyed": len(e.destroyed_keys()),
                  "packets": batch["packets"].tolist(), "ct_state": batch["ct_state"].tolist()}))
e.close()
"""


def test_conntrack_absent_keeps_running(tmp_path: Path) -> None:
    """Without CAP_NET_ADMIN (user nobody) ctnetlink refuses dumps and event groups: the pipeline logs
    each once, enriches nothing, leaves the rows intact and keeps answering every call."""
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", CONNTRACK_ABSENT],
        capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parents[2]), env=cli_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == {"enriched": [0, 0, 0], "nat": 0, "destroyed": 0, "packets": [7, 7, 7], "ct_state": [0, 0, 0]}
    warnings = [line for line in res.stderr.splitlines() if line.startswith("WARNING")]
    assert len([w for w in warnings if "conntrack enrichment disabled" in w]) == 1, res.stderr
    assert len([w for w in warnings if "conntrack events disabled" in w]) == 1, res.stderr
