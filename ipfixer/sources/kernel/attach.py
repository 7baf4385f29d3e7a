"""Attach the classifier to clsact ingress/egress with pyroute2, and detach only what is ours.

Rules (netobserv's lesson: never break another tool's tc setup):
- the clsact qdisc is created only if absent, and we remember whether we created it;
- ipfixer's filters carry a fixed priority/handle (FILTER_PRIO) and a TCA_BPF_NAME
  "ipfixer_<hook>.<pidns>.<pid>.<start>" naming the process that added them (ipfixer.instance.Owner);
- a filter is stale only when its owner is gone (pid absent or recycled: another start time), so
  remove_stale() never removes a live instance's filters. An owner in another pid namespace cannot be
  judged by its pid: an Attacher whose caller holds the namespace lock (the meter: no other ipfixer can
  be running in this network namespace) treats it as stale, e.g. a crashed container's; any other
  Attacher leaves it alone, with a warning. A name without owner (older ipfixer) counts as stale;
- detach deletes this process's filters, and the qdisc only if we created it and no filter remains.
"""

from __future__ import annotations

import ctypes
import fnmatch
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from ipfixer.errors import KernelError
from ipfixer.instance import Owner

log = logging.getLogger(__name__)

FILTER_PRIO = 0x0F1F  # tc "pref" and handle of ipfixer's filters
FILTER_NAME_PREFIX = "ipfixer_"
PARENT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
PARENT_EGRESS = 0xFFFFFFF3
CLSACT_HANDLE = 0xFFFF0000
_PARENTS = {"ingress": PARENT_INGRESS, "egress": PARENT_EGRESS}


def directions(which: str) -> tuple[str, ...]:
    """'ingress' | 'egress' | 'both' -> the clsact hooks to use."""
    if which == "both":
        return ("ingress", "egress")
    if which in _PARENTS:
        return (which,)
    raise ValueError(f"direction must be ingress, egress or both, not {which!r}")


@dataclass(frozen=True)
class InterfaceSelector:
    """Which interfaces to meter: shell-style globs on the name; exclude wins over include."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("lo",)

    def matches(self, name: str) -> bool:
        """Whether an interface of this name is selected."""
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude):
            return False
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.include)


@dataclass
class Attachment:
    """What ipfixer put on one interface."""

    ifindex: int
    ifname: str
    hooks: list[str] = field(default_factory=list)
    created_qdisc: bool = False


def _filter_name(msg: Any) -> str:
    opts = msg.get_attr("TCA_OPTIONS")
    if not opts:
        return ""
    return str(opts.get_attr("TCA_BPF_NAME") or "")


QDISC_MARK = ".q"  # name suffix: the owner created the clsact qdisc (so whoever cleans up removes it)


def filter_name(hook: str, owner: Owner, created_qdisc: bool) -> str:
    """TCA_BPF_NAME of an ipfixer filter: the hook, the owning process, whether it added the clsact."""
    return f"{FILTER_NAME_PREFIX}{hook}.{owner.tag}{QDISC_MARK if created_qdisc else ''}"


def filter_owner(name: str) -> Owner | None:
    """The owner recorded in an ipfixer filter's name; None for a name without one."""
    _, _, tag = name.partition(".")
    return Owner.parse(tag.removesuffix(QDISC_MARK))


