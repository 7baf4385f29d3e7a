"""IPFIX over TCP (RFC 7011 10.4) and TLS (RFC 7011 11): streams read by tshark from a capture and by our
decoder per connection, certificate verification, the reconnect back-off and queue bound, and a
collector killed and restarted under a running daemon with nothing lost."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfixer.export.stream import StreamTransport, withdraw_all_message
from ipfixer.lab import Lab, start_ipfixer, stop_ipfixer
from ipfixer.wire.decode import Decoder
from tests.cli.helpers import IPFIXER, cli_env, ctl_socket
from tests.deploy.streams import StreamCollector, decode_connection, split_messages
from tests.deploy.test_files import write_capture


def replay(pcap: Path, cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IPFIXER, "replay", "-q", str(pcap), "--config", str(cfg)], capture_output=True,
                          text=True, timeout=120, env=cli_env())


def config(path: Path, **collector: object) -> Path:
    path.write_text(json.dumps({"collectors": [collector], "metrics": {"listen": None}}))
    return path


def wait_for(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def tuples(flows: dict[tuple[str, int], list[int]]) -> dict[tuple[str, int], tuple[int, int]]:
    return {k: (v[0], v[1]) for k, v in flows.items()}


@pytest.mark.root
@pytest.mark.interop
def test_tcp_stream_decoded_by_tshark_from_a_capture(tmp_path: Path) -> None:
    pcap = tmp_path / "in.pcap"
    expected = write_capture(pcap, n_udp_flows=200)  # several Messages on one connection
    coll = StreamCollector()
    cap = tmp_path / "tcp.pcapng"
    log = tmp_path / "tshark.log"
    with log.open("wb") as err:
        tshark = subprocess.Popen(["tshark", "-i", "lo", "-f", f"tcp port {coll.port}", "-w", str(cap)],
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        assert wait_for(lambda: b"Capturing on" in log.read_bytes(), 15), log.read_text()
        res = replay(pcap, config(tmp_path / "tcp.yaml", transport="tcp", address="127.0.0.1", port=coll.port))
        assert res.returncode == 0, res.stderr
        assert wait_for(lambda: sum(len(c) for c in coll.connections()) > 0 and
                        tuples(decode_connection(coll.connections()[0])[0]) == expected)
        time.sleep(1.0)  # let the capture see the last segments and the FIN
    finally:
        tshark.send_signal(signal.SIGINT)
        try:
            tshark.wait(15)
        except subprocess.TimeoutExpired:
            tshark.kill()
            tshark.wait(5)
        coll.close()
    (conn,) = coll.connections()
    assert tuples(decode_connection(conn)[0]) == expected
    out = subprocess.run(["tshark", "-r", str(cap), "-d", f"tcp.port=={coll.port},cflow", "-T", "fields",
                          "-E", "occurrence=a", "-E", "aggregator=;", "-e", "cflow.srcaddr", "-e", "cflow.srcport",
                          "-e", "cflow.packets", "-e", "cflow.octets"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for line in out.stdout.splitlines():
        cols = line.split("\t")
        if len(cols) < 4 or not cols[0]:
            continue
        for src, sport, pkts, octets in zip(*(c.split(";") for c in cols[:4]), strict=True):
            theirs[(src, int(sport))][0] += int(pkts)
            theirs[(src, int(sport))][1] += int(octets)
    assert tuples(theirs) == expected


# -- TLS ---------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for collector.test and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("h7pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=ipfixer test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=DNS:collector.test"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}.test", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def _server_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the exporter must present its certificate too
    return ctx


@pytest.fixture
def tls_collector(pki: Path) -> Iterator[StreamCollector]:
    coll = StreamCollector(tls=_server_context(pki))
    yield coll
    coll.close()


def test_tls_mutual_authentication_exact_flows(tmp_path: Path, pki: Path, tls_collector: StreamCollector) -> None:
    pcap = tmp_path / "in.pcap"
    expected = write_capture(pcap, n_udp_flows=5)
    cfg = config(tmp_path / "tls.yaml", transport="tls", address="127.0.0.1", port=tls_collector.port,
                 tls={"ca_file": str(pki / "ca.pem"), "server_name": "collector.test",
                      "cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key")})
    res = replay(pcap, cfg)
    assert res.returncode == 0, res.stderr
    assert wait_for(lambda: bool(tls_collector.connections()) and
                    tuples(decode_connection(tls_collector.connections()[0])[0]) == expected), res.stderr
    assert len(tls_collector.connections()) == 1 and not tls_collector.handshake_errors


def test_tls_refuses_a_collector_whose_name_does_not_match(tmp_path: Path, pki: Path,
                                                            tls_collector: StreamCollector) -> None:
    pcap = tmp_path / "in.pcap"
    write_capture(pcap)
    cfg = config(tmp_path / "tls.yaml", transport="tls", address="127.0.0.1", port=tls_collector.port,
                 tls={"ca_file": str(pki / "ca.pem"), "server_name": "someone-else.test",
                      "cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key")})
    res = replay(pcap, cfg)
    assert "certificate not accepted" in res.stderr and "someone-else.test" in res.stderr, res.stderr
    assert "undelivered" in res.stderr and "Traceback" not in res.stderr
    time.sleep(0.3)
    assert all(len(c) == 0 for c in tls_collector.connections())  # not one byte of flow data went out


def test_tls_without_a_client_certificate_is_refused_by_the_collector(tmp_path: Path, pki: Path,
                                                                       tls_collector: StreamCollector) -> None:
    pcap = tmp_path / "in.pcap"
    write_capture(pcap)
    cfg = config(tmp_path / "tls.yaml", transport="tls", address="127.0.0.1", port=tls_collector.port,
                 tls={"ca_file": str(pki / "ca.pem"), "server_name": "collector.test"})
    replay(pcap, cfg)
    assert wait_for(lambda: bool(tls_collector.handshake_errors), 5)
    assert all(len(c) == 0 for c in tls_collector.connections())


@pytest.mark.parametrize(("collector", "message"), [
    ({"transport": "tcp", "port": 4739}, "address: required"),
    ({"transport": "tcp", "address": "127.0.0.1", "protocol": "netflow9"}, "exports IPFIX only"),
    ({"transport": "udp", "address": "127.0.0.1", "tls": {}}, "tls: only with transport: tls"),
    ({"transport": "tls", "address": "127.0.0.1", "tls": {"ca_file": "/nonexistent/ca.pem"}}, "no such file"),
    ({"transport": "tls", "address": "127.0.0.1", "tls": {"key_file": "/etc/hostname"}}, "needs cert_file"),
])
def test_stream_collector_config_errors(tmp_path: Path, collector: dict[str, object], message: str) -> None:
    cfg = config(tmp_path / "bad.yaml", **collector)
    res = subprocess.run([*IPFIXER, "check", str(cfg)], capture_output=True, text=True, timeout=60, env=cli_env())
    assert res.returncode == 2 and "collectors[0]" in res.stderr and message in res.stderr, res.stderr


# -- back-off, queue bound, resend ----------------------------------------------------------------------
def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_backoff_queue_bound_and_templates_first_on_reconnect() -> None:
    now = [1000.0]
    port = _free_tcp_port()  # nobody listens yet
    prelude = bytes.fromhex("000a0018") + bytes(12) + bytes.fromhex("00020008") + b"TMPL"  # a Template Set
    withdrawal = withdraw_all_message(4, 1, 0)
    t = StreamTransport("127.0.0.1", port, reconnect_interval_s=1.0, buffer_messages=3, clock=lambda: now[0],
                        on_connect=lambda: [prelude], on_close=lambda: [withdrawal])
    msgs = [bytes.fromhex("000a0014") + i.to_bytes(4, "big") + bytes(8) + bytes.fromhex("01000004") for i in range(4)]
    assert t.errors["ECONNREFUSED"] == 1  # the first attempt, at start
    assert all(t.send(m) for m in msgs[:3])  # kept while down (no new attempt before 1 s)
    assert t.errors["ECONNREFUSED"] == 1
    assert not t.send(msgs[3]) and t.last_error == "EQUEUEFULL" and t.dropped_messages == 1  # the bound
    now[0] += 1.0
    t.poll()
    assert t.errors["ECONNREFUSED"] == 2  # second attempt after 1 s; the next one waits 2 s
    now[0] += 1.9
    t.poll()
    assert t.errors["ECONNREFUSED"] == 2
    coll = StreamCollector(port=port)
    try:
        now[0] += 0.1
        def connected() -> bool:
            t.poll()
            return t.connected

        assert wait_for(connected, 5)
        assert t.send(msgs[3])
        want = prelude + b"".join(msgs)  # this connection's Templates, the kept messages, the new one
        assert wait_for(lambda: bool(coll.connections()) and coll.connections()[0] == want, 5), coll.connections()
        t.close()  # the last message withdraws all Data Templates (RFC 7011 8.1), then FIN
        assert wait_for(lambda: coll.connections()[0] == want + withdrawal, 5), coll.connections()
    finally:
        t.close()
        coll.close()
    assert t.dropped_messages == 1 and t.errors["ECONNREFUSED"] == 2
    assert t.connects == 1 and split_messages(coll.connections()[0])[0] == prelude


# -- a collector killed and restarted under a running daemon ----------------------------------------------
COLLECTOR_SCRIPT = r"""
import socket, sys, select
port, out = int(sys.argv[1]), sys.argv[2]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", port)); s.listen(4)
open(out + ".ready", "w").close()
conns, n = {}, 0
while True:
    r, _, _ = select.select([s, *conns], [], [])
    for x in r:
        if x is s:
            c, _ = s.accept(); conns[c] = open(f"{out}.{n}", "wb", buffering=0); n += 1
        else:
            d = x.recv(65536)
            if d: conns[x].write(d)
            else: conns.pop(x).close(); x.close()
