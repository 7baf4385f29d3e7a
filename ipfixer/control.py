"""`ipfixer ctl`: a running daemon's control socket, as softflowd's softflowctl offers, server and client.

Commands: `stats` (counters), `flows` (flows held now in the kernel map and the Accounter, top N by
octets, nothing removed), `expire-all` (export everything held now), `send-templates`, `reload`.

The server runs in its own thread: it accepts one connection at a time, reads one JSON request line and
hands the command to the daemon's loop through a bounded queue; the loop executes it between two polls
(at most 250 ms later) and the thread writes the reply. Export never waits for a client, and a client
never touches the meter or the exporter from another thread.

Safety (the socket is root-only): it lives in a directory that is not a symlink, belongs to us and is not
writable by others; a stale socket is replaced, anything else at the path is refused (no symlink is ever
followed); it is created under umask 0177 (mode 0600), and every peer's credentials (SO_PEERCRED) are
checked: only root (or the daemon's own user) is served. Requests are bounded in size and time.

Wire format (hand-written, tiny): one JSON object per line each way,
`{"command": "flows", "args": {"top": 20}}` -> `{"ok": true, "result": {...}}` or `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ipfixer.errors import ConfigError, IpfixerError
from ipfixer.instance import netns_inode

log = logging.getLogger("ipfixer.control")

# default: <lock_dir>/ctl-netns-<inode>.sock, one per network namespace like the instance lock, so
# instances in several namespaces can share a lock_dir (ipfixer ctl finds its own namespace's)
SOCKET_NAME = "ctl-netns-{inode}.sock"
COMMANDS = ("stats", "flows", "expire-all", "send-templates", "reload")
MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 64 << 20
MAX_TOP = 100_000
READ_TIMEOUT_S = 2.0  # a client that does not send its request line in time is dropped
REPLY_TIMEOUT_S = 30.0  # the daemon's loop answers within one poll; a reload or expire-all takes longer
QUEUE_SIZE = 16


class ControlError(IpfixerError):
    """The control socket cannot be created or reached, or a command failed; names the socket path."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def socket_path(config: Any, inode: int | None = None) -> Path:
    """The control socket of a config: `control_socket`, else `<lock_dir>/ctl-netns-<inode>.sock` for
    the network namespace `inode` (default: the caller's)."""
    explicit = getattr(config, "control_socket", None)
    if explicit:
        return Path(explicit)
    return Path(config.lock_dir) / SOCKET_NAME.format(inode=netns_inode() if inode is None else inode)


