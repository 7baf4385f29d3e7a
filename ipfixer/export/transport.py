"""UDP transport to one Collector (RFC 7011 10.3 / RFC 3954): the only socket in the exporting process.

The socket is connect()ed so the kernel reports an ICMP port-unreachable from the collector as
ECONNREFUSED on a later send (Linux udp(7)); a send error is counted by errno name and the next message
is simply tried again, so a collector that is down never stops the exporter or the other collectors.
"""

from __future__ import annotations

import errno
import socket
from collections import Counter
from typing import Self

from ipfixer.errors import TransportError

# Errors a UDP send can hit while the exporter must keep going; anything else is counted as well.
EXPECTED_SEND_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EAGAIN, errno.EMSGSIZE, errno.ENOBUFS}
)


class UdpTransport:
    """A non-blocking, connected UDP socket to host:port; send() never raises."""

    def __init__(self, host: str, port: int) -> None:
        """Resolve the collector now so a wrong name fails at start-up, naming the collector."""
        self.host = host
        self.port = port
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 literal: RFC 3986 3.2.2
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
        except (socket.gaierror, UnicodeError, OverflowError) as e:
            raise TransportError(f"collector {self.name}: cannot resolve {host!r}: {e}") from None
        if not infos:
            raise TransportError(f"collector {self.name}: {host!r} resolves to no address")
        family, type_, proto, _, sockaddr = infos[0]
        self.address: tuple[str, int] = (str(sockaddr[0]), int(sockaddr[1]))
        try:
            self._sock: socket.socket | None = socket.socket(family, type_, proto)
            self._sock.setblocking(False)
            self._sock.connect(sockaddr)
        except OSError as e:
            raise TransportError(f"collector {self.name}: cannot open UDP socket to {sockaddr}: {e}") from None
        self.sent = 0
        self.bytes_sent = 0
        self.errors: Counter[str] = Counter()  # errno name -> count, e.g. {"ECONNREFUSED": 2}
        self.last_error: str | None = None  # errno name of the latest failed send

    @property
    def error_count(self) -> int:
        """Total failed sends."""
        return sum(self.errors.values())

    def local_address(self) -> tuple[str, int]:
        """The socket's own address (the exporter address a collector sees)."""
        if self._sock is None:
            raise TransportError(f"collector {self.name}: transport is closed")
        addr = self._sock.getsockname()
        return str(addr[0]), int(addr[1])

    def send(self, datagram: bytes) -> bool:
        """Send one message; False (and counted by errno name) when the kernel refused it."""
        if self._sock is None:
            self.last_error = "ECLOSED"
            self.errors["ECLOSED"] += 1
            return False
        try:
            n = self._sock.send(datagram)
        except OSError as e:
            code = e.errno if e.errno is not None else 0
            self.last_error = errno.errorcode.get(code, f"errno{code}")
            self.errors[self.last_error] += 1
            return False
        self.sent += 1
        self.bytes_sent += n
        return True

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UdpTransport({self.host!r}, {self.port})"
