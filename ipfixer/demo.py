"""`ipfixer demo`: a lab of two network namespaces, ipfixer metering one end of the veth between
them, a local collector, some traffic, and the decoded flows shown as they arrive.

Everything it creates (namespaces, veths, the daemon, temp files) is removed when it ends, whatever
way it ends.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from ipfixer.errors import DecodeError, IpfixerError
from ipfixer.lab import Lab, netns_exec, start_ipfixer, stop_ipfixer
from ipfixer.netns import in_netns
from ipfixer.wire.decode import Decoder

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}
DIRECTIONS = {0: "in", 1: "out"}
REASONS = {1: "idle", 2: "active", 3: "end", 4: "forced", 5: "resources"}


def _traffic(lab: Lab, stop: threading.Event) -> None:
    """Pings both ways, a few UDP bursts and an IPv6 ping: known, small, bounded."""
    steps: list[Any] = [
        lambda: netns_exec(lab.ns_b, "ping", "-c", "3", "-i", "0.2", lab.v4_a, check=False),
        lambda: lab.send_udp(lab.ns_b, lab.v4_a, 5353, 9999, [120] * 10),
        lambda: netns_exec(lab.ns_a, "ping", "-c", "2", "-i", "0.2", lab.v4_b, check=False),
        lambda: netns_exec(lab.ns_b, "ping", "-6", "-c", "2", "-i", "0.2", lab.v6_a, check=False),
        lambda: lab.send_udp(lab.ns_a, lab.v6_b, 4000, 4001, [60] * 5),
    ]
    for step in steps:
        if stop.is_set():
            return
        step()
        time.sleep(0.3)


def _row(fields: dict[str, Any]) -> str:
    src = fields.get("sourceIPv4Address", fields.get("sourceIPv6Address", "?"))
    dst = fields.get("destinationIPv4Address", fields.get("destinationIPv6Address", "?"))
    proto = PROTOCOLS.get(fields.get("protocolIdentifier", -1), str(fields.get("protocolIdentifier")))
    return (f"{str(src):>22} {fields.get('sourceTransportPort', 0):>5} -> {str(dst):<22} "
            f"{fields.get('destinationTransportPort', 0):>5} {proto:<5} "
            f"{DIRECTIONS.get(fields.get('flowDirection', -1), '?'):<3} "
            f"{fields.get('packetDeltaCount', 0):>7} {fields.get('octetDeltaCount', 0):>9} "
            f"{REASONS.get(fields.get('flowEndReason', 0), '-')}")


def run_demo(duration_s: float = 8.0) -> int:
    """Build the lab, run ipfixer on it for `duration_s`, print the flows; 0 when flows were seen."""
    if os.geteuid() != 0:
        raise IpfixerError("the demo builds network namespaces and loads BPF: run it as root")
    tmp = Path(tempfile.mkdtemp(prefix="ipfx-demo-"))
    stop = threading.Event()
    proc: subprocess.Popen[bytes] | None = None
    sock: socket.socket | None = None
    flows = 0
    with Lab() as lab:
        try:
            sock = in_netns(lab.ns_a, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind(("127.0.0.1", 0))
            cfg = tmp / "ipfixer.yaml"
            cfg.write_text(yaml.safe_dump({
                "interfaces": {"include": [lab.veth_a], "exclude": []},
                "collectors": [{"address": "127.0.0.1", "port": sock.getsockname()[1]}],
                "timeouts": {"active": "4s", "idle": "2s", "drain_interval": "500ms"},
                "metrics": {"listen": None},
                "lock_dir": str(tmp),
            }))
            print(f"lab: {lab.ns_a}/{lab.veth_a} ({lab.v4_a}, {lab.v6_a}) <-> {lab.ns_b}/{lab.veth_b} "
                  f"({lab.v4_b}, {lab.v6_b}); ipfixer meters {lab.veth_a}, exports IPFIX to "
                  f"127.0.0.1:{sock.getsockname()[1]} in {lab.ns_a}", flush=True)
            proc = start_ipfixer(lab.ns_a, cfg, tmp / "ipfixer.log", "--duration", str(duration_s))
            traffic = threading.Thread(target=_traffic, args=(lab, stop), daemon=True)
            traffic.start()
            print(f"{'source':>22} {'sport':>5}    {'destination':<22} {'dport':>5} {'proto':<5} dir "
                  f"{'packets':>7} {'octets':>9} end", flush=True)
            flows = _show(sock, proc, deadline=time.monotonic() + duration_s + 30)
            stop.set()
            traffic.join(10)
        finally:
            stop.set()
            if proc is not None:
                stop_ipfixer(proc)
            if sock is not None:
                sock.close()
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    print(f"demo: {flows} flow records received; lab removed", flush=True)
    return 0 if flows else 1


def _show(sock: socket.socket, proc: subprocess.Popen[bytes], deadline: float) -> int:
    """Print every flow record until the daemon has exited and the socket is quiet."""
    decoder = Decoder()
    flows = 0
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            quiet_since = None
            data = sock.recv(65535)
            try:
                msg = decoder.feed(data, source="ipfixer")
            except DecodeError as exc:
                print(f"malformed message: {exc}", file=sys.stderr)
                continue
            for rec in msg.records:
                if not rec.is_options:
                    flows += 1
                    print(_row(rec.fields), flush=True)
        elif proc.poll() is not None:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 1.0:
                break
    return flows
