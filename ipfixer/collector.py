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
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from ipfixer.errors import DecodeError, IpfixerError
from ipfixer.infomodel import InfoModel
from ipfixer.wire.decode import DecodedMessage, DecodedRecord, Decoder


def _jsonable(value: Any) -> Any:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _value_names(infomodel: InfoModel, rec: DecodedRecord) -> dict[str, str]:
    """IANA's names of the record's coded values (flowEndReason 1 -> 'idle timeout')."""
    names: dict[str, str] = {}
    for key, value in rec.fields.items():
        if key in infomodel:
            name = infomodel.value_name(infomodel.by_name(key), value)
            if name is not None:
                names[key] = name
    return names


def message_rows(msg: DecodedMessage, source: str, infomodel: InfoModel | None = None) -> Iterable[dict[str, Any]]:
    """One flat dict per data record, with the message context an operator needs; with an infomodel,
    `names` holds the registry's names of coded values (present only when there are some)."""
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
        if infomodel is not None:
            names = _value_names(infomodel, rec)
            if names:
                row["names"] = names
        yield row


_CONTEXT_KEYS = ("source", "version", "domain", "sequence", "template", "options", "names")


def print_message(msg: DecodedMessage, source: str, as_json: bool, out: TextIO | None = None,
                  infomodel: InfoModel | None = None) -> None:
    """Print a decoded message as JSON lines or as a readable block (coded values named)."""
    out = out or sys.stdout
    if as_json:
        for row in message_rows(msg, source, infomodel):
            out.write(json.dumps(row, sort_keys=False) + "\n")
        out.flush()
        return
    out.write(
        f"# {source} v{msg.version} domain {msg.domain_id} seq {msg.sequence} "
        f"templates {len(msg.templates)} records {len(msg.records)}\n"
    )
    for row in message_rows(msg, source, infomodel):
        ctx = f"  [{'options ' if row['options'] else ''}template {row['template']}]"
        names = row.get("names", {})
        fields = " ".join(f"{k}={v} ({names[k]})" if k in names else f"{k}={v}"
                          for k, v in row.items() if k not in _CONTEXT_KEYS)  # fmt: skip
        out.write(f"{ctx} {fields}\n")
    out.flush()


TEMPLATE_HINT = (
    "exporters re-send templates periodically over UDP (RFC 7011 8.4; ipfixer every collectors[].template_refresh, "
    "30 s by default, and every 20 messages): records decode from the next refresh on"
)


