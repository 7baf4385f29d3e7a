"""clsact attach/detach leaves nothing behind, never touches another tool's qdisc or filters, and a
crashed run's filters are found and removed by the next run."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ipfixer.errors import KernelError
from ipfixer.lab import Lab, netns_exec, unique_name, wait_until
from ipfixer.sources.kernel.attach import Attacher, InterfaceSelector, LinkWatcher
from ipfixer.sources.kernel.program import libbpf

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]


def tc_show(ns: str, dev: str) -> str:
    out = [netns_exec(ns, "tc", "qdisc", "show", "dev", dev).stdout]
    for hook in ("ingress", "egress"):
        out.append(netns_exec(ns, "tc", "filter", "show", "dev", dev, hook, check=False).stdout)
    return "".join(out)


def prog_id(fd: int) -> int:
    """The kernel id of the BPF program behind one of our fds (from its fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("prog_id:"))


def ipfixer_prog_ids() -> set[int]:
    """Ids of loaded BPF programs named ipfixer_* (via BPF_PROG_GET_NEXT_ID / OBJ_GET_INFO)."""
    lib = libbpf()
    ids: set[int] = set()
    cur = ctypes.c_uint32(0)
    for _ in range(100000):  # bounded walk over all program ids
        nxt = ctypes.c_uint32(0)
        if lib.bpf_prog_get_next_id(cur, ctypes.byref(nxt)) != 0:
            break
        cur = nxt
        fd = lib.bpf_prog_get_fd_by_id(nxt)
        if fd < 0:
            continue
        info = ctypes.create_string_buffer(256)
        size = ctypes.c_uint32(256)
        try:
            if lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) == 0:
                name = info.raw[64:80].split(b"\0")[0]
                if name.startswith(b"ipfixer_"):
                    ids.add(nxt.value)
        finally:
            os.close(fd)
    return ids


def test_attach_detach_leaves_nothing(program: Any, netpair: Lab) -> None:
    net = netpair
    before = tc_show(net.ns_a, net.veth_a)
    att = Attacher(program.ingress_fd, program.egress_fd, "both", netns=net.ns_a)
    try:
        a = att.attach(net.veth_a)
        assert a.created_qdisc and a.hooks == ["ingress", "egress"]
        shown = tc_show(net.ns_a, net.veth_a)
        assert "clsact" in shown and "ipfixer_ingress" in shown and "ipfixer_egress" in shown
        assert att.attach(net.veth_a) is a  # idempotent
    finally:
        att.detach_all()
        att.close()
    assert tc_show(net.ns_a, net.veth_a) == before
    assert "clsact" not in before


def test_program_unloads_after_detach_and_close(netpair: Lab) -> None:
    from ipfixer.sources.kernel.program import load_program

    prog = load_program(map_entries=64)
    ours = {prog_id(prog.ingress_fd), prog_id(prog.egress_fd)}  # this test's programs, not anyone else's
    assert ours <= ipfixer_prog_ids()
    try:
        with Attacher(prog.ingress_fd, prog.egress_fd, "both", netns=netpair.ns_a) as att:
            att.attach(netpair.veth_a)
        assert ours
    finally:
        prog.close()
    assert wait_until(lambda: not (ipfixer_prog_ids() & ours), timeout=5.0)


def test_foreign_clsact_and_filter_untouched(program: Any, netpair: Lab) -> None:
    net = netpair
    netns_exec(net.ns_a, "tc", "qdisc", "add", "dev", net.veth_a, "clsact")
    # u32 is the classifier this kernel has; prio 10000 runs after ours (0x0f1f)
    netns_exec(net.ns_a, "tc", "filter", "add", "dev", net.veth_a, "ingress", "prio", "10000", "protocol", "ip",
          "u32", "match", "u32", "0", "0", "flowid", "1:1")
    before = tc_show(net.ns_a, net.veth_a)
    att = Attacher(program.ingress_fd, program.egress_fd, "both", netns=net.ns_a)
    try:
        a = att.attach(net.veth_a)
        assert not a.created_qdisc
        assert "u32" in tc_show(net.ns_a, net.veth_a)
        # That the foreign filter still sees traffic (we return TC_ACT_UNSPEC) is not observable here:
        # this kernel has no u32 hit counters (CONFIG_CLS_U32_PERF) and no gact/matchall to count with.
    finally:
        att.detach_all()
        att.close()
    after = tc_show(net.ns_a, net.veth_a)
    assert "clsact" in after and "u32" in after and "ipfixer" not in after
    assert after == before


CRASHER = """
import sys, time
sys.path.insert(0, sys.argv[3])
from ipfixer.sources.kernel.program import load_program
from ipfixer.sources.kernel.attach import Attacher
p = load_program(map_entries=64)
a = Attacher(p.ingress_fd, p.egress_fd, 'both', netns=sys.argv[1])
a.attach(sys.argv[2])
print('attached', flush=True)
time.sleep(60)
"""


def crashed_run(net: Lab) -> int:
    """A process that attached ipfixer's filters to net.veth_a and was SIGKILLed (no detach): its pid."""
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, net.ns_a, net.veth_a, str(REPO)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    return proc.pid


def test_sigkilled_run_is_cleaned_by_remove_stale(program: Any, netpair: Lab) -> None:
    net = netpair
    crashed_run(net)
    assert "ipfixer_ingress" in tc_show(net.ns_a, net.veth_a)  # the filter outlives its process
    att = Attacher(program.ingress_fd, program.egress_fd, "both", netns=net.ns_a)
    try:
        assert att.remove_stale([net.veth_a]) == 2
        assert "ipfixer" not in tc_show(net.ns_a, net.veth_a)
        assert att.remove_stale(None) == 0
    finally:
        att.detach_all()
        att.close()


