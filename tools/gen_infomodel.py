"""Generate ipfixer/infomodel/data/iana.csv and iana_values.csv from IANA's IPFIX registry XML.

Why: element facts and coded values live in checked-in data files; this script is how they were made, so
a newer registry is imported the same way (tests/unit/test_infomodel.py checks that regenerating from the
XML reproduces the checked-in files exactly).  Input: IANA's "IP Flow Information Export (IPFIX)
Entities" registry file (https://www.iana.org/assignments/ipfix/ipfix.xml).

- iana.csv: every assigned element of the "ipfix-information-elements" registry; reserved, unassigned,
  range and nameless rows are skipped.  Nothing is added by hand.
- iana_values.csv: coded values, one row (registry, element_id, value, name, description) per value:
  the element sub-registries whose title says "(Value N)" (flowEndReason, natEvent, firewallEvent, ...),
  the registries nested in them (forwardingStatus reasons, named "<status>: <reason>"), values that the
  registry states only in an element's description as a list of "value: name" lines (flowDirection,
  samplingAlgorithm), and the data type, semantics and units registries (element_id empty).

The XML is untrusted input: DTDs and entity declarations are refused before ElementTree sees it (stdlib
only; expat itself bounds entity expansion).  Hand-written: IANA publishes no schema-driven reader.

Usage: python tools/gen_infomodel.py [ipfix.xml] [out_dir]
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.parsers import expat

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "iana" / "ipfix.xml"
DEFAULT_OUT = ROOT / "ipfixer" / "infomodel" / "data"

NS = "{http://www.iana.org/assignments}"
ELEMENT_COLUMNS = ("id", "name", "data_type", "semantics", "units", "status", "reference")
VALUE_COLUMNS = ("registry", "element_id", "value", "name", "description")
# Registries of the data file that describe the information model itself, not one element's values.
MODEL_REGISTRIES = (
    "ipfix-information-element-data-types",
    "ipfix-information-element-semantics",
    "ipfix-information-element-units",
)
_TITLE_VALUE = re.compile(r"\(Value (\d+)\)")
_ARTWORK_LINE = re.compile(r"^\s*(0x[0-9A-Fa-f]+|\d+)\s*(?::|=|-)\s*(\S.*?)[,.;]?\s*$")
_LABEL = re.compile(r"^([A-Za-z0-9][\w./-]{0,23}): \S")  # "TE-MIDPT: Any TE tunnel ..." -> "TE-MIDPT"


class RegistryError(Exception):
    """The registry file is not what this generator understands (names the record)."""


@dataclass(frozen=True)
class Generated:
    """The two data files' rows and the registry's date."""

    date: str
    elements: list[tuple[str, ...]]
    values: list[tuple[str, ...]]


def parse_untrusted(data: bytes) -> ET.Element:
    """Parse XML, refusing any DTD or entity declaration (billion laughs, external entities)."""

    def refuse(*_: object) -> None:
        raise RegistryError("the registry file declares a DTD or entities; refused")

    probe = expat.ParserCreate()
    probe.StartDoctypeDeclHandler = refuse
    probe.EntityDeclHandler = refuse
    probe.UnparsedEntityDeclHandler = refuse
    probe.ExternalEntityRefHandler = refuse  # type: ignore[assignment]
    try:
        probe.Parse(data, True)
    except expat.ExpatError as e:
        raise RegistryError(f"not well-formed XML: {e}") from None
    return ET.fromstring(data)


def _text(node: ET.Element, tag: str) -> str:
    child = node.find(NS + tag)
    if child is None:
        return ""
    return " ".join("".join(child.itertext()).split())


def _refs(record: ET.Element) -> str:
    """The record's own xrefs as [RFC5102] [Brian_Trammell] (the old CSV's Reference column)."""
    out = []
    for x in record.findall(NS + "xref"):
        data = (x.get("data") or "").strip()
        if data:
            out.append(f"[{data.upper()}]" if x.get("type") == "rfc" else f"[{data}]")
    return " ".join(out)


def _int_value(text: str) -> int | None:
    """One value ("5", "0x05"); None for ranges ("6-255") and bit patterns ("01b")."""
    t = text.strip()
    try:
        return int(t, 16) if t.lower().startswith("0x") else int(t, 10)
    except ValueError:
        return None


def elements(reg: ET.Element) -> Iterator[tuple[str, ...]]:
    """Rows of the assigned elements, in registry order."""
    for rec in reg.findall(NS + "record"):
        eid, name, dtype = _text(rec, "elementId"), _text(rec, "name"), _text(rec, "dataType")
        if not eid.isdigit() or not dtype or not name:
            continue  # reserved, unassigned, a range of ids, or a nameless deprecated duplicate (416, 419)
        if not name.isidentifier():
            raise RegistryError(f"element {eid}: name {name!r} is not an identifier")
        yield (eid, name, dtype, _text(rec, "dataTypeSemantics"), _text(rec, "units"),
               _text(rec, "status") or "current", _refs(rec))  # fmt: skip


def _value_rows(reg: ET.Element, element_id: str, prefix: str = "") -> Iterator[tuple[str, ...]]:
    rid = reg.get("id") or ""
    for rec in reg.findall(NS + "record"):
        value = _int_value(_text(rec, "value"))
        if value is None:
            continue
        desc = _text(rec, "description")
        name = _text(rec, "name")
        if not name:
            label = _LABEL.match(desc)
            name = label.group(1) if label else desc.rstrip(".")
        if name.lower() == "unassigned":
            continue
        yield rid, element_id, str(value), f"{prefix}{name}", "" if desc.rstrip(".") == name else desc


def _artwork_values(rec: ET.Element) -> list[tuple[int, str]]:
    """Values listed in an element's description as artwork of "value: name" lines only."""
    for art in rec.iter(NS + "artwork"):
        lines = [ln for ln in "".join(art.itertext()).splitlines() if ln.strip()]
        matches = [_ARTWORK_LINE.match(ln) for ln in lines]
        if len(lines) >= 2 and all(matches):
            return [(int(m.group(1), 0), m.group(2)) for m in matches if m]
    return []


