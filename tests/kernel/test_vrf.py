"""Issue 16 through the real daemon: a router namespace metering two interfaces, traffic from two host
namespaces, IPFIX to nfcapd (read back with nfdump) and captured by tshark in the router namespace.

- VRF router: two Linux VRFs (`ip link add ... type vrf table N`), one interface in each, traffic in each,
  then an interface moved to the other VRF and a third VRF created while the daemon runs: every record
  carries the VRF table id of its interface at that time, and the names arrive in the VRF options table
  (nfdump's %ivrfnam, tshark's cflow.vrfname).  Needs a kernel with CONFIG_NET_VRF; skipped (with that
  reason) on one without.
- VRF-lite router: the same with the interfaces put in tables by input-interface rules (no VRF device),
  named in the namespace's rt_tables; runs on any kernel.
- The same router without VRFs, VRF template selected: ids 0, no names, counts exact.
- samplingInterval in data records with `sampling.interval: 4`: tshark reads 4 in every record, nfcapd
  scales exactly what was sent by 4.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ipfixer.lab import ip, start_ipfixer, stop_ipfixer
from tests.cli.helpers import cli_env, write_config
from tests.collectors import UTC_ENV, Nfcapd, _pairs_to_multidict, _walk_flows, free_udp_port
from tests.labs import Router, vrf_unsupported

pytestmark = [pytest.mark.root, pytest.mark.interop]

@pytest.fixture
def router() -> Any:
    r = Router().build()
    try:
        yield r
    finally:
        r.close()


@dataclass
class Result:
    flows: list[dict[str, Any]]  # nfdump -o json
    names: dict[int, list[str]]  # src port -> nfdump fmt "%ivrf %ivrfnam %evrf %evrfnam" fields
    tshark: list[dict[str, Any]]  # tshark's decoded Data Records (flow and options)
    log: str


def run_router(tmp_path: Path, r: Router, traffic: Callable[[], None], protocol: str = "ipfix",
               **settings: Any) -> Result:
    """nfcapd and a tshark capture of its port in the router namespace, `ipfixer run` there on r1 and r2
    (exporting `protocol`), traffic(), SIGTERM (flush); what both collectors decoded."""
    port = free_udp_port()
    nfc = Nfcapd(tmp_path / "nfcapd", port, netns=r.ns_r)
    pcap, tlog = tmp_path / "cap.pcap", tmp_path / "tshark.log"
    with open(tlog, "wb") as out:
        cap = subprocess.Popen(["ip", "netns", "exec", r.ns_r, "tshark", "-i", "lo", "-f", f"udp port {port}",
                                "-a", "duration:120", "-w", str(pcap)], stdout=out, stderr=subprocess.STDOUT)
    proc = None
    try:
        deadline = time.monotonic() + 10
        while b"Capturing on" not in tlog.read_bytes() and time.monotonic() < deadline and cap.poll() is None:
            time.sleep(0.05)
        assert b"Capturing on" in tlog.read_bytes(), tlog.read_text()
        time.sleep(0.3)
        base: dict[str, Any] = {
            "interfaces": {"include": [r.r1, r.r2], "exclude": []},
            "lock_dir": str(tmp_path / "lock"),
            "timeouts": {"active": "60s", "idle": "1s", "drain_interval": "200ms"},
        }
        base.update(settings)
        cfg = write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": port, "protocol": protocol}],
                           **base)
        log = tmp_path / "ipfixer.log"
        proc = start_ipfixer(r.ns_r, cfg, log, env=cli_env())
        traffic()
        assert stop_ipfixer(proc) == 0, log.read_text()
        time.sleep(0.5)  # let nfcapd and tshark read the last datagrams
        flows = nfc.stop()
        names: dict[int, list[str]] = {}
        for f in sorted(nfc.dir.glob("nfcapd.[0-9]*")):
            res = subprocess.run(["nfdump", "-q", "-r", str(f), "-o", "fmt:%sp %ivrf %ivrfnam %evrf %evrfnam"],
                                 capture_output=True, text=True, env=UTC_ENV, timeout=30, check=True)
            for line in res.stdout.splitlines():
                if line.strip():
                    sp, *rest = line.split()
                    names[int(sp)] = rest
        cap.send_signal(signal.SIGINT)
        cap.wait(20)
        out = subprocess.run(["tshark", "-r", str(pcap), "-d", f"udp.port=={port},cflow", "-T", "json"],
                             capture_output=True, timeout=60, check=True)
        records: list[dict[str, Any]] = []
        for p in json.loads(out.stdout.decode(), object_pairs_hook=_pairs_to_multidict):
            _walk_flows(p["_source"]["layers"].get("cflow"), records)
        return Result(flows, names, records, log.read_text())
    finally:
        if proc is not None:
            stop_ipfixer(proc)
        nfc.kill()
        if cap.poll() is None:
            cap.kill()
            cap.wait(10)


def udp(res: Result, sport: int) -> list[dict[str, Any]]:
    return [f for f in res.flows if f.get("proto") == 17 and f.get("src_port") == sport]


VRF_TEMPLATES = {"ipv4": "ipv4_vrf_flow", "ipv6": "ipv6_vrf_flow"}


def check_vrfs(res: Result, want: dict[int, tuple[int, int, int]], names: dict[int, str]) -> None:
    """Per source port (packets of 100 bytes, ingress ifindex, VRF id) exact at nfcapd; the names joined
    by nfdump and read by tshark; the router's ICMP answers (egress) carry egress VRF ids."""
    for sport, (packets, ifindex, vrf) in want.items():
        fl = udp(res, sport)
        assert sum(f["in_packets"] for f in fl) == packets and sum(f["in_bytes"] for f in fl) == packets * 128, fl
        assert {(f["input_snmp"], int(f["ingress_vrf"]), int(f["egress_vrf"])) for f in fl} == {(ifindex, vrf, 0)}
    for sport, (_, _, vrf) in want.items():  # nfdump joined the VRF options table to the ids
        assert res.names[sport] == [str(vrf), names[vrf], "0"], res.names
    # the router's ICMP port-unreachable answers leave through the same interfaces: egress VRF ids
    icmp_out = [f for f in res.flows if f.get("proto") == 1 and f.get("direction") == 1]
    assert icmp_out and all(int(f["ingress_vrf"]) == 0 and int(f["egress_vrf"]) in names for f in icmp_out)
    ts_names = {int(t["cflow.ingress_vrfid"]): t["cflow.vrfname"] for t in res.tshark if "cflow.vrfname" in t}
    assert ts_names == names


