"""The IPFIX information model: immutable element facts loaded from the checked-in data files.

iana.csv is generated from the IANA registry by tools/gen_infomodel.py; ipfixer.csv declares our
enterprise-specific elements (RFC 7011 3.2).  Nothing here is mutable or global: `load_default()`
returns one cached, frozen InfoModel.
"""

from __future__ import annotations

import csv
import difflib
import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ipfixer.errors import InfoModelError

DATA_DIR = Path(__file__).resolve().parent / "data"
IPFIXER_PEN = 57999  # placeholder PEN, see data/ipfixer.csv
VARLEN = 65535  # RFC 7011 7: field length 65535 = variable length

# RFC 7011 6.1: the encoded size of each abstract data type (VARLEN = variable).
TYPE_LENGTHS: Mapping[str, int] = MappingProxyType(
    {
        "unsigned8": 1, "unsigned16": 2, "unsigned32": 4, "unsigned64": 8,
        "signed8": 1, "signed16": 2, "signed32": 4, "signed64": 8,
        "float32": 4, "float64": 8, "boolean": 1, "macAddress": 6,
        "octetArray": VARLEN, "string": VARLEN,
        "dateTimeSeconds": 4, "dateTimeMilliseconds": 8,
        "dateTimeMicroseconds": 8, "dateTimeNanoseconds": 8,
        "ipv4Address": 4, "ipv6Address": 16,
        "basicList": VARLEN, "subTemplateList": VARLEN, "subTemplateMultiList": VARLEN,
    }
)  # fmt: skip

INTEGER_TYPES = frozenset(t for t in TYPE_LENGTHS if t.startswith(("unsigned", "signed")))
FLOAT_TYPES = frozenset({"float32", "float64"})
VARLEN_TYPES = frozenset({"string", "octetArray"})  # the variable-length types ipfixer encodes


@dataclass(frozen=True, slots=True)
class Element:
    """One Information Element: IANA (pen 0) or enterprise-specific."""

    name: str
    element_id: int
    pen: int
    data_type: str
    semantics: str = ""
    units: str = ""
    status: str = "current"
    reference: str = ""

    @property
    def default_length(self) -> int:
        """Encoded size of the type (65535 = variable length)."""
        return TYPE_LENGTHS[self.data_type]

    @property
    def is_enterprise(self) -> bool:
        """True for enterprise-specific elements (RFC 7011 3.2)."""
        return self.pen != 0


class InfoModel:
    """An immutable set of Elements, looked up by name or by (id, PEN)."""

    __slots__ = ("_by_id", "_by_name", "registry_date")

    def __init__(self, elements: Iterable[Element], registry_date: str = "") -> None:
        by_name: dict[str, Element] = {}
        by_id: dict[tuple[int, int], Element] = {}
        for e in elements:
            if e.name in by_name:
                raise InfoModelError(f"duplicate element name {e.name!r}")
            if (e.pen, e.element_id) in by_id:
                raise InfoModelError(f"duplicate element id {e.element_id} (PEN {e.pen}) for {e.name!r}")
            by_name[e.name] = e
            by_id[(e.pen, e.element_id)] = e
        self._by_name: Mapping[str, Element] = MappingProxyType(by_name)
        self._by_id: Mapping[tuple[int, int], Element] = MappingProxyType(by_id)
        self.registry_date: str = registry_date

    @classmethod
    def load(cls, *paths: Path) -> InfoModel:
        """Load and validate element CSV files (errors name the file and line)."""
        elements: list[Element] = []
        date = ""
        for path in paths:
            file_elements, file_date = _read_csv(path)
            elements.extend(file_elements)
            date = date or file_date
        try:
            return cls(elements, date)
        except InfoModelError as e:
            raise InfoModelError(f"{', '.join(str(p) for p in paths)}: {e}") from None

    @classmethod
    def load_default(cls) -> InfoModel:
        """IANA registry + ipfixer enterprise elements, loaded once."""
        return _load_default()

    def by_name(self, name: str, pen: int | None = None) -> Element:
        """The element called `name` (optionally required to have this PEN)."""
        e = self._by_name.get(name)
        if e is None or (pen is not None and e.pen != pen):
            where = "" if pen is None else f" with enterprise number {pen}"
            hint = difflib.get_close_matches(name, list(self._by_name), n=1)
            msg = f"unknown element {name!r}{where}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            raise InfoModelError(msg)
        return e

    def by_id(self, element_id: int, pen: int = 0) -> Element | None:
        """The element with this id and PEN, or None when unknown."""
        return self._by_id.get((pen, element_id))

    def __iter__(self) -> Iterator[Element]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


@functools.cache
def _load_default() -> InfoModel:
    return InfoModel.load(DATA_DIR / "iana.csv", DATA_DIR / "ipfixer.csv")


def _read_csv(path: Path) -> tuple[list[Element], str]:
    """Elements of one data file and its `# registry-date:` comment, if any."""
    date = ""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InfoModelError(f"{path}: cannot read: {e.strerror}") from None
    lines: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            if line.startswith("# registry-date:"):
                date = line.split(":", 1)[1].strip()
            continue
        if line.strip():
            lines.append((lineno, line))
    if not lines:
        raise InfoModelError(f"{path}: no header line")
    reader = csv.reader(line for _, line in lines)
    header = next(reader)
    required = {"id", "name", "data_type"}
    if not required <= set(header):
        raise InfoModelError(f"{path}:{lines[0][0]}: header must have columns {sorted(required)}")
    elements = []
    for (lineno, _), row in zip(lines[1:], reader, strict=False):
        where = f"{path}:{lineno}"
        if len(row) != len(header):
            raise InfoModelError(f"{where}: expected {len(header)} columns, got {len(row)}")
        rec = dict(zip(header, row, strict=True))
        try:
            eid = int(rec["id"])
            pen = int(rec.get("pen") or 0)
        except ValueError:
            raise InfoModelError(f"{where}: id and pen must be integers") from None
        if not 0 < eid < 32768:
            raise InfoModelError(f"{where}: element id {eid} out of range 1..32767 (RFC 7011 3.2)")
        if not 0 <= pen < 2**32:
            raise InfoModelError(f"{where}: enterprise number {pen} out of range")
        if rec["data_type"] not in TYPE_LENGTHS:
            raise InfoModelError(f"{where}: unknown data type {rec['data_type']!r} for {rec['name']!r}")
        if not rec["name"].isidentifier():
            raise InfoModelError(f"{where}: bad element name {rec['name']!r}")
        elements.append(
            Element(
                name=rec["name"],
                element_id=eid,
                pen=pen,
                data_type=rec["data_type"],
                semantics=rec.get("semantics", ""),
                units=rec.get("units", ""),
                status=rec.get("status", "") or "current",
                reference=rec.get("reference", ""),
            )
        )
    return elements, date


__all__ = ["FLOAT_TYPES", "INTEGER_TYPES", "IPFIXER_PEN", "TYPE_LENGTHS", "VARLEN", "Element", "InfoModel"]
