"""`ipfixer replay` of every capture format and link type the real tools write (issue 10.5, 13.5).

tcpdump captures the test's own UDP traffic in a namespace four ways (`-i any` = LINUX_SLL2, `-i any -y
LINUX_SLL`, Ethernet with microsecond and with nanosecond timestamps) and tshark two (pcapng, `-i any`
and the veth); editcap, tshark and mergecap turn
them into pcapng (if_tsresol 6 and 9), the longer-header pcap variants and a two-interface pcapng;
text2pcap writes the IP packets as RAW, IPV4, IPV6, NULL and LOOP. tshark reads each file back as the
oracle: per flow and direction (a cooked capture marks what the capturing host sent), packets, octets,
first and last time in ms. Each replay must give exactly that at a UDP
collector, and with NetFlow v9 at nfcapd the same dates (the first flow used to be 1970-01-01).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ipfixer.lab import Lab, unique_name
from tests.cli.helpers import IPFIXER, UdpCollector, cli_env, write_config
from tests.collectors import Nfcapd, free_udp_port

pytestmark = pytest.mark.root

Key = tuple[str, str, int, int, int, int]  # 5-tuple and flowDirection
UTC = {**os.environ, "TZ": "UTC"}


@dataclass
class Flow:
    packets: int
    octets: int
    first_ms: int
    last_ms: int


@dataclass
class Captures:
    files: dict[str, Path]
    sent: dict[tuple[str, str, int, int, int], tuple[int, int]]  # what the test sent: packets, IP octets


def _run(*cmd: str, timeout: float = 60) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=UTC, check=False)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return res.stdout


def tshark_flows(path: Path) -> dict[Key, Flow]:
    """The oracle: tshark's own reading of the file, grouped by 5-tuple."""
    out = _run("tshark", "-r", str(path), "-T", "fields", "-E", "separator=,", "-e", "frame.time_epoch",
               "-e", "ip.src", "-e", "ip.dst", "-e", "ipv6.src", "-e", "ipv6.dst", "-e", "udp.srcport",
               "-e", "udp.dstport", "-e", "ip.len", "-e", "ipv6.plen", "-e", "sll.pkttype")
    flows: dict[Key, Flow] = {}
    for line in out.splitlines():
        t, s4, d4, s6, d6, sp, dp, len4, plen6, pkttype = line.split(",")
        ms = int(Decimal(t) * 1000 // 1)
        key = (s4 or s6, d4 or d6, int(sp), int(dp), 17, int(pkttype == "4"))  # 4: sent by the capturing host
        octets = int(len4) if len4 else int(plen6) + 40
        f = flows.get(key)
        if f is None:
            flows[key] = Flow(1, octets, ms, ms)
        else:
            f.packets, f.octets = f.packets + 1, f.octets + octets
            f.first_ms, f.last_ms = min(f.first_ms, ms), max(f.last_ms, ms)
    return flows


def _text2pcap(src: Path, dst: Path, linktype: int, prefix: dict[int, str], versions: tuple[int, ...],
               fmt: str) -> None:
    """The IP packets of Ethernet capture `src` (hex from tshark), each prefixed per IP version, written by text2pcap."""
    rows = json.loads(_run("tshark", "-r", str(src), "-T", "json", "-x"))
    lines = []
    for row in rows:
        layers = row["_source"]["layers"]
        t = Decimal(layers["frame"]["frame.time_epoch"])
        version = 4 if "ip" in layers else 6
        if version not in versions:
            continue
        hexdata = prefix.get(version, "") + layers["frame_raw"][0][28:]  # without the 14-byte Ethernet header
        sec = int(t)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{int((t - sec) * 10**9):09d}Z"
        lines.append(f"{stamp} 000000 " + " ".join(hexdata[i:i + 2] for i in range(0, len(hexdata), 2)))
    text = dst.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n")
    _run("text2pcap", "-q", "-t", "ISO", "-l", str(linktype), "-F", fmt, str(text), str(dst))


@pytest.fixture(scope="module")
def captures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Captures]:
    d = tmp_path_factory.mktemp("captures")
    lab = Lab(ns_a=unique_name("h4A"), ns_b=unique_name("h4B"), veth_a=unique_name("h4a"), veth_b=unique_name("h4b"))
    ports = [free_udp_port() for _ in range(4)]
    count = 7 + 5 + 4 + 3
    dumps = {"sll2.pcap": ["-i", "any"], "sll.pcap": ["-i", "any", "-y", "LINUX_SLL"],
             "ether_us.pcap": ["-i", lab.veth_b], "ether_ns.pcap": ["-i", lab.veth_b, "--time-stamp-precision=nano"],
             "tshark_any.pcapng": ["-i", "any"], "tshark_veth.pcapng": ["-i", lab.veth_b]}
    procs: list[subprocess.Popen[bytes]] = []
    with lab:
        try:
            filt = "udp and (" + " or ".join(f"dst port {p}" for p in ports) + ")"
            for name, args in dumps.items():
                log = (d / name).with_suffix(".log")
                tool, ready = (["tshark", "-f", filt], b"Capturing on") if name.startswith("tshark") else (
                    ["tcpdump", "-n", "-U"], b"listening on")
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", lab.ns_b, *tool, "-c", str(count), *args, "-w", str(d / name),
                     *([] if name.startswith("tshark") else [filt])], stdout=subprocess.DEVNULL,
                    stderr=log.open("wb")))
                deadline = time.monotonic() + 30
                while ready not in log.read_bytes() and time.monotonic() < deadline:
                    assert procs[-1].poll() is None, log.read_text()
                    time.sleep(0.05)
                assert ready in log.read_bytes(), log.read_text()
            lab.send_udp(lab.ns_a, lab.v4_b, 40001, ports[0], [10] * 7)
            lab.send_udp(lab.ns_a, lab.v4_b, 40002, ports[1], [300] * 5)
            lab.send_udp(lab.ns_a, lab.v6_b, 40003, ports[2], [50] * 4)
            lab.send_udp(lab.ns_b, lab.v4_a, 40004, ports[3], [20] * 3)  # sent by the capturing namespace
            for proc in procs:
                assert proc.wait(20) == 0
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
    sent = {(lab.v4_a, lab.v4_b, 40001, ports[0], 17): (7, 7 * 38),
            (lab.v4_a, lab.v4_b, 40002, ports[1], 17): (5, 5 * 328),
            (lab.v6_a, lab.v6_b, 40003, ports[2], 17): (4, 4 * 98),
            (lab.v4_b, lab.v4_a, 40004, ports[3], 17): (3, 3 * 48)}
    files = {name: d / name for name in dumps}
    for name in ("ether_us", "ether_ns"):
        _run("editcap", "-F", "pcapng", str(d / f"{name}.pcap"), str(d / f"{name}.pcapng"))
        files[f"{name}.pcapng"] = d / f"{name}.pcapng"
    _run("tshark", "-r", str(d / "sll2.pcap"), "-F", "pcapng", "-w", str(d / "sll2_tshark.pcapng"))
    files["sll2_tshark.pcapng"] = d / "sll2_tshark.pcapng"
    for variant in ("nsecpcap", "modpcap", "nokiapcap", "rh6_1pcap", "suse6_3pcap"):
        _run("editcap", "-F", variant, str(d / "ether_us.pcap"), str(d / f"{variant}.pcap"))
        files[f"{variant}.pcap"] = d / f"{variant}.pcap"
    _run("mergecap", "-w", str(d / "merged.pcapng"), str(d / "sll2.pcap"), str(d / "ether_ns.pcap"))
    files["merged.pcapng"] = d / "merged.pcapng"
    ns = d / "ether_ns.pcap"
    for name, linktype, prefix, versions, fmt in (
        ("raw.pcapng", 101, {}, (4, 6), "pcapng"), ("raw.pcap", 101, {}, (4, 6), "pcap"),
        ("ipv4.pcapng", 228, {}, (4,), "pcapng"), ("ipv6.pcapng", 229, {}, (6,), "pcapng"),
        ("null_le.pcapng", 0, {4: "02000000", 6: "1e000000"}, (4, 6), "pcapng"),  # macOS-style, little-endian
        ("null_be.pcap", 0, {4: "00000002", 6: "00000018"}, (4, 6), "pcap"),  # a big-endian NetBSD writer
        ("loop.pcapng", 108, {4: "00000002", 6: "00000018"}, (4, 6), "pcapng"),
    ):
        _text2pcap(ns, d / name, linktype, prefix, versions, fmt)
        files[name] = d / name
    yield Captures(files, sent)


