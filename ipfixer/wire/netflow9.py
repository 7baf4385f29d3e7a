"""NetFlow version 9 Export Packets (RFC 3954), declared with construct.

Same Templates as IPFIX, with v9's differences: packet header with sysUptime and a record count,
FlowSet ids 0/1, options templates with scope/option lengths in bytes and v9 scope types, no
enterprise elements and no variable-length fields (both raise EncodeError).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from construct import Array, Const, Int16ub, Int32ub, Struct, this

from ipfixer.errors import EncodeError
from ipfixer.infomodel import Element
from ipfixer.templates import Template
from ipfixer.wire import ipfix
from ipfixer.wire.fastpath import header_packer

VERSION = 9
PACKET_HEADER_LEN = 20
FLOWSET_HEADER_LEN = 4
TEMPLATE_FLOWSET_ID = 0  # RFC 3954 5.2
OPTIONS_TEMPLATE_FLOWSET_ID = 1  # RFC 3954 6.1
MIN_DATA_FLOWSET_ID = 256

# RFC 3954 6.1 scope field types.
SCOPE_SYSTEM = 1
SCOPE_INTERFACE = 2
SCOPE_LINE_CARD = 3
SCOPE_CACHE = 4
SCOPE_TEMPLATE = 5
SCOPE_NAMES = {1: "scopeSystem", 2: "scopeInterface", 3: "scopeLineCard", 4: "scopeCache", 5: "scopeTemplate"}

# IPFIX scope elements -> v9 scope type.  The v9 "System" scope is the whole exporting device, which is
# what an IPFIX Observation Domain / Exporting or Metering Process identifies for a single-domain exporter.
_SCOPE_BY_ELEMENT = {
    "observationDomainId": SCOPE_SYSTEM,
    "exportingProcessId": SCOPE_SYSTEM,
    "meteringProcessId": SCOPE_SYSTEM,
    "exporterIPv4Address": SCOPE_SYSTEM,
    "exporterIPv6Address": SCOPE_SYSTEM,
    "ingressInterface": SCOPE_INTERFACE,
    "egressInterface": SCOPE_INTERFACE,
    "lineCardId": SCOPE_LINE_CARD,
    "templateId": SCOPE_TEMPLATE,
}

# RFC 3954 5.1: Packet Header.  Count = all records (template, options and data) in the packet;
# Sequence Number = export packets sent by this source id.
PacketHeader = Struct(
    "version" / Const(VERSION, Int16ub),
    "count" / Int16ub,
    "sys_uptime" / Int32ub,
    "unix_secs" / Int32ub,
    "sequence_number" / Int32ub,
    "source_id" / Int32ub,
)

# RFC 3954 5.2/5.3: FlowSet header; Length includes header and padding.
FlowSetHeader = Struct("flowset_id" / Int16ub, "length" / Int16ub)

FieldSpec = Struct("field_type" / Int16ub, "field_length" / Int16ub)

# The hot path packs the headers with struct, derived from the declarations above (fastpath).
_PACKET_HEADER = header_packer(PacketHeader)
_FLOWSET_HEADER = header_packer(FlowSetHeader)

# RFC 3954 5.2: Template Record.
TemplateRecord = Struct(
    "template_id" / Int16ub,
    "field_count" / Int16ub,
    "fields" / Array(this.field_count, FieldSpec),
)

# RFC 3954 6.1: Options Template Record; scope and option lengths are in BYTES (4 per field).
OptionsTemplateRecord = Struct(
    "template_id" / Int16ub,
    "option_scope_length" / Int16ub,
    "option_length" / Int16ub,
    "scope_fields" / Array(this.option_scope_length // 4, FieldSpec),
    "option_fields" / Array(this.option_length // 4, FieldSpec),
)


def v9_scope_type(element: Element) -> int:
    """The RFC 3954 6.1 scope type standing for an IPFIX scope element (EncodeError if none does)."""
    try:
        return _SCOPE_BY_ELEMENT[element.name]
    except KeyError:
        raise EncodeError(
            f"scope element {element.name} has no NetFlow v9 scope type (RFC 3954 6.1)"
        ) from None


def check_v9(template: Template) -> None:
    """EncodeError unless the template can be sent as NetFlow v9 (no PEN, no variable length)."""
    for f in template.fields:
        if f.element.pen:
            raise EncodeError(
                f"template {template.template_id} field {f.name}: enterprise elements cannot be sent in NetFlow v9"
            )
        if f.is_varlen:
            raise EncodeError(
                f"template {template.template_id} field {f.name}: variable-length fields do not exist in NetFlow v9"
            )
        if f.element.element_id > 0xFFFF:
            raise EncodeError(f"template {template.template_id} field {f.name}: id too large")


def _pad(n: int) -> bytes:
    return bytes(-n % 4)  # RFC 3954 5.3: FlowSets padded to a 4-byte boundary with zeros


def _flowset(flowset_id: int, body: bytes) -> bytes:
    body += _pad(FLOWSET_HEADER_LEN + len(body))
    length = FLOWSET_HEADER_LEN + len(body)
    if length > 65535 - PACKET_HEADER_LEN:
        raise EncodeError(f"flowset {flowset_id} of {length} bytes cannot fit in a packet")
    return _FLOWSET_HEADER.pack(flowset_id, length) + body


def options_template_flowset_length(templates: Sequence[Template]) -> int:
    """Encoded size of encode_options_template_flowset(templates)."""
    return sum((n := FLOWSET_HEADER_LEN + 6 + 4 * len(t.fields)) + (-n % 4) for t in templates)


def encode_template_flowset(templates: Sequence[Template]) -> bytes:
    """A Template FlowSet (id 0) carrying one Template Record per template (RFC 3954 5.2)."""
    body = bytearray()
    for t in templates:
        if t.is_options:
            raise EncodeError(f"template {t.template_id} is an options template")
        check_v9(t)
        body += TemplateRecord.build(
            {"template_id": t.template_id, "field_count": len(t.fields),
             "fields": [{"field_type": f.element.element_id, "field_length": f.length} for f in t.fields]}
        )  # fmt: skip
    return _flowset(TEMPLATE_FLOWSET_ID, bytes(body))


def encode_options_template_flowset(templates: Sequence[Template]) -> bytes:
    """Options Template FlowSets (id 1), one per template as laid out in RFC 3954 6.1, each padded."""
    out = bytearray()
    for t in templates:
        if not t.is_options:
            raise EncodeError(f"template {t.template_id} has no scope fields")
        check_v9(t)
        scope = [{"field_type": v9_scope_type(f.element), "field_length": f.length} for f in t.scope_fields]
        opts = [
            {"field_type": f.element.element_id, "field_length": f.length} for f in t.fields[t.scope_count :]
        ]
        rec = OptionsTemplateRecord.build(
            {"template_id": t.template_id, "option_scope_length": 4 * len(scope),
             "option_length": 4 * len(opts), "scope_fields": scope, "option_fields": opts}
        )  # fmt: skip
        out += _flowset(OPTIONS_TEMPLATE_FLOWSET_ID, bytes(rec))
    return bytes(out)


def encode_data_records(template: Template, records: Sequence[Mapping[str, Any]]) -> bytes:
    """Concatenated v9 Data Records: same bytes as IPFIX for a v9-compatible template."""
    check_v9(template)
    return ipfix.encode_data_records(template, records)


def encode_data_flowset(flowset_id: int, records_bytes: bytes, pad_to: int = 4) -> bytes:
    """A Data FlowSet (id = template id >= 256) with zero padding (RFC 3954 5.3)."""
    if not MIN_DATA_FLOWSET_ID <= flowset_id <= 65535:
        raise EncodeError(f"data flowset id {flowset_id} must be 256..65535 (RFC 3954 5.3)")
    pad = (-(FLOWSET_HEADER_LEN + len(records_bytes))) % pad_to if pad_to > 1 else 0
    body = records_bytes + bytes(pad)
    length = FLOWSET_HEADER_LEN + len(body)
    if length > 65535 - PACKET_HEADER_LEN:
        raise EncodeError(f"flowset {flowset_id} of {length} bytes cannot fit in a packet")
    return _FLOWSET_HEADER.pack(flowset_id, length) + body


def encode_packet(
    sys_uptime_ms: int, unix_secs: int, sequence: int, source_id: int, count: int, flowsets: Sequence[bytes]
) -> bytes:
    """A v9 Export Packet; `count` = all records in it, templates included (RFC 3954 5.1)."""
    body = b"".join(flowsets)
    if PACKET_HEADER_LEN + len(body) > 65535:
        raise EncodeError(f"NetFlow v9 packet of {PACKET_HEADER_LEN + len(body)} bytes exceeds 65535")
    if not 0 <= count <= 65535:
        raise EncodeError(f"record count {count} out of range")
    if not 0 <= source_id < 2**32:
        raise EncodeError(f"source id {source_id} out of 32-bit range")
    return _PACKET_HEADER.pack(VERSION, count, sys_uptime_ms % 2**32, unix_secs % 2**32, sequence % 2**32,
                               source_id) + body
