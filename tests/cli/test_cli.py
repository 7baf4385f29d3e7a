"""The real `ipfixer` CLI as a subprocess: config errors (status 2, key path, bad value, no traceback),
check/templates/schema, decode of what the exporter sent, and the demo leaving nothing behind."""

from __future__ import annotations

import json
import select
import socket
import subprocess
from pathlib import Path

import pytest

from ipfixer.clock import FakeClock
from ipfixer.config import load_config
from ipfixer.export.factory import build_exporter
from ipfixer.model import FlowRecord, records_to_batch, to_addr16
from tests.cli.helpers import IPFIXER, cli_env, write_config

ROOT = Path(__file__).resolve().parents[2]


def ipfixer(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IPFIXER, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), cwd=ROOT)


BAD_CONFIGS = [
    ("collectors: [{address: 127.0.0.1, port: 4739}]\ntimeouts: {activ: 30s}\n", "timeouts.activ", "'30s'"),
    ("collectors: [{address: 127.0.0.1, port: 4739, protocol: sflow}]\n", "collectors[0].protocol", "'sflow'"),
    ("collectors: [{address: 127.0.0.1, port: 70000}]\n", "collectors[0].port", "70000"),
    ("collectors: [{address: 127.0.0.1}]\ntimeouts: {idle: fast}\n", "timeouts.idle", "'fast'"),
    ("collectors: []\n", "collectors", "[]"),
    ("collectors: [{address: 127.0.0.1}]\ntimeouts: {active: 10s, idle: 20s}\n", "timeouts.idle", "20"),
    ("collectors: [{address: 127.0.0.1}]\nbogus: 1\n", "bogus", "1"),
    ("collectors: [{address: 127.0.0.1}\n", "YAML", ""),
    ("collectors: [{address: 127.0.0.1}]\ntemplates: {ipv4: no_such_template}\n", "templates.ipv4",
     "'no_such_template'"),
    ("collectors: [{address: 999.1.2.3}]\n", "collectors[0].address", "'999.1.2.3'"),
]