def test_vrf_router_ids_per_record_names_and_moves(tmp_path: Path, router: Router) -> None:
    reason = vrf_unsupported()
    if reason:
        pytest.skip(reason)
    r = router
    va, vb, vc = "ipfxh8va", "ipfxh8vb", "ipfxh8vc"
    r.add_vrf(va, 10)
    r.add_vrf(vb, 20)
    r.enslave(1, va)
    r.enslave(2, vb)
    if1, if2 = r.ifindex(r.r1), r.ifindex(r.r2)

    def traffic() -> None:
        r.send(1, 41001, 9001, 5)  # in VRF 10
        r.send(2, 41002, 9002, 7)  # in VRF 20
        time.sleep(2.5)  # idle timeout 1 s: exported before the moves below
        r.enslave(1, vb)  # released from VRF 10, enslaved to VRF 20
        r.add_vrf(vc, 30)  # a new VRF while running: its name is sent at once
        r.enslave(2, vc)
        time.sleep(0.5)  # the daemon applies the link events at its next drain
        r.send(1, 41003, 9003, 3)  # now in VRF 20
        r.send(2, 41004, 9004, 4)  # now in VRF 30

    res = run_router(tmp_path, r, traffic, templates=VRF_TEMPLATES)
    want = {41001: (5, if1, 10), 41002: (7, if2, 20), 41003: (3, if1, 20), 41004: (4, if2, 30)}
    check_vrfs(res, want, {10: va, 20: vb, 30: vc})
    ts = {int(t["cflow.srcport"]): int(t["cflow.ingress_vrfid"]) for t in res.tshark
          if t.get("cflow.protocol") == "17" and "cflow.srcport" in t}
    assert ts == {sport: vrf for sport, (_, _, vrf) in want.items()}
    assert "Traceback" not in res.log


