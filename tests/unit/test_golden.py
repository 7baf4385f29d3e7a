"""Golden bytes: encoders reproduce hand-checked RFC layouts in tests/golden/*.hex, decoder reads them."""

from __future__ import annotations

import ipaddress
import os
import re
import struct
from pathlib import Path

import pytest

from ipfixer.errors import EncodeError
from ipfixer.export.dialect import V9_SUBSTITUTES, dialect_for
from ipfixer.infomodel import InfoModel
from ipfixer.templates import DEFAULT_TEMPLATES_DIR, Template, TemplateField, load_template_file
from ipfixer.wire import ipfix, netflow9
from ipfixer.wire.decode import Decoder

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
IM = InfoModel.load_default()


def golden(name: str) -> bytes:
    """Hex digits of a golden file; '#' starts a comment, whitespace is ignored."""
    text = (GOLDEN / name).read_text()
    first = text.splitlines()[0]
    assert first.startswith("# RFC"), f"{name} must name the RFC section it reproduces"
    return bytes.fromhex(re.sub(r"\s+", "", re.sub(r"#.*", "", text)))


def tmpl(tid: int, *fields: tuple[str, int], scope: int = 0) -> Template:
    return Template(tid, f"t{tid}", tuple(TemplateField(IM.by_name(n), n_) for n, n_ in fields), scope)


A2 = tmpl(256, ("sourceIPv4Address", 4), ("destinationIPv4Address", 4), ("ipNextHopIPv4Address", 4),
          ("packetDeltaCount", 4), ("octetDeltaCount", 4))  # fmt: skip
A3_RECORDS = [
    {"sourceIPv4Address": "192.0.2.12", "destinationIPv4Address": "192.0.2.254",
     "ipNextHopIPv4Address": "192.0.2.1", "packetDeltaCount": 5009, "octetDeltaCount": 5344385},
    {"sourceIPv4Address": "192.0.2.27", "destinationIPv4Address": "192.0.2.23",
     "ipNextHopIPv4Address": "192.0.2.2", "packetDeltaCount": 748, "octetDeltaCount": 388934},
    {"sourceIPv4Address": "192.0.2.56", "destinationIPv4Address": "192.0.2.65",
     "ipNextHopIPv4Address": "192.0.2.3", "packetDeltaCount": 5, "octetDeltaCount": 6534},
]  # fmt: skip
SAMPLING = tmpl(259, ("observationDomainId", 4), ("samplingInterval", 4), ("samplingAlgorithm", 1), scope=1)


def test_every_golden_file_names_its_rfc() -> None:
    files = sorted(GOLDEN.glob("*.hex"))
    assert len(files) >= 7
    for f in files:
        golden(f.name)


def test_template_set_a21() -> None:
    assert ipfix.encode_template_set([A2]) == golden("rfc7011_a2_template_set.hex")


def test_data_set_a3() -> None:
    records = ipfix.encode_data_records(A2, A3_RECORDS)
    assert ipfix.encode_data_set(256, records) == golden("rfc7011_a3_data_set.hex")


def test_message_header() -> None:
    sets = [
        ipfix.encode_template_set([A2]),
        ipfix.encode_data_set(256, ipfix.encode_data_records(A2, A3_RECORDS)),
    ]
    assert ipfix.encode_message(1700000000, 0, 12345678, sets) == golden("rfc7011_3_1_message.hex")


def test_options_template_set() -> None:
    assert ipfix.encode_options_template_set([SAMPLING]) == golden("rfc7011_3_4_2_options_template_set.hex")


def test_enterprise_field_specifier() -> None:
    t = Template(
        260, "e", (TemplateField(IM.by_name("sourceIPv4Address"), 4), TemplateField(IM.by_name("ctState"), 1))
    )
    assert ipfix.encode_template_set([t]) == golden("rfc7011_3_2_enterprise_field.hex")


def test_netflow9_packet() -> None:
    flowsets = [
        netflow9.encode_template_flowset([A2]),
        netflow9.encode_data_flowset(256, netflow9.encode_data_records(A2, A3_RECORDS)),
    ]
    assert netflow9.encode_packet(5000, 1700000000, 1, 7, 4, flowsets) == golden("rfc3954_5_packet.hex")


def test_netflow9_options_template() -> None:
    assert netflow9.encode_options_template_flowset([SAMPLING]) == golden(
        "rfc3954_6_1_options_template_flowset.hex"
    )


@pytest.mark.parametrize("name", ["rfc7011_3_1_message.hex", "rfc3954_5_packet.hex"])
def test_decoder_reads_golden(name: str) -> None:
    msg = Decoder().feed(golden(name))
    assert [t.template_id for t in msg.templates] == [256]
    assert [r.fields["octetDeltaCount"] for r in msg.records] == [5344385, 388934, 6534]
    assert msg.records[0].fields["ipNextHopIPv4Address"] == ipaddress.IPv4Address("192.0.2.1")
    assert msg.domain_id == (12345678 if msg.version == 10 else 7)


