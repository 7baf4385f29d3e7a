"""What differs between IPFIX (RFC 7011) and NetFlow v9 (RFC 3954) on the export side, one object each.

The session and the message builder are protocol-blind: they ask the dialect for the header, the
padding, the set framing, the sequence rule and the template rewrite.  Everything here is pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ipfixer.errors import EncodeError
from ipfixer.infomodel import InfoModel
from ipfixer.templates import Template, TemplateField
from ipfixer.wire import ipfix, netflow9

ProtocolName = Literal["ipfix", "netflow9"]
UINT32 = 1 << 32
NS_PER_S = 1_000_000_000

# RFC 3954 8: v9 collectors expect sysUptime-relative FIRST_SWITCHED(22) / LAST_SWITCHED(21); IANA
# names those ids flowStartSysUpTime / flowEndSysUpTime.  Absolute-ms fields of the IPFIX template are
# replaced by them in the v9 template.  v9 has one ICMP_TYPE (32) for both families: nfdump 1.7 shows
# ICMPv6 type 0 when it gets 139 in v9, so 139 is sent as 32 (same value: type*256+code).
V9_SUBSTITUTES: Mapping[str, str] = {
    "flowStartMilliseconds": "flowStartSysUpTime",
    "flowEndMilliseconds": "flowEndSysUpTime",
    "icmpTypeCodeIPv6": "icmpTypeCodeIPv4",
}


@dataclass(frozen=True, slots=True)
class ExportInstant:
    """The instant a message leaves, as its header states it: whole seconds (both protocols), and for
    v9 the sysUptime in ms that goes with them.  `cap_ms` (wall ms) is the latest time a record of
    this message may carry (RFC 3954 5.1: no record time lies after the packet's)."""

    export_secs: int
    sys_uptime_ms: int
    cap_ms: int | None


def netflow9_template(template: Template, infomodel: InfoModel | None = None) -> tuple[Template, list[str]]:
    """The v9 form of an IPFIX template, and the names of the fields v9 cannot carry (dropped).

    flowStart/EndMilliseconds become FIRST/LAST_SWITCHED (sysUptime-relative ms, RFC 3954 8), the way
    v9 collectors read times, and icmpTypeCodeIPv6 becomes ICMP_TYPE (32); enterprise-specific elements
    are dropped because a v9 Template FlowSet has no enterprise bit (RFC 3954 5.2); variable-length
    fields do not exist in v9 (EncodeError)."""
    im = infomodel or InfoModel.load_default()
    fields: list[TemplateField] = []
    dropped: list[str] = []
    for i, f in enumerate(template.fields):
        if f.element.is_enterprise:
            if i < template.scope_count:
                raise EncodeError(f"template {template.template_id} ({template.name}): enterprise scope "
                                  f"field {f.name!r} cannot be sent in NetFlow v9 (RFC 3954 6.1)")
            dropped.append(f.name)
            continue
        if f.is_varlen:
            raise EncodeError(f"template {template.template_id} ({template.name}) field {f.name!r}: "
                              "NetFlow v9 has no variable-length fields (RFC 3954 5.2)")
        sub = V9_SUBSTITUTES.get(f.name) if i >= template.scope_count else None
        if sub is not None:
            e = im.by_name(sub)
            fields.append(TemplateField(e, e.default_length))
        else:
            fields.append(f)
    return dataclasses.replace(template, fields=tuple(fields)), dropped


class Dialect(Protocol):
    """The protocol-specific half of an export session."""

    name: ProtocolName
    header_len: int
    set_header_len: int
    pad_to: int  # sets padded to a multiple of this (1: no padding)

    def wire_template(self, template: Template, infomodel: InfoModel | None) -> tuple[Template, list[str]]:
        """The template as this protocol sends it, and the fields it had to drop."""
        ...

    def template_sets(self, templates: Sequence[Template]) -> list[bytes]:
        """Template Set(s) for data templates."""
        ...

    def options_template_sets(self, templates: Sequence[Template]) -> list[bytes]:
        """Options Template Sets, one record per set."""
        ...

    def data_set(self, set_id: int, body: bytes) -> bytes:
        """A Data Set / FlowSet around whole encoded records."""
        ...

    def encode_records(self, template: Template, values: Sequence[Mapping[str, Any]]) -> bytes:
        """Concatenated Data Records (per-record path)."""
        ...

    def instant(self, now_wall_ns: int, boot_wall_ns: int) -> ExportInstant:
        """What the header says about `now`."""
        ...

    def message(self, instant: ExportInstant, sequence: int, domain_id: int, n_templates: int, n_records: int,
                sets: Sequence[bytes]) -> bytes:
        """Header + sets."""
        ...

    def next_sequence(self, sequence: int, n_records: int) -> int:
        """The sequence number of the message after one carrying `n_records` Data Records."""
        ...


class IpfixDialect:
    """RFC 7011."""

    name: ProtocolName = "ipfix"
    header_len = ipfix.MESSAGE_HEADER_LEN
    set_header_len = ipfix.SET_HEADER_LEN
    # IPFIX padding is optional (RFC 7011 3.3.1) and we send none, so padding is never taken for a record.
    pad_to = 1

    def wire_template(self, template: Template, infomodel: InfoModel | None) -> tuple[Template, list[str]]:
        return template, []

    def template_sets(self, templates: Sequence[Template]) -> list[bytes]:
        return [ipfix.encode_template_set(templates)] if templates else []

    def options_template_sets(self, templates: Sequence[Template]) -> list[bytes]:
        return ipfix.encode_options_template_sets(templates)

    def data_set(self, set_id: int, body: bytes) -> bytes:
        return ipfix.encode_data_set(set_id, body, pad_to=self.pad_to)

    def encode_records(self, template: Template, values: Sequence[Mapping[str, Any]]) -> bytes:
        return ipfix.encode_data_records(template, values)

    def instant(self, now_wall_ns: int, boot_wall_ns: int) -> ExportInstant:
        # RFC 7011 3.1: Export Time in seconds; records carry absolute times, nothing to cap.
        return ExportInstant((now_wall_ns // NS_PER_S) % UINT32, 0, None)

    def message(self, instant: ExportInstant, sequence: int, domain_id: int, n_templates: int, n_records: int,
                sets: Sequence[bytes]) -> bytes:
        return ipfix.encode_message(export_time=instant.export_secs, sequence=sequence, domain_id=domain_id,
                                    sets=sets)

    def next_sequence(self, sequence: int, n_records: int) -> int:
        # RFC 7011 3.1: Data Records (flow and options) sent before, mod 2^32; template records are not
        # counted (10.3.2).
        return (sequence + n_records) % UINT32


class Netflow9Dialect:
    """RFC 3954."""

    name: ProtocolName = "netflow9"
    header_len = netflow9.PACKET_HEADER_LEN
    set_header_len = netflow9.FLOWSET_HEADER_LEN
    pad_to = 4  # RFC 3954 5.3: FlowSets padded to 32 bits

    def wire_template(self, template: Template, infomodel: InfoModel | None) -> tuple[Template, list[str]]:
        return netflow9_template(template, infomodel)

    def template_sets(self, templates: Sequence[Template]) -> list[bytes]:
        return [netflow9.encode_template_flowset(templates)] if templates else []

    def options_template_sets(self, templates: Sequence[Template]) -> list[bytes]:
        return [netflow9.encode_options_template_flowset([t]) for t in templates]  # one record per FlowSet

    def data_set(self, set_id: int, body: bytes) -> bytes:
        return netflow9.encode_data_flowset(set_id, body, pad_to=self.pad_to)

    def encode_records(self, template: Template, values: Sequence[Mapping[str, Any]]) -> bytes:
        return netflow9.encode_data_records(template, values)

    def instant(self, now_wall_ns: int, boot_wall_ns: int) -> ExportInstant:
        """RFC 3954 5.1: sysUptime and UNIX Secs are the instant the packet leaves, and no record time may
        lie after it.  UNIX Secs has no sub-second part, and collectors rebuild absolute times as
        unix_secs*1000 - sysUptime + FIRST_SWITCHED; so the instant is `now` rounded UP to the whole
        second (never before now, hence never before the records' times), and sysUptime is taken at that
        same second, which keeps the rebuilt times exact to the millisecond.  Record times are capped at
        it (cap_ms) so a flow clock running ahead of `now` cannot wrap at the collector (49.7 days)."""
        secs = -(-now_wall_ns // NS_PER_S)
        cap_ms = secs * 1000
        uptime = max(0, cap_ms - boot_wall_ns // 1_000_000) % UINT32
        return ExportInstant(secs % UINT32, uptime, cap_ms)

    def message(self, instant: ExportInstant, sequence: int, domain_id: int, n_templates: int, n_records: int,
                sets: Sequence[bytes]) -> bytes:
        # RFC 3954 5.1: Count = all records (template + data); Sequence = export packets sent before.
        return netflow9.encode_packet(sys_uptime_ms=instant.sys_uptime_ms, unix_secs=instant.export_secs,
                                      sequence=sequence, source_id=domain_id, count=n_templates + n_records,
                                      flowsets=sets)

    def next_sequence(self, sequence: int, n_records: int) -> int:
        return (sequence + 1) % UINT32


def dialect_for(protocol: str) -> Dialect:
    """The dialect object of a protocol name (EncodeError for anything else)."""
    if protocol == "ipfix":
        return IpfixDialect()
    if protocol == "netflow9":
        return Netflow9Dialect()
    raise EncodeError(f"unknown export protocol {protocol!r} (ipfix or netflow9)")
