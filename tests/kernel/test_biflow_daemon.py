"""Issue 16 biflows through the real daemon: TCP and UDP exchanges between a host namespace and the router
namespace where `ipfixer run` meters r1, exported at once to a uniflow nfcapd and to a biflow nfcapd
(`biflow: true`).  Every biflow record equals the sum of its uniflow pair; the initiator is the source."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfixer.lab import netns_exec, start_ipfixer, stop_ipfixer
from tests.cli.helpers import cli_env, write_config
from tests.collectors import Nfcapd, free_udp_port
from tests.labs import Router

pytestmark = [pytest.mark.root, pytest.mark.interop]

SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2]))); s.listen(1); s.settimeout(30)\n"
    "print('ready',flush=True)\n"
    "c,_=s.accept(); c.settimeout(30); got=0\n"
    "while got<3000:\n"
    "    d=c.recv(65536)\n"
    "    if not d: break\n"
    "    got+=len(d)\n"
    "c.sendall(b'r'*5000); c.close()\n"
)
CLIENT = (
    "import socket,sys\n"
    "s=socket.socket(); s.settimeout(30); s.bind(('',int(sys.argv[3])))\n"
    "s.connect((sys.argv[1],int(sys.argv[2]))); s.sendall(b'q'*3000)\n"
    "while s.recv(65536): pass\n"
    "s.close()\n"
)


@pytest.fixture
def router() -> Iterator[Router]:
    r = Router().build()
    try:
        yield r
    finally:
        r.close()


def test_biflows_equal_the_uniflow_pairs_through_the_daemon(tmp_path: Path, router: Router) -> None:
    r = router
    uni = Nfcapd(tmp_path / "uni", free_udp_port(), netns=r.ns_r)
    bi = Nfcapd(tmp_path / "bi", free_udp_port(), netns=r.ns_r)
    server: subprocess.Popen[str] | None = None
    proc = None
    try:
        cfg = write_config(
            tmp_path / "ipfixer.yaml",
            [{"address": "127.0.0.1", "port": uni.port}, {"address": "127.0.0.1", "port": bi.port, "biflow": True}],
            interfaces={"include": [r.r1], "exclude": []}, lock_dir=str(tmp_path / "lock"),
            timeouts={"active": "60s", "idle": "2s", "drain_interval": "200ms"},
        )  # fmt: skip
        log = tmp_path / "ipfixer.log"
        proc = start_ipfixer(r.ns_r, cfg, log, env=cli_env())
        server = subprocess.Popen(["ip", "netns", "exec", r.ns_r, sys.executable, "-c", SERVER, r.addr(1, 1), "7000"],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        netns_exec(r.ns_1, sys.executable, "-c", CLIENT, r.addr(1, 1), "7000", "41010")
        server.wait(30)
        r.send(1, 41011, 9011, 6)  # UDP to a closed port: a request uniflow and the ICMP answers, no UDP reply
        time.sleep(3.0)  # idle timeout 2 s: the lone uniflow waits one idle timeout for a partner, then goes
        assert stop_ipfixer(proc) == 0, log.read_text()
        time.sleep(0.5)
        u, b = uni.stop(), bi.stop()
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(5)
        if proc is not None:
            stop_ipfixer(proc)
        uni.kill()
        bi.kill()

    def key(f: dict[str, Any]) -> tuple[Any, ...]:
        return (f["proto"], f.get("src4_addr"), f.get("dst4_addr"), f.get("src_port"), f.get("dst_port"))

    def total(flows: list[dict[str, Any]]) -> tuple[int, int]:
        return sum(f["in_packets"] for f in flows), sum(f["in_bytes"] for f in flows)

    h1, rtr = r.addr(1, 2), r.addr(1, 1)
    c2s = [f for f in u if key(f) == (6, h1, rtr, 41010, 7000)]
    s2c = [f for f in u if key(f) == (6, rtr, h1, 7000, 41010)]
    assert c2s and s2c and total(s2c)[1] > 5000 and total(c2s)[1] > 3000  # data plus TCP/IP headers
    tcp = [f for f in b if f["proto"] == 6]
    # one biflow per connection, source = the client (its SYN was the first packet seen)
    assert {key(f) for f in tcp} == {(6, h1, rtr, 41010, 7000)}
    assert (sum(f["in_packets"] for f in tcp), sum(f["in_bytes"] for f in tcp)) == total(c2s)
    assert (sum(f["out_packets"] for f in tcp), sum(f["out_bytes"] for f in tcp)) == total(s2c)
    lone = [f for f in b if key(f) == (17, h1, rtr, 41011, 9011)]
    assert (total(lone), sum(f["out_packets"] for f in lone)) == ((6, 6 * 128), 0)
    # nothing lost or doubled: biflow in + out over everything == the uniflow collector's total
    assert sum(f["in_packets"] + f["out_packets"] for f in b) == sum(f["in_packets"] for f in u)
    assert sum(f["in_bytes"] + f["out_bytes"] for f in b) == sum(f["in_bytes"] for f in u)