# -- server ----------------------------------------------------------------------------------------
@dataclass
class Request:
    """One command waiting for the daemon's loop; `finish` wakes the connection thread."""

    command: str
    args: dict[str, Any]
    reply: dict[str, Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.done.set()


def _check_directory(directory: Path) -> None:
    """Create the directory (0700) if missing; refuse a symlink, someone else's, or one others can write."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(directory, f"cannot create the control socket's directory: {exc.strerror or exc}") from None
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ControlError(directory, "the control socket's directory is a symlink or not a directory; refusing")
    if st.st_uid != os.geteuid():
        raise ControlError(directory, f"the control socket's directory belongs to uid {st.st_uid}, not to us; refusing")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ControlError(directory, f"the control socket's directory is writable by others "
                                      f"(mode {stat.S_IMODE(st.st_mode):o}); refusing")


def _clear_stale(path: Path) -> None:
    """Remove a stale socket at `path`; refuse a live one (another daemon) and anything that is no socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(path, "exists and is not a socket (symlink or file); refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listening: left by a daemon that was killed
        return
    except OSError as exc:
        raise ControlError(path, f"cannot probe the existing socket: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise ControlError(path, "another ipfixer is listening on this control socket")


class ControlServer:
    """The daemon's control socket: a thread that queues requests for the daemon's loop."""

    def __init__(self, path: Path, reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.reply_timeout_s = reply_timeout_s
        self.requests: queue.Queue[Request] = queue.Queue(maxsize=QUEUE_SIZE)
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.served = 0
        self.refused = 0

    def start(self) -> None:
        """Create the socket safely and start serving."""
        _check_directory(self.path.parent)
        _clear_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600: root (we) only
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise ControlError(self.path, f"cannot bind the control socket: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        sock.listen(8)
        st = os.lstat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="ipfixer-control", daemon=True)
        self._thread.start()
        log.info("control socket=%s", self.path)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.2)
                if not ready:
                    continue
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            try:
                self._handle(conn)
            except Exception as exc:  # a bad client never stops the server
                log.warning("control request failed: %s", exc)
            finally:
                conn.close()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TIMEOUT_S)
        uid = _peer_uid(conn)
        if uid not in (0, os.geteuid()):
            self.refused += 1
            _send(conn, {"ok": False, "error": f"permission denied: uid {uid} is not root"})
            return
        try:
            line = _read_line(conn, MAX_REQUEST_BYTES)
            req = _parse_request(line)
        except (ValueError, TimeoutError, OSError) as exc:
            _send(conn, {"ok": False, "error": f"bad request: {exc}"})
            return
        try:
            self.requests.put_nowait(req)
        except queue.Full:
            _send(conn, {"ok": False, "error": "daemon busy: too many pending control requests"})
            return
        if not req.done.wait(self.reply_timeout_s):
            _send(conn, {"ok": False, "error": f"no answer from the daemon's loop within {self.reply_timeout_s:g}s"})
            return
        self.served += 1
        assert req.reply is not None
        conn.settimeout(REPLY_TIMEOUT_S)
        _send(conn, req.reply)

    def serve_pending(self, daemon: Any) -> None:
        """Execute every queued command on the daemon (called by its loop, in its thread)."""
        while True:
            try:
                req = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                req.finish({"ok": True, "result": execute(daemon, req.command, req.args)})
            except (IpfixerError, ValueError) as exc:
                req.finish({"ok": False, "error": str(exc)})
            except Exception as exc:  # reported to the client and logged; the daemon keeps running
                log.exception("control command %s failed", req.command)
                req.finish({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def close(self) -> None:
        """Stop the thread; answer whatever is still queued; remove the socket if it is still ours."""
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        while True:
            try:
                self.requests.get_nowait().finish({"ok": False, "error": "daemon stopping"})
            except queue.Empty:
                break
        try:
            st = os.lstat(self.path)
            if self._inode == (st.st_dev, st.st_ino):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._sock = None


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _read_line(conn: socket.socket, limit: int) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"message longer than {limit} bytes")
    line, _, _ = bytes(buf).partition(b"\n")
    return line


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    except OSError:
        pass  # the client went away; nothing to tell it


def _parse_request(line: bytes) -> Request:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a JSON object: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("command"), str):
        raise ValueError('expected {"command": NAME, "args": {...}}')
    command = obj["command"]
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command[:40]!r}; one of {', '.join(COMMANDS)}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ValueError("args must be an object")
    return Request(command, args)


# -- commands (run in the daemon's thread) --------------------------------------------------------
def execute(daemon: Any, command: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one control command on a started Daemon; the reply's `result`."""
    if command == "stats":
        return stats(daemon)
    if command == "flows":
        top = args.get("top", 20)
        if not isinstance(top, int) or isinstance(top, bool) or not 0 < top <= MAX_TOP:
            raise ValueError(f"flows: top must be an integer 1..{MAX_TOP}, got {top!r}")
        return held_flows(daemon, top)
    if command == "expire-all":
        return expire_all(daemon)
    if command == "send-templates":
        return send_templates(daemon)
    if command == "reload":
        return reload(daemon)
    raise ValueError(f"unknown command {command!r}")


def _accounter(meter: Any) -> Any:
    """The meter's userspace Accounter (eBPF meter: behind the spill consumer; NFLOG meter: its own)."""
    spill = getattr(meter, "_spill", None)
    if spill is not None:
        return spill.accounter
    return getattr(meter, "_accounter", None)


def stats(daemon: Any) -> dict[str, Any]:
    """The counters: kernel classifier, held flows, per-collector export statistics."""
    meter, exporter = daemon._meter, daemon._exporter
    drainer = getattr(meter, "_drainer", None)
    prog = getattr(meter, "_prog", None)  # the eBPF meter's program: its counters read now
    acc = _accounter(meter)
    collectors = {}
    for c in exporter.collectors:
        st = c.stats
        collectors[c.name] = {"messages": st.messages, "records": st.records, "flow_records": st.flow_records,
                              "bytes": st.bytes, "not_sent_messages": st.not_sent_messages,
                              "not_sent_records": st.not_sent_records, "errors": dict(st.errors),
                              "paced": {"queued": getattr(c.transport, "backlog", 0), "delayed_messages":
                                        st.delayed_messages, "dropped_messages": st.dropped_messages,
                                        "dropped_records": st.dropped_records}}
        t = c.transport
        if hasattr(t, "queued"):  # tcp/tls (export/stream.py): the connection and what waits for it
            collectors[c.name]["stream"] = {
                "connected": t.connected, "connections": t.connects, "queued": t.queued,
                "dropped_messages": t.dropped_messages, "resent_messages": t.resent_messages,
                "transport_errors": dict(t.errors)}
    return {
        "pid": os.getpid(),
        "uptime_s": round((daemon.clock.wall_ns() - daemon.boot_wall_ns) / 1e9, 3),
        "config": str(daemon.config_path) if daemon.config_path else None,
        "source": daemon.config.source,
        "interfaces": meter.interfaces(),
        "kernel": prog.counter_values() if prog is not None else meter.counters(),  # live, not last drain's
        "held": {
            "kernel_map_at_last_drain": int(drainer.kernel_entries) if drainer is not None else 0,
            "carried": int(drainer.carried) if drainer is not None else 0,
            "accounter": len(acc) if acc is not None else 0,
        },
        "exported_flows": {
            "kernel": int(drainer.exported_flows) if drainer is not None else 0,
            "accounter": int(acc.evicted_flows) if acc is not None else 0,
        },
        "collectors": collectors,
    }


def _kernel_rows(drainer: Any) -> np.ndarray:
    """Flows in the kernel map now (read, not removed) and those the drainer carries between drains."""
    from ipfixer.flows.rows import build_rows
    from ipfixer.sources.kernel.program import map_batch

    keys, leaves = map_batch(drainer.map_fd, drainer.key_dtype, drainer.leaf_dtype, drainer.capacity, delete=False)
    if drainer.carried:
        keys = np.concatenate([drainer._carry_keys, keys])
        leaves = np.concatenate([drainer._carry_leaves, leaves])
    now_wall, now_mono = drainer.clock.wall_ns(), drainer.clock.mono_ns()
    return build_rows(keys, leaves, 0, now_wall, now_mono)  # end_reason 0: still active  # type: ignore[no-any-return]


def _accounter_rows(acc: Any) -> np.ndarray:
    """Flows the Accounter holds now (read, not evicted)."""
    from ipfixer.flows.rows import build_rows

    acc._apply_buffer()  # packets buffered since the last account step
    slots = np.flatnonzero(acc._used)
    return build_rows(acc._keys[slots], acc._leaves[slots], 0, acc.clock.wall_ns(), acc.clock.mono_ns())


def _merge(rows: np.ndarray) -> np.ndarray:
    """One row per flow key: the carry and the map can hold parts of the same flow."""
    if len(rows) < 2:
        return rows
    key_fields = ["ethertype", "direction", "vlan_id", "src_addr", "dst_addr", "src_port", "dst_port",
                  "protocol", "ifindex"]
    index: dict[bytes, int] = {}
    out: list[int] = []
    merged = rows.copy()
    for i in range(len(rows)):
        k = b"".join(np.asarray(rows[f][i]).tobytes() for f in key_fields)
        j = index.get(k)
        if j is None:
            index[k] = i
            out.append(i)
            continue
        merged["packets"][j] += rows["packets"][i]
        merged["octets"][j] += rows["octets"][i]
        merged["start_ms"][j] = min(merged["start_ms"][j], rows["start_ms"][i])
        merged["end_ms"][j] = max(merged["end_ms"][j], rows["end_ms"][i])
        merged["tcp_flags"][j] |= rows["tcp_flags"][i]
    return merged[out]


def _row_dict(where: str, r: Any) -> dict[str, Any]:
    from ipfixer.model import addr16_to_str

    return {
        "where": where, "src": addr16_to_str(bytes(r["src_addr"])), "dst": addr16_to_str(bytes(r["dst_addr"])),
        "src_port": int(r["src_port"]), "dst_port": int(r["dst_port"]), "protocol": int(r["protocol"]),
        "packets": int(r["packets"]), "octets": int(r["octets"]), "ifindex": int(r["ifindex"]),
        "direction": "ingress" if int(r["direction"]) == 0 else "egress", "vlan_id": int(r["vlan_id"]),
        "tcp_flags": int(r["tcp_flags"]), "start_ms": int(r["start_ms"]), "end_ms": int(r["end_ms"]),
    }  # fmt: skip


def held_flows(daemon: Any, top: int) -> dict[str, Any]:
    """The `top` flows by octets held now in the kernel map (with the drainer's carry) and the Accounter."""
    meter = daemon._meter
    drainer = getattr(meter, "_drainer", None)
    acc = _accounter(meter)
    parts: list[tuple[str, np.ndarray]] = []
    if drainer is not None:
        parts.append(("kernel", _merge(_kernel_rows(drainer))))
    if acc is not None:
        parts.append(("accounter", _accounter_rows(acc)))
    rows = [(int(r["octets"]), where, r) for where, batch in parts for r in batch]
    rows.sort(key=lambda t: t[0], reverse=True)
    return {"held": {where: len(batch) for where, batch in parts},
            "flows": [_row_dict(where, r) for _, where, r in rows[:top]]}


def expire_all(daemon: Any) -> dict[str, Any]:
    """Export every flow held now (kernel map and Accounter) with flowEndReason forced end (4)."""
    batches = daemon._meter.flush()
    if daemon._enrichment is not None:
        batches.append(daemon._enrichment.nat_event_batch())
    n = int(sum(len(b) for b in batches))
    daemon._export(batches)
    daemon._send_options(force=False)
    return {"exported": n}


def send_templates(daemon: Any) -> dict[str, Any]:
    """Send the data templates to every collector now, and the options templates with their records."""
    exporter = daemon._exporter
    for c in exporter.collectors:
        c.session.reset()  # the next message carries the templates (RFC 7011 8.1)
    exporter.refresh_templates(daemon.clock.wall_ns())
    daemon._send_options(force=True)
    return {"collectors": [c.name for c in exporter.collectors]}


def reload(daemon: Any) -> dict[str, Any]:
    """Re-read the config file, as SIGHUP does; an invalid one is reported and the running one kept."""
    from ipfixer.config import load_config
    from ipfixer.export.factory import load_config_templates

    if daemon.config_path is None:
        raise ControlError("-", "the daemon was started without a config file; nothing to reload")
    try:
        load_config_templates(load_config(daemon.config_path))  # the error text for the client
    except ConfigError as exc:
        raise ControlError(daemon.config_path, f"reload rejected, running config kept: {exc}") from None
    before = daemon.config
    daemon._reload()
    if daemon.config is before:
        raise ControlError(daemon.config_path, "reload rejected, running config kept (see the daemon's log)")
    return {"reloaded": str(daemon.config_path)}


# -- client ----------------------------------------------------------------------------------------
def request(path: Path | str, command: str, args: dict[str, Any] | None = None,
            timeout_s: float = REPLY_TIMEOUT_S + 5) -> dict[str, Any]:
    """Send one command to the daemon at `path`; its result, or ControlError with the daemon's message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(path, "no ipfixer daemon is listening here (is it running? which config/--socket?)") \
                from None
        except PermissionError:
            raise ControlError(path, "permission denied: ipfixer ctl needs root") from None
        sock.sendall(json.dumps({"command": command, "args": args or {}}).encode() + b"\n")
        line = _read_line(sock, MAX_REPLY_BYTES)
    except (TimeoutError, ValueError) as exc:
        raise ControlError(path, f"no complete reply: {exc}") from None
    except OSError as exc:
        raise ControlError(path, f"control socket error: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(line)
    except json.JSONDecodeError:
        raise ControlError(path, "the daemon's reply is not JSON") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        err = reply.get("error", "unknown error") if isinstance(reply, dict) else "malformed reply"
        raise ControlError(path, str(err))
    result = reply.get("result", {})
    return result if isinstance(result, dict) else {"result": result}


def format_result(command: str, result: dict[str, Any]) -> str:
    """Human-readable text of a command's result."""
    if command == "stats":
        lines = [f"pid {result['pid']}  up {result['uptime_s']:.0f}s  source {result['source']}  "
                 f"config {result['config']}",
                 f"interfaces: {', '.join(result['interfaces']) or '(none)'}",
                 "held: " + "  ".join(f"{k} {v}" for k, v in result["held"].items()),
                 "exported flows: " + "  ".join(f"{k} {v}" for k, v in result["exported_flows"].items()),
                 "kernel counters:"]
        lines += [f"  {k:<20} {v}" for k, v in sorted(result["kernel"].items())]
        for name, st in result["collectors"].items():
            errors = ", ".join(f"{k} {v}" for k, v in st["errors"].items()) or "none"
            lines.append(f"collector {name}: {st['messages']} messages, {st['flow_records']} flow records, "
                         f"{st['bytes']} bytes; not sent {st['not_sent_messages']} messages / "
                         f"{st['not_sent_records']} records; errors {errors}")
            if st.get("paced", {}).get("delayed_messages") or st.get("paced", {}).get("dropped_messages"):
                p = st["paced"]
                lines.append(f"  paced: {p['queued']} queued, {p['delayed_messages']} messages delayed, "
                             f"{p['dropped_messages']} messages / {p['dropped_records']} records dropped")
            if "stream" in st:
                s = st["stream"]
                lines.append(f"  {'connected' if s['connected'] else 'DISCONNECTED'}, connection {s['connections']}, "
                             f"{s['queued']} queued, {s['dropped_messages']} refused (queue full), "
                             f"{s['resent_messages']} resent")
        return "\n".join(lines)
    if command == "flows":
        held = "  ".join(f"{k} {v}" for k, v in result["held"].items())
        lines = [f"held now: {held}",
                 f"{'where':<9} {'source':>39} {'sport':>5}  {'destination':>39} {'dport':>5} {'proto':>5} "
                 f"{'packets':>10} {'octets':>12} {'if':>4} dir"]
        for f in result["flows"]:
            lines.append(f"{f['where']:<9} {f['src']:>39} {f['src_port']:>5}  {f['dst']:>39} {f['dst_port']:>5} "
                         f"{f['protocol']:>5} {f['packets']:>10} {f['octets']:>12} {f['ifindex']:>4} {f['direction']}")
        return "\n".join(lines)
    if command == "expire-all":
        return f"exported {result['exported']} flows"
    if command == "send-templates":
        return f"templates sent to {', '.join(result['collectors'])}"
    if command == "reload":
        return f"reloaded {result['reloaded']}"
    return json.dumps(result, sort_keys=True)
