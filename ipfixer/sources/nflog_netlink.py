"""NFLOG packet source for kernels without eBPF: an nftables `log group N` rule copies packet headers to
a netlink socket; each becomes a RawPacket for the same Accounter the ring-buffer spill feeds.

The nfnetlink_log protocol (include/uapi/linux/netfilter/nfnetlink_log.h) is spoken directly on a raw
AF_NETLINK/NETLINK_NETFILTER socket: pyroute2 (0.9) has no NFLOG support and the protocol we need is
four config messages and one packet message with a handful of attributes, smaller than a dependency.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable

from ipfixer.clock import Clock, SystemClock
from ipfixer.enrich.conntrack import NETLINK_NETFILTER
from ipfixer.model import Direction, RawPacket
from ipfixer.netns import socket_in_netns
from ipfixer.sources.packets import DecapCounts, packet_key, parse_ip

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
# packet attributes
NFULA_PACKET_HDR = 1
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_HWHEADER = 16
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_TYPE_MASK = 0x3FFF
# netfilter hooks: prerouting, input, forward -> ingress; output, postrouting -> egress
_EGRESS_HOOKS = (3, 4)

TABLE = "ipfixer"  # the only nft table this module ever creates or deletes
PREFIX_IN = "ipfixer-in"
PREFIX_OUT = "ipfixer-out"

_ZERO_MAC = b"\x00" * 6


def _nlmsg(
    msg_type: int, flags: int, seq: int, family: int, res_id: int, attrs: list[tuple[int, bytes]]
) -> bytes:
    body = struct.pack("!BBH", family, 0, res_id)  # nfgenmsg; res_id is big-endian
    for atype, payload in attrs:
        nla = struct.pack("=HH", 4 + len(payload), atype) + payload
        body += nla + b"\x00" * (-len(nla) % 4)
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def _attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        length, atype = struct.unpack_from("=HH", data, off)
        if length < 4 or off + length > end:
            break
        out[atype & NLA_TYPE_MASK] = data[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def _u32(value: bytes) -> int:
    """A big-endian u32 attribute, 0 if it is absent or not 4 bytes."""
    return int.from_bytes(value, "big") if len(value) == 4 else 0


class NflogSource:
    """Packets of one NFLOG group in one netns, as RawPackets.

    The packet time is the monotonic receive time (NFULA_TIMESTAMP is wall-clock and only present for
    timestamped skbs; delivery is immediate with queue threshold 1). Direction comes from the rule
    prefix (PREFIX_IN / PREFIX_OUT) or else the hook; ifindex is the input device for ingress and the
    output device for egress; octets is the IP total length, not the copied length.

    With `decap` (tunnels.decap), a packet whose interface index decap(ifindex) accepts is decapsulated
    (ipfixer.sources.packets.decapsulate): its key is the inner packet's with the tunnel, counted in
    `decap_counts`. The copy range must then hold the tunnel headers too (a cut one keeps the outer flow).
    """

    def __init__(self, group: int, netns: str | None = None, clock: Clock | None = None,
                 copy_range: int = 128, timeout_s: float = 5.0,
                 decap: Callable[[int], bool] | None = None) -> None:  # fmt: skip
        self.group = group
        self.decap = decap
        self.decap_counts = DecapCounts()
        self.netns = netns
        self.clock: Clock = clock or SystemClock()
        self.received = 0
        self.unparsed = 0
        self.overruns = 0
        self._seq = 0
        self._sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
            except OSError:
                pass
            self._config([(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))], timeout_s)
            self._config([(NFULA_CFG_MODE, struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0)),
                          (NFULA_CFG_QTHRESH, struct.pack("!I", 1))], timeout_s)  # fmt: skip
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def _config(self, attrs: list[tuple[int, bytes]], timeout_s: float) -> None:
        self._seq += 1
        msg = _nlmsg((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, self._seq,
                     socket.AF_UNSPEC, self.group, attrs)  # fmt: skip
        self._sock.send(msg)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            data = self._sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _f, seq, _p = struct.unpack_from("=IHHII", data, off)
                if mtype == NLMSG_ERROR and seq == self._seq:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err:
                        raise OSError(
                            -err, f"NFLOG group {self.group} config: {errno.errorcode.get(-err, err)}"
                        )
                    return
                off += max((length + 3) & ~3, 16)
        raise TimeoutError(f"NFLOG group {self.group}: no answer to config")

    def fileno(self) -> int:
        """The netlink fd, for the daemon's selector."""
        return self._sock.fileno()

    def poll(self, timeout_s: float = 0.0, max_packets: int = 100_000) -> list[RawPacket]:
        """Wait up to timeout_s, then return every packet pending (at most max_packets)."""
        out: list[RawPacket] = []
        if self._sock.fileno() < 0:
            return out
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout_s))
        if not ready:
            return out
        while len(out) < max_packets:
            try:
                data = self._sock.recv(1 << 17)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped log messages: socket overrun
                    self.overruns += 1
                    continue
                raise
            now = self.clock.mono_ns()
            off = 0
            while off + 20 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                if length < 16 or off + length > len(data):
                    break
                if mtype == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                    pkt = self._packet(data, off + 20, off + length, now)
                    if pkt is not None:
                        out.append(pkt)
                off += (length + 3) & ~3
        return out

    def _packet(self, data: bytes, start: int, end: int, now: int) -> RawPacket | None:
        self.received += 1
        attrs = _attrs(data, start, end)
        pkt_hdr = attrs.get(NFULA_PACKET_HDR, b"")  # hw protocol (2 bytes), hook; short attributes read as absent
        hook = pkt_hdr[2] if len(pkt_hdr) >= 3 else 0
        prefix = attrs.get(NFULA_PREFIX, b"").rstrip(b"\x00").decode("ascii", "replace")
        if prefix.startswith(PREFIX_OUT):
            direction = Direction.EGRESS
        elif prefix.startswith(PREFIX_IN):
            direction = Direction.INGRESS
        else:
            direction = Direction.EGRESS if hook in _EGRESS_HOOKS else Direction.INGRESS
        indev = _u32(attrs.get(NFULA_IFINDEX_INDEV, b""))
        outdev = _u32(attrs.get(NFULA_IFINDEX_OUTDEV, b""))
        ifindex = (outdev or indev) if direction == Direction.EGRESS else (indev or outdev)
        decap = self.decap_counts if self.decap is not None and self.decap(ifindex) else None
        parsed = parse_ip(attrs.get(NFULA_PAYLOAD, b""), decap)
        if parsed is None:
            self.unparsed += 1
            return None
        src_mac = dst_mac = _ZERO_MAC
        hw = attrs.get(NFULA_HWHEADER, b"")
        if len(hw) >= 12:  # Ethernet header: only on ingress hooks
            dst_mac, src_mac = hw[0:6], hw[6:12]
        key = packet_key(parsed, int(direction), ifindex, src_mac, dst_mac)
        return RawPacket(
            key=key, octets=parsed.ip_octets, mono_ns=now, tcp_flags=parsed.tcp_flags, tos=parsed.tos
        )

    def close(self) -> None:
        """Unbind the group and close the socket (idempotent)."""
        if self._sock.fileno() < 0:
            return
        try:
            self._sock.setblocking(True)
            self._sock.settimeout(1.0)
            self._seq += 1
            self._sock.send(_nlmsg((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, NLM_F_REQUEST, self._seq,
                                   socket.AF_UNSPEC, self.group,
                                   [(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND]))]))  # fmt: skip
        except OSError:
            pass  # closing the socket unbinds too
        self._sock.close()


