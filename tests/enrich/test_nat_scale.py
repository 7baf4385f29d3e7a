"""NAT enrichment at router scale (issue 15), in the router namespace of the NAT topology: `ipfixer run`
with conntrack enrichment, a 100,000-entry conntrack table present at start, 50,000 masqueraded UDP
connections opened at 5,000/s (each answered once), every record checked at nfcapd (post-NAT fields)
and at ipfixer's decoder (ctState, ctMark), drain durations from the daemon's own metric; event
overruns forced with a tiny event socket buffer and recovered by resyncs; an ICMP port unreachable
translated on the tuple it quotes; a `notrack` flow reported as unmatched.

Scale is the issue's (50,000 at 5,000/s and 100,000 entries) in the first test; the overrun test uses
20,000 connections at 5,000/s over a 20,000-entry table to keep CI time down (the overruns start within
the first second either way); a third sends 20,000 connections at 20,000/s. About a minute in all."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfixer.enrich.ctnetlink import insert_entries, open_ctnetlink
from ipfixer.lab import ns_socket, sh, start_ipfixer, stop_ipfixer
from ipfixer.metrics import scrape
from ipfixer.netns import in_netns
from tests.cli.helpers import UdpCollector, cli_env, write_config
from tests.collectors import Nfcapd, free_udp_port
from tests.labs import NatTopo, make_nat_topo

pytestmark = [pytest.mark.root, pytest.mark.interop]

ZONE, MARK = 7, 0x2A
TRK, EST, REL, RPL, INV, SNAT = 0x20, 0x02, 0x04, 0x08, 0x10, 0x40
ECHO_PORT, NOTRACK_PORT, CLOSED_PORT = 7007, 9999, 9
FIRST_PORT = 10000
DRAIN_S = 1.0


@pytest.fixture
def topo() -> Iterator[NatTopo]:
    t = make_nat_topo(zone=ZONE, mark=MARK)
    try:
        # untracked traffic: first in the raw chain, and accepted there so that the zone rule after it
        # (whose template would track the packet again) never sees it; replies dropped at the client
        # so that 50,000 short-lived client sockets need not stay open for their answers
        sh("nft", "insert", "rule", "ip", "ipfxnat", "ipfxraw", "udp", "dport", str(NOTRACK_PORT), "notrack",
           "accept", netns=t.router)  # fmt: skip
        sh("nft", "-f", "-", netns=t.client, input=f"""
