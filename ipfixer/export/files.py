"""IPFIX files (RFC 5655): a `file` collector that writes rotating files, and a reader for them.

An IPFIX File is a plain sequence of IPFIX Messages (RFC 5655 4: no file header; the Message header's
Length delimits each one). Every file is decodable on its own: after a rotation the export session is
reset, so the first Message of the next file carries the Templates again (RFC 5655 8.1: Templates
before the Data Records that use them, within the file). Templates are not refreshed inside a file
(no periodic refresh: a file reader cannot have "restarted").

FileTransport has the UdpTransport interface the Exporter uses (`send` never raises, `last_error`,
`close`). Files are created with O_NOFOLLOW and mode 0640; a rotated file is named
`<stem>.<UTC time>.<n><suffix>` (e.g. `flows.20261201T091500Z.0.ipfix`); without rotation the path is
written as given.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from ipfixer.errors import DecodeError, IpfixerError, TransportError

IPFIX_VERSION = 10
HEADER = struct.Struct("!HHIII")  # RFC 7011 3.1: version, length, export time, sequence, domain
FILE_MODE = 0o640


class FileTransport:
    """Writes each IPFIX Message to the current file; rotates by size and/or time after a write."""

    def __init__(self, path: Path | str, rotate_size: int = 0, rotate_interval_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """Open the first file now, so a bad path fails at start-up naming it."""
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self.rotate_size = rotate_size  # 0: never by size
        self.rotate_interval_s = rotate_interval_s  # None: never by time
        self.clock = clock
        self.on_rotate: Callable[[], None] | None = None  # the session's reset: templates again in the next file
        self.sent = 0
        self.bytes_sent = 0
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self.files: list[Path] = []  # every file opened, oldest first
        self._seq = 0
        self._fd: int | None = None
        self._size = 0
        self._opened_at = 0.0
        try:
            self._open()
        except OSError as e:
            raise TransportError(f"collector {self.name}: cannot create {e.filename or self.path}: "
                                 f"{e.strerror}") from None

    @property
    def rotating(self) -> bool:
        return self.rotate_size > 0 or self.rotate_interval_s is not None

    @property
    def current(self) -> Path | None:
        """The file being written now."""
        return self.files[-1] if self._fd is not None and self.files else None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def _next_path(self) -> Path:
        if not self.rotating:
            return self.path
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        name = f"{self.path.stem}.{stamp}.{self._seq}{self.path.suffix}"
        self._seq += 1
        return self.path.with_name(name)

    def _open(self) -> None:
        target = self._next_path()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(target, flags, FILE_MODE)
        self.files.append(target)
        self._size = 0
        self._opened_at = self.clock()

    def _due(self) -> bool:
        if self.rotate_size and self._size >= self.rotate_size:
            return True
        return self.rotate_interval_s is not None and self.clock() - self._opened_at >= self.rotate_interval_s

    def send(self, message: bytes) -> bool:
        """Append one Message; False (counted by errno name) when it could not be written whole."""
        if self._fd is None:
            return self._fail(0, "ECLOSED")
        try:
            view = memoryview(message)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            return self._fail(e.errno or 0)
        self.sent += 1
        self.bytes_sent += len(message)
        self._size += len(message)
        if self.rotating and self._due():
            self.rotate()
        return True

    def rotate(self) -> None:
        """Close the current file and start the next; the session's next Message carries the Templates."""
        self._close_fd()
        try:
            self._open()
        except OSError as e:
            self._fail(e.errno or 0)
            return
        if self.on_rotate is not None:
            self.on_rotate()

    def _fail(self, code: int, name: str | None = None) -> bool:
        self.last_error = name or errno.errorcode.get(code, f"errno{code}")
        self.errors[self.last_error] += 1
        return False

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the current file (idempotent)."""
        self._close_fd()

    def __repr__(self) -> str:
        return f"FileTransport({str(self.path)!r})"


def read_messages(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, Message) for each IPFIX Message of an IPFIX File; DecodeError naming the offset at the
    first thing that is not one (a wrong version, a length below the header's or past the end)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IpfixerError(f"{path}: cannot read: {e.strerror}") from None
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            raise DecodeError(f"{path}: offset {offset}: {len(data) - offset} trailing bytes, less than a Message "
                              f"header ({HEADER.size})")
        version, length, _, _, _ = HEADER.unpack_from(data, offset)
        if version != IPFIX_VERSION:
            raise DecodeError(f"{path}: offset {offset}: version {version}, not an IPFIX Message (10); "
                              "not an IPFIX File (RFC 5655)?")
        if length < HEADER.size or offset + length > len(data):
            raise DecodeError(f"{path}: offset {offset}: Message length {length} does not fit the file "
                              f"({len(data) - offset} bytes left)")
        yield offset, data[offset:offset + length]
        offset += length
