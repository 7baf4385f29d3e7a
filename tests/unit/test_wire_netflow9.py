"""NetFlow v9 encoder (RFC 3954): header, template/options flowsets, scope types, limits."""

from __future__ import annotations

import pytest

from ipfixer.errors import EncodeError
from ipfixer.infomodel import VARLEN, InfoModel
from ipfixer.templates import Template, TemplateField, load_templates
from ipfixer.wire import netflow9
from ipfixer.wire.decode import Decoder

IM = InfoModel.load_default()
TS = load_templates()


def test_header_layout() -> None:
    p = netflow9.encode_packet(1, 2, 2**32 + 3, 4, 0, [])
    assert p == bytes.fromhex("0009000000000001000000020000000300000004")
    assert len(p) == netflow9.PACKET_HEADER_LEN


def test_flowsets_are_padded_to_4() -> None:
    fs = netflow9.encode_data_flowset(300, b"\x01\x02\x03\x04\x05")
    assert fs == bytes.fromhex("012c000c0102030405000000")  # RFC 3954 5.3
    for t in TS.values():
        if t.is_options:
            enc = netflow9.encode_options_template_flowset([t])
            assert len(enc) % 4 == 0 and len(enc) == netflow9.options_template_flowset_length([t])


def test_scope_types() -> None:
    assert netflow9.v9_scope_type(IM.by_name("observationDomainId")) == netflow9.SCOPE_SYSTEM
    assert netflow9.v9_scope_type(IM.by_name("ingressInterface")) == netflow9.SCOPE_INTERFACE
    assert netflow9.v9_scope_type(IM.by_name("lineCardId")) == netflow9.SCOPE_LINE_CARD
    assert netflow9.v9_scope_type(IM.by_name("templateId")) == netflow9.SCOPE_TEMPLATE
    with pytest.raises(EncodeError, match="no NetFlow v9 scope type"):
        netflow9.v9_scope_type(IM.by_name("vlanId"))


def test_option_lengths_in_bytes() -> None:
    enc = netflow9.encode_options_template_flowset([TS["options_exporter_stats"]])
    # RFC 3954 6.1: scope length 2 fields * 4 bytes = 8, option length 7 * 4 = 28
    assert enc[4:10] == bytes.fromhex("01020008001c")


def test_no_enterprise_or_varlen() -> None:
    with pytest.raises(EncodeError, match="enterprise elements cannot be sent in NetFlow v9"):
        netflow9.encode_template_flowset([TS["ipv4_nat_flow"]])
    t = Template(300, "v", (TemplateField(IM.by_name("interfaceName"), VARLEN),))
    with pytest.raises(EncodeError, match="variable-length"):
        netflow9.encode_data_records(t, [{}])


def test_v9_round_trip() -> None:
    t = TS["ipv6_flow"]
    rec = {"sourceIPv6Address": "2001:db8::1", "octetDeltaCount": 99, "flowDirection": 1, "vlanId": 10}
    stats = TS["options_exporter_stats"]
    flowsets = [
        netflow9.encode_template_flowset([t]),
        netflow9.encode_options_template_flowset([stats]),
        netflow9.encode_data_flowset(257, netflow9.encode_data_records(t, [rec] * 3)),
        netflow9.encode_data_flowset(258, netflow9.encode_data_records(stats, [{"observationDomainId": 7,
                                                                                "exportedMessageTotalCount": 5}])),
    ]  # fmt: skip
    msg = Decoder().feed(netflow9.encode_packet(10, 20, 30, 7, 6, flowsets))
    assert (msg.version, msg.sys_uptime, msg.export_time, msg.sequence, msg.domain_id, msg.count) == (
        9,
        10,
        20,
        30,
        7,
        6,
    )
    assert len(msg.records) == 4
    assert str(msg.records[0].fields["sourceIPv6Address"]) == "2001:db8::1"
    assert msg.records[0].fields["vlanId"] == 10
    opt = msg.records[3]
    assert opt.is_options and opt.fields["scopeSystem"] == 7 and opt.fields["exportedMessageTotalCount"] == 5
