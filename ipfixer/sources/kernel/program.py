"""Compile and load bpf/flow_tc.c with bcc, and the few raw bpf() calls bcc lacks (through libbpf).

Struct layouts come from bpf/flow_types.h only: bcc generates the ctypes key/leaf types from it and
we derive numpy dtypes from those, so no layout is repeated in Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ipfixer.errors import KernelError
from ipfixer.resources import share_dir

log = logging.getLogger(__name__)

BPF_DIR = share_dir("bpf")  # the wheel's copy or the checkout's bpf/
PROGRAM_FILE = BPF_DIR / "flow_tc.c"
INGRESS_FUNC = "ipfixer_ingress"
EGRESS_FUNC = "ipfixer_egress"

TYPES_HEADER = BPF_DIR / "flow_types.h"


def counter_names(header: str, source: str = "flow_types.h") -> tuple[str, ...]:
    """The names of `enum ipfixer_counter` in a C header, in index order: CNT_FOO_BAR -> "foo_bar".

    The enum is the one list of the classifier's counters (the per-CPU array is indexed by it), so
    userspace reads it instead of repeating it. Hand-written (a regular expression over one enum, not
    a C parser): entries must be `CNT_NAME` lines taking consecutive values from 0 and end at CNT_MAX;
    anything else is a KernelError naming the entry, so a header edit cannot silently shift the
    names against the indices."""
    m = re.search(r"enum\s+ipfixer_counter\s*\{(.*?)\}", header, re.S)
    if m is None:
        raise KernelError(f"{source}: no `enum ipfixer_counter {{...}}` found")
    body = re.sub(r"/\*.*?\*/|//[^\n]*", "", m.group(1), flags=re.S)
    names: list[str] = []
    for i, entry in enumerate(e.strip() for e in body.split(",")):
        if not entry:
            continue
        e = re.fullmatch(r"CNT_([A-Z0-9_]+)(?:\s*=\s*(\w+))?", entry)
        if e is None or (e.group(2) is not None and (i, e.group(2)) != (0, "0")):
            raise KernelError(f"{source}: enum ipfixer_counter entry {entry!r} is not `CNT_NAME` in order "
                              "(only the first may say `= 0`)")
        if e.group(1) == "MAX":
            return tuple(names)
        names.append(e.group(1).lower())
    raise KernelError(f"{source}: enum ipfixer_counter does not end with CNT_MAX")


# The classifier's counters, in index order: read from bpf/flow_types.h, their one definition.
COUNTER_NAMES: tuple[str, ...] = counter_names(TYPES_HEADER.read_text(encoding="utf-8"), str(TYPES_HEADER))


@dataclass
class LoadedProgram:
    """The loaded classifier: program fds, map handles and the dtypes of their entries."""

    bpf: Any  # bcc.BPF
    ingress_fd: int
    egress_fd: int
    flows: Any  # bcc HashTable of flow_key -> flow_metrics
    counters: Any  # bcc PerCpuArray of u64
    spill: Any  # bcc RingBuf of spill_record
    key_dtype: np.dtype
    leaf_dtype: np.dtype
    spill_dtype: np.dtype
    map_entries: int
    ring_pages: int
    decap_ifaces: Any = None  # TUNNEL_DECAP builds: bcc HashTable of ifindex -> 1 (interfaces that decapsulate)
    _closed: bool = field(default=False, repr=False)

    def set_decap_interfaces(self, ifindexes: set[int]) -> set[int]:
        """Make the decapsulating interfaces exactly `ifindexes` (a TUNNEL_DECAP build; else a no-op);
        returns those the map could not take (more than DECAP_IFACES_MAX)."""
        table = self.decap_ifaces
        if table is None:
            return set()
        have = {int(k.value) for k in table.keys()}
        for gone in have - ifindexes:
            del table[table.Key(gone)]
        refused: set[int] = set()
        for new in sorted(ifindexes - have):
            try:
                table[table.Key(new)] = table.Leaf(1)
            except Exception:  # bcc raises plain Exception when the map is full (E2BIG)
                refused.add(new)
        return refused

    def counter_values(self) -> dict[str, int]:
        """Kernel counters summed over CPUs, by name."""
        out: dict[str, int] = {}
        for i, name in enumerate(COUNTER_NAMES):
            out[name] = int(sum(self.counters[ctypes.c_int(i)]))
        return out

    def close(self) -> None:
        """Unload programs and maps (tc filters keep their own program reference)."""
        if not self._closed:
            self._closed = True
            self.bpf.cleanup()


def load_program(
    map_entries: int = 65536, ring_pages: int = 1024, extra_cflags: tuple[str, ...] = ()
) -> LoadedProgram:
    """Compile flow_tc.c with the map size and ring size as -D flags and load both entry points."""
    if map_entries < 1:
        raise KernelError(f"flow map size must be >= 1, got {map_entries}")
    if ring_pages < 1 or ring_pages & (ring_pages - 1):
        raise KernelError(f"ring buffer pages (cache.ring_buffer_pages) must be a power of two, got {ring_pages}")
    ring_bytes = ring_pages * PAGE_SIZE
    if ring_bytes > MAX_RING_BYTES:
        raise KernelError(
            f"ring buffer of {ring_pages} pages ({ring_bytes:,} bytes) is larger than the kernel allows: its size "
            f"is a power-of-two byte count in 32 bits, at most {MAX_RING_BYTES // PAGE_SIZE} pages of "
            f"{PAGE_SIZE} bytes (cache.ring_buffer_pages)"
        )
    if not PROGRAM_FILE.is_file():
        raise KernelError(f"BPF source not found at {PROGRAM_FILE}")
    try:
        from bcc import BPF
    except ImportError as exc:
        raise KernelError("bcc is not importable (python3-bpfcc); run ./setup.sh") from exc
    headers = Path(f"/lib/modules/{os.uname().release}/build")
    if not headers.exists():
        raise KernelError(f"kernel headers missing at {headers}; run ./setup.sh")
    cflags = [
        f"-I{BPF_DIR}",
        f"-DFLOW_MAP_ENTRIES={int(map_entries)}",
        f"-DSPILL_RING_PAGES={int(ring_pages)}",
        "-Wno-unused-function",
        *extra_cflags,
    ]
    failed: Exception | None = None
    with _c_stderr() as captured:
        try:
            bpf = BPF(src_file=str(PROGRAM_FILE).encode(), cflags=cflags)
        except Exception as exc:  # bcc raises plain Exception on compile and map errors alike
            failed = exc
    if failed is not None:
        raise KernelError(_explain_build_failure(captured[0], failed, map_entries, ring_pages)) from failed
    try:
        with _c_stderr() as captured:
            try:
                ingress = bpf.load_func(INGRESS_FUNC.encode(), BPF.SCHED_CLS)
                egress = bpf.load_func(EGRESS_FUNC.encode(), BPF.SCHED_CLS)
            except Exception as exc:
                failed = exc
        if failed is not None:
            verifier = [ln for ln in captured[0].splitlines() if ln.strip()][-3:]
            raise KernelError(f"loading the BPF classifier failed (verifier or permissions): {failed}"
                              + (f"; verifier: {' | '.join(verifier)}" if verifier else ""))
        flows = bpf[b"flows"]
        layout = bpf[b"spill_layout"]
        prog = LoadedProgram(
            bpf=bpf,
            ingress_fd=ingress.fd,
            egress_fd=egress.fd,
            flows=flows,
            counters=bpf[b"counters"],
            spill=bpf[b"spill"],
            key_dtype=np.dtype(flows.Key),
            leaf_dtype=np.dtype(flows.Leaf),
            spill_dtype=np.dtype(layout.Leaf),
            map_entries=map_entries,
            ring_pages=ring_pages,
            decap_ifaces=bpf[b"decap_ifaces"] if "-DTUNNEL_DECAP=1" in extra_cflags else None,
        )
    except KernelError:
        bpf.cleanup()
        raise
    except Exception as exc:
        bpf.cleanup()
        raise KernelError(f"loading the BPF classifier failed (verifier or permissions): {exc}") from exc
    return prog


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_RING_BYTES = 1 << 31  # BPF_MAP_TYPE_RINGBUF: max_entries (u32) is a power of two and a page multiple


@contextmanager
def _c_stderr() -> Iterator[list[str]]:
    """Capture file descriptor 2 meanwhile: bcc and libbpf print the real cause of a failure (the map
    the kernel refused, clang's errors, the verifier log) there, not in the exception they raise.
    Yields a list that holds the captured text once the block is over. Hand-written: no library does
    fd-level capture. What others wrote to stderr meanwhile is echoed too (never lost)."""
    box: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield box
            finally:
                os.dup2(saved, 2)
                tmp.seek(0)
                box.append(tmp.read().decode(errors="replace"))
    finally:
        os.close(saved)
    if box and box[0]:
        log.debug("bcc output:\n%s", box[0].rstrip())


def _explain_build_failure(output: str, exc: Exception, map_entries: int, ring_pages: int) -> str:
    """The one line that says why bcc failed: a map the kernel refused (with the config key that sizes
    it), else clang's first errors (with the kernel headers hint only when a header is missing)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    refused = next((ln for ln in lines if "could not open bpf map" in ln), None)
    if refused is not None:
        if ": spill," in refused:
            size = f"cache.ring_buffer_pages={ring_pages} ({ring_pages * PAGE_SIZE:,} bytes)"
        elif ": flows," in refused:
            size = f"cache.kernel_map_entries={map_entries}"
        else:
            size = f"cache.kernel_map_entries={map_entries}, cache.ring_buffer_pages={ring_pages}"
        return f"the kernel refused a BPF map: {refused}; lower {size} (or raise the memlock limit)"
    errors = [ln for ln in lines if "error:" in ln][:3]
    headers = not errors or any("file not found" in e for e in errors)
    hint = " are kernel headers installed? run ./setup.sh" if headers else ""
    detail = "; ".join(errors) if errors else str(exc)
    return f"compiling {PROGRAM_FILE} failed: {detail};{hint}".rstrip(";")


# --- raw bpf() calls through libbpf (bcc 0.26 lacks per-key lookup-and-delete and test runs) ---


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_LIB: ctypes.CDLL | None = None


def libbpf() -> ctypes.CDLL:
    """libbpf.so.1 (shipped with Debian's bcc), loaded once."""
    global _LIB
    if _LIB is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise KernelError(f"libbpf not found ({exc}); run ./setup.sh") from exc
        vp, u32p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)
        lib.bpf_map_lookup_and_delete_elem.argtypes = [ctypes.c_int, vp, vp]
        lib.bpf_map_lookup_and_delete_elem.restype = ctypes.c_int
        for fn in (lib.bpf_map_lookup_batch, lib.bpf_map_lookup_and_delete_batch):
            fn.argtypes = [ctypes.c_int, vp, vp, vp, vp, u32p, ctypes.POINTER(_BatchOpts)]
            fn.restype = ctypes.c_int
        lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
        lib.bpf_prog_test_run_opts.restype = ctypes.c_int
        lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, vp, u32p]
        lib.bpf_obj_get_info_by_fd.restype = ctypes.c_int
        _LIB = lib
    return _LIB


