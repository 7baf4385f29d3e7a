"""`ipfixer replay` of a capture file the test writes: exact per-flow counts at a real UDP collector."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from tests.cli.helpers import IPFIXER, UdpCollector, cli_env, totals_by_flow, write_config

T0 = 1_700_000_000.0


def _capture(path: Path) -> dict[tuple[object, ...], list[int]]:
    pkts: list[Any] = []
    expected: dict[tuple[object, ...], list[int]] = {}

    def add(pkt: Any, key: tuple[object, ...], n: int, ip_len: int) -> None:
        for _ in range(n):
            p = pkt.copy()
            p.time = T0 + len(pkts) * 0.001
            pkts.append(p)
        expected[key] = [n, n * ip_len]

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    add(eth / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5000, dport=53) / (b"a" * 72),
        ("10.0.0.1", "10.0.0.2", 5000, 53, 17), 7, 20 + 8 + 72)
    add(eth / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=40000, flags="A") / (b"b" * 200),
        ("10.0.0.2", "10.0.0.1", 80, 40000, 6), 11, 20 + 20 + 200)
    add(eth / IP(src="10.0.0.1", dst="10.0.0.9") / ICMP(type=8, code=0) / (b"c" * 56),
        ("10.0.0.1", "10.0.0.9", 0, 8 * 256, 1), 3, 20 + 8 + 56)
    add(eth / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=6000, dport=6001) / (b"d" * 10),
        ("2001:db8::1", "2001:db8::2", 6000, 6001, 17), 5, 40 + 8 + 10)
    pkts.append(Ether(type=0x0800) / b"\x45\x00")  # a truncated IPv4 packet: counted as malformed, not fatal
    pkts[-1].time = T0 + 1
    wrpcap(str(path), pkts)
    return expected


def test_replay_exact_counts(tmp_path: Path) -> None:
    expected = _capture(tmp_path / "in.pcap")
    coll = UdpCollector()
    try:
        cfg = write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": coll.port}],
                           cache={"accounter_max_entries": 2})  # forces evictions mid-file: sums stay exact
        res = subprocess.run([*IPFIXER, "replay", str(tmp_path / "in.pcap"), "--config", str(cfg), "-q"],
                             capture_output=True, text=True, timeout=120, env=cli_env())
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["packets"] == 27 and summary["malformed"] == 1
        coll.receive(5, until_idle=1.0)
        records = coll.flow_records()
        assert totals_by_flow(records) == {k: v for k, v in expected.items()}
        starts = [r["flowStartMilliseconds"] for r in records]
        assert min(starts) == int(T0 * 1000)  # capture time, not replay time
        assert all(r["flowDirection"] == 0 for r in records)
    finally:
        coll.close()


def test_replay_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture")
    cfg = write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": 9}])
    res = subprocess.run([*IPFIXER, "replay", str(bad), "--config", str(cfg)], capture_output=True, text=True,
                         timeout=60, env=cli_env())
    assert res.returncode == 1 and "not a pcap" in res.stderr and "Traceback" not in res.stderr


def _refused(tmp_path: Path, path: Path, reason: str) -> None:
    """Exit 1, one line naming the file and the reason (given whole or its start), nothing exported."""
    coll = UdpCollector()
    try:
        cfg = write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": coll.port}])
        res = subprocess.run([*IPFIXER, "replay", str(path), "--config", str(cfg), "-q"], capture_output=True,
                             text=True, timeout=60, env=cli_env())
        coll.receive(1.5, until_idle=1.0)
    finally:
        coll.close()
    assert res.returncode == 1 and res.stdout == "", res.stdout + res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"ipfixer: error: {path}: {reason}"), line
    assert coll.messages == []


def test_truncated_pcap_refused(tmp_path: Path) -> None:
    good = tmp_path / "in.pcap"
    _capture(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-3])  # the last record (a 16-byte frame) lost 3 bytes, as when tcpdump is killed
    _refused(tmp_path, cut, f"truncated: packet 27 at byte {len(data) - 32} claims 16 bytes, 13 remain")
    cut.write_bytes(data[:-20])
    _refused(tmp_path, cut, "truncated: packet 27 at byte")


def test_truncated_pcapng_refused(tmp_path: Path) -> None:
    from scapy.utils import PcapNgWriter  # noqa: PLC0415 - only this test writes pcapng with scapy

    path = tmp_path / "in.pcapng"
    with PcapNgWriter(str(path)) as w:
        for i in range(3):
            pkt = Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / (b"x" * 10)
            pkt.time = T0 + i
            w.write(pkt)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    _refused(tmp_path, path, "truncated: block at byte")


def test_unknown_link_type_refused(tmp_path: Path) -> None:
    path = tmp_path / "usb.pcap"
    wrpcap(str(path), [Ether() / IP() / UDP()], linktype=220)
    _refused(tmp_path, path, "USB_LINUX_MMAPPED (220) is not supported; replay reads EN10MB, IPV4, IPV6, "
                             "LINUX_SLL, LINUX_SLL2, LOOP, NULL, RAW")


def test_not_a_capture_and_empty_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    path.write_bytes(b"GET / HTTP/1.1\r\n")
    _refused(tmp_path, path, "not a pcap/pcapng capture (starts with 474554202f204854)")
    path.write_bytes(b"")
    _refused(tmp_path, path, "empty file, not a pcap/pcapng capture")
    path.write_bytes(bytes.fromhex("d4c3b2a1") + b"\x02\x00")
    _refused(tmp_path, path, "truncated pcap file header (6 of 24 bytes)")


def test_extreme_capture_times_replay_cleanly(tmp_path: Path) -> None:
    """A capture from 1970 (text2pcap's, tools' defaults) and one at the end of pcap's 32-bit seconds: no
    encode error, times exact (the v9 boot never lies before 1970)."""
    for t, ms in ((0.0005, 0), (4294967295.25, 4294967295250)):
        pkt = Ether() / IP(src="10.9.0.1", dst="10.9.0.2") / UDP(sport=7, dport=8) / b"z"
        pkt.time = t
        wrpcap(str(tmp_path / "t.pcap"), [pkt])
        for protocol in ("ipfix", "netflow9"):
            coll = UdpCollector()
            try:
                cfg = write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": coll.port,
                                                          "protocol": protocol}])
                res = subprocess.run([*IPFIXER, "replay", str(tmp_path / "t.pcap"), "--config", str(cfg), "-q"],
                                     capture_output=True, text=True, timeout=60, env=cli_env())
                coll.receive(5, until_idle=1.0)
            finally:
                coll.close()
            assert res.returncode == 0 and res.stderr == "", res.stderr
            (rec,) = coll.flow_records()
            if protocol == "ipfix":
                assert rec["flowStartMilliseconds"] == rec["flowEndMilliseconds"] == ms
            else:
                assert rec["packetDeltaCount"] == 1