ALL = ["sll2.pcap", "sll.pcap", "tshark_any.pcapng", "tshark_veth.pcapng", "ether_us.pcap", "ether_ns.pcap", "ether_us.pcapng", "ether_ns.pcapng",
       "sll2_tshark.pcapng", "nsecpcap.pcap", "modpcap.pcap", "nokiapcap.pcap", "rh6_1pcap.pcap",
       "suse6_3pcap.pcap", "merged.pcapng", "raw.pcapng", "raw.pcap", "ipv4.pcapng", "ipv6.pcapng",
       "null_le.pcapng", "null_be.pcap", "loop.pcapng"]


def replay(path: Path, cfg: Path) -> dict[str, Any]:
    res = subprocess.run([*IPFIXER, "replay", str(path), "--config", str(cfg), "-q"], capture_output=True,
                         text=True, timeout=120, env=cli_env())
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr  # no warnings from scapy or anything else
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def test_tools_wrote_what_was_sent(captures: Captures) -> None:
    """The oracle itself: tshark reads every original capture as exactly the traffic sent."""
    for name in ("sll2.pcap", "sll.pcap", "ether_us.pcap", "ether_ns.pcap", "tshark_any.pcapng",
                 "tshark_veth.pcapng"):
        flows = tshark_flows(captures.files[name])
        assert {k[:5]: (f.packets, f.octets) for k, f in flows.items()} == captures.sent, name
        outgoing = {k[:5] for k in flows if k[5]}
        cooked = "sll" in name or "any" in name
        assert outgoing == ({k for k in captures.sent if k[2] == 40004} if cooked else set()), name
    head = captures.files["sll2.pcap"].read_bytes()[20:24]
    assert int.from_bytes(head, "little") == 276  # tcpdump -i any really wrote LINUX_SLL2
    assert captures.files["ether_ns.pcap"].read_bytes()[:4] == bytes.fromhex("4d3cb2a1")  # nanosecond magic


