"""COUNTER_NAMES is read from `enum ipfixer_counter` in bpf/flow_types.h (issue 11 item 4): one list,
and an enum edit that would shift names against indices is refused with the entry named."""

from __future__ import annotations

import re

import pytest

from ipfixer.errors import KernelError
from ipfixer.sources.kernel.program import COUNTER_NAMES, TYPES_HEADER, counter_names

HEADER = TYPES_HEADER.read_text()


def test_names_are_the_enum_entries_in_order() -> None:
    body = HEADER[HEADER.index("enum ipfixer_counter"):]
    body = body[:body.index("CNT_MAX")]
    entries = re.findall(r"^\s*CNT_(\w+)", body, re.M)
    assert len(entries) >= 20
    assert list(COUNTER_NAMES) == [e.lower() for e in entries]
    assert COUNTER_NAMES[0] == "packets" and "observed_octets_egress" in COUNTER_NAMES  # metric names kept
    assert len(set(COUNTER_NAMES)) == len(COUNTER_NAMES)


def test_comments_and_trailing_comma_are_ignored() -> None:
    text = "enum ipfixer_counter {\n CNT_A = 0, /* x, y */\n CNT_B_C, // z,\n CNT_MAX,\n};"
    assert counter_names(text) == ("a", "b_c")


@pytest.mark.parametrize(("text", "words"), [
    ("int x;", "no `enum ipfixer_counter"),
    ("enum ipfixer_counter { CNT_A = 0, CNT_B = 5, CNT_MAX };", "'CNT_B = 5'"),
    ("enum ipfixer_counter { CNT_A = 1, CNT_MAX };", "'CNT_A = 1'"),
    ("enum ipfixer_counter { CNT_A, OTHER, CNT_MAX };", "'OTHER'"),
    ("enum ipfixer_counter { CNT_A, CNT_B };", "does not end with CNT_MAX"),
])  # fmt: skip
def test_an_enum_that_would_shift_names_is_refused(text: str, words: str) -> None:
    with pytest.raises(KernelError, match=re.escape(words)):
        counter_names(text, "t.h")
