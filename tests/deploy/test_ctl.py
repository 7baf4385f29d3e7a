"""`ipfixer ctl` against a running daemon (the real CLI, the real socket, the real kernel path), and the
control socket's safety rules and protocol errors against a real ControlServer."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfixer.control import ControlError, ControlServer, request
from ipfixer.lab import Lab, start_ipfixer, stop_ipfixer
from tests.cli.helpers import IPFIXER, UdpCollector, cli_env, ctl_socket, totals_by_flow, write_config


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IPFIXER, "ctl", "--socket", str(sock), *args], capture_output=True, text=True,
                          timeout=60, env=cli_env())


def ctl_json(sock: Path, *args: str) -> Any:
    res = ctl(sock, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture
def lab() -> Iterator[Lab]:
    pid = os.getpid() % 10000
    with Lab(ns_a=f"ipfxh7cA{pid}", ns_b=f"ipfxh7cB{pid}", veth_a=f"ipfxh7ca{pid}", veth_b=f"ipfxh7cb{pid}") as lab:
        yield lab


def _config(tmp_path: Path, lab: Lab, port: int, idle: str = "30s") -> Path:
    return write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": port}],
                        interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(tmp_path / "lock"),
                        timeouts={"active": "60s", "idle": idle, "drain_interval": "500ms"})


@pytest.mark.root
def test_ctl_commands_on_a_running_daemon(tmp_path: Path, lab: Lab) -> None:
    coll = UdpCollector(netns=lab.ns_a)
    second = UdpCollector(netns=lab.ns_a)
    cfg = _config(tmp_path, lab, coll.port)
    log = tmp_path / "ipfixer.log"
    sock = ctl_socket(tmp_path / "lock", lab.ns_a)
    proc = start_ipfixer(lab.ns_a, cfg, log, env=cli_env())
    try:
        st = os.lstat(sock)  # created safely: a socket, root's, mode 0600
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600

        stats = ctl_json(sock, "stats")
        assert stats["interfaces"] == [lab.veth_a] and stats["pid"] == proc.pid
        assert set(stats["collectors"]) == {f"127.0.0.1:{coll.port}"}
        assert "packets" in stats["kernel"]
        # the socket found from the config, by `ipfixer ctl` in the daemon's namespace
        by_config = subprocess.run(["ip", "netns", "exec", lab.ns_a, *IPFIXER, "ctl", "--config", str(cfg), "stats",
                                    "--json"], capture_output=True, text=True, timeout=60, env=cli_env())
        assert by_config.returncode == 0 and json.loads(by_config.stdout)["pid"] == proc.pid, by_config.stderr
        human = ctl(sock, "stats")
        assert human.returncode == 0 and f"collector 127.0.0.1:{coll.port}:" in human.stdout, human.stderr

        lab.send_udp(lab.ns_b, lab.v4_a, 40081, 9081, [100] * 6 + [400])
        lab.send_udp(lab.ns_b, lab.v4_a, 40082, 9082, [10] * 2)
        flows = ctl_json(sock, "flows", "--top", "1")  # the larger flow only, held in the kernel map
        assert [(f["where"], f["src"], f["dst"], f["src_port"], f["dst_port"], f["packets"], f["octets"])
                for f in flows["flows"]] == [("kernel", lab.v4_b, lab.v4_a, 40081, 9081, 7, 6 * 128 + 428)]
        ours = [(f["src_port"], f["packets"]) for f in ctl_json(sock, "flows", "--top", "1000")["flows"]
                if f["src"] == lab.v4_b]  # the lab's veths also carry IPv6 link-local chatter
        assert sorted(ours) == [(40081, 7), (40082, 2)]
        bad = ctl(sock, "flows", "--top", "0")
        assert bad.returncode == 1 and "top must be an integer 1..100000, got 0" in bad.stderr, bad.stderr
        table = ctl(sock, "flows")
        assert table.returncode == 0 and "40082" in table.stdout and "40081" in table.stdout
        coll.receive(1.5, until_idle=1.0)
        assert not [r for r in coll.flow_records() if r.get("destinationTransportPort") in (9081, 9082)]

        assert ctl_json(sock, "expire-all")["exported"] >= 2
        coll.receive(5, until_idle=1.0)
        totals = totals_by_flow(coll.flow_records())
        assert totals[(lab.v4_b, lab.v4_a, 40081, 9081, 17)] == [7, 6 * 128 + 428]
        assert totals[(lab.v4_b, lab.v4_a, 40082, 9082, 17)] == [2, 2 * 38]
        assert {r["flowEndReason"] for r in coll.flow_records()} == {4}
        assert [f for f in ctl_json(sock, "flows")["flows"] if f["src"] == lab.v4_b] == []

        coll.messages.clear()
        assert ctl_json(sock, "send-templates") == {"collectors": [f"127.0.0.1:{coll.port}"]}
        coll.receive(3, until_idle=0.5)
        sent = {t.template_id for m in coll.messages for t in m.templates}
        assert {256, 257} <= sent, sent

        bad = cfg.read_text() + "\nbogus_key: 1\n"
        cfg.write_text(bad)
        res = ctl(sock, "reload")
        assert res.returncode == 1 and "bogus_key" in res.stderr and "running config kept" in res.stderr
        _config(tmp_path, lab, second.port)
        assert ctl_json(sock, "reload") == {"reloaded": str(cfg)}
        assert set(ctl_json(sock, "stats")["collectors"]) == {f"127.0.0.1:{second.port}"}
        lab.send_udp(lab.ns_b, lab.v4_a, 40083, 9083, [50] * 3)
        assert ctl_json(sock, "expire-all")["exported"] >= 1
        second.receive(5, until_idle=1.0)
        assert totals_by_flow(second.flow_records())[(lab.v4_b, lab.v4_a, 40083, 9083, 17)] == [3, 3 * 78]
    finally:
        assert stop_ipfixer(proc) == 0, log.read_text()
        coll.close()
        second.close()
    assert not sock.exists()  # removed at shutdown
    res = ctl(sock, "stats")
    assert res.returncode == 1 and "no ipfixer daemon is listening" in res.stderr


@pytest.mark.root
def test_a_silent_client_does_not_pause_export(tmp_path: Path, lab: Lab) -> None:
    coll = UdpCollector(netns=lab.ns_a)
    cfg = _config(tmp_path, lab, coll.port, idle="1s")
    log = tmp_path / "ipfixer.log"
    proc = start_ipfixer(lab.ns_a, cfg, log, env=cli_env())
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(str(ctl_socket(tmp_path / "lock", lab.ns_a)))  # connects, never sends its request
        lab.send_udp(lab.ns_b, lab.v4_a, 40091, 9091, [100] * 4)
        deadline = time.monotonic() + 10
        key = (lab.v4_b, lab.v4_a, 40091, 9091, 17)
        while time.monotonic() < deadline and key not in totals_by_flow(coll.flow_records()):
            coll.receive(0.5)
        assert totals_by_flow(coll.flow_records())[key] == [4, 4 * 128]  # exported on idle timeout meanwhile
        assert silent.recv(4096).startswith(b'{"ok":false,"error":"bad request')  # dropped after its timeout
    finally:
        silent.close()
        assert stop_ipfixer(proc) == 0, log.read_text()
        coll.close()


# -- the socket's safety rules and protocol, on a real server (no daemon needed for these) ------------
@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    return d


def test_refuses_a_symlink_or_a_file_at_the_socket_path(private_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep me")
    (private_dir / "link.sock").symlink_to(target)
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(private_dir / "link.sock").start()
    (private_dir / "file.sock").write_text("")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(private_dir / "file.sock").start()
    assert target.read_text() == "keep me"


def test_refuses_an_unsafe_directory(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ControlError, match="writable by others"):
        ControlServer(open_dir / "ctl.sock").start()
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "linked").symlink_to(real)
    with pytest.raises(ControlError, match="symlink"):
        ControlServer(tmp_path / "linked" / "ctl.sock").start()


def test_replaces_a_stale_socket_but_not_a_live_one(private_dir: Path) -> None:
    path = private_dir / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a killed daemon's
    server = ControlServer(path)
    server.start()
    try:
        with pytest.raises(ControlError, match="another ipfixer is listening"):
            ControlServer(path).start()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        server.close()
    assert not path.exists()


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(private_dir: Path) -> None:
    path = private_dir / "ctl.sock"
    server = ControlServer(path, reply_timeout_s=1.0)
    server.start()
    try:
        def raw(data: bytes) -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                s.sendall(data)
                reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
                return reply

        assert "not a JSON object" in raw(b"\xff\xfe garbage\n")["error"]
        assert "unknown command 'format-disk'" in raw(b'{"command": "format-disk"}\n')["error"]
        assert "longer than 4096 bytes" in raw(b'{"command": "stats", "x": "' + b"a" * 10000 + b'"}\n')["error"]
        assert "args must be an object" in raw(b'{"command": "stats", "args": [1]}\n')["error"]
        # a valid command nobody executes (no daemon loop here): a bounded wait, then a clear error
        with pytest.raises(ControlError, match="no answer from the daemon's loop within 1s"):
            request(path, "stats")
        assert server.requests.qsize() == 1
    finally:
        server.close()


def test_a_socket_path_too_long_is_a_clear_error(private_dir: Path) -> None:
    with pytest.raises(ControlError, match="AF_UNIX path too long"):
        ControlServer(private_dir / ("s" * 120)).start()


@pytest.mark.root
def test_instances_in_two_namespaces_share_a_lock_dir(tmp_path: Path, lab: Lab) -> None:
    """One ipfixer per namespace, both with the default lock_dir of one config: each has its own control
    socket (keyed by its namespace, as its lock), and `ipfixer ctl --config` run in a namespace reaches
    that namespace's daemon."""
    lock = tmp_path / "lock"
    cfgs, procs = {}, {}
    try:
        for ns, dev in ((lab.ns_a, lab.veth_a), (lab.ns_b, lab.veth_b)):
            cfgs[ns] = write_config(tmp_path / f"{ns}.yaml", [{"address": "127.0.0.1", "port": 9}],
                                    interfaces={"include": [dev], "exclude": []}, lock_dir=str(lock))
            procs[ns] = start_ipfixer(ns, cfgs[ns], tmp_path / f"{ns}.log", env=cli_env())
        assert ctl_socket(lock, lab.ns_a) != ctl_socket(lock, lab.ns_b)
        for ns, dev in ((lab.ns_a, lab.veth_a), (lab.ns_b, lab.veth_b)):
            res = subprocess.run(["ip", "netns", "exec", ns, *IPFIXER, "ctl", "--config", str(cfgs[ns]), "stats",
                                  "--json"], capture_output=True, text=True, timeout=60, env=cli_env())
            assert res.returncode == 0, res.stderr
            stats = json.loads(res.stdout)
            assert (stats["interfaces"], stats["pid"]) == ([dev], procs[ns].pid)
    finally:
        for ns, proc in procs.items():
            assert stop_ipfixer(proc) == 0, (tmp_path / f"{ns}.log").read_text()
    assert not list(lock.glob("ctl-netns-*.sock"))  # each removed its own
