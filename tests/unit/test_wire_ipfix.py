"""IPFIX encoder (RFC 7011): values, variable length, sets, messages, errors."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, strategies as st

from ipfixer.errors import EncodeError
from ipfixer.infomodel import VARLEN, InfoModel
from ipfixer.templates import Template, TemplateField, load_templates
from ipfixer.wire import ipfix
from ipfixer.wire.decode import Decoder
from ipfixer.wire.values import decode_value, encode_value

IM = InfoModel.load_default()
TS = load_templates()


def tmpl(tid: int, *fields: tuple[str, int], scope: int = 0) -> Template:
    return Template(tid, f"t{tid}", tuple(TemplateField(IM.by_name(n), ln) for n, ln in fields), scope)


@pytest.mark.parametrize(
    ("dtype", "length", "value", "raw"),
    [("unsigned64", 3, 0x010203, "010203"), ("unsigned32", 4, 1, "00000001"),
     ("signed16", 2, -2, "fffe"), ("signed64", 3, -1, "ffffff"),
     ("boolean", 1, True, "01"), ("boolean", 1, False, "02"),
     ("ipv4Address", 4, "192.0.2.1", "c0000201"), ("ipv4Address", 4, 0xC0000201, "c0000201"),
     ("ipv4Address", 4, bytes.fromhex("00000000000000000000ffffc0000201"), "c0000201"),
     ("ipv4Address", 4, ipaddress.IPv4Address("192.0.2.1"), "c0000201"),
     ("ipv6Address", 16, "2001:db8::1", "20010db8000000000000000000000001"),
     ("macAddress", 6, "aa:bb:cc:dd:ee:ff", "aabbccddeeff"),
     ("float64", 4, 1.5, "3fc00000"), ("float64", 8, 1.5, "3ff8000000000000"),
     ("dateTimeSeconds", 4, 1700000000, "6553f100"),
     ("dateTimeMilliseconds", 8, 1, "0000000000000001"),
     ("dateTimeNanoseconds", 8, 500_000_000, "83aa7e8080000000"),  # RFC 7011 6.1.10: NTP era 0
     ("string", VARLEN, "abc", "03616263"), ("octetArray", VARLEN, b"", "00"),
     ("string", 4, "ab", "61620000")],
)  # fmt: skip
def test_values(dtype: str, length: int, value: object, raw: str) -> None:
    assert encode_value(dtype, length, value).hex() == raw


def test_varlen_long_form() -> None:
    """RFC 7011 7: 255 then a 2-byte length for values of 255 bytes and more."""
    assert encode_value("octetArray", VARLEN, b"x" * 254)[:1] == b"\xfe"
    assert encode_value("octetArray", VARLEN, b"x" * 255)[:3] == b"\xff\x00\xff"
    assert encode_value("string", VARLEN, "y" * 300)[:3] == b"\xff\x01\x2c"
    with pytest.raises(EncodeError):
        encode_value("octetArray", VARLEN, b"x" * 65536)


@pytest.mark.parametrize(
    ("dtype", "length", "value"),
    [("unsigned8", 1, 256), ("unsigned64", 4, 2**32), ("unsigned16", 2, -1), ("signed8", 1, 128),
     ("ipv4Address", 4, "2001:db8::1"), ("ipv4Address", 4, "nonsense"), ("macAddress", 6, "aa:bb"),
     ("string", 2, "abc"), ("unsigned32", 4, "12"), ("boolean", 1, 1), ("float32", 4, 1e300)],
)  # fmt: skip
def test_value_does_not_fit(dtype: str, length: int, value: object) -> None:
    with pytest.raises(EncodeError):
        encode_value(dtype, length, value)


def test_error_names_template_and_field() -> None:
    with pytest.raises(EncodeError, match="template 256 field protocolIdentifier: 300 does not fit"):
        ipfix.encode_data_records(TS["ipv4_flow"], [{"protocolIdentifier": 300}])


def test_missing_values_are_zero() -> None:
    t = tmpl(300, ("vlanId", 2), ("interfaceName", VARLEN))
    assert ipfix.encode_data_records(t, [{}]) == b"\x00\x00\x00"
    assert ipfix.encode_data_records(t, [{"vlanId": 5, "interfaceName": "eth0"}]) == b"\x00\x05\x04eth0"


def test_data_set_padding_and_ids() -> None:
    s = ipfix.encode_data_set(300, b"\x01\x02\x03")
    assert s == bytes.fromhex("012c0008010203") + b"\x00"  # RFC 7011 3.3.1: zero padding, length includes it
    assert ipfix.encode_data_set(300, b"\x01", pad_to=1) == bytes.fromhex("012c000501")
    with pytest.raises(EncodeError):
        ipfix.encode_data_set(3, b"")


def test_template_set_lengths_and_kinds() -> None:
    all_t = [TS["ipv4_flow"], TS["ipv6_nat_flow"]]
    assert len(ipfix.encode_template_set(all_t)) == ipfix.template_set_length(all_t)
    opts = [TS["options_exporter_stats"], TS["options_sampling"]]
    assert len(ipfix.encode_options_template_set(opts)) == ipfix.template_set_length(opts)
    with pytest.raises(EncodeError):
        ipfix.encode_template_set(opts)
    with pytest.raises(EncodeError):
        ipfix.encode_options_template_set(all_t)


def test_message_limits() -> None:
    m = ipfix.encode_message(1, 2**32 + 5, 7, [])
    assert m == bytes.fromhex("000a0010000000010000000500000007")
    with pytest.raises(EncodeError):
        ipfix.encode_message(0, 0, 0, [b"\x00" * 65520])
    assert ipfix.MESSAGE_HEADER_LEN == 16 and ipfix.SET_HEADER_LEN == 4 and ipfix.VERSION == 10


def test_construct_parses_what_it_builds() -> None:
    t = TS["ipv4_nat_flow"]
    rec = {"sourceIPv4Address": "10.1.2.3", "ctMark": 7, "sourceMacAddress": "02:00:00:00:00:01"}
    parsed = ipfix.data_record_struct(t).parse(ipfix.encode_data_records(t, [rec]))
    assert str(parsed.sourceIPv4Address) == "10.1.2.3" and parsed.ctMark == 7
    assert parsed.sourceMacAddress == "02:00:00:00:00:01"


IPV4 = st.ip_addresses(v=4)
IPV6 = st.ip_addresses(v=6)
MACS = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=300)


@given(
    src=IPV6, dst=IPV6, sport=st.integers(0, 65535), octets=st.integers(0, 2**64 - 1),
    ms=st.integers(0, 2**63), mac=MACS, name=TEXT, raw=st.binary(max_size=400),
    ns=st.integers(0, (2**32 - 2_208_988_801) * 10**9), small=st.integers(0, 2**24 - 1), flag=st.booleans(),
)  # fmt: skip
def test_round_trip(src, dst, sport, octets, ms, mac, name, raw, ns, small, flag) -> None:  # type: ignore[no-untyped-def]
    t = tmpl(300, ("sourceIPv6Address", 16), ("destinationIPv6Address", 16), ("sourceTransportPort", 2),
             ("octetDeltaCount", 8), ("flowStartMilliseconds", 8), ("sourceMacAddress", 6),
             ("interfaceName", VARLEN), ("paddingOctets", VARLEN), ("flowStartNanoseconds", 8),
             ("packetDeltaCount", 3), ("dataRecordsReliability", 1))  # fmt: skip
    rec = {"sourceIPv6Address": src, "destinationIPv6Address": str(dst), "sourceTransportPort": sport,
           "octetDeltaCount": octets, "flowStartMilliseconds": ms, "sourceMacAddress": mac,
           "interfaceName": name, "paddingOctets": raw, "flowStartNanoseconds": ns, "packetDeltaCount": small,
           "dataRecordsReliability": flag}  # fmt: skip
    records = ipfix.encode_data_records(t, [rec, rec])
    msg = ipfix.encode_message(1, 0, 9, [ipfix.encode_template_set([t]), ipfix.encode_data_set(300, records)])
    out = Decoder().feed(msg)
    assert len(out.records) == 2
    got = out.records[1].fields
    assert got["sourceIPv6Address"] == src and got["destinationIPv6Address"] == dst
    assert (got["octetDeltaCount"], got["flowStartMilliseconds"], got["packetDeltaCount"]) == (
        octets,
        ms,
        small,
    )
    assert (got["sourceMacAddress"], got["interfaceName"], got["paddingOctets"]) == (mac, name, raw)
    assert got["flowStartNanoseconds"] == ns and got["dataRecordsReliability"] is flag


@given(st.integers(0, 2**64 - 1), st.sampled_from(["unsigned64", "signed64", "float64"]))
def test_decode_value_is_total(v: int, dtype: str) -> None:
    """Any length decodes to the value RFC 7011 6.2 gives it (integers at any reduced size, float64 in 4
    or 8 bytes) and any other length gives the bytes back as they came: never an exception."""
    raw = v.to_bytes(8, "big")
    for n in range(9):
        got = decode_value(dtype, raw[:n])
        if dtype == "float64":
            if n in (4, 8):
                want = struct.unpack(">f" if n == 4 else ">d", raw[:n])[0]
                assert isinstance(got, float) and (got == want or (got != got and want != want))
            else:
                assert got == raw[:n]
        elif n == 0:
            assert got == b""
        else:
            assert got == int.from_bytes(raw[:n], "big", signed=dtype == "signed64")


def test_options_template_sets_hold_one_record_each() -> None:
    """pmacct 1.7.7 reads only the first record of a set with several: one Options Template Set each."""
    opts = [TS["options_exporter_stats"], TS["options_sampling"], TS["options_interfaces"]]
    sets = ipfix.encode_options_template_sets(opts)
    assert sets == [ipfix.encode_options_template_set([t]) for t in opts]
    for s, t in zip(sets, opts, strict=True):
        set_id, length, tid, count, scope = struct.unpack_from("!HHHHH", s)
        assert (set_id, length, tid, count, scope) == (3, len(s), t.template_id, len(t.fields), t.scope_count)
        assert len(s) == 4 + 6 + 4 * len(t.fields)  # exactly one record, no padding
