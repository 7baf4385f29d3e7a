"""InfoModel: generated IANA data, enterprise elements, lookups and data-file validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ipfixer.errors import InfoModelError
from ipfixer.infomodel import DATA_DIR, IPFIXER_PEN, VARLEN, InfoModel

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = Path("/work/shared/data/iana/ipfix-information-elements.csv")


def test_default_is_cached_and_dated() -> None:
    m = InfoModel.load_default()
    assert m is InfoModel.load_default()
    assert m.registry_date == "2013-08-01"
    assert len(m) > 350


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


@pytest.mark.skipif(not REGISTRY.exists(), reason="IANA registry CSV not present")
def test_generator_reproduces_committed_csv(tmp_path: Path) -> None:
    out = tmp_path / "iana.csv"
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_infomodel.py"), str(REGISTRY), str(out)], check=True,
                   capture_output=True)  # fmt: skip
    assert out.read_text() == (DATA_DIR / "iana.csv").read_text()
