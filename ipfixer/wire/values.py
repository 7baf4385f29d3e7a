"""One value of an IANA abstract data type to and from its bytes (RFC 7011 6, 7).

The per-type work is the `DataType` table (ipfixer.infomodel.types); this module is the scalar entry
point the construct path uses, adding the variable-length prefix and the context of errors.
Encoding is strict (our value must fit: FieldValueError, an EncodeError); decoding is total (a peer's
odd length gives raw bytes back instead of an exception), so the decoder never fails on a value.
"""

from __future__ import annotations

from typing import Any

from ipfixer.errors import EncodeError, FieldValueError
from ipfixer.infomodel.types import NTP_EPOCH_OFFSET, V4_MAPPED_PREFIX, VARLEN, DataType, format_mac


def varlen_prefix(n: int) -> bytes:
    """Length prefix of a variable-length field: 1 byte, or 255 + 2 bytes (RFC 7011 7)."""
    if n < 255:
        return bytes((n,))
    if n <= 65535:
        return b"\xff" + n.to_bytes(2, "big")
    raise EncodeError(f"variable-length value of {n} bytes exceeds 65535 (RFC 7011 7)")


def _data_type(data_type: str | DataType, what: str) -> DataType:
    if isinstance(data_type, DataType):  # Element.data_type always is: no enum lookup per value
        return data_type
    try:
        return DataType(data_type)
    except ValueError:
        raise FieldValueError(f"data type {data_type} cannot be encoded", what=what) from None


def encode_value(data_type: str | DataType, length: int, value: Any, what: str = "value",
                 template_id: int | None = None, field: str | None = None) -> bytes:
    """Bytes of one field; for length 65535 the RFC 7011 7 length prefix is included.  Errors carry
    `template_id` and `field` when given, else the free-text `what`."""
    if value is None:
        return b"\x00" if length == VARLEN else bytes(length)
    dt = _data_type(data_type, what)
    try:
        raw = dt.codec.encode(value, length)
    except FieldValueError as e:
        if template_id is None and field is None:
            raise e.at(what=what) from None
        raise e.at(template_id=template_id, field=field) from None
    return varlen_prefix(len(raw)) + raw if length == VARLEN else raw


def decode_value(data_type: str | DataType, raw: bytes) -> Any:
    """Python value of a field's bytes (without varlen prefix); odd lengths give raw bytes."""
    if isinstance(data_type, DataType):
        return data_type.codec.decode(raw)
    try:
        dt = DataType(data_type)
    except ValueError:
        return raw  # a type this model does not know: the bytes as they came
    return dt.codec.decode(raw)


__all__ = ["NTP_EPOCH_OFFSET", "V4_MAPPED_PREFIX", "decode_value", "encode_value", "format_mac", "varlen_prefix"]