class Attacher:
    """Puts ipfixer's ingress/egress programs on interfaces of one network namespace."""

    def __init__(self, ingress_fd: int, egress_fd: int, direction: str = "both",
                 netns: str | None = None, namespace_locked: bool = False) -> None:
        """namespace_locked: the caller holds ipfixer.instance.NamespaceLock for this namespace."""
        self.namespace_locked = namespace_locked
        self.fds = {"ingress": ingress_fd, "egress": egress_fd}
        self.hooks = directions(direction)
        self.netns = netns
        self.ipr = IPRoute(netns=netns) if netns else IPRoute()
        self.attached: dict[int, Attachment] = {}
        self.owner = Owner.me()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the netlink socket (does not detach)."""
        self.ipr.close()

    def __enter__(self) -> Attacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach_all()
        self.close()

    def resolve(self, iface: str | int) -> tuple[int, str]:
        """(ifindex, ifname) of an interface given by name or index."""
        try:
            if isinstance(iface, int):
                link = self.ipr.get_links(iface)[0]
            else:
                idx = self.ipr.link_lookup(ifname=iface)
                if not idx:
                    raise KernelError(f"interface {iface!r} not found")
                link = self.ipr.get_links(idx[0])[0]
        except KernelError:
            raise
        except Exception as exc:
            raise KernelError(f"interface {iface!r}: {exc}") from exc
        return int(link["index"]), str(link.get_attr("IFLA_IFNAME"))

    def _has_clsact(self, ifindex: int) -> bool:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in self.ipr.get_qdiscs(index=ifindex))

    def _filters(self, ifindex: int, hook: str) -> list[Any]:
        return [f for f in self.ipr.get_filters(index=ifindex, parent=_PARENTS[hook]) if f["handle"]]

    def attach(self, iface: str | int) -> Attachment:
        """Add our filters on the selected hooks, creating clsact only if absent. Idempotent."""
        ifindex, ifname = self.resolve(iface)
        with self._lock:
            if ifindex in self.attached:
                return self.attached[ifindex]
            att = Attachment(ifindex, ifname)
            try:
                self._remove_stale_on(ifindex)  # a crashed run's filters (and the clsact it added)
                if not self._has_clsact(ifindex):
                    self.ipr.tc("add", "clsact", ifindex)
                    att.created_qdisc = True
                live = [o for _, _, o in self._ipfixer_filters(ifindex)
                        if o is not None and o != self.owner and self._owner_alive(o) is not False]
                if live:
                    raise KernelError(f"another live ipfixer (pid {live[0].pid}) already meters it")
                for hook in self.hooks:
                    self.ipr.tc(
                        "add-filter", "bpf", ifindex, FILTER_PRIO, fd=self.fds[hook],
                        name=filter_name(hook, self.owner, att.created_qdisc), parent=_PARENTS[hook], classid=1,
                        direct_action=True, prio=FILTER_PRIO,
                    )
                    att.hooks.append(hook)
            except Exception as exc:
                self._undo(att)
                raise KernelError(f"attaching to {ifname} (ifindex {ifindex}) failed: {exc}") from exc
            self.attached[ifindex] = att
            log.info("attached to %s (%d) %s", ifname, ifindex, ",".join(att.hooks))
            return att

    def _ipfixer_filters(self, ifindex: int) -> list[tuple[Any, int, Owner | None]]:
        """(filter message, parent, owner) of every ipfixer filter on the interface's clsact hooks."""
        out: list[tuple[Any, int, Owner | None]] = []
        if not self._has_clsact(ifindex):
            return out
        for hook, parent in _PARENTS.items():
            for f in self._filters(ifindex, hook):
                name = _filter_name(f)
                if f.get_attr("TCA_KIND") == "bpf" and name.startswith(FILTER_NAME_PREFIX):
                    out.append((f, parent, filter_owner(name)))
        return out

    def _owner_alive(self, owner: Owner) -> bool | None:
        """Owner.alive(), except that with the namespace lock held an unjudgeable owner is gone."""
        alive = owner.alive()
        return False if alive is None and self.namespace_locked else alive

    def _delete(self, ifindex: int, f: Any, parent: int) -> None:
        prio = (f["info"] >> 16) & 0xFFFF
        self.ipr.tc("del-filter", "bpf", ifindex, f["handle"], parent=parent, prio=prio)

    def _remove_ours(self, ifindex: int) -> int:
        """Delete this process's filters on the interface (never another instance's)."""
        removed = 0
        for f, parent, owner in self._ipfixer_filters(ifindex):
            if owner == self.owner:
                self._delete(ifindex, f, parent)
                removed += 1
        return removed

    def _remove_stale_on(self, ifindex: int) -> int:
        """Delete ipfixer filters whose owner is gone (or unrecorded); keep live and unjudgeable ones.
        A clsact the dead owner had created goes too once no filter is left on it."""
        removed = 0
        qdisc_was_ours = False
        for f, parent, owner in self._ipfixer_filters(ifindex):
            if owner == self.owner:
                continue
            alive = self._owner_alive(owner) if owner is not None else False
            if alive is None:
                log.warning("ifindex %d: filter %s belongs to an ipfixer in another pid namespace; left alone "
                            "(remove it with tc filter del if that instance is gone)", ifindex, _filter_name(f))
                continue
            if not alive:
                self._delete(ifindex, f, parent)
                removed += 1
                qdisc_was_ours |= _filter_name(f).endswith(QDISC_MARK)
        if qdisc_was_ours and not any(self._filters(ifindex, h) for h in _PARENTS):
            self.ipr.tc("del", "clsact", ifindex)
        return removed

    def _undo(self, att: Attachment) -> None:
        try:
            self._remove_ours(att.ifindex)
            if att.created_qdisc and not any(self._filters(att.ifindex, h) for h in _PARENTS):
                self.ipr.tc("del", "clsact", att.ifindex)
        except Exception as exc:  # the interface may be gone: nothing left to clean
            log.debug("cleanup of ifindex %d: %s", att.ifindex, exc)

    def detach(self, iface: str | int) -> None:
        """Remove our filters (and the qdisc if we created it and nothing else uses it)."""
        ifindex = iface if isinstance(iface, int) else self.resolve(iface)[0]
        with self._lock:
            att = self.attached.pop(ifindex, None)
            if att is not None:
                self._undo(att)

    def forget(self, ifindex: int) -> None:
        """Drop state for an interface that vanished (its filters went with it)."""
        with self._lock:
            self.attached.pop(ifindex, None)

    def detach_all(self) -> None:
        """Detach from every interface we attached to."""
        for ifindex in list(self.attached):
            self.detach(ifindex)

    def remove_stale(self, ifaces: Iterable[str | int] | None = None) -> int:
        """Remove ipfixer filters whose owning process is gone (all interfaces when ifaces is None)."""
        if ifaces is None:
            targets = [int(link["index"]) for link in self.ipr.get_links()]
        else:
            targets = []
            for i in ifaces:
                try:
                    targets.append(self.resolve(i)[0])
                except KernelError:
                    continue
        removed = 0
        with self._lock:
            for ifindex in targets:
                if ifindex in self.attached:
                    continue
                try:
                    removed += self._remove_stale_on(ifindex)
                except Exception as exc:
                    log.debug("stale filter scan of %d: %s", ifindex, exc)
        return removed

    def attach_selected(self, selector: InterfaceSelector) -> list[Attachment]:
        """Attach to every current interface the selector matches."""
        out = []
        for link in self.ipr.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            if selector.matches(name):
                out.append(self.attach(int(link["index"])))
        return out


