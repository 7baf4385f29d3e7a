"""IPFIX files (RFC 5655): `ipfixer replay CAPTURE --output FILE.ipfix` and the rotating `file` collector,
read back by an independent decoder (tshark's IPFIX File reader) and by `ipfixer decode --file`, with
exact counts of the flows in a capture the test writes."""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from ipfixer.export.files import FileTransport, read_messages
from ipfixer.wire.decode import Decoder
from tests.cli.helpers import IPFIXER, cli_env

T0 = 1764580000.0


def write_capture(path: Path, n_udp_flows: int = 1) -> dict[tuple[str, int], tuple[int, int]]:
    """A pcap of known flows: (source address, source port) -> (packets, IP octets)."""
    pkts = []
    expected: dict[tuple[str, int], tuple[int, int]] = {}
    for f in range(n_udp_flows):
        src, sport = f"10.7.{f // 250}.{f % 250 + 1}", 5000 + f
        for i in range(3):
            p = Ether() / IP(src=src, dst="10.7.255.1") / UDP(sport=sport, dport=53) / (b"x" * 100)
            p.time = T0 + f * 0.001 + i * 0.1
            pkts.append(p)
        expected[(src, sport)] = (3, 3 * 128)
    for i in range(4):
        p = Ether() / IP(src="10.8.0.3", dst="10.8.0.4") / TCP(sport=6000, dport=80, flags="A") / (b"y" * 200)
        p.time = T0 + 1 + i * 0.1
        pkts.append(p)
    expected[("10.8.0.3", 6000)] = (4, 4 * 240)
    wrpcap(str(path), pkts)
    return expected


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IPFIXER, *args], capture_output=True, text=True, timeout=120, env=cli_env(), cwd=cwd)


def tshark_flows(path: Path) -> dict[tuple[str, int], tuple[int, int]]:
    """What tshark's own IPFIX File reader decodes from `path`, summed per (source, source port)."""
    res = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=;",
                          "-e", "cflow.srcaddr", "-e", "cflow.srcport", "-e", "cflow.packets", "-e", "cflow.octets"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for line in res.stdout.splitlines():
        cols = line.split("\t")
        if len(cols) < 4 or not cols[0]:
            continue  # a message with options records or templates only
        for src, sport, pkts, octets in zip(*(c.split(";") for c in cols[:4]), strict=True):
            out[(src, int(sport))][0] += int(pkts)
            out[(src, int(sport))][1] += int(octets)
    return {k: (v[0], v[1]) for k, v in out.items()}


def decoded_flows(path: Path) -> tuple[dict[tuple[str, int], tuple[int, int]], Decoder]:
    """The same through ipfixer's Decoder, with a fresh decoder for the file (it must stand alone)."""
    decoder = Decoder()
    out: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for _, message in read_messages(path):
        msg = decoder.feed(message, source=str(path))
        assert msg.missing_templates == []  # every data set's template came earlier in this same file
        for r in msg.records:
            if not r.is_options:
                key = (str(r.fields["sourceIPv4Address"]), int(r.fields["sourceTransportPort"]))
                out[key][0] += r.fields["packetDeltaCount"]
                out[key][1] += r.fields["octetDeltaCount"]
    return {k: (v[0], v[1]) for k, v in out.items()}, decoder


