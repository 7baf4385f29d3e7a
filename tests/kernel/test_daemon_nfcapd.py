"""Issue 4 end to end: traffic the test generates between two namespaces, ipfixer's real kernel path
(`ipfixer run` on one end of the veth), real IPFIX over UDP to nfcapd, read back with nfdump.
Exact packets and octets per flow, direction, ports, protocol, interface and timestamps."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfixer.lab import Lab, netns_exec, start_ipfixer, stop_ipfixer
from tests.cli.helpers import cli_env, write_config
from tests.collectors import Nfcapd, free_udp_port

pytestmark = [pytest.mark.root, pytest.mark.interop]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def run_with_nfcapd(tmp_path: Path, lab: Lab, traffic: Any, nfcapd_bufsize: int | None = None,
                    **overrides: Any) -> tuple[list[dict[str, Any]], str]:
    """Start nfcapd and ipfixer in lab.ns_a, run traffic(), SIGTERM ipfixer (flush), return nfdump's flows."""
    nfc = Nfcapd(tmp_path / "nfcapd", free_udp_port(), netns=lab.ns_a, bufsize=nfcapd_bufsize)
    proc = None
    try:
        settings: dict[str, Any] = {
            "interfaces": {"include": [lab.veth_a], "exclude": []},
            "lock_dir": str(tmp_path / "lock"),
            "timeouts": {"active": "60s", "idle": "30s", "drain_interval": "500ms"},
        }
        settings.update(overrides)
        cfg = write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": nfc.port}], **settings)
        log = tmp_path / "ipfixer.log"
        proc = start_ipfixer(lab.ns_a, cfg, log, env=cli_env())
        traffic()
        assert stop_ipfixer(proc) == 0, log.read_text()
        time.sleep(0.5)  # loopback datagrams are queued; let nfcapd read them before it stops
        return nfc.stop(), log.read_text()
    finally:
        if proc is not None:
            stop_ipfixer(proc)
        nfc.kill()


def flows_of(flows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [f for f in flows if all(f.get(k) == v for k, v in match.items())]


def total(flows: list[dict[str, Any]]) -> tuple[int, int]:
    return sum(f["in_packets"] for f in flows), sum(f["in_bytes"] for f in flows)


def test_exact_counts_directions_and_times_at_nfdump(tmp_path: Path, lab: Lab) -> None:
    ifindex = lab.ifindex(lab.ns_a, lab.veth_a)
    times: dict[str, int] = {}

    def traffic() -> None:
        times["t0"] = time.time_ns() // 1_000_000
        lab.send_udp(lab.ns_b, lab.v4_a, 41001, 9101, [200] * 5 + [1000] * 2)  # into veth_a: ingress
        lab.send_udp(lab.ns_a, lab.v4_b, 41002, 9102, [50] * 3)  # out of veth_a: egress
        lab.send_udp(lab.ns_b, lab.v6_a, 41003, 9103, [80] * 4)  # IPv6, ingress
        netns_exec(lab.ns_b, "ping", "-c", "3", "-i", "0.2", "-s", "100", lab.v4_a)
        times["t1"] = time.time_ns() // 1_000_000

    flows, log = run_with_nfcapd(tmp_path, lab, traffic)
    t0, t1 = times["t0"], times["t1"]

    udp_in = flows_of(flows, src4_addr=lab.v4_b, dst4_addr=lab.v4_a, src_port=41001, dst_port=9101, proto=17)
    assert total(udp_in) == (7, 5 * 228 + 2 * 1028)
    assert {(f["direction"], f["input_snmp"], f["output_snmp"]) for f in udp_in} == {(0, ifindex, 0)}

    udp_out = flows_of(flows, src4_addr=lab.v4_a, dst4_addr=lab.v4_b, src_port=41002, dst_port=9102, proto=17)
    assert total(udp_out) == (3, 3 * 78)
    assert {(f["direction"], f["input_snmp"], f["output_snmp"]) for f in udp_out} == {(1, 0, ifindex)}

    udp6 = flows_of(flows, src6_addr=lab.v6_b, dst6_addr=lab.v6_a, src_port=41003, dst_port=9103, proto=17)
    assert total(udp6) == (4, 4 * (40 + 8 + 80))

    echo = flows_of(flows, src4_addr=lab.v4_b, dst4_addr=lab.v4_a, proto=1, icmp_type=8)
    reply = flows_of(flows, src4_addr=lab.v4_a, dst4_addr=lab.v4_b, proto=1, icmp_type=0)
    assert total(echo) == (3, 3 * 128) and total(reply) == (3, 3 * 128)
    assert {f["direction"] for f in echo} == {0} and {f["direction"] for f in reply} == {1}

    for f in udp_in + udp_out + udp6 + echo + reply:  # wall-clock ms of the packets, not of the export
        assert t0 - 5 <= f["first"] <= f["last"] <= t1 + 5, (f, t0, t1)
    assert "Traceback" not in log


def test_tiny_kernel_map_overflow_totals_exact(tmp_path: Path, lab: Lab) -> None:
    """A 16-entry kernel map and 120 flows: the rest spill through the ring buffer into the Accounter;
    the collector still gets every packet, and the statistics show the overflow."""
    ports = list(range(42000, 42120))
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for p in range(42000,42120):\n"
        "    for _ in range(3):\n"
        "        s.sendto(b'x'*40,(sys.argv[1],p))\n"
    )

    def traffic() -> None:
        netns_exec(lab.ns_b, "python3", "-c", script, lab.v4_a)

    flows, log = run_with_nfcapd(
        tmp_path, lab, traffic, cache={"kernel_map_entries": 16, "accounter_max_entries": 50})
    got = {p: total(flows_of(flows, src4_addr=lab.v4_b, dst4_addr=lab.v4_a, dst_port=p, proto=17)) for p in ports}
    assert got == {p: (3, 3 * 68) for p in ports}
    final = next(line for line in log.splitlines() if "final counters" in line)
    counters = dict(kv.split("=") for kv in final.split("final counters ")[1].split())
    assert int(counters["spilled"]) > 0 and int(counters["ringbuf_fail"]) == 0, final


