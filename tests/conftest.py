"""Shared test policy: tests marked `root` need root, BPF and network namespaces; `interop` tests need the
real collectors. On a machine without them they skip with the reason, but CI sets
IPFIXER_REQUIRE_KERNEL_TESTS=1 so that such a test fails instead of silently skipping."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE = os.environ.get("IPFIXER_REQUIRE_KERNEL_TESTS") == "1"


def _root_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (BPF, tc, network namespaces)"
    if not os.path.isdir("/sys/fs/bpf") and not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "needs a kernel with BPF"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (python3-bpfcc; run ./setup.sh)"
    return None


def _interop_missing() -> str | None:
    for tool in ("nfcapd", "nfdump", "tshark"):
        if shutil.which(tool) is None:
            return f"needs {tool} (run ./setup.sh)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root_reason = _root_missing()
    interop_reason = _interop_missing()
    for item in items:
        reasons = []
        if "root" in item.keywords and root_reason:
            reasons.append(root_reason)
        if "interop" in item.keywords and interop_reason:
            reasons.append(interop_reason)
        if not reasons:
            continue
        if REQUIRE:
            continue  # run it anyway: it fails loudly rather than skipping in CI
        item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))
