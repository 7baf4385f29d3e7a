"""The VRF table of a network namespace, followed through link and rule events (I/O edge of export/annotate.py).

Two ways a Linux router puts an interface in a VRF, both read here:
- l3mdev VRF (Documentation/networking/vrf.rst): a `vrf` link whose IFLA_LINKINFO / IFLA_INFO_DATA carries
  IFLA_VRF_TABLE; an interface is in the VRF it is enslaved to (IFLA_MASTER), directly or through a
  bridge or bond that is. Enslaving and releasing are RTM_NEWLINK events (IFLA_MASTER changes).
- VRF-lite by policy routing (kernels without CONFIG_NET_VRF, older setups): a rule that sends
  everything arriving on one interface to a routing table, `ip rule add iif eth1 lookup 10`; the
  interface's VRF is that table. Only rules selecting by input interface alone count (no source,
  destination, fwmark or other selector: those are policies, not VRFs), the first by priority wins, and
  the main, local and default tables are no VRF. An interface in an l3mdev VRF is in that one. The VRF's
  name is the table's in /etc/iproute2/rt_tables (and rt_tables.d/*.conf), else "table<N>".
The watcher re-reads links and rules after any link or rule event on its own rtnetlink socket (the
LinkWatcher's socket belongs to the attacher), at most once per poll: a burst of events costs one dump.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_RULE, RTMGRP_IPV6_RULE, RTMGRP_LINK

from ipfixer.model import VrfTable
from ipfixer.sources.kernel.attach import _link_socket

log = logging.getLogger(__name__)

MAX_MASTER_DEPTH = 8  # veth -> bridge -> bond -> vrf is 3; a loop or a longer chain stops here
MAX_READS_PER_POLL = 64  # event datagrams read per poll (bounded under an event storm)
FR_ACT_TO_TBL = 1  # linux/fib_rules.h: the rule's action is "lookup table"
NOT_VRF_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local
RT_TABLES = (Path("/etc/iproute2/rt_tables"), Path("/etc/iproute2/rt_tables.d"))
MAX_TABLES_FILE = 1 << 20  # bytes read of one rt_tables file (hostile or huge files are cut there)
MAX_TABLES_FILES = 64  # rt_tables.d/*.conf files read
MAX_NAME = 64  # characters of a VRF name kept (VRFname is a string in the options record)
# Selectors that make a rule a policy rather than a VRF membership (linux/fib_rules.h FRA_*).
_OTHER_SELECTORS = ("FRA_FWMARK", "FRA_OIFNAME", "FRA_UID_RANGE", "FRA_IP_PROTO", "FRA_SPORT_RANGE",
                    "FRA_DPORT_RANGE", "FRA_L3MDEV", "FRA_FLOW", "FRA_TUN_ID")


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What the VRF table needs of one link."""

    index: int
    name: str
    master: int = 0  # IFLA_MASTER, 0 when none
    vrf_table: int | None = None  # IFLA_VRF_TABLE when the link is a VRF (kind "vrf")


@dataclass(frozen=True, slots=True)
class RuleFacts:
    """A policy routing rule that puts one input interface in a routing table (VRF-lite)."""

    iif: str  # FRA_IIFNAME
    table: int
    priority: int = 0


def vrf_table(links: Iterable[LinkFacts], rules: Iterable[RuleFacts] = (),
              table_names: Mapping[int, str] | None = None) -> VrfTable:
    """ifindex -> table id for every link in a VRF (a VRF device maps to its own table; an interface
    in no l3mdev VRF is in the table of its first input-interface rule), and the names."""
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
    first: dict[str, RuleFacts] = {}
    for rule in sorted(rules, key=lambda r: r.priority):
        if rule.table not in NOT_VRF_TABLES:
            first.setdefault(rule.iif, rule)
    for link in by_index.values():
        lite = first.get(link.name)
        if lite is not None and link.index not in table_of and link.vrf_table is None:
            table_of[link.index] = lite.table
            if lite.table not in names:
                names[lite.table] = (table_names or {}).get(lite.table, f"table{lite.table}")
    return VrfTable(table_of, names)


def rule_facts(msg: Any) -> RuleFacts | None:
    """A pyroute2 RTM_NEWRULE message as RuleFacts, if it selects by input interface alone and looks up
    a table; else None."""
    iif = msg.get_attr("FRA_IIFNAME")
    if not iif or msg["action"] != FR_ACT_TO_TBL or msg["src_len"] or msg["dst_len"] or msg["tos"]:
        return None
    if any(msg.get_attr(a) is not None for a in _OTHER_SELECTORS):
        return None
    table = msg.get_attr("FRA_TABLE") or msg["table"]
    return RuleFacts(str(iif), int(table), int(msg.get_attr("FRA_PRIORITY") or 0))


_TABLE_LINE = re.compile(r"\s*(?:0[xX]([0-9a-fA-F]{1,8})|(\d{1,10}))\s+([^\s#]+)")


def read_table_names(paths: Iterable[Path] = RT_TABLES) -> dict[int, str]:
    """Routing table names from iproute2's rt_tables files ("id name" lines; a directory: its *.conf).
    Bounded and forgiving: unreadable files and malformed lines are skipped, as iproute2 does."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            try:
                files.extend(sorted(p.glob("*.conf"))[:MAX_TABLES_FILES])
            except OSError:
                continue
        else:
            files.append(p)
    names: dict[int, str] = {}
    for f in files:
        try:  # non-blocking and regular files only: a FIFO there must not stall the daemon's loop
            fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            text = os.read(fd, MAX_TABLES_FILE).decode("utf-8", "replace")
        except OSError:
            continue
        finally:
            os.close(fd)
        for line in text.splitlines():
            m = _TABLE_LINE.match(line)
            if m:
                table = int(m.group(1), 16) if m.group(1) else int(m.group(2))
                if table <= 0xFFFFFFFF:
                    names[table] = m.group(3)[:MAX_NAME]
    return names


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
        # subscribed before the first dump: no event falls between
        self._mon = _link_socket(netns, RTMGRP_LINK | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE)
        try:
            self.table = self._dump()
        except BaseException:
            self._mon.close()
            raise

    def _dump(self) -> VrfTable:
        self.dumps += 1
        with (IPRoute(netns=self.netns) if self.netns else IPRoute()) as ipr:
            links = [link_facts(m) for m in ipr.get_links()]
            rules = [r for fam in (socket.AF_INET, socket.AF_INET6) for m in ipr.get_rules(family=fam)
                     if (r := rule_facts(m)) is not None]
        return vrf_table(links, rules, read_table_names() if rules else None)

    def poll(self) -> bool:
        """Read pending link and rule events without waiting; re-read the VRF table if there were any.
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


__all__ = ["LinkFacts", "RuleFacts", "VrfWatcher", "link_facts", "read_table_names", "rule_facts", "vrf_table"]
