"""Helpers for tests that drive the real `ipfixer` CLI as a subprocess and receive its UDP export."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from ipfixer.netns import in_netns
from ipfixer.wire.decode import Decoder

IPFIXER = [sys.executable, "-m", "ipfixer.cli"]


class UdpCollector:
    """A real UDP socket on 127.0.0.1 decoding what arrives with ipfixer's own Decoder."""

    def __init__(self, family: int = socket.AF_INET, address: str = "127.0.0.1", netns: str | None = None) -> None:
        self.sock = in_netns(netns, lambda: socket.socket(family, socket.SOCK_DGRAM))  # None: this namespace
        self.sock.bind((address, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.decoder = Decoder()
        self.messages: list[Any] = []
        self.sizes: list[int] = []  # each datagram's length, as received

    def receive(self, seconds: float, until_idle: float | None = None) -> None:
        """Collect for up to `seconds`; with `until_idle`, stop once nothing came for that long."""
        deadline = time.monotonic() + seconds
        last = time.monotonic()
        while time.monotonic() < deadline:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                if until_idle is not None and time.monotonic() - last > until_idle:
                    return
                continue
            last = time.monotonic()
            self.sizes.append(len(data))
            self.messages.append(self.decoder.feed(data, source=peer[0]))

    def flow_records(self) -> list[dict[str, Any]]:
        return [r.fields for m in self.messages for r in m.records if not r.is_options]

    def options_records(self) -> list[dict[str, Any]]:
        return [r.fields for m in self.messages for r in m.records if r.is_options]

    def close(self) -> None:
        self.sock.close()


def totals_by_flow(records: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[int]]:
    """(src, dst, sport, dport, proto) -> [packets, octets], summed over every record of the flow."""
    out: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        src = r.get("sourceIPv4Address", r.get("sourceIPv6Address"))
        dst = r.get("destinationIPv4Address", r.get("destinationIPv6Address"))
        key = (str(src), str(dst), r.get("sourceTransportPort"), r.get("destinationTransportPort"),
               r.get("protocolIdentifier"))
        out[key][0] += r["packetDeltaCount"]
        out[key][1] += r["octetDeltaCount"]
    return dict(out)


def write_config(path: Path, collectors: list[dict[str, Any]], **overrides: Any) -> Path:
    """A config file for a test: the given collectors, metrics off unless overridden."""
    data: dict[str, Any] = {"collectors": collectors, "metrics": {"listen": None}}
    for key, value in overrides.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPFIXER_") or k == "IPFIXER_REQUIRE_KERNEL_TESTS"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ctl_socket(lock_dir: Path, netns: str | None = None) -> Path:
    """The default control socket of a daemon whose lock_dir is `lock_dir`, running in netns (a name
    under /run/netns) or in this process's namespace: <lock_dir>/ctl-netns-<inode>.sock."""
    from ipfixer.control import SOCKET_NAME

    ns = Path("/run/netns") / netns if netns else Path("/proc/thread-self/ns/net")
    return lock_dir / SOCKET_NAME.format(inode=os.stat(ns).st_ino)
