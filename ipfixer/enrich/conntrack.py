"""Conntrack enrichment: post-NAT addresses/ports, mark, zone and an OVN-style state bitmask for flows
(the NEW/DESTROY event stream is in ipfixer.enrich.events).

Netlink I/O is done on plain `socket.socket`s (AF_NETLINK, NETLINK_NETFILTER) created inside the
wanted network namespace; message bodies are decoded (and the dump request encoded) with pyroute2's
ctnetlink declarations (`pyroute2.netlink.nfnetlink.nfctsocket.nfct_msg`). Why not `NFCTSocket` itself:
in pyroute2 0.9 it runs an asyncio loop bound to the creating thread, while the daemon dumps from its
drain thread and reads events from another; a raw socket is thread-agnostic and lets us bound every
wait with select(). Namespaces: a socket keeps the netns it was created in, so `socket_in_netns` creates
it in a short-lived thread that first setns()es into /var/run/netns/<name> (setns(CLONE_NEWNET) only
changes the calling thread); the rest of the process stays where it is.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from ipfixer.model import FIVE_TUPLE_STRUCT, V4_MAPPED_PREFIX, five_tuple_keys
from ipfixer.netns import socket_in_netns

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

# enum ip_conntrack_status (include/uapi/linux/netfilter/nf_conntrack_common.h)
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_FIXED_TIMEOUT = 1 << 10
IPS_TEMPLATE = 1 << 11
IPS_UNTRACKED = 1 << 12
IPS_HELPER = 1 << 13
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15
_IPS_NAMES = [
    "EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT", "SEQ_ADJUST", "SRC_NAT_DONE",
    "DST_NAT_DONE", "DYING", "FIXED_TIMEOUT", "TEMPLATE", "UNTRACKED", "HELPER", "OFFLOAD", "HW_OFFLOAD",
]  # fmt: skip

# ct_state bitmask, OVN semantics (ovs-fields(7) ct_state)
CT_NEW = 0x01
CT_ESTABLISHED = 0x02
CT_RELATED = 0x04
CT_REPLY = 0x08
CT_INVALID = 0x10
CT_TRACKED = 0x20
CT_SNAT = 0x40
CT_DNAT = 0x80

_ICMP_PROTOS = (1, 58)
_ICMP_ERROR_TYPES = {1: (3, 4, 5, 11, 12), 58: (1, 2, 3, 4)}  # dest unreach, quench, redirect, time, param



class ConnKey(NamedTuple):
    """A 5-tuple as flow batches carry it: 16-byte addresses, ICMP as (0, type*256+code)."""

    protocol: int
    src_addr: bytes
    dst_addr: bytes
    src_port: int
    dst_port: int

    def packed(self) -> bytes:
        """The 37-byte form `batch_keys` produces for a batch row."""
        return FIVE_TUPLE_STRUCT.pack(self.protocol, self.src_addr, self.dst_addr, self.src_port, self.dst_port)


batch_keys = five_tuple_keys  # packed ConnKeys of every row of a batch


@dataclass(frozen=True, slots=True)
class CtTuple:
    """CTA_TUPLE_ORIG/REPLY: addresses as 16 bytes (IPv4 mapped), ports or ICMP id/type/code."""

    src: bytes | None = None
    dst: bytes | None = None
    proto: int | None = None
    sport: int | None = None
    dport: int | None = None
    icmp_id: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    @property
    def ports(self) -> tuple[int, int]:
        """Ports as flow rows carry them (ICMP: 0, type*256+code)."""
        if self.proto in _ICMP_PROTOS:
            return 0, ((self.icmp_type or 0) << 8) | (self.icmp_code or 0)
        return self.sport or 0, self.dport or 0

    def key(self) -> ConnKey:
        """This tuple as a flow key."""
        sp, dp = self.ports
        return ConnKey(self.proto or 0, self.src or bytes(16), self.dst or bytes(16), sp, dp)


@dataclass(frozen=True, slots=True)
class CtCounter:
    """CTA_COUNTERS_ORIG/REPLY (needs net.netfilter.nf_conntrack_acct=1)."""

    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class CtNatRange:
    """CTA_NAT_SRC/DST (only in ctnetlink requests and some events): address and port range."""

    min_ip: str | None = None
    max_ip: str | None = None
    min_port: int | None = None
    max_port: int | None = None


@dataclass(frozen=True, slots=True)
class CtSeqAdj:
    """CTA_SEQ_ADJ_ORIG/REPLY: TCP sequence rewriting by helpers (e.g. FTP NAT)."""

    correction_pos: int | None = None
    offset_before: int | None = None
    offset_after: int | None = None


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """One kernel conntrack entry; every field optional because kernels and sysctls differ."""

    id: int | None = None
    origin: CtTuple | None = None
    reply: CtTuple | None = None
    tcp_state: int | None = None  # enum tcp_conntrack: 3 ESTABLISHED, 7 CLOSE ...
    counter_origin: CtCounter | None = None
    counter_reply: CtCounter | None = None
    timeout_s: int | None = None
    status: int | None = None  # IPS_* bits
    use: int | None = None
    zone: int | None = None
    mark: int | None = None
    mark_mask: int | None = None
    timestamp_start_ns: int | None = None  # wall clock, needs nf_conntrack_timestamp=1
    timestamp_stop_ns: int | None = None
    helper: str | None = None
    nat_src: CtNatRange | None = None
    nat_dst: CtNatRange | None = None
    seq_adj_orig: CtSeqAdj | None = None
    seq_adj_reply: CtSeqAdj | None = None
    sec_ctx: str | None = None
    sec_mark: int | None = None
    labels: int | None = None

    @property
    def status_names(self) -> list[str]:
        """IPS_* bit names, as `conntrack -L` prints them."""
        s = self.status or 0
        return [name for i, name in enumerate(_IPS_NAMES) if s & (1 << i)]

    @property
    def snat(self) -> bool:
        """Source translated: IPS_SRC_NAT, or the reply is not addressed to the origin's source."""
        if (self.status or 0) & IPS_SRC_NAT:
            return True
        if self.origin is None or self.reply is None:
            return False
        return (self.reply.dst, self.reply.ports[1]) != (self.origin.src, self.origin.ports[0]) and (
            self.origin.proto not in _ICMP_PROTOS
        )

    @property
    def dnat(self) -> bool:
        """Destination translated: IPS_DST_NAT, or the reply does not come from the origin's dest."""
        if (self.status or 0) & IPS_DST_NAT:
            return True
        if self.origin is None or self.reply is None:
            return False
        return (self.reply.src, self.reply.ports[0]) != (self.origin.dst, self.origin.ports[1]) and (
            self.origin.proto not in _ICMP_PROTOS
        )

    @property
    def ipv6(self) -> bool:
        """True for an IPv6 connection."""
        src = self.origin.src if self.origin else None
        return src is not None and src[:12] != V4_MAPPED_PREFIX

    def ct_state(self, reply_direction: bool) -> int:
        """OVN ct_state bits for a packet of this connection (see ConntrackTable.enrich)."""
        status = self.status or 0
        if status & IPS_UNTRACKED:
            return 0
        state = CT_TRACKED
        if status & IPS_SEEN_REPLY:
            state |= CT_ESTABLISHED
        elif not status & IPS_EXPECTED:
            state |= CT_NEW
        if status & IPS_EXPECTED:
            state |= CT_RELATED
        if reply_direction:
            state |= CT_REPLY
        if self.snat:
            state |= CT_SNAT
        if self.dnat:
            state |= CT_DNAT
        return state

    def role_keys(self) -> list[tuple[ConnKey, bool]]:
        """The four keys a meter can see for this connection, with 'is reply direction'.

        Origin direction before NAT = origin tuple; after NAT = reply tuple reversed. Reply direction
        before de-NAT = reply tuple; after = origin tuple reversed. Without NAT these coincide pairwise;
        the first listed wins. ICMP reversed keys take the other tuple's type/code (echo vs echo-reply).
        """
        if self.origin is None or self.reply is None:
            return []
        o, r = self.origin.key(), self.reply.key()
        icmp = o.protocol in _ICMP_PROTOS
        inv_r = ConnKey(
            o.protocol,
            r.dst_addr,
            r.src_addr,
            *((o.src_port, o.dst_port) if icmp else (r.dst_port, r.src_port)),
        )
        inv_o = ConnKey(
            o.protocol,
            o.dst_addr,
            o.src_addr,
            *((r.src_port, r.dst_port) if icmp else (o.dst_port, o.src_port)),
        )
        return [(o, False), (r, True), (inv_r, False), (inv_o, True)]

    @classmethod
    def from_netlink(cls, msg: Any) -> ConntrackEntry:
        """Decode a pyroute2 nfct_msg (dump reply or event)."""
        tcp_state = None
        proto_info = msg.get_attr("CTA_PROTOINFO")
        if proto_info is not None:
            tcp = proto_info.get_attr("CTA_PROTOINFO_TCP")
            if tcp is not None:
                tcp_state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
        ts = msg.get_attr("CTA_TIMESTAMP")
        secctx = msg.get_attr("CTA_SECCTX")
        return cls(
            id=msg.get_attr("CTA_ID"),
            origin=_tuple(msg.get_attr("CTA_TUPLE_ORIG")),
            reply=_tuple(msg.get_attr("CTA_TUPLE_REPLY")),
            tcp_state=tcp_state,
            counter_origin=_counter(msg.get_attr("CTA_COUNTERS_ORIG")),
            counter_reply=_counter(msg.get_attr("CTA_COUNTERS_REPLY")),
            timeout_s=msg.get_attr("CTA_TIMEOUT"),
            status=msg.get_attr("CTA_STATUS"),
            use=msg.get_attr("CTA_USE"),
            zone=msg.get_attr("CTA_ZONE"),
            mark=msg.get_attr("CTA_MARK"),
            mark_mask=msg.get_attr("CTA_MARK_MASK"),
            timestamp_start_ns=ts.get_attr("CTA_TIMESTAMP_START") if ts is not None else None,
            timestamp_stop_ns=ts.get_attr("CTA_TIMESTAMP_STOP") if ts is not None else None,
            helper=_helper(msg),
            nat_src=_nat(msg.get_attr("CTA_NAT_SRC")),
            nat_dst=_nat(msg.get_attr("CTA_NAT_DST")),
            seq_adj_orig=_seqadj(msg.get_attr("CTA_SEQ_ADJ_ORIG")),
            seq_adj_reply=_seqadj(msg.get_attr("CTA_SEQ_ADJ_REPLY")),
            sec_ctx=secctx.get_attr("CTA_SECCTX_NAME") if secctx is not None else None,
            sec_mark=msg.get_attr("CTA_SECMARK"),
            labels=msg.get_attr("CTA_LABELS"),
        )


