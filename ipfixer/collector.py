"""`ipfixer decode`: a small collector that prints what an exporter sent, from a UDP port or a pcap.

The decoding itself is the sans-I/O `wire.decode.Decoder`; this module only owns the socket, the
capture file and the output format.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from ipfixer.errors import DecodeError, IpfixerError
from ipfixer.wire.decode import DecodedMessage, Decoder


def _jsonable(value: Any) -> Any:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def message_rows(msg: DecodedMessage, source: str) -> Iterable[dict[str, Any]]:
    """One flat dict per data record, with the message context an operator needs."""
    for rec in msg.records:
        row: dict[str, Any] = {
            "source": source,
            "version": msg.version,
            "domain": msg.domain_id,
            "sequence": msg.sequence,
            "template": rec.template_id,
            "options": rec.is_options,
        }
        for name, value in rec.fields.items():
            row[str(name)] = _jsonable(value)
        yield row


def print_message(msg: DecodedMessage, source: str, as_json: bool, out: TextIO = sys.stdout) -> None:
    """Print a decoded message as JSON lines or as a readable block."""
    if as_json:
        for row in message_rows(msg, source):
            out.write(json.dumps(row, sort_keys=False) + "\n")
        out.flush()
        return
    out.write(
        f"# {source} v{msg.version} domain {msg.domain_id} seq {msg.sequence} "
        f"templates {len(msg.templates)} records {len(msg.records)}\n"
    )
    for row in message_rows(msg, source):
        ctx = f"  [{'options ' if row['options'] else ''}template {row['template']}]"
        fields = " ".join(f"{k}={v}" for k, v in row.items()
                          if k not in ("source", "version", "domain", "sequence", "template", "options"))
        out.write(f"{ctx} {fields}\n")
    out.flush()


def listen_and_print(address: str, port: int, as_json: bool = False, count: int | None = None,
                     timeout_s: float | None = None) -> int:
    """Receive on a UDP port and print every message; malformed datagrams are reported, not fatal."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((address, port))
    except OSError as exc:
        raise IpfixerError(f"cannot listen on {address}:{port}: {exc.strerror}") from None
    print(f"ipfixer decode: listening on udp {address}:{port}", file=sys.stderr, flush=True)
    decoder = Decoder()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen = 0
    errors = 0
    try:
        while count is None or seen < count:
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if deadline is not None and wait == 0.0:
                break
            ready, _, _ = select.select([sock], [], [], min(wait, 1.0))
            if not ready:
                continue
            data, peer = sock.recvfrom(65535)
            source = f"{peer[0]}:{peer[1]}"
            try:
                msg = decoder.feed(data, source=peer[0])
            except DecodeError as exc:
                errors += 1
                print(f"ipfixer decode: {source}: malformed message: {exc}", file=sys.stderr)
                continue
            seen += 1
            print_message(msg, source, as_json)
    finally:
        sock.close()
    return 0 if errors == 0 else 1


def decode_pcap(path: Path, as_json: bool = False, port: int | None = None) -> int:
    """Decode the IPFIX / NetFlow v9 datagrams of a capture file (UDP to `port`, or any UDP if None)."""
    from scapy.layers.inet import UDP
    from scapy.utils import PcapReader

    if not path.exists():
        raise IpfixerError(f"{path}: no such capture file")
    decoder = Decoder()
    errors = 0
    try:
        reader = PcapReader(str(path))
    except Exception as exc:  # scapy raises plain Scapy_Exception for a bad file
        raise IpfixerError(f"{path}: not a capture file: {exc}") from None
    with reader:
        for pkt in reader:
            if UDP not in pkt:
                continue
            udp = pkt[UDP]
            if port is not None and udp.dport != port:
                continue
            src = pkt.payload.src if hasattr(pkt.payload, "src") else "?"
            try:
                msg = decoder.feed(bytes(udp.payload), source=src)
            except DecodeError as exc:
                errors += 1
                print(f"ipfixer decode: {path}: {src}: malformed message: {exc}", file=sys.stderr)
                continue
            print_message(msg, f"{src}:{udp.sport}", as_json)
    return 0 if errors == 0 else 1
