"""Golden bytes: encoders reproduce hand-checked RFC layouts in tests/golden/*.hex, decoder reads them."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from ipfixer.infomodel import InfoModel
from ipfixer.templates import Template, TemplateField
from ipfixer.wire import ipfix, netflow9
from ipfixer.wire.decode import Decoder

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
IM = InfoModel.load_default()


def golden(name: str) -> bytes:
    """Hex digits of a golden file; '#' starts a comment, whitespace is ignored."""
    text = (GOLDEN / name).read_text()
    first = text.splitlines()[0]
    assert first.startswith("# RFC"), f"{name} must name the RFC section it reproduces"
    return bytes.fromhex(re.sub(r"\s+", "", re.sub(r"#.*", "", text)))


def tmpl(tid: int, *fields: tuple[str, int], scope: int = 0) -> Template:
    return Template(tid, f"t{tid}", tuple(TemplateField(IM.by_name(n), n_) for n, n_ in fields), scope)


A2 = tmpl(256, ("sourceIPv4Address", 4), ("destinationIPv4Address", 4), ("ipNextHopIPv4Address", 4),
          ("packetDeltaCount", 4), ("octetDeltaCount", 4))  # fmt: skip
A3_RECORDS = [
    {"sourceIPv4Address": "192.0.2.12", "destinationIPv4Address": "192.0.2.254",
     "ipNextHopIPv4Address": "192.0.2.1", "packetDeltaCount": 5009, "octetDeltaCount": 5344385},
    {"sourceIPv4Address": "192.0.2.27", "destinationIPv4Address": "192.0.2.23",
     "ipNextHopIPv4Address": "192.0.2.2", "packetDeltaCount": 748, "octetDeltaCount": 388934},
    {"sourceIPv4Address": "192.0.2.56", "destinationIPv4Address": "192.0.2.65",
     "ipNextHopIPv4Address": "192.0.2.3", "packetDeltaCount": 5, "octetDeltaCount": 6534},
]  # fmt: skip
SAMPLING = tmpl(259, ("observationDomainId", 4), ("samplingInterval", 4), ("samplingAlgorithm", 1), scope=1)


def test_every_golden_file_names_its_rfc() -> None:
    files = sorted(GOLDEN.glob("*.hex"))
    assert len(files) >= 7
    for f in files:
        golden(f.name)


def test_template_set_a21() -> None:
    assert ipfix.encode_template_set([A2]) == golden("rfc7011_a2_template_set.hex")


def test_data_set_a3() -> None:
    records = ipfix.encode_data_records(A2, A3_RECORDS)
    assert ipfix.encode_data_set(256, records) == golden("rfc7011_a3_data_set.hex")


def test_message_header() -> None:
    sets = [
        ipfix.encode_template_set([A2]),
        ipfix.encode_data_set(256, ipfix.encode_data_records(A2, A3_RECORDS)),
    ]
    assert ipfix.encode_message(1700000000, 0, 12345678, sets) == golden("rfc7011_3_1_message.hex")


def test_options_template_set() -> None:
    assert ipfix.encode_options_template_set([SAMPLING]) == golden("rfc7011_3_4_2_options_template_set.hex")


def test_enterprise_field_specifier() -> None:
    t = Template(
        260, "e", (TemplateField(IM.by_name("sourceIPv4Address"), 4), TemplateField(IM.by_name("ctState"), 1))
    )
    assert ipfix.encode_template_set([t]) == golden("rfc7011_3_2_enterprise_field.hex")


def test_netflow9_packet() -> None:
    flowsets = [
        netflow9.encode_template_flowset([A2]),
        netflow9.encode_data_flowset(256, netflow9.encode_data_records(A2, A3_RECORDS)),
    ]
    assert netflow9.encode_packet(5000, 1700000000, 1, 7, 4, flowsets) == golden("rfc3954_5_packet.hex")


def test_netflow9_options_template() -> None:
    assert netflow9.encode_options_template_flowset([SAMPLING]) == golden(
        "rfc3954_6_1_options_template_flowset.hex"
    )


@pytest.mark.parametrize("name", ["rfc7011_3_1_message.hex", "rfc3954_5_packet.hex"])
def test_decoder_reads_golden(name: str) -> None:
    msg = Decoder().feed(golden(name))
    assert [t.template_id for t in msg.templates] == [256]
    assert [r.fields["octetDeltaCount"] for r in msg.records] == [5344385, 388934, 6534]
    assert msg.records[0].fields["ipNextHopIPv4Address"] == ipaddress.IPv4Address("192.0.2.1")
    assert msg.domain_id == (12345678 if msg.version == 10 else 7)
