"""How the benchmark's process gets memory: glibc's defaults, or freed memory kept for reuse.

On CPU torch allocates tensors with the C library's `malloc`. glibc's serves blocks of 32 MiB
and more (its largest mmap threshold) straight from the OS and unmaps them on `free`, and it
trims the top of its heap once more than twice the current threshold lies free there. A call that
returns large fresh tensors (`quantize` returns three of `N x D` floats, the search only
`N` codes) then takes a page fault on every 4 KiB page of them, each one zeroed by the OS, on
every call: on a 2-core virtual machine 1,500-1,700 faults and 10-15 ms per `quantize` call at
`N = 65536, D = 32` (from `/proc` fault counts, see docs/benchmark.md), more than the whole
pass that fills those tensors.

That cost belongs to the allocator, not to the quantizer: jemalloc or tcmalloc (the allocators
PyTorch's CPU tuning guides recommend, through `LD_PRELOAD`) keep freed memory, and so does glibc
with `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` in the environment.
`retain_freed_memory` sets the same two parameters from inside the process with `mallopt`, for
every method of the run alike; `python -m vqfunc.bench --allocator system` keeps glibc's
defaults and shows the faults' cost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below 1 GiB come from the heap; up to 2 GiB - 1 of free heap top stays mapped.
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = (1 << 31) - 1


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has `mallopt` and `gnu_get_libc_version`), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Make glibc's `malloc` in this process keep freed memory for reuse instead of returning
    it to the OS (see the module docstring). Process-wide and not undone. Returns whether both
    settings took effect (False where the C library is not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return mmap_ok and trim_ok