table ip ipfxh5drop {{
    chain in {{
        type filter hook input priority 0
        udp sport {ECHO_PORT} drop
    }}
}}
""")  # fmt: skip
        yield t
    finally:
        sh("nft", "delete", "table", "inet", "ipfixer", netns=t.router, check=False)
        t.teardown()


def fill_table(t: NatTopo, n: int) -> None:
    """n unrelated conntrack entries (UDP, 10.200.0.0/16 -> 192.0.2.1, 600 s) in the router."""
    sock = open_ctnetlink(t.router)
    try:
        rows = [(17, bytes([10, 200, (i >> 8) & 0xFF, i & 0xFF]), bytes([192, 0, 2, 1]), 1024 + (i >> 16), 53, 2)
                for i in range(n)]  # fmt: skip
        insert_entries(sock, rows)
    finally:
        sock.close()
    count = sh("conntrack", "-C", netns=t.router).strip()
    assert int(count) >= n


def echo_server(t: NatTopo, stop: threading.Event) -> threading.Thread:
    """Answers every datagram on SERVER:ECHO_PORT once (the answer crosses the router, then is dropped)."""
    srv = ns_socket(t.server, socket.SOCK_DGRAM, ("0.0.0.0", ECHO_PORT))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    srv.settimeout(0.2)

    def run() -> None:
        try:
            while not stop.is_set():
                try:
                    data, peer = srv.recvfrom(2048)
                except TimeoutError:
                    continue
                srv.sendto(data, peer)
        finally:
            srv.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def connections(t: NatTopo, count: int, rate: float) -> float:
    """`count` UDP connections CLIENT:port -> SERVER:ECHO_PORT, one datagram each, paced at `rate`/s;
    the rate reached."""

    def make(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((t.CLIENT, port))
        return s

    def run() -> float:
        started = time.monotonic()
        for i in range(count):
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            s = make(FIRST_PORT + i)
            s.sendto(b"x" * 16, (t.SERVER, ECHO_PORT))
            s.close()
        return count / (time.monotonic() - started)

    return in_netns(t.client, run, timeout_s=count / rate + 60)


def icmp_and_notrack(t: NatTopo) -> None:
    """One datagram to a closed server port (answered by ICMP port unreachable), one untracked."""
    cli = ns_socket(t.client, socket.SOCK_DGRAM, (t.CLIENT, 40011))
    try:
        cli.connect((t.SERVER, CLOSED_PORT))
        cli.send(b"x")
        with pytest.raises(ConnectionRefusedError):
            cli.recv(16)
    finally:
        cli.close()
    cli = ns_socket(t.client, socket.SOCK_DGRAM, (t.CLIENT, 40013))
    try:
        cli.sendto(b"untracked", (t.SERVER, NOTRACK_PORT))
    finally:
        cli.close()


class Collect:
    """UdpCollector read in a thread while traffic runs (the burst would overflow any socket buffer)."""

    def __init__(self, t: NatTopo) -> None:
        self.coll = UdpCollector(netns=t.router)
        self.coll.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.coll.receive(0.5)

    def finish(self) -> list[dict[str, Any]]:
        self.coll.receive(3, until_idle=1.5)
        self.stop.set()
        self.thread.join(10)
        self.coll.receive(2, until_idle=1.0)
        self.coll.close()
        return self.coll.flow_records()


def config(tmp: Path, t: NatTopo, ports: list[int], metrics_port: int, **enrichment: Any) -> Path:
    return write_config(
        tmp / "ipfixer.yaml", [{"address": "127.0.0.1", "port": p} for p in ports],
        interfaces={"include": [t.r_in, t.r_out], "exclude": [], "direction": "ingress"},
        timeouts={"active": "60s", "idle": "2s", "drain_interval": f"{DRAIN_S}s"}, lock_dir=str(tmp / "lock"),
        templates={"ipv4": "ipv4_nat_flow", "ipv6": "ipv6_nat_flow"},
        cache={"kernel_map_entries": 262144},
        enrichment={"conntrack": True, "nat_events": True, **enrichment},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )  # fmt: skip


def run(tmp: Path, t: NatTopo, table: int, count: int, rate: float, **enrichment: Any) -> dict[str, Any]:
    """Fill the table, start ipfixer, send the traffic, scrape the metrics, stop; what the collectors got."""
    fill_table(t, table)
    nfc = Nfcapd(tmp / "nfcapd", free_udp_port(), netns=t.router, bufsize=64 << 20)
    col = Collect(t)
    mport = free_udp_port()
    log = tmp / "ipfixer.log"
    stop = threading.Event()
    server = echo_server(t, stop)
    proc = start_ipfixer(t.router, config(tmp, t, [col.coll.port, nfc.port], mport, **enrichment), log,
                         env=cli_env())  # fmt: skip
    metrics: dict[str, float] = {}
    reached = 0.0
    try:
        reached = connections(t, count, rate)
        icmp_and_notrack(t)
        time.sleep(2 + 3 * DRAIN_S)  # idle timeout + drains: everything exported while running
        metrics = in_netns(t.router, lambda: scrape(f"127.0.0.1:{mport}"))
    finally:
        rc = stop_ipfixer(proc, timeout_s=60)
        stop.set()
        server.join(5)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    records = col.finish()
    try:
        nf = nfc.stop()
    finally:
        nfc.kill()
    print(f"{count} connections at {reached:,.0f}/s (asked {rate:,.0f}/s)")
    return {"records": records, "nf": nf, "metrics": metrics, "log": text, "rate": reached}


def _fields(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["sourceTransportPort"], r["destinationTransportPort"], str(r["postNATSourceIPv4Address"]),
            str(r["postNATDestinationIPv4Address"]), r["postNAPTSourceTransportPort"],
            r["postNAPTDestinationTransportPort"], hex(r["ctState"]), r["ctMark"], r["ctZone"], r["flowEndMilliseconds"])


def check(t: NatTopo, got: dict[str, Any], count: int) -> None:
    """Every connection's two flows at both collectors with the right translation and state."""
    recs = [r for r in got["records"] if not r.get("natEvent") and "sourceIPv4Address" in r]
    ports = set(range(FIRST_PORT, FIRST_PORT + count))
    orig = [r for r in recs if str(r["sourceIPv4Address"]) == t.CLIENT and r["destinationTransportPort"] == ECHO_PORT]
    reply = [r for r in recs if str(r["sourceIPv4Address"]) == t.SERVER and r["sourceTransportPort"] == ECHO_PORT]
    errors = {k: v for k, v in got["metrics"].items() if "collector_errors" in k or "collector_records" in k}
    missing_o = ports - {r["sourceTransportPort"] for r in orig}
    missing_r = ports - {r["destinationTransportPort"] for r in reply}
    assert not missing_o and not missing_r, (len(missing_o), len(missing_r), sorted(missing_o)[:5], errors)
    assert sum(r["packetDeltaCount"] for r in orig) == count == sum(r["packetDeltaCount"] for r in reply)
    bad_o = [r for r in orig if (str(r["postNATSourceIPv4Address"]), str(r["postNATDestinationIPv4Address"]),
             r["postNAPTSourceTransportPort"], r["postNAPTDestinationTransportPort"], r["ctState"], r["ctMark"],
             r["ctZone"]) != (t.ROUTER_OUT, t.SERVER, r["sourceTransportPort"], ECHO_PORT, TRK | EST | SNAT, MARK,
             ZONE)]  # fmt: skip
    assert not bad_o, (len(bad_o), [_fields(r) for r in bad_o[:3]], got["metrics"].get("ipfixer_conntrack_event_overruns_total"))
    bad_r = [r for r in reply if (str(r["postNATSourceIPv4Address"]), str(r["postNATDestinationIPv4Address"]),
             r["postNAPTSourceTransportPort"], r["postNAPTDestinationTransportPort"], r["ctState"], r["ctMark"],
             r["ctZone"]) != (t.SERVER, t.CLIENT, ECHO_PORT, r["destinationTransportPort"], TRK | EST | RPL | SNAT,
             MARK, ZONE)]  # fmt: skip
    assert not bad_r, (len(bad_r), [_fields(r) for r in bad_r[:3]])
    # nfdump 1.7.1: the same translations, for every flow of the traffic
    nf = [f for f in got["nf"] if f.get("nat_event_id") == "0" and f.get("proto") == 17]
    nf_o = [f for f in nf if f.get("src4_addr") == t.CLIENT and f.get("dst_port") == ECHO_PORT]
    nf_r = [f for f in nf if f.get("src4_addr") == t.SERVER and f.get("src_port") == ECHO_PORT]
    assert {f["src_port"] for f in nf_o} == ports and {f["dst_port"] for f in nf_r} == ports
    assert all((f["src4_xlt_ip"], f["dst4_xlt_ip"], f["src_xlt_port"]) == (t.ROUTER_OUT, t.SERVER, str(f["src_port"]))
               for f in nf_o)  # fmt: skip
    assert all((f["src4_xlt_ip"], f["dst4_xlt_ip"], f["dst_xlt_port"]) == (t.SERVER, t.CLIENT, str(f["dst_port"]))
               for f in nf_r)  # fmt: skip
    # NAT44 session creates with the kernel's connection start as their event time
    creates = [r for r in got["records"] if r.get("natEvent") == 4 and r["destinationTransportPort"] == ECHO_PORT]
    missing_c = ports - {r["sourceTransportPort"] for r in creates}
    assert not missing_c, (len(missing_c), sorted(missing_c)[:5],
                           {k: v for k, v in got["metrics"].items() if "conntrack" in k})
    first_seen = {r["sourceTransportPort"]: r["flowStartMilliseconds"] for r in orig}
    late = [r for r in creates if r["observationTimeMilliseconds"] != r["flowEndMilliseconds"]
            or not 0 <= r["observationTimeMilliseconds"] - first_seen[r["sourceTransportPort"]] <= 1000]  # fmt: skip
    assert not late, late[:3]  # the kernel's start time: just after the first packet crossed r_in
    nf_creates = [f for f in got["nf"] if f.get("nat_event_id") == "4" and f.get("dst_port") == ECHO_PORT]
    assert len(nf_creates) == count and all(f["t_event"].startswith(time.strftime("%Y-", time.gmtime()))
                                            for f in nf_creates)  # nfdump shows the event time, not 1970
    # drains kept their interval: the loop starts a drain every max(interval, previous cycle), so a
    # cycle over 2x the interval (the daemon's drain-duration histogram) is an interval over 2x. A
    # conntrack dump or resync on the loop stalled every cycle it overlapped by 5 s or more (the bug this
    # guards against); a 2-core machine under other load can still delay one cycle now and then (seen
    # once in CI: one of 13 between 2.5 and 5 s), so: every cycle under 5 s, all but one under 2x.
    m = got["metrics"]
    total = m["ipfixer_drain_duration_seconds_count"]
    within = m[f'ipfixer_drain_duration_seconds_bucket{{le="{2 * DRAIN_S}"}}']
    under_5s = m['ipfixer_drain_duration_seconds_bucket{le="5.0"}']
    assert total >= 5 and under_5s == total and within >= total - 1, str(
        {k: v for k, v in m.items() if "drain_duration" in k})


