"""The instance lock (ipfixer.instance) in network namespaces this test creates: exclusion that does not
depend on lock_dir, released by the kernel when the holder dies, and a pid file that cannot be
turned against root with a planted symlink."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfixer.instance import InstanceLockError, LockDirError, NamespaceLock, Owner, process_start_ticks
from ipfixer.lab import Namespaces
from ipfixer.netns import in_netns

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def netns() -> Iterator[str]:
    with Namespaces() as spaces:
        yield spaces.add(tag="L")


def lock_in(ns: str, lock_dir: Path | None) -> NamespaceLock:
    """A NamespaceLock taken from a thread inside ns (the abstract socket is bound there)."""
    def take() -> NamespaceLock:
        lock = NamespaceLock(lock_dir)
        lock.acquire()
        return lock
    return in_netns(ns, take)


def test_second_lock_with_other_lock_dir_is_refused(netns: str, tmp_path: Path) -> None:
    first = lock_in(netns, tmp_path / "a")
    try:
        with pytest.raises(InstanceLockError) as err:
            lock_in(netns, tmp_path / "b")  # another lock_dir: same namespace, refused
        assert err.value.owner_pid == os.getpid()
        assert f"pid {os.getpid()}" in str(err.value) and "already meters" in str(err.value)
        with pytest.raises(InstanceLockError):
            lock_in(netns, None)  # no lock_dir at all
        assert (tmp_path / "a" / f"netns-{first.netns}.lock").read_text() == f"{os.getpid()}\n"
    finally:
        first.release()
    lock_in(netns, tmp_path / "b").release()  # released: free again


HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from ipfixer.instance import NamespaceLock
from ipfixer.netns import in_netns
lock = NamespaceLock(None)
in_netns(sys.argv[1], lock.acquire)
print('held', flush=True)
time.sleep(60)
"""


def test_lock_of_a_killed_process_is_free(netns: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, netns, str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(InstanceLockError) as err:
            lock_in(netns, None)
        assert err.value.owner_pid == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    lock_in(netns, None).release()  # SIGKILL released it: no stale lock to clean by hand


def test_planted_symlink_is_not_followed(netns: str, tmp_path: Path) -> None:
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir(mode=0o755)
    target = tmp_path / "precious"
    target.write_text("do not truncate me\n")
    inode = in_netns(netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    (lock_dir / f"netns-{inode}.lock").symlink_to(target)
    with pytest.raises(LockDirError) as err:
        lock_in(netns, lock_dir)
    assert "symbolic link" in str(err.value) and str(lock_dir) in str(err.value)
    assert target.read_text() == "do not truncate me\n"
    lock_in(netns, tmp_path / "other").release()  # the failed attempt left the namespace free


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_lock_dir_writable_by_others_is_refused(netns: str, tmp_path: Path, mode: int) -> None:
    lock_dir = tmp_path / "shared"
    lock_dir.mkdir()
    os.chmod(lock_dir, mode)
    with pytest.raises(LockDirError) as err:
        lock_in(netns, lock_dir)
    assert "writable by group or others" in str(err.value) and f"{mode:04o}" in str(err.value)
    assert list(lock_dir.iterdir()) == []  # nothing created in it


def test_lock_dir_owned_by_another_user_is_refused(netns: str, tmp_path: Path) -> None:
    lock_dir = tmp_path / "theirs"
    lock_dir.mkdir(mode=0o755)
    os.chown(lock_dir, 65534, 65534)
    with pytest.raises(LockDirError) as err:
        lock_in(netns, lock_dir)
    assert "owned by uid 65534" in str(err.value)


def test_hard_link_and_fifo_are_refused(netns: str, tmp_path: Path) -> None:
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir(mode=0o755)
    inode = in_netns(netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    target = tmp_path / "precious"
    target.write_text("keep\n")
    os.link(target, lock_dir / f"netns-{inode}.lock")
    with pytest.raises(LockDirError, match="hard links"):
        lock_in(netns, lock_dir)
    assert target.read_text() == "keep\n"
    (lock_dir / f"netns-{inode}.lock").unlink()
    os.mkfifo(lock_dir / f"netns-{inode}.lock")
    with pytest.raises(LockDirError, match="not a regular file"):
        lock_in(netns, lock_dir)


def test_owner_liveness() -> None:
    me = Owner.me()
    assert me.alive() is True and Owner.parse(me.tag) == me
    assert process_start_ticks(os.getpid()) == me.start
    assert Owner(me.pidns, me.pid, me.start + 1).alive() is False  # a recycled pid: another start time
    assert Owner(me.pidns + 1, me.pid, me.start).alive() is None  # another pid namespace: cannot judge
    assert Owner.parse("garbage") is None and Owner.parse("1.2") is None


def test_probes_are_answered_so_every_refusal_names_the_pid(netns: str) -> None:
    """Each refused instance connects once to read the holder's pid; the holder accepts and closes them
    at its polls, so the listen backlog (64) never fills and the 200th refusal still names the pid."""
    first = lock_in(netns, None)
    try:
        pids = []
        for i in range(200):
            try:
                lock_in(netns, None)
            except InstanceLockError as exc:
                pids.append(exc.owner_pid)
            if i % 50 == 49:
                assert first.answer_probes(limit=100) == 50
        assert pids == [os.getpid()] * 200
    finally:
        first.release()


SQUATTER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\\0ipfixer-netns-" + sys.argv[1].encode())
s.listen(1)
print("bound", flush=True)
time.sleep(60)
"""


def test_name_squatted_by_another_user_is_reported_as_such(netns: str) -> None:
    inode = in_netns(netns, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "setpriv", "--reuid=65534", "--regid=65534",
                             "--clear-groups", sys.executable, "-c", SQUATTER, str(inode)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "bound"
        with pytest.raises(InstanceLockError) as err:
            lock_in(netns, None)
        assert err.value.owner_uid == 65534 and "uid 65534: not root, so possibly not ipfixer" in str(err.value)
    finally:
        proc.kill()
        proc.wait(timeout=10)
