"""The userspace packet parser (its names live in ipfixer/model.py) and the kernel's bpf/flow_parse.h use
one set of protocol and IPv6 Next Header names with the same values (IANA numbers, as the C library's IPPROTO_* says where it has
them), and the IPv6 walk skips each named extension header to reach the transport ports."""

from __future__ import annotations

import re
import socket
import struct

import pytest

from ipfixer import model
from ipfixer.sources import packets
from ipfixer.sources.kernel.program import BPF_DIR

C_NAMES = dict(re.findall(r"^#define ((?:PROTO|IPV6_NH)_\w+) (\d+)", (BPF_DIR / "flow_parse.h").read_text(), re.M))


def test_c_and_python_name_the_same_numbers() -> None:
    assert len(C_NAMES) == 11
    for name, value in C_NAMES.items():
        assert getattr(model, name) == int(value), name
        libc = "IPPROTO_" + name.split("_", 2 if name.startswith("IPV6") else 1)[-1]
        if hasattr(socket, libc):
            assert getattr(socket, libc) == int(value), (name, libc)


def ext(next_header: int) -> bytes:
    """An RFC 8200 4.1 extension header of 8 octets: next header, length 0 (one 8-octet unit), options."""
    return bytes([next_header, 0]) + b"\x00" * 6


@pytest.mark.parametrize("fragment_offset", [0, 1])
def test_ipv6_walk_skips_every_named_extension_header(fragment_offset: int) -> None:
    """hop-by-hop -> destination options -> routing -> AH (12 octets) -> fragment -> UDP: the ports are
    found on a first fragment, and a later fragment has none."""
    chain = (ext(packets.IPV6_NH_DSTOPTS) + ext(packets.IPV6_NH_ROUTING) + ext(packets.IPV6_NH_AH)
             + bytes([packets.IPV6_NH_FRAGMENT, 1]) + b"\x00" * 10  # AH: (1 + 2) * 4 octets (RFC 4302 2.2)
             + bytes([packets.PROTO_UDP, 0]) + struct.pack("!HI", fragment_offset << 3, 7)  # RFC 8200 4.5
             + struct.pack("!HHHH", 40000, 53, 8, 0))
    src, dst = b"\x20\x01" + b"\x00" * 13 + b"\x01", b"\x20\x01" + b"\x00" * 13 + b"\x02"
    packet = struct.pack("!IHBB16s16s", 6 << 28, len(chain), packets.IPV6_NH_HOPOPTS, 64, src, dst) + chain
    parsed = packets.parse_ip(packet)
    assert parsed is not None
    assert parsed.protocol == packets.PROTO_UDP
    assert (parsed.src_port, parsed.dst_port) == ((40000, 53) if fragment_offset == 0 else (0, 0))