_CLONE_NEWNET = 0x40000000


def _link_socket(netns: str | None, groups: int = RTMGRP_LINK) -> socket.socket:
    """A non-blocking rtnetlink socket subscribed to link events (or other `groups`), opened inside netns
    if given.

    A raw socket rather than pyroute2's IPRoute: pyroute2 0.9 queues multicast messages in its own
    asyncio loop, so select() on its fd misses events that arrived in the same datagram."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
        s.bind((0, groups))
        return s

    if not netns:
        return make()
    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(there, _CLONE_NEWNET) != 0:
            raise KernelError(f"cannot enter netns {netns}: {os.strerror(ctypes.get_errno())}")
        try:
            return make()
        finally:
            if libc.setns(here, _CLONE_NEWNET) != 0:
                raise KernelError("cannot return to the original netns")
    finally:
        os.close(here)
        os.close(there)


class LinkWatcher:
    """Follows RTM_NEWLINK/RTM_DELLINK to attach selected interfaces that appear later and forget
    vanished ones. Poll-based: call poll() from the thread that owns the Attacher (pyroute2 0.9
    sockets belong to the thread that created them); each poll waits at most timeout_s."""

    def __init__(self, attacher: Attacher, selector: InterfaceSelector,
                 on_error: Callable[[str, Exception], None] | None = None) -> None:
        self.attacher = attacher
        self.selector = selector
        self.on_error = on_error
        self.events = 0
        self._mon = _link_socket(attacher.netns)
        self._marshal = MarshalRtnl()
        self._closed = False

    def start(self) -> list[Attachment]:
        """Attach to every interface that matches now (later ones arrive through poll())."""
        return self.attacher.attach_selected(self.selector)

    def poll(self, timeout_s: float = 0.0, max_rounds: int = 64) -> int:
        """Apply pending link events, waiting up to timeout_s for the first; returns events applied."""
        applied = 0
        wait = timeout_s
        for _ in range(max_rounds):  # bounded even under an event storm
            ready, _, _ = select.select([self._mon], [], [], wait)
            if not ready:
                break
            wait = 0.0
            try:
                data = self._mon.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: events were lost; resync from a link dump
                log.warning("link monitor overrun (%s): resyncing", exc)
                self.attacher.attach_selected(self.selector)
                continue
            for msg in self._marshal.parse(data):
                if msg.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
                    self.events += 1
                    applied += 1
                    self.handle(msg)
        return applied

    def stop(self) -> None:
        """Close the monitor socket."""
        if not self._closed:
            self._closed = True
            self._mon.close()

    def handle(self, msg: Any) -> None:
        """Apply one link message."""
        event = msg.get("event")
        ifindex = int(msg["index"])
        name = str(msg.get_attr("IFLA_IFNAME") or "")
        if event == "RTM_DELLINK":
            self.attacher.forget(ifindex)
        elif event == "RTM_NEWLINK" and name and self.selector.matches(name):
            if ifindex not in self.attacher.attached:
                try:
                    self.attacher.attach(ifindex)
                except Exception as exc:
                    log.warning("attach to new interface %s failed: %s", name, exc)
                    if self.on_error:
                        self.on_error(name, exc)
