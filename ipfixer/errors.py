"""Error classes: each names who is at fault; they are raised where the problem is known and
reported once, at the edge (the CLI)."""


class IpfixerError(Exception):
    """Root of every error ipfixer raises on purpose."""


class ConfigError(IpfixerError):
    """The user's config file is wrong (exit status 2 at the CLI)."""


class ConfigLimitError(ConfigError):
    """A config (or other YAML) input exceeds a bound that keeps loading fast and small (size, depth, nodes, aliases):
    refused before it is expanded, so a hostile file cannot hang `check` or a SIGHUP reload."""

    def __init__(self, source: str, what: str, found: int, limit: int, kind: str = "a config") -> None:
        self.source, self.what, self.found, self.limit = source, what, found, limit
        super().__init__(f"{source}: {what}: {found:,} is more than the {limit:,} {kind} may have")


class CaptureError(IpfixerError):
    """A capture file cannot be replayed as it is (not a capture, truncated, unsupported link type)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class TemplateError(IpfixerError):
    """A template file is wrong: names the file, the template and the field."""


class InfoModelError(IpfixerError):
    """An information-element data file is wrong, or an element is unknown."""


class EncodeError(IpfixerError):
    """A value of ours does not fit the element or the message it is encoded into."""


class DecodeError(IpfixerError):
    """A peer's bytes are malformed: the only error the decoder raises."""


class KernelError(IpfixerError):
    """The kernel refused something: BPF load, qdisc/filter attach, map access."""


class TransportError(IpfixerError):
    """A collector cannot be reached or resolved."""


def _field_message(reason: str, template_id: int | None, field: str | None, offset: int | None,
                   what: str | None) -> str:
    """The one format of a field error: 'template 256 field vlanId (record at offset 40): reason'."""
    parts = [what] if what else []
    if template_id is not None:
        parts.append(f"template {template_id}")
    if field is not None:
        parts.append(f"field {field}")
    where = " ".join(parts)
    if offset is not None:
        where += f" (record at offset {offset})" if where else f"record at offset {offset}"
    return f"{where}: {reason}" if where else reason


class FieldValueError(EncodeError):
    """A value of ours does not fit its field: the reason, the value, and where (template id, field,
    record offset) as attributes; the message is formatted from them in one place."""

    def __init__(self, reason: str, *, value: object = None, template_id: int | None = None,
                 field: str | None = None, offset: int | None = None, what: str | None = None) -> None:
        self.reason, self.value, self.template_id, self.field, self.offset, self.what = (
            reason, value, template_id, field, offset, what)
        super().__init__(_field_message(reason, template_id, field, offset, what))

    def at(self, *, template_id: int | None = None, field: str | None = None, offset: int | None = None,
           what: str | None = None) -> "FieldValueError":
        """The same error with the context the caller knows filled in."""
        return FieldValueError(self.reason, value=self.value, template_id=template_id, field=field,
                               offset=offset, what=what)


class FieldDecodeError(DecodeError):
    """A peer's Data Record cannot be read: reason, template id, field and record offset as attributes."""

    def __init__(self, reason: str, *, template_id: int | None = None, field: str | None = None,
                 offset: int | None = None) -> None:
        self.reason, self.template_id, self.field, self.offset = reason, template_id, field, offset
        super().__init__(_field_message(reason, template_id, field, offset, None))
