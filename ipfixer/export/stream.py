"""IPFIX over TCP (RFC 7011 10.4) and over TLS (RFC 7011 11): a stream transport to one Collector.

The Exporter's interface, as UdpTransport: `send(message)` never raises and never blocks (the socket is
non-blocking; what the kernel does not take now waits in a bounded queue), `last_error`, `close()`.

- One Transport Session per connection: the Templates go out once at the start of each connection (the
  `on_connect` callback returns the session's template messages), never refreshed within it (RFC 7011
  8: refresh is for UDP). Templates change only when the config is reloaded, which builds a new session
  and a new connection: the old one ends with a withdrawal of all its Data Templates (RFC 7011 8.1),
  then FIN (which ends the Options Templates with the Transport Session).
- Disconnected (collector down, connection reset): messages are kept, up to `buffer_messages`, and sent
  after the next connection's Templates; beyond the bound a message is refused (send() False, so the
  Exporter counts its records as not sent). Messages written but not yet acknowledged by the peer's TCP
  (the socket's SIOCOUTQ) when the connection fails are sent again on the next one.
- Reconnect attempts are spaced by `reconnect_interval` (default 60 s), doubling after each failure up to
  16 times that: never more often than the interval (RFC 7011 10.4: do not hammer a Collector).
- TLS (RFC 7011 11.1: mutual authentication possible): the Collector's certificate is verified against
  `ca_file` (or the system store) and `server_name`; an optional client certificate is presented.
  TLS 1.2 at least.

Hand-written (no library does non-blocking IPFIX streaming): the only framing knowledge used is the
Message header's Length and the leading Sets' IDs and lengths: a Template or Options Template Set
already written on this connection is taken out of a later message (a message queued after a session
reset, a resent one, or the options templates each options message carries for UDP's sake).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import select
import socket
import ssl
import struct
import termios
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipfixer.errors import TransportError

log = logging.getLogger("ipfixer.export")

TEMPLATE_SET_IDS = (2, 3)  # RFC 7011 3.3.2: Template Set, Options Template Set
HEADER_LEN = 16  # RFC 7011 3.1
MAX_BACKOFF_FACTOR = 16
CLOSE_FLUSH_S = 5.0  # at close, how long to try delivering what is queued


@dataclass(frozen=True)
class TlsOptions:
    """How the Collector is authenticated (and we, optionally)."""

    ca_file: str | None = None  # None: the system's trust store
    server_name: str | None = None  # None: the collector's address
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca_file:
            ctx.load_verify_locations(cafile=self.ca_file)
        else:
            ctx.load_default_certs()
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def split_leading_template_sets(message: bytes) -> tuple[list[bytes], bytes]:
    """(the Template / Options Template Sets the message starts with, the rest of its Sets)."""
    sets, pos = [], HEADER_LEN
    while pos + 4 <= len(message):
        set_id, set_len = struct.unpack_from("!HH", message, pos)
        if set_id not in TEMPLATE_SET_IDS or set_len < 4 or pos + set_len > len(message):
            break
        sets.append(message[pos:pos + set_len])
        pos += set_len
    return sets, message[pos:]


def without_sets_sent(message: bytes, sent: set[bytes]) -> bytes | None:
    """The message without the leading Template Sets already sent on this connection (header Length
    fixed; RFC 7011 8: a Template once per Transport Session); None when nothing else is left in it.
    Records the Template Sets it keeps in `sent`."""
    sets, rest = split_leading_template_sets(message)
    if not sets:
        return message
    keep = [t for t in sets if t not in sent]
    sent.update(keep)
    if len(keep) == len(sets):
        return message
    body = b"".join(keep) + rest
    if not body:
        return None
    header = bytearray(message[:HEADER_LEN])
    struct.pack_into("!H", header, 2, HEADER_LEN + len(body))
    return bytes(header) + body


class StreamTransport:
    """A TCP (or TLS) connection to host:port that reconnects, queues and resends; send() never raises."""

    def __init__(self, host: str, port: int, *, tls: TlsOptions | None = None, reconnect_interval_s: float = 60.0,
                 buffer_messages: int = 4096, clock: Callable[[], float] = time.monotonic,
                 on_connect: Callable[[], list[bytes]] | None = None,
                 on_close: Callable[[], list[bytes]] | None = None) -> None:
        self.host, self.port = host, port
        self.scheme = "tls" if tls is not None else "tcp"
        self.name = f"{self.scheme}://[{host}]:{port}" if ":" in host else f"{self.scheme}://{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError, OverflowError) as e:
            raise TransportError(f"collector {self.name}: cannot resolve {host!r}: {e}") from None
        family, _, _, _, sockaddr = infos[0]
        self._family: int = int(family)
        self._sockaddr: tuple[str, int] | tuple[str, int, int, int] = sockaddr  # type: ignore[assignment]
        self.tls = tls
        try:
            self._ctx = tls.context() if tls is not None else None
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"collector {self.name}: TLS setup failed: {e}") from None
        self.reconnect_interval_s = reconnect_interval_s
        self.buffer_messages = buffer_messages
        self.clock = clock
        self.on_connect = on_connect  # the session's template messages, sent first on every connection
        self.on_close = on_close  # the withdrawal of them all, sent last (RFC 7011 8.1)
        self.sent = 0
        self.bytes_sent = 0
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self.connects = 0
        self.dropped_messages = 0  # refused: the queue was full while the collector was unreachable
        self.resent_messages = 0  # written but unacknowledged when a connection failed, sent again
        self._queue: deque[bytes] = deque()  # waiting for a connection (or for the kernel to take them)
        self._sock: socket.socket | None = None
        self._state = "down"  # down | connecting | handshake | up
        self._failures = 0
        self._next_attempt = 0.0
        self._out = b""  # the head message being written (as written on this connection), how much went
        self._out_pos = 0
        self._out_original = b""  # ... and as queued: what is resent on another connection
        self._unacked: deque[tuple[int, bytes]] = deque()  # (stream offset of its end, message as queued)
        self._written = 0  # bytes written on this connection
        self._sent_sets: set[bytes] = set()  # Template Sets written on this connection
        self._closed = False
        self._pump()  # first connection attempt now (non-blocking)

    # -- the Exporter's interface ------------------------------------------------------------------
    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def connected(self) -> bool:
        return self._state == "up"

    @property
    def queued(self) -> int:
        """Messages waiting for the collector (not counting one partly written)."""
        return len(self._queue)

    def send(self, message: bytes) -> bool:
        """Queue one Message and write what the socket takes now; False only when the queue is full."""
        if self._closed:
            return self._error("ECLOSED")
        self._pump()
        if len(self._queue) >= self.buffer_messages:
            self.dropped_messages += 1
            return self._error("EQUEUEFULL")
        self._queue.append(message)
        self._pump()
        return True

    def poll(self) -> None:
        """Advance the connection and write what is queued, with nothing new to send."""
        if not self._closed:
            self._pump()

    def close(self) -> None:
        """Deliver what is queued (bounded in time), then close the connection (FIN): every Template of
        this Transport Session is withdrawn with it (RFC 7011 8.1)."""
        if self._closed:
            return
        deadline = time.monotonic() + CLOSE_FLUSH_S
        self._next_attempt = 0.0
        if self.on_close is not None and (self._state == "up" or self._queue):
            self._queue.extend(self.on_close())
        while (self._queue or self._out) and time.monotonic() < deadline:
            self._pump()
            if self._state == "down" and self._failures:
                break  # unreachable: what is queued is lost, counted below
            if self._sock is not None:
                select.select([], [self._sock], [], 0.05)
        if self._queue or self._out:
            lost = len(self._queue) + (1 if self._out else 0)
            log.warning("collector=%s closing with %d message(s) undelivered", self.name, lost)
            self.errors["EUNDELIVERED"] += lost
        self._drop_connection(requeue=False)
        self._closed = True

    # -- connection state machine -------------------------------------------------------------------
    def _error(self, name: str) -> bool:
        self.last_error = name
        self.errors[name] += 1
        return False

    def _pump(self) -> None:
        """Advance the connection (connect, handshake) and write as much as the socket takes."""
        for _ in range(3):  # down -> connecting -> handshake -> up within one call when it is quick
            before = self._state
            if self._state == "down":
                self._try_connect()
            elif self._state == "connecting":
                self._check_connected()
            elif self._state == "handshake":
                self._handshake()
            if self._state == before:
                break
        if self._state == "up":
            self._write()

    def _try_connect(self) -> None:
        if self.clock() < self._next_attempt:
            return
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex(self._sockaddr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self._failed(errno.errorcode.get(rc, f"errno{rc}"))
            return
        self._sock = sock
        self._state = "connecting"

    def _check_connected(self) -> None:
        assert self._sock is not None
        _, writable, _ = select.select([], [self._sock], [], 0)
        if not writable:
            return
        rc = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            self._drop_connection(requeue=True)
            self._failed(errno.errorcode.get(rc, f"errno{rc}"))
            return
        if self._ctx is not None:
            assert self.tls is not None
            self._sock = self._ctx.wrap_socket(self._sock, server_hostname=self.tls.server_name or self.host,
                                               do_handshake_on_connect=False)
            self._state = "handshake"
        else:
            self._established()

    def _handshake(self) -> None:
        assert isinstance(self._sock, ssl.SSLSocket)
        try:
            self._sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except ssl.SSLCertVerificationError as e:
            log.error("collector=%s: certificate not accepted: %s", self.name, e.verify_message or e)
            self._drop_connection(requeue=True)
            self._failed("TLS_VERIFY")
            return
        except (ssl.SSLError, OSError) as e:
            log.warning("collector=%s: TLS handshake failed: %s", self.name, e)
            self._drop_connection(requeue=True)
            self._failed("TLS_HANDSHAKE")
            return
        self._established()

    def _established(self) -> None:
        self._state = "up"
        self.connects += 1
        self._failures = 0
        self._written = 0
        self._unacked.clear()
        self._sent_sets.clear()
        prelude = self.on_connect() if self.on_connect is not None else []
        self._queue.extendleft(reversed(prelude))  # this connection's Templates first
        log.info("collector=%s connected (connection %d, %d message(s) queued)", self.name, self.connects,
                 len(self._queue))

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self._error(reason)
        delay = self.reconnect_interval_s * min(MAX_BACKOFF_FACTOR, 2 ** (self._failures - 1))
        self._next_attempt = self.clock() + delay
        if self._failures == 1 or self._failures % 10 == 0:
            log.warning("collector=%s unreachable (%s); %d message(s) kept, next attempt in %gs", self.name,
                        reason, len(self._queue), delay)

    def _write(self) -> None:
        assert self._sock is not None
        while True:
            if not self._out:
                if not self._queue:
                    break
                original = self._queue.popleft()
                message = without_sets_sent(original, self._sent_sets)
                if message is None:
                    continue  # only Templates this connection already carries
                self._out, self._out_pos, self._out_original = message, 0, original
            try:
                n = self._sock.send(self._out[self._out_pos:])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except (OSError, ssl.SSLError) as e:
                code = getattr(e, "errno", None) or 0
                self._drop_connection(requeue=True)
                self._failed(errno.errorcode.get(code, type(e).__name__))
                return
            self._out_pos += n
            self._written += n
            if self._out_pos >= len(self._out):
                self._unacked.append((self._written, self._out_original))
                self.sent += 1
                self.bytes_sent += len(self._out)
                self._out, self._out_pos = b"", 0
        self._prune_acked()

    def _prune_acked(self) -> None:
        """Forget written messages the peer's TCP acknowledged (SIOCOUTQ: bytes not yet acknowledged)."""
        if not self._unacked or self._sock is None:
            return
        try:
            buf = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            outq = struct.unpack("i", buf)[0]
        except OSError:
            return
        if self._ctx is not None:  # TLS: records are bigger than the messages; only "all acknowledged" is exact
            if outq == 0:
                self._unacked.clear()
            return
        acked = self._written - outq
        while self._unacked and self._unacked[0][0] <= acked:
            self._unacked.popleft()

    def _drop_connection(self, requeue: bool) -> None:
        """Close the socket; with `requeue`, what may not have reached the collector goes back in front."""
        if requeue:
            again = [m for _, m in self._unacked]
            if self._out:
                again.append(self._out_original)
            self.resent_messages += len(again)
            self._queue.extendleft(reversed(again))
        self._unacked.clear()
        self._out, self._out_pos = b"", 0
        if self._sock is not None:
            try:
                if self._state == "up":
                    self._sock.shutdown(socket.SHUT_WR)  # RFC 7011 10.4.1.2: a graceful close, FIN
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        self._state = "down"

    def __repr__(self) -> str:
        return f"StreamTransport({self.name!r})"


