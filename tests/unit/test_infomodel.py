"""InfoModel: data generated from IANA's registry XML, coded values, enterprise elements, lookups, the
DataType table against IANA's data type registry, and data-file validation."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ipfixer.errors import InfoModelError
from ipfixer.infomodel import DATA_DIR, IPFIXER_PEN, VARLEN, DataType, InfoModel

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"  # the project's shared/ beside the checkout (as CI lays it out)
REGISTRY_XML = SHARED / "data" / "iana" / "ipfix.xml"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="no shared/ beside this checkout")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_infomodel", ROOT / "tools" / "gen_infomodel.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_infomodel", mod)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["gen_infomodel"])
    return sys.modules["gen_infomodel"]


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))


def test_default_is_cached_and_dated() -> None:
    m = InfoModel.load_default()
    assert m is InfoModel.load_default()
    assert m.registry_date == "2026-07-22"
    assert len(m) == 502 + 11 + 6  # IANA's assigned, named elements + ipfixer's enterprise ones + RFC 5103 reverse
    assert m.by_id(1, 29305) is not None and m.by_id(1, 29305).name == "reverseOctetDeltaCount"  # type: ignore[union-attr]
    e = m.by_id(533)
    assert e is not None and (e.name, e.data_type, e.semantics) == (
        "pathDelaySumDeltaMicroseconds", DataType.UNSIGNED64, "deltaCounter")
    assert m.by_name("tcpControlBits").data_type == "unsigned16"  # RFC 7125 widened it
    assert m.by_name("ipv6ExtensionHeadersFull").default_length == 32  # unsigned256, RFC 9740
    assert m.by_id(416) is None  # a nameless deprecated duplicate in the registry: not an element


def test_coded_values_from_the_registry() -> None:
    m = InfoModel.load_default()
    end = m.by_name("flowEndReason")
    assert dict(m.value_names(end)) == {0: "Reserved", 1: "idle timeout", 2: "active timeout",
                                        3: "end of Flow detected", 4: "forced end", 5: "lack of resources"}
    assert m.value_name(end, 1) == "idle timeout" and m.value_name(end, 6) is None
    assert m.value_name(end, True) is None and m.value_name(end, "1") is None
    assert dict(m.value_names(m.by_name("flowDirection"))) == {0: "ingress flow", 1: "egress flow"}
    assert m.value_name(m.by_name("natEvent"), 4) == "NAT44 session create"
    assert m.value_name(m.by_name("firewallEvent"), 3) == "Flow Denied"
    assert m.value_name(m.by_name("biflowDirection"), 1) == "initiator"
    assert m.value_name(m.by_name("samplingAlgorithm"), 2) == "Random Sampling"
    assert m.value_name(m.by_name("forwardingStatus"), 0x81) == "Dropped: ACL deny"
    assert m.value_name(m.by_name("mplsTopLabelType"), 1) == "TE-MIDPT"
    assert not m.value_names(m.by_name("octetDeltaCount"))
    assert not m.value_names(m.by_name("ctState"))


def test_data_type_table_matches_ianas_registry() -> None:
    """Each DataType's number and name are IANA's (the generated data types registry), all of them."""
    rows = [r for r in _rows(DATA_DIR / "iana_values.csv") if r["registry"] == "ipfix-information-element-data-types"]
    assert {int(r["value"]): r["name"] for r in rows} == {t.number: t.value for t in DataType}
    used = {e.data_type for e in InfoModel.load_default()}
    assert used <= set(DataType)


@pytest.mark.parametrize(
    ("name", "eid", "dtype"),
    [("flowDirection", 61, "unsigned8"), ("ethernetType", 256, "unsigned16"),
     ("postNATSourceIPv4Address", 225, "ipv4Address"), ("postNAPTDestinationTransportPort", 228, "unsigned16"),
     ("postNATSourceIPv6Address", 281, "ipv6Address"), ("postNATDestinationIPv6Address", 282, "ipv6Address"),
     ("natEvent", 230, "unsigned8"), ("vlanId", 58, "unsigned16"),
     ("samplingInterval", 34, "unsigned32"), ("samplingAlgorithm", 35, "unsigned8"),
     ("samplingPacketInterval", 305, "unsigned32"), ("samplingPacketSpace", 306, "unsigned32")],
)  # fmt: skip
def test_elements_we_need(name: str, eid: int, dtype: str) -> None:
    e = InfoModel.load_default().by_name(name)
    assert (e.element_id, e.pen, e.data_type) == (eid, 0, dtype)
    assert InfoModel.load_default().by_id(eid) == e


def test_enterprise_elements() -> None:
    m = InfoModel.load_default()
    ct = m.by_name("ctState")
    assert (ct.pen, ct.element_id, ct.data_type, ct.semantics) == (IPFIXER_PEN, 1, "unsigned8", "flags")
    assert m.by_id(1, IPFIXER_PEN) == ct
    assert m.by_id(1) == m.by_name("octetDeltaCount")
    assert m.by_name("containerName").default_length == VARLEN
    assert m.by_name("cgroupId").default_length == 8
    assert m.by_id(9999) is None


def test_default_lengths() -> None:
    m = InfoModel.load_default()
    assert m.by_name("sourceMacAddress").default_length == 6
    assert m.by_name("sourceIPv6Address").default_length == 16
    assert m.by_name("flowStartMilliseconds").default_length == 8
    assert m.by_name("interfaceName").default_length == VARLEN


def test_unknown_name_suggests() -> None:
    with pytest.raises(InfoModelError, match=r"'sourceIPv4Adress'.*did you mean 'sourceIPv4Address'"):
        InfoModel.load_default().by_name("sourceIPv4Adress")
    with pytest.raises(InfoModelError, match="enterprise number 1"):
        InfoModel.load_default().by_name("ctState", pen=1)


def test_elements_are_frozen() -> None:
    e = InfoModel.load_default().by_name("vlanId")
    with pytest.raises(AttributeError):
        e.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("body", "match"),
    [("id,name,data_type\n1,a,unsigned9\n", r"x\.csv:3: unknown data type"),
     ("id,name,data_type\nzz,a,unsigned8\n", r"x\.csv:3: id and pen must be integers"),
     ("id,name,data_type\n1,a\n", r"x\.csv:3: expected 3 columns"),
     ("id,name,data_type\n40000,a,unsigned8\n", r"x\.csv:3: element id 40000 out of range"),
     ("id,name,data_type\n1,a,unsigned8\n1,b,unsigned8\n", "duplicate element id 1"),
     ("name,data_type\n", "header must have columns")],
)  # fmt: skip
def test_bad_data_file(tmp_path: Path, body: str, match: str) -> None:
    p = tmp_path / "x.csv"
    p.write_text("# comment\n" + body)
    with pytest.raises(InfoModelError, match=match):
        InfoModel.load(p)


@needs_shared
def test_generator_reproduces_committed_data_from_the_xml(tmp_path: Path) -> None:
    """Regenerating from IANA's ipfix.xml gives the checked-in files byte for byte: nothing hand-edited,
    no element added by hand."""
    assert REGISTRY_XML.is_file(), f"{REGISTRY_XML} missing from shared/"
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_infomodel.py"), str(REGISTRY_XML), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "502 elements" in res.stdout and "registry 2026-07-22" in res.stdout
    for name in ("iana.csv", "iana_values.csv"):
        assert (tmp_path / name).read_text() == (DATA_DIR / name).read_text(), name


@needs_shared
def test_every_generated_element_is_in_the_xml() -> None:
    """The elements ipfixer once added by hand (34/35 from RFC 7270) now come from IANA's records."""
    import xml.etree.ElementTree as ET

    ns = "{http://www.iana.org/assignments}"
    root = ET.parse(REGISTRY_XML).getroot()
    xml_names = {r.findtext(ns + "elementId"): (r.findtext(ns + "name") or "").strip() for r in root.iter(ns + "record")
                 if r.find(ns + "dataType") is not None}  # fmt: skip
    csv_names = {r["id"]: r["name"] for r in _rows(DATA_DIR / "iana.csv")}
    assert csv_names == {k: v for k, v in xml_names.items() if v}
    assert csv_names["34"] == "samplingInterval" and csv_names["35"] == "samplingAlgorithm"


