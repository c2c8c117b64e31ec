"""Timing and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from vqfunc.bench._allocator import _glibc

_MIB = float(1 << 20)


class PeakMemory:
    """Peak extra memory of a call on one device, in bytes (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_supported = sys.platform.startswith("linux")
        self._libc: Any = _glibc()

    def _status(self, field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int | None]:
        """Run `fn`; return its result and its peak extra memory (None if not measurable)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            result = fn()
            torch.cuda.synchronize(self.device)
            return result, torch.cuda.max_memory_allocated(self.device) - before
        if not self.cpu_supported:
            return fn(), None
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            return fn(), None
        before = self._status("VmRSS")
        result = fn()
        return result, self._status("VmHWM") - before


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype, repeats: int, size: int = 2048) -> float:
    """FLOP/s of a `size`-square matrix product in `dtype`: the best of `max(repeats, 10)` runs,
    since the floor is what the hardware can do, and a busy machine only ever slows it."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = _time(lambda: a @ b, device, max(repeats, 10))
    return 2.0 * size**3 / min(times)


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of `fn`, with Python's garbage collector paused, as `timeit` does: a
    collection that the call's allocations happen to trigger walks every object of the process
    (a few ms with torch loaded) and would be charged to whichever method was running."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    fn()
    return [_once(fn, device) for _ in range(repeats)]
