"""The abstract data types of IPFIX, one table: per type its IANA number, size, encoder, decoder and the
numpy field format of the batch encoder (RFC 7012 3.1, encodings RFC 7011 6; unsigned256 RFC 9740).

Why one table: the scalar path (wire.values, construct) and the batch path (wire.fastpath, numpy) must
produce the same bytes; both now ask the same `Codec` of a `DataType`, so a type is described once.
The numbers are IANA's "IPFIX Information Element Data Types" registry; a test checks them against the
generated data/iana_values.csv.  Modelled on python-ipfix's types.py, written for ipfixer.

Encoding is strict (a value that does not fit raises FieldValueError); decoding is total (a peer's odd
length gives the raw bytes back), so the decoder never fails on a value.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import numpy as np

from ipfixer.clock import NS_PER_SECOND
from ipfixer.errors import FieldValueError

VARLEN = 65535  # RFC 7011 7: field length 65535 = variable length
NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 (NTP era 0) to 1970-01-01 (RFC 7011 6.1.9)
V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"  # RFC 4291 2.5.5.2
MICRO_FRACTION_MASK = 0xFFFF_F800  # RFC 7011 6.1.9: the lower 11 fraction bits of microseconds are zero
US_PER_SECOND = 1_000_000
_BYTES = (bytes, bytearray, memoryview)


class DataType(StrEnum):
    """An IANA abstract data type; the value is IANA's name, so it compares equal to that string."""

    OCTET_ARRAY = "octetArray"
    UNSIGNED8 = "unsigned8"
    UNSIGNED16 = "unsigned16"
    UNSIGNED32 = "unsigned32"
    UNSIGNED64 = "unsigned64"
    SIGNED8 = "signed8"
    SIGNED16 = "signed16"
    SIGNED32 = "signed32"
    SIGNED64 = "signed64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BOOLEAN = "boolean"
    MAC_ADDRESS = "macAddress"
    STRING = "string"
    DATE_TIME_SECONDS = "dateTimeSeconds"
    DATE_TIME_MILLISECONDS = "dateTimeMilliseconds"
    DATE_TIME_MICROSECONDS = "dateTimeMicroseconds"
    DATE_TIME_NANOSECONDS = "dateTimeNanoseconds"
    IPV4_ADDRESS = "ipv4Address"
    IPV6_ADDRESS = "ipv6Address"
    BASIC_LIST = "basicList"
    SUB_TEMPLATE_LIST = "subTemplateList"
    SUB_TEMPLATE_MULTI_LIST = "subTemplateMultiList"
    UNSIGNED256 = "unsigned256"

    # Set once from _TABLE below: plain attributes, since the encoders read them for every value.
    spec: TypeSpec  # this type's row of the table
    codec: Codec  # encoder, decoder and numpy format of the type

    @property
    def number(self) -> int:
        """IANA's number for the type (RFC 5610 informationElementDataType)."""
        return self.spec.number

    @property
    def length(self) -> int:
        """The encoded size (VARLEN for the variable-length types)."""
        return self.spec.length

    @property
    def is_integer(self) -> bool:
        """Signed or unsigned integers, the types with reduced-size encoding 1..length (RFC 7011 6.2)."""
        return isinstance(self.codec, IntegerCodec)

    @property
    def is_float(self) -> bool:
        """float32 / float64 (float64 may be sent in 4 bytes, RFC 7011 6.2)."""
        return isinstance(self.codec, FloatCodec)

    @property
    def is_varlen(self) -> bool:
        """The types ipfixer sends either fixed-length or variable-length (RFC 7011 7)."""
        return isinstance(self.codec, OctetsCodec)

    def check_length(self, length: int) -> str | None:
        """Why `length` is not a valid encoding of this type, or None if it is (RFC 7011 6.2, 7)."""
        if isinstance(self.codec, ListCodec):
            return f"data type {self.value} (RFC 6313) is not supported"
        d = self.length
        if (
            (self.is_integer and 1 <= length <= d)  # reduced-size encoding
            or (self is DataType.FLOAT64 and length in (4, 8))  # float64 may be sent as float32
            or (self.is_varlen and 1 <= length <= VARLEN)  # fixed or variable length
            or length == d
        ):
            return None
        if self.is_integer or self.is_float:
            return f"length {length} not allowed for {self.value} (allowed: {self.valid_lengths()}; RFC 7011 6.2)"
        if length == VARLEN:
            return f"variable length only for string/octetArray, not {self.value} (RFC 7011 7)"
        return f"length {length} not allowed for {self.value}: reduced size only for integers/floats (RFC 7011 6.2)"

    def valid_lengths(self) -> str:
        """Human description of the lengths allowed (RFC 7011 6.2, 7)."""
        if self.is_integer:
            return f"1..{self.length}"
        if self is DataType.FLOAT64:
            return "4 or 8"
        if self.is_varlen:
            return "1..65534 or 65535 (variable)"
        return str(self.length)


