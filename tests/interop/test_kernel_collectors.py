"""The kernel path to pmacct and python-netflow at once: `ipfixer run` in a namespace meters traffic the
test sends over a veth and exports it, IPFIX and NetFlow v9, to nfacctd and python-netflow's collector
(four collectors, one daemon).  Every flow arrives at every collector with its exact packets and octets,
and none of them logs a malformed or undecodable message."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfixer.lab import Lab, netns_exec, start_ipfixer, stop_ipfixer, unique_name
from tests.cli.helpers import cli_env, write_config
from tests.collectors import Nfacctd, PyNetflowCollector, free_udp_port

pytestmark = [pytest.mark.root, pytest.mark.interop]

N_FLOWS = 150  # per family; distinct source ports
SPORT0 = 42000

SENDER = (
    "import socket,sys\n"
    "dst,fam,n,p0=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),int(sys.argv[4])\n"
    "for i in range(n):\n"
    "    s=socket.socket(fam,socket.SOCK_DGRAM)\n"
    "    s.bind(('',p0+i))\n"
    "    for _ in range(1+i%3):\n"
    "        s.sendto(b'x'*(100+i),(dst,9200))\n"
    "    s.close()\n"
)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(ns_a=unique_name("h1A"), ns_b=unique_name("h1B"), veth_a=unique_name("h1a"),
             veth_b=unique_name("h1b")) as lab:  # fmt: skip
        yield lab


def expected(v6: bool) -> dict[int, tuple[int, int]]:
    """source port -> (packets, IP-layer octets) of the flows SENDER makes."""
    header = 48 if v6 else 28
    return {SPORT0 + i: (1 + i % 3, (1 + i % 3) * (100 + i + header)) for i in range(N_FLOWS)}


def test_kernel_path_every_flow_at_pmacct_and_python_netflow(tmp_path: Path, lab: Lab) -> None:
    collectors: list[Any] = []
    proc = None
    try:
        pm4, pm9 = (Nfacctd(tmp_path / f"pm{p}", free_udp_port(), netns=lab.ns_a) for p in ("ipfix", "v9"))
        py4, py9 = (PyNetflowCollector(tmp_path / f"py{p}", free_udp_port(), netns=lab.ns_a) for p in ("ipfix", "v9"))
        collectors = [pm4, pm9, py4, py9]
        cfg = write_config(
            tmp_path / "ipfixer.yaml",
            [{"name": "pm-ipfix", "address": "127.0.0.1", "port": pm4.port, "protocol": "ipfix"},
             {"name": "pm-v9", "address": "127.0.0.1", "port": pm9.port, "protocol": "netflow9"},
             {"name": "py-ipfix", "address": "127.0.0.1", "port": py4.port, "protocol": "ipfix"},
             {"name": "py-v9", "address": "127.0.0.1", "port": py9.port, "protocol": "netflow9"}],
            interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(tmp_path / "lock"),
            timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"},
        )  # fmt: skip
        log = tmp_path / "ipfixer.log"
        proc = start_ipfixer(lab.ns_a, cfg, log, env=cli_env())
        t0 = time.time()
        netns_exec(lab.ns_b, sys.executable, "-c", SENDER, lab.v4_a, "2", str(N_FLOWS), str(SPORT0))
        netns_exec(lab.ns_b, sys.executable, "-c", SENDER, lab.v6_a, "10", str(N_FLOWS), str(SPORT0))
        t1 = time.time()
        time.sleep(0.5)
        assert stop_ipfixer(proc) == 0, log.read_text()  # SIGTERM: every flow flushed
        want = {(False, p): v for p, v in expected(False).items()} | {(True, p): v for p, v in expected(True).items()}

        for pm in (pm4, pm9):
            rows = [r for r in pm.flows(2 * N_FLOWS) if r.get("port_dst") == 9200]
            got = {(":" in r["ip_src"], r["port_src"]): (r["packets"], r["bytes"]) for r in rows}
            assert len(rows) == len(got) and got == want, pm.log_text()[-3000:]
            # no flow dated in the past (v9 FIRST/LAST_SWITCHED never after sysUptime): within the traffic's
            # window, v9 to pmacct's whole seconds
            times = [float(r[k]) for r in rows for k in ("timestamp_start", "timestamp_end")]
            assert int(t0) - 1 <= min(times) and max(times) <= t1 + 1, (t0, t1, min(times), max(times))
            assert "malformed" not in pm.log_text() and "ERROR" not in pm.log_text()
        for py, v9 in ((py4, False), (py9, True)):
            flows = [f for p in py.packets(2 * N_FLOWS) for f in p["flows"]]
            if v9:
                mine = [f for f in flows if f.get("L4_DST_PORT") == 9200]
                got = {("IPV6_SRC_ADDR" in f, f["L4_SRC_PORT"]): (f["IN_PKTS"], f["IN_BYTES"]) for f in mine}
            else:
                mine = [f for f in flows if f.get("destinationTransportPort") == 9200]
                got = {("sourceIPv6Address" in f, f["sourceTransportPort"]): (f["packetDeltaCount"],
                                                                            f["octetDeltaCount"]) for f in mine}
            assert len(mine) == len(got) and got == want, py.log_text()[-3000:]
            text = py.log_text()
            assert not any(s in text for s in ("Traceback", "Error", "WARNING", "Failed to decode")), text[-3000:]
    finally:
        if proc is not None:
            stop_ipfixer(proc)
        for c in collectors:
            c.kill()
