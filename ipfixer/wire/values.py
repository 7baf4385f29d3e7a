"""One value of an IANA abstract data type to and from its bytes (RFC 7011 6, 7).

Encoding is strict (our value must fit: EncodeError); decoding is total (a peer's odd length gives
raw bytes back instead of an exception), so the decoder never fails on a value.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from typing import Any

from ipfixer.errors import EncodeError
from ipfixer.infomodel import VARLEN

NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 (NTP era 0) to 1970-01-01 (RFC 7011 6.1.9)
V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_MICRO_MASK = ~0x7FF & 0xFFFFFFFF  # RFC 7011 6.1.9: lower 11 fraction bits of microseconds are zero

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def varlen_prefix(n: int) -> bytes:
    """Length prefix of a variable-length field: 1 byte, or 255 + 2 bytes (RFC 7011 7)."""
    if n < 255:
        return bytes((n,))
    if n <= 65535:
        return b"\xff" + n.to_bytes(2, "big")
    raise EncodeError(f"variable-length value of {n} bytes exceeds 65535 (RFC 7011 7)")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise EncodeError(f"{what}: expected an integer, got {type(value).__name__} {value!r}")
    return int(value.__index__())


def _uint(value: Any, length: int, what: str) -> bytes:
    v = _int(value, what)
    if not 0 <= v < 1 << (8 * length):
        raise EncodeError(f"{what}: {v} does not fit in {length} unsigned byte(s)")
    return v.to_bytes(length, "big")


def _ipv4(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        if len(b) == 4:
            return b
        if len(b) == 16 and b[:12] == V4_MAPPED_PREFIX:
            return b[12:]
        raise EncodeError(f"{what}: {len(b)}-byte value is not an IPv4 address")
    if isinstance(value, ipaddress.IPv6Address):
        if value.ipv4_mapped is None:
            raise EncodeError(f"{what}: {value} is not an IPv4(-mapped) address")
        return value.ipv4_mapped.packed
    if isinstance(value, ipaddress.IPv4Address):
        return value.packed
    if isinstance(value, str):
        try:
            return _ipv4(ipaddress.ip_address(value), what)
        except ValueError:
            raise EncodeError(f"{what}: {value!r} is not an IP address") from None
    return _uint(value, 4, what)


def _ipv6(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        if len(b) == 16:
            return b
        if len(b) == 4:
            return V4_MAPPED_PREFIX + b
        raise EncodeError(f"{what}: {len(b)}-byte value is not an IPv6 address")
    if isinstance(value, ipaddress.IPv4Address):
        return V4_MAPPED_PREFIX + value.packed
    if isinstance(value, ipaddress.IPv6Address):
        return value.packed
    if isinstance(value, str):
        try:
            return _ipv6(ipaddress.ip_address(value), what)
        except ValueError:
            raise EncodeError(f"{what}: {value!r} is not an IP address") from None
    return _uint(value, 16, what)


def _mac(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) == 6:
        return bytes(value)
    if isinstance(value, str):
        parts = value.replace("-", ":").split(":")
        try:
            if len(parts) == 6 and all(1 <= len(p) <= 2 for p in parts):
                return bytes(int(p, 16) for p in parts)
        except ValueError:
            pass
        raise EncodeError(f"{what}: {value!r} is not a MAC address")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise EncodeError(f"{what}: MAC address must be 6 bytes, got {len(value)}")
    return _uint(value, 6, what)


def _ntp(value: Any, per_second: int, what: str) -> bytes:
    """Unix-epoch count of µs or ns -> NTP 64-bit timestamp (RFC 7011 6.1.9, 6.1.10)."""
    v = _int(value, what)
    secs, sub = divmod(v, per_second)
    frac = (sub << 32) // per_second
    if per_second == 1_000_000:
        frac &= _MICRO_MASK
    return _uint(secs + NTP_EPOCH_OFFSET, 4, what) + frac.to_bytes(4, "big")


def encode_value(data_type: str, length: int, value: Any, what: str = "value") -> bytes:
    """Bytes of one field; for length 65535 the RFC 7011 7 length prefix is included."""
    if value is None:
        return b"\x00" if length == VARLEN else bytes(length)
    if data_type.startswith("unsigned") or data_type in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return _uint(value, length, what)
    if data_type.startswith("signed"):
        v = _int(value, what)
        lim = 1 << (8 * length - 1)
        if not -lim <= v < lim:
            raise EncodeError(f"{what}: {v} does not fit in {length} signed byte(s)")
        return v.to_bytes(length, "big", signed=True)
    if data_type in ("float32", "float64"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise EncodeError(f"{what}: expected a float, got {value!r}")
        try:
            return struct.pack(">f" if length == 4 else ">d", value)
        except (OverflowError, struct.error):
            raise EncodeError(f"{what}: {value!r} does not fit in float{length * 8}") from None
    if data_type == "boolean":
        if not isinstance(value, bool):
            raise EncodeError(f"{what}: expected a bool, got {value!r}")
        return b"\x01" if value else b"\x02"  # RFC 7011 6.1.5: 1 true, 2 false
    if data_type == "ipv4Address":
        return _ipv4(value, what)
    if data_type == "ipv6Address":
        return _ipv6(value, what)
    if data_type == "macAddress":
        return _mac(value, what)
    if data_type == "dateTimeMicroseconds":
        return _ntp(value, 1_000_000, what)
    if data_type == "dateTimeNanoseconds":
        return _ntp(value, 1_000_000_000, what)
    if data_type in ("string", "octetArray"):
        if isinstance(value, str):
            raw = value.encode("utf-8")  # RFC 7011 6.1.6: UTF-8
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
        else:
            raise EncodeError(f"{what}: expected str or bytes, got {type(value).__name__}")
        if length == VARLEN:
            return varlen_prefix(len(raw)) + raw
        if len(raw) > length:
            raise EncodeError(f"{what}: {len(raw)} bytes do not fit in a {length}-byte field")
        return raw + bytes(length - len(raw))  # fixed-length field, zero padded
    raise EncodeError(f"{what}: data type {data_type} cannot be encoded")


def format_mac(raw: bytes) -> str:
    """6 bytes -> 'aa:bb:cc:dd:ee:ff'."""
    return ":".join(f"{b:02x}" for b in raw)


def decode_value(data_type: str, raw: bytes) -> Any:
    """Python value of a field's bytes (without varlen prefix); odd lengths give raw bytes."""
    n = len(raw)
    if data_type.startswith("unsigned") or data_type in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return int.from_bytes(raw, "big") if 1 <= n <= 8 else raw
    if data_type.startswith("signed"):
        return int.from_bytes(raw, "big", signed=True) if 1 <= n <= 8 else raw
    if data_type in ("float32", "float64"):
        return struct.unpack(">f" if n == 4 else ">d", raw)[0] if n in (4, 8) else raw
    if data_type == "boolean":
        return {1: True, 2: False}.get(raw[0], raw) if n == 1 else raw
    if data_type == "ipv4Address":
        return ipaddress.IPv4Address(raw) if n == 4 else raw
    if data_type == "ipv6Address":
        return ipaddress.IPv6Address(raw) if n == 16 else raw
    if data_type == "macAddress":
        return format_mac(raw) if n == 6 else raw
    if data_type in ("dateTimeMicroseconds", "dateTimeNanoseconds") and n == 8:
        per = 1_000_000 if data_type == "dateTimeMicroseconds" else 1_000_000_000
        secs = int.from_bytes(raw[:4], "big") - NTP_EPOCH_OFFSET
        frac = int.from_bytes(raw[4:], "big")
        return secs * per + ((frac * per + (1 << 31)) >> 32)
    if data_type == "string":
        # A fixed-length string field is zero padded (as encode_value does, and as NetFlow v9 exporters
        # send IF_NAME); the padding is not part of the value.
        return raw.rstrip(b"\x00").decode("utf-8", errors="replace")
    return raw


def is_nan(value: Any) -> bool:
    """True for a float NaN (NaN != NaN, which round-trip tests must allow for)."""
    return isinstance(value, float) and math.isnan(value)
