"""BatchEncoder: byte-identical to the construct path (hypothesis property), and its limits."""

from __future__ import annotations

import ipaddress
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ipfixer.errors import EncodeError
from ipfixer.infomodel import VARLEN, InfoModel
from ipfixer.templates import Template, TemplateField, check_length, load_templates
from ipfixer.wire import ipfix
from ipfixer.wire.fastpath import BatchEncoder

IM = InfoModel.load_default()
TS = load_templates()
BYTES_LEN = {"ipv4Address": 4, "ipv6Address": 16, "macAddress": 6}
NTP_MAX = {
    "dateTimeMicroseconds": (2**32 - 2_208_988_801) * 10**6,
    "dateTimeNanoseconds": (2**32 - 2_208_988_801) * 10**9,
}

# Elements covering every fixed-length type the fast path supports.
CANDIDATES = [
    "sourceIPv4Address", "sourceIPv6Address", "sourceMacAddress", "octetDeltaCount", "packetDeltaCount",
    "sourceTransportPort", "protocolIdentifier", "ingressInterface", "flowStartMilliseconds", "flowStartSeconds",
    "flowStartMicroseconds", "flowStartNanoseconds", "samplingProbability", "dataRecordsReliability",
    "mplsTopLabelTTL", "ctState", "ctMark", "ctZone", "cgroupId", "interfaceName",
]  # fmt: skip


@st.composite
def templates(draw: st.DrawFn) -> Template:
    names = draw(st.lists(st.sampled_from(CANDIDATES), min_size=1, max_size=12, unique=True))
    fields = []
    for n in names:
        e = IM.by_name(n)
        d = e.default_length
        if d == VARLEN:
            length = draw(st.integers(1, 24))  # fixed-length string
        elif e.data_type.startswith(("unsigned", "signed")):
            length = draw(st.integers(1, d))  # RFC 7011 6.2 reduced size, incl. 3, 5, 6, 7
        elif e.data_type == "float64":
            length = draw(st.sampled_from([4, 8]))
        else:
            length = d
        assert check_length(e, length) is None
        fields.append(TemplateField(e, length))
    return Template(300, "p", tuple(fields))


def value_strategy(f: TemplateField) -> st.SearchStrategy[Any]:
    t, n = f.element.data_type, f.length
    if t.startswith("unsigned") or t in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return st.integers(0, 2 ** (8 * n) - 1)
    if t.startswith("signed"):
        return st.integers(-(2 ** (8 * n - 1)), 2 ** (8 * n - 1) - 1)
    if t in NTP_MAX:
        return st.integers(0, NTP_MAX[t])
    if t == "float64":
        return st.floats(width=32 if n == 4 else 64, allow_nan=False)
    if t == "boolean":
        return st.booleans()
    return st.binary(min_size=BYTES_LEN.get(t, n), max_size=BYTES_LEN.get(t, n))


@st.composite
def batches(draw: st.DrawFn) -> tuple[Template, list[dict[str, Any]]]:
    t = draw(templates())
    n = draw(st.integers(0, 8))
    rows = [{f.name: draw(value_strategy(f)) for f in t.fields if draw(st.integers(0, 9))} for _ in range(n)]
    return t, rows