def withdraw_all_message(sequence: int, domain_id: int, export_time: int) -> bytes:
    """An IPFIX Message withdrawing every Data Template of the Transport Session (RFC 7011 8.1: Template
    ID 2 in a Template Set, Field Count 0). The Options Templates go with the connection's end: tshark
    4.0 reports the 4-byte Options Template withdrawal record as malformed, and a collector that fails
    on it could drop the whole message."""
    sets = struct.pack("!HHHH", 2, 8, 2, 0)
    return struct.pack("!HHIII", 10, HEADER_LEN + len(sets), export_time & 0xFFFFFFFF, sequence, domain_id) + sets


def from_config(collector: Any, session: Any) -> StreamTransport:
    """The transport of a `transport: tcp | tls` CollectorConfig, sending its session's Templates first on
    every connection."""
    tls = None
    if collector.transport == "tls":
        t = collector.tls
        tls = TlsOptions() if t is None else TlsOptions(
            ca_file=str(t.ca_file) if t.ca_file else None, server_name=t.server_name,
            cert_file=str(t.cert_file) if t.cert_file else None, key_file=str(t.key_file) if t.key_file else None)
    return StreamTransport(collector.address, collector.port, tls=tls,
                           reconnect_interval_s=collector.reconnect_interval, buffer_messages=collector.buffer_messages,
                           on_connect=lambda: [m.data for m in session.template_messages(time.time_ns(), force=True)],
                           on_close=lambda: [withdraw_all_message(session.sequence, session.domain_id, int(time.time()))])