# -- codecs: one per family of types -----------------------------------------------------------------


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise FieldValueError(f"expected an integer, got {type(value).__name__} {value!r}", value=value)
    return int(value.__index__())


def _uint_bytes(v: int, length: int) -> bytes:
    if not 0 <= v < 1 << (8 * length):
        raise FieldValueError(f"{v} does not fit in {length} unsigned byte(s)", value=v)
    return v.to_bytes(length, "big")


class Codec:
    """Scalar encode / decode and the batch (numpy) layout of one family of types.

    `encode(value, length)` gives the field's bytes without a variable-length prefix; `decode(raw)` the
    Python value (raw bytes when the length is not one the type has); `np_format(length)` the numpy
    format of the field in a record dtype (None: no batch layout); `column(col, length)` the array to
    store in that field from a batch column, after checking every value fits."""

    name = "?"

    def encode(self, value: Any, length: int) -> bytes:
        raise FieldValueError(f"data type {self.name} cannot be encoded", value=value)

    def decode(self, raw: bytes) -> Any:
        return raw

    def np_format(self, length: int) -> Any:
        return ("u1", (length,))

    def column(self, col: np.ndarray, length: int) -> np.ndarray:
        raise FieldValueError(f"data type {self.name} has no batch layout")


class IntegerCodec(Codec):
    """unsignedN / signedN / dateTimeSeconds / dateTimeMilliseconds (RFC 7011 6.1.1, 6.1.9), any
    reduced size (6.2); sizes 3, 5, 6 and 7 are written byte by byte in the batch layout."""

    def __init__(self, name: str, signed: bool, max_length: int) -> None:
        self.name, self.signed, self.max_length = name, signed, max_length

    def encode(self, value: Any, length: int) -> bytes:
        v = _as_int(value)
        if not self.signed:
            return _uint_bytes(v, length)
        lim = 1 << (8 * length - 1)
        if not -lim <= v < lim:
            raise FieldValueError(f"{v} does not fit in {length} signed byte(s)", value=v)
        return v.to_bytes(length, "big", signed=True)

    def decode(self, raw: bytes) -> Any:
        if 1 <= len(raw) <= self.max_length:
            return int.from_bytes(raw, "big", signed=self.signed)
        return raw

    def np_format(self, length: int) -> Any:
        if self.max_length > 8:
            return None  # unsigned256: numpy has no such integer
        if length in (1, 2, 4, 8):
            return f">{'i' if self.signed else 'u'}{length}"
        return ("u1", (length,))

    def column(self, col: np.ndarray, length: int) -> np.ndarray:
        if col.ndim != 1 or col.dtype.kind not in "uib":
            raise FieldValueError(f"expected a 1-D integer column, got {col.dtype} {col.shape}")
        n, bits = len(col), 8 * length
        if not self.signed:
            if col.dtype.kind == "i" and n and col.min() < 0:
                raise FieldValueError("negative value for an unsigned element", value=int(col.min()))
            if bits < 64 and col.dtype.itemsize * 8 > bits and n and int(col.max()) >> bits:
                raise FieldValueError(f"value does not fit in {length} byte(s)", value=int(col.max()))
            if length in (1, 2, 4, 8):
                return col  # range checked: a straight (byte-swapping) copy
            values = col.astype(np.uint64)
        else:
            lim = 1 << (bits - 1)
            if n and (int(col.min()) < -lim or int(col.max()) >= lim):
                raise FieldValueError(f"value does not fit in {length} signed byte(s)")
            if length in (1, 2, 4, 8):
                return col.astype(np.int64)
            values = col.astype(np.int64).view(np.uint64)  # two's complement
        shifts = np.arange(8 * (length - 1), -1, -8, dtype=np.uint64)
        return ((values[:, None] >> shifts) & np.uint64(0xFF)).astype(np.uint8)


