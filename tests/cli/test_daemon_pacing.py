"""Export pacing in the running daemon (`ipfixer run` in a namespace the test builds, real kernel path,
real UDP export): the loop sends a paced queue between polls, and at SIGTERM a queue drains for at most
5 s, what is left counted as dropped and logged.  Exact counts of the flows the test sent."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfixer.lab import Lab, netns_exec, ns_socket, start_ipfixer, stop_ipfixer
from tests.cli.helpers import IPFIXER, UdpCollector, cli_env, ctl_socket, write_config

pytestmark = pytest.mark.root

FLOWS = 3000  # one-packet UDP flows: ~110 IPFIX messages


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def config(tmp_path: Path, lab: Lab, port: int, pacing: dict[str, object], idle: str) -> Path:
    return write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": port, "pacing": pacing}],
                        interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(tmp_path / "lock"),
                        timeouts={"active": "60s", "idle": idle, "drain_interval": "500ms"})


def send_flows(lab: Lab) -> None:
    """FLOWS flows from ns_b to ns_a: one source port, FLOWS destination ports, one 10-byte datagram each."""
    s = ns_socket(lab.ns_b, socket.SOCK_DGRAM, bind=("", 0))
    try:
        for i in range(FLOWS):
            s.sendto(b"x" * 10, (lab.v4_a, 20000 + i))
    finally:
        s.close()


def sent_flows(coll: UdpCollector, lab: Lab) -> set[int]:
    """Destination ports of the test's flow records (the ICMP replies ns_a sends are other flows)."""
    return {r["destinationTransportPort"] for r in coll.flow_records()
            if str(r.get("destinationIPv4Address")) == lab.v4_a and r.get("protocolIdentifier") == 17
            and 20000 <= r.get("destinationTransportPort", 0) < 20000 + FLOWS}


def test_loop_sends_the_paced_queue_between_polls(tmp_path: Path, lab: Lab) -> None:
    coll = UdpCollector(netns=lab.ns_a)
    log = tmp_path / "ipfixer.log"
    # idle 1s: the flows go out at a drain while the daemon runs, ~110 messages at 100/s take ~1 s
    proc = start_ipfixer(lab.ns_a, config(tmp_path, lab, coll.port, {"messages_per_s": 100, "burst": 4}, "1s"),
                         log, env=cli_env())
    try:
        send_flows(lab)
        for _ in range(30):  # bounded: every flow arrives before any shutdown flush
            coll.receive(1.0)
            if len(sent_flows(coll, lab)) == FLOWS:
                break
        assert len(sent_flows(coll, lab)) == FLOWS
        assert proc.poll() is None
        sock = str(ctl_socket(tmp_path / "lock", lab.ns_a))
        res = subprocess.run([*IPFIXER, "ctl", "--socket", sock, "stats", "--json"], capture_output=True, text=True,
                             timeout=60, env=cli_env())
        assert res.returncode == 0, res.stderr
        (st,) = json.loads(res.stdout)["collectors"].values()
        assert st["paced"]["delayed_messages"] > 0  # the rate held messages back...
        assert st["paced"]["dropped_messages"] == st["paced"]["dropped_records"] == st["not_sent_records"] == 0
        assert st["flow_records"] >= FLOWS  # ...and sent them all (plus the ICMP-reply flows)
        human = subprocess.run([*IPFIXER, "ctl", "--socket", sock, "stats"], capture_output=True, text=True,
                               timeout=60, env=cli_env())
        assert re.search(r"paced: \d+ queued, \d+ messages delayed, 0 messages / 0 records dropped", human.stdout), \
            human.stdout
    finally:
        assert stop_ipfixer(proc) == 0, log.read_text()
        coll.receive(3, until_idle=1.0)
        coll.close()
    assert len([r for r in coll.flow_records() if str(r.get("destinationIPv4Address")) == lab.v4_a
                and 20000 <= r.get("destinationTransportPort", 0) < 20000 + FLOWS]) == FLOWS  # each once
    assert "unsent: dropped" not in log.read_text()


def quiet(lab: Lab) -> None:
    """Only the test's flows on the veth: no IPv6 (neighbour discovery, MLD) and no ICMP port unreachable
    answers (nft in the lab's own namespace, deleted with it)."""
    for ns in (lab.ns_a, lab.ns_b):
        netns_exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    netns_exec(lab.ns_a, "nft", "add table ip ipfxh11; add chain ip ipfxh11 out { type filter hook output priority 0; }; "
               "add rule ip ipfxh11 out icmp type destination-unreachable drop")


def test_shutdown_drains_for_a_bounded_time_and_counts_the_rest(tmp_path: Path, lab: Lab) -> None:
    quiet(lab)
    coll = UdpCollector(netns=lab.ns_a)
    log = tmp_path / "ipfixer.log"
    # idle 30s: the flows stay in the kernel until SIGTERM flushes them; 4 messages/s cannot send ~110 in 5 s
    proc = start_ipfixer(lab.ns_a, config(tmp_path, lab, coll.port, {"messages_per_s": 4, "burst": 2}, "30s"),
                         log, env=cli_env())
    try:
        send_flows(lab)
    finally:
        assert stop_ipfixer(proc) == 0, log.read_text()
        coll.receive(5, until_idle=1.0)
        coll.close()
    text = log.read_text()
    m = re.search(r"closing with (\d+) paced messages \((\d+) records, (\d+) of them flow records\) unsent: "
                  r"dropped", text)
    assert m is not None, text
    dropped_messages, dropped_flow_records = int(m[1]), int(m[3])
    got = sent_flows(coll, lab)
    assert dropped_messages > 0 and len(got) > 0
    assert len(coll.flow_records()) == len(got)  # only the test's flows, each once
    assert len(got) + dropped_flow_records == FLOWS  # every flow arrived or was counted as dropped
