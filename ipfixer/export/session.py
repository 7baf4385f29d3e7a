"""Sans-I/O export session for one Collector: sequence numbers, template refresh, message packing.

It takes a batch (or records) and `now`, and returns complete messages: never larger than
max_message_size (RFC 7011 10.3.3: a message fits the path MTU), never splitting a Data Record, with
the Template Sets first in the first message and again whenever the refresh interval (seconds or
messages) is due (RFC 7011 8.4 over UDP; RFC 3954 7).  No socket and no clock are touched here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ipfixer.errors import EncodeError
from ipfixer.export.mapping import check_mapped, flow_columns, flow_values
from ipfixer.infomodel import InfoModel
from ipfixer.model import FLOW_DTYPE, FlowRecord, batch_to_records
from ipfixer.templates import Template, TemplateField
from ipfixer.wire import ipfix, netflow9
from ipfixer.wire.fastpath import BatchEncoder

Protocol = Literal["ipfix", "netflow9"]
UINT32 = 1 << 32
MAX_MESSAGE_SIZE = 65535  # RFC 7011 3.1 / RFC 3954 length fields are 16 bits (v9 has none, UDP has)

# RFC 3954 8: v9 collectors expect sysUptime-relative FIRST_SWITCHED(22) / LAST_SWITCHED(21); IANA
# names those ids flowStartSysUpTime / flowEndSysUpTime.  Absolute-ms fields of the IPFIX template are
# replaced by them in the v9 template.  v9 has one ICMP_TYPE (32) for both families: nfdump 1.7 shows
# ICMPv6 type 0 when it gets 139 in v9, so 139 is sent as 32 (same value: type*256+code).
V9_SUBSTITUTES: Mapping[str, str] = {
    "flowStartMilliseconds": "flowStartSysUpTime",
    "flowEndMilliseconds": "flowEndSysUpTime",
    "icmpTypeCodeIPv6": "icmpTypeCodeIPv4",
}


def netflow9_template(template: Template, infomodel: InfoModel | None = None) -> tuple[Template, list[str]]:
    """The v9 form of an IPFIX template, and the names of the fields v9 cannot carry (dropped).

    flowStart/EndMilliseconds become FIRST/LAST_SWITCHED (sysUptime-relative ms, RFC 3954 8), the way
    v9 collectors read times, and icmpTypeCodeIPv6 becomes ICMP_TYPE (32); enterprise-specific elements are dropped because a v9 Template FlowSet
    has no enterprise bit (RFC 3954 5.2); variable-length fields do not exist in v9 (EncodeError)."""
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


@dataclass
class SessionStats:
    """What this session has produced (messages are counted when built, not when sent)."""

    messages: int = 0
    records: int = 0  # Data Records, flow and options (not template records)
    flow_records: int = 0
    options_records: int = 0
    bytes: int = 0
    template_refreshes: int = 0  # messages carrying the Template Sets
    records_not_exported: int = 0  # rows with no template for their ethertype, or too big to send


@dataclass(frozen=True, slots=True)
class Message:
    """One complete IPFIX Message / v9 Export Packet and what it carries."""

    data: bytes
    records: int  # Data Records in it
    template_records: int
    has_templates: bool


class _Records:
    """Encoded Data Records of one template waiting to be packed (fixed length or a list)."""

    def __init__(self, set_id: int, blob: bytes = b"", length: int = 0, items: Sequence[bytes] = ()) -> None:
        self.set_id = set_id
        self._blob, self._len, self._items = blob, length, list(items)
        self._pos = 0  # next record index

    def remaining(self) -> int:
        if self._len:
            return len(self._blob) // self._len - self._pos
        return len(self._items) - self._pos

    def take(self, budget: int, pad_to: int) -> tuple[bytes, int]:
        """As many whole records as fit in `budget` bytes once padded to `pad_to`."""
        if self._len:
            n = min(self.remaining(), budget // self._len)
            while n > 0 and _padded(n * self._len, pad_to) > budget:
                n -= 1
            start = self._pos * self._len
            self._pos += n
            return self._blob[start : start + n * self._len], n
        size = 0
        n = 0
        while self._pos + n < len(self._items):
            nxt = size + len(self._items[self._pos + n])
            if _padded(nxt, pad_to) > budget:
                break
            size, n = nxt, n + 1
        out = b"".join(self._items[self._pos : self._pos + n])
        self._pos += n
        return out, n

    def skip_one(self) -> None:
        self._pos += 1


def _padded(n: int, pad_to: int) -> int:
    return n + (-n) % pad_to if pad_to > 1 else n


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
        if protocol not in ("ipfix", "netflow9"):
            raise EncodeError(f"unknown export protocol {protocol!r} (ipfix or netflow9)")
        if not 0 <= domain_id < UINT32:
            raise EncodeError(f"observation domain / source id {domain_id} does not fit 32 bits")
        self.protocol: Protocol = protocol
        self.domain_id = domain_id
        self.max_message_size = max_message_size
        self.template_refresh_ns = int(template_refresh_s * 1e9)  # <= 0: no time-based refresh
        self.template_refresh_messages = template_refresh_messages  # <= 0: no count-based refresh
        self.boot_wall_ns = boot_wall_ns
        self.stats = SessionStats()
        self.v9_dropped: dict[int, list[str]] = {}  # template id -> enterprise fields v9 cannot carry
        v9 = protocol == "netflow9"
        self._header_len = netflow9.PACKET_HEADER_LEN if v9 else ipfix.MESSAGE_HEADER_LEN
        self._set_header_len = 4  # RFC 7011 3.3.2 / RFC 3954 5.2: id + length
        # RFC 3954 5.3: FlowSets padded to 32 bits; IPFIX padding is optional (RFC 7011 3.3.1) and we
        # send none, so no padding can ever be mistaken for a record.
        self._pad_to = 4 if v9 else 1

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
        self._encoders = {
            tid: BatchEncoder(t) for tid, t in self._data_templates.items() if t.record_length is not None
        }

        if not self._header_len + self._set_header_len < max_message_size <= MAX_MESSAGE_SIZE:
            raise EncodeError(f"max_message_size {max_message_size} out of range")
        self._template_sets, self._template_record_count = self._encode_template_sets()
        tsize = self._header_len + sum(len(s) for s in self._template_sets)
        if tsize > max_message_size:
            raise EncodeError(f"the template sets ({tsize} bytes) do not fit max_message_size {max_message_size}")
        for t in [*self._data_templates.values(), *self._options_templates.values()]:
            need = self._header_len + self._set_header_len + _padded(t.min_record_length, self._pad_to)
            if need > max_message_size:
                raise EncodeError(f"template {t.template_id} ({t.name}): a record needs {need} bytes, more "
                                  f"than max_message_size {max_message_size}")

        self._sequence = 0  # IPFIX: data records sent before; v9: packets sent before
        self._last_templates_ns: int | None = None
        self._messages_since_templates = 0

    # -- construction helpers ------------------------------------------------------------------
    def _wire_template(self, t: Template, infomodel: InfoModel | None) -> Template:
        if self.protocol != "netflow9":
            return t
        v9_t, dropped = netflow9_template(t, infomodel)
        if dropped:
            self.v9_dropped[t.template_id] = dropped
        return v9_t

    def _encode_template_sets(self) -> tuple[list[bytes], int]:
        """All (Options) Template Sets, sent together on every refresh (RFC 7011 8.4, RFC 3954 7)."""
        data = list(self._data_templates.values())
        opts = list(self._options_templates.values())
        sets: list[bytes] = []
        if self.protocol == "ipfix":
            if data:
                sets.append(ipfix.encode_template_set(data))
            if opts:
                sets.append(ipfix.encode_options_template_set(opts))
        else:
            if data:
                sets.append(netflow9.encode_template_flowset(data))
            if opts:
                sets.append(netflow9.encode_options_template_flowset(opts))
        return sets, len(data) + len(opts)

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
        """True when the next message must carry the Template Sets (RFC 7011 8.4, RFC 3954 7)."""
        if self._last_templates_ns is None:
            return True
        if self.template_refresh_messages > 0 and self._messages_since_templates >= self.template_refresh_messages:
            return True
        if self.template_refresh_ns > 0:
            elapsed = now_wall_ns - self._last_templates_ns
            return elapsed < 0 or elapsed >= self.template_refresh_ns  # a wall clock step back refreshes
        return False

    def reset(self) -> None:
        """Start a new session (e.g. after reconnecting): templates go out again with the next message."""
        self._last_templates_ns = None

    def datagrams(self, batch: np.ndarray, now_wall_ns: int) -> list[bytes]:
        """Encode a FLOW_DTYPE batch (fast path) into complete messages."""
        return [m.data for m in self.messages(batch, now_wall_ns)]

    def messages(self, batch: np.ndarray, now_wall_ns: int) -> list[Message]:
        """Like datagrams(), with each message's record counts (for the exporter's not-sent counts)."""
        if batch.dtype != FLOW_DTYPE:
            raise EncodeError(f"batch dtype is not FLOW_DTYPE: {batch.dtype}")
        groups: list[_Records] = []
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
            if enc is None:  # variable-length fields: per-record path
                groups.append(self._encode_records(t, batch_to_records(rows)))
                continue
            blob = enc.encode(flow_columns(rows, t, sys_boot_ms=boot_ms), len(rows))
            groups.append(_Records(tid, blob=blob, length=enc.record_length))
        self.stats.records_not_exported += len(batch) - exported
        return self._pack(groups, now_wall_ns, options=False)

    def datagrams_from_records(self, records: Sequence[FlowRecord], now_wall_ns: int) -> list[bytes]:
        """Encode FlowRecords one by one with construct (needed for variable-length fields)."""
        return [m.data for m in self.record_messages(records, now_wall_ns)]

    def record_messages(self, records: Sequence[FlowRecord], now_wall_ns: int) -> list[Message]:
        """Like datagrams_from_records(), with record counts per message."""
        groups: list[_Records] = []
        by_tid: dict[int, list[FlowRecord]] = {}
        for r in records:
            t = self._data_by_ethertype.get(r.ethertype)
            if t is None:
                self.stats.records_not_exported += 1
            else:
                by_tid.setdefault(t.template_id, []).append(r)
        for tid, t in self._data_templates.items():
            if by_tid.get(tid):
                groups.append(self._encode_records(t, by_tid[tid]))
        return self._pack(groups, now_wall_ns, options=False)

    def options_datagrams(
        self, template: str | int | Template, values_list: Sequence[Mapping[str, Any]], now_wall_ns: int
    ) -> list[bytes]:
        """Options Data Records (exporter statistics, sampling) as complete messages (RFC 7011 4)."""
        return [m.data for m in self.options_messages(template, values_list, now_wall_ns)]

    def options_messages(
        self, template: str | int | Template, values_list: Sequence[Mapping[str, Any]], now_wall_ns: int
    ) -> list[Message]:
        """Like options_datagrams(), with record counts per message."""
        t = self.options_template(template)
        enc = ipfix.encode_data_records if self.protocol == "ipfix" else netflow9.encode_data_records
        items = []
        for values in values_list:
            items.append(enc(t, [{f.name: values[f.name] for f in t.fields if f.name in values}]))
        return self._pack([_Records(t.template_id, items=items)], now_wall_ns, options=True)

    def options_template(self, template: str | int | Template) -> Template:
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

    def template_datagrams(self, now_wall_ns: int, force: bool = False) -> list[bytes]:
        """A templates-only message when a refresh is due (or forced): keeps an idle session decodable
        by a collector that restarted (RFC 7011 8.4)."""
        return [m.data for m in self.template_messages(now_wall_ns, force)]

    def template_messages(self, now_wall_ns: int, force: bool = False) -> list[Message]:
        """Like template_datagrams()."""
        if not (force or self.templates_due(now_wall_ns)):
            return []
        self._last_templates_ns = None
        return self._pack([], now_wall_ns, options=False, templates_only=True)

    # -- packing -------------------------------------------------------------------------------
    def _encode_records(self, t: Template, records: Sequence[FlowRecord]) -> _Records:
        enc = ipfix.encode_data_records if self.protocol == "ipfix" else netflow9.encode_data_records
        boot_ms = self.boot_wall_ns // 1_000_000
        items = [enc(t, [flow_values(r, t, sys_boot_ms=boot_ms)]) for r in records]
        return _Records(t.template_id, items=items)

    def _pack(
        self, groups: list[_Records], now: int, *, options: bool, templates_only: bool = False
    ) -> list[Message]:
        """Fill messages in order: [Template Sets if due] + as many whole records as fit."""
        out: list[Message] = []
        gi = 0
        skip_templates = False  # after a templates-only message, the next one must make progress
        while templates_only or gi < len(groups):
            sets: list[bytes] = []
            size = self._header_len
            with_templates = not skip_templates and self.templates_due(now)
            if with_templates:
                sets.extend(self._template_sets)
                size += sum(len(s) for s in self._template_sets)
            n_records = 0
            while gi < len(groups):
                g = groups[gi]
                budget = self.max_message_size - size - self._set_header_len
                body, n = g.take(budget, self._pad_to)
                if n:
                    s = self._data_set(g.set_id, body)
                    sets.append(s)
                    size += len(s)
                    n_records += n
                if g.remaining() == 0:
                    gi += 1
                    continue
                if n == 0 and not sets:  # one variable-length record larger than a message: drop it
                    g.skip_one()
                    self.stats.records_not_exported += 1
                    continue
                break  # message full
            if not sets:
                break
            out.append(self._finish(sets, n_records, with_templates, now, options))
            skip_templates = with_templates and n_records == 0
            if templates_only:
                break
        return out

    def _v9_sys_uptime_ms(self, now: int) -> int:
        """sysUptime taken at the same whole second as UNIX Secs.

        Collectors rebuild absolute times as unix_secs*1000 - sysUptime + FIRST_SWITCHED (RFC 3954 5.1
        has no sub-second export time); measuring uptime at the truncated second makes that exact to
        the millisecond instead of up to 999 ms early."""
        now_ms = (now // 1_000_000_000) * 1000
        return max(0, now_ms - self.boot_wall_ns // 1_000_000) % UINT32

    def _data_set(self, set_id: int, body: bytes) -> bytes:
        if self.protocol == "ipfix":
            return ipfix.encode_data_set(set_id, body, pad_to=self._pad_to)
        return netflow9.encode_data_flowset(set_id, body, pad_to=self._pad_to)

    def _finish(self, sets: list[bytes], n_records: int, with_templates: bool, now: int, options: bool) -> Message:
        """Add the header and advance sequence and refresh state."""
        n_templates = self._template_record_count if with_templates else 0
        if self.protocol == "ipfix":
            # RFC 7011 3.1: Export Time in seconds; Sequence Number = Data Records sent before this
            # message in this Observation Domain, mod 2^32 (template records are not counted, 10.3.2).
            data = ipfix.encode_message(
                export_time=(now // 1_000_000_000) % UINT32,
                sequence=self._sequence,
                domain_id=self.domain_id,
                sets=sets,
            )
            self._sequence = (self._sequence + n_records) % UINT32
        else:
            # RFC 3954 5.1: Count = all records (template + data); Sequence = export packets sent
            # before; sysUptime = ms since the exporter booted; UNIX Secs = now.
            data = netflow9.encode_packet(
                sys_uptime_ms=self._v9_sys_uptime_ms(now),
                unix_secs=(now // 1_000_000_000) % UINT32,
                sequence=self._sequence,
                source_id=self.domain_id,
                count=n_templates + n_records,
                flowsets=sets,
            )
            self._sequence = (self._sequence + 1) % UINT32
        if len(data) > self.max_message_size:  # packing arithmetic guarantees this; keep it honest
            raise EncodeError(f"internal: message of {len(data)} bytes exceeds {self.max_message_size}")
        if with_templates:
            self._last_templates_ns = now
            self._messages_since_templates = 0
            self.stats.template_refreshes += 1
        self._messages_since_templates += 1
        st = self.stats
        st.messages += 1
        st.records += n_records
        if options:
            st.options_records += n_records
        else:
            st.flow_records += n_records
        st.bytes += len(data)
        return Message(data, n_records, n_templates, with_templates)
