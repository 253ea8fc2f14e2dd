"""The C allocator (glibc): giving freed memory back to the OS. glibc keeps large freed blocks in its heaps (its
mmap threshold rises to the largest block freed so far, up to 32 MB), so a process that briefly held big temporaries
(decoded images, a quantizing load's float copies) keeps its peak RSS unless told. No-ops where glibc is absent
(macOS, Windows, musl)."""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_LIBC = None


def _glibc():
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(None)
            libc.malloc_trim, libc.mallopt  # noqa: B018  (both present: glibc)
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """Hand the allocator's free memory back to the OS (`malloc_trim(0)`)."""
    if _glibc():
        _LIBC.malloc_trim(0)


def map_large_allocations() -> None:
    """Blocks over 1 MB straight from mmap, so each one freed goes back to the OS at once: for a quantizing load,
    whose freed temporaries would otherwise come from the heap interleaved with kept weights and stay with the
    process (measured: +0.4-0.9 GB of peak at ~0.9 GB of int4 model). Undo with `unmap_large_allocations`."""
    if _glibc():
        _LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def unmap_large_allocations() -> None:
    """The threshold glibc's own adjustment settles at (32 MB on 64-bit), so inference's activations are reused
    from the heap rather than mapped and faulted in at every step."""
    if _glibc():
        _LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)
