"""Issue 16 at real collectors: VRF ids in data records and VRF names in the options table, samplingInterval
in data records, exported by the Exporter (the daemon's export path, annotation included) over UDP and
decoded by nfcapd/nfdump and tshark.  The kernel side (real VRF devices) is tests/kernel/test_vrf.py."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ipfixer.export import Exporter, ExportSession, UdpTransport
from ipfixer.export.options import sampling_values
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, VrfTable, records_to_batch, to_addr16
from ipfixer.templates import load_templates
from tests.collectors import UTC_ENV

pytestmark = pytest.mark.interop

T = load_templates()
OPTIONS = [T["options_exporter_stats"], T["options_sampling"], T["options_interfaces"], T["options_vrfs"]]
VRFS = VrfTable({3: 10, 4: 10, 5: 20}, {10: "vrf-red", 20: "vrf-blue"})


def flows(now_ms: int) -> list[FlowRecord]:
    """Ingress on 3 (vrf-red), egress on 5 (vrf-blue), ingress on 6 (no VRF), IPv6 ingress on 4 (vrf-red)."""
    def rec(sport: int, ifindex: int, direction: int, packets: int, v6: bool = False) -> FlowRecord:
        return FlowRecord(
            ethertype=ETH_P_IPV6 if v6 else ETH_P_IP, direction=direction,
            src_addr=to_addr16("fd00::1" if v6 else "10.1.0.1"), dst_addr=to_addr16("fd00::2" if v6 else "10.1.0.2"),
            src_port=sport, dst_port=53, protocol=17, ifindex=ifindex,
            ingress_if=ifindex if direction == 0 else 0, egress_if=ifindex if direction == 1 else 0,
            packets=packets, octets=packets * 100, start_ms=now_ms - 900, end_ms=now_ms - 100, end_reason=1,
        )  # fmt: skip

    return [rec(5001, 3, 0, 3), rec(5002, 5, 1, 4), rec(5003, 6, 0, 5), rec(5004, 4, 0, 6, v6=True)]


def export_to(ports: list[tuple[str, int]], family: str, sampling: int) -> None:
    """One options refresh then one flow batch, through an Exporter, to each (protocol, port)."""
    now_ns = time.time_ns()
    data = {ETH_P_IP: T[f"ipv4_{family}_flow"], ETH_P_IPV6: T[f"ipv6_{family}_flow"]}
    collectors = [(f"c{i}", ExportSession(proto, 7, data, OPTIONS, boot_wall_ns=now_ns - 10**10),  # type: ignore[arg-type]
                   UdpTransport("127.0.0.1", port)) for i, (proto, port) in enumerate(ports)]
    ex = Exporter(collectors, sampling_interval=sampling)
    try:
        ex.vrfs = VRFS
        ex.export_options_refresh(now_ns, sampling=sampling_values(sampling), interfaces={3: "eth3"},
                                  vrfs=dict(VRFS.names))
        time.sleep(0.2)  # nfcapd must have the sampler and the names before the flows
        ex.export(records_to_batch(flows(now_ns // 10**6)), now_ns)
        for c in ex.collectors:
            assert c.stats.error_count == 0, c.stats.errors
    finally:
        ex.close()


def nfdump_fmt(nfc: Any, fmt: str) -> list[str]:
    out = []
    for f in sorted(nfc.dir.glob("nfcapd.[0-9]*")):
        res = subprocess.run(["nfdump", "-q", "-r", str(f), "-o", f"fmt:{fmt}"], capture_output=True, text=True,
                             env=UTC_ENV, timeout=30, check=True)
        out += [line.split() for line in res.stdout.splitlines() if line.strip()]  # type: ignore[misc]
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_vrf_ids_and_names_at_nfcapd(nfcapd: Any, protocol: str) -> None:
    nfc = nfcapd()
    export_to([(protocol, nfc.port)], "vrf", 1)
    time.sleep(0.5)
    rows = nfc.stop()
    got = {f["src_port"]: (int(f["ingress_vrf"]), int(f["egress_vrf"]), f["in_packets"]) for f in rows}
    assert got == {5001: (10, 0, 3), 5002: (0, 20, 4), 5003: (0, 0, 5), 5004: (10, 0, 6)}
    # the names from the options table, as nfdump joins them to the ids (%ivrfnam / %evrfnam)
    names = {int(r[0]): r[1:] for r in nfdump_fmt(nfc, "%sp %ivrf %ivrfnam %evrf %evrfnam")}
    assert names == {5001: ["10", "vrf-red", "0"], 5002: ["0", "20", "vrf-blue"], 5003: ["0", "0"],
                     5004: ["10", "vrf-red", "0"]}
    log = nfc.log_text()
    assert "Sequence Errors: 0, Bad Packets: 0" in log, log
    assert [line for line in log.splitlines() if "error" in line.lower() and "Sequence Errors" not in line] == []


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_vrf_ids_and_names_in_tshark(tshark: Any, protocol: str) -> None:
    cap = tshark(2)  # the options message, the flow message
    export_to([(protocol, cap.port)], "vrf", 1)
    records = cap.finish()
    names = {r["cflow.ingress_vrfid"]: r["cflow.vrfname"] for r in records if "cflow.vrfname" in r}
    assert names == {"10": "vrf-red", "20": "vrf-blue"}
    data = {int(r["cflow.srcport"]): (r["cflow.ingress_vrfid"], r["cflow.egress_vrfid"])
            for r in records if "cflow.srcport" in r}
    assert data == {5001: ("10", "0"), 5002: ("0", "20"), 5003: ("0", "0"), 5004: ("10", "0")}


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
def test_sampling_interval_in_data_records_at_tshark_and_nfcapd(nfcapd: Any, tshark: Any, protocol: str) -> None:
    """tshark reads samplingInterval in every data record; nfcapd (which reads the rate from the options
    record only) decodes the same records, marks them sampled and scales them by the interval."""
    nfc = nfcapd()
    cap = tshark(2)
    export_to([(protocol, nfc.port), (protocol, cap.port)], "sampled", 64)
    records = cap.finish()
    data = {int(r["cflow.srcport"]): r for r in records if "cflow.srcport" in r}
    assert set(data) == {5001, 5002, 5003, 5004}
    assert {r["cflow.sampling_interval"] for r in data.values()} == {"64"}
    sent = {int(p): int(r["cflow.packets"]) for p, r in data.items()}
    assert sent == {5001: 3, 5002: 4, 5003: 5, 5004: 6}
    time.sleep(0.5)
    rows = nfc.stop()
    got = {f["src_port"]: (f["in_packets"], f["in_bytes"], f["sampled"]) for f in rows}
    assert got == {p: (n * 64, n * 100 * 64, 1) for p, n in sent.items()}


def test_unsampled_records_say_interval_one(nfcapd: Any, tshark: Any, tmp_path: Path) -> None:
    """sampling.interval 1 (the default): samplingInterval 1 in each record, counts unscaled at nfcapd."""
    nfc = nfcapd()
    cap = tshark(2)
    export_to([("ipfix", nfc.port), ("ipfix", cap.port)], "sampled", 1)
    records = [r for r in cap.finish() if "cflow.srcport" in r]
    assert len(records) == 4 and {r["cflow.sampling_interval"] for r in records} == {"1"}
    time.sleep(0.5)
    got = {f["src_port"]: f["in_packets"] for f in nfc.stop()}
    assert got == {5001: 3, 5002: 4, 5003: 5, 5004: 6}