"""


def _start_collector(ns: str, port: int, out: Path) -> subprocess.Popen[bytes]:
    ready = Path(str(out) + ".ready")
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", COLLECTOR_SCRIPT, str(port), str(out)])
    assert wait_for(ready.exists, 10)
    return proc


def _received(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(out.parent.glob(out.name + ".[0-9]*"))]


def _totals(streams: list[bytes]) -> dict[tuple[str, int], tuple[int, int]]:
    total: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for stream in streams:
        for key, (p, o) in decode_connection(stream)[0].items():
            total[key][0] += p
            total[key][1] += o
    return tuples(total)


@pytest.mark.root
def test_collector_killed_and_restarted_nothing_lost(tmp_path: Path) -> None:
    pid = os.getpid() % 10000
    with Lab(ns_a=f"ipfxh7tA{pid}", ns_b=f"ipfxh7tB{pid}", veth_a=f"ipfxh7ta{pid}", veth_b=f"ipfxh7tb{pid}") as lab:
        port = 20000 + pid % 20000
        first, second = tmp_path / "c1" / "conn", tmp_path / "c2" / "conn"
        first.parent.mkdir()
        second.parent.mkdir()
        coll = _start_collector(lab.ns_a, port, first)
        cfg = tmp_path / "ipfixer.yaml"
        cfg.write_text(json.dumps({
            "collectors": [{"transport": "tcp", "address": "127.0.0.1", "port": port, "reconnect_interval": "500ms"}],
            "interfaces": {"include": [lab.veth_a], "exclude": []}, "lock_dir": str(tmp_path / "lock"),
            "metrics": {"listen": None}, "templates": {"stats_interval": "1s"},
            "timeouts": {"active": "60s", "idle": "1s", "drain_interval": "300ms"}}))
        log = tmp_path / "ipfixer.log"
        proc = start_ipfixer(lab.ns_a, cfg, log, env=cli_env())
        key = {n: (lab.v4_b, 41000 + n) for n in range(3)}
        try:
            lab.send_udp(lab.ns_b, lab.v4_a, 41000, 9100, [100] * 4)
            assert wait_for(lambda: key[0] in _totals(_received(first)), 15), log.read_text()
            coll.send_signal(signal.SIGKILL)
            coll.wait(5)
            lab.send_udp(lab.ns_b, lab.v4_a, 41001, 9100, [200] * 3)  # exported while nobody listens
            time.sleep(3.0)
            ctl = subprocess.run([*IPFIXER, "ctl", "--socket", str(ctl_socket(tmp_path / "lock", lab.ns_a)), "stats", "--json"],
                                 capture_output=True, text=True, timeout=30, env=cli_env())
            stream = json.loads(ctl.stdout)["collectors"][f"tcp://127.0.0.1:{port}"]["stream"]
            assert stream["connected"] is False and stream["connections"] == 1, stream  # seen by ipfixer ctl
            coll = _start_collector(lab.ns_a, port, second)
            lab.send_udp(lab.ns_b, lab.v4_a, 41002, 9100, [50] * 2)
            assert wait_for(lambda: {key[1], key[2]} <= set(_totals(_received(second))), 20), log.read_text()
        finally:
            assert stop_ipfixer(proc) == 0, log.read_text()
            coll.send_signal(signal.SIGKILL)
            coll.wait(5)
        ours = set(key.values())  # the lab's veths also carry IPv6 link-local chatter
        before = {k: v for k, v in _totals(_received(first)).items() if k in ours}
        after = {k: v for k, v in _totals(_received(second)).items() if k in ours}
        assert before == {key[0]: (4, 4 * 128)}
        assert after == {key[1]: (3, 3 * 228), key[2]: (2, 2 * 78)}  # nothing lost, nothing twice
        assert "unreachable" in log.read_text() and "connected (connection 2" in log.read_text()
        last = split_messages(_received(second)[-1])[-1]  # SIGTERM: the session ends withdrawing its templates
        assert Decoder().feed(last, source="tcp").withdrawn == [2]
