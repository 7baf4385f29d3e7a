"""Issue 16: VRF ids (234/235) and VRF names (236) filled at export time, samplingInterval (34) in data
records.  The VRF table from link facts (as rtnetlink reports them), the vectorised lookup, the
Exporter filling the columns, and what ipfixer's own decoder reads back from the real bytes."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ipfixer.config import load_config
from ipfixer.export import Exporter, ExportSession, UdpTransport
from ipfixer.export.annotate import annotate, templates_use_vrf, vrf_ids, vrf_values
from ipfixer.export.factory import build_exporter, load_config_templates
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, VrfTable, empty_batch, records_to_batch, to_addr16
from ipfixer.sources.kernel.vrf import LinkFacts, link_facts, vrf_table
from ipfixer.templates import load_templates
from ipfixer.wire.decode import Decoder
from tests.cli.helpers import write_config

T = load_templates()


# -- the VRF table from links --------------------------------------------------------------------
def test_vrf_table_direct_slaves_bridge_ports_the_vrf_itself_and_none() -> None:
    links = [
        LinkFacts(1, "lo"),
        LinkFacts(10, "vrf-red", vrf_table=10),
        LinkFacts(20, "vrf-blue", vrf_table=1020),
        LinkFacts(3, "eth0", master=10),  # enslaved to vrf-red
        LinkFacts(4, "br0", master=20),  # a bridge in vrf-blue...
        LinkFacts(5, "veth5", master=4),  # ...and its port
        LinkFacts(6, "eth1"),  # in no VRF
        LinkFacts(7, "bond0", master=99),  # master vanished
    ]
    t = vrf_table(links)
    assert dict(t.table_of) == {10: 10, 20: 1020, 3: 10, 4: 1020, 5: 1020}
    assert dict(t.names) == {10: "vrf-red", 1020: "vrf-blue"}


def test_vrf_table_master_loop_is_bounded() -> None:
    t = vrf_table([LinkFacts(2, "a", master=3), LinkFacts(3, "b", master=2)])
    assert dict(t.table_of) == {} and dict(t.names) == {}


def _rta(kind: int, payload: bytes) -> bytes:
    """One rtattr (struct rtattr: u16 len, u16 type, payload padded to 4), include/uapi/linux/rtnetlink.h."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_link_facts_from_rtnetlink_bytes_laid_out_as_the_kernel_sends_them() -> None:
    """RTM_NEWLINK for a VRF (IFLA_LINKINFO 18 > IFLA_INFO_KIND 1 "vrf", IFLA_INFO_DATA 2 > IFLA_VRF_TABLE 1)
    and for a slave (IFLA_MASTER 10), built with struct from if_link.h, parsed by pyroute2's marshal."""
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl

    def newlink(index: int, attrs: bytes) -> bytes:
        body = struct.pack("=BxHiII", 0, 1, index, 0, 0) + attrs  # struct ifinfomsg
        return struct.pack("=IHHII", 16 + len(body), 16, 0, 0, 0) + body  # nlmsghdr, RTM_NEWLINK = 16

    vrf = newlink(8, _rta(3, b"vrf-red\0") + _rta(18, _rta(1, b"vrf\0") + _rta(2, _rta(1, struct.pack("=I", 1001)))))
    slave = newlink(9, _rta(3, b"eth9\0") + _rta(10, struct.pack("=I", 8)))
    msgs = list(MarshalRtnl().parse(vrf + slave))
    facts = [link_facts(m) for m in msgs]
    assert facts == [LinkFacts(8, "vrf-red", 0, 1001), LinkFacts(9, "eth9", 8, None)]
    assert dict(vrf_table(facts).table_of) == {8: 1001, 9: 1001}


# -- vectorised lookup and annotation ------------------------------------------------------------
def test_vrf_ids_lookup_hits_misses_and_zero() -> None:
    ifx = np.array([0, 3, 4, 5, 3, 1 << 31, 2], dtype=np.uint32)
    assert vrf_ids(ifx, {3: 10, 5: 20, 2: 7}).tolist() == [0, 10, 0, 20, 10, 0, 7]
    assert vrf_ids(ifx, {}).tolist() == [0] * 7