# --- the shipped templates (templates/*.yaml) as ipfixer sends them --------------------------------
# One golden file per template and protocol: tests/golden/template_<id>_<name>.<protocol>.hex, the
# Template Set (or Options Template Set / v9 FlowSet) the export dialect builds, annotated field by
# field from an independent reading of the bytes.  A template change shows as a reviewed diff; rewrite
# them on purpose with  IPFIXER_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_golden.py

REGEN = os.environ.get("IPFIXER_REGEN_GOLDEN") == "1"
SHIPPED = {p.stem: load_template_file(p, IM) for p in sorted(DEFAULT_TEMPLATES_DIR.glob("*.yaml"))}
V9_SCOPE_NAMES = {1: "System", 2: "Interface", 3: "Line Card", 4: "Cache", 5: "Template"}  # RFC 3954 6.1


def golden_name(t: Template, protocol: str) -> str:
    return f"template_{t.template_id}_{t.name}.{protocol}.hex"


def wire_sets(protocol: str, t: Template) -> tuple[bytes, list[str]]:
    """The (Options) Template Set(s) the export dialect sends for `t`, and the fields it dropped."""
    dialect = dialect_for(protocol)
    wt, dropped = dialect.wire_template(t, IM)
    sets = dialect.options_template_sets([wt]) if wt.is_options else dialect.template_sets([wt])
    return b"".join(sets), dropped


Spec = tuple[int, int, int]  # (element id or v9 type/scope type, PEN, length)


