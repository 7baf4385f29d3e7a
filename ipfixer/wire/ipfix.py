"""IPFIX Messages (RFC 7011), declared with construct.

The declarations below are the wire format; the encode_* functions are what the export session uses.
Data Records are built from a Template by deriving a construct Struct from its fields, so the
per-record path, the batch fast path (fastpath.py) and the decoder all follow the same Template.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from construct import (
    Adapter,
    Array,
    BitsInteger,
    BitStruct,
    Bytes,
    Const,
    Construct,
    Flag,
    GreedyBytes,
    If,
    Int16ub,
    Int32ub,
    Prefixed,
    Struct,
    stream_read,
    stream_write,
    this,
)

from ipfixer.errors import EncodeError
from ipfixer.infomodel import VARLEN
from ipfixer.templates import Template, TemplateField
from ipfixer.wire.fastpath import header_packer
from ipfixer.wire.values import decode_value, encode_value, varlen_prefix

VERSION = 10
MESSAGE_HEADER_LEN = 16
SET_HEADER_LEN = 4
TEMPLATE_SET_ID = 2  # RFC 7011 3.3.2
OPTIONS_TEMPLATE_SET_ID = 3
MIN_DATA_SET_ID = 256
MAX_MESSAGE_LEN = 65535  # the Length field is 16 bits (RFC 7011 3.1)

# RFC 7011 3.1: Message Header.  Export Time in seconds; Sequence Number counts Data Records.
MessageHeader = Struct(
    "version" / Const(VERSION, Int16ub),
    "length" / Int16ub,
    "export_time" / Int32ub,
    "sequence_number" / Int32ub,
    "observation_domain_id" / Int32ub,
)

# RFC 7011 3.3.2: Set Header; Length includes the header and padding.
SetHeader = Struct(
    "set_id" / Int16ub,
    "length" / Int16ub,
)

# The hot path packs these two headers with struct, derived from the declarations above (fastpath).
_MESSAGE_HEADER = header_packer(MessageHeader)
_SET_HEADER = header_packer(SetHeader)

# RFC 7011 3.2: Field Specifier; the enterprise bit adds a 4-byte Enterprise Number.
FieldSpecifier = Struct(
    "ie" / BitStruct("enterprise_bit" / Flag, "element_id" / BitsInteger(15)),
    "field_length" / Int16ub,
    "enterprise_number" / If(this.ie.enterprise_bit, Int32ub),
)

# RFC 7011 3.4.1: Template Record Header.
TemplateRecordHeader = Struct(
    "template_id" / Int16ub,
    "field_count" / Int16ub,
)

# RFC 7011 3.4.2.2: Options Template Record Header (Field Count includes the scope fields).
OptionsTemplateRecordHeader = Struct(
    "template_id" / Int16ub,
    "field_count" / Int16ub,
    "scope_field_count" / Int16ub,
)

TemplateRecord = Struct(
    "template_id" / Int16ub,
    "field_count" / Int16ub,
    "fields" / Array(this.field_count, FieldSpecifier),
)

OptionsTemplateRecord = Struct(
    "template_id" / Int16ub,
    "field_count" / Int16ub,
    "scope_field_count" / Int16ub,
    "fields" / Array(this.field_count, FieldSpecifier),
)


class VarLenLength(Construct):  # type: ignore[misc]
    """RFC 7011 7: length of a variable-length value, 1 byte (< 255) or 255 then 2 bytes."""

    def _parse(self, stream: Any, context: Any, path: str) -> int:
        first = stream_read(stream, 1, path)[0]
        if first < 255:
            return int(first)
        return int.from_bytes(stream_read(stream, 2, path), "big")

    def _build(self, obj: int, stream: Any, context: Any, path: str) -> int:
        stream_write(stream, varlen_prefix(obj), len(varlen_prefix(obj)), path)
        return obj


class FieldValue(Adapter):  # type: ignore[misc]
    """Python value <-> bytes of one Template field, by its element's abstract data type."""

    def __init__(self, field: TemplateField, template_id: int) -> None:
        self.varlen = field.is_varlen
        super().__init__(Prefixed(VarLenLength(), GreedyBytes) if self.varlen else Bytes(field.length))
        self.data_type = field.element.data_type
        self.length = field.length
        self.what = f"template {template_id} field {field.name}"

    def _encode(self, obj: Any, context: Any, path: str) -> bytes:
        raw = encode_value(self.data_type, self.length, obj, self.what)
        if self.varlen:  # the Prefixed subcon writes the length itself
            return raw[3:] if raw[0] == 255 else raw[1:]
        return raw

    def _decode(self, obj: bytes, context: Any, path: str) -> Any:
        return decode_value(self.data_type, obj)


@functools.lru_cache(maxsize=256)
def data_record_struct(template: Template) -> Struct:
    """The construct Struct of one Data Record of `template` (RFC 7011 3.4.3)."""
    return Struct(*(f.name / FieldValue(f, template.template_id) for f in template.fields))