@pytest.mark.interop
def test_replay_output_is_an_ipfix_file_tshark_and_ipfixer_decode(tmp_path: Path) -> None:
    pcap = tmp_path / "in.pcap"
    expected = write_capture(pcap, n_udp_flows=2)
    out = tmp_path / "flows.ipfix"
    res = run("replay", "-q", str(pcap), "--output", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["flows"] == 3 and summary["collectors"][f"file:{out}"]["errors"] == 0
    assert stat_mode(out) == 0o640
    assert tshark_flows(out) == expected
    assert decoded_flows(out)[0] == expected
    dec = run("decode", "--file", str(out), "--json")
    assert dec.returncode == 0, dec.stderr
    rows = [json.loads(line) for line in dec.stdout.splitlines()]
    flows = [r for r in rows if "sourceTransportPort" in r.get("fields", r)]
    assert len(flows) == len(expected), dec.stdout[:2000]


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.interop
def test_rotating_file_collector_every_file_stands_alone(tmp_path: Path) -> None:
    pcap = tmp_path / "many.pcap"
    expected = write_capture(pcap, n_udp_flows=300)
    base = tmp_path / "out" / "flows.ipfix"
    base.parent.mkdir()
    cfg = tmp_path / "files.yaml"
    cfg.write_text(json.dumps({"collectors": [{"transport": "file", "path": str(base), "rotate_size": 4000}],
                               "metrics": {"listen": None}}))
    res = run("replay", "-q", str(pcap), "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    files = sorted(base.parent.glob("flows.*.ipfix"), key=lambda p: int(p.name.split(".")[-2]))
    assert len(files) >= 4, files  # ~300 records of ~75 bytes in files of ~4000 bytes
    total_tshark: dict[tuple[str, int], tuple[int, int]] = {}
    total_ours: dict[tuple[str, int], tuple[int, int]] = {}
    for f in files:
        assert f.stat().st_size < 4000 + 65507  # rotated after the Message that crossed the size
        theirs = tshark_flows(f)
        ours, _ = decoded_flows(f)  # a fresh decoder per file: templates are in each file
        assert ours == theirs
        assert not set(ours) & set(total_ours)  # each flow in exactly one file
        total_tshark.update(theirs)
        total_ours.update(ours)
    assert total_tshark == expected and total_ours == expected


def test_time_rotation_and_templates_again(tmp_path: Path) -> None:
    now = [T0]
    resets: list[float] = []
    t = FileTransport(tmp_path / "x.ipfix", rotate_interval_s=60, clock=lambda: now[0])
    t.on_rotate = lambda: resets.append(now[0])
    message = bytes.fromhex("000a0010") + bytes(12)  # a header-only IPFIX Message (RFC 7011 3.1)
    assert t.send(message) and len(t.files) == 1
    now[0] += 59
    assert t.send(message) and len(t.files) == 1
    now[0] += 1
    assert t.send(message) and len(t.files) == 2 and resets == [T0 + 60]  # rotated after that write
    t.close()
    assert [len(list(read_messages(f))) for f in t.files] == [3, 0]
    assert t.files[0].name == "x.20251201T090640Z.0.ipfix" and t.files[1].name == "x.20251201T090740Z.1.ipfix"
    assert not t.send(message) and t.last_error == "ECLOSED"


def test_refuses_a_symlink_at_the_path(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link.ipfix").symlink_to(victim)
    pcap = tmp_path / "in.pcap"
    write_capture(pcap)
    res = run("replay", "-q", str(pcap), "--output", str(tmp_path / "link.ipfix"))
    assert res.returncode == 1 and "cannot create" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert victim.read_text() == "keep"


@pytest.mark.parametrize(("collector", "message"), [
    ({"transport": "file"}, "path: required with transport: file"),
    ({"transport": "file", "path": "/tmp/x.ipfix", "address": "127.0.0.1"}, "a file collector has none"),
    ({"transport": "file", "path": "/tmp/x.ipfix", "protocol": "netflow9"}, "IPFIX files (RFC 5655) hold IPFIX only"),
    ({"port": 4739}, "address: required"),
    ({"address": "127.0.0.1", "rotate_size": 10}, "for transport: file only"),
])
def test_file_collector_config_errors(tmp_path: Path, collector: dict[str, Any], message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(json.dumps({"collectors": [collector]}))
    res = run("check", str(cfg))
    assert res.returncode == 2 and "collectors[0]" in res.stderr and message in res.stderr, res.stderr


def test_decode_file_reports_a_malformed_file(tmp_path: Path) -> None:
    good = tmp_path / "good.ipfix"
    pcap = tmp_path / "in.pcap"
    write_capture(pcap)
    assert run("replay", "-q", str(pcap), "--output", str(good)).returncode == 0
    data = good.read_bytes()
    cut = tmp_path / "cut.ipfix"
    cut.write_bytes(data[:-7])  # the last Message's length now runs past the end
    res = run("decode", "--file", str(cut))
    assert res.returncode == 1 and "does not fit the file" in res.stderr and "Traceback" not in res.stderr
    junk = tmp_path / "junk.ipfix"
    junk.write_bytes(b"\x00\x05" + bytes(30))
    res = run("decode", "--file", str(junk))
    assert res.returncode == 1 and "version 5, not an IPFIX Message" in res.stderr