def read_sets(protocol: str, data: bytes) -> tuple[list[tuple[str, str]], list[tuple[int, int, list[Spec]]]]:
    """Hand-written reading of template sets (RFC 7011 3.3.2, 3.4.1, 3.4.2.2; RFC 3954 5.2, 6.1), apart
    from the encoder: (hex, comment) lines for the golden file and (template id, scope count, field
    specifiers) per record."""
    lines: list[tuple[str, str]] = []
    records: list[tuple[int, int, list[Spec]]] = []
    at = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal at
        values = struct.unpack_from(fmt, data, at)
        at += struct.calcsize(fmt)
        return values

    def hexed(start: int) -> str:
        raw = data[start:at].hex()
        return " ".join(raw[i:i + 4] for i in range(0, len(raw), 4))

    def field(scope_v9: bool = False) -> Spec:
        start = at
        ie, length = take("!HH")
        pen = take("!I")[0] if protocol == "ipfix" and ie & 0x8000 else 0
        ie &= 0x7FFF if protocol == "ipfix" else 0xFFFF
        if scope_v9:
            what = f"scope {V9_SCOPE_NAMES.get(ie, '?')} ({ie})"
        else:
            e = IM.by_id(ie, pen)
            what = (e.name if e else "unknown") + (f" ({ie}, enterprise {pen})" if pen else f" ({ie})")
        size = "variable length (RFC 7011 7)" if length == 0xFFFF else str(length)
        lines.append((hexed(start), f"{what}, {size}"))
        return ie, pen, length

    while at < len(data):
        start = at
        set_id, set_len = take("!HH")
        end = start + set_len
        kinds = {("ipfix", 2): "Template Set", ("ipfix", 3): "Options Template Set",
                 ("netflow9", 0): "Template FlowSet", ("netflow9", 1): "Options Template FlowSet"}  # fmt: skip
        lines.append((hexed(start), f"{kinds.get((protocol, set_id), '?')} (ID {set_id}), Length {set_len}"))
        while at + 4 <= end:
            start = at
            if (protocol, set_id) == ("ipfix", 3):
                tid, count, scope = take("!HHH")
                lines.append((hexed(start), f"Template ID {tid}, Field Count {count}, Scope Field Count {scope}"))
                records.append((tid, scope, [field() for _ in range(count)]))
            elif (protocol, set_id) == ("netflow9", 1):
                tid, scope_len, opt_len = take("!HHH")
                lines.append((hexed(start), f"Template ID {tid}, Option Scope Length {scope_len}, "
                                            f"Option Length {opt_len}"))
                specs = [field(scope_v9=True) for _ in range(scope_len // 4)]
                records.append((tid, scope_len // 4, specs + [field() for _ in range(opt_len // 4)]))
            else:
                tid, count = take("!HH")
                lines.append((hexed(start), f"Template ID {tid}, Field Count {count}"))
                records.append((tid, 0, [field() for _ in range(count)]))
            if protocol == "netflow9" or set_id == 3:
                break  # one record per (Options) FlowSet / Options Template Set, as ipfixer sends them
        if at < end:
            start, at = at, end
            lines.append((hexed(start), "padding (RFC 3954 5.3)" if protocol == "netflow9" else "padding"))
    return lines, records


def render_golden(protocol: str, stem: str, t: Template, data: bytes, dropped: list[str]) -> str:
    """The golden file: the RFC section, what it is of, how it is regenerated, then annotated hex."""
    if protocol == "ipfix":
        rfc = "RFC 7011 3.4.2.2 Options Template Set" if t.is_options else "RFC 7011 3.4.1 Template Set"
    else:
        rfc = "RFC 3954 6.1 Options Template FlowSet" if t.is_options else "RFC 3954 5.2 Template FlowSet"
    head = [f"# {rfc}{' (Set Header 3.3.2)' if protocol == 'ipfix' else ''} that ipfixer sends for",
            f"# templates/{stem}.yaml (template {t.template_id}, {t.name}), {protocol}."]
    if protocol == "netflow9":
        subs = [f"{f.name} -> {V9_SUBSTITUTES[f.name]}" for f in t.fields[t.scope_count:] if f.name in V9_SUBSTITUTES]
        notes = ([f"replaced: {', '.join(subs)}"] if subs else []) + (
            [f"enterprise fields dropped: {', '.join(dropped)}"] if dropped else [])
        if notes:
            head.append(f"# v9 form (export/dialect.py netflow9_template): {'; '.join(notes)}.")
    head.append("# Regenerate on purpose: IPFIXER_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_golden.py")
    lines, _ = read_sets(protocol, data)
    width = max(len(h) for h, _ in lines) + 2
    return "\n".join(head + [f"{h:<{width}}# {c}" for h, c in lines]) + "\n"


CASES = [(protocol, stem) for stem in SHIPPED for protocol in ("ipfix", "netflow9")]


@pytest.mark.parametrize(("protocol", "stem"), CASES)
def test_shipped_template_golden(protocol: str, stem: str) -> None:
    """Each shipped template's sets are byte for byte the golden file, and reading those bytes apart from
    the encoder gives back the YAML's template id, scope count and fields (IPFIX) or their v9 form."""
    t = SHIPPED[stem]
    path = GOLDEN / golden_name(t, protocol)
    try:
        data, dropped = wire_sets(protocol, t)
    except EncodeError as exc:  # not sent in this protocol (v9: no variable-length fields, RFC 3954 5.2)
        assert protocol == "netflow9" and "variable-length" in str(exc), exc
        assert any(f.is_varlen for f in t.fields)
        if REGEN:
            path.unlink(missing_ok=True)
        assert not path.exists(), f"{path.name}: template {t.template_id} is not sent in {protocol}"
        return
    if REGEN:
        path.write_text(render_golden(protocol, stem, t, data, dropped))
    assert path.exists(), f"{path.name} missing: run IPFIXER_REGEN_GOLDEN=1 pytest tests/unit/test_golden.py"
    assert data == golden(path.name), f"{path.name}: the sent bytes changed (regenerate on purpose, review the diff)"
    _, records = read_sets(protocol, golden(path.name))
    assert len(records) == 1
    tid, scope, specs = records[0]
    assert (tid, scope) == (t.template_id, t.scope_count)
    if protocol == "ipfix":
        assert specs == [(f.element.element_id, f.element.pen, f.length) for f in t.fields]
    else:
        kept = [f for f in t.fields if not f.element.is_enterprise]
        assert [f.name for f in t.fields if f.element.is_enterprise] == dropped
        assert [length for *_, length in specs] == [
            f.length if f.name not in V9_SUBSTITUTES or i < t.scope_count else IM.by_name(V9_SUBSTITUTES[f.name]).default_length
            for i, f in enumerate(kept)]
        assert [ie for ie, _, _ in specs[:scope]] == [netflow9.v9_scope_type(f.element) for f in t.scope_fields]
        expected = [IM.by_name(V9_SUBSTITUTES.get(f.name, f.name)).element_id for f in kept[scope:]]
        assert [ie for ie, _, _ in specs[scope:]] == expected
        assert all(pen == 0 for _, pen, _ in specs)


def test_shipped_goldens_cover_every_template_and_nothing_else() -> None:
    assert len(SHIPPED) >= 14 and {t.template_id for t in SHIPPED.values()} >= set(range(256, 270))
    expected = {golden_name(SHIPPED[s], p) for p, s in CASES if (GOLDEN / golden_name(SHIPPED[s], p)).exists()}
    assert {golden_name(t, "ipfix") for t in SHIPPED.values()} <= expected
    assert {p.name for p in GOLDEN.glob("template_*.hex")} == expected
