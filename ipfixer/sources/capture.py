"""Reading capture files (pcap and pcapng) for `ipfixer replay`: every packet with its link type and a
nanosecond timestamp, or a CaptureError with a one-line reason before anything is exported.

Hand-written (struct over an mmap) rather than scapy's RawPcapReader, because replay must be exact and
bounded on hostile files: scapy reads nanosecond pcaps' fraction as microseconds, takes pcapng's link type
from the first interface only, allocates whatever caplen a record claims, and returns a truncated last
record silently. Here the whole file is validated first (record headers only, no packet copied): a
truncated or corrupt file, or a packet on an unsupported link type, is refused with where and why.

Formats: pcap (https://datatracker.ietf.org/doc/draft-ietf-opsawg-pcap/) in either byte order with
microsecond (0xa1b2c3d4) or nanosecond (0xa1b23c4d) timestamps, and the variants editcap writes with
longer record headers (modified/Kuznetzov 0xa1b2cd34, Nokia, Red Hat 6.1, SuSE 6.3); pcapng
(https://datatracker.ietf.org/doc/draft-ietf-opsawg-pcapng/) with several sections and interfaces,
if_tsresol (4.2, powers of 10 or 2) and if_tsoffset, Enhanced and obsolete Packet Blocks.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from ipfixer.errors import CaptureError
from ipfixer.sources.packets import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    LINKTYPE_RAW_OLD,
)

LINKTYPE_NAMES = {
    LINKTYPE_NULL: "NULL", LINKTYPE_ETHERNET: "EN10MB", LINKTYPE_RAW_OLD: "RAW", LINKTYPE_RAW: "RAW",
    LINKTYPE_LOOP: "LOOP", LINKTYPE_LINUX_SLL: "LINUX_SLL", LINKTYPE_IPV4: "IPV4", LINKTYPE_IPV6: "IPV6",
    LINKTYPE_LINUX_SLL2: "LINUX_SLL2",
}
SUPPORTED_LINKTYPES = frozenset(LINKTYPE_NAMES)
_OTHER_NAMES = {6: "IEEE802_5", 9: "PPP", 105: "IEEE802_11", 127: "IEEE802_11_RADIOTAP", 147: "USER0",
                220: "USB_LINUX_MMAPPED", 249: "NETLINK", 263: "NFLOG"}

_PCAP_MAGICS = {  # magic as read little-endian -> (byte order, ns timestamps, record header sizes to try)
    0xA1B2C3D4: ("<", False, (16, 24, 20)), 0xD4C3B2A1: (">", False, (16, 24, 20)),
    0xA1B23C4D: ("<", True, (16,)), 0x4D3CB2A1: (">", True, (16,)),
    0xA1B2CD34: ("<", False, (24, 28)), 0x34CDB2A1: (">", False, (24, 28)),
}
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BOM = 0x1A2B3C4D
_BLOCK_IDB, _BLOCK_OPB, _BLOCK_SPB, _BLOCK_EPB = 1, 2, 3, 6
_OPT_TSRESOL, _OPT_TSOFFSET = 9, 14
MAX_TS_NS = 2**63  # flow times are int64 ns downstream; a pcap's 32-bit seconds always fit


def linktype_name(linktype: int) -> str:
    """'LINUX_SLL2 (276)' for messages."""
    return f"{LINKTYPE_NAMES.get(linktype) or _OTHER_NAMES.get(linktype) or 'link type'} ({linktype})"


class CapturedPacket(NamedTuple):
    """One captured frame as stored: its link type, capture time and the bytes captured (a NamedTuple:
    built once per packet, and a frozen dataclass costs twice as much to build)."""

    linktype: int
    ts_ns: int
    data: bytes
    wire_len: int


@dataclass
class _Interface:
    linktype: int
    units_per_s: int = 1_000_000
    offset_s: int = 0


@dataclass
class _Layout:
    """What validation learnt: the format and, for pcap, the record header size that fits the file."""

    kind: str  # "pcap" or "pcapng"
    packets: int = 0
    linktypes: set[int] = field(default_factory=set)
    order: str = "<"
    nanos: bool = False
    record_header: int = 16
    linktype: int = LINKTYPE_ETHERNET
    fcs_bytes: int = 0


class CaptureFile:
    """A validated capture file: `len()` packets, iterated in file order; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                size = f.seek(0, 2)
                if size == 0:
                    raise CaptureError(str(path), "empty file, not a pcap/pcapng capture")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CaptureError(str(path), f"cannot read: {e.strerror or e}") from None
        self.size = size
        self.offset = 0  # of the next record while iterating, for a progress bar
        try:
            self.layout = self._validate()
        except BaseException:
            self._mm.close()
            raise

    def close(self) -> None:
        """Unmap the file."""
        self._mm.close()

    def __enter__(self) -> CaptureFile:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __len__(self) -> int:
        return self.layout.packets

    @property
    def format(self) -> str:
        """'pcap', 'pcap (ns)' or 'pcapng', for the summary."""
        lay = self.layout
        return "pcapng" if lay.kind == "pcapng" else ("pcap (ns)" if lay.nanos else "pcap")

    def _fail(self, reason: str) -> CaptureError:
        return CaptureError(str(self.path), reason)

    # ------------------------------------------------------------------------------------ validation

    def _validate(self) -> _Layout:
        if self.size < 4:
            raise self._fail(f"not a pcap/pcapng capture ({self.size} bytes)")
        magic = struct.unpack_from("<I", self._mm, 0)[0]
        if magic == _PCAPNG_SHB:
            return self._validate_pcapng()
        if magic in _PCAP_MAGICS:
            return self._validate_pcap(magic)
        head = self._mm[:8].hex()
        raise self._fail(f"not a pcap/pcapng capture (starts with {head})")

    def _validate_pcap(self, magic: int) -> _Layout:
        order, nanos, header_sizes = _PCAP_MAGICS[magic]
        if self.size < 24:
            raise self._fail(f"truncated pcap file header ({self.size} of 24 bytes)")
        _, major, minor, _, _, snaplen, network = struct.unpack_from(order + "IHHiIII", self._mm, 0)
        if major != 2:
            raise self._fail(f"pcap version {major}.{minor} is not supported (2.4 is)")
        linktype = network & 0xFFFF
        # pcap draft 4: bit 26 says the frames end with an FCS of (bits 28-31) 16-bit words
        fcs = ((network >> 28) & 0xF) * 2 if network & (1 << 26) else 0
        self._check_linktype(linktype)
        first_error: CaptureError | None = None
        for i, hdr in enumerate(header_sizes):
            try:
                count = self._scan_pcap(order, hdr, snaplen, strict=i > 0)
            except CaptureError as e:
                first_error = first_error or e
                continue
            return _Layout("pcap", count, {linktype}, order, nanos, hdr, linktype, fcs)
        assert first_error is not None
        raise first_error

    def _scan_pcap(self, order: str, hdr: int, snaplen: int, strict: bool) -> int:
        """Walk the record headers; a variant's longer header is accepted only if every record is sane."""
        mm, size, off, count = self._mm, self.size, 24, 0
        unpack = struct.Struct(order + "II").unpack_from
        while off < size:
            if off + hdr > size:
                raise self._fail(f"truncated: packet {count + 1} at byte {off} has a {size - off}-byte header "
                                 f"(needs {hdr})")
            caplen, wire = unpack(mm, off + 8)
            if strict and (caplen > wire or caplen > max(snaplen, 65535)):
                raise self._fail(f"packet {count + 1} at byte {off}: captured length {caplen} is impossible")
            if off + hdr + caplen > size:
                raise self._fail(f"truncated: packet {count + 1} at byte {off} claims {caplen} bytes, "
                                 f"{size - off - hdr} remain")
            off += hdr + caplen
            count += 1
        return count

    def _validate_pcapng(self) -> _Layout:
        layout = _Layout("pcapng")
        for block_type, order, body, end, interfaces in self._pcapng_blocks():
            if block_type in (_BLOCK_EPB, _BLOCK_OPB):
                fmt, min_len = (order + "IIIII", 20) if block_type == _BLOCK_EPB else (order + "HHIIII", 20)
                if end - body < min_len:
                    raise self._fail(f"packet block at byte {body - 8} is too short")
                fields = struct.unpack_from(fmt, self._mm, body)
                if_id, caplen = fields[0], fields[-2]
                if if_id >= len(interfaces):
                    raise self._fail(f"packet {layout.packets + 1} at byte {body - 8} names interface {if_id}, "
                                     f"the section has {len(interfaces)}")
                if body + min_len + caplen > end:
                    raise self._fail(f"packet {layout.packets + 1} at byte {body - 8}: captured length "
                                     f"{caplen} exceeds its block")
                iface = interfaces[if_id]
                high, low = fields[1:3] if block_type == _BLOCK_EPB else fields[2:4]
                if not 0 <= _ns(iface, high, low) < MAX_TS_NS:
                    raise self._fail(f"packet {layout.packets + 1} at byte {body - 8}: timestamp out of range "
                                     f"(before 1970 or after 2262)")
                linktype = iface.linktype
                self._check_linktype(linktype, f" (interface {if_id}, packet {layout.packets + 1})")
                layout.linktypes.add(linktype)
                layout.packets += 1
            elif block_type == _BLOCK_SPB:
                raise self._fail(f"simple packet block at byte {body - 8}: it carries no timestamp, "
                                 "so the flows' times cannot be replayed")
        return layout

    def _pcapng_blocks(self) -> Iterator[tuple[int, str, int, int, list[_Interface]]]:
        """(type, byte order, body offset, body end, the section's interfaces) of every block, checked."""
        mm, size, off = self._mm, self.size, 0
        order = "<"
        interfaces: list[_Interface] = []
        while off < size:
            if off + 12 > size:
                raise self._fail(f"truncated: block at byte {off} has {size - off} bytes (a block has >= 12)")
            block_type = struct.unpack_from("<I", mm, off)[0]
            if block_type == _PCAPNG_SHB:
                if off + 16 > size:
                    raise self._fail(f"truncated section header at byte {off}")
                bom = struct.unpack_from("<I", mm, off + 8)[0]
                if bom == _PCAPNG_BOM:
                    order = "<"
                elif bom == 0x4D3C2B1A:
                    order = ">"
                else:
                    raise self._fail(f"corrupt section header at byte {off} (byte-order magic {bom:#x})")
                interfaces = []
            else:
                block_type = struct.unpack_from(order + "I", mm, off)[0]
            length = struct.unpack_from(order + "I", mm, off + 4)[0]
            if length < 12 or length % 4:
                raise self._fail(f"corrupt block at byte {off} (length {length})")
            if off + length > size:
                raise self._fail(f"truncated: block at byte {off} claims {length} bytes, {size - off} remain")
            if struct.unpack_from(order + "I", mm, off + length - 4)[0] != length:
                raise self._fail(f"corrupt block at byte {off} (its two lengths differ)")
            body, end = off + 8, off + length - 4
            if block_type == _BLOCK_IDB:
                interfaces.append(self._interface(order, body, end))
            yield block_type, order, body, end, interfaces
            off += length

    def _interface(self, order: str, body: int, end: int) -> _Interface:
        if end - body < 8:
            raise self._fail(f"interface description block at byte {body - 8} is too short")
        iface = _Interface(struct.unpack_from(order + "H", self._mm, body)[0])
        opt = body + 8
        while opt + 4 <= end:
            code, length = struct.unpack_from(order + "HH", self._mm, opt)
            if code == 0:
                break
            value = opt + 4
            if value + length > end:
                raise self._fail(f"corrupt interface option at byte {opt}")
            if code == _OPT_TSRESOL and length >= 1:
                res = self._mm[value]
                exp = res & 0x7F
                if exp > (63 if res & 0x80 else 18):
                    raise self._fail(f"interface at byte {body - 8}: timestamp resolution {res:#x} is absurd")
                iface.units_per_s = 2**exp if res & 0x80 else 10**exp
            elif code == _OPT_TSOFFSET and length >= 8:
                iface.offset_s = struct.unpack_from(order + "q", self._mm, value)[0]
            opt = value + (length + 3) // 4 * 4
        return iface

    def _check_linktype(self, linktype: int, where: str = "") -> None:
        if linktype not in SUPPORTED_LINKTYPES:
            names = ", ".join(sorted({v for v in LINKTYPE_NAMES.values()}))
            raise self._fail(f"{linktype_name(linktype)} is not supported{where}; replay reads {names}")

    # ------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[CapturedPacket]:
        if self.layout.kind == "pcap":
            return self._iter_pcap()
        return self._iter_pcapng()

    def _iter_pcap(self) -> Iterator[CapturedPacket]:
        lay, mm = self.layout, self._mm
        unpack = struct.Struct(lay.order + "IIII").unpack_from
        scale = 1 if lay.nanos else 1000
        off = 24
        while off < self.size:
            sec, frac, caplen, wire = unpack(mm, off)
            start = off + lay.record_header
            off = start + caplen
            self.offset = off
            keep = caplen - lay.fcs_bytes if caplen == wire else caplen  # an FCS is there only if not cut
            yield CapturedPacket(lay.linktype, sec * 1_000_000_000 + frac * scale, mm[start:start + max(keep, 0)],
                                 wire - lay.fcs_bytes)

    def _iter_pcapng(self) -> Iterator[CapturedPacket]:
        mm = self._mm
        for block_type, order, body, end, interfaces in self._pcapng_blocks():
            self.offset = end + 4
            if block_type == _BLOCK_EPB:
                if_id, high, low, caplen, wire = struct.unpack_from(order + "IIIII", mm, body)
                data = body + 20
            elif block_type == _BLOCK_OPB:
                if_id, _, high, low, caplen, wire = struct.unpack_from(order + "HHIIII", mm, body)
                data = body + 20
            else:
                continue
            iface = interfaces[if_id]
            yield CapturedPacket(iface.linktype, _ns(iface, high, low), mm[data:data + caplen], wire)


def _ns(iface: _Interface, high: int, low: int) -> int:
    """pcapng timestamp (draft 4.6): units of if_tsresol since 1970 plus if_tsoffset seconds, in ns."""
    return ((high << 32) | low) * 1_000_000_000 // iface.units_per_s + iface.offset_s * 1_000_000_000
