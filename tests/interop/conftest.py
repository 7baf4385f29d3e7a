"""Real collectors as fixtures (nfcapd, tshark); the classes live in tests/collectors.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from tests.collectors import (
    Nfacctd,
    Nfcapd,
    PyNetflowCollector,
    TsharkCapture,
    free_udp_port,
    known_flow_records,
)


class _Killable(Protocol):
    def kill(self) -> None: ...


K = TypeVar("K", bound=_Killable)


def _started(make: Callable[..., K]) -> Iterator[Callable[..., K]]:
    """A factory fixture's body: start(...) calls make(n, ...) (n: how many came before, for a distinct
    directory); every collector it started is killed at teardown, even when the test failed."""
    started: list[K] = []

    def start(*args: Any, **kwargs: Any) -> K:
        c = make(len(started), *args, **kwargs)
        started.append(c)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.kill()


@pytest.fixture
def nfcapd(tmp_path: Path) -> Iterator[Any]:
    """Factory: nfcapd(port=None) starts a collector; all of them are stopped at teardown."""
    yield from _started(lambda n, port=None: Nfcapd(tmp_path / f"nfcapd{n}", port or free_udp_port()))


@pytest.fixture
def tshark(tmp_path: Path) -> Iterator[Any]:
    """Factory: tshark(count) starts a capture on a free port; killed at teardown."""
    yield from _started(lambda n, count: TsharkCapture(tmp_path, count))


@pytest.fixture
def nfacctd(tmp_path: Path) -> Iterator[Any]:
    """Factory: nfacctd(port=None) starts pmacct's nfacctd; all of them are killed at teardown."""
    yield from _started(lambda n, port=None: Nfacctd(tmp_path / f"nfacctd{n}", port or free_udp_port()))


@pytest.fixture
def pynetflow(tmp_path: Path) -> Iterator[Any]:
    """Factory: pynetflow(port=None) starts python-netflow's collector; killed at teardown."""
    yield from _started(lambda n, port=None: PyNetflowCollector(tmp_path / f"pynetflow{n}",
                                                                port or free_udp_port()))


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