@pytest.mark.parametrize("text,key,value", BAD_CONFIGS)
@pytest.mark.parametrize("command", ["check", "run"])
def test_config_errors_exit_2_with_key_path(tmp_path: Path, text: str, key: str, value: str, command: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    res = ipfixer(*(["check", str(cfg)] if command == "check" else ["run", "--config", str(cfg)]))
    assert res.returncode == 2, res.stderr
    assert str(cfg) in res.stderr and key in res.stderr and value in res.stderr
    assert "Traceback" not in res.stderr


def test_several_errors_at_once_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("collectors: [{address: 127.0.0.1, port: 0, protocol: v5}]\nlog_level: loud\n")
    res = ipfixer("check", str(cfg))
    assert res.returncode == 2
    for key in ("collectors[0].port", "collectors[0].protocol", "log_level"):
        assert key in res.stderr
    res = ipfixer("check", str(tmp_path / "absent.yaml"))
    assert res.returncode == 2 and "absent.yaml" in res.stderr and "Traceback" not in res.stderr


def test_env_override_error_names_variable(tmp_path: Path) -> None:
    env = cli_env() | {"IPFIXER_TIMEOUTS__ACTIV": "30s"}
    res = ipfixer("check", "config/ipfixer.yaml", env=env)
    assert res.returncode == 2 and "IPFIXER_TIMEOUTS__ACTIV" in res.stderr


def test_check_templates_schema() -> None:
    assert ipfixer("check", "config/ipfixer.yaml").returncode == 0
    for example in sorted((ROOT / "config" / "examples").glob("*.yaml")):
        res = ipfixer("check", str(example))
        assert res.returncode == 0, res.stderr
    out = ipfixer("templates").stdout
    assert "256 ipv4_flow" in out and "61 flowDirection" in out and "57999/1" in out
    schema = json.loads(ipfixer("config", "schema").stdout)
    assert schema == json.loads((ROOT / "config" / "ipfixer.schema.json").read_text())


def test_decode_prints_what_the_exporter_sent(tmp_path: Path) -> None:
    """`ipfixer decode --json` on a UDP port, fed by the same Exporter `run` uses."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a free port for the decoder
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*IPFIXER, "decode", "--port", str(port), "--json", "--count", "2", "--timeout", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        cfg = load_config(write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": port}]))
        clock = FakeClock()
        exporter = build_exporter(cfg, clock.wall_ns())
        rec = FlowRecord(src_addr=to_addr16("192.0.2.1"), dst_addr=to_addr16("198.51.100.7"), src_port=1234,
                         dst_port=443, protocol=6, packets=12, octets=3456, start_ms=1_700_000_000_123,
                         end_ms=1_700_000_001_456, direction=1, egress_if=3, tcp_flags=0x1B, end_reason=3)
        ready, _, _ = select.select([proc.stderr], [], [], 30)  # the decoder says when it is bound
        assert ready and "listening" in proc.stderr.readline()  # type: ignore[union-attr]
        exporter.export(records_to_batch([rec]), clock.wall_ns())
        exporter.export_stats(clock.wall_ns())
        exporter.close()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    rows = [json.loads(line) for line in out.splitlines()]
    flows = [r for r in rows if not r["options"]]
    assert flows and flows[0]["sourceIPv4Address"] == "192.0.2.1"
    assert flows[0]["destinationIPv4Address"] == "198.51.100.7"
    assert (flows[0]["packetDeltaCount"], flows[0]["octetDeltaCount"]) == (12, 3456)
    assert (flows[0]["flowStartMilliseconds"], flows[0]["flowEndMilliseconds"]) == (1_700_000_000_123,
                                                                                    1_700_000_001_456)
    assert (flows[0]["flowDirection"], flows[0]["egressInterface"], flows[0]["flowEndReason"]) == (1, 3, 3)


@pytest.mark.root
def test_demo_runs_and_leaves_nothing() -> None:
    res = ipfixer("demo", "--duration", "4", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "flow records received; lab removed" in res.stdout
    assert " udp " in res.stdout and " icmp " in res.stdout
    lab_line = res.stdout.splitlines()[0].split()  # "lab: NS_A/VETH_A (...) <-> NS_B/VETH_B (...)"
    namespaces = {lab_line[1].split("/")[0], lab_line[5].split("/")[0]}
    assert all(ns.startswith("ipfx") for ns in namespaces)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert not namespaces & {line.split()[0] for line in after.splitlines() if line.strip()}


def test_unresolvable_collector_is_a_clear_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", [{"address": "no-such-collector.invalid", "port": 4739}])
    res = ipfixer("run", "--config", str(cfg), timeout=60)
    assert res.returncode == 1 and "no-such-collector.invalid" in res.stderr
    assert "Traceback" not in res.stderr


def test_check_resolves_collector_names(tmp_path: Path) -> None:
    """`check` refuses what `run` would: a name that does not resolve is a config error (key path, value)."""
    cfg = write_config(tmp_path / "c.yaml", [{"address": "127.0.0.1", "port": 4739},
                                              {"address": "no-such-collector.invalid", "port": 4739}])
    res = ipfixer("check", str(cfg))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (f"{cfg}: collectors[1].address: does not resolve: Name or service not known "
            "(got 'no-such-collector.invalid')") in res.stderr
    cfg = write_config(tmp_path / "c.yaml", [{"address": "localhost", "port": 4739}])
    res = ipfixer("check", str(cfg))
    assert res.returncode == 0, res.stderr


def test_no_scapy_warnings_on_the_terminal(tmp_path: Path) -> None:
    """scapy's own "WARNING: ..." lines (here: a capture of an unknown link type) never reach stderr."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import wrpcap

    path = tmp_path / "user0.pcap"
    wrpcap(str(path), [IP(dst="192.0.2.1") / UDP(dport=9)], linktype=147)
    res = ipfixer("decode", "--pcap", str(path), "--port", "9")
    assert "WARNING" not in res.stderr and "LL type" not in res.stderr, res.stderr
    assert str(path) in res.stderr  # ipfixer's own message is still there
    res = ipfixer("replay", str(path), "--config", str(write_config(tmp_path / "c.yaml",
                                                                   [{"address": "127.0.0.1", "port": 9}])))
    assert res.returncode == 1 and res.stderr.splitlines() == [
        f"ipfixer: error: {path}: USER0 (147) is not supported; replay reads EN10MB, IPV4, IPV6, LINUX_SLL, "
        "LINUX_SLL2, LOOP, NULL, RAW"]


@pytest.mark.root
def test_check_bounds_a_resolver_that_never_answers(tmp_path: Path) -> None:
    """In a namespace whose resolver (a socket the test holds on 127.0.0.1:53) never answers, `check`
    gives up after its bounded wait with a config error naming the collector, instead of hanging."""
    import shutil

    from ipfixer.config import RESOLVE_TIMEOUT_S
    from ipfixer.lab import Namespaces, unique_name
    from ipfixer.netns import in_netns

    ns = unique_name("h4r")
    etc = Path("/etc/netns") / ns  # `ip netns exec` bind-mounts this resolv.conf over /etc/resolv.conf
    spaces = Namespaces()
    try:
        spaces.add(ns)
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:1\n")
        dead = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        dead.bind(("127.0.0.1", 53))
        cfg = write_config(tmp_path / "c.yaml", [{"address": "collector.ipfx-h4.test", "port": 4739}])
        res = subprocess.run(["ip", "netns", "exec", ns, *IPFIXER, "check", str(cfg)], capture_output=True,
                             text=True, timeout=60, env=cli_env(), cwd=ROOT)
        asked = dead.recv(512, socket.MSG_DONTWAIT)  # the query did reach the silent resolver
        dead.close()
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        spaces.close()
    assert asked and b"ipfx-h4" in asked
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (f"{cfg}: collectors[0].address: no answer from the resolver within {RESOLVE_TIMEOUT_S:g}s "
            "(got 'collector.ipfx-h4.test')") in res.stderr
