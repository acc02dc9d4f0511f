"""Process memory: hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

glibc serves allocations below its mmap threshold from the heap, and raises that threshold as large blocks are
freed, so loops that allocate and free parameter-sized tensors every step fragment the heap: the process's RSS
then grows far past its live tensors. `large_blocks_mapped` serves large blocks with mmap inside a loop, so
each one returns to the OS when it is freed."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3
_GLIBC_MAX_THRESHOLD = 32 << 20  # glibc's ceiling for its dynamic threshold (64-bit)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def release_memory() -> None:
    """Collect garbage and return freed heap memory to the OS."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def large_blocks_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """Within the block, blocks of `threshold` bytes or more are mmap-ed (returned to the OS when freed); on
    exit the threshold goes to glibc's dynamic ceiling (the value it would drift to) and the heap is trimmed."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_THRESHOLD)
        libc.malloc_trim(0)
