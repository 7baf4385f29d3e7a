"""Template files: shipped templates load; every rule names file, template id and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipfixer.errors import TemplateError
from ipfixer.infomodel import VARLEN, InfoModel
from ipfixer.templates import DEFAULT_TEMPLATES_DIR, load_template_file, load_templates

IM = InfoModel.load_default()
FLOW_FIELDS = [
    "sourceTransportPort", "destinationTransportPort", "protocolIdentifier", "tcpControlBits",
    "ipClassOfService", "octetDeltaCount", "packetDeltaCount", "flowStartMilliseconds", "flowEndMilliseconds",
    "flowDirection", "ingressInterface", "egressInterface", "sourceMacAddress", "destinationMacAddress",
    "ethernetType", "vlanId", "flowEndReason",
]  # fmt: skip


def test_shipped_templates() -> None:
    ts = load_templates()
    assert {t.template_id for t in ts.values()} == {256, 257, 258, 259, 260, 261, 262, 263, 264, 265, 266, 267, 268, 269, 272, 273}
    v4, v6 = ts["ipv4_flow"], ts["ipv6_flow"]
    assert v4.fields[4].name == "icmpTypeCodeIPv4" and v6.fields[4].name == "icmpTypeCodeIPv6"
    without_icmp = [f.name for i, f in enumerate(v4.fields) if i >= 2 and i != 4]
    assert without_icmp == FLOW_FIELDS == [f.name for i, f in enumerate(v6.fields) if i >= 2 and i != 4]
    assert v4.fields[0].name == "sourceIPv4Address" and v6.fields[1].name == "destinationIPv6Address"
    assert v4.record_length == 75 and v6.record_length == 99 and not v4.is_options
    nat = ts["ipv6_nat_flow"]
    assert {
        "postNATSourceIPv6Address",
        "postNAPTSourceTransportPort",
        "ctState",
        "ctMark",
        "ctZone",
        "cgroupId",
        "natEvent",
    } <= {f.name for f in nat.fields}
    assert "natEvent" in {f.name for f in ts["ipv4_nat_flow"].fields}  # NAT event rows share the template
    stats, sampling = ts["options_exporter_stats"], ts["options_sampling"]
    assert stats.is_options and [f.name for f in stats.scope_fields] == [
        "observationDomainId",
        "meteringProcessId",
    ]
    assert sampling.scope_count == 1 and {"samplingInterval", "samplingAlgorithm"} <= {
        f.name for f in sampling.fields
    }


def write(tmp_path: Path, body: str, name: str = "t.yaml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def test_reduced_size_and_varlen(tmp_path: Path) -> None:
    p = write(tmp_path, "id: 300\nname: x\nfields:\n  - {name: octetDeltaCount, length: 3}\n"
              "  - {name: interfaceName, length: 65535}\n  - {name: samplingProbability, length: 4}\n")  # fmt: skip
    t = load_template_file(p, IM)
    assert [f.length for f in t.fields][:2] == [3, VARLEN]
    assert t.record_length is None and t.min_record_length == 8


@pytest.mark.parametrize(
    ("body", "match"),
    [("id: 255\nname: x\nfields: [vlanId]\n", r"t\.yaml: template 255: template id must be 256"),
     ("id: 300\nname: x\nfields: [vlanId, sourceIPv4Adress]\n",
      r"t\.yaml: template 300 field 1: unknown element 'sourceIPv4Adress' \(did you mean 'sourceIPv4Address'\?\)"),
     ("id: 300\nname: x\nfields: [{name: octetDeltaCount, length: 9}]\n", r"field 0 \(octetDeltaCount\): length 9"),
     ("id: 300\nname: x\nfields: [{name: sourceIPv4Address, length: 2}]\n", "reduced size only for integers"),
     ("id: 300\nname: x\nfields: [{name: vlanId, length: 65535}]\n", "length 65535 not allowed"),
     ("id: 300\nname: x\nfields: [{name: sourceIPv6Address, length: 65535}]\n", "variable length only"),
     ("id: 300\nname: x\nfields: [{name: float32Thing, length: 4}]\n", "unknown element"),
     ("id: 300\nname: x\nscope: []\nfields: [vlanId]\n", "at least one scope field"),
     ("id: 300\nname: x\nfields: [vlanId, vlanId]\n", r"field 1 \(vlanId\): element repeated"),
     ("id: 300\nname: x\nfields: [{name: ctState, enterprise: 1}]\n", "with enterprise number 1"),
     ("id: 300\nname: x\nfields: [{name: vlanId, size: 1}]\n", "unknown keys"),
     ("id: 300\nname: x\nfields: []\n", "non-empty list"),
     ("id: 300\nname: x\nfields: [\n", r":4:1: YAML syntax error")],
)  # fmt: skip
def test_invalid(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(TemplateError, match=match):
        load_template_file(write(tmp_path, body), IM)


def test_float64_reduced_and_enterprise_lookup(tmp_path: Path) -> None:
    ie = IM.by_name("ctState")
    assert ie.pen
    p = write(tmp_path, "id: 300\nname: x\nscope: [observationDomainId]\n"
              "fields: [{name: ctState, enterprise: 57999}, cgroupId]\n")  # fmt: skip
    t = load_template_file(p, IM)
    assert t.is_options and t.fields[1].element == ie and t.fields[2].element.pen == 57999


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path, "id: 300\nname: a\nfields: [vlanId]\n", "a.yaml")
    write(tmp_path, "id: 300\nname: b\nfields: [vlanId]\n", "b.yaml")
    with pytest.raises(TemplateError, match=r"b\.yaml: template 300: id already used by .*a\.yaml"):
        load_templates(tmp_path, IM)


def test_default_dir() -> None:
    assert DEFAULT_TEMPLATES_DIR.name == "templates" and (DEFAULT_TEMPLATES_DIR / "ipv4_flow.yaml").exists()


def test_listing_names_the_registry_and_coded_values(capsys: pytest.CaptureFixture[str]) -> None:
    """`ipfixer templates`: the registry date, the newest IANA id, and value names where IANA has them."""
    from ipfixer.cli import main

    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    first, *rest = out.splitlines()
    assert "IANA IPFIX registry of 2026-07-22" in first and "ids up to 533" in first
    flow_dir = rest.index(next(line for line in rest if " 61 flowDirection " in line))
    assert rest[flow_dir + 1].split() == ["values:", "0", "ingress", "flow,", "1", "egress", "flow"]
    end = next(line for line in rest if "values: 0 Reserved, 1 idle timeout" in line)
    assert "3 end of Flow detected" in end and "5 lack of resources" in end
    assert "values: 0 Reserved, 1 NAT translation create (Historic)" in out  # natEvent in the NAT templates
    # an element without a registry gets no values line
    octets = rest.index(next(line for line in rest if " 1 octetDeltaCount " in line))
    assert "values:" not in rest[octets + 1]


def test_length_rules_come_from_the_data_type_table() -> None:
    from ipfixer.infomodel import DataType
    from ipfixer.templates import check_length, valid_lengths

    tcp = IM.by_name("tcpControlBits")  # unsigned16 since RFC 7125; 1 byte is a reduced size (RFC 7011 6.2)
    assert check_length(tcp, 1) is None and check_length(tcp, 2) is None and "1..2" in (check_length(tcp, 3) or "")
    big = IM.by_name("ipv6ExtensionHeadersFull")
    assert big.data_type is DataType.UNSIGNED256 and valid_lengths(big) == "1..32" and check_length(big, 32) is None
    assert "RFC 6313" in (check_length(IM.by_name("basicList"), 65535) or "")


def test_hostile_template_files_are_refused_quickly(tmp_path: Path) -> None:
    """A templates directory is an input like the config: a YAML bomb, a huge file and a FIFO (which would
    block a plain read forever) each get a one-line TemplateError naming the file."""
    import os
    import time

    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    cases = {"bomb.yaml": bomb, "huge.yaml": "id: 300\n# " + "x" * (2 << 20) + "\n"}
    for name, text in cases.items():
        d = tmp_path / name.removesuffix(".yaml")
        d.mkdir()
        (d / name).write_text(text)
        t0 = time.monotonic()
        with pytest.raises(TemplateError, match=f"{name}: .* is more than the .* a template file may have"):
            load_templates(d, IM)
        assert time.monotonic() - t0 < 5
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "x.yaml")
    with pytest.raises(TemplateError, match="x.yaml: not a regular file"):
        load_templates(fifo_dir, IM)


def test_too_many_template_files_are_refused(tmp_path: Path) -> None:
    from ipfixer.templates import MAX_TEMPLATE_FILES

    for i in range(MAX_TEMPLATE_FILES + 1):
        (tmp_path / f"t{i}.yaml").write_text("")
    with pytest.raises(TemplateError, match=f"{MAX_TEMPLATE_FILES + 1:,} template files, more than"):
        load_templates(tmp_path, IM)