def values(root: ET.Element, ie_reg: ET.Element) -> list[tuple[str, ...]]:
    """Rows of iana_values.csv: element sub-registries, then the model registries."""
    names = {r[0]: r[1] for r in elements(ie_reg)}
    rows: list[tuple[str, ...]] = []
    with_registry: set[str] = set()
    for reg in root.iter(NS + "registry"):
        m = _TITLE_VALUE.search(_text(reg, "title"))
        if not m:
            continue
        eid = m.group(1)
        if eid not in names:
            raise RegistryError(f"registry {reg.get('id')} is for element {eid}, which is not assigned")
        with_registry.add(eid)
        rows.extend(_value_rows(reg, eid))
        for sub in reg.findall(NS + "registry"):  # e.g. forwarding-status-01b "Status 01b: Forwarded"
            status = _text(sub, "title").split(":", 1)[-1].strip()
            rows.extend(_value_rows(sub, eid, f"{status}: "))
    for rec in ie_reg.findall(NS + "record"):
        eid = _text(rec, "elementId")
        if eid in names and eid not in with_registry and _text(rec, "dataTypeSemantics") == "identifier":
            rows.extend(("ipfix-information-elements", eid, str(v), n, "") for v, n in _artwork_values(rec))
    for rid in MODEL_REGISTRIES:
        model_reg = root.find(f".//{NS}registry[@id='{rid}']")
        if model_reg is None:
            raise RegistryError(f"registry {rid} is missing")
        rows.extend(_value_rows(model_reg, ""))
    return rows


def convert(data: bytes) -> Generated:
    """Both data files' rows from the registry file's bytes."""
    root = parse_untrusted(data)
    date = _text(root, "updated")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise RegistryError(f"registry <updated> date {date!r} is not YYYY-MM-DD")
    ie_reg = root.find(f"{NS}registry[@id='ipfix-information-elements']")
    if ie_reg is None:
        raise RegistryError("no ipfix-information-elements registry")
    rows = list(elements(ie_reg))
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids) or len({r[1] for r in rows}) != len(rows):
        raise RegistryError("duplicate element id or name")
    return Generated(date, rows, values(root, ie_reg))


def render(gen: Generated, source_name: str, sha256: str) -> tuple[str, str]:
    """The text of iana.csv and iana_values.csv."""
    head = (f"# registry-date: {gen.date}\n"
            f"# source: {source_name} (IANA IP Flow Information Export (IPFIX) Entities), sha256 {sha256}\n")  # fmt: skip
    out = []
    for title, columns, rows in (
        ("IANA IPFIX Information Elements", ELEMENT_COLUMNS, gen.elements),
        ("IANA IPFIX coded values (element sub-registries; data types, semantics, units)", VALUE_COLUMNS,
         gen.values),
    ):
        buf = io.StringIO()
        buf.write(f"# {title}, generated by tools/gen_infomodel.py - do not edit.\n{head}")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
        out.append(buf.getvalue())
    return out[0], out[1]


def main(argv: list[str]) -> int:
    source = Path(argv[1]) if len(argv) > 1 else DEFAULT_SOURCE
    out_dir = Path(argv[2]) if len(argv) > 2 else DEFAULT_OUT
    data = source.read_bytes()
    try:
        gen = convert(data)
    except RegistryError as e:
        print(f"{source}: {e}", file=sys.stderr)
        return 1
    iana, vals = render(gen, source.name, hashlib.sha256(data).hexdigest())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "iana.csv").write_text(iana, encoding="utf-8")
    (out_dir / "iana_values.csv").write_text(vals, encoding="utf-8")
    print(f"wrote {len(gen.elements)} elements and {len(gen.values)} values (registry {gen.date}) to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