class FloatCodec(Codec):
    """float32 / float64, IEEE 754 big-endian (RFC 7011 6.1.2); float64 may travel in 4 bytes (6.2)."""

    name = "float"

    def encode(self, value: Any, length: int) -> bytes:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FieldValueError(f"expected a float, got {value!r}", value=value)
        try:
            return struct.pack(">f" if length == 4 else ">d", value)
        except (OverflowError, struct.error):
            raise FieldValueError(f"{value!r} does not fit in float{length * 8}", value=value) from None

    def decode(self, raw: bytes) -> Any:
        n = len(raw)
        return struct.unpack(">f" if n == 4 else ">d", raw)[0] if n in (4, 8) else raw

    def np_format(self, length: int) -> Any:
        return f">f{length}"

    def column(self, col: np.ndarray, length: int) -> np.ndarray:
        return col


class BooleanCodec(Codec):
    """RFC 7011 6.1.5: 1 is true, 2 is false."""

    name = "boolean"

    def encode(self, value: Any, length: int) -> bytes:
        if not isinstance(value, bool):
            raise FieldValueError(f"expected a bool, got {value!r}", value=value)
        return b"\x01" if value else b"\x02"

    def decode(self, raw: bytes) -> Any:
        return {1: True, 2: False}.get(raw[0], raw) if len(raw) == 1 else raw

    def np_format(self, length: int) -> Any:
        return "u1"

    def column(self, col: np.ndarray, length: int) -> np.ndarray:
        return np.where(col.astype(bool), 1, 2).astype(np.uint8)