def _nft(script: str, netns: str | None) -> subprocess.CompletedProcess[str]:
    if netns is None:
        cmd = ["nft", "-f", "-"]
    elif netns.startswith("/"):
        cmd = ["nsenter", f"--net={netns}", "nft", "-f", "-"]
    else:
        cmd = ["ip", "netns", "exec", netns, "nft", "-f", "-"]
    return subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=30, check=False)


def install_nflog_rules(group: int, netns: str | None = None, match: str = "", snaplen: int = 128) -> None:
    """(Re)create table inet ipfixer logging every packet (optionally only those matching `match`,
    an nft expression) at prerouting (ingress) and postrouting (egress) to NFLOG group `group`."""

    def rule(prefix: str) -> str:
        return f'{match} log prefix "{prefix}" group {group} snaplen {snaplen}'.strip()

    script = f"""table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
    chain nflog_in {{
        type filter hook prerouting priority -400; policy accept;
        {rule(PREFIX_IN)}
    }}
    chain nflog_out {{
        type filter hook postrouting priority 400; policy accept;
        {rule(PREFIX_OUT)}
    }}
}}
"""
    res = _nft(script, netns)
    if res.returncode != 0:
        raise OSError(f"nft: installing table inet {TABLE} failed: {res.stderr.strip()}")


def remove_nflog_rules(netns: str | None = None) -> None:
    """Delete table inet ipfixer if present (nothing else is touched)."""
    _nft(f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n", netns)
