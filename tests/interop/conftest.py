"""Real collectors as fixtures (nfcapd, tshark); the classes live in tests/collectors.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.collectors import (
    Nfacctd,
    Nfcapd,
    PyNetflowCollector,
    TsharkCapture,
    free_udp_port,
    known_flow_records,
)


@pytest.fixture
def nfcapd(tmp_path: Path) -> Iterator[Any]:
    """Factory: nfcapd(port=None) starts a collector; all of them are stopped at teardown."""
    started: list[Nfcapd] = []

    def start(port: int | None = None) -> Nfcapd:
        n = Nfcapd(tmp_path / f"nfcapd{len(started)}", port or free_udp_port())
        started.append(n)
        return n

    try:
        yield start
    finally:
        for n in started:
            n.kill()


@pytest.fixture
def tshark(tmp_path: Path) -> Iterator[Any]:
    """Factory: tshark(count) starts a capture on a free port; killed at teardown."""
    started: list[TsharkCapture] = []

    def start(count: int) -> TsharkCapture:
        t = TsharkCapture(tmp_path, count)
        started.append(t)
        return t

    try:
        yield start
    finally:
        for t in started:
            t.kill()


@pytest.fixture
def nfacctd(tmp_path: Path) -> Iterator[Any]:
    """Factory: nfacctd(port=None) starts pmacct's nfacctd; all of them are killed at teardown."""
    started: list[Nfacctd] = []

    def start(port: int | None = None) -> Nfacctd:
        n = Nfacctd(tmp_path / f"nfacctd{len(started)}", port or free_udp_port())
        started.append(n)
        return n

    try:
        yield start
    finally:
        for n in started:
            n.kill()


@pytest.fixture
def pynetflow(tmp_path: Path) -> Iterator[Any]:
    """Factory: pynetflow(port=None) starts python-netflow's collector; killed at teardown."""
    started: list[PyNetflowCollector] = []

    def start(port: int | None = None) -> PyNetflowCollector:
        c = PyNetflowCollector(tmp_path / f"pynetflow{len(started)}", port or free_udp_port())
        started.append(c)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.kill()


@pytest.fixture
def base_ms() -> int:
    """Flow times near now, so collectors file them in the current interval."""
    return (time.time_ns() // 1_000_000_000) * 1000


@pytest.fixture
def known_flows(base_ms: int) -> list[Any]:
    return known_flow_records(base_ms)


@pytest.fixture
def flow_factory() -> Any:
    """known_flow_records itself, for tests that need flows at another base time or many of them."""
    return known_flow_records