def test_annotate_fills_columns_and_copies_a_read_only_batch() -> None:
    b = empty_batch(3)
    b["ingress_if"] = [3, 0, 9]
    b["egress_if"] = [0, 3, 4]
    b.flags.writeable = False
    out = annotate(b, vrfs=VrfTable({3: 10, 4: 20}, {10: "a", 20: "b"}), sampling_interval=8)
    assert out is not b and b["ingress_vrf"].tolist() == [0, 0, 0]
    assert out["ingress_vrf"].tolist() == [10, 0, 0] and out["egress_vrf"].tolist() == [0, 10, 20]
    assert out["sampling_interval"].tolist() == [8, 8, 8]
    b2 = empty_batch(1)
    b2["ingress_vrf"] = 5  # no VRF table: left as it is
    assert annotate(b2, vrfs=None, sampling_interval=0)["ingress_vrf"].tolist() == [5]
    assert b2["sampling_interval"].tolist() == [1]  # never 0: 1 means every packet


def test_vrf_values_one_record_per_vrf_names_fit_the_field() -> None:
    recs = vrf_values(7, {20: "b", 10: "vrf-" + "é" * 10})
    assert [r["ingressVRFID"] for r in recs] == [10, 20] and {r["observationDomainId"] for r in recs} == {7}
    assert len(recs[0]["VRFname"].encode()) <= 16 and recs[0]["VRFname"].startswith("vrf-é")


# -- templates and config ------------------------------------------------------------------------
def test_shipped_vrf_and_sampled_templates() -> None:
    for name, base, extra in (("ipv4_vrf_flow", "ipv4_flow", ["ingressVRFID", "egressVRFID"]),
                              ("ipv6_vrf_flow", "ipv6_flow", ["ingressVRFID", "egressVRFID"]),
                              ("ipv4_sampled_flow", "ipv4_flow", ["samplingInterval"]),
                              ("ipv6_sampled_flow", "ipv6_flow", ["samplingInterval"])):
        assert [f.name for f in T[name].fields] == [f.name for f in T[base].fields] + extra, name
    vrfs = T["options_vrfs"]
    assert vrfs.template_id == 265 and [f.name for f in vrfs.scope_fields] == ["observationDomainId"]
    assert [(f.name, f.length) for f in vrfs.fields[1:]] == [("ingressVRFID", 4), ("VRFname", 16)]
    assert templates_use_vrf([T["ipv4_vrf_flow"]]) and not templates_use_vrf([T["ipv4_flow"], T["ipv4_sampled_flow"]])


def test_config_picks_vrf_templates_and_the_vrf_options_follow(tmp_path: Path) -> None:
    plain = load_config(write_config(tmp_path / "a.yaml", [{"address": "127.0.0.1", "port": 9}]))
    assert "options_vrfs" not in [t.name for t in load_config_templates(plain)[1]]
    cfg = load_config(write_config(tmp_path / "b.yaml", [{"address": "127.0.0.1", "port": 9},
                                                         {"address": "127.0.0.1", "port": 10, "protocol": "netflow9"}],
                                   templates={"ipv4": "ipv4_vrf_flow", "ipv6": "ipv6_vrf_flow"},
                                   sampling={"interval": 16}))
    data, options = load_config_templates(cfg)
    assert data[ETH_P_IP].name == "ipv4_vrf_flow" and "options_vrfs" in [t.name for t in options]
    ex = build_exporter(cfg, 0)  # IPFIX and NetFlow v9 both take the VRF templates (system scope in v9)
    try:
        assert ex.sampling_interval == 16
        assert all(c.session.has_options_template("options_vrfs") for c in ex.collectors)
    finally:
        ex.close()


