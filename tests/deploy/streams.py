"""Test collectors for IPFIX over TCP/TLS: a listener thread keeping each connection's bytes, and the
stream split into Messages by their header Length (RFC 7011 3.1), decoded with a fresh Decoder per
connection (a Transport Session's Templates belong to it alone, RFC 7011 8)."""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
from collections import defaultdict
from typing import Any

from ipfixer.wire.decode import Decoder


class StreamCollector:
    """A real TCP (or TLS) listener on 127.0.0.1; `connections()` is the bytes of each connection so far."""

    def __init__(self, tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.tls = tls
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._data: list[bytearray] = []
        self.handshake_errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conns: list[tuple[Any, bytearray]] = []
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock] + [c for c, _ in conns], [], [], 0.1)
            for r in ready:
                if r is self.sock:
                    conn, _ = self.sock.accept()
                    if self.tls is not None:
                        conn.settimeout(5)
                        try:
                            conn = self.tls.wrap_socket(conn, server_side=True)
                        except (ssl.SSLError, OSError) as exc:
                            self.handshake_errors.append(str(exc))
                            conn.close()
                            continue
                    buf = bytearray()
                    with self._lock:
                        self._data.append(buf)
                    conns.append((conn, buf))
                    continue
                for i, (c, buf) in enumerate(conns):
                    if c is r:
                        try:
                            chunk = c.recv(65536)
                        except (OSError, ssl.SSLError):
                            chunk = b""
                        if chunk:
                            with self._lock:
                                buf += chunk
                        else:
                            c.close()
                            conns.pop(i)
                        break
        for c, _ in conns:
            c.close()

    def connections(self) -> list[bytes]:
        with self._lock:
            return [bytes(b) for b in self._data]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def split_messages(stream: bytes) -> list[bytes]:
    """IPFIX Messages of a stream (a trailing partial Message is left out)."""
    out, pos = [], 0
    while pos + 16 <= len(stream):
        version, length = struct.unpack_from("!HH", stream, pos)
        assert version == 10 and length >= 16, (pos, version, length)
        if pos + length > len(stream):
            break
        out.append(stream[pos:pos + length])
        pos += length
    return out


def template_sets(message: bytes) -> list[bytes]:
    """The Template and Options Template Sets of a Message, as bytes."""
    sets, pos = [], 16
    while pos + 4 <= len(message):
        set_id, set_len = struct.unpack_from("!HH", message, pos)
        if set_id in (2, 3):
            sets.append(message[pos:pos + set_len])
        pos += max(set_len, 4)
    return sets


def decode_connection(stream: bytes) -> tuple[dict[tuple[str, int], list[int]], Decoder]:
    """(source, source port) -> [packets, octets] over one connection, decoded on its own; asserts that
    the connection starts with the data Templates, never repeats a Template Set and never lacks one."""
    decoder = Decoder()
    flows: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    seen: set[bytes] = set()
    messages = split_messages(stream)
    if messages:
        assert struct.unpack_from("!H", messages[0], 16)[0] == 2, "a connection must start with the Templates"
    for m in messages:
        for t in template_sets(m):
            assert t not in seen, "a Template Set sent twice on one connection"
            seen.add(t)
        msg = decoder.feed(m, source="tcp")
        assert msg.missing_templates == []
        for r in msg.records:
            if not r.is_options:
                src = r.fields.get("sourceIPv4Address", r.fields.get("sourceIPv6Address"))
                key = (str(src), int(r.fields.get("sourceTransportPort", 0)))
                flows[key][0] += r.fields["packetDeltaCount"]
                flows[key][1] += r.fields["octetDeltaCount"]
    return dict(flows), decoder
