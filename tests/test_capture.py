"""The capture reader on hostile bytes (only CaptureError, never another exception, never more packets
than the file holds) and on pcapng timestamp options tshark agrees with (if_tsresol 2^-n, if_tsoffset)."""

from __future__ import annotations

import struct
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter, wrpcap

from ipfixer.errors import CaptureError
from ipfixer.sources.capture import CaptureFile
from ipfixer.sources.packets import parse_link


def _block(kind: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("<II", kind, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def _pcapng(tsresol: int, tsoffset: int, stamps: list[int], frame: bytes) -> bytes:
    """SHB, one Ethernet IDB with if_tsresol and if_tsoffset, one EPB per stamp (raw timestamp units)."""
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    opts = struct.pack("<HHB3x", 9, 1, tsresol) + struct.pack("<HHq", 14, 8, tsoffset) + b"\x00" * 4
    idb = _block(1, struct.pack("<HHI", 1, 0, 65535) + opts)
    epbs = b"".join(_block(6, struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(frame), len(frame)) + frame)
                    for ts in stamps)
    return shb + idb + epbs


FRAME = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / (b"x" * 10))


@pytest.mark.parametrize("tsresol,units_per_s", [(0x83, 8), (0x94, 2**20), (3, 1000), (9, 10**9), (6, 10**6)])
def test_pcapng_timestamp_options_agree_with_tshark(tmp_path: Path, tsresol: int, units_per_s: int) -> None:
    stamps = [1_700_000_000 * units_per_s + k * (units_per_s // 8 + 1) for k in range(5)]
    path = tmp_path / "t.pcapng"
    path.write_bytes(_pcapng(tsresol, 3600, stamps, FRAME))
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.time_epoch"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    with CaptureFile(path) as cap:
        mine = [p.ts_ns for p in cap]
    assert mine == [ts * 10**9 // units_per_s + 3600 * 10**9 for ts in stamps]
    assert [int(Decimal(t) * 1000 // 1) for t in out] == [ns // 10**6 for ns in mine]  # tshark prints to ns


def _valid_files(tmp_path: Path) -> list[bytes]:
    pkts = []
    for i in range(4):
        p = Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2 + i) / (b"x" * (5 * i))
        p.time = 1_700_000_000 + i / 7
        pkts.append(p)
    wrpcap(str(tmp_path / "a.pcap"), pkts)
    wrpcap(str(tmp_path / "n.pcap"), pkts, nano=True)
    with PcapNgWriter(str(tmp_path / "a.pcapng")) as w:
        for p in pkts:
            w.write(p)
    return [(tmp_path / n).read_bytes() for n in ("a.pcap", "n.pcap", "a.pcapng")] + [
        _pcapng(0x83, -5, [1, 2, 3], FRAME)]


@st.composite
def mutated(draw: st.DrawFn, files: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(files)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "word"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif len(data) >= at + 4:
            data[at:at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 3, 0xFFFFFFFF, 0x7FFFFFFF, 276, 147])))
    return bytes(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return _valid_files(tmp_path_factory.mktemp("cap"))


def test_fuzz_capture_reader(files: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.cap"

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutated(files))
    def run(data: bytes) -> None:
        path.write_bytes(data)
        try:
            cap = CaptureFile(path)
        except CaptureError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
            return
        with cap:
            got = list(cap)
        assert len(got) == len(cap) and len(got) <= len(data) // 16
        for pkt in got:
            assert len(pkt.data) <= len(data)
            parse_link(pkt.linktype, pkt.data)  # None or a frame, never an exception

    run()


def _tshark_frames(path: Path) -> list[tuple[int, int]]:
    """(ms, captured length) per frame, as tshark reads them."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-E", "separator=,", "-e", "frame.time_epoch",
                          "-e", "frame.cap_len"], capture_output=True, text=True, timeout=60, check=True).stdout
    return [(int(Decimal(t) * 1000 // 1), int(n)) for t, n in (line.split(",") for line in out.split())]


def test_big_endian_and_multi_section_files_agree_with_tshark(tmp_path: Path) -> None:
    pkts = []
    for i in range(3):
        p = Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / (b"x" * (7 * i))
        p.time = Decimal(1_700_000_000) + Decimal(i) / 3  # type: ignore[assignment]  # scapy takes a Decimal
        pkts.append(p)
    files: dict[str, Path] = {}
    for name, kw in (("be.pcap", {"endianness": ">"}), ("be_ns.pcap", {"endianness": ">", "nano": True})):
        wrpcap(str(tmp_path / name), pkts, **kw)
        files[name] = tmp_path / name
    with PcapNgWriter(str(tmp_path / "one.pcapng")) as w:
        for p in pkts:
            w.write(p)
    one = (tmp_path / "one.pcapng").read_bytes()
    (tmp_path / "two.pcapng").write_bytes(one + _pcapng(0x83, 0, [8 * 1_700_000_100, 8 * 1_700_000_101], FRAME))
    files["two.pcapng"] = tmp_path / "two.pcapng"  # two sections: the second's interface has 1/8 s units
    assert (tmp_path / "be.pcap").read_bytes()[:4] == bytes.fromhex("a1b2c3d4")
    for name, path in files.items():
        with CaptureFile(path) as cap:
            mine = [(p.ts_ns // 10**6, len(p.data)) for p in cap]
        assert mine == _tshark_frames(path), name
    assert len(mine) == 5