def map_batch(
    map_fd: int, key_dtype: np.dtype, leaf_dtype: np.dtype, capacity: int, delete: bool, chunk: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """All entries of a hash map as (keys, leaves) arrays, with BPF_MAP_LOOKUP(_AND_DELETE)_BATCH.

    With delete=True each element is copied and removed under its bucket lock: atomic per element."""
    lib = libbpf()
    fn = lib.bpf_map_lookup_and_delete_batch if delete else lib.bpf_map_lookup_batch
    keys = np.empty(capacity + chunk, dtype=key_dtype)
    leaves = np.empty(capacity + chunk, dtype=leaf_dtype)
    opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
    in_tok = ctypes.create_string_buffer(64)
    out_tok = ctypes.create_string_buffer(64)
    n = 0
    first = True
    while n < capacity + chunk:
        count = ctypes.c_uint32(min(chunk, capacity + chunk - n))
        ret = fn(
            map_fd,
            None if first else in_tok,
            out_tok,
            keys.ctypes.data + n * key_dtype.itemsize,
            leaves.ctypes.data + n * leaf_dtype.itemsize,
            ctypes.byref(count),
            ctypes.byref(opts),
        )
        err = ctypes.get_errno() if ret < 0 else 0
        n += count.value
        if ret < 0 and (err == errno.ENOENT or -ret == errno.ENOENT):
            break
        if ret < 0:
            if (err == errno.ENOSPC or -ret == errno.ENOSPC) and count.value == 0:
                chunk *= 2  # a bucket holds more than chunk elements: retry bigger
                keys = np.resize(keys, n + capacity + chunk)
                leaves = np.resize(leaves, n + capacity + chunk)
                continue
            raise KernelError(f"bpf map batch {'lookup_and_delete' if delete else 'lookup'}: {os.strerror(err or -ret)}")
        ctypes.memmove(in_tok, out_tok, 64)
        first = False
    if n < capacity // 2:  # do not pin a mostly empty buffer
        return keys[:n].copy(), leaves[:n].copy()
    return keys[:n], leaves[:n]


def prog_test_run(prog_fd: int, frame: bytes, ctx: bytes | None = None, repeat: int = 1) -> tuple[int, int]:
    """Run a loaded program once on a frame (BPF_PROG_TEST_RUN): returns (retval, duration_ns).

    ctx, if given, is a struct __sk_buff (zero except mark, priority, ifindex, cb, tstamp,
    wire_len, gso_segs, gso_size)."""
    lib = libbpf()
    data = ctypes.create_string_buffer(frame, len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(data, ctypes.c_void_p)
    opts.data_size_in = len(frame)
    opts.data_out = ctypes.cast(out, ctypes.c_void_p)
    opts.data_size_out = len(out)
    opts.repeat = repeat
    if ctx is not None:
        cbuf = ctypes.create_string_buffer(ctx, len(ctx))
        cout = ctypes.create_string_buffer(len(ctx))
        opts.ctx_in = ctypes.cast(cbuf, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
        opts.ctx_out = ctypes.cast(cout, ctypes.c_void_p)
        opts.ctx_size_out = len(ctx)
    ret = lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if ret < 0:
        raise KernelError(f"BPF_PROG_TEST_RUN failed: {os.strerror(-ret)}")
    # retval is the program's int return (TC_ACT_UNSPEC = -1 shows as 0xffffffff).
    return ctypes.c_int32(opts.retval).value, int(opts.duration)


@dataclass(frozen=True, slots=True)
class ProgSize:
    """What the kernel says of one loaded program's size: the verifier's budget and what runs."""

    xlated_insns: int  # instructions after the verifier's rewrites (bpftool's "xlated" / 8 bytes each)
    jited_bytes: int  # machine code bytes (0 without the JIT)
    verified_insns: int  # instructions the verifier processed (its 1M budget is spent on these)

    def as_dict(self) -> dict[str, int]:
        """The JSON form bpf/insn_counts.json stores."""
        return {"xlated_insns": self.xlated_insns, "jited_bytes": self.jited_bytes,
                "verified_insns": self.verified_insns}


# Offsets in struct bpf_prog_info (include/uapi/linux/bpf.h): jited_prog_len, xlated_prog_len, and
# verified_insns (Linux 5.16+; a shorter struct from an older kernel leaves it 0).
_INFO_JITED_LEN, _INFO_XLATED_LEN, _INFO_VERIFIED_INSNS, _INFO_SIZE = 16, 20, 216, 256


def prog_size(prog_fd: int) -> ProgSize:
    """BPF_OBJ_GET_INFO_BY_FD on a program: its translated/JITed size and the verifier's count."""
    buf = ctypes.create_string_buffer(_INFO_SIZE)
    size = ctypes.c_uint32(_INFO_SIZE)
    if libbpf().bpf_obj_get_info_by_fd(prog_fd, buf, ctypes.byref(size)) != 0:
        raise KernelError(f"BPF_OBJ_GET_INFO_BY_FD on program fd {prog_fd}: {os.strerror(ctypes.get_errno())}")
    raw = buf.raw

    def u32(off: int) -> int:
        return int.from_bytes(raw[off:off + 4], sys.byteorder) if off + 4 <= size.value else 0

    return ProgSize(u32(_INFO_XLATED_LEN) // 8, u32(_INFO_JITED_LEN), u32(_INFO_VERIFIED_INSNS))
