"""ICMP errors joined to conntrack on the tuple they quote, as nf_conntrack_icmp(v6) itself does.

A flow row of ICMP errors carries only the outer addresses and type/code, and errors from one router to
one host about many different connections all land in that one row: its own addresses say nothing
about which connection it is related to (matching on them borrowed whatever connection used the same
address pair first). So an AF_PACKET socket in the netns, with a classic BPF filter that passes only
ICMP/ICMPv6 error messages (cheap: everything else is dropped in the kernel), reads every error as it
crosses an interface; the quoted packet's 5-tuple is looked up in the conntrack table at once, and the
outcome is kept per outer flow key until a drain asks. A row whose errors all quote one connection gets
that connection's mark, zone, translation and trk|rel (+rpl when the error travels in the reply
direction); errors quoting no connection give trk|inv (the kernel attaches no conntrack to them: nft
`ct state invalid`); errors quoting different connections give trk|rel only (never one of them).
Hand-written packet parsing (a few fixed header fields, RFC 792 / RFC 4443 2.4 / RFC 8200 4, the quoted
packet's extension headers skipped).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import socket
import struct
from dataclasses import dataclass

import numpy as np

from ipfixer.enrich.conntrack import (
    CT_DNAT,
    CT_INVALID,
    CT_RELATED,
    CT_REPLY,
    CT_SNAT,
    CT_TRACKED,
    ConntrackTable,
    ct_state_bits,
    icmp_error_rows,
)
from ipfixer.model import (
    ETH_P_IP,
    ETH_P_IPV6,
    IPV6_NH_AH,
    IPV6_NH_DSTOPTS,
    IPV6_NH_FRAGMENT,
    IPV6_NH_HOPOPTS,
    IPV6_NH_ROUTING,
    V4_MAPPED_PREFIX,
    empty_batch,
    five_tuple_keys,
)
from ipfixer.netns import socket_in_netns

log = logging.getLogger("ipfixer.enrich")

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SKF_AD_PROTOCOL = -0x1000  # SKF_AD_OFF + SKF_AD_PROTOCOL: skb->protocol
_BPF_LD_H_ABS, _BPF_LD_B_ABS, _BPF_LDX_MSH, _BPF_LD_B_IND = 0x28, 0x30, 0xB1, 0x50
_BPF_JEQ_K, _BPF_RET_K = 0x15, 0x06


def _filter() -> list[tuple[int, int, int, int]]:
    """cBPF program over the network header (SOCK_DGRAM): accept ICMP types 3,4,5,11,12 over IPv4 and
    ICMPv6 types 1..4 directly after the IPv6 header; drop everything else."""
    ins: list[tuple[int, int, int, int]] = [
        (_BPF_LD_H_ABS, 0, 0, SKF_AD_PROTOCOL & 0xFFFFFFFF),  # 0 A = ethertype
        (_BPF_JEQ_K, 0, 9, ETH_P_IP),  # 1 -> IPv6 branch at 11
        (_BPF_LD_B_ABS, 0, 0, 9),  # 2 A = IPv4 protocol
        (_BPF_JEQ_K, 0, 15, 1),  # 3 -> drop (19)
        (_BPF_LDX_MSH, 0, 0, 0),  # 4 X = 4 * IHL
        (_BPF_LD_B_IND, 0, 0, 0),  # 5 A = ICMP type
        (_BPF_JEQ_K, 12, 0, 3),  # 6 (jump offsets are set by _fix_jumps)
        (_BPF_JEQ_K, 11, 0, 4),  # 7
        (_BPF_JEQ_K, 10, 0, 5),  # 8
        (_BPF_JEQ_K, 9, 0, 11),  # 9
        (_BPF_JEQ_K, 8, 9, 12),  # 10 -> accept / drop
        (_BPF_JEQ_K, 0, 8, ETH_P_IPV6),  # 11
        (_BPF_LD_B_ABS, 0, 0, 6),  # 12 A = next header
        (_BPF_JEQ_K, 0, 6, 58),  # 13
        (_BPF_LD_B_ABS, 0, 0, 40),  # 14 A = ICMPv6 type
        (_BPF_JEQ_K, 3, 0, 1),  # 15
        (_BPF_JEQ_K, 2, 0, 2),  # 16
        (_BPF_JEQ_K, 1, 0, 3),  # 17
        (_BPF_JEQ_K, 0, 1, 4),  # 18
        (_BPF_RET_K, 0, 0, 0xFFFF),  # 19 accept
        (_BPF_RET_K, 0, 0, 0),  # 20 drop
    ]
    return ins


def _fix_jumps(ins: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Jumps written as absolute targets for accept (19) / drop (20) in the table above, made relative."""
    accept, drop = 19, 20
    out = []
    for i, (code, jt, jf, k) in enumerate(ins):
        if code == _BPF_JEQ_K:
            if i == 1:
                jt, jf = 0, 11 - i - 1
            elif i == 3:
                jt, jf = 0, drop - i - 1
            elif 6 <= i <= 10:
                jt, jf = accept - i - 1, (drop - i - 1) if i == 10 else 0
            elif i == 11:
                jt, jf = 0, drop - i - 1
            elif i == 13:
                jt, jf = 0, drop - i - 1
            elif 15 <= i <= 18:
                jt, jf = accept - i - 1, (drop - i - 1) if i == 18 else 0
        out.append((code, jt, jf, k))
    return out


