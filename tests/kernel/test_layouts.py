"""Facts checked, not copied (issue 11 item 4): the struct sizes, alignments and field offsets
bpf/flow_types.h states in its comments are the layouts bcc compiled, every hole is an explicit pad
field, and userspace's assumptions about them (the ring reader's record slot, the flow key's fields,
the cgroup event's struct format, the counter array's length) hold."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ipfixer.enrich.cgroups import EVENT_STRUCT
from ipfixer.flows.rows import KEY_DTYPE, KEY_FIELDS, LEAF_DTYPE
from ipfixer.sources.kernel.program import BPF_DIR, COUNTER_NAMES

pytestmark = pytest.mark.root

HEADER = (BPF_DIR / "flow_types.h").read_text()


def comment_before(struct_name: str) -> str:
    """The comment block just before `struct NAME {` in the header."""
    m = re.search(rf"^struct {struct_name} \{{", HEADER, re.M)
    assert m is not None, struct_name
    return HEADER[HEADER.rfind("/*", 0, m.start()):m.start()]


@pytest.fixture(scope="module")
def compiled() -> Iterator[dict[str, np.dtype]]:
    """Every struct of flow_types.h as bcc compiles it (one never-used array map per struct, the way
    flow_tc.c declares spill_layout), as numpy dtypes."""
    from bcc import BPF

    names = re.findall(r"^struct (\w+) \{", HEADER, re.M)
    text = '#include "flow_types.h"\n' + "".join(f"BPF_ARRAY(l_{n}, struct {n}, 1);\n" for n in names)
    bpf = BPF(text=text.encode(), cflags=[f"-I{BPF_DIR}"])
    try:
        yield {n: np.dtype(bpf[f"l_{n}".encode()].Leaf) for n in names}
    finally:
        bpf.cleanup()


def stated_sizes() -> dict[str, int]:
    """struct name -> the size the comment just before it states ("(60 bytes" ...)."""
    out = {}
    for m in re.finditer(r"^struct (\w+) \{", HEADER, re.M):
        comment = HEADER[HEADER.rfind("/*", 0, m.start()):m.start()]
        size = re.search(r"\((\d+) bytes", comment)
        if size:
            out[m.group(1)] = int(size.group(1))
    return out


def test_every_struct_states_its_size() -> None:
    assert set(stated_sizes()) == set(re.findall(r"^struct (\w+) \{", HEADER, re.M))


def test_stated_sizes_are_the_compiled_layouts(program: Any) -> None:
    compiled = {"flow_key": program.key_dtype, "flow_metrics": program.leaf_dtype,
                "spill_record": program.spill_dtype}
    stated = stated_sizes()
    assert {k: v.itemsize for k, v in compiled.items()} == {k: stated[k] for k in compiled}


def test_no_implicit_padding(program: Any) -> None:
    """Every byte of each struct is a named field (the key is hashed byte for byte, so a hole the
    program does not zero would split one flow into several)."""
    for dt in (program.key_dtype, program.leaf_dtype, program.spill_dtype):
        fields: Any = dt.fields
        covered = sum(f[0].itemsize for f in fields.values())
        assert covered == dt.itemsize, dt
        for name, (sub, off, *_) in fields.items():
            assert off % min(sub.base.itemsize, 8) == 0, (name, off)  # naturally aligned


def test_userspace_views_match(program: Any) -> None:
    key_fields: Any = program.key_dtype.fields
    assert set(KEY_FIELDS) == {n for n in key_fields if not n.startswith("pad")}
    for name in KEY_FIELDS:  # same type and shape per field, whatever the offsets
        assert key_fields[name][0] == KEY_DTYPE.fields[name][0], name  # type: ignore[index]
    leaf_fields: Any = program.leaf_dtype.fields
    for name in LEAF_DTYPE.names or ():
        assert leaf_fields[name][0].kind == "u", name
    spill: Any = program.spill_dtype.fields
    assert spill["key"][0] == program.key_dtype and spill["key"][1] == 0
    assert (program.spill_dtype.itemsize + 8 + 7) // 8 * 8 == 96  # the ring slot the reader assumes
    assert np.dtype(program.spill_dtype).itemsize % 8 == 0


def test_every_shared_struct_compiles_to_its_stated_size(compiled: dict[str, np.dtype]) -> None:
    assert {k: v.itemsize for k, v in compiled.items()} == stated_sizes()
    assert {"flow_key", "flow_metrics", "spill_record", "cgroup_flow_event"} <= set(compiled)


def c_alignment(dt: np.dtype) -> int:
    """The C alignment of a struct whose fields bcc laid out (bcc's ctypes types are packed, with its own
    __pad fields in any hole): the largest natural alignment of a member."""
    fields: Any = dt.fields
    return max(min(sub.base.itemsize, 8) for sub, *_ in fields.values())


def test_bcc_found_no_hole(compiled: dict[str, np.dtype]) -> None:
    """bcc fills an undeclared hole with a `__pad_N` field of its own: none may appear (every hole is a
    padN field the program zeroes), each member is naturally aligned, and the size rounds to the alignment."""
    for name, dt in compiled.items():
        fields: Any = dt.fields
        assert not [n for n in fields if n.startswith("__")], name
        for field_name, (sub, off, *_) in fields.items():
            assert off % min(sub.base.itemsize, 8) == 0, (name, field_name, off)
        assert dt.itemsize % c_alignment(dt) == 0, name


def test_stated_alignments_and_offsets(compiled: dict[str, np.dtype]) -> None:
    """"(60 bytes, 4-aligned)" and "name @16" in a struct's comment are its compiled alignment and offsets."""
    checked = 0
    for name, dt in compiled.items():
        comment = comment_before(name)
        align = re.search(r"(\d+)-aligned", comment)
        if align:
            assert c_alignment(dt) == int(align.group(1)), name
            checked += 1
        fields: Any = dt.fields
        for field_name, off in re.findall(r"(\w+) @(\d+)", comment):
            assert fields[field_name][1] == int(off), (name, field_name)
            checked += 1
    assert checked >= 10