@pytest.mark.parametrize("name", ALL)
def test_replay_exact_counts_and_times(tmp_path: Path, captures: Captures, name: str) -> None:
    path = captures.files[name]
    expected = tshark_flows(path)
    assert expected, name
    coll = UdpCollector()
    try:
        cfg = write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": coll.port}])
        summary = replay(path, cfg)
        coll.receive(10, until_idle=1.0)
        records = coll.flow_records()
    finally:
        coll.close()
    assert summary["packets"] == sum(f.packets for f in expected.values()) and summary["malformed"] == 0
    assert by_flow(records) == expected, name


def by_flow(records: list[dict[str, Any]]) -> dict[Key, Flow]:
    """Records summed per 5-tuple and flowDirection, with the earliest start and the latest end."""
    out: dict[Key, Flow] = {}
    for r in records:
        key = (str(r.get("sourceIPv4Address", r.get("sourceIPv6Address"))),
               str(r.get("destinationIPv4Address", r.get("destinationIPv6Address"))), r["sourceTransportPort"],
               r["destinationTransportPort"], r["protocolIdentifier"], r["flowDirection"])
        f = out.setdefault(key, Flow(0, 0, r["flowStartMilliseconds"], r["flowEndMilliseconds"]))
        f.packets, f.octets = f.packets + r["packetDeltaCount"], f.octets + r["octetDeltaCount"]
        f.first_ms, f.last_ms = min(f.first_ms, r["flowStartMilliseconds"]), max(f.last_ms, r["flowEndMilliseconds"])
    return out


def test_same_packets_same_times_in_every_format(captures: Captures) -> None:
    """µs and ns captures of the same packets agree to the ms (ns read as µs was 636 s off)."""
    reference = tshark_flows(captures.files["ether_us.pcap"])
    for name in ("ether_ns.pcap", "sll2.pcap", "sll.pcap", "ether_ns.pcapng", "raw.pcapng", "loop.pcapng"):
        flows = tshark_flows(captures.files[name])
        assert {k[:5]: (f.first_ms, f.last_ms) for k, f in flows.items()} == {
            k[:5]: (f.first_ms, f.last_ms) for k, f in reference.items()}, name


def test_netflow9_replay_dates_at_nfcapd(tmp_path: Path, captures: Captures) -> None:
    """v9 times are ms since boot: the first flow of the capture is not 1970 at nfcapd (issue 13.5)."""
    path = captures.files["ether_ns.pcap"]
    expected = tshark_flows(path)
    port = free_udp_port()
    nf = Nfcapd(tmp_path / "nfcapd", port)
    try:
        cfg = write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": port, "protocol": "netflow9"}])
        replay(path, cfg)
        time.sleep(1.0)
    finally:
        flows = nf.stop()
    got: dict[Key, list[int]] = defaultdict(lambda: [0, 0, 2**63, 0])
    for f in flows:
        key = (f["src4_addr"] if "src4_addr" in f else f["src6_addr"],
               f["dst4_addr"] if "dst4_addr" in f else f["dst6_addr"], f["src_port"], f["dst_port"], f["proto"], 0)
        g = got[key]
        g[0], g[1] = g[0] + f["in_packets"], g[1] + f["in_bytes"]
        g[2], g[3] = min(g[2], f["first"]), max(g[3], f["last"])
    assert dict(got) == {k: [f.packets, f.octets, f.first_ms, f.last_ms] for k, f in expected.items()}
