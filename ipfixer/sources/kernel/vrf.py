"""The VRF table of a network namespace, followed through link events (I/O edge of export/annotate.py).

A VRF is a `vrf` link (an l3mdev master) whose IFLA_LINKINFO / IFLA_INFO_DATA carries IFLA_VRF_TABLE;
an interface is in the VRF it is enslaved to (IFLA_MASTER), directly or through a bridge or bond
that is.  Enslaving and releasing are RTM_NEWLINK events (IFLA_MASTER changes), so the watcher
re-reads the links after any link event on its own rtnetlink socket (the LinkWatcher's socket belongs
to the attacher), at most once per poll: a burst of events costs one dump.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from ipfixer.model import VrfTable
from ipfixer.sources.kernel.attach import _link_socket

log = logging.getLogger(__name__)

MAX_MASTER_DEPTH = 8  # veth -> bridge -> bond -> vrf is 3; a loop or a longer chain stops here
MAX_READS_PER_POLL = 64  # event datagrams read per poll (bounded under an event storm)


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What the VRF table needs of one link."""

    index: int
    name: str
    master: int = 0  # IFLA_MASTER, 0 when none
    vrf_table: int | None = None  # IFLA_VRF_TABLE when the link is a VRF (kind "vrf")


def vrf_table(links: Iterable[LinkFacts]) -> VrfTable:
    """ifindex -> table id for every link in a VRF (a VRF device maps to its own table), and the names."""
    by_index = {link.index: link for link in links}
    table_of: dict[int, int] = {}
    names: dict[int, str] = {}
    for link in by_index.values():
        if link.vrf_table is not None:
            names[link.vrf_table] = link.name
        cur: LinkFacts | None = link
        for _ in range(MAX_MASTER_DEPTH):
            if cur is None:
                break
            if cur.vrf_table is not None:
                table_of[link.index] = cur.vrf_table
                break
            cur = by_index.get(cur.master) if cur.master else None
    return VrfTable(table_of, names)


def link_facts(msg: Any) -> LinkFacts:
    """A pyroute2 RTM_NEWLINK message as LinkFacts."""
    table = None
    info = msg.get_attr("IFLA_LINKINFO")
    if info is not None and info.get_attr("IFLA_INFO_KIND") == "vrf":
        data = info.get_attr("IFLA_INFO_DATA")
        if data is not None and data.get_attr("IFLA_VRF_TABLE") is not None:
            table = int(data.get_attr("IFLA_VRF_TABLE"))
    return LinkFacts(int(msg["index"]), str(msg.get_attr("IFLA_IFNAME") or ""),
                     int(msg.get_attr("IFLA_MASTER") or 0), table)


class VrfWatcher:
    """Keeps `table` current: a link dump at start and after any link event seen by poll()."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.dumps = 0
        self._mon = _link_socket(netns)  # subscribed before the first dump: no event falls between
        try:
            self.table = self._dump()
        except BaseException:
            self._mon.close()
            raise

    def _dump(self) -> VrfTable:
        self.dumps += 1
        with (IPRoute(netns=self.netns) if self.netns else IPRoute()) as ipr:
            return vrf_table(link_facts(m) for m in ipr.get_links())

    def poll(self) -> bool:
        """Read pending link events without waiting; re-read the VRF table if there were any.
        True when the table changed."""
        seen = False
        for _ in range(MAX_READS_PER_POLL):
            ready, _, _ = select.select([self._mon], [], [], 0.0)
            if not ready:
                break
            try:
                self._mon.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: events lost; the dump below resyncs anyway
                log.warning("VRF link monitor overrun (%s): resyncing", exc)
            seen = True
        if not seen:
            return False
        old, self.table = self.table, self._dump()
        return old != self.table

    def close(self) -> None:
        """Close the event socket."""
        try:
            self._mon.close()
        except OSError:
            pass


__all__ = ["LinkFacts", "VrfWatcher", "link_facts", "vrf_table"]