def test_cgroup_event_is_what_the_consumer_unpacks(compiled: dict[str, np.dtype]) -> None:
    """ipfixer/enrich/cgroups.py reads the ring-buffer event with a struct format: same size, and each
    format item lands at the compiled offset of the field it stands for (in declaration order)."""
    dt = compiled["cgroup_flow_event"]
    assert EVENT_STRUCT.size == dt.itemsize == 32
    fields: Any = dt.fields
    items = re.findall(r"\d*[A-Za-z]", EVENT_STRUCT.format.lstrip("="))  # "Q", "4s", ...
    sizes = [struct.calcsize("=" + code) for code in items]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    assert len(items) == len(dt.names or ())
    assert offsets == [fields[n][1] for n in dt.names or ()]
    assert sizes == [fields[n][0].itemsize for n in dt.names or ()]


def test_cgroup_program_builds_as_the_attributor_loads_it() -> None:
    """bpf/cgroup_skb.c takes its event from flow_types.h; both entry points pass the verifier."""
    from bcc import BPF

    from ipfixer.enrich.cgroups import PROGRAM_FILE

    bpf = BPF(src_file=str(PROGRAM_FILE).encode(), cflags=[f"-I{PROGRAM_FILE.parent}"])
    try:
        for fn in ("cgroup_skb_ingress", "cgroup_skb_egress"):
            assert bpf.load_func(fn.encode(), BPF.CGROUP_SKB).fd >= 0
    finally:
        bpf.cleanup()


def test_spill_slot_stated_is_the_reader_slot(program: Any) -> None:
    """SPILL_RING_PAGES' comment sizes the ring in records of "(96 bytes each)": the 8-byte ring header
    plus the record, rounded up to 8 (what sources/kernel/spill.py computes)."""
    stated = re.search(r"spill records \((\d+) bytes each\)", HEADER)
    assert stated is not None
    assert (program.spill_dtype.itemsize + 8 + 7) // 8 * 8 == int(stated.group(1))


def test_counter_array_has_one_slot_per_name(program: Any) -> None:
    """The per-CPU counters array is CNT_MAX long and COUNTER_NAMES (read from the same enum) names each slot."""
    assert len(program.counters) == len(COUNTER_NAMES)
    assert set(program.counter_values()) == set(COUNTER_NAMES)
