"""Sans-I/O Collecting Process side: IPFIX (RFC 7011) and NetFlow v9 (RFC 3954) bytes -> records.

Used by tests, interop checks and replay.  Stateful only in the templates it has learnt, per
(source, version, Observation Domain / Source ID).  A peer's bytes are untrusted: every read is bounds
checked and the only exception raised is DecodeError, naming what is wrong and at which offset.
Unknown and enterprise elements are kept as raw bytes with their (PEN, id).  A Data Set whose template
is not known yet cannot be read (RFC 7011 8): it is skipped, counted, and listed in the message's
`missing_templates`, so that the caller can say so.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ipfixer.errors import DecodeError, FieldDecodeError
from ipfixer.infomodel import VARLEN, DataType, Element, InfoModel
from ipfixer.templates import Template, TemplateField
from ipfixer.wire import ipfix, netflow9

_U16 = struct.Struct(">H")
_U16x2 = struct.Struct(">HH")
_U16x3 = struct.Struct(">HHH")
_U32 = struct.Struct(">I")
_IPFIX_HEADER = struct.Struct(">HHIII")  # RFC 7011 3.1 (ipfix.MessageHeader)
_V9_HEADER = struct.Struct(">HHIIII")  # RFC 3954 5.1 (netflow9.PacketHeader)


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """One Data Record: values by element name; unknown elements also by (PEN, id) as raw bytes."""

    template_id: int
    is_options: bool
    fields: dict[str, Any]
    unknown: dict[tuple[int, int], bytes] = field(default_factory=dict)


@dataclass(slots=True)
class DecodedMessage:
    """One IPFIX Message or NetFlow v9 Export Packet."""

    version: int
    export_time: int  # IPFIX Export Time, or v9 unix_secs
    sys_uptime: int | None  # v9 only
    sequence: int
    domain_id: int  # IPFIX Observation Domain ID, or v9 Source ID
    templates: list[Template] = field(default_factory=list)
    records: list[DecodedRecord] = field(default_factory=list)
    withdrawn: list[int] = field(default_factory=list)
    count: int | None = None  # v9 header count
    missing_templates: list[int] = field(default_factory=list)  # data sets skipped: template not known


def _unknown_element(element_id: int, pen: int) -> Element:
    name = f"pen{pen}_ie{element_id}" if pen else f"ie{element_id}"
    return Element(name=name, element_id=element_id, pen=pen, data_type=DataType.OCTET_ARRAY, status="unknown")


def _v9_scope_element(scope_type: int, length: int, index: int) -> Element:
    name = netflow9.SCOPE_NAMES.get(scope_type, f"scope{scope_type}")
    if index:  # a second scope of the same type gets its position (scopeSystem, scopeSystem_1)
        name = f"{name}_{index}"
    dtype = DataType.UNSIGNED64 if 1 <= length <= 8 else DataType.OCTET_ARRAY
    return Element(name=name, element_id=scope_type, pen=0, data_type=dtype, status="v9 scope")


class Decoder:
    """Decodes datagrams from any number of exporters; remembers their templates."""

    def __init__(self, infomodel: InfoModel | None = None, max_templates: int = 65536) -> None:
        self.infomodel = infomodel or InfoModel.load_default()
        self.max_templates = max_templates  # templates remembered over all exporters and domains
        self._templates: dict[tuple[object, int, int, int], Template] = {}
        self.stats: dict[str, int] = {
            "messages": 0, "records": 0, "templates": 0, "withdrawals": 0,
            "unknown_template_sets": 0, "reserved_sets": 0, "templates_refused": 0,
        }  # fmt: skip

    def template(
        self, template_id: int, domain_id: int = 0, source: object = None, version: int = 10
    ) -> Template | None:
        """A template learnt from `source` for this domain / source id, if any."""
        return self._templates.get((source, version, domain_id, template_id))

    def feed(self, data: bytes, source: object = None) -> DecodedMessage:
        """Decode one datagram (an IPFIX Message or a v9 Export Packet)."""
        data = bytes(data)
        if len(data) < 2:
            raise DecodeError(f"datagram of {len(data)} bytes is too short for a version number at offset 0")
        version = _U16.unpack_from(data)[0]
        if version == ipfix.VERSION:
            msg = self._ipfix(data, source)
        elif version == netflow9.VERSION:
            msg = self._v9(data, source)
        else:
            raise DecodeError(f"unsupported version {version} at offset 0 (expected 10 or 9)")
        self.stats["messages"] += 1
        self.stats["records"] += len(msg.records)
        return msg

    # -- IPFIX (RFC 7011) ------------------------------------------------------------------------

    def _ipfix(self, data: bytes, source: object) -> DecodedMessage:
        if len(data) < ipfix.MESSAGE_HEADER_LEN:
            raise DecodeError(f"IPFIX message of {len(data)} bytes is shorter than its 16-byte header")
        _, length, export_time, seq, domain = _IPFIX_HEADER.unpack_from(data)
        if length < ipfix.MESSAGE_HEADER_LEN:
            raise DecodeError(f"IPFIX message length {length} at offset 2 is shorter than the header")
        if length > len(data):
            raise DecodeError(f"IPFIX message truncated: length field {length}, got {len(data)} bytes")
        if length < len(data):
            raise DecodeError(
                f"{len(data) - length} trailing bytes after the IPFIX message at offset {length}"
            )
        msg = DecodedMessage(10, export_time, None, seq, domain)
        pos = ipfix.MESSAGE_HEADER_LEN
        while pos < length:
            set_id, _set_len, body, end = self._set_bounds(data, pos, length, "set")
            if set_id == ipfix.TEMPLATE_SET_ID:
                self._ipfix_templates(data, body, end, source, msg, options=False)
            elif set_id == ipfix.OPTIONS_TEMPLATE_SET_ID:
                self._ipfix_templates(data, body, end, source, msg, options=True)
            elif set_id >= ipfix.MIN_DATA_SET_ID:
                self._data(data, body, end, (source, 10, domain, set_id), msg)
            else:
                self.stats["reserved_sets"] += 1  # RFC 7011 3.3.2: ids 0, 1, 4-255 not for IPFIX
            pos = end
        return msg

    @staticmethod
    def _set_bounds(data: bytes, pos: int, end_of_msg: int, what: str) -> tuple[int, int, int, int]:
        if end_of_msg - pos < 4:
            raise DecodeError(f"truncated {what} header at offset {pos}")
        set_id, set_len = _U16x2.unpack_from(data, pos)
        if set_len < 4:
            raise DecodeError(f"{what} {set_id} at offset {pos}: length {set_len} < 4")
        if pos + set_len > end_of_msg:
            raise DecodeError(f"{what} {set_id} at offset {pos}: length {set_len} overruns the message")
        return set_id, set_len, pos + 4, pos + set_len

    def _ipfix_templates(
        self, data: bytes, pos: int, end: int, source: object, msg: DecodedMessage, options: bool
    ) -> None:
        domain = msg.domain_id
        while end - pos >= 4 and any(data[pos:end]):  # the rest is padding (RFC 7011 3.3.1)
            tid, count = _U16x2.unpack_from(data, pos)
            rec_at = pos
            if count == 0:  # Template Withdrawal (RFC 7011 8.1): ignored gracefully over UDP
                pos += 4
                self._withdraw(source, 10, domain, tid, msg)
                continue
            if tid < ipfix.MIN_DATA_SET_ID:
                raise DecodeError(f"template record at offset {rec_at}: template id {tid} < 256")
            scope = 0
            pos += 4
            if options:
                if end - pos < 2:
                    raise DecodeError(f"options template {tid} at offset {rec_at}: truncated header")
                scope = _U16.unpack_from(data, pos)[0]
                pos += 2
                if not 1 <= scope <= count:
                    raise DecodeError(
                        f"options template {tid} at offset {rec_at}: scope field count {scope} not in 1..{count}"
                    )
            fields: list[TemplateField] = []
            for i in range(count):
                if end - pos < 4:
                    raise DecodeError(
                        f"template {tid} at offset {rec_at}: field specifier {i} overflows the set"
                    )
                raw_id, flen = _U16x2.unpack_from(data, pos)
                pos += 4
                pen = 0
                if raw_id & 0x8000:  # enterprise bit (RFC 7011 3.2)
                    if end - pos < 4:
                        raise DecodeError(
                            f"template {tid} at offset {rec_at}: enterprise number {i} overflows the set"
                        )
                    pen = _U32.unpack_from(data, pos)[0]
                    pos += 4
                fields.append(self._field(raw_id & 0x7FFF, pen, flen, tid, i, rec_at))
            self._learn(
                Template(tid, f"template_{tid}", tuple(fields), scope), (source, 10, domain, tid), msg
            )

    def _field(self, element_id: int, pen: int, length: int, tid: int, index: int, at: int) -> TemplateField:
        if length == 0:
            raise DecodeError(f"template {tid} at offset {at}: field {index} has length 0")
        element = self.infomodel.by_id(element_id, pen) or _unknown_element(element_id, pen)
        return TemplateField(element, length)

    def _learn(self, t: Template, key: tuple[object, int, int, int], msg: DecodedMessage) -> None:
        self.stats["templates"] += 1
        msg.templates.append(t)
        if key not in self._templates and len(self._templates) >= self.max_templates:
            self.stats["templates_refused"] += 1  # bounded state: a peer cannot grow it without limit
            return
        self._templates[key] = t

    def _withdraw(self, source: object, version: int, domain: int, tid: int, msg: DecodedMessage) -> None:
        self.stats["withdrawals"] += 1
        msg.withdrawn.append(tid)
        if tid in (ipfix.TEMPLATE_SET_ID, ipfix.OPTIONS_TEMPLATE_SET_ID):  # withdraw all (RFC 7011 8.1)
            for key in [k for k in self._templates if k[:3] == (source, version, domain)]:
                del self._templates[key]
        else:
            self._templates.pop((source, version, domain, tid), None)

    def _data(
        self, data: bytes, pos: int, end: int, key: tuple[object, int, int, int], msg: DecodedMessage
    ) -> None:
        t = self._templates.get(key)
        if t is None:
            self.stats["unknown_template_sets"] += 1  # RFC 7011 8: cannot decode before its template
            msg.missing_templates.append(key[3])
            return
        min_len = t.min_record_length
        while end - pos >= min_len:
            values: dict[str, Any] = {}
            unknown: dict[tuple[int, int], bytes] = {}
            rec_at = pos
            for f in t.fields:
                n = f.length
                if n == VARLEN:  # RFC 7011 7
                    if end - pos < 1 or (data[pos] == 255 and end - pos < 3):
                        raise FieldDecodeError("length prefix truncated", template_id=t.template_id,
                                               field=f.name, offset=rec_at)
                    n = data[pos]
                    pos += 1
                    if n == 255:
                        n = _U16.unpack_from(data, pos)[0]
                        pos += 2
                if end - pos < n:
                    raise FieldDecodeError(f"overruns the set ({n} bytes, {end - pos} left)",
                                           template_id=t.template_id, field=f.name, offset=rec_at)
                raw = data[pos : pos + n]
                pos += n
                if f.element.status == "unknown":
                    unknown[(f.element.pen, f.element.element_id)] = raw
                    values[f.name] = raw
                else:
                    values[f.name] = f.element.data_type.codec.decode(raw)
            msg.records.append(DecodedRecord(t.template_id, t.is_options, values, unknown))

    # -- NetFlow v9 (RFC 3954) -------------------------------------------------------------------

    def _v9(self, data: bytes, source: object) -> DecodedMessage:
        if len(data) < netflow9.PACKET_HEADER_LEN:
            raise DecodeError(f"NetFlow v9 packet of {len(data)} bytes is shorter than its 20-byte header")
        _, count, uptime, secs, seq, source_id = _V9_HEADER.unpack_from(data)
        msg = DecodedMessage(9, secs, uptime, seq, source_id, count=count)
        pos = netflow9.PACKET_HEADER_LEN
        end_of_packet = len(data)
        while pos < end_of_packet:
            fs_id, _, body, end = self._set_bounds(data, pos, end_of_packet, "flowset")
            if fs_id == netflow9.TEMPLATE_FLOWSET_ID:
                self._v9_templates(data, body, end, source, msg)
            elif fs_id == netflow9.OPTIONS_TEMPLATE_FLOWSET_ID:
                self._v9_options_templates(data, body, end, source, msg)
            elif fs_id >= netflow9.MIN_DATA_FLOWSET_ID:
                self._data(data, body, end, (source, 9, source_id, fs_id), msg)
            else:
                self.stats["reserved_sets"] += 1
            pos = end
        return msg

    def _v9_templates(self, data: bytes, pos: int, end: int, source: object, msg: DecodedMessage) -> None:
        while end - pos >= 4 and any(data[pos:end]):  # the rest is padding (RFC 3954 5.2)
            rec_at = pos
            tid, count = _U16x2.unpack_from(data, pos)
            pos += 4
            if tid < netflow9.MIN_DATA_FLOWSET_ID:
                raise DecodeError(f"v9 template record at offset {rec_at}: template id {tid} < 256")
            if count == 0 or end - pos < 4 * count:
                raise DecodeError(
                    f"v9 template {tid} at offset {rec_at}: {count} fields overflow the flowset"
                )
            fields: list[TemplateField] = []
            for i in range(count):
                ftype, flen = _U16x2.unpack_from(data, pos)
                pos += 4
                fields.append(self._field(ftype, 0, flen, tid, i, rec_at))
            self._learn(Template(tid, f"template_{tid}", tuple(fields)), (source, 9, msg.domain_id, tid), msg)

    def _v9_options_templates(
        self, data: bytes, pos: int, end: int, source: object, msg: DecodedMessage
    ) -> None:
        while end - pos >= 6 and any(data[pos:end]):  # RFC 3954 6.1, padding after
            rec_at = pos
            tid, scope_len, opt_len = _U16x3.unpack_from(data, pos)
            pos += 6
            if tid < netflow9.MIN_DATA_FLOWSET_ID:
                raise DecodeError(f"v9 options template at offset {rec_at}: template id {tid} < 256")
            if scope_len % 4 or opt_len % 4 or scope_len == 0:
                raise DecodeError(
                    f"v9 options template {tid} at offset {rec_at}: scope length {scope_len} / option length "
                    f"{opt_len} must be non-zero multiples of 4 bytes (RFC 3954 6.1)"
                )
            if end - pos < scope_len + opt_len:
                raise DecodeError(
                    f"v9 options template {tid} at offset {rec_at}: fields overflow the flowset"
                )
            fields: list[TemplateField] = []
            for i in range(scope_len // 4):
                stype, flen = _U16x2.unpack_from(data, pos)
                pos += 4
                if flen == 0:
                    raise DecodeError(f"v9 options template {tid} at offset {rec_at}: scope {i} has length 0")
                same = sum(1 for f in fields if f.element.element_id == stype)
                fields.append(TemplateField(_v9_scope_element(stype, flen, same), flen))
            for i in range(opt_len // 4):
                ftype, flen = _U16x2.unpack_from(data, pos)
                pos += 4
                fields.append(self._field(ftype, 0, flen, tid, i, rec_at))
            t = Template(tid, f"template_{tid}", tuple(fields), scope_len // 4)
            self._learn(t, (source, 9, msg.domain_id, tid), msg)
