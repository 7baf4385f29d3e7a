"""The IPFIX information model: immutable element facts loaded from the checked-in data files.

iana.csv and iana_values.csv are generated from IANA's registry file (ipfix.xml) by
tools/gen_infomodel.py; ipfixer.csv declares our enterprise-specific elements (RFC 7011 3.2).  The
coded values (flowEndReason 1 = "idle timeout", natEvent, flowDirection, ...) come with the elements,
so a decoder or a listing can name them.  Nothing here is mutable or global: `load_default()` returns
one cached, frozen InfoModel.
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
from ipfixer.infomodel.types import VARLEN, DataType

DATA_DIR = Path(__file__).resolve().parent / "data"
IPFIXER_PEN = 57999  # placeholder PEN, see data/ipfixer.csv

# RFC 7011 6.1: the encoded size of each abstract data type (VARLEN = variable); from the one table.
TYPE_LENGTHS: Mapping[str, int] = MappingProxyType({t.value: t.length for t in DataType})
INTEGER_TYPES = frozenset(t.value for t in DataType if t.is_integer)
FLOAT_TYPES = frozenset(t.value for t in DataType if t.is_float)
VARLEN_TYPES = frozenset(t.value for t in DataType if t.is_varlen)  # the variable-length types ipfixer encodes


@dataclass(frozen=True, slots=True)
class Element:
    """One Information Element: IANA (pen 0) or enterprise-specific."""

    name: str
    element_id: int
    pen: int
    data_type: DataType
    semantics: str = ""
    units: str = ""
    status: str = "current"
    reference: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.data_type, DataType):  # a caller's plain string: checked here, once
            try:
                object.__setattr__(self, "data_type", DataType(self.data_type))
            except ValueError:
                raise InfoModelError(f"element {self.name!r}: unknown data type {self.data_type!r}") from None

    @property
    def default_length(self) -> int:
        """Encoded size of the type (65535 = variable length)."""
        return self.data_type.length

    @property
    def is_enterprise(self) -> bool:
        """True for enterprise-specific elements (RFC 7011 3.2)."""
        return self.pen != 0


ValueNames = Mapping[int, str]


class InfoModel:
    """An immutable set of Elements, looked up by name or by (id, PEN), with the names of coded values."""

    __slots__ = ("_by_id", "_by_name", "_values", "registry_date")

    def __init__(
        self,
        elements: Iterable[Element],
        registry_date: str = "",
        values: Mapping[tuple[int, int], ValueNames] | None = None,
    ) -> None:
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
        self._values: Mapping[tuple[int, int], ValueNames] = MappingProxyType(
            {k: MappingProxyType(dict(v)) for k, v in (values or {}).items()}
        )
        self.registry_date: str = registry_date

    @classmethod
    def load(cls, *paths: Path, values: Path | None = None) -> InfoModel:
        """Load and validate element CSV files and, optionally, a coded-values file (errors name the
        file and line)."""
        elements: list[Element] = []
        date = ""
        for path in paths:
            file_elements, file_date = _read_csv(path)
            elements.extend(file_elements)
            date = date or file_date
        try:
            model = cls(elements, date)
        except InfoModelError as e:
            raise InfoModelError(f"{', '.join(str(p) for p in paths)}: {e}") from None
        if values is None:
            return model
        return cls(elements, date, _read_values(values, model))

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

    def value_names(self, element: Element) -> ValueNames:
        """The registry's names of this element's coded values (empty when it has none)."""
        return self._values.get((element.pen, element.element_id), _NO_VALUES)

    def value_name(self, element: Element, value: object) -> str | None:
        """IANA's name of one coded value (flowEndReason 1 -> 'idle timeout'), or None."""
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return self._values.get((element.pen, element.element_id), _NO_VALUES).get(value)

    def __iter__(self) -> Iterator[Element]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


_NO_VALUES: ValueNames = MappingProxyType({})


@functools.cache
def _load_default() -> InfoModel:
    return InfoModel.load(DATA_DIR / "iana.csv", DATA_DIR / "ipfixer.csv", DATA_DIR / "rfc5103.csv",
                          values=DATA_DIR / "iana_values.csv")


def _data_lines(path: Path) -> tuple[list[tuple[int, str]], str]:
    """The non-comment lines of a data file with their numbers, and its `# registry-date:`."""
    date = ""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InfoModelError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InfoModelError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
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
    return lines, date


def _read_values(path: Path, model: InfoModel) -> dict[tuple[int, int], dict[int, str]]:
    """Coded values of IANA elements by (pen, id): rows of iana_values.csv whose element_id is set."""
    lines, _ = _data_lines(path)
    reader = csv.reader(line for _, line in lines)
    header = next(reader)
    required = {"element_id", "value", "name"}
    if not required <= set(header):
        raise InfoModelError(f"{path}:{lines[0][0]}: header must have columns {sorted(required)}")
    out: dict[tuple[int, int], dict[int, str]] = {}
    for (lineno, _), row in zip(lines[1:], reader, strict=False):
        if len(row) != len(header):
            raise InfoModelError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}")
        rec = dict(zip(header, row, strict=True))
        if not rec["element_id"]:
            continue  # a registry of the model itself (data types, semantics, units)
        try:
            eid, value = int(rec["element_id"]), int(rec["value"])
        except ValueError:
            raise InfoModelError(f"{path}:{lineno}: element_id and value must be integers") from None
        if model.by_id(eid) is None:
            raise InfoModelError(f"{path}:{lineno}: values for unknown element {eid}")
        out.setdefault((0, eid), {})[value] = rec["name"]
    return out


def _read_csv(path: Path) -> tuple[list[Element], str]:
    """Elements of one data file and its `# registry-date:` comment, if any."""
    lines, date = _data_lines(path)
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
                data_type=DataType(rec["data_type"]),
                semantics=rec.get("semantics", ""),
                units=rec.get("units", ""),
                status=rec.get("status", "") or "current",
                reference=rec.get("reference", ""),
            )
        )
    return elements, date


__all__ = ["FLOAT_TYPES", "INTEGER_TYPES", "IPFIXER_PEN", "TYPE_LENGTHS", "VARLEN", "VARLEN_TYPES", "DataType",
           "Element", "InfoModel"]