def test_vrf_lite_router_ids_per_record_names_and_moves(tmp_path: Path, router: Router) -> None:
    """VRF-lite: each interface put in a routing table by an input-interface rule (`ip rule add iif r1
    lookup 10`), the tables named in the namespace's own /etc/iproute2/rt_tables (`ip netns exec` binds
    /etc/netns/<ns>/iproute2 there). Two VRFs, traffic in each; then the rules move r1 to table 20 and r2
    to table 30 (no name: "table30") while the daemon runs. Every record carries its interface's table
    at that time, and nfdump and tshark read the names from the VRF options table."""
    r = router
    etc = Path("/etc/netns") / r.ns_r
    (etc / "iproute2").mkdir(parents=True)
    try:
        (etc / "iproute2" / "rt_tables").write_text("255 local\n254 main\n10 red\n20 blue\n")
        ip("-n", r.ns_r, "rule", "add", "iif", r.r1, "lookup", "10", "pref", "100")
        ip("-n", r.ns_r, "rule", "add", "iif", r.r2, "lookup", "20", "pref", "101")
        if1, if2 = r.ifindex(r.r1), r.ifindex(r.r2)

        def traffic() -> None:
            r.send(1, 41001, 9001, 5)  # in VRF 10
            r.send(2, 41002, 9002, 7)  # in VRF 20
            time.sleep(2.5)  # idle timeout 1 s: exported before the moves below
            ip("-n", r.ns_r, "rule", "del", "pref", "100")
            ip("-n", r.ns_r, "rule", "del", "pref", "101")
            ip("-n", r.ns_r, "rule", "add", "iif", r.r1, "lookup", "20", "pref", "100")
            ip("-n", r.ns_r, "rule", "add", "iif", r.r2, "lookup", "30", "pref", "101")
            time.sleep(0.5)  # the daemon applies the rule events at its next drain
            r.send(1, 41003, 9003, 3)  # now in VRF 20
            r.send(2, 41004, 9004, 4)  # now in VRF 30

        res = run_router(tmp_path, r, traffic, templates=VRF_TEMPLATES)
    finally:
        shutil.rmtree(etc, ignore_errors=True)
    want = {41001: (5, if1, 10), 41002: (7, if2, 20), 41003: (3, if1, 20), 41004: (4, if2, 30)}
    check_vrfs(res, want, {10: "red", 20: "blue", 30: "table30"})
    assert "Traceback" not in res.log


def test_router_without_vrfs_exports_zero_ids_and_no_names(tmp_path: Path, router: Router) -> None:
    """The VRF template on interfaces in no VRF, one of them enslaved to a bridge while the daemon runs
    (a master that is not a VRF): ids 0 at nfcapd and tshark, no VRF options record, counts exact."""
    r = router

    def traffic() -> None:
        r.send(1, 41001, 9001, 5)
        r.send(2, 41002, 9002, 6, size=200)
        ip("-n", r.ns_r, "link", "add", "ipfxh8br", "type", "bridge")
        ip("-n", r.ns_r, "link", "set", r.r2, "master", "ipfxh8br")
        time.sleep(0.5)
        r.send(1, 41003, 9003, 2)

    res = run_router(tmp_path, r, traffic, templates=VRF_TEMPLATES)
    for sport, packets, size in ((41001, 5, 100), (41002, 6, 200), (41003, 2, 100)):
        fl = udp(res, sport)
        assert (sum(f["in_packets"] for f in fl), sum(f["in_bytes"] for f in fl)) == (packets, packets * (size + 28))
        assert {(int(f["ingress_vrf"]), int(f["egress_vrf"])) for f in fl} == {(0, 0)}
    icmp_out = [f for f in res.flows if f.get("proto") == 1 and f.get("direction") == 1]  # port unreachable
    assert icmp_out and {(int(f["ingress_vrf"]), int(f["egress_vrf"])) for f in icmp_out} == {(0, 0)}
    assert not [t for t in res.tshark if "cflow.vrfname" in t]
    data = [t for t in res.tshark if t.get("cflow.protocol") == "17"]
    assert data and {(t["cflow.ingress_vrfid"], t["cflow.egress_vrfid"]) for t in data} == {("0", "0")}
    assert "Traceback" not in res.log


def test_sampling_interval_in_data_records_through_the_daemon(tmp_path: Path, router: Router) -> None:
    """1-in-4 random sampling in the kernel: tshark reads samplingInterval 4 in each data record; nfcapd,
    reading the rate from the options record, scales exactly the sampled counts by 4."""
    r = router
    sent = 400

    def traffic() -> None:
        r.send(1, 41001, 9001, sent)

    res = run_router(tmp_path, r, traffic, templates={"ipv4": "ipv4_sampled_flow", "ipv6": "ipv6_sampled_flow"},
                     sampling={"interval": 4})
    data = [t for t in res.tshark if t.get("cflow.protocol") == "17" and t.get("cflow.srcport") == "41001"]
    assert data and {t["cflow.sampling_interval"] for t in data} == {"4"}
    sampled = sum(int(t["cflow.packets"]) for t in data)
    assert 0 < sampled < sent  # 1 in 4 at random: about 100 (0 or 400 has probability < 1e-49)
    fl = udp(res, 41001)
    assert {f["sampled"] for f in fl} == {1}
    assert (sum(f["in_packets"] for f in fl), sum(f["in_bytes"] for f in fl)) == (4 * sampled, 4 * sampled * 128)
    assert "Traceback" not in res.log