class Report:
    """Prints what arrives and says what cannot be read: once per (exporter, version, domain, template
    id) a data set whose template was never seen, and at the end what stayed unreadable."""

    MAX_TRACKED = 4096  # (exporter, version, domain, template id) keys remembered

    def __init__(self, decoder: Decoder, as_json: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.decoder, self.as_json = decoder, as_json
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.messages = 0
        self.errors = 0
        self.skipped: Counter[tuple[str, int, int, int]] = Counter()  # data sets without a template
        self.skipped_untracked = 0  # beyond MAX_TRACKED keys (a hostile stream of random ids): counted only

    def feed(self, data: bytes, source: str, label: str) -> None:
        """Decode one datagram from `source` (an address) and print it; malformed ones are reported."""
        try:
            msg = self.decoder.feed(data, source=source)
        except DecodeError as exc:
            self.errors += 1
            print(f"ipfixer decode: {label}: malformed message: {exc}", file=self.err, flush=True)
            return
        self.messages += 1
        for tid in msg.missing_templates:
            key = (source, msg.version, msg.domain_id, tid)
            if key not in self.skipped and len(self.skipped) >= self.MAX_TRACKED:
                if not self.skipped_untracked:
                    print(f"ipfixer decode: {label}: more than {self.MAX_TRACKED} unknown templates; "
                          "further ones are counted, not listed", file=self.err, flush=True)  # fmt: skip
                self.skipped_untracked += 1
                continue
            if key not in self.skipped:
                kind = "IPFIX" if msg.version == 10 else "NetFlow v9"
                print(f"ipfixer decode: {label}: {kind} domain {msg.domain_id}: data set for template {tid} "
                      f"skipped: template {tid} not yet received; {TEMPLATE_HINT}", file=self.err, flush=True)  # fmt: skip
            self.skipped[key] += 1
        print_message(msg, label, self.as_json, self.out, self.decoder.infomodel)

    def finish(self) -> None:
        """At the end: the data sets that were never readable, per template."""
        never = {k: n for k, n in self.skipped.items() if self.decoder.template(k[3], k[2], k[0], k[1]) is None}
        if never:
            listed = sorted(never.items())[:20]
            what = ", ".join(f"template {tid} from {src} domain {dom} ({n} set{'s' if n > 1 else ''})"
                             for (src, _v, dom, tid), n in listed)  # fmt: skip
            if len(never) > len(listed):
                what += f", and {len(never) - len(listed)} more templates"
            print(f"ipfixer decode: {sum(never.values())} data set(s) never decoded, their template was never "
                  f"received: {what}", file=self.err, flush=True)  # fmt: skip
        if self.skipped_untracked:
            print(f"ipfixer decode: {self.skipped_untracked} more data set(s) of unknown templates not listed",
                  file=self.err, flush=True)


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
    report = Report(Decoder(), as_json)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    datagrams = 0
    try:
        while count is None or report.messages < count:  # decoded messages, as before
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if deadline is not None and wait == 0.0:
                break
            ready, _, _ = select.select([sock], [], [], min(wait, 1.0))
            if not ready:
                continue
            data, peer = sock.recvfrom(65535)
            datagrams += 1
            report.feed(data, peer[0], f"{peer[0]}:{peer[1]}")
    finally:
        sock.close()
        if datagrams == 0 and timeout_s is not None:
            print(f"ipfixer decode: no datagram arrived on udp {address}:{port} in {timeout_s:g} s", file=sys.stderr)
        report.finish()
    return 0 if report.errors == 0 else 1


def decode_pcap(path: Path, as_json: bool = False, port: int | None = None) -> int:
    """Decode the IPFIX / NetFlow v9 datagrams of a capture file (UDP to `port`, or any UDP if None).

    The file is read and validated by ipfixer.sources.capture (pcap in us or ns, pcapng, every link type replay
    reads; a truncated or foreign file is refused with its reason); scapy only dissects each frame, by the
    class it registers for the frame's link type."""
    import scapy.layers.inet6  # noqa: F401  (registers the IP, IPv6 and raw-IP link types)
    import scapy.layers.l2  # noqa: F401  (registers Ethernet, cooked and loopback link types)
    from scapy.config import conf
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6

    from ipfixer.sources.capture import CaptureFile

    if not path.exists():
        raise IpfixerError(f"{path}: no such capture file")
    report = Report(Decoder(), as_json)
    packets = 0
    ports: Counter[int] = Counter()  # UDP destination ports seen, for the hint when nothing matched
    with CaptureFile(path) as capture:  # CaptureError (an IpfixerError) names the file and the reason
        for frame in capture:
            packets += 1
            layer: Any = conf.l2types.get(frame.linktype)  # a Packet class; scapy types it loosely
            if layer is None:
                continue
            try:
                pkt = layer(frame.data)
            except Exception:  # scapy's dissectors raise assorted errors on hostile bytes: not ours to decode
                continue
            if UDP not in pkt:
                continue
            udp = pkt[UDP]
            ports[int(udp.dport)] += 1
            if port is not None and udp.dport != port:
                continue
            ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
            src = str(ip.src) if ip is not None else "?"
            report.feed(bytes(udp.payload), src, f"{path}: {src}:{udp.sport}")
    matched = sum(ports.values()) if port is None else ports[port]
    if matched == 0:
        where = "UDP datagram" if port is None else f"UDP datagram to port {port}"
        seen = ", ".join(f"{p} ({n})" for p, n in ports.most_common(5))
        hint = f"; UDP destination ports seen: {seen}; try --port {ports.most_common(1)[0][0]}" if ports else ""
        print(f"ipfixer decode: {path}: no {where} among {packets} packet(s){hint}", file=sys.stderr)
    report.finish()
    return 0 if report.errors == 0 and matched else 1


def decode_file(path: Path, as_json: bool = False) -> int:
    """`ipfixer decode --file`: print the records of an IPFIX File; 1 if anything in it was unreadable."""
    from ipfixer.export.files import read_messages

    if not path.exists():
        raise IpfixerError(f"{path}: no such file")
    report = Report(Decoder(), as_json)
    try:
        for offset, message in read_messages(path):
            report.feed(message, str(path), f"{path}@{offset}")
    except DecodeError as exc:
        report.errors += 1
        print(f"ipfixer decode: {exc}", flush=True, file=report.err)
    report.finish()
    return 0 if report.errors == 0 and report.messages else 1
