"""Facts checked, not copied (issue 11 item 4): the struct sizes bpf/flow_types.h states in its comments
are the layouts bcc compiled, every hole is an explicit pad field, and userspace's assumptions about
them (the ring reader's record slot, the flow key's fields) hold."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from ipfixer.flows.rows import KEY_DTYPE, KEY_FIELDS, LEAF_DTYPE
from ipfixer.sources.kernel.program import BPF_DIR

pytestmark = pytest.mark.root

HEADER = (BPF_DIR / "flow_types.h").read_text()


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
    assert {k: v.itemsize for k, v in compiled.items()} == stated_sizes()


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
