"""Decoder: state per exporter, unknown/enterprise elements, malformed input -> DecodeError only."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ipfixer.errors import DecodeError
from ipfixer.infomodel import InfoModel
from ipfixer.templates import Template, TemplateField, load_templates
from ipfixer.wire import ipfix, netflow9
from ipfixer.wire.decode import Decoder

TS = load_templates()
V4 = TS["ipv4_nat_flow"]
REC = {
    "sourceIPv4Address": "10.0.0.1",
    "octetDeltaCount": 1234,
    "ctState": 0x22,
    "sourceMacAddress": "02:00:00:00:00:01",
}


def message(*sets: bytes, domain: int = 1) -> bytes:
    return ipfix.encode_message(100, 5, domain, list(sets))


TEMPLATES = ipfix.encode_template_set([V4])
DATA = ipfix.encode_data_set(260, ipfix.encode_data_records(V4, [REC, REC]))
GOOD = message(TEMPLATES, ipfix.encode_options_template_set([TS["options_sampling"]]), DATA,
               ipfix.encode_data_set(259, ipfix.encode_data_records(TS["options_sampling"], [{"samplingInterval": 10}])))  # fmt: skip


def test_templates_then_data() -> None:
    d = Decoder()
    msg = d.feed(GOOD)
    assert (msg.version, msg.export_time, msg.sequence, msg.domain_id, msg.sys_uptime) == (
        10,
        100,
        5,
        1,
        None,
    )
    assert [t.template_id for t in msg.templates] == [260, 259]
    assert msg.templates[0].fields == V4.fields  # same elements and lengths as sent
    r = msg.records[0]
    assert r.fields["ctState"] == 0x22 and r.fields["sourceMacAddress"] == "02:00:00:00:00:01"
    assert msg.records[2].is_options and msg.records[2].fields["samplingInterval"] == 10
    assert d.template(260, domain_id=1) is not None


def test_templates_are_per_source_and_domain() -> None:
    d = Decoder()
    d.feed(message(TEMPLATES), source="a")
    assert d.feed(message(DATA), source="a").records
    assert not d.feed(message(DATA), source="b").records
    assert not d.feed(message(DATA, domain=2), source="a").records
    assert d.stats["unknown_template_sets"] == 2


def test_unknown_enterprise_element_kept_raw() -> None:
    im = InfoModel([e for e in InfoModel.load_default() if e.pen == 0])  # a collector without ipfixer.csv
    msg = Decoder(im).feed(GOOD)
    r = msg.records[0]
    assert r.unknown[(57999, 1)] == b"\x22" and r.fields["pen57999_ie1"] == b"\x22"
    assert r.unknown[(57999, 4)] == bytes(8)


def test_withdrawal_ignored_gracefully() -> None:
    d = Decoder()
    d.feed(GOOD)
    withdraw = bytes.fromhex("0002000801040000")  # RFC 7011 8.1: template 260, field count 0
    msg = d.feed(message(withdraw))
    assert msg.withdrawn == [260] and d.stats["withdrawals"] == 1
    assert not d.feed(message(DATA)).records


VT = Template(
    400, "v", (TemplateField(InfoModel.load_default().by_name("interfaceName"), 65535), *V4.fields[:2])
)


def test_varlen_records() -> None:
    vt = VT
    recs = ipfix.encode_data_records(vt, [{"interfaceName": "x" * 300}, {"interfaceName": "eth0"}])
    msg = Decoder().feed(message(ipfix.encode_template_set([vt]), ipfix.encode_data_set(400, recs)))
    assert [r.fields["interfaceName"] for r in msg.records] == ["x" * 300, "eth0"]


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"", "too short"), (b"\x00\x05" + bytes(30), "unsupported version 5 at offset 0"),
     (GOOD[:10], "shorter than its 16-byte header"),
     (GOOD[:-1], "truncated"), (GOOD + b"\x00", "trailing bytes"),
     (_patch(GOOD, 2, ">H", 8), "length 8 at offset 2"),
     (_patch(GOOD, 18, ">H", 2), "set 2 at offset 16: length 2 < 4"),
     (_patch(GOOD, 18, ">H", 4000), "overruns the message"),
     (_patch(GOOD, 22, ">H", 500), "field specifier .* overflows the set"),
     (_patch(GOOD, 20, ">H", 7), "template id 7 < 256"),
     (_patch(GOOD, 26, ">H", 0), "length 0"),
     (message(bytes.fromhex("0003000a010300010002")), "scope field count 2 not in 1..1"),
     (message(bytes.fromhex("0003000c0103000100000000")), "scope field count 0"),
     (message(ipfix.encode_template_set([VT]), ipfix.encode_data_set(400, b"\x32" + b"x" * 10)), "overruns the set"),
     (message(ipfix.encode_template_set([VT]), ipfix.encode_data_set(400, b"\xff\x01" + b"x" * 10)),
      "length prefix truncated|overruns"),
     (b"\x00\x09" + bytes(10), "shorter than its 20-byte header"),
     (netflow9.encode_packet(0, 0, 0, 0, 1, [bytes.fromhex("000100100103000300040001000400010004")]),
      "multiples of 4")],
)  # fmt: skip
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        Decoder().feed(data)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    d = Decoder()
    for blob in (data, b"\x00\x0a" + data, b"\x00\x09" + data):
        try:
            d.feed(blob)
        except DecodeError:
            pass


V9 = netflow9.encode_packet(1, 2, 3, 4, 3, [
    netflow9.encode_template_flowset([TS["ipv6_flow"]]),
    netflow9.encode_options_template_flowset([TS["options_exporter_stats"]]),
    netflow9.encode_data_flowset(257, netflow9.encode_data_records(TS["ipv6_flow"], [{"vlanId": 3}])),
])  # fmt: skip


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([GOOD, V9]), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       st.integers(0, 400))  # fmt: skip
def test_fuzz_mutated_messages(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    b = bytearray(base)
    for pos, val in flips:
        b[pos % len(b)] = val
    d = Decoder()
    for blob in (bytes(b), bytes(b[: len(b) - cut % len(b)])):
        try:
            d.feed(blob)
        except DecodeError:
            pass


# -- what `ipfixer decode` says about data it cannot read, and the names of coded values -----------------


def test_missing_templates_listed_per_message() -> None:
    d = Decoder()
    msg = d.feed(message(DATA, DATA))
    assert msg.missing_templates == [260, 260] and not msg.records
    assert d.feed(GOOD).missing_templates == []


def test_report_says_once_per_domain_and_template_then_sums_up() -> None:
    import io

    from ipfixer.collector import Report

    out, err = io.StringIO(), io.StringIO()
    r = Report(Decoder(), as_json=False, out=out, err=err)
    for _ in range(3):
        r.feed(message(DATA), "192.0.2.9", "192.0.2.9:4739")  # data before its template: three times
    r.feed(message(DATA, domain=2), "192.0.2.9", "192.0.2.9:4739")  # another domain: said again
    lines = err.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "IPFIX domain 1: data set for template 260 skipped: template 260 not yet received" in lines[0]
    assert "re-send templates periodically" in lines[0] and "template_refresh, 30 s by default" in lines[0]
    assert "IPFIX domain 2: data set for template 260" in lines[1]
    r.feed(GOOD, "192.0.2.9", "192.0.2.9:4739")  # the template arrives for domain 1: records decode
    assert "ctState=34" in out.getvalue()
    r.finish()
    last = err.getvalue().splitlines()[-1]
    assert last == ("ipfixer decode: 1 data set(s) never decoded, their template was never received: "
                    "template 260 from 192.0.2.9 domain 2 (1 set)")  # domain 1 was decoded in the end


def test_coded_values_named_in_text_and_json() -> None:
    import io
    import json

    from ipfixer.collector import Report

    v4 = TS["ipv4_flow"]
    rec = {"flowEndReason": 1, "flowDirection": 1, "protocolIdentifier": 6}
    data = message(ipfix.encode_template_set([v4]), ipfix.encode_data_set(256, ipfix.encode_data_records(v4, [rec])))
    out = io.StringIO()
    Report(Decoder(), as_json=False, out=out, err=io.StringIO()).feed(data, "a", "a:1")
    text = out.getvalue()
    assert "flowEndReason=1 (idle timeout)" in text and "flowDirection=1 (egress flow)" in text
    assert "protocolIdentifier=6 " in text  # no registry in this file for protocol numbers
    out = io.StringIO()
    Report(Decoder(), as_json=True, out=out, err=io.StringIO()).feed(data, "a", "a:1")
    row = json.loads(out.getvalue())
    assert row["flowEndReason"] == 1 and row["names"] == {"flowDirection": "egress flow",
                                                          "flowEndReason": "idle timeout"}


def _pcap(path: str, packets: list[Any]) -> None:
    from scapy.utils import wrpcap

    wrpcap(path, packets)


def test_pcap_with_nothing_on_the_port_says_so(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from scapy.layers.inet import IP, UDP

    from ipfixer.collector import decode_pcap

    p = Path(tmp_path) / "other.pcap"
    _pcap(str(p), [IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5000, dport=2055) / GOOD] * 3
                  + [IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5000, dport=53) / b"x"])  # fmt: skip
    assert decode_pcap(p, port=4739) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.strip() == (f"ipfixer decode: {p}: no UDP datagram to port 4739 among 4 packet(s); "
                               "UDP destination ports seen: 2055 (3), 53 (1); try --port 2055")
    assert decode_pcap(p, port=2055) == 0  # on the right port the records are there
    assert capsys.readouterr().out.count("[template 260]") == 6


def test_pcap_data_before_templates_says_so_once(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from scapy.layers.inet import IP, UDP

    from ipfixer.collector import decode_pcap

    p = Path(tmp_path) / "late.pcap"
    pkt = IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5000, dport=4739)
    _pcap(str(p), [pkt / message(DATA), pkt / message(DATA)])
    assert decode_pcap(p, port=4739) == 0
    err = capsys.readouterr().err.splitlines()
    assert sum("data set for template 260 skipped" in line for line in err) == 1
    assert err[-1].endswith("template 260 from 192.0.2.1 domain 1 (2 sets)")


def test_listen_with_no_traffic_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from ipfixer.collector import listen_and_print

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert listen_and_print("127.0.0.1", port, timeout_s=0.3) == 0
    assert f"no datagram arrived on udp 127.0.0.1:{port} in 0.3 s" in capsys.readouterr().err


def test_record_errors_carry_template_field_and_offset() -> None:
    from ipfixer.errors import FieldDecodeError

    bad = message(ipfix.encode_template_set([VT]), ipfix.encode_data_set(400, b"\x32" + b"x" * 10))
    with pytest.raises(FieldDecodeError) as e:
        Decoder().feed(bad)
    offset = 16 + len(ipfix.encode_template_set([VT])) + 4  # message header, template set, data set header
    assert (e.value.template_id, e.value.field, e.value.offset) == (400, "interfaceName", offset)
    left = len(bad) - offset - 1  # the set's bytes after the 1-byte length prefix (10 + 1 padding)
    assert str(e.value) == (f"template 400 field interfaceName (record at offset {offset}): "
                            f"overruns the set (50 bytes, {left} left)")


def test_report_bounds_what_it_remembers() -> None:
    """A stream of random template ids cannot grow the report without bound or flood the terminal."""
    import io

    from ipfixer.collector import Report

    err = io.StringIO()
    r = Report(Decoder(), as_json=False, out=io.StringIO(), err=err)
    r.MAX_TRACKED = 3
    for tid in range(300, 310):
        r.feed(message(ipfix.encode_data_set(tid, b"\x00" * 8)), "a", "a:1")
    lines = err.getvalue().splitlines()
    assert len(lines) == 4 and "more than 3 unknown templates" in lines[3]
    assert len(r.skipped) == 3 and r.skipped_untracked == 7
    r.finish()
    tail = err.getvalue().splitlines()[-2:]
    assert "3 data set(s) never decoded" in tail[0] and tail[1].endswith("7 more data set(s) of unknown templates not listed")


def test_template_state_is_bounded() -> None:
    d = Decoder(max_templates=2)
    for domain in (1, 2, 3):
        d.feed(message(TEMPLATES, domain=domain))
    assert d.stats["templates_refused"] == 1 and d.template(260, 3) is None and d.template(260, 2) is not None
    d.feed(message(TEMPLATES, domain=1))  # a refresh of a known template is always taken
    assert d.stats["templates_refused"] == 1 and d.feed(message(DATA, domain=1)).records


def test_pcap_formats_and_truncation(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """decode --pcap reads what tcpdump/editcap write (cooked v2 as `tcpdump -i any` writes, pcapng,
    nanosecond pcap) and refuses a truncated capture with its reason instead of decoding part of it."""
    import shutil
    import subprocess
    from pathlib import Path

    from scapy.layers.inet import IP, UDP

    from ipfixer.collector import decode_pcap
    from ipfixer.errors import CaptureError

    if shutil.which("editcap") is None:
        pytest.skip("needs editcap (tshark; run ./setup.sh)")
    base = Path(tmp_path) / "base.pcap"
    pkt = IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5000, dport=4739)
    _pcap(str(base), [pkt / GOOD] * 2)
    from scapy.layers.l2 import CookedLinuxV2
    from scapy.utils import wrpcap

    wrpcap(str(Path(tmp_path) / "sll2.pcap"), [CookedLinuxV2(proto=0x0800) / pkt / GOOD] * 2,
           linktype=276)  # LINUX_SLL2, what `tcpdump -i any` writes
    variants = {
        "sll2.pcap": None,
        "ng.pcapng": ["-F", "pcapng"],
        "nano.pcap": ["-F", "nsecpcap"],
    }
    for name, opts in variants.items():
        out = Path(tmp_path) / name
        if opts is not None:
            subprocess.run(["editcap", *opts, str(base), str(out)], check=True, capture_output=True, timeout=30)
        assert decode_pcap(out, port=4739) == 0, name
        assert capsys.readouterr().out.count("[template 260]") == 4, name
    cut = Path(tmp_path) / "cut.pcap"
    cut.write_bytes(base.read_bytes()[:-7])
    with pytest.raises(CaptureError) as e:
        decode_pcap(cut, port=4739)
    assert str(e.value).startswith(f"{cut}: ") and "truncated" in str(e.value)
    assert capsys.readouterr().out == ""