def field_specifier(f: TemplateField) -> dict[str, Any]:
    """Construct build arguments of one Field Specifier (RFC 7011 3.2)."""
    e = f.element
    return {
        "ie": {"enterprise_bit": e.pen != 0, "element_id": e.element_id},
        "field_length": f.length,
        "enterprise_number": e.pen if e.pen else None,
    }


def template_record_length(template: Template) -> int:
    """Encoded size of a (Options) Template Record."""
    header: int = 6 if template.is_options else 4  # RFC 7011 3.4.2.2 / 3.4.1 record headers
    return header + sum(8 if f.element.pen else 4 for f in template.fields)


def template_set_length(templates: Sequence[Template]) -> int:
    """Encoded size of a Template Set or Options Template Set holding `templates` (for MTU packing)."""
    return SET_HEADER_LEN + sum(template_record_length(t) for t in templates)


def _set(set_id: int, body: bytes) -> bytes:
    length = SET_HEADER_LEN + len(body)
    if length > MAX_MESSAGE_LEN - MESSAGE_HEADER_LEN:
        raise EncodeError(f"set {set_id} of {length} bytes cannot fit in a message")
    return _SET_HEADER.pack(set_id, length) + body


def encode_template_set(templates: Sequence[Template]) -> bytes:
    """A Template Set (id 2) carrying Template Records (RFC 7011 3.4.1)."""
    body = bytearray()
    for t in templates:
        if t.is_options:
            raise EncodeError(
                f"template {t.template_id} is an options template: use encode_options_template_set"
            )
        body += TemplateRecord.build(
            {"template_id": t.template_id, "field_count": len(t.fields),
             "fields": [field_specifier(f) for f in t.fields]}
        )  # fmt: skip
    return _set(TEMPLATE_SET_ID, bytes(body))


def encode_options_template_set(templates: Sequence[Template]) -> bytes:
    """An Options Template Set (id 3); scope fields first, scope count >= 1 (RFC 7011 3.4.2.2)."""
    body = bytearray()
    for t in templates:
        if not t.is_options:
            raise EncodeError(f"template {t.template_id} has no scope fields: use encode_template_set")
        body += OptionsTemplateRecord.build(
            {"template_id": t.template_id, "field_count": len(t.fields),
             "scope_field_count": t.scope_count, "fields": [field_specifier(f) for f in t.fields]}
        )  # fmt: skip
    return _set(OPTIONS_TEMPLATE_SET_ID, bytes(body))


def encode_options_template_sets(templates: Sequence[Template]) -> list[bytes]:
    """One Options Template Set per Options Template Record, the form every collector reads.

    RFC 7011 3.4.2.2 allows several records per set, but pmacct nfacctd 1.7.x (Debian 12 ships
    1.7.7) steps to the next record by 6 + (field count + scope count) * 4 bytes and rejects the
    set as malformed, dropping the rest of the message: one record per set never hits that."""
    return [encode_options_template_set([t]) for t in templates]


def encode_data_records(template: Template, records: Sequence[Mapping[str, Any]]) -> bytes:
    """Concatenated Data Records (no Set Header); values keyed by element name, missing -> zero/empty."""
    st = data_record_struct(template)
    names = [f.name for f in template.fields]
    out = bytearray()
    for rec in records:
        out += st.build({n: rec.get(n) for n in names})
    return bytes(out)


def encode_data_set(set_id: int, records_bytes: bytes, pad_to: int = 4) -> bytes:
    """A Data Set: header, records, zero padding to a multiple of `pad_to` (RFC 7011 3.3.1)."""
    if not MIN_DATA_SET_ID <= set_id <= 65535:
        raise EncodeError(f"data set id {set_id} must be 256..65535 (RFC 7011 3.3.2)")
    pad = (-(SET_HEADER_LEN + len(records_bytes))) % pad_to if pad_to > 1 else 0
    return _set(set_id, records_bytes + bytes(pad))


def encode_message(export_time: int, sequence: int, domain_id: int, sets: Sequence[bytes]) -> bytes:
    """An IPFIX Message: header + sets.  `sequence` is taken mod 2^32 (RFC 7011 3.1)."""
    body = b"".join(sets)
    length = MESSAGE_HEADER_LEN + len(body)
    if length > MAX_MESSAGE_LEN:
        raise EncodeError(f"IPFIX message of {length} bytes exceeds 65535 (RFC 7011 3.1)")
    if not 0 <= export_time < 2**32 or not 0 <= domain_id < 2**32:
        raise EncodeError(f"export time {export_time} or observation domain {domain_id} out of 32-bit range")
    return _MESSAGE_HEADER.pack(VERSION, length, export_time, sequence % 2**32, domain_id) + body


__all__ = [
    "MESSAGE_HEADER_LEN",
    "SET_HEADER_LEN",
    "VARLEN",
    "VERSION",
    "FieldSpecifier",
    "MessageHeader",
    "OptionsTemplateRecord",
    "SetHeader",
    "TemplateRecord",
    "data_record_struct",
    "encode_data_records",
    "encode_data_set",
    "encode_message",
    "encode_options_template_set",
    "encode_options_template_sets",
    "encode_template_set",
    "template_record_length",
    "template_set_length",
]  # fmt: skip
