"""Templates: loaded from templates/*.yaml and validated against the InfoModel (RFC 7011 3.4).

Templates are data, not code: each YAML file declares one Template (or Options Template) and every
error names the file, the template id and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipfixer.errors import ConfigError, InfoModelError, TemplateError
from ipfixer.infomodel import VARLEN, Element, InfoModel
from ipfixer.resources import share_dir
from ipfixer.yamlbound import read_yaml_file

DEFAULT_TEMPLATES_DIR = share_dir("templates")  # the wheel's copy or the checkout's templates/
MAX_TEMPLATE_FILES = 4096  # *.yaml files read from one templates directory
MIN_TEMPLATE_ID = 256  # RFC 7011 3.4.1: 0-255 are reserved for Set IDs


@dataclass(frozen=True, slots=True)
class TemplateField:
    """One Field Specifier: an element and its encoded length (65535 = variable length)."""

    element: Element
    length: int

    @property
    def is_varlen(self) -> bool:
        """True when the record carries the length (RFC 7011 7)."""
        return self.length == VARLEN

    @property
    def name(self) -> str:
        """The element name, the key of record values."""
        return self.element.name


@dataclass(frozen=True, slots=True)
class Template:
    """A Template Record (scope_count 0) or Options Template Record (scope fields first)."""

    template_id: int
    name: str
    fields: tuple[TemplateField, ...]
    scope_count: int = 0

    @property
    def is_options(self) -> bool:
        """True for an Options Template (RFC 7011 3.4.2)."""
        return self.scope_count > 0

    @property
    def record_length(self) -> int | None:
        """Fixed Data Record length, or None if any field is variable-length."""
        if any(f.is_varlen for f in self.fields):
            return None
        return sum(f.length for f in self.fields)

    @property
    def min_record_length(self) -> int:
        """Smallest possible Data Record (variable-length fields empty: 1 byte each)."""
        return sum(1 if f.is_varlen else f.length for f in self.fields)

    @property
    def scope_fields(self) -> tuple[TemplateField, ...]:
        """The scope fields of an Options Template (empty otherwise)."""
        return self.fields[: self.scope_count]


def valid_lengths(element: Element) -> str:
    """Human description of the lengths allowed for an element (RFC 7011 6.2, 7)."""
    return element.data_type.valid_lengths()


def check_length(element: Element, length: int) -> str | None:
    """Why `length` is not a valid encoding of `element`, or None if it is (the DataType table's rule)."""
    return element.data_type.check_length(length)


def _parse_field(
    spec: Any, index: int, where: str, infomodel: InfoModel, seen: set[tuple[int, int]]
) -> TemplateField:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise TemplateError(f"{where} field {index}: expected an element name or {{name: ..., length: ...}}")
    extra = set(spec) - {"name", "length", "enterprise"}
    if extra:
        raise TemplateError(f"{where} field {index} ({spec['name']}): unknown keys {sorted(extra)}")
    name = spec["name"]
    pen = spec.get("enterprise")
    if pen is not None and (not isinstance(pen, int) or isinstance(pen, bool) or pen < 0):
        raise TemplateError(f"{where} field {index} ({name}): enterprise must be a non-negative integer")
    try:
        element = infomodel.by_name(str(name), pen)
    except InfoModelError as e:
        raise TemplateError(f"{where} field {index}: {e}") from None
    length = spec.get("length", element.default_length)
    if not isinstance(length, int) or isinstance(length, bool):
        raise TemplateError(f"{where} field {index} ({name}): length must be an integer")
    why = check_length(element, length)
    if why:
        raise TemplateError(f"{where} field {index} ({name}): {why}")
    key = (element.pen, element.element_id)
    if key in seen:
        raise TemplateError(f"{where} field {index} ({name}): element repeated in the template")
    seen.add(key)
    return TemplateField(element, length)


def parse_template(doc: Any, source: str, infomodel: InfoModel) -> Template:
    """Build a validated Template from a parsed YAML document; `source` names it in errors."""
    if not isinstance(doc, Mapping):
        raise TemplateError(f"{source}: expected a mapping with id, name, fields")
    tid = doc.get("id")
    if not isinstance(tid, int) or isinstance(tid, bool):
        raise TemplateError(f"{source}: 'id' must be an integer")
    where = f"{source}: template {tid}"
    if not MIN_TEMPLATE_ID <= tid <= 65535:
        raise TemplateError(f"{where}: template id must be 256..65535 (RFC 7011 3.4.1)")
    extra = set(doc) - {"id", "name", "fields", "scope", "description"}
    if extra:
        raise TemplateError(f"{where}: unknown keys {sorted(extra)}")
    name = doc.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise TemplateError(f"{where}: 'name' must be an identifier")
    scope = doc.get("scope", [])
    fields = doc.get("fields")
    if "scope" in doc and (not isinstance(scope, list) or not scope):
        raise TemplateError(f"{where}: options template needs at least one scope field (RFC 7011 3.4.2.2)")
    if not isinstance(fields, list) or not fields:
        raise TemplateError(f"{where}: 'fields' must be a non-empty list")
    seen: set[tuple[int, int]] = set()
    parsed = tuple(_parse_field(spec, i, where, infomodel, seen) for i, spec in enumerate([*scope, *fields]))
    for f in parsed[: len(scope)]:
        if f.is_varlen:
            raise TemplateError(f"{where} scope field {f.name}: scope fields must have a fixed length")
    if len(parsed) > 65535:
        raise TemplateError(f"{where}: too many fields")
    t = Template(tid, name, parsed, len(scope))
    if t.record_length is not None and t.record_length > 65535 - 20:
        raise TemplateError(f"{where}: record length {t.record_length} cannot fit in a message")
    return t


def load_template_file(path: Path, infomodel: InfoModel | None = None) -> Template:
    """Load and validate one template YAML file."""
    infomodel = infomodel or InfoModel.load_default()
    try:  # bounded: a templates directory is an input like the config (size, depth, aliases, FIFOs)
        doc = read_yaml_file(Path(path), "a template file", regular_only=True)
    except ConfigError as e:
        raise TemplateError(str(e)) from None
    return parse_template(doc, str(path), infomodel)


def load_templates(
    directory: Path = DEFAULT_TEMPLATES_DIR, infomodel: InfoModel | None = None
) -> dict[str, Template]:
    """All templates/*.yaml in a directory, keyed by template name; ids and names must be unique."""
    infomodel = infomodel or InfoModel.load_default()
    out: dict[str, Template] = {}
    ids: dict[int, Path] = {}
    try:
        paths = sorted(Path(directory).glob("*.yaml"))
    except OSError as e:
        raise TemplateError(f"{directory}: cannot list template files: {e.strerror or e}") from None
    if not paths:
        raise TemplateError(f"{directory}: no *.yaml template files")
    if len(paths) > MAX_TEMPLATE_FILES:  # ids 256..65535 allow more, no exporter needs them
        raise TemplateError(f"{directory}: {len(paths):,} template files, more than the {MAX_TEMPLATE_FILES:,} "
                            "ipfixer reads")
    for path in paths:
        t = load_template_file(path, infomodel)
        if t.template_id in ids:
            raise TemplateError(f"{path}: template {t.template_id}: id already used by {ids[t.template_id]}")
        if t.name in out:
            raise TemplateError(f"{path}: template {t.template_id}: name {t.name!r} already used")
        ids[t.template_id] = path
        out[t.name] = t
    return out


def describe(templates: Mapping[str, Template], infomodel: InfoModel | None = None) -> list[str]:
    """The `ipfixer templates` listing: the registry it was checked against, then per template its fields
    with ids, types and lengths, and the registry's names of coded values."""
    infomodel = infomodel or InfoModel.load_default()
    iana = [e for e in infomodel if not e.is_enterprise]
    lines = [f"information model: IANA IPFIX registry of {infomodel.registry_date or 'unknown date'} "
             f"({len(iana)} elements, ids up to {max((e.element_id for e in iana), default=0)}) "
             f"+ {len(infomodel) - len(iana)} enterprise elements"]  # fmt: skip
    for tpl in sorted(templates.values(), key=lambda t: t.template_id):
        kind = f"options, scope {tpl.scope_count}" if tpl.is_options else "data"
        lines.append(f"{tpl.template_id:5d} {tpl.name} ({kind}, record length {tpl.record_length or 'variable'})")
        for i, field in enumerate(tpl.fields):
            el = field.element
            ident = f"{el.pen}/{el.element_id}" if el.pen else str(el.element_id)
            length = "var" if field.is_varlen else str(field.length)
            scope = " scope" if i < tpl.scope_count else ""
            lines.append(f"      {ident:>10} {el.name:<36} {el.data_type:<22} len {length}{scope}")
            values = infomodel.value_names(el)
            if values:
                lines.append(f"      {'':>10}   values: {', '.join(f'{v} {n}' for v, n in sorted(values.items()))}")
    return lines
