"""Running code inside a network namespace without moving the whole process.

A socket keeps the namespace it was created in, so a short-lived thread that setns()es into the
namespace, creates the socket and ends is enough (setns(CLONE_NEWNET) only affects the calling thread).
Used by conntrack/NFLOG sockets, the lab and the tests.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def in_netns(netns: str | None, fn: Callable[[], T], timeout_s: float = 10.0) -> T:
    """Run fn in a thread that has joined netns (a name under /var/run/netns or a path); None = here.

    Sockets created by fn stay in that netns after the thread ends, which is how every netlink and
    test socket of this package reaches a namespace without moving the whole process.
    """
    if netns is None:
        return fn()
    path = netns if netns.startswith("/") else f"/var/run/netns/{netns}"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"netns:{netns}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"running in netns {netns} took over {timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def socket_in_netns(netns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket created inside netns (see in_netns)."""
    return in_netns(netns, lambda: socket.socket(family, type_, proto))
