"""Start-up check of the Linux capabilities the kernel meter needs, with a message that says which
one is missing and how to grant it (rather than a bcc or netlink EPERM traceback later)."""

from __future__ import annotations

from pathlib import Path

from ipfixer.errors import KernelError

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

# capability -> why ipfixer needs it; CAP_SYS_ADMIN stands in for BPF and PERFMON on any kernel.
REQUIRED = {
    CAP_BPF: ("CAP_BPF", "load the TC classifier and create its maps"),
    CAP_PERFMON: ("CAP_PERFMON", "read kernel time and pointers in BPF programs"),
    CAP_NET_ADMIN: ("CAP_NET_ADMIN", "add clsact qdiscs and tc filters (NFLOG: the nftables rule)"),
}


def effective_caps(status_text: str) -> int:
    """The CapEff bitmask from /proc/<pid>/status text."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing_caps(cap_eff: int, need_bpf: bool = True) -> list[str]:
    """Names and reasons of required capabilities absent from `cap_eff` (need_bpf=False: the NFLOG
    source, which needs only CAP_NET_ADMIN for its nftables rule and netlink socket)."""
    sys_admin = bool(cap_eff & (1 << CAP_SYS_ADMIN))
    out = []
    for bit, (name, why) in REQUIRED.items():
        if cap_eff & (1 << bit):
            continue
        if not need_bpf and bit in (CAP_BPF, CAP_PERFMON):
            continue
        if sys_admin and bit in (CAP_BPF, CAP_PERFMON):
            continue
        out.append(f"{name} (to {why})")
    return out


def check_capabilities(status_path: Path = Path("/proc/self/status"), need_bpf: bool = True) -> None:
    """Raise KernelError naming every missing capability."""
    missing = missing_caps(effective_caps(status_path.read_text()), need_bpf)
    if missing:
        raise KernelError(
            "missing capabilities: " + ", ".join(missing)
            + "; run as root, or grant them (systemd AmbientCapabilities=, docker cap_add:)"
        )