@pytest.mark.parametrize(
    "doc",
    [b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><r>&b;</r>',
     b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "file:///etc/passwd"><r/>',
     b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>'],
)  # fmt: skip
def test_generator_refuses_dtds_and_entities(doc: bytes) -> None:
    gen = _generator()
    with pytest.raises(gen.RegistryError, match="DTD or entities"):
        gen.convert(doc)


def test_generator_rejects_a_registry_it_does_not_understand() -> None:
    gen = _generator()
    with pytest.raises(gen.RegistryError, match="not well-formed"):
        gen.convert(b"<registry")
    with pytest.raises(gen.RegistryError, match="updated"):
        gen.convert(b'<registry xmlns="http://www.iana.org/assignments"><updated>soon</updated></registry>')
    with pytest.raises(gen.RegistryError, match="no ipfix-information-elements"):
        gen.convert(b'<registry xmlns="http://www.iana.org/assignments"><updated>2026-01-01</updated></registry>')


def test_bad_values_file(tmp_path: Path) -> None:
    p = tmp_path / "v.csv"
    p.write_text("registry,element_id,value,name\nr,136,x,idle\n")
    with pytest.raises(InfoModelError, match=r"v\.csv:2: element_id and value must be integers"):
        InfoModel.load(DATA_DIR / "iana.csv", values=p)
    p.write_text("registry,element_id,value,name\nr,9999,1,idle\n")
    with pytest.raises(InfoModelError, match=r"v\.csv:2: values for unknown element 9999"):
        InfoModel.load(DATA_DIR / "iana.csv", values=p)
