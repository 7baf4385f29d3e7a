"""Real collectors for tests: nfcapd (+ nfdump to read what it stored) and tshark (live capture on
lo, then decoded with the cflow dissector).  Every process is killed and every temp dir removed in a
finally, waits are bounded, traffic goes to 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
UTC_ENV = {**os.environ, "TZ": "UTC"}  # nfdump prints local time; pin it


def wire(messages: Any) -> list[bytes]:
    """The datagrams of a list of ExportSession Messages, in order."""
    return [m.data for m in messages]


def free_udp_port() -> int:
    """An ephemeral UDP port on 127.0.0.1 (closed again, so the collector can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_text(path: Path, needles: tuple[str, ...], proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if any(n in text for n in needles):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {text}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S}s: {path.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal, wait bounded, then SIGKILL: never leave a collector behind."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def nfdump_time_ms(text: str) -> int:
    """nfdump's '2026-11-28T22:25:07.040' (TZ=UTC) -> Unix ms."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000 + 0.5)


def nfdump_tcp_flags(text: str) -> int:
    """nfdump's 'CEUAPRSF' string with '.' for unset bits -> the tcpControlBits byte."""
    assert len(text) == 8, text
    return sum(1 << (7 - i) for i, ch in enumerate(text) if ch != ".")


class Nfcapd:
    """One nfcapd listening on 127.0.0.1:port and writing into its own directory."""

    def __init__(self, workdir: Path, port: int, netns: str | None = None, bufsize: int | None = None) -> None:
        """bufsize: the socket receive buffer nfcapd asks for (-B), for bursts of many datagrams."""
        self.port = port
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir.parent / f"{self.dir.name}.log"
        prefix = ["ip", "netns", "exec", netns] if netns else []  # ip netns exec execs: proc is nfcapd
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*prefix, "nfcapd", "-b", "127.0.0.1", "-p", str(port), "-w", str(self.dir), "-t", "3600",
                 *(("-B", str(bufsize)) if bufsize else ())],
                stdout=log, stderr=subprocess.STDOUT, env=UTC_ENV,
            )  # fmt: skip
        _wait_for_text(self.log, ("Startup nfcapd",), self.proc, "nfcapd")

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM (nfcapd flushes its current file) and return every stored flow via nfdump -o json,
        with first/last as Unix ms and tcp_flags as an int."""
        _stop(self.proc)
        flows: list[dict[str, Any]] = []
        for path in sorted(self.dir.glob("nfcapd.[0-9]*")):
            res = subprocess.run(
                ["nfdump", "-r", str(path), "-o", "json"], capture_output=True, env=UTC_ENV, timeout=30, check=True
            )
            text = res.stdout.decode().strip()
            if text:
                flows.extend(json.loads(text))
        out = [f for f in flows if f.get("type") == "FLOW"]
        for f in out:  # numbers back, so tests compare with exactly what was sent
            for k in ("first", "last"):
                f[k] = nfdump_time_ms(f[k])
            if isinstance(f.get("tcp_flags"), str):
                f["tcp_flags"] = nfdump_tcp_flags(f["tcp_flags"])
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)


def _pairs_to_multidict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook keeping duplicate keys (tshark repeats some) as 'key#2', 'key#3'..."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        key, i = k, 1
        while key in out:
            i += 1
            key = f"{k}#{i}"
        out[key] = v
    return out


def _walk_flows(node: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k.startswith("Flow ") and isinstance(v, dict):
                out.append(v)
            else:
                _walk_flows(v, out)
    elif isinstance(node, list):
        for v in node:
            _walk_flows(v, out)


class TsharkCapture:
    """tshark capturing UDP to `port` on lo into a pcap; finish() runs the cflow dissector on it.

    Start-up is confirmed, not guessed: probe datagrams go to a second port the capture filter also takes
    until one is in the pcap, so nothing sent after __init__ can be missed on a loaded machine; the probes
    are left out of what finish() decodes."""

    PROBE = b"ipfx-h1-probe"

    def __init__(self, workdir: Path, count: int) -> None:
        # A bound sink: without a listener the kernel answers ICMP port-unreachable and the exporter's
        # connected socket gets ECONNREFUSED on its next send (as a real dead collector would cause).
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.1", 0))
        self.probe_sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.probe_sink.bind(("127.0.0.1", 0))
        port = self.port = int(self.sink.getsockname()[1])
        probe_port = int(self.probe_sink.getsockname()[1])
        self.count = count
        self.pcap = workdir / f"cap{port}.pcap"
        self.log = workdir / f"tshark{port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["tshark", "-i", "lo", "-f", f"udp port {port} or udp port {probe_port}", "-a", "duration:60",
                 "-w", str(self.pcap)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_for_text(self.log, ("Capturing on",), self.proc, "tshark")
        deadline = time.monotonic() + START_TIMEOUT_S
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            while self.PROBE not in (self.pcap.read_bytes() if self.pcap.exists() else b""):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"tshark captures nothing: {self.log.read_text(errors='replace')}")
                probe.sendto(self.PROBE, ("127.0.0.1", probe_port))
                time.sleep(0.1)

    def finish(self) -> list[dict[str, Any]]:
        """Stop once `count` datagrams to the port are in the pcap (bounded), then decode: one dict per
        Data Record ('Flow N')."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and self._decode_packets() < self.count:
            time.sleep(0.2)
        _stop(self.proc, signal.SIGINT)
        out = subprocess.run(
            ["tshark", "-r", str(self.pcap), "-Y", f"udp.dstport=={self.port}", "-d", f"udp.port=={self.port},cflow",
             "-T", "json"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        packets = json.loads(out.stdout.decode(), object_pairs_hook=_pairs_to_multidict)
        self.packets = [p["_source"]["layers"].get("cflow") for p in packets]
        flows: list[dict[str, Any]] = []
        for p in self.packets:
            _walk_flows(p, flows)
        return flows

    def _decode_packets(self) -> int:
        """Datagrams to the port in the pcap so far."""
        res = subprocess.run(["tshark", "-r", str(self.pcap), "-Y", f"udp.dstport=={self.port}", "-T", "fields",
                              "-e", "frame.number"], capture_output=True, timeout=60, check=False)  # fmt: skip
        return len(res.stdout.split())

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)
        self.sink.close()
        self.probe_sink.close()


# -- known flows: every value distinct and non-zero so a swapped or dropped field shows ---------------
def _mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def known_flow_records(base_ms: int) -> list[Any]:
    """IPv4 TCP/UDP/ICMP and IPv6 TCP/UDP flows with known values (sub-second ms in every time)."""
    from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, to_addr16

    def rec(i: int, ethertype: int, src: str, dst: str, proto: int, sport: int, dport: int, **kw: Any) -> Any:
        return FlowRecord(
            ethertype=ethertype, direction=i % 2, vlan_id=100 + i,
            src_mac=_mac(f"02:00:00:00:01:{i:02x}"), dst_mac=_mac(f"02:00:00:00:02:{i:02x}"),
            src_addr=to_addr16(src), dst_addr=to_addr16(dst), src_port=sport, dst_port=dport, protocol=proto,
            ifindex=3, packets=10 + i, octets=1000 * (i + 1) + 7, start_ms=base_ms - 5000 + 17 * i,
            end_ms=base_ms - 1000 + 23 * i, tcp_flags=kw.get("flags", 0), tos=kw.get("tos", 0), end_reason=1 + i % 4,
            ingress_if=3 + i, egress_if=40 + i,
        )  # fmt: skip

    return [
        rec(0, ETH_P_IP, "10.1.2.3", "192.168.0.9", 6, 40001, 443, flags=0x1B, tos=0x10),
        rec(1, ETH_P_IP, "172.16.5.6", "8.8.8.8", 17, 40002, 53, tos=0xB8),
        rec(2, ETH_P_IP, "10.9.8.7", "10.7.8.9", 1, 0, 8 * 256 + 0),  # ICMP echo request: type 8 code 0
        rec(3, ETH_P_IPV6, "2001:db8::1", "2001:db8:ffff::2", 6, 40004, 8443, flags=0x12, tos=0x28),
        rec(4, ETH_P_IPV6, "fe80::1234:5678", "2001:db8::53", 17, 40005, 5353),
    ]


class Nfacctd:
    """pmacct's nfacctd (Debian 12: 1.7.7) on 127.0.0.1:port with the print plugin writing JSON lines to a
    file every second.  The aggregation key holds every field we send, so distinct flows stay distinct, and
    sampling_rate, which nfacctd takes from the sampling options record."""

    AGGREGATE = ("src_host, dst_host, src_port, dst_port, proto, tos, src_mac, dst_mac, vlan, in_iface, out_iface, "
                 "timestamp_start, timestamp_end, tcpflags, etype, sampling_rate")  # fmt: skip

    def __init__(self, workdir: Path, port: int, netns: str | None = None) -> None:
        self.port = port
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = self.dir / "flows.json"
        self.log = self.dir / "nfacctd.log"
        conf = self.dir / "nfacctd.conf"
        conf.write_text(
            "daemonize: false\n"
            f"nfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\n"
            f"logfile: {self.log}\n"
            "plugins: print[p]\n"
            "print_output[p]: json\n"
            f"print_output_file[p]: {self.out}\n"
            "print_output_file_append[p]: true\n"
            "print_refresh_time[p]: 1\n"
            "timestamps_since_epoch: true\n"
            "timestamps_secs: false\n"
            f"aggregate[p]: {self.AGGREGATE}\n"
        )
        # Its own session: nfacctd forks plugin processes, and they all go down with the group.
        prefix = ["ip", "netns", "exec", netns] if netns else []  # ip netns exec execs: same process
        self.proc = subprocess.Popen([*prefix, "nfacctd", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        _wait_for_text(self.log, ("waiting for NetFlow/IPFIX data",), self.proc, "nfacctd")
        time.sleep(0.3)  # the print plugin starts after the core says it is waiting

    def flows(self, expect: int, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """The flows printed so far, waiting (bounded) until at least `expect` are there."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()] \
                if self.out.exists() else []  # fmt: skip
            if len(rows) >= expect or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """nfacctd's core does not exit on SIGTERM while its plugin is busy: SIGKILL the whole group."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=STOP_TIMEOUT_S)


class PyNetflowCollector:
    """python-netflow's reference collector (PyPI `netflow`, `python -m netflow.collector`) on
    127.0.0.1:port, appending one gzip'd JSON line per decoded export packet to its output file."""

    def __init__(self, workdir: Path, port: int, netns: str | None = None) -> None:
        import sys

        self.port = port
        workdir.mkdir(parents=True, exist_ok=True)
        self.out = workdir / f"pynetflow{port}.gz"
        self.log = workdir / f"pynetflow{port}.log"
        with open(self.log, "wb") as log:
            prefix = ["ip", "netns", "exec", netns] if netns else []
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "netflow.collector", "--host", "127.0.0.1", "--port", str(port),
                 "--file", str(self.out), "--debug"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_for_text(self.log, ("Starting the NetFlow listener",), self.proc, "netflow.collector")
        time.sleep(0.3)  # the listener thread binds right after the log line

    def packets(self, expect_flows: int, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """Every decoded packet so far ({'header':..., 'flows': [...]}), waiting (bounded) until the
        flows number at least `expect_flows` or the collector died."""
        import gzip

        deadline = time.monotonic() + timeout_s
        while True:
            rows: list[dict[str, Any]] = []
            if self.out.exists():
                try:
                    lines = gzip.decompress(self.out.read_bytes()).splitlines()
                except (EOFError, OSError):  # a member being written: read again
                    lines = []
                for line in lines:
                    rows.extend(json.loads(line).values())
            got = sum(len(r["flows"]) for r in rows)
            if got >= expect_flows or time.monotonic() > deadline or self.proc.poll() is not None:
                return rows
            time.sleep(0.2)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)