PACED = (
    "import socket,sys,time\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "dst,base,n,rate=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),float(sys.argv[4])\n"
    "t0=time.monotonic()\n"
    "for i in range(n):\n"
    "    s.sendto(b'y'*40,(dst,base+i))\n"
    "    if i%100==99:\n"
    "        ahead=t0+(i+1)/rate-time.monotonic()\n"
    "        if ahead>0: time.sleep(ahead)\n"
    "print(n/(time.monotonic()-t0))\n"
)


def test_overflow_at_a_realistic_rate_is_lossless(tmp_path: Path, lab: Lab) -> None:
    """Issue 12: a 4,096-entry kernel map and 50,000 one-packet flows at 20,000 new flows/s. Most spill
    through the ring buffer (served by its own thread while the daemon drains and encodes) into the
    Accounter; nfcapd gets every packet and the kernel counts no ring-buffer failure."""
    base, n = 10000, 50_000
    rate: dict[str, float] = {}

    def traffic() -> None:
        out = netns_exec(lab.ns_b, "python3", "-c", PACED, lab.v4_a, str(base), str(n), "20000").stdout
        rate["achieved"] = float(out.strip())

    # nfcapd sized for bursts (-B, up to net.core.rmem_max): with its default 208 KiB buffer it drops
    # datagrams of a drain's burst (~330 messages per drain here; it logs them as sequence errors).
    flows, log = run_with_nfcapd(tmp_path, lab, traffic, nfcapd_bufsize=4 << 20, cache={"kernel_map_entries": 4096})
    got: dict[int, list[int]] = {}
    for f in flows:
        if f.get("proto") == 17 and f.get("src4_addr") == lab.v4_b and f.get("dst4_addr") == lab.v4_a:
            c = got.setdefault(f["dst_port"], [0, 0])
            c[0] += f["in_packets"]
            c[1] += f["in_bytes"]
    final = next(line for line in log.splitlines() if "final counters" in line)
    counters = dict(kv.split("=") for kv in final.split("final counters ")[1].split())
    assert int(counters["ringbuf_fail"]) == 0, (final, rate)
    # 10,000 new flows per 500 ms drain interval, 4,096 fit in the map: about half must spill.
    assert int(counters["spilled"]) >= n // 4 and int(counters["map_full"]) == int(counters["spilled"]), final
    missing = [p for p in range(base, base + n) if p not in got]
    assert not missing, (len(missing), final, rate)
    assert {tuple(v) for v in got.values()} == {(1, 68)}
    assert sorted(got) == list(range(base, base + n))


def _tc_filters(lab: Lab) -> str:
    return "".join(netns_exec(lab.ns_a, "tc", "filter", "show", "dev", lab.veth_a, hook).stdout
                   for hook in ("ingress", "egress"))


def test_nothing_left_after_sigkill_and_restart(tmp_path: Path, lab: Lab) -> None:
    """A SIGKILLed ipfixer leaves its filters; the next start removes them; a clean stop leaves nothing."""
    import signal

    netns_exec(lab.ns_a, "tc", "qdisc", "add", "dev", lab.veth_a, "clsact")  # someone else's qdisc...
    netns_exec(lab.ns_a, "tc", "filter", "add", "dev", lab.veth_a, "ingress", "prio", "10000", "protocol", "ip",
               "u32", "match", "u32", "0", "0", "flowid", "1:1")  # ...and filter, which must survive
    cfg = write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": 9}],
                       interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(tmp_path / "lock"))
    log = tmp_path / "ipfixer.log"
    proc = start_ipfixer(lab.ns_a, cfg, log, env=cli_env())
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert "ipfixer_ingress" in _tc_filters(lab) and "ipfixer_egress" in _tc_filters(lab)  # the crash's leftovers

    log2 = tmp_path / "ipfixer2.log"
    proc = start_ipfixer(lab.ns_a, cfg, log2, env=cli_env())
    try:
        assert "removed 2 stale ipfixer filter(s)" in log2.read_text()
        # one of ours, not two (a filter's name carries its owner: ipfixer_ingress.<owner>)
        assert len(re.findall(r"ipfixer_ingress\S* direct-action", _tc_filters(lab))) == 1
    finally:
        assert stop_ipfixer(proc) == 0
    left = _tc_filters(lab)
    assert "ipfixer" not in left and "u32" in left  # ours gone, the foreign filter untouched
    assert "clsact" in netns_exec(lab.ns_a, "tc", "qdisc", "show", "dev", lab.veth_a).stdout