def to_columns(t: Template, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for f in t.fields:
        if all(f.name not in r for r in rows) and rows:
            continue  # a missing column
        vals: list[Any] = [r.get(f.name) for r in rows]
        dt = f.element.data_type
        if dt in BYTES_LEN or dt in ("string", "octetArray"):
            k = BYTES_LEN.get(dt, f.length)
            cols[f.name] = np.array([list(v) for v in vals], dtype=np.uint8).reshape(len(rows), k)
        elif dt == "float64":
            cols[f.name] = np.array(vals, dtype=np.float64)
        elif dt == "boolean":
            cols[f.name] = np.array(vals)
        elif dt.startswith("signed"):
            cols[f.name] = np.array(vals, dtype=np.int64)
        else:
            cols[f.name] = np.array(vals, dtype=np.uint64)
    return cols


@settings(max_examples=300, deadline=None)
@given(batches())
def test_byte_identical_to_construct(batch: tuple[Template, list[dict[str, Any]]]) -> None:
    t, rows = batch
    # where a column exists, a row without the value holds the column's zero (not "absent")
    for f in t.fields:
        if any(f.name in r for r in rows):
            dt = f.element.data_type
            zero: Any = False if dt == "boolean" else 0.0 if dt == "float64" else 0
            if dt in BYTES_LEN or dt in ("string", "octetArray"):
                zero = bytes(BYTES_LEN.get(dt, f.length))
            for r in rows:
                r.setdefault(f.name, zero)
    enc = BatchEncoder(t)
    assert enc.encode(to_columns(t, rows), len(rows)) == ipfix.encode_data_records(t, rows)


def test_default_templates_and_flow_dtype_addresses() -> None:
    t = TS["ipv4_nat_flow"]
    enc = BatchEncoder(t)
    assert enc.record_length == t.record_length
    mapped = np.zeros((2, 16), np.uint8)
    mapped[:, 10:12] = 0xFF
    mapped[:, 12:] = [10, 0, 0, 1]
    cols: dict[str, np.ndarray] = {"sourceIPv4Address": mapped, "ctState": np.array([0x22, 0x01], np.uint8),
            "destinationIPv4Address": np.array([0xC0000201, 1], np.uint32)}  # fmt: skip
    rec = {
        "sourceIPv4Address": ipaddress.IPv4Address("10.0.0.1"),
        "ctState": 0x22,
        "destinationIPv4Address": "192.0.2.1",
    }
    assert enc.encode(cols, 2)[: t.record_length] == ipfix.encode_data_records(t, [rec])


def test_errors() -> None:
    with pytest.raises(EncodeError, match="variable length"):
        BatchEncoder(Template(300, "v", (TemplateField(IM.by_name("interfaceName"), VARLEN),)))
    t = Template(300, "r", (TemplateField(IM.by_name("octetDeltaCount"), 3),))
    enc = BatchEncoder(t)
    with pytest.raises(EncodeError, match="does not fit in 3"):
        enc.encode({"octetDeltaCount": np.array([2**24], np.uint64)}, 1)
    with pytest.raises(EncodeError, match="shape"):
        enc.encode({"octetDeltaCount": np.array([1, 2], np.uint64)}, 1)
    with pytest.raises(EncodeError, match="negative"):
        enc.encode({"octetDeltaCount": np.array([-1], np.int64)}, 1)


@given(st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_header_packers_match_construct(length: int, t: int, seq: int, dom: int) -> None:
    """The struct packers the hot path uses give construct's bytes for every header they replace."""
    from ipfixer.wire import ipfix, netflow9
    from ipfixer.wire.fastpath import header_packer

    assert header_packer(ipfix.MessageHeader).pack(10, length, t, seq, dom) == ipfix.MessageHeader.build(
        {"length": length, "export_time": t, "sequence_number": seq, "observation_domain_id": dom})
    assert header_packer(ipfix.SetHeader).pack(length, length) == ipfix.SetHeader.build(
        {"set_id": length, "length": length})
    assert header_packer(netflow9.PacketHeader).pack(9, length, t, seq, dom, t) == netflow9.PacketHeader.build(
        {"count": length, "sys_uptime": t, "unix_secs": seq, "sequence_number": dom, "source_id": t})
    assert header_packer(netflow9.FlowSetHeader).pack(length, 4) == netflow9.FlowSetHeader.build(
        {"flowset_id": length, "length": 4})


def test_errors_carry_template_field_and_value() -> None:
    """Both encoders raise FieldValueError with the context as fields, formatted in one place."""
    from ipfixer.errors import FieldValueError

    enc = BatchEncoder(Template(300, "r", (TemplateField(IM.by_name("octetDeltaCount"), 3),)))
    with pytest.raises(FieldValueError) as batch:
        enc.encode({"octetDeltaCount": np.array([5, 2**24], np.uint64)}, 2)
    e = batch.value
    assert (e.template_id, e.field, e.value, e.reason) == (300, "octetDeltaCount", 2**24, "value does not fit in 3 byte(s)")
    assert str(e) == "template 300 field octetDeltaCount: value does not fit in 3 byte(s)"
    with pytest.raises(FieldValueError) as scalar:
        ipfix.encode_data_records(TS["ipv4_flow"], [{"protocolIdentifier": 300}])
    assert scalar.value.value == 300 and str(scalar.value).startswith("template 256 field protocolIdentifier: 300")
    from ipfixer.wire.values import encode_value

    with pytest.raises(FieldValueError) as keyed:
        encode_value("ipv4Address", 4, "nonsense", template_id=7, field="x")
    assert (keyed.value.template_id, keyed.value.field, keyed.value.value) == (7, "x", "nonsense")


def test_unsigned256_scalar_only() -> None:
    """RFC 9740 unsigned256: 32 bytes big-endian, reduced sizes; numpy has no such integer, so no batch layout."""
    from ipfixer.wire.values import decode_value, encode_value

    e = IM.by_name("tcpOptionsFull")
    assert encode_value(e.data_type, 32, 2**255 + 1) == b"\x80" + bytes(30) + b"\x01"
    assert decode_value(e.data_type, b"\x80" + bytes(30) + b"\x01") == 2**255 + 1
    assert encode_value(e.data_type, 3, 0x10203) == b"\x01\x02\x03"
    with pytest.raises(EncodeError, match="does not fit in 32"):
        encode_value(e.data_type, 32, 2**256)
    with pytest.raises(EncodeError, match="unsigned256 has no batch layout"):
        BatchEncoder(Template(300, "u", (TemplateField(e, 32),)))


@pytest.mark.parametrize("name", ["basicList", "subTemplateList", "subTemplateMultiList"])
def test_lists_are_decoded_raw_and_not_encoded(name: str) -> None:
    from ipfixer.infomodel import DataType
    from ipfixer.wire.values import decode_value, encode_value

    with pytest.raises(EncodeError, match=f"data type {name} cannot be encoded"):
        encode_value(DataType(name), VARLEN, b"\x01")
    assert decode_value(name, b"\x01\x02") == b"\x01\x02"
