"""Loading the classifier fails with the real cause in the message: the map the kernel refused and the
config key that sizes it, a ring size the kernel cannot take, clang's own error; the kernel headers
hint only when a header is missing."""

from __future__ import annotations

import pytest

from ipfixer.errors import KernelError
from ipfixer.sources.kernel.program import MAX_RING_BYTES, PAGE_SIZE, load_program

pytestmark = pytest.mark.root


def test_ring_larger_than_the_kernel_allows_is_refused_before_bcc() -> None:
    with pytest.raises(KernelError) as err:
        load_program(map_entries=64, ring_pages=1 << 20)  # 4 GiB: wraps the kernel's u32 size to 0
    msg = str(err.value)
    assert "cache.ring_buffer_pages" in msg and f"at most {MAX_RING_BYTES // PAGE_SIZE} pages" in msg
    assert "kernel headers" not in msg and "compiling" not in msg


@pytest.mark.parametrize("pages", [3, 0, 96])
def test_ring_not_a_power_of_two_is_refused(pages: int) -> None:
    with pytest.raises(KernelError, match="power of two"):
        load_program(map_entries=64, ring_pages=pages)


def test_map_the_kernel_refuses_names_the_map_and_its_key() -> None:
    # 2^30 entries: the kernel's hash map refuses it (E2BIG) before allocating anything.
    with pytest.raises(KernelError) as err:
        load_program(map_entries=1 << 30, ring_pages=8)
    msg = str(err.value)
    assert "could not open bpf map: flows" in msg and "Argument list too long" in msg
    assert "cache.kernel_map_entries=1073741824" in msg
    assert "kernel headers" not in msg and "compiling" not in msg


def test_compile_error_shows_clang_and_hints_headers_only_when_one_is_missing() -> None:
    with pytest.raises(KernelError) as err:
        load_program(map_entries=64, ring_pages=8, extra_cflags=("-include", "/nonexistent/ipfxh3.h"))
    assert "'/nonexistent/ipfxh3.h' file not found" in str(err.value) and "kernel headers" in str(err.value)
    with pytest.raises(KernelError) as err:
        load_program(map_entries=64, ring_pages=8, extra_cflags=("-DSAMPLING_INTERVAL=)",))
    assert "error:" in str(err.value) and "kernel headers" not in str(err.value)


def test_a_good_load_after_failures_works() -> None:
    prog = load_program(map_entries=64, ring_pages=8)
    prog.close()