# -- through the Exporter, back through the decoder ----------------------------------------------
def _records(i: int, now_ms: int) -> list[FlowRecord]:
    return [
        FlowRecord(ethertype=ETH_P_IP, direction=0, src_addr=to_addr16("10.0.0.1"), dst_addr=to_addr16("10.0.0.2"),
                   src_port=1000 + i, dst_port=53, protocol=17, ifindex=3, ingress_if=3, packets=2 + i,
                   octets=100 + i, start_ms=now_ms - 10, end_ms=now_ms - 5, end_reason=1),
        FlowRecord(ethertype=ETH_P_IPV6, direction=1, src_addr=to_addr16("fd00::1"), dst_addr=to_addr16("fd00::2"),
                   src_port=2000 + i, dst_port=443, protocol=6, ifindex=5, egress_if=5, packets=3, octets=300,
                   start_ms=now_ms - 10, end_ms=now_ms - 5, end_reason=2),
        FlowRecord(ethertype=ETH_P_IP, direction=0, src_addr=to_addr16("10.9.0.1"), dst_addr=to_addr16("10.9.0.2"),
                   src_port=3000 + i, dst_port=80, protocol=6, ifindex=6, ingress_if=6, packets=1, octets=40,
                   start_ms=now_ms - 10, end_ms=now_ms - 5, end_reason=1),
    ]


@pytest.mark.parametrize("protocol", ["ipfix", "netflow9"])
@pytest.mark.parametrize("family", ["vrf", "sampled"])
def test_exporter_fills_vrf_ids_names_and_sampling_as_decoded(protocol: str, family: str) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    data = {ETH_P_IP: T[f"ipv4_{family}_flow"], ETH_P_IPV6: T[f"ipv6_{family}_flow"]}
    opts = [T["options_exporter_stats"], T["options_sampling"], T["options_interfaces"], T["options_vrfs"]]
    now_ns = 1_780_000_000_000_000_000
    session = ExportSession(protocol, 42, data, opts, boot_wall_ns=now_ns - 10**9)  # type: ignore[arg-type]
    ex = Exporter([("c", session, UdpTransport("127.0.0.1", rx.getsockname()[1]))], sampling_interval=32)
    try:
        ex.vrfs = VrfTable({3: 10, 5: 20}, {10: "vrf-red", 20: "vrf-blue"})
        ex.export_options_refresh(now_ns, sampling={"samplingInterval": 32}, interfaces={3: "eth3"},
                                  vrfs=dict(ex.vrfs.names))
        ex.export(records_to_batch(_records(1, now_ns // 10**6)), now_ns)
        d = Decoder()
        recs: list[Any] = []
        for _ in range(2):
            recs += d.feed(rx.recv(65535)).records
    finally:
        ex.close()
        rx.close()
    flows = {r.fields["sourceTransportPort"]: r.fields for r in recs if not r.is_options}
    assert set(flows) == {1001, 2001, 3001}
    vrf_names = {r.fields["ingressVRFID"]: r.fields["VRFname"] for r in recs if r.template_id == 265}
    assert vrf_names == {10: "vrf-red", 20: "vrf-blue"}  # options records are sent whatever the data template
    if family == "vrf":
        got = {p: (f["ingressVRFID"], f["egressVRFID"]) for p, f in flows.items()}
        assert got == {1001: (10, 0), 2001: (0, 20), 3001: (0, 0)}
        assert all("samplingInterval" not in f for f in flows.values())
    else:
        assert {f["samplingInterval"] for f in flows.values()} == {32}
        assert all("ingressVRFID" not in f for f in flows.values())


def test_router_vrf_example_builds_vrf_sessions_and_a_biflow_collector() -> None:
    cfg = load_config(Path(__file__).parents[2] / "config" / "examples" / "router-vrf.yaml", env={})
    ex = build_exporter(cfg, 0)
    try:
        noc, sec = ex.collectors
        assert [t.name for t in noc.session.data_templates.values()] == ["ipv4_vrf_flow", "ipv6_vrf_flow"]
        assert [t.name for t in sec.session.data_templates.values()] == ["ipv4_biflow", "ipv6_biflow"]
        assert noc.session.has_options_template("options_vrfs") and (noc.biflow, sec.biflow) == (False, True)
        assert ex.sampling_interval == 100
    finally:
        ex.close()
