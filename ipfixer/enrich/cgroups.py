"""Container attribution: a cgroup_skb eBPF program (bpf/cgroup_skb.c) reports which cgroup v2 each
IPv4 packet's socket belongs to; flows of matching 5-tuples get that cgroup id, and the id resolves to a
path (walking the cgroup2 mount, cgroup id == directory inode) and a container name from the path.

The TC meter cannot see sockets (cgroup id 0 there), hence a second, socket-level program.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import struct
import time
from typing import Any, NamedTuple

import numpy as np

from ipfixer.enrich.conntrack import batch_keys
from ipfixer.model import V4_MAPPED_PREFIX
from ipfixer.resources import share_dir

log = logging.getLogger(__name__)

PROGRAM_FILE = share_dir("bpf") / "cgroup_skb.c"
BPF_F_ALLOW_MULTI = 2  # share the hook with other tools' programs instead of replacing them

# struct cgroup_flow_event (bpf/flow_types.h): addresses in network order, ports/len in host order
EVENT_STRUCT = struct.Struct("=QQ4s4sHHBBH")
assert EVENT_STRUCT.size == 32


class CgroupEvent(NamedTuple):
    """One packet seen by the cgroup_skb program."""

    timestamp_ns: int
    cgroup_id: int
    src_ip: bytes  # 4 bytes, packet (network) order
    dst_ip: bytes
    src_port: int
    dst_port: int
    protocol: int
    direction: int
    packet_len: int

    @classmethod
    def unpack(cls, raw: bytes) -> CgroupEvent:
        """Decode the 32-byte ring-buffer record."""
        return cls(*EVENT_STRUCT.unpack(raw[: EVENT_STRUCT.size]))

    def packed_key(self, reverse: bool = False) -> bytes:
        """The 37-byte flow key (see conntrack.batch_keys), optionally of the opposite direction."""
        src, dst = V4_MAPPED_PREFIX + self.src_ip, V4_MAPPED_PREFIX + self.dst_ip
        if reverse:
            return struct.pack("!B16s16sHH", self.protocol, dst, src, self.dst_port, self.src_port)
        return struct.pack("!B16s16sHH", self.protocol, src, dst, self.src_port, self.dst_port)


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on hybrid systems)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None


_CONTAINER_PATTERNS = [
    # kubelet (systemd or cgroupfs driver): .../kubepods[-burstable]-pod<uid>.slice/cri-containerd-<id>.scope
    (
        re.compile(r"kubepods.*?pod([0-9a-f_-]{36})(?:\.slice)?/(?:[a-z-]+-)?([0-9a-f]{64})(?:\.scope)?$"),
        "k8s",
    ),
    (re.compile(r"(?:^|/)docker-([0-9a-f]{64})\.scope$"), "docker"),
    (re.compile(r"(?:^|/)docker/([0-9a-f]{64})$"), "docker"),
    (re.compile(r"(?:^|/)libpod-(?!conmon)([0-9a-f]{64})(?:\.scope)?(?:/container)?$"), "podman"),
    (re.compile(r"(?:^|/)cri-containerd-([0-9a-f]{64})\.scope$"), "containerd"),
    (re.compile(r"(?:^|/)crio-([0-9a-f]{64})\.scope$"), "crio"),
    (re.compile(r"(?:^|/)containerd/([0-9a-f]{64})$"), "containerd"),
]


def container_name(cgroup_path: str) -> str | None:
    """'<runtime>:<12-hex id>' (k8s: 'k8s:pod<uid>/<id12>') from a cgroup path, or None for non-containers.

    Only the id is in the path; a human name needs the runtime's API, which this module does not call.
    """
    for pattern, runtime in _CONTAINER_PATTERNS:
        m = pattern.search(cgroup_path)
        if m is None:
            continue
        if runtime == "k8s":
            return f"k8s:pod{m.group(1).replace('_', '-')}/{m.group(2)[:12]}"
        return f"{runtime}:{m.group(1)[:12]}"
    return None


class CgroupResolver:
    """cgroup id -> path under the cgroup2 mount, by inode number; cached, rescanned at most every
    rescan_s on a miss (a walk of a big hierarchy costs milliseconds)."""

    def __init__(self, root: str | None = None, rescan_s: float = 5.0, max_dirs: int = 200_000) -> None:
        self.root = root or cgroup2_mount() or "/sys/fs/cgroup"
        self.rescan_s = rescan_s
        self.max_dirs = max_dirs
        self._paths: dict[int, str] = {}
        self._last_scan = -1e18

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        paths: dict[int, str] = {}
        try:
            paths[os.stat(self.root).st_ino] = self.root
        except OSError:
            return
        stack = [self.root]
        while stack and len(paths) < self.max_dirs:
            top = stack.pop()
            try:
                with os.scandir(top) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            paths[entry.inode()] = entry.path
                            stack.append(entry.path)
            except OSError:
                continue
        self._paths = paths

    def path(self, cgroup_id: int) -> str | None:
        """Absolute cgroup directory of an id, or None (gone, or not under root)."""
        if cgroup_id not in self._paths and time.monotonic() - self._last_scan >= self.rescan_s:
            self._scan()
        return self._paths.get(cgroup_id)

    def container(self, cgroup_id: int) -> str | None:
        """Container name of an id (see container_name)."""
        p = self.path(cgroup_id)
        return container_name(p) if p else None


class CgroupAttributor:
    """Loads and attaches bpf/cgroup_skb.c to a cgroup v2 directory, consumes its events into a bounded
    5-tuple -> (cgroup id, packets) LRU, and sets cgroup_id on flow rows of either direction.

    poll() is called by whichever thread the daemon chooses (it reads the ring buffer); enrich() at drain.
    """

    def __init__(self, cgroup_path: str | None = None, max_entries: int = 65536) -> None:
        self.cgroup_path = cgroup_path or cgroup2_mount() or "/sys/fs/cgroup"
        self.max_entries = max_entries
        self.available = False
        self.events_seen = 0
        self.flows: collections.OrderedDict[bytes, list[int]] = collections.OrderedDict()
        self.resolver = CgroupResolver()
        self._bpf: Any = None
        self._fd = -1
        self._attached: list[tuple[Any, Any]] = []
        try:
            self._load()
            self.available = True
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception for load/attach failures
            log.warning("cgroup attribution disabled (%s): %s", self.cgroup_path, exc)
            self.close()

    def _load(self) -> None:
        from bcc import BPF, BPFAttachType

        # -I: the event layout is in flow_types.h beside it (bcc compiles a copy, not the file in place)
        self._bpf = BPF(src_file=str(PROGRAM_FILE).encode(), cflags=[f"-I{PROGRAM_FILE.parent}"])
        self._fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for name, attach_type in (
            ("cgroup_skb_ingress", BPFAttachType.CGROUP_INET_INGRESS),
            ("cgroup_skb_egress", BPFAttachType.CGROUP_INET_EGRESS),
        ):
            fn = self._bpf.load_func(name.encode(), BPF.CGROUP_SKB)
            BPF.attach_func(fn, self._fd, attach_type, BPF_F_ALLOW_MULTI)
            self._attached.append((fn, attach_type))
        self._bpf[b"cgroup_events"].open_ring_buffer(self._on_event)

    def _on_event(self, _ctx: Any, data: Any, size: int) -> int:
        self.add(CgroupEvent.unpack(ctypes.string_at(data, size)))
        return 0

    def add(self, ev: CgroupEvent) -> None:
        """Record one event (also usable with events from elsewhere, e.g. replay)."""
        self.events_seen += 1
        key = ev.packed_key()
        slot = self.flows.get(key)
        if slot is None:
            self.flows[key] = [ev.cgroup_id, 1]
            if len(self.flows) > self.max_entries:
                self.flows.popitem(last=False)
        else:
            slot[0] = ev.cgroup_id
            slot[1] += 1
            self.flows.move_to_end(key)

    def poll(self, timeout_ms: int = 0) -> int:
        """Consume pending ring-buffer events (waiting up to timeout_ms); events consumed."""
        if self._bpf is None:
            return 0
        before = self.events_seen
        if timeout_ms > 0:
            self._bpf.ring_buffer_poll(timeout_ms)
        self._bpf.ring_buffer_consume()
        return self.events_seen - before

    def counters(self) -> dict[str, int]:
        """Kernel-side counts: emitted, ring_full (events lost), not_ipv4."""
        if self._bpf is None:
            return {}
        table = self._bpf[b"cgroup_counters"]
        names = ("emitted", "ring_full", "not_ipv4")
        return {n: int(sum(table[table.Key(i)])) for i, n in enumerate(names)}

    def lookup(self, packed_key: bytes) -> tuple[int, int] | None:
        """(cgroup id, packets) for a packed flow key in either direction, or None."""
        slot = self.flows.get(packed_key)
        if slot is None:
            p = packed_key
            slot = self.flows.get(p[:1] + p[17:33] + p[1:17] + p[35:37] + p[33:35])
        return (slot[0], slot[1]) if slot is not None else None

    def enrich(self, batch: np.ndarray) -> int:
        """Set cgroup_id on rows whose 5-tuple (either direction) was seen; rows enriched."""
        if len(batch) == 0 or not self.flows:
            return 0
        n = 0
        for i, key in enumerate(batch_keys(batch)):
            hit = self.lookup(key)
            if hit is not None and hit[0]:
                batch["cgroup_id"][i] = hit[0]
                n += 1
        return n

    def container_name(self, cgroup_id: int) -> str | None:
        """Container name for a cgroup id (cached path walk)."""
        return self.resolver.container(cgroup_id)

    def close(self) -> None:
        """Detach both programs and release bcc and the cgroup fd."""
        if self._bpf is not None:
            from bcc import BPF

            for fn, attach_type in self._attached:
                try:
                    BPF.detach_func(fn, self._fd, attach_type)
                except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
                    log.warning("cgroup_skb detach from %s failed: %s", self.cgroup_path, exc)
            self._attached.clear()
            self._bpf.cleanup()
            self._bpf = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.available = False