BPF_PROGRAM = _fix_jumps(_filter())


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER with a classic BPF program (struct sock_fprog)."""
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HP", len(program), ctypes.addressof(buf))  # native: u16, padding, pointer
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


@dataclass
class _Seen:
    """What the errors of one outer flow key quoted so far."""

    row: np.void | None  # the one connection (CT_DTYPE), or None
    reply: bool
    ident: bytes | None = None
    ambiguous: bool = False
    unmatched: int = 0
    matched: int = 0


_IPV6_EXT_8 = (IPV6_NH_HOPOPTS, IPV6_NH_ROUTING, IPV6_NH_DSTOPTS)  # RFC 8200 4.3/4.4/4.6: 8-octet units - 1
_MAX_EXT_HEADERS = 8  # bounded walk on hostile input


def _skip_ipv6_ext(inner: bytes) -> tuple[int, int] | None:
    """(transport protocol, its offset) of a quoted IPv6 packet, past its extension headers (RFC 8200
    4: hop-by-hop, routing, destination options, fragment; AH by RFC 4302 2.2), as the kernel's
    ipv6_skip_exthdr finds the tuple nf_conntrack_icmpv6 looks up; None for a non-first fragment (no
    transport header) or headers cut short. Hand-written: a few fixed fields, every read bounded."""
    proto, off = inner[6], 40
    for _ in range(_MAX_EXT_HEADERS):
        if proto in _IPV6_EXT_8 and len(inner) >= off + 2:
            proto, off = inner[off], off + (inner[off + 1] + 1) * 8
        elif proto == IPV6_NH_FRAGMENT and len(inner) >= off + 8:
            if struct.unpack_from("!H", inner, off + 2)[0] & 0xFFF8:
                return None
            proto, off = inner[off], off + 8
        elif proto == IPV6_NH_AH and len(inner) >= off + 2:
            proto, off = inner[off], off + (inner[off + 1] + 2) * 4
        else:
            break
    if proto in (*_IPV6_EXT_8, IPV6_NH_FRAGMENT, IPV6_NH_AH):
        return None  # cut short inside the chain, or longer than the walk allows
    return proto, off


def quoted_tuple(pkt: bytes, ethertype: int) -> tuple[bytes, bytes, int, bytes, bytes, int, int, int] | None:
    """(outer src16, dst16, outer proto, inner src16, dst16, inner proto, inner sport, inner dport-as-flow)
    of an ICMP error packet starting at its IP header, or None when too short/not an error."""
    if ethertype == ETH_P_IP and len(pkt) >= 20 and pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0xF) * 4
        if pkt[9] != 1 or len(pkt) < ihl + 8 + 20:
            return None
        osrc, odst = V4_MAPPED_PREFIX + pkt[12:16], V4_MAPPED_PREFIX + pkt[16:20]
        inner = pkt[ihl + 8 :]
        iihl = (inner[0] & 0xF) * 4
        if inner[0] >> 4 != 4 or len(inner) < iihl + 4:
            return None
        iproto, isrc, idst, l4 = inner[9], V4_MAPPED_PREFIX + inner[12:16], V4_MAPPED_PREFIX + inner[16:20], iihl
        oproto = 1
    elif ethertype == ETH_P_IPV6 and len(pkt) >= 40 + 8 + 40 and pkt[0] >> 4 == 6:
        if pkt[6] != 58:
            return None
        osrc, odst = pkt[8:24], pkt[24:40]
        inner = pkt[48:]
        if inner[0] >> 4 != 6 or len(inner) < 44:
            return None
        walked = _skip_ipv6_ext(inner)
        if walked is None:
            return None
        (iproto, l4), isrc, idst = walked, inner[8:24], inner[24:40]
        oproto = 58
    else:
        return None
    if len(inner) < l4 + 4:
        return None
    if iproto in (1, 58):
        sport, dport = 0, (inner[l4] << 8) | inner[l4 + 1]
    else:
        sport, dport = struct.unpack_from("!HH", inner, l4)
    return osrc, odst, oproto, isrc, idst, iproto, sport, dport


class IcmpErrors:
    """ICMP errors of one netns, read from an AF_PACKET socket and joined to a ConntrackTable."""

    def __init__(self, table: ConntrackTable, netns: str | None = None, max_keys: int = 65536) -> None:
        self.table = table
        self.max_keys = max_keys
        self.seen_errors = 0
        self.unmatched_errors = 0
        self.available = False
        self._seen: collections.OrderedDict[bytes, _Seen] = collections.OrderedDict()
        self._pending: collections.deque[tuple[bytes, bytes, int, bytes, bytes, int, int, int, int]] = (
            collections.deque(maxlen=max_keys)
        )
        self._sock: socket.socket | None = None
        try:
            sock = socket_in_netns(netns, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            try:
                attach_filter(sock, BPF_PROGRAM)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self.available = True
        except OSError as exc:
            log.warning("ICMP errors will not be joined to conntrack (netns %s): %s", netns or "host", exc)

    def poll(self, max_packets: int = 4096) -> int:
        """Read pending ICMP errors (non-blocking, bounded) and keep what each quotes until a drain
        resolves it (by then conntrack's NEW event for the quoted connection has reached the table)."""
        if self._sock is None:
            return 0
        n = 0
        for _ in range(max_packets):
            try:
                pkt, addr = self._sock.recvfrom(2048)
            except OSError:  # BlockingIOError: nothing more
                break
            parsed = quoted_tuple(pkt, addr[1])
            if parsed is None:
                continue
            at = (pkt[0] & 0xF) * 4 if parsed[2] == 1 else 40
            self._pending.append((*parsed, (pkt[at] << 8) | pkt[at + 1]))
            n += 1
        return n

    def _resolve(self) -> None:
        """Look up what every pending error quotes, all at once, and fold it into its outer key."""
        got = list(self._pending)
        self._pending.clear()
        if not got:
            return
        inner = empty_batch(len(got))
        inner["protocol"] = [g[5] for g in got]
        inner["src_addr"] = np.frombuffer(b"".join(g[3] for g in got), np.uint8).reshape(-1, 16)
        inner["dst_addr"] = np.frombuffer(b"".join(g[4] for g in got), np.uint8).reshape(-1, 16)
        inner["src_port"] = [g[6] for g in got]
        inner["dst_port"] = [g[7] for g in got]
        pos, rows, rep = self.table.match(inner)
        hit = {int(p): (rows[i], bool(rep[i])) for i, p in enumerate(pos)}
        outer = empty_batch(len(got))
        outer["protocol"] = [g[2] for g in got]
        outer["src_addr"] = np.frombuffer(b"".join(g[0] for g in got), np.uint8).reshape(-1, 16)
        outer["dst_addr"] = np.frombuffer(b"".join(g[1] for g in got), np.uint8).reshape(-1, 16)
        outer["dst_port"] = [g[8] for g in got]
        for i, key in enumerate(five_tuple_keys(outer)):
            self.seen_errors += 1
            h = hit.get(i)
            s = self._seen.get(key)
            if s is None:
                s = self._seen[key] = _Seen(None, False)
                while len(self._seen) > self.max_keys:
                    self._seen.popitem(last=False)
            if h is None:
                s.unmatched += 1
                self.unmatched_errors += 1
                continue
            # the quoted packet went one way; the error about it travels the other way
            row, quoted_reply = h
            ident = bytes(row["o_src"]) + bytes(row["o_dst"]) + struct.pack(
                "!BHHH", int(row["proto"]), int(row["o_sport"]), int(row["o_dport"]), int(row["zone"]))
            if s.ident is None and not s.ambiguous:
                s.row, s.reply, s.ident = row, not quoted_reply, ident
            elif s.ident != ident:
                s.ambiguous, s.row = True, None
            s.matched += 1

    def enrich(self, batch: np.ndarray) -> tuple[int, int]:
        """Fill the ICMP error rows of a batch from what their errors quoted; (enriched, unmatched)."""
        err = np.flatnonzero(icmp_error_rows(batch))
        if len(err) == 0:
            return 0, 0
        self.poll()
        self._resolve()
        keys = five_tuple_keys(batch[err])
        enriched = unmatched = 0
        for key in set(keys) - set(self._seen):  # no error read for these: nothing is known
            self._seen.pop(key, None)
        used: set[bytes] = set()
        for i, key in zip(err, keys, strict=True):
            used.add(key)
            s = self._seen.get(key)
            if s is None:
                unmatched += 1
                continue
            if s.row is None or s.unmatched:
                if s.ambiguous or (s.row is not None and s.unmatched):  # errors about several connections
                    batch["ct_state"][i] = CT_TRACKED | CT_RELATED
                    enriched += 1
                else:
                    batch["ct_state"][i] = CT_TRACKED | CT_INVALID
                    unmatched += 1
                continue
            row, reply = s.row, s.reply
            src, dst = bytes(batch["src_addr"][i]), bytes(batch["dst_addr"][i])
            # translate each outer address that is an endpoint of the connection, as the kernel's
            # nf_nat_icmp_reply_translation does; others (an intermediate router) stay as they are
            if reply:
                amap = {bytes(row["r_src"]): bytes(row["o_dst"]), bytes(row["r_dst"]): bytes(row["o_src"])}
            else:
                amap = {bytes(row["o_src"]): bytes(row["r_dst"]), bytes(row["o_dst"]): bytes(row["r_src"])}
            batch["post_src_addr"][i] = np.frombuffer(amap.get(src, src), np.uint8)
            batch["post_dst_addr"][i] = np.frombuffer(amap.get(dst, dst), np.uint8)
            state = int(ct_state_bits(np.asarray([row]), np.asarray([reply]))[0])
            state = CT_TRACKED | CT_RELATED | (CT_REPLY if reply else 0) | (state & (CT_SNAT | CT_DNAT))
            batch["ct_state"][i] = state
            batch["ct_mark"][i] = row["mark"]
            batch["ct_zone"][i] = row["zone"]
            enriched += 1
        for key in used:  # what the next flow of these keys says is for its own errors
            self._seen.pop(key, None)
        return enriched, unmatched

    def close(self) -> None:
        """Release the packet socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.available = False