class NtpCodec(Codec):
    """dateTimeMicroseconds / dateTimeNanoseconds: a Unix-epoch count of us or ns <-> NTP 64-bit timestamp
    (RFC 7011 6.1.9, 6.1.10); microseconds keep the lower 11 fraction bits zero."""

    def __init__(self, name: str, per_second: int) -> None:
        self.name, self.per_second = name, per_second
        self.mask = MICRO_FRACTION_MASK if per_second == US_PER_SECOND else 0xFFFF_FFFF

    def encode(self, value: Any, length: int) -> bytes:
        v = _as_int(value)
        secs, sub = divmod(v, self.per_second)
        frac = ((sub << 32) // self.per_second) & self.mask
        return _uint_bytes(secs + NTP_EPOCH_OFFSET, 4) + frac.to_bytes(4, "big")

    def decode(self, raw: bytes) -> Any:
        if len(raw) != 8:
            return raw
        per = self.per_second
        secs = int.from_bytes(raw[:4], "big") - NTP_EPOCH_OFFSET
        return secs * per + ((int.from_bytes(raw[4:], "big") * per + (1 << 31)) >> 32)

    def np_format(self, length: int) -> Any:
        return ">u8"

    def column(self, col: np.ndarray, length: int) -> np.ndarray:
        if col.dtype.kind not in "ui" or (col.dtype.kind == "i" and len(col) and col.min() < 0):
            raise FieldValueError("expected non-negative integer timestamps")
        per = np.uint64(self.per_second)
        v = col.astype(np.uint64)
        secs = v // per + np.uint64(NTP_EPOCH_OFFSET)
        if len(col) and int(secs.max()) >> 32:
            raise FieldValueError("timestamp beyond NTP era 0", value=int(col.max()))
        frac = ((v % per) << np.uint64(32)) // per
        return (secs << np.uint64(32)) | (frac & np.uint64(self.mask))


class AddressCodec(Codec):
    """ipv4Address / ipv6Address / macAddress (RFC 7011 6.1.11, 6.1.12, 6.1.4): bytes, ipaddress objects,
    text, or an integer; IPv4 and IPv4-mapped IPv6 convert both ways (RFC 4291 2.5.5.2)."""

    def __init__(self, name: str, length: int) -> None:
        self.name, self.size = name, length

    def encode(self, value: Any, length: int) -> bytes:
        if isinstance(value, _BYTES):
            return self._from_bytes(bytes(value))
        if isinstance(value, str):
            return self._from_text(value)
        if isinstance(value, ipaddress.IPv6Address):
            if self.size == 16:
                return value.packed
            if self.size == 4 and value.ipv4_mapped is not None:
                return value.ipv4_mapped.packed
            raise FieldValueError(f"{value} is not an IPv4(-mapped) address", value=value)
        if isinstance(value, ipaddress.IPv4Address):
            if self.size == 6:
                raise FieldValueError(f"{value} is not a MAC address", value=value)
            return value.packed if self.size == 4 else V4_MAPPED_PREFIX + value.packed
        return _uint_bytes(_as_int(value), self.size)

    def _from_bytes(self, b: bytes) -> bytes:
        if len(b) == self.size:
            return b
        if self.size == 4 and len(b) == 16 and b[:12] == V4_MAPPED_PREFIX:
            return b[12:]
        if self.size == 16 and len(b) == 4:
            return V4_MAPPED_PREFIX + b
        if self.size == 6:
            raise FieldValueError(f"MAC address must be 6 bytes, got {len(b)}", value=b)
        raise FieldValueError(f"{len(b)}-byte value is not an {self.name}", value=b)

    def _from_text(self, text: str) -> bytes:
        if self.size == 6:
            parts = text.replace("-", ":").split(":")
            try:
                if len(parts) == 6 and all(1 <= len(p) <= 2 for p in parts):
                    return bytes(int(p, 16) for p in parts)
            except ValueError:
                pass
            raise FieldValueError(f"{text!r} is not a MAC address", value=text)
        try:
            return self.encode(ipaddress.ip_address(text), self.size)
        except ValueError:
            raise FieldValueError(f"{text!r} is not an IP address", value=text) from None

    def decode(self, raw: bytes) -> Any:
        if len(raw) != self.size:
            return raw
        if self.size == 4:
            return ipaddress.IPv4Address(raw)
        if self.size == 16:
            return ipaddress.IPv6Address(raw)
        return format_mac(raw)

    def np_format(self, length: int) -> Any:
        return ("u1", (self.size,))

    def column(self, col: np.ndarray, length: int) -> np.ndarray:
        n = len(col)
        if col.ndim == 1 and col.dtype.kind in "ui" and self.size in (4, 6):
            wide = col.astype(">u8").view(np.uint8).reshape(n, 8)
            if n and (wide[:, : 8 - length] != 0).any():
                raise FieldValueError(f"value does not fit in {length} bytes")
            return wide[:, 8 - length :]
        if col.ndim != 2 or col.dtype != np.uint8:
            raise FieldValueError(f"expected an (n, {length}) uint8 column, got {col.dtype} {col.shape}")
        if self.size == 4 and col.shape[1] == 16:
            col = col[:, 12:]  # IPv4-mapped IPv6 (RFC 4038), as in model.FLOW_DTYPE
        if col.shape[1] != length:
            raise FieldValueError(f"expected {length} bytes per row, got {col.shape[1]}")
        return col


class OctetsCodec(Codec):
    """string (UTF-8, RFC 7011 6.1.6) / octetArray (6.1.7): fixed length (zero padded) or variable."""

    def __init__(self, name: str, text: bool) -> None:
        self.name, self.text = name, text

    def encode(self, value: Any, length: int) -> bytes:
        if isinstance(value, str):
            raw = value.encode("utf-8")
        elif isinstance(value, _BYTES):
            raw = bytes(value)
        else:
            raise FieldValueError(f"expected str or bytes, got {type(value).__name__}", value=value)
        if length == VARLEN:
            return raw
        if len(raw) > length:
            raise FieldValueError(f"{len(raw)} bytes do not fit in a {length}-byte field", value=value)
        return raw + bytes(length - len(raw))  # fixed-length field, zero padded

    def decode(self, raw: bytes) -> Any:
        if self.text:
            # A fixed-length string field is zero padded (as encode does, and as NetFlow v9 exporters
            # send IF_NAME); the padding is not part of the value.
            return raw.rstrip(b"\x00").decode("utf-8", errors="replace")
        return raw

    def np_format(self, length: int) -> Any:
        return None if length == VARLEN else ("u1", (length,))

    def column(self, col: np.ndarray, length: int) -> np.ndarray:
        if col.ndim != 2 or col.dtype != np.uint8:
            raise FieldValueError(f"expected an (n, {length}) uint8 column, got {col.dtype} {col.shape}")
        if col.shape[1] != length:
            raise FieldValueError(f"expected {length} bytes per row, got {col.shape[1]}")
        return col


class ListCodec(Codec):
    """basicList / subTemplateList / subTemplateMultiList (RFC 6313): decoded as raw bytes only."""

    def __init__(self, name: str) -> None:
        self.name = name

    def np_format(self, length: int) -> Any:
        return None


def format_mac(raw: bytes) -> str:
    """6 bytes -> 'aa:bb:cc:dd:ee:ff'."""
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True, slots=True)
class TypeSpec:
    """One row of the table: IANA number, encoded size and codec."""

    number: int
    length: int
    codec: Codec


