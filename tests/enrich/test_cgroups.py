"""cgroup_skb attribution: a UDP sender placed in a test cgroup; its flows carry that cgroup's id."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ipfixer.enrich.cgroups import CgroupAttributor, CgroupEvent, cgroup2_mount, container_name
from ipfixer.lab import Namespaces, ns_socket, unique_name
from ipfixer.model import empty_batch, to_addr16


@pytest.fixture
def cgroup_and_ns() -> Iterator[tuple[str, str]]:
    mount = cgroup2_mount()
    assert mount is not None, "no cgroup2 mount"
    cg = os.path.join(mount, unique_name("cg"))
    os.mkdir(cg)
    try:
        with Namespaces() as spaces:
            yield cg, spaces.add(tag="n")
    finally:
        for _ in range(50):  # processes leave the cgroup asynchronously after exit
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.1)


SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
for size in (10, 200, 1000):
    s.sendto(b"x" * size, ("127.0.0.1", int(sys.argv[2])))
"""


@pytest.mark.root
def test_sender_in_cgroup_is_attributed(cgroup_and_ns: tuple[str, str]) -> None:
    cg, ns = cgroup_and_ns
    cg_id = os.stat(cg).st_ino
    att = CgroupAttributor(cgroup_path=cg, max_entries=128)
    try:
        assert att.available
        rx = ns_socket(ns, socket.SOCK_DGRAM, ("127.0.0.1", 45002))
        try:

            def join_cgroup() -> None:
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))

            subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", SENDER, "45001", "45002"],
                preexec_fn=join_cgroup, check=True, timeout=30,
            )  # fmt: skip
            assert [len(rx.recv(2048)) for _ in range(3)] == [10, 200, 1000]
        finally:
            rx.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and att.events_seen < 3:
            att.poll(100)
        assert att.events_seen == 3  # egress of the sender only: the receiver is outside the cgroup
        assert att.counters() == {"emitted": 3, "ring_full": 0, "not_ipv4": 0}

        lo = np.frombuffer(to_addr16("127.0.0.1"), np.uint8)
        batch = empty_batch(3)
        batch["protocol"] = 17
        batch["src_addr"] = lo
        batch["dst_addr"] = lo
        batch["src_port"] = [45001, 45002, 45001]
        batch["dst_port"] = [45002, 45001, 9999]
        assert att.enrich(batch) == 2
        assert batch["cgroup_id"].tolist() == [cg_id, cg_id, 0]
        key = bytes([17]) + bytes(lo) * 2 + (45001).to_bytes(2, "big") + (45002).to_bytes(2, "big")
        assert att.lookup(key) == (cg_id, 3)
        assert att.resolver.path(cg_id) == cg
        assert att.container_name(cg_id) is None
    finally:
        att.close()


def test_event_layout_and_container_names() -> None:
    raw = (123).to_bytes(8, "little") + (77).to_bytes(8, "little") + bytes([10, 0, 0, 5, 10, 0, 0, 6])
    raw += (
        (1234).to_bytes(2, "little")
        + (53).to_bytes(2, "little")
        + bytes([17, 1])
        + (60).to_bytes(2, "little")
    )
    ev = CgroupEvent.unpack(raw)
    assert ev == CgroupEvent(123, 77, bytes([10, 0, 0, 5]), bytes([10, 0, 0, 6]), 1234, 53, 17, 1, 60)
    assert int.from_bytes(ev.src_ip, "little") == 0x0500000A  # the reference's "first octet in LSB"
    cid = "ab" * 32
    assert container_name(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope") == "docker:abababababab"
    assert (
        container_name(f"/sys/fs/cgroup/machine.slice/libpod-{cid}.scope/container") == "podman:abababababab"
    )
    uid = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0"
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{cid}.scope"
    assert container_name(path) == "k8s:pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/abababababab"
    assert container_name("/sys/fs/cgroup/user.slice/user-0.slice/session-1.scope") is None
