"""Kernel test fixtures: a freshly loaded classifier, and two network namespaces joined by a veth pair.

Every namespace, qdisc, filter and program made here is removed in a finally, even when a test fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipfixer.lab import Lab


@pytest.fixture
def netpair() -> Iterator[Lab]:
    """Two namespaces joined by a veth pair (ipfixer.lab.Lab), removed afterwards."""
    with Lab() as lab:
        yield lab


@pytest.fixture
def program():  # type: ignore[no-untyped-def]
    """A freshly compiled and loaded classifier (default map size), unloaded afterwards."""
    from ipfixer.sources.kernel.program import load_program

    prog = load_program(map_entries=4096)
    try:
        yield prog
    finally:
        prog.close()