def _int(name: str, signed: bool, n: int) -> Codec:
    return IntegerCodec(name, signed, n)


_T = DataType
_TABLE: Mapping[DataType, TypeSpec] = MappingProxyType({
    _T.OCTET_ARRAY: TypeSpec(0, VARLEN, OctetsCodec("octetArray", text=False)),
    _T.UNSIGNED8: TypeSpec(1, 1, _int("unsigned8", False, 1)),
    _T.UNSIGNED16: TypeSpec(2, 2, _int("unsigned16", False, 2)),
    _T.UNSIGNED32: TypeSpec(3, 4, _int("unsigned32", False, 4)),
    _T.UNSIGNED64: TypeSpec(4, 8, _int("unsigned64", False, 8)),
    _T.SIGNED8: TypeSpec(5, 1, _int("signed8", True, 1)),
    _T.SIGNED16: TypeSpec(6, 2, _int("signed16", True, 2)),
    _T.SIGNED32: TypeSpec(7, 4, _int("signed32", True, 4)),
    _T.SIGNED64: TypeSpec(8, 8, _int("signed64", True, 8)),
    _T.FLOAT32: TypeSpec(9, 4, FloatCodec()),
    _T.FLOAT64: TypeSpec(10, 8, FloatCodec()),
    _T.BOOLEAN: TypeSpec(11, 1, BooleanCodec()),
    _T.MAC_ADDRESS: TypeSpec(12, 6, AddressCodec("macAddress", 6)),
    _T.STRING: TypeSpec(13, VARLEN, OctetsCodec("string", text=True)),
    _T.DATE_TIME_SECONDS: TypeSpec(14, 4, _int("dateTimeSeconds", False, 4)),
    _T.DATE_TIME_MILLISECONDS: TypeSpec(15, 8, _int("dateTimeMilliseconds", False, 8)),
    _T.DATE_TIME_MICROSECONDS: TypeSpec(16, 8, NtpCodec("dateTimeMicroseconds", US_PER_SECOND)),
    _T.DATE_TIME_NANOSECONDS: TypeSpec(17, 8, NtpCodec("dateTimeNanoseconds", NS_PER_SECOND)),
    _T.IPV4_ADDRESS: TypeSpec(18, 4, AddressCodec("ipv4Address", 4)),
    _T.IPV6_ADDRESS: TypeSpec(19, 16, AddressCodec("ipv6Address", 16)),
    _T.BASIC_LIST: TypeSpec(20, VARLEN, ListCodec("basicList")),
    _T.SUB_TEMPLATE_LIST: TypeSpec(21, VARLEN, ListCodec("subTemplateList")),
    _T.SUB_TEMPLATE_MULTI_LIST: TypeSpec(22, VARLEN, ListCodec("subTemplateMultiList")),
    _T.UNSIGNED256: TypeSpec(23, 32, _int("unsigned256", False, 32)),  # RFC 9740
})  # fmt: skip
for _dt, _spec in _TABLE.items():
    _dt.spec, _dt.codec = _spec, _spec.codec
if set(_TABLE) != set(DataType):
    raise AssertionError("every DataType needs its row in _TABLE")

__all__ = ["NTP_EPOCH_OFFSET", "V4_MAPPED_PREFIX", "VARLEN", "Codec", "DataType", "TypeSpec", "format_mac"]  # fmt: skip
