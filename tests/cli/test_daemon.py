"""The daemon end to end: `ipfixer run` as a subprocess in a namespace the test builds, the real
kernel path, real UDP export to a socket in that namespace. Exact counts of traffic the test sent."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfixer.lab import Lab, netns_exec, start_ipfixer, stop_ipfixer
from ipfixer.netns import in_netns
from tests.cli.helpers import IPFIXER, UdpCollector, cli_env, totals_by_flow, write_config

pytestmark = pytest.mark.root


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def collector_in(ns: str) -> UdpCollector:
    """A UdpCollector whose socket lives in the namespace."""
    return UdpCollector(netns=ns)


def start_daemon(lab: Lab, cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return start_ipfixer(lab.ns_a, cfg, log, env=cli_env())


def stop_daemon(proc: subprocess.Popen[bytes], log: Path) -> None:
    assert stop_ipfixer(proc) == 0, log.read_text()


def exported_totals(coll: UdpCollector) -> dict[tuple[Any, ...], list[int]]:
    """After the daemon stopped: what its shutdown flush still sends, then [packets, octets] by flow."""
    coll.receive(5, until_idle=1.0)
    coll.close()
    return totals_by_flow(coll.flow_records())


def base_config(tmp_path: Path, lab: Lab, port: int, **extra: object) -> Path:
    return write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": port}],
                        interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(tmp_path / "lock"),
                        timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"}, **extra)


def test_sigterm_flushes_exact_counts(tmp_path: Path, lab: Lab) -> None:
    coll = collector_in(lab.ns_a)
    log = tmp_path / "ipfixer.log"
    proc = start_daemon(lab, base_config(tmp_path, lab, coll.port), log)
    try:
        lab.send_udp(lab.ns_b, lab.v4_a, 40001, 9001, [100] * 7 + [300] * 3)
        lab.send_udp(lab.ns_b, lab.v6_a, 40002, 9002, [50] * 4)
    finally:
        stop_daemon(proc, log)
    totals = exported_totals(coll)
    assert totals[(lab.v4_b, lab.v4_a, 40001, 9001, 17)] == [10, 7 * 128 + 3 * 328]
    assert totals[(lab.v6_b, lab.v6_a, 40002, 9002, 17)] == [4, 4 * (40 + 8 + 50)]
    recs = [r for r in coll.flow_records() if r.get("destinationTransportPort") == 9001]
    assert {r["flowDirection"] for r in recs} == {0}  # seen arriving on veth_a: ingress
    assert {r["ingressInterface"] for r in recs} == {lab.ifindex(lab.ns_a, lab.veth_a)}
    assert {r["flowEndReason"] for r in recs} == {4}  # forced end: flushed at shutdown
    names = {(r["ingressInterface"], r["interfaceName"]) for r in coll.options_records() if "interfaceName" in r}
    assert names == {(lab.ifindex(lab.ns_a, lab.veth_a), lab.veth_a)}  # the interface table options record
    stats = [r for r in coll.options_records() if "exportedFlowRecordTotalCount" in r]
    assert stats and stats[-1]["exportedFlowRecordTotalCount"] >= 2
    sampling = [r for r in coll.options_records() if "samplingInterval" in r]
    assert sampling and sampling[-1]["samplingInterval"] == 1
    # nothing of ipfixer's left on the interface
    out = subprocess.run(["tc", "-n", lab.ns_a, "filter", "show", "dev", lab.veth_a, "ingress"],
                         capture_output=True, text=True, timeout=10).stdout
    assert "ipfixer" not in out
    assert "clsact" not in netns_exec(lab.ns_a, "tc", "qdisc", "show", "dev", lab.veth_a).stdout  # it added it


def test_sighup_moves_export_without_loss(tmp_path: Path, lab: Lab) -> None:
    first, second = collector_in(lab.ns_a), collector_in(lab.ns_a)
    log = tmp_path / "ipfixer.log"
    cfg = base_config(tmp_path, lab, first.port)
    proc = start_daemon(lab, cfg, log)
    try:
        lab.send_udp(lab.ns_b, lab.v4_a, 40011, 9011, [200] * 5)
        base_config(tmp_path, lab, second.port)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while b"msg=reloaded" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"msg=reloaded" in log.read_bytes(), log.read_text()
        lab.send_udp(lab.ns_b, lab.v4_a, 40011, 9011, [200] * 6)
    finally:
        stop_daemon(proc, log)
    for c in (first, second):
        c.receive(5, until_idle=1.0)
        c.close()
    key = (lab.v4_b, lab.v4_a, 40011, 9011, 17)
    a = totals_by_flow(first.flow_records()).get(key, [0, 0])
    b = totals_by_flow(second.flow_records()).get(key, [0, 0])
    assert [a[0] + b[0], a[1] + b[1]] == [11, 11 * 228]
    assert b[0] >= 6  # everything after the reload went to the new collector


def test_invalid_reload_keeps_running(tmp_path: Path, lab: Lab) -> None:
    coll = collector_in(lab.ns_a)
    log = tmp_path / "ipfixer.log"
    cfg = base_config(tmp_path, lab, coll.port)
    proc = start_daemon(lab, cfg, log)
    try:
        cfg.write_text(cfg.read_text() + "\nbogus_key: 1\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while b"reload rejected" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"bogus_key" in log.read_bytes()
        lab.send_udp(lab.ns_b, lab.v4_a, 40021, 9021, [10] * 3)
    finally:
        stop_daemon(proc, log)
    assert exported_totals(coll)[(lab.v4_b, lab.v4_a, 40021, 9021, 17)] == [3, 3 * 38]


def test_reload_to_no_interface_warns_and_ipv6_collector_is_bracketed(tmp_path: Path, lab: Lab) -> None:
    """A SIGHUP whose selection matches nothing says which interfaces stopped being metered and that
    nothing is metered; an IPv6 collector is logged as ipfix://[::1]:port (and receives)."""
    coll6 = UdpCollector(family=socket.AF_INET6, address="::1", netns=lab.ns_a)
    log = tmp_path / "ipfixer.log"
    cfg = write_config(tmp_path / "ipfixer.yaml", [{"address": "::1", "port": coll6.port}],
                       interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(tmp_path / "lock"),
                       timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"})
    proc = start_daemon(lab, cfg, log)
    try:
        assert f"collectors=ipfix://[::1]:{coll6.port}" in log.read_text()
        lab.send_udp(lab.ns_b, lab.v4_a, 40071, 9071, [10] * 2)
        cfg.write_text(cfg.read_text().replace(lab.veth_a, "ipfxnomatch*"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while b"msg=reloaded" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = log.read_text()
        assert "msg=reloaded" in text, text
        assert f"reload: stopped metering {lab.veth_a} (no longer selected)" in text
        assert "level=WARNING" in text and "no interface matches interfaces.include=['ipfxnomatch*']" in text
        assert f"collectors=ipfix://[::1]:{coll6.port}" in text.split("msg=reloaded")[1]
    finally:
        stop_daemon(proc, log)
    coll6.receive(5, until_idle=1.0)
    coll6.close()
    assert totals_by_flow(coll6.flow_records())[(lab.v4_b, lab.v4_a, 40071, 9071, 17)] == [2, 2 * 38]


def test_restart_after_sigkill_leaves_no_qdisc_at_sigterm(tmp_path: Path, lab: Lab) -> None:
    """A SIGKILLed run leaves its filters and the clsact it added; the next run removes the filters as
    stale (their owner is gone), takes over the qdisc and removes it at SIGTERM: nothing is left."""
    coll = collector_in(lab.ns_a)
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    cfg = base_config(tmp_path, lab, coll.port)
    first = start_daemon(lab, cfg, log1)
    first.kill()
    first.wait(timeout=10)
    shown = netns_exec(lab.ns_a, "tc", "filter", "show", "dev", lab.veth_a, "ingress").stdout
    assert "ipfixer_ingress" in shown and f".{first.pid}." in shown  # left behind by the killed run
    second = start_daemon(lab, cfg, log2)
    try:
        assert "removed 2 stale ipfixer filter(s)" in log2.read_text()
        lab.send_udp(lab.ns_b, lab.v4_a, 40081, 9081, [20] * 4)
    finally:
        stop_daemon(second, log2)
    assert exported_totals(coll)[(lab.v4_b, lab.v4_a, 40081, 9081, 17)] == [4, 4 * 48]
    assert "clsact" not in netns_exec(lab.ns_a, "tc", "qdisc", "show", "dev", lab.veth_a).stdout
    for hook in ("ingress", "egress"):
        assert "ipfixer" not in netns_exec(lab.ns_a, "tc", "filter", "show", "dev", lab.veth_a, hook).stdout


def test_second_instance_refused(tmp_path: Path, lab: Lab) -> None:
    log = tmp_path / "ipfixer.log"
    cfg = base_config(tmp_path, lab, 9)
    proc = start_daemon(lab, cfg, log)
    try:
        res = subprocess.run(["ip", "netns", "exec", lab.ns_a, *IPFIXER, "run", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60, env=cli_env())
        assert res.returncode == 1
        assert "already meters" in res.stderr and "Traceback" not in res.stderr
    finally:
        stop_daemon(proc, log)


def test_second_instance_with_other_lock_dir_is_refused_and_first_keeps_counting(tmp_path: Path, lab: Lab) -> None:
    """Exclusion does not depend on lock_dir: a second `ipfixer run` with its own lock_dir in the same
    namespace is refused (exit 1, one clear line) and removes nothing; the first counts exactly."""
    coll = collector_in(lab.ns_a)
    log = tmp_path / "ipfixer.log"
    proc = start_daemon(lab, base_config(tmp_path, lab, coll.port), log)
    try:
        lab.send_udp(lab.ns_b, lab.v4_a, 40051, 9051, [100] * 30)
        other = tmp_path / "other"
        other.mkdir()
        cfg2 = write_config(other / "ipfixer.yaml", [{"address": "127.0.0.1", "port": coll.port}],
                            interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(other / "lock"))
        filters = netns_exec(lab.ns_a, "tc", "filter", "show", "dev", lab.veth_a, "ingress").stdout
        res = subprocess.run(["ip", "netns", "exec", lab.ns_a, *IPFIXER, "run", "--config", str(cfg2)],
                             capture_output=True, text=True, timeout=90, env=cli_env())
        assert res.returncode == 1, res.stderr
        assert f"another ipfixer (pid {proc.pid})" in res.stderr and "Traceback" not in res.stderr
        assert netns_exec(lab.ns_a, "tc", "filter", "show", "dev", lab.veth_a, "ingress").stdout == filters
        lab.send_udp(lab.ns_b, lab.v4_a, 40051, 9051, [100] * 30)
    finally:
        stop_daemon(proc, log)
    assert exported_totals(coll)[(lab.v4_b, lab.v4_a, 40051, 9051, 17)] == [60, 60 * 128]


def metrics_port(lab: Lab) -> int:
    """A free TCP port on 127.0.0.1 in the lab's first namespace, for the daemon's metrics endpoint."""
    with in_netns(lab.ns_a, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_stats_reads_running_daemon_metrics(tmp_path: Path, lab: Lab) -> None:
    """`ipfixer stats` against the daemon's Prometheus endpoint (bound to localhost in its namespace)."""
    coll = collector_in(lab.ns_a)
    port = metrics_port(lab)
    log = tmp_path / "ipfixer.log"
    cfg = base_config(tmp_path, lab, coll.port, metrics={"listen": f"127.0.0.1:{port}"})
    cfg.write_text(cfg.read_text().replace("idle: 30s", "idle: 1s"))
    proc = start_daemon(lab, cfg, log)
    try:
        lab.send_udp(lab.ns_b, lab.v4_a, 40031, 9031, [100] * 4)
        coll.receive(10, until_idle=2.5)  # the flow goes out after its 1 s idle timeout
        msgs_before, bytes_before = len(coll.sizes), sum(coll.sizes)
        res = subprocess.run(["ip", "netns", "exec", lab.ns_a, *IPFIXER, "stats", "--config", str(cfg), "--json"],
                             capture_output=True, text=True, timeout=60, env=cli_env())
        assert res.returncode == 0, res.stderr
        values = json.loads(res.stdout)
        before = coll.flow_records()
        assert totals_by_flow(before)[(lab.v4_b, lab.v4_a, 40031, 9031, 17)] == [4, 4 * 128]

        def ingress(recs: list[dict[str, int]], field: str) -> int:
            return sum(r[field] for r in recs if r["flowDirection"] == 0)

        # observed_* are the kernel's live counters: what was metered by the scrape (link-local IPv6
        # chatter included) is exported within an idle timeout and a drain; wait for it, bounded.
        target = values['ipfixer_packets_observed_total{direction="ingress"}']
        for _ in range(10):
            coll.receive(1, until_idle=0.5)
            if ingress(coll.flow_records(), "packetDeltaCount") >= target:
                break
        after = coll.flow_records()

        for metric, field in (("packets", "packetDeltaCount"), ("octets", "octetDeltaCount")):
            value = values[f'ipfixer_{metric}_observed_total{{direction="ingress"}}']
            assert ingress(before, field) <= value <= ingress(after, field)
        assert len(before) <= values["ipfixer_flows_exported_total"] <= len(after)
        name = f"127.0.0.1:{coll.port}"
        # what the daemon counted as sent at the scrape is what arrived around it (loopback loses nothing)
        assert msgs_before <= values[f'ipfixer_collector_messages_total{{collector="{name}"}}'] <= len(coll.sizes)
        assert bytes_before <= values[f'ipfixer_collector_bytes_total{{collector="{name}"}}'] <= sum(coll.sizes)
        assert msgs_before >= 2  # the options/templates message and the flow's
        assert values.get(f'ipfixer_collector_errors_total{{collector="{name}"}}', 0) == 0
    finally:
        stop_daemon(proc, log)
        coll.close()


SEND_ODD = (
    "import struct, sys\n"
    "from scapy.all import Ether, IP, IPv6, UDP, Raw, sendp\n"
    "from scapy.layers.inet6 import IPv6ExtHdrDestOpt\n"
    "iface, smac, dmac, s4, d4, s6, d6 = sys.argv[1:8]\n"
    "e = Ether(src=smac, dst=dmac)\n"
    "v4 = bytearray(bytes(e / IP(src=s4, dst=d4) / UDP(sport=40061, dport=9061) / Raw(b'z' * 10)))\n"
    "struct.pack_into('!H', v4, 16, 1500)  # total length beyond the frame\n"
    "# 0x88B5 (IEEE local experimental): non-IP that nothing answers\n"
    "ext = IPv6(src=s6, dst=d6)\n"
    "for _ in range(7):\n"
    "    ext = ext / IPv6ExtHdrDestOpt()\n"
    "odd = Ether(src=smac, dst=dmac, type=0x88B5) / Raw(b'n' * 28)\n"
    "frames = [Ether(bytes(v4))] * 3 + [odd] * 2 + [e / ext / UDP(sport=1, dport=2)]\n"
    "sendp(frames, iface=iface, verbose=0)\n"
)


def test_metrics_follow_the_kernel_before_any_export(tmp_path: Path, lab: Lab) -> None:
    """packets/octets_observed move at each drain from the kernel's counters, long before the flows'
    timeouts export them; non_ip, fragment, ipv6_ext_limit and bad_length are exposed, exactly."""
    import sys

    from ipfixer.metrics import scrape

    coll = collector_in(lab.ns_a)
    port = metrics_port(lab)
    log = tmp_path / "ipfixer.log"
    cfg = base_config(tmp_path, lab, coll.port, metrics={"listen": f"127.0.0.1:{port}"})
    proc = start_daemon(lab, cfg, log)  # active 60 s, idle 30 s: nothing is exported during the test
    try:
        lab.send_udp(lab.ns_b, lab.v4_a, 40062, 9062, [100] * 10 + [3000])  # 3000: three IPv4 fragments
        netns_exec(lab.ns_b, sys.executable, "-c", SEND_ODD, lab.veth_b, lab.mac(lab.ns_b, lab.veth_b),
                   lab.mac(lab.ns_a, lab.veth_a), lab.v4_b, lab.v4_a, lab.v6_b, lab.v6_a)
        sent_packets, sent_octets = 10 + 3 + 3 + 2 + 1, 10 * 128 + 3028 + 2 * 20 + 3 * 38 + 2 * 28 + 7 * 8 + 48
        values: dict[str, float] = {}
        for _ in range(40):  # bounded: until a drain (every 500 ms) has read the counters
            values = in_netns(lab.ns_a, lambda: scrape(f"127.0.0.1:{port}"))
            if values['ipfixer_packets_observed_total{direction="ingress"}'] >= sent_packets:
                break
            time.sleep(0.25)
        assert values["ipfixer_flows_exported_total"] == 0  # the old metric only moved here
        assert values['ipfixer_packets_observed_total{direction="ingress"}'] >= sent_packets
        assert values['ipfixer_octets_observed_total{direction="ingress"}'] >= sent_octets
        kinds = {k: values[f'ipfixer_classifier_packets_total{{counter="{k}"}}']
                 for k in ("non_ip", "fragment", "ipv6_ext_limit", "bad_length", "malformed", "map_full")}
        assert kinds == {"non_ip": 2, "fragment": 2, "ipv6_ext_limit": 1, "bad_length": 3, "malformed": 0,
                         "map_full": 0}
        assert values["ipfixer_malformed_packets_total"] == 3
        observed = values['ipfixer_packets_observed_total{direction="ingress"}']
    finally:
        stop_daemon(proc, log)
    coll.receive(5, until_idle=1.0)
    coll.close()
    exported = sum(r["packetDeltaCount"] for r in coll.flow_records() if r["flowDirection"] == 0)
    # every IP packet observed by the scrape was exported at shutdown (non-IP flows have no template)
    assert observed - kinds["non_ip"] <= exported


def test_interface_appearing_later_is_metered(tmp_path: Path, lab: Lab) -> None:
    """A veth created after start that matches the include globs (a new container's) is attached from
    its netlink link event, counted exactly and named in the interface table."""
    from ipfixer.lab import ip, netns_exec, unique_name

    coll = collector_in(lab.ns_a)
    log = tmp_path / "ipfixer.log"
    cfg = write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": coll.port}],
                       interfaces={"include": [lab.veth_a, "ipfxn*"], "exclude": []},
                       lock_dir=str(tmp_path / "lock"),
                       timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"})
    new_a, new_b = unique_name("n"), unique_name("m")
    proc = start_daemon(lab, cfg, log)
    try:
        ip("-n", lab.ns_a, "link", "add", new_a, "type", "veth", "peer", "name", new_b, "netns", lab.ns_b)
        ip("-n", lab.ns_a, "addr", "add", "192.168.77.1/24", "dev", new_a)
        ip("-n", lab.ns_b, "addr", "add", "192.168.77.2/24", "dev", new_b)
        ip("-n", lab.ns_a, "link", "set", new_a, "up")
        ip("-n", lab.ns_b, "link", "set", new_b, "up")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # attached = our filter is on it
            shown = netns_exec(lab.ns_a, "tc", "filter", "show", "dev", new_a, "ingress").stdout
            if "ipfixer_ingress" in shown:
                break
            time.sleep(0.1)
        assert "ipfixer_ingress" in shown, log.read_text()
        lab.send_udp(lab.ns_b, "192.168.77.1", 40041, 9041, [64] * 5)
    finally:
        stop_daemon(proc, log)
    coll.receive(5, until_idle=1.0)
    coll.close()
    new_index = lab.ifindex(lab.ns_a, new_a)
    recs = [r for r in coll.flow_records() if r.get("destinationTransportPort") == 9041]
    assert totals_by_flow(recs) == {("192.168.77.2", "192.168.77.1", 40041, 9041, 17): [5, 5 * 92]}
    assert {r["ingressInterface"] for r in recs} == {new_index}
    names = {(r["ingressInterface"], r["interfaceName"]) for r in coll.options_records() if "interfaceName" in r}
    assert (new_index, new_a) in names
