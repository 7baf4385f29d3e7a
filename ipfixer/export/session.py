"""Sans-I/O export session for one Collector: sequence numbers, template refresh, what goes in which message.

It takes a batch (or records) and `now`, and returns complete messages.  The protocol differences live in
the dialect (dialect.py), the packing of whole records into size-bounded messages in builder.py.  Rules
kept here, each for a collector seen to fail without it:

- Data Template Sets go first in the first flow message and again whenever the refresh interval
  (seconds or messages) is due (RFC 7011 8.4 over UDP; RFC 3954 7), and with the next message after a
  send failed (reset()).
- Options Template Sets (one record per set) travel only with options data, and options data never
  shares a message with flow data: a collector that rejects an options template (pmacct 1.7.7 drops
  the whole message) loses no flow record.
- The options records of one refresh travel together, so there is no tiny stand-alone options message.
- No message is valid UTF-8: python-netflow 0.12's collector takes any datagram that decodes as UTF-8
  for a hex dump and stops.  A message that would be gets the data Template Set(s) added (their field ids
  >= 128 make any message invalid UTF-8), see _body().

No socket and no clock are touched here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ipfixer.errors import EncodeError
from ipfixer.export.builder import MessageBuilder, RecordQueue, padded
from ipfixer.export.dialect import (
    UINT32,
    V9_SUBSTITUTES,
    Dialect,
    ExportInstant,
    ProtocolName,
    dialect_for,
    netflow9_template,
)
from ipfixer.export.mapping import check_mapped, fast_path_ok, flow_columns, flow_values
from ipfixer.infomodel import InfoModel
from ipfixer.model import FLOW_DTYPE, FlowRecord, batch_to_records
from ipfixer.templates import Template
from ipfixer.wire.fastpath import BatchEncoder

Protocol = ProtocolName
MAX_MESSAGE_SIZE = 65535  # RFC 7011 3.1 / RFC 3954 length fields are 16 bits (v9 has none, UDP has)
TemplateRef = str | int | Template
OptionsItems = Sequence[tuple[TemplateRef, Sequence[Mapping[str, object]]]]

__all__ = ["MAX_MESSAGE_SIZE", "V9_SUBSTITUTES", "ExportSession", "Message", "SessionStats", "netflow9_template"]


@dataclass
class SessionStats:
    """What this session has produced (messages are counted when built, not when sent)."""

    messages: int = 0
    records: int = 0  # Data Records, flow and options (not template records)
    flow_records: int = 0
    options_records: int = 0
    bytes: int = 0
    template_refreshes: int = 0  # messages carrying the data Template Sets
    records_not_exported: int = 0  # rows with no template for their ethertype, or too big to send
    utf8_messages: int = 0  # messages that stayed valid UTF-8 (no room for the templates that break it)


@dataclass(frozen=True, slots=True)
class Message:
    """One complete IPFIX Message / v9 Export Packet and what it carries."""

    data: bytes
    records: int  # Data Records in it
    template_records: int
    has_templates: bool  # carries the data Template Sets
    options: bool = False  # carries options data (and the Options Template Sets)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ExportSession:
    """One Exporting Process -> Collector session over UDP (one Observation Domain / v9 source id)."""

    def __init__(
        self,
        protocol: Protocol,
        domain_id: int,
        data_templates: Mapping[int, Template],
        options_templates: Sequence[Template] = (),
        max_message_size: int = 1452,
        template_refresh_s: float = 30.0,
        template_refresh_messages: int = 20,
        *,
        boot_wall_ns: int,
        infomodel: InfoModel | None = None,
    ) -> None:
        """Validate everything that can be known before the first flow (mapping, sizes, v9 form)."""
        self.dialect: Dialect = dialect_for(protocol)
        if not 0 <= domain_id < UINT32:
            raise EncodeError(f"observation domain / source id {domain_id} does not fit 32 bits")
        self.protocol: Protocol = self.dialect.name
        self.domain_id = domain_id
        self.max_message_size = max_message_size
        self.template_refresh_ns = int(template_refresh_s * 1e9)  # <= 0: no time-based refresh
        self.template_refresh_messages = template_refresh_messages  # <= 0: no count-based refresh
        self.boot_wall_ns = boot_wall_ns
        self.stats = SessionStats()
        self.v9_dropped: dict[int, list[str]] = {}  # template id -> enterprise fields v9 cannot carry
        d = self.dialect

        # Wire templates: the IPFIX ones, or their v9 form (netflow9_template).
        self._data_by_ethertype: dict[int, Template] = {}
        self._data_templates: dict[int, Template] = {}
        for ethertype, t in data_templates.items():
            if t.is_options:
                raise EncodeError(f"template {t.template_id} ({t.name}) is an options template, not data")
            wire_t = self._data_templates.get(t.template_id)
            if wire_t is None:
                check_mapped(t, fast_path=False)
                wire_t = self._wire_template(t, infomodel)
                self._data_templates[t.template_id] = wire_t
            self._data_by_ethertype[ethertype] = wire_t
        self._options_templates: dict[int, Template] = {}
        for t in options_templates:
            if not t.is_options:
                raise EncodeError(f"template {t.template_id} ({t.name}) has no scope: not an options template")
            self._options_templates[t.template_id] = self._wire_template(t, infomodel)
        ids = list(self._data_templates) + list(self._options_templates)
        if len(set(ids)) != len(ids):
            raise EncodeError(f"template ids used twice in one session: {sorted(ids)}")
        self._encoders = {  # the batch fast path, for fixed-length templates whose fields all have columns
            tid: BatchEncoder(t)
            for tid, t in self._data_templates.items()
            if t.record_length is not None and fast_path_ok(t)
        }

        if not d.header_len + d.set_header_len < max_message_size <= MAX_MESSAGE_SIZE:
            raise EncodeError(f"max_message_size {max_message_size} out of range")
        self._builder = MessageBuilder(max_message_size, d.header_len, d.set_header_len, d.pad_to, d.data_set)
        self._template_sets = d.template_sets(list(self._data_templates.values()))
        self._options_sets = d.options_template_sets(list(self._options_templates.values()))
        for what, sets in (("template sets", self._template_sets), ("options template sets", self._options_sets)):
            size = d.header_len + sum(len(s) for s in sets)
            if size > max_message_size:
                raise EncodeError(f"the {what} ({size} bytes) do not fit max_message_size {max_message_size}")
        for t in [*self._data_templates.values(), *self._options_templates.values()]:
            need = d.header_len + d.set_header_len + padded(t.min_record_length, d.pad_to)
            if t.is_options:
                need += sum(len(s) for s in self._options_sets)
            if need > max_message_size:
                raise EncodeError(f"template {t.template_id} ({t.name}): a record needs {need} bytes, more "
                                  f"than max_message_size {max_message_size}")

        self._sequence = 0  # IPFIX: data records sent before; v9: packets sent before
        self._last_templates_ns: int | None = None
        self._messages_since_templates = 0

    def _wire_template(self, t: Template, infomodel: InfoModel | None) -> Template:
        wire_t, dropped = self.dialect.wire_template(t, infomodel)
        if dropped:
            self.v9_dropped[t.template_id] = dropped
        return wire_t

    # -- public API ----------------------------------------------------------------------------
    @property
    def data_templates(self) -> dict[int, Template]:
        """The templates on the wire (v9 form for netflow9), by template id."""
        return dict(self._data_templates)

    @property
    def options_templates(self) -> dict[int, Template]:
        """The options templates on the wire, by template id."""
        return dict(self._options_templates)

    @property
    def sequence(self) -> int:
        """The sequence number the next message will carry."""
        return self._sequence

    def templates_due(self, now_wall_ns: int) -> bool:
        """True when the next flow message must carry the data Template Sets (RFC 7011 8.4, RFC 3954 7)."""
        if self._last_templates_ns is None:
            return True
        if self.template_refresh_messages > 0 and self._messages_since_templates >= self.template_refresh_messages:
            return True
        if self.template_refresh_ns > 0:
            elapsed = now_wall_ns - self._last_templates_ns
            return elapsed < 0 or elapsed >= self.template_refresh_ns  # a wall clock step back refreshes
        return False

    def reset(self) -> None:
        """Templates go out again with the next message: after reconnecting, or after a send failed (a
        collector that refused a message may be one that restarted and has no templates)."""
        self._last_templates_ns = None

    def messages(
        self, batch: np.ndarray, now_wall_ns: int, interface_names: Mapping[int, str] | None = None
    ) -> list[Message]:
        """Encode a FLOW_DTYPE batch into complete messages (fast path where the template allows)."""
        return list(self.iter_messages(batch, now_wall_ns, interface_names))

    def iter_messages(
        self, batch: np.ndarray, now_wall_ns: int, interface_names: Mapping[int, str] | None = None
    ) -> Iterator[Message]:
        """Like messages(), built one at a time, so a reset() between two takes effect at the next one.

        `interface_names` (ifindex -> name) fills interfaceName (IE 82) of data templates that list it."""
        if batch.dtype != FLOW_DTYPE:
            raise EncodeError(f"batch dtype is not FLOW_DTYPE: {batch.dtype}")
        instant = self.dialect.instant(now_wall_ns, self.boot_wall_ns)
        queues: list[RecordQueue] = []
        exported = 0
        boot_ms = self.boot_wall_ns // 1_000_000
        et = batch["ethertype"]
        for tid, t in self._data_templates.items():
            ethertypes = [e for e, tt in self._data_by_ethertype.items() if tt.template_id == tid]
            mask = np.isin(et, ethertypes)
            rows = batch if mask.all() else batch[mask]  # one family (the usual case): no copy
            if len(rows) == 0:
                continue
            exported += len(rows)
            enc = self._encoders.get(tid)
            if enc is None:  # variable-length or per-record fields (interfaceName): per-record path
                names = dict(interface_names) if interface_names else None
                queues.append(self._encode_records(t, batch_to_records(rows, names), instant))
                continue
            cols = flow_columns(rows, t, sys_boot_ms=boot_ms, sys_now_ms=instant.cap_ms)
            queues.append(RecordQueue(tid, blob=enc.encode(cols, len(rows)), length=enc.record_length))
        self.stats.records_not_exported += len(batch) - exported
        return self._flow_messages(queues, now_wall_ns, instant)

    def record_messages(
        self, records: Sequence[FlowRecord], now_wall_ns: int, interface_namer: Callable[[int], str] | None = None
    ) -> list[Message]:
        """Encode FlowRecords one by one with construct (the path for variable-length fields)."""
        instant = self.dialect.instant(now_wall_ns, self.boot_wall_ns)
        by_tid: dict[int, list[FlowRecord]] = {}
        for r in records:
            t = self._data_by_ethertype.get(r.ethertype)
            if t is None:
                self.stats.records_not_exported += 1
            else:
                by_tid.setdefault(t.template_id, []).append(r)
        queues = [
            self._encode_records(t, by_tid[tid], instant, interface_namer)
            for tid, t in self._data_templates.items()
            if by_tid.get(tid)
        ]
        return list(self._flow_messages(queues, now_wall_ns, instant))

    def options_messages(self, items: OptionsItems, now_wall_ns: int) -> list[Message]:
        """The Options Data Records of one refresh (RFC 7011 4), all in one message when they fit, each
        message starting with the Options Template Sets and carrying no flow data."""
        queues = []
        for template, values_list in items:
            t = self.options_template(template)
            recs = [self.dialect.encode_records(t, [{f.name: v[f.name] for f in t.fields if f.name in v}])
                    for v in values_list]
            if recs:
                queues.append(RecordQueue(t.template_id, items=recs))
        instant = self.dialect.instant(now_wall_ns, self.boot_wall_ns)
        out: list[Message] = []
        while any(q.remaining() for q in queues):
            filled = self._builder.fill(queues, self._options_sets, lead_is_optional=False)
            self.stats.records_not_exported += filled.skipped
            if filled.n_records == 0:
                continue  # only records too large for any message were left
            out.append(self._finish(filled.sets, filled.n_records, instant, now_wall_ns, options=True,
                                    n_templates=len(self._options_templates)))
        return out

    def options_template(self, template: TemplateRef) -> Template:
        """Find one of this session's options templates by name, id or object."""
        for t in self._options_templates.values():
            if (
                template == t.name
                or template == t.template_id
                or (isinstance(template, Template) and template.template_id == t.template_id)
            ):
                return t
        names = ", ".join(f"{t.template_id} ({t.name})" for t in self._options_templates.values())
        raise EncodeError(f"no options template {template!r} in this session (have: {names or 'none'})")

    def has_options_template(self, template: TemplateRef) -> bool:
        """True when options_template() would find it."""
        try:
            self.options_template(template)
        except EncodeError:
            return False
        return True

    def template_messages(self, now_wall_ns: int, force: bool = False) -> list[Message]:
        """A data-templates-only message when a refresh is due (or forced): keeps an idle session
        decodable by a collector that restarted (RFC 7011 8.4)."""
        if not (force or self.templates_due(now_wall_ns)) or not self._template_sets:
            return []
        instant = self.dialect.instant(now_wall_ns, self.boot_wall_ns)
        return [self._finish(list(self._template_sets), 0, instant, now_wall_ns, templates=True)]

    # -- packing -------------------------------------------------------------------------------
    def _encode_records(
        self, t: Template, records: Sequence[FlowRecord], instant: ExportInstant,
        interface_namer: Callable[[int], str] | None = None,
    ) -> RecordQueue:
        boot_ms = self.boot_wall_ns // 1_000_000
        items = [
            self.dialect.encode_records(t, [flow_values(r, t, sys_boot_ms=boot_ms, sys_now_ms=instant.cap_ms,
                                                        interface_namer=interface_namer)])
            for r in records
        ]
        return RecordQueue(t.template_id, items=items)

    def _flow_messages(self, queues: list[RecordQueue], now: int, instant: ExportInstant) -> Iterator[Message]:
        """Fill messages in order: [data Template Sets if due] + as many whole records as fit."""
        skip_templates = False  # after a templates-only message, the next one must make progress
        left = sum(q.remaining() for q in queues)
        while left > 0:
            with_templates = not skip_templates and self.templates_due(now)
            lead = self._template_sets if with_templates else []
            filled = self._builder.fill(queues, lead)
            left -= filled.n_records + filled.skipped
            self.stats.records_not_exported += filled.skipped
            if not filled.sets:
                continue  # only records too large for any message were left
            yield self._finish(filled.sets, filled.n_records, instant, now, templates=with_templates)
            skip_templates = with_templates and filled.n_records == 0

    def _body(self, sets: list[bytes], with_templates: bool) -> tuple[bytes, bool]:
        """The message body (all sets), made not valid UTF-8 by adding the data Template Sets when it would
        be (python-netflow 0.12 parses a UTF-8 datagram as a hex dump and stops); and whether the data
        Template Sets are in it.

        The body alone decides, not the header: its time and sequence bytes vary from message to message,
        so a valid UTF-8 body could make a valid message at another instant.  A body that starts with an
        ASCII byte (a set id < 0x8000) and holds an invalid sequence makes every message around it
        invalid, since nothing follows the body to complete a sequence."""
        body = b"".join(sets)
        if with_templates or not _is_utf8(body):
            return body, with_templates
        tsets = b"".join(self._template_sets)
        if tsets and self.dialect.header_len + len(tsets) + len(body) <= self.max_message_size:
            body, with_templates = tsets + body, True
        if _is_utf8(body):  # no room, or templates that do not break it (custom all-ASCII templates)
            self.stats.utf8_messages += 1
        return body, with_templates

    def _finish(
        self, sets: list[bytes], n_records: int, instant: ExportInstant, now: int, *, templates: bool = False,
        options: bool = False, n_templates: int = 0,
    ) -> Message:
        """Add the header and advance sequence and refresh state."""
        body, with_data_templates = self._body(sets, templates)
        if with_data_templates:
            n_templates += len(self._data_templates)
        # Data templates added to an options message (to break UTF-8) do not count as a refresh: a
        # collector that drops that message for its options templates would miss them.
        templates = templates or (with_data_templates and not options)
        data = self.dialect.message(instant, self._sequence, self.domain_id, n_templates, n_records, [body])
        self._sequence = self.dialect.next_sequence(self._sequence, n_records)
        if len(data) > self.max_message_size:  # packing arithmetic guarantees this; keep it honest
            raise EncodeError(f"internal: message of {len(data)} bytes exceeds {self.max_message_size}")
        if templates:
            self._last_templates_ns = now
            self._messages_since_templates = 0
            self.stats.template_refreshes += 1
        if not options:
            self._messages_since_templates += 1
        st = self.stats
        st.messages += 1
        st.records += n_records
        if options:
            st.options_records += n_records
        else:
            st.flow_records += n_records
        st.bytes += len(data)
        return Message(data, n_records, n_templates, with_data_templates, options)