def test_50k_connections_at_5k_per_s_over_100k_table(tmp_path: Path, topo: NatTopo) -> None:
    t = topo
    count = 50_000
    got = run(tmp_path, t, table=100_000, count=count, rate=5000.0)
    check(t, got, count)
    recs = [r for r in got["records"] if not r.get("natEvent") and "sourceIPv4Address" in r]
    # the ICMP port unreachable, entering r_out towards the masquerade address: translated like the
    # kernel translated it (destination de-SNATed to the client), related + reply, the connection's mark
    icmp = [r for r in recs if r["protocolIdentifier"] == 1 and r.get("icmpTypeCodeIPv4") == 3 * 256 + 3]
    assert icmp, recs[:3]
    for r in icmp:
        assert (str(r["sourceIPv4Address"]), str(r["destinationIPv4Address"])) == (t.SERVER, t.ROUTER_OUT)
        assert (str(r["postNATSourceIPv4Address"]), str(r["postNATDestinationIPv4Address"])) == (t.SERVER, t.CLIENT)
        assert (r["ctState"], r["ctMark"], r["ctZone"]) == (TRK | REL | RPL | SNAT, MARK, ZONE)
    # the untracked datagram: exported, no conntrack data, counted and logged as unmatched
    nt = [r for r in recs if r["destinationTransportPort"] == NOTRACK_PORT]
    assert len(nt) == 1 and nt[0]["ctState"] == 0 and str(nt[0]["postNATSourceIPv4Address"]) == "0.0.0.0"
    assert got["metrics"]["ipfixer_conntrack_unmatched_total"] >= 1
    assert "matched no conntrack entry" in got["log"]
    assert got["metrics"]["ipfixer_conntrack_event_overruns_total"] == 0


def test_event_overruns_are_counted_and_recovered(tmp_path: Path, topo: NatTopo) -> None:
    t = topo
    count = 20_000
    got = run(tmp_path, t, table=20_000, count=count, rate=5000.0, conntrack_events_buffer=4096)
    m = got["metrics"]
    assert m["ipfixer_conntrack_event_overruns_total"] >= 1, m
    assert m["ipfixer_conntrack_overrun_resyncs_total"] >= 1, m
    assert "events were lost, resynchronising with a dump" in got["log"]
    check(t, got, count)


def test_20k_connections_per_s(tmp_path: Path, topo: NatTopo) -> None:
    """The issue's higher rate: 20,000 new connections/s for one second (as fast as one Python sender
    manages: the rate reached is printed), every flow translated, every NAT session create exported."""
    t = topo
    count = 20_000
    got = run(tmp_path, t, table=20_000, count=count, rate=20_000.0)
    check(t, got, count)
