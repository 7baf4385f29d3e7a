"""One ipfixer per network namespace, and who owns what it left in the kernel.

Exclusion does not depend on any configurable path: an abstract unix socket named after the network
namespace (`\\0ipfixer-netns-<inode>`) is bound for the life of the process. Abstract socket names
live in the network namespace, need no file system and are released by the kernel when the process
dies (SIGKILL included), so two instances with different `lock_dir`s, or a stale lock file, cannot
defeat it. The owner's pid comes from SO_PEERCRED on a connect to that listening socket.

`lock_dir` keeps a pid file for people and scripts (`cat /run/ipfixer/netns-*.lock`). It is opened
without following symlinks, in a directory only root (or the running user) can write, so a planted
link cannot make root truncate another file (issue 10 item 4).

Tags such as `<pidns>.<pid>.<start>` name the process that put a tc filter on an interface (see
kernel/attach.py): the filter is stale only when that process is gone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ipfixer.errors import ConfigError, IpfixerError


class InstanceLockError(IpfixerError):
    """Another live ipfixer already meters this network namespace."""

    def __init__(self, netns_inode: int, owner_pid: int | None, owner_uid: int | None = None) -> None:
        self.netns_inode, self.owner_pid, self.owner_uid = netns_inode, owner_pid, owner_uid
        who = f"pid {owner_pid}" if owner_pid else "pid unknown"
        if owner_uid not in (None, 0, os.geteuid()):
            # Abstract names have no permissions: another user can squat it. Say so rather than guess.
            who += f", uid {owner_uid}: not root, so possibly not ipfixer at all"
        super().__init__(
            f"another ipfixer ({who}) already meters the interfaces of this network namespace "
            f"(netns inode {netns_inode}); stop it first (two instances would remove each other's filters)"
        )


class LockDirError(ConfigError):
    """The lock directory or its pid file cannot be used safely (exit status 2: the config names it)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"lock_dir: {path}: {reason}")


def netns_inode() -> int:
    """Inode of this thread's network namespace (unique per namespace while it exists)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def pidns_inode() -> int:
    """Inode of this process's pid namespace: pids in owner tags mean something only within it."""
    return os.stat("/proc/self/ns/pid").st_ino


def process_start_ticks(pid: int) -> int | None:
    """A process's start time (clock ticks after boot, /proc/<pid>/stat field 22), None if gone.

    With the pid it identifies one process: a recycled pid has a later start time."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    rest = text[text.rfind(b")") + 2:].split()  # comm may hold spaces and parentheses
    try:
        return int(rest[19])  # field 22 overall; rest starts at field 3
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Owner:
    """The process that owns a kernel object: pid namespace inode, pid and start time."""

    pidns: int
    pid: int
    start: int

    @classmethod
    def me(cls) -> Owner:
        """This process."""
        pid = os.getpid()
        return cls(pidns_inode(), pid, process_start_ticks(pid) or 0)

    @property
    def tag(self) -> str:
        """`pidns.pid.start`, as carried in tc filter names."""
        return f"{self.pidns}.{self.pid}.{self.start}"

    @classmethod
    def parse(cls, tag: str) -> Owner | None:
        """The Owner a tag names, None if it is not one."""
        parts = tag.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))

    def alive(self) -> bool | None:
        """True if the process still runs, False if gone, None if it lives in another pid namespace
        (its pid means nothing here, so it cannot be judged)."""
        if self.pidns != pidns_inode():
            return None
        return process_start_ticks(self.pid) == self.start


def abstract_name(inode: int) -> bytes:
    """The abstract unix socket name that marks a running ipfixer in a network namespace."""
    return b"\0ipfixer-netns-" + str(inode).encode()


def _peer(name: bytes) -> tuple[int | None, int | None]:
    """(pid, uid) of the process listening on an abstract socket (SO_PEERCRED), None if untold."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        probe.connect(name)
        raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
        return pid or None, uid
    except OSError:  # backlog full (many probes) or the owner just exited
        return None, None
    finally:
        probe.close()


class NamespaceLock:
    """Held by the meter for its whole run: at most one ipfixer per network namespace."""

    def __init__(self, lock_dir: Path | None) -> None:
        self.lock_dir = Path(lock_dir) if lock_dir is not None else None
        self.netns = 0  # set by acquire(): the namespace of the thread that takes the lock
        self.path: Path | None = None
        self._sock: socket.socket | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        """Bind the namespace's abstract socket (InstanceLockError if taken), then write the pid file."""
        self.netns = netns_inode()
        if self.lock_dir is not None:
            self.path = self.lock_dir / f"netns-{self.netns}.lock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # close-on-exec (PEP 446)
        name = abstract_name(self.netns)
        try:
            sock.bind(name)
            sock.listen(64)  # never accepted: listening only so that others can read our pid
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise InstanceLockError(self.netns, *_peer(name)) from None
            raise IpfixerError(f"cannot take the namespace lock {name!r}: {exc.strerror}") from None
        self._sock = sock
        try:
            if self.lock_dir is not None:
                self._fd = self._write_pid_file()
        except BaseException:
            self.release()
            raise

    def answer_probes(self, limit: int = 64) -> int:
        """Accept and close connections other instances made to read our pid, so the backlog never
        fills (called from the meter's poll; bounded). Returns how many were waiting."""
        n = 0
        while self._sock is not None and n < limit:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # BlockingIOError: none waiting
                break
            conn.close()
            n += 1
        return n

    def _write_pid_file(self) -> int:
        assert self.lock_dir is not None and self.path is not None
        dfd = open_safe_dir(self.lock_dir)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
            try:
                fd = os.open(self.path.name, flags, 0o644, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise LockDirError(self.path, "is a symbolic link; refusing to follow it (remove it)") from None
                raise LockDirError(self.path, f"cannot open: {exc.strerror}") from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LockDirError(self.path, "is not a regular file; refusing to use it")
            if st.st_nlink != 1:
                raise LockDirError(self.path, f"has {st.st_nlink} hard links; refusing to write through them")
            if st.st_uid not in (0, os.geteuid()):
                raise LockDirError(self.path, f"is owned by uid {st.st_uid}, not by root or us")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockDirError(self.path, "is locked by another process") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return fd

    def release(self) -> None:
        """Give the namespace back (also done by the kernel if we die)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def open_safe_dir(path: Path) -> int:
    """An O_DIRECTORY fd of `path` (created 0755 if absent), checked to be owned by root or us and
    writable by nobody else: otherwise another user could plant links or files in it."""
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LockDirError(path, f"cannot use as a directory: {exc.strerror}") from None
    st = os.fstat(dfd)
    problem = ""
    if st.st_uid not in (0, os.geteuid()):
        problem = f"is owned by uid {st.st_uid}, not by root or us"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = (f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); use a directory "
                   "only root can write, e.g. /run/ipfixer")
    if problem:
        os.close(dfd)
        raise LockDirError(path, problem)
    return dfd