def test_live_owners_filters_are_never_stale(program: Any, netpair: Lab) -> None:
    """A filter is stale only when the process named in it is gone: a live instance's filters survive
    remove_stale() and block a second attach; once it is killed they go, with the clsact it created."""
    net = netpair
    before = tc_show(net.ns_a, net.veth_a)
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, net.ns_a, net.veth_a, str(REPO)],
                            stdout=subprocess.PIPE, text=True)
    att = Attacher(program.ingress_fd, program.egress_fd, "both", netns=net.ns_a)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
        shown = tc_show(net.ns_a, net.veth_a)
        assert f".{proc.pid}." in shown  # the owner's pid is in the filter name
        assert att.remove_stale([net.veth_a]) == 0 and att.remove_stale(None) == 0
        with pytest.raises(KernelError, match=f"another live ipfixer \\(pid {proc.pid}\\)"):
            att.attach(net.veth_a)
        assert tc_show(net.ns_a, net.veth_a) == shown  # untouched, the failed attach undid nothing of theirs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    try:
        assert att.remove_stale([net.veth_a]) == 2
        assert tc_show(net.ns_a, net.veth_a) == before  # the dead run's clsact went with its filters
    finally:
        att.detach_all()
        att.close()


def test_owner_in_another_pid_namespace(program: Any, netpair: Lab) -> None:
    """A filter whose owner lives in another pid namespace (a container's ipfixer) cannot be judged by
    its pid: a plain Attacher leaves it alone; the meter's, which holds the namespace lock (so no other
    ipfixer runs in this network namespace), removes it as stale, with the clsact it created."""
    from ipfixer.instance import Owner

    net = netpair
    before = tc_show(net.ns_a, net.veth_a)
    foreign = Attacher(program.ingress_fd, program.egress_fd, "both", netns=net.ns_a)
    me = Owner.me()
    foreign.owner = Owner(me.pidns + 1, 4242, 777)  # as tagged by an ipfixer in another pid namespace
    plain = Attacher(program.ingress_fd, program.egress_fd, "both", netns=net.ns_a)
    locked = Attacher(program.ingress_fd, program.egress_fd, "both", netns=net.ns_a, namespace_locked=True)
    try:
        foreign.attach(net.veth_a)
        foreign.attached.clear()  # that process "crashed": it will not detach
        tagged = tc_show(net.ns_a, net.veth_a)
        assert f".{me.pidns + 1}.4242.777.q" in tagged
        assert plain.remove_stale([net.veth_a]) == 0
        with pytest.raises(KernelError, match="another live ipfixer \\(pid 4242\\)"):
            plain.attach(net.veth_a)
        assert tc_show(net.ns_a, net.veth_a) == tagged
        assert locked.remove_stale([net.veth_a]) == 2
        assert tc_show(net.ns_a, net.veth_a) == before
    finally:
        for a in (foreign, plain, locked):
            a.detach_all()
            a.close()


def test_crashed_runs_clsact_is_removed_by_the_next_run(program: Any, netpair: Lab) -> None:
    """The next run takes over a clsact a killed run created and removes it at detach; one another
    tool created stays."""
    net = netpair
    before = tc_show(net.ns_a, net.veth_a)
    pid = crashed_run(net)
    att = Attacher(program.ingress_fd, program.egress_fd, "both", netns=net.ns_a)
    try:
        assert att.attach(net.veth_a).created_qdisc
        assert f".{pid}." not in tc_show(net.ns_a, net.veth_a)
    finally:
        att.detach_all()
    assert tc_show(net.ns_a, net.veth_a) == before
    netns_exec(net.ns_a, "tc", "qdisc", "add", "dev", net.veth_a, "clsact")  # now another tool's clsact
    foreign = tc_show(net.ns_a, net.veth_a)
    try:
        assert not att.attach(net.veth_a).created_qdisc
    finally:
        att.detach_all()
        att.close()
    assert tc_show(net.ns_a, net.veth_a) == foreign


def test_selector_and_link_watcher(program: Any, netpair: Lab) -> None:
    net = netpair
    sel = InterfaceSelector(include=("ipfxw*", net.veth_a), exclude=("lo", "*x"))
    assert sel.matches(net.veth_a) and sel.matches("ipfxw1") and not sel.matches("ipfxw1x")
    assert not sel.matches("lo") and not sel.matches("eth0")
    att = Attacher(program.ingress_fd, program.egress_fd, "ingress", netns=net.ns_a)
    watcher = LinkWatcher(att, sel)
    new_a, new_b = unique_name("w"), unique_name("v")
    try:
        watcher.start()
        assert set(att.attached) == {net.ifindex_a}
        netns_exec(net.ns_a, "ip", "link", "add", new_a, "type", "veth", "peer", "name", new_b)
        idx = int(netns_exec(net.ns_a, "cat", f"/sys/class/net/{new_a}/ifindex").stdout)
        assert wait_until(lambda: watcher.poll(0.05) >= 0 and idx in att.attached, timeout=5.0)
        assert "ipfixer_ingress" in netns_exec(net.ns_a, "tc", "filter", "show", "dev", new_a, "ingress").stdout
        assert all(a.ifname != new_b for a in att.attached.values())  # excluded by the selector
        netns_exec(net.ns_a, "ip", "link", "del", new_a)
        assert wait_until(lambda: watcher.poll(0.05) >= 0 and idx not in att.attached, timeout=5.0)
    finally:
        watcher.stop()
        att.detach_all()
        att.close()
        netns_exec(net.ns_a, "ip", "link", "del", new_a, check=False)