def _addr16(text: str | None) -> bytes | None:
    if text is None:
        return None
    ip = ipaddress.ip_address(text)
    return (V4_MAPPED_PREFIX + ip.packed) if ip.version == 4 else ip.packed


def _tuple(nla: Any) -> CtTuple | None:
    if nla is None:
        return None
    ip, proto = nla.get_attr("CTA_TUPLE_IP"), nla.get_attr("CTA_TUPLE_PROTO")
    src = dst = None
    if ip is not None:
        src = _addr16(ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC"))
        dst = _addr16(ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST"))
    if proto is None:
        return CtTuple(src=src, dst=dst)

    def first(*names: str) -> Any:
        for name in names:
            value = proto.get_attr(name)
            if value is not None:
                return value
        return None

    return CtTuple(
        src=src,
        dst=dst,
        proto=proto.get_attr("CTA_PROTO_NUM"),
        sport=proto.get_attr("CTA_PROTO_SRC_PORT"),
        dport=proto.get_attr("CTA_PROTO_DST_PORT"),
        icmp_id=first("CTA_PROTO_ICMP_ID", "CTA_PROTO_ICMPV6_ID"),
        icmp_type=first("CTA_PROTO_ICMP_TYPE", "CTA_PROTO_ICMPV6_TYPE"),
        icmp_code=first("CTA_PROTO_ICMP_CODE", "CTA_PROTO_ICMPV6_CODE"),
    )


def _counter(nla: Any) -> CtCounter | None:
    if nla is None:
        return None
    pkts = nla.get_attr("CTA_COUNTERS_PACKETS")
    byts = nla.get_attr("CTA_COUNTERS_BYTES")
    if pkts is None:
        pkts, byts = nla.get_attr("CTA_COUNTERS32_PACKETS"), nla.get_attr("CTA_COUNTERS32_BYTES")
    return CtCounter(packets=pkts or 0, bytes=byts or 0)


def _nat(nla: Any) -> CtNatRange | None:
    if nla is None:
        return None
    proto = nla.get_attr("CTA_NAT_PROTO")
    return CtNatRange(
        min_ip=nla.get_attr("CTA_NAT_V4_MINIP") or nla.get_attr("CTA_NAT_V6_MINIP"),
        max_ip=nla.get_attr("CTA_NAT_V4_MAXIP") or nla.get_attr("CTA_NAT_V6_MAXIP"),
        min_port=proto.get_attr("CTA_PROTONAT_PORT_MIN") if proto is not None else None,
        max_port=proto.get_attr("CTA_PROTONAT_PORT_MAX") if proto is not None else None,
    )


def _seqadj(nla: Any) -> CtSeqAdj | None:
    if nla is None:
        return None
    return CtSeqAdj(
        nla.get_attr("CTA_NAT_SEQ_CORRECTION_POS"),
        nla.get_attr("CTA_NAT_SEQ_OFFSET_BEFORE"),
        nla.get_attr("CTA_NAT_SEQ_OFFSET_AFTER"),
    )


def _helper(msg: Any) -> str | None:
    # CTA_HELP is a nest holding CTA_HELP_NAME; pyroute2 declares it asciiz, so strip to the name.
    value = msg.get_attr("CTA_HELP")
    if not value:
        return None
    text = value if isinstance(value, str) else str(value)
    return "".join(ch for ch in text if ch.isprintable()).strip() or None


def parse_messages(data: bytes) -> list[tuple[int, int, Any]]:
    """Split a netlink datagram into (msg_type, error, nfct_msg|None) triples."""
    out: list[tuple[int, int, Any]] = []
    off = 0
    while off + 16 <= len(data):
        length, mtype, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16 or off + length > len(data):
            break
        if mtype == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + 16)
            out.append((mtype, -err, None))
        elif mtype == NLMSG_DONE:
            out.append((mtype, 0, None))
        elif mtype >> 8 == NFNL_SUBSYS_CTNETLINK:
            msg = nfct_msg(data[off : off + length])
            msg.decode()
            out.append((mtype, 0, msg))
        off += (length + 3) & ~3
    return out


def open_ctnetlink(netns: str | None, groups: Iterable[int] = ()) -> socket.socket:
    """A NETLINK_NETFILTER socket in netns, joined to the given NFNLGRP_* multicast groups."""
    sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        try:  # events come in bursts; root may exceed rmem_max
            sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def dump_conntrack(sock: socket.socket, timeout_s: float = 5.0) -> list[ConntrackEntry]:
    """All entries of the socket's netns (IPv4 and IPv6: nfgen_family AF_UNSPEC), bounded in time."""
    seq = int.from_bytes(os.urandom(4), "little") or 1
    hdr = struct.pack("=IHHII", 20, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                      NLM_F_REQUEST | NLM_F_DUMP, seq, 0)  # fmt: skip
    sock.send(hdr + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
    entries: list[ConntrackEntry] = []
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("conntrack dump did not finish")
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            continue
        data = sock.recv(1 << 20)
        for mtype, err, msg in parse_messages(data):
            if mtype == NLMSG_DONE:
                return entries
            if mtype == NLMSG_ERROR:
                if err == 0:
                    continue
                raise OSError(err, f"conntrack dump: {os.strerror(err)}")
            if msg is not None and msg["header"]["sequence_number"] == seq:
                entries.append(ConntrackEntry.from_netlink(msg))


class ConntrackTable:
    """Bounded LRU of conntrack entries, refreshed by a dump at drain time, joined to flow batches.

    Lookup keys are the four role keys of each entry (ConntrackEntry.role_keys), so a flow observed
    before or after NAT, in either direction, finds its connection. Entries missing from a later dump
    stay cached (up to max_entries) so flows of connections that ended between drains still enrich;
    DESTROY events can be fed in through `ingest` for the same reason. A tuple present in two zones
    maps to the one seen last (flow rows carry no zone).
    """

    def __init__(
        self, max_entries: int = 65536, netns: str | None = None, dump_timeout_s: float = 5.0
    ) -> None:
        self.max_entries = max_entries
        self.netns = netns
        self.dump_timeout_s = dump_timeout_s
        self.available = False
        self.errors = 0
        self._entries: collections.OrderedDict[tuple[int, ConnKey], ConntrackEntry] = (
            collections.OrderedDict()
        )
        self._index: dict[bytes, tuple[tuple[int, ConnKey], bool]] = {}
        self._pairs: dict[tuple[bytes, bytes], tuple[tuple[int, ConnKey], bool]] = {}
        self._sock: socket.socket | None = None
        try:
            self._sock = open_ctnetlink(netns)
            self.available = True
        except OSError as exc:
            log.warning(
                "conntrack enrichment disabled (netns %s): cannot open ctnetlink: %s", netns or "host", exc
            )

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Release the netlink socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.available = False

    def refresh(self) -> int:
        """Dump the kernel table into the cache (call at drain time, never per packet); entries seen."""
        if self._sock is None:
            return 0
        try:
            entries = dump_conntrack(self._sock, self.dump_timeout_s)
        except (OSError, TimeoutError) as exc:
            self.errors += 1
            if isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP,
                                                            errno.EPROTONOSUPPORT, errno.ENOENT):  # fmt: skip
                log.warning("conntrack enrichment disabled: dump refused: %s", exc)
                self.close()
            else:
                log.warning("conntrack dump failed: %s", exc)
            return 0
        for entry in entries:
            self.ingest(entry)
        return len(entries)

    def ingest(self, entry: ConntrackEntry) -> None:
        """Insert or refresh one entry (from a dump or an event), evicting the least recently seen."""
        if entry.origin is None or entry.reply is None:
            return
        ident = (entry.zone or 0, entry.origin.key())
        self._entries[ident] = entry
        self._entries.move_to_end(ident)
        for key, is_reply in entry.role_keys():
            self._index.setdefault(key.packed(), (ident, is_reply))
            self._pairs.setdefault((key.src_addr, key.dst_addr), (ident, is_reply))
        while len(self._entries) > self.max_entries:
            old_ident, old = self._entries.popitem(last=False)
            for key, _ in old.role_keys():
                if self._index.get(key.packed(), (None,))[0] == old_ident:
                    del self._index[key.packed()]
                if self._pairs.get((key.src_addr, key.dst_addr), (None,))[0] == old_ident:
                    del self._pairs[(key.src_addr, key.dst_addr)]

    def lookup(self, key: ConnKey) -> tuple[ConntrackEntry, bool] | None:
        """(entry, is_reply_direction) for a flow key, or None."""
        hit = self._index.get(key.packed())
        if hit is None or hit[0] not in self._entries:
            return None
        return self._entries[hit[0]], hit[1]

    def enrich(self, batch: np.ndarray) -> int:
        """Fill post-NAT address/ports, ct_mark, ct_zone, ct_state of matching rows; rows enriched.

        Origin-direction flow: post-NAT source = reply tuple's dst, post-NAT dest = reply tuple's src
        (ports likewise). Reply-direction flow: post-NAT source = origin's dst, dest = origin's src.
        ICMP post ports stay 0. ct_state bits (a summary of the connection at dump time, since a dump
        has no per-packet verdict):
          0x20 trk   - an entry was found and it is not IPS_UNTRACKED;
          0x02 est   - IPS_SEEN_REPLY (the kernel's ESTABLISHED ctinfo);
          0x01 new   - not IPS_SEEN_REPLY and not IPS_EXPECTED (only the origin direction seen yet);
          0x04 rel   - IPS_EXPECTED (helper expectation, e.g. FTP data), or an ICMP error row whose
                       address pair belongs to a tracked connection (the kernel's RELATED ctinfo);
          0x08 rpl   - the row matched the reply tuple or the reversed origin tuple;
          0x40 snat / 0x80 dnat - IPS_SRC_NAT / IPS_DST_NAT, or the tuples disagree on that side;
          0x10 inv   - never set here: invalid packets create no entry, so a dump cannot show them.
        Rows with no entry are left zero ("unknown").
        """
        if len(batch) == 0 or not self._entries:
            return 0
        keys = batch_keys(batch)
        enriched = 0
        for i, packed in enumerate(keys):
            hit = self._index.get(packed)
            related = False
            if hit is None or hit[0] not in self._entries:
                row = batch[i]
                proto = int(row["protocol"])
                if proto not in _ICMP_PROTOS or (int(row["dst_port"]) >> 8) not in _ICMP_ERROR_TYPES[proto]:
                    continue
                hit = self._pairs.get((bytes(row["src_addr"]), bytes(row["dst_addr"])))
                if hit is None or hit[0] not in self._entries:
                    continue
                related = True
            ident, is_reply = hit
            entry = self._entries[ident]
            assert entry.origin is not None and entry.reply is not None
            state = entry.ct_state(is_reply)
            if related:
                state = (state & ~(CT_NEW | CT_ESTABLISHED)) | CT_RELATED
            else:
                # the other direction's tuple, reversed, is this flow's translated form
                other = entry.origin if is_reply else entry.reply
                batch["post_src_addr"][i] = np.frombuffer(other.dst or bytes(16), np.uint8)
                batch["post_dst_addr"][i] = np.frombuffer(other.src or bytes(16), np.uint8)
                sp, dp = other.ports
                if entry.origin.proto not in _ICMP_PROTOS:
                    batch["post_src_port"][i] = dp
                    batch["post_dst_port"][i] = sp
            batch["ct_mark"][i] = entry.mark or 0
            batch["ct_zone"][i] = entry.zone or 0
            batch["ct_state"][i] = state
            enriched += 1
        return enriched
