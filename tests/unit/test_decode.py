"""Decoder: state per exporter, unknown/enterprise elements, malformed input -> DecodeError only."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipfixer.errors import DecodeError
from ipfixer.infomodel import InfoModel
from ipfixer.templates import Template, TemplateField, load_templates
from ipfixer.wire import ipfix, netflow9
from ipfixer.wire.decode import Decoder

TS = load_templates()
V4 = TS["ipv4_nat_flow"]
REC = {
    "sourceIPv4Address": "10.0.0.1",
    "octetDeltaCount": 1234,
    "ctState": 0x22,
    "sourceMacAddress": "02:00:00:00:00:01",
}


def message(*sets: bytes, domain: int = 1) -> bytes:
    return ipfix.encode_message(100, 5, domain, list(sets))


TEMPLATES = ipfix.encode_template_set([V4])
DATA = ipfix.encode_data_set(260, ipfix.encode_data_records(V4, [REC, REC]))
GOOD = message(TEMPLATES, ipfix.encode_options_template_set([TS["options_sampling"]]), DATA,
               ipfix.encode_data_set(259, ipfix.encode_data_records(TS["options_sampling"], [{"samplingInterval": 10}])))  # fmt: skip


def test_templates_then_data() -> None:
    d = Decoder()
    msg = d.feed(GOOD)
    assert (msg.version, msg.export_time, msg.sequence, msg.domain_id, msg.sys_uptime) == (
        10,
        100,
        5,
        1,
        None,
    )
    assert [t.template_id for t in msg.templates] == [260, 259]
    assert msg.templates[0].fields == V4.fields  # same elements and lengths as sent
    r = msg.records[0]
    assert r.fields["ctState"] == 0x22 and r.fields["sourceMacAddress"] == "02:00:00:00:00:01"
    assert msg.records[2].is_options and msg.records[2].fields["samplingInterval"] == 10
    assert d.template(260, domain_id=1) is not None


def test_templates_are_per_source_and_domain() -> None:
    d = Decoder()
    d.feed(message(TEMPLATES), source="a")
    assert d.feed(message(DATA), source="a").records
    assert not d.feed(message(DATA), source="b").records
    assert not d.feed(message(DATA, domain=2), source="a").records
    assert d.stats["unknown_template_sets"] == 2


def test_unknown_enterprise_element_kept_raw() -> None:
    im = InfoModel([e for e in InfoModel.load_default() if e.pen == 0])  # a collector without ipfixer.csv
    msg = Decoder(im).feed(GOOD)
    r = msg.records[0]
    assert r.unknown[(57999, 1)] == b"\x22" and r.fields["pen57999_ie1"] == b"\x22"
    assert r.unknown[(57999, 4)] == bytes(8)


def test_withdrawal_ignored_gracefully() -> None:
    d = Decoder()
    d.feed(GOOD)
    withdraw = bytes.fromhex("0002000801040000")  # RFC 7011 8.1: template 260, field count 0
    msg = d.feed(message(withdraw))
    assert msg.withdrawn == [260] and d.stats["withdrawals"] == 1
    assert not d.feed(message(DATA)).records


VT = Template(
    400, "v", (TemplateField(InfoModel.load_default().by_name("interfaceName"), 65535), *V4.fields[:2])
)


def test_varlen_records() -> None:
    vt = VT
    recs = ipfix.encode_data_records(vt, [{"interfaceName": "x" * 300}, {"interfaceName": "eth0"}])
    msg = Decoder().feed(message(ipfix.encode_template_set([vt]), ipfix.encode_data_set(400, recs)))
    assert [r.fields["interfaceName"] for r in msg.records] == ["x" * 300, "eth0"]


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"", "too short"), (b"\x00\x05" + bytes(30), "unsupported version 5 at offset 0"),
     (GOOD[:10], "shorter than its 16-byte header"),
     (GOOD[:-1], "truncated"), (GOOD + b"\x00", "trailing bytes"),
     (_patch(GOOD, 2, ">H", 8), "length 8 at offset 2"),
     (_patch(GOOD, 18, ">H", 2), "set 2 at offset 16: length 2 < 4"),
     (_patch(GOOD, 18, ">H", 4000), "overruns the message"),
     (_patch(GOOD, 22, ">H", 500), "field specifier .* overflows the set"),
     (_patch(GOOD, 20, ">H", 7), "template id 7 < 256"),
     (_patch(GOOD, 26, ">H", 0), "length 0"),
     (message(bytes.fromhex("0003000a010300010002")), "scope field count 2 not in 1..1"),
     (message(bytes.fromhex("0003000c0103000100000000")), "scope field count 0"),
     (message(ipfix.encode_template_set([VT]), ipfix.encode_data_set(400, b"\x32" + b"x" * 10)), "overruns the set"),
     (message(ipfix.encode_template_set([VT]), ipfix.encode_data_set(400, b"\xff\x01" + b"x" * 10)),
      "length prefix truncated|overruns"),
     (b"\x00\x09" + bytes(10), "shorter than its 20-byte header"),
     (netflow9.encode_packet(0, 0, 0, 0, 1, [bytes.fromhex("000100100103000300040001000400010004")]),
      "multiples of 4")],
)  # fmt: skip
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        Decoder().feed(data)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    d = Decoder()
    for blob in (data, b"\x00\x0a" + data, b"\x00\x09" + data):
        try:
            d.feed(blob)
        except DecodeError:
            pass


V9 = netflow9.encode_packet(1, 2, 3, 4, 3, [
    netflow9.encode_template_flowset([TS["ipv6_flow"]]),
    netflow9.encode_options_template_flowset([TS["options_exporter_stats"]]),
    netflow9.encode_data_flowset(257, netflow9.encode_data_records(TS["ipv6_flow"], [{"vlanId": 3}])),
])  # fmt: skip


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([GOOD, V9]), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       st.integers(0, 400))  # fmt: skip
def test_fuzz_mutated_messages(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    b = bytearray(base)
    for pos, val in flips:
        b[pos % len(b)] = val
    d = Decoder()
    for blob in (bytes(b), bytes(b[: len(b) - cut % len(b)])):
        try:
            d.feed(blob)
        except DecodeError:
            pass
